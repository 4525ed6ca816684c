//! A real `fnrunner serve` process on a loopback port, and a small HTTP
//! client (HTTP/1.1 or HTTP/2 by prior knowledge) to talk to it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

use super::{fixture, fnrunner};

/// A running node. Dropping it kills the process (by PID).
pub struct Node {
    pub child: Child,
    pub addr: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub dir: PathBuf,
    pub log: PathBuf,
    pub scheme: &'static str,
    _scratch: tempfile::TempDir,
}

/// How long a node may take to start (it compiles nothing up front).
const START_TIMEOUT: Duration = Duration::from_secs(30);

impl Node {
    /// Starts `fnrunner serve DIR --listen 127.0.0.1:0 ARGS…` with its own
    /// module store, and waits for its "listening" line.
    pub fn start(dir: &Path, args: &[&str]) -> Node {
        Self::start_with_env(dir, args, &std::collections::HashMap::new())
    }

    /// Like `start`, with extra environment variables for the process.
    pub fn start_with_env(dir: &Path, args: &[&str], env: &std::collections::HashMap<&str, &str>) -> Node {
        let scratch = tempfile::tempdir().expect("tempdir");
        let log = scratch.path().join("node.log");
        let log_file = std::fs::File::create(&log).expect("log file");
        let store = scratch.path().join("store");
        let mut child = fnrunner()
            .arg("serve")
            .arg(dir)
            .args(["--listen", "127.0.0.1:0", "--store-dir"])
            .arg(&store)
            .args(args)
            .env("RUST_LOG", "info")
            .envs(env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .expect("spawn fnrunner serve");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut addr = None;
        let mut admin = None;
        let mut scheme = "http";
        let wants_admin = args.contains(&"--admin-listen");
        let deadline = Instant::now() + START_TIMEOUT;
        while addr.is_none() || (wants_admin && admin.is_none()) {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match rx.recv_timeout(left) {
                Ok(line) => line,
                Err(_) => {
                    let _ = child.kill();
                    panic!(
                        "node did not start: {}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
            };
            let url = line.rsplit(' ').next().unwrap_or_default();
            let (found_scheme, host) = url.split_once("://").unwrap_or(("http", url));
            let parsed: SocketAddr = host.parse().expect("announced address");
            if found_scheme == "https" {
                scheme = "https";
            }
            if line.starts_with("fnrunner listening") {
                addr = Some(parsed);
            } else if line.starts_with("fnrunner control plane on") {
                admin = Some(parsed);
            }
        }
        Node {
            child,
            addr: addr.expect("address"),
            admin,
            dir: dir.to_owned(),
            log,
            scheme,
            _scratch: scratch,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends a signal to the node.
    pub fn signal(&self, signal: i32) {
        // SAFETY: `kill` on our own child's PID.
        unsafe {
            libc::kill(self.pid(), signal);
        }
    }

    /// Waits (bounded) for the process to exit and returns its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub async fn get(&self, path: &str) -> Reply {
        send(self.addr, Proto::Http1, "GET", path, &[], Bytes::new()).await
    }

    pub async fn post(&self, path: &str, body: impl Into<Bytes>) -> Reply {
        send(self.addr, Proto::Http1, "POST", path, &[], body.into()).await
    }

    pub async fn patch(&self, path: &str, body: impl Into<Bytes>) -> Reply {
        send(self.addr, Proto::Http1, "PATCH", path, &[], body.into()).await
    }

    /// Deploys fixture `fixture_name` as function `name` with `settings`
    /// (`PUT /v1/functions/NAME`, multipart).
    pub async fn deploy(&self, name: &str, fixture_name: &str, settings: &str) -> Reply {
        let module = std::fs::read(fixture(fixture_name)).expect("fixture");
        let (body, content_type) = multipart(&[("module", &module), ("settings", settings.as_bytes())]);
        let path = format!("/v1/functions/{name}");
        send(
            self.addr,
            Proto::Http1,
            "PUT",
            &path,
            &[("content-type", &content_type)],
            body,
        )
        .await
    }

    pub async fn status(&self) -> serde_json::Value {
        self.get("/v1/status").await.json()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A directory with copies of the named fixtures (and their settings).
pub fn function_dir(names: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for name in names {
        add_function(dir.path(), name, name, None);
    }
    dir
}

/// Copies fixture `fixture_name` into `dir` as `name`, with `settings`
/// (or the fixture's own settings file, if any).
pub fn add_function(dir: &Path, name: &str, fixture_name: &str, settings: Option<&str>) {
    std::fs::copy(fixture(fixture_name), dir.join(format!("{name}.wasm"))).expect("copy fixture");
    let own = fixture(fixture_name).with_extension("toml");
    match settings {
        Some(text) => std::fs::write(dir.join(format!("{name}.toml")), text).expect("write settings"),
        None if own.exists() => {
            std::fs::copy(own, dir.join(format!("{name}.toml"))).expect("copy settings");
        }
        None => {}
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Http1,
    Http2,
}

/// A response, read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    pub version: http::Version,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    pub fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap_or_default().to_owned())
            .unwrap_or_default()
    }
}

/// One request on a new connection.
pub async fn send(
    addr: SocketAddr,
    proto: Proto,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Reply {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let io = hyper_util::rt::TokioIo::new(stream);
    let mut request = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("host", addr.to_string());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Full::new(body)).expect("request");
    let response = match proto {
        Proto::Http1 => {
            let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
                .await
                .expect("handshake");
            tokio::spawn(connection);
            sender.send_request(request).await.expect("send")
        }
        Proto::Http2 => {
            let (mut sender, connection) =
                hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                    .await
                    .expect("h2 handshake");
            tokio::spawn(connection);
            sender.send_request(request).await.expect("send")
        }
    };
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Reply {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
        version: parts.version,
    }
}

/// A request written by hand on a raw socket: headers only. Returns the
/// stream, to send the body later (or not at all).
pub fn raw_request_headers(
    addr: SocketAddr,
    method: &str,
    path: &str,
    content_length: usize,
) -> std::net::TcpStream {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-length: {content_length}\r\n\r\n"
    )
    .expect("write head");
    stream
}

/// Reads a whole HTTP/1.1 response from a raw socket (until the peer
/// closes, or `content-length` bytes of body arrived) and returns its
/// status line, head and body.
pub fn raw_read_response(stream: &mut std::net::TcpStream) -> (u16, String, Vec<u8>) {
    let mut data = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        if let Some(end) = find(&data, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&data[..end]).into_owned();
            let length = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().to_owned())
                })
                .and_then(|v| v.parse::<usize>().ok());
            if let Some(length) = length
                && data.len() >= end + 4 + length
            {
                let status = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                return (status, head, data[end + 4..end + 4 + length].to_vec());
            }
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => {
                let end = find(&data, b"\r\n\r\n").unwrap_or(data.len());
                let head = String::from_utf8_lossy(&data[..end]).into_owned();
                let status = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                let body = data.get(end + 4..).map(<[u8]>::to_vec).unwrap_or_default();
                return (status, head, body);
            }
            Ok(n) => data.extend_from_slice(&buf[..n]),
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A `multipart/form-data` body with the given parts; returns the body and
/// its content type.
pub fn multipart(parts: &[(&str, &[u8])]) -> (Bytes, String) {
    let boundary = "fnrunner-test-boundary-7d1c";
    let mut body = Vec::new();
    for (name, bytes) in parts {
        write!(
            body,
            "--{boundary}\r\ncontent-disposition: form-data; name=\"{name}\"; filename=\"{name}\"\r\n\
             content-type: application/octet-stream\r\n\r\n"
        )
        .expect("write");
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    write!(body, "--{boundary}--\r\n").expect("write");
    (body.into(), format!("multipart/form-data; boundary={boundary}"))
}

/// Polls `check` every 20 ms for up to `within`; returns whether it held.
pub async fn eventually(within: Duration, mut check: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
