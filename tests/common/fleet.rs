//! Three real nodes, and the real load-balancer configurations from
//! `deploy/` (nginx, HAProxy) in front of them.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::node::{Node, add_function};

/// Settings of the functions every node of a test fleet serves.
pub const FUNCTIONS: &[(&str, &str, &str)] = &[
    ("hello", "hello", ""),
    // A slow echo that one call at a time saturates.
    ("slow", "sleep", "max_concurrency = 1\n"),
    // A slow echo with no limit, for calls in flight.
    ("long", "sleep", ""),
];

/// Three nodes serving `FUNCTIONS`, logging every call with its id.
pub struct Fleet {
    pub nodes: Vec<Option<Node>>,
    _dirs: Vec<tempfile::TempDir>,
}

impl Fleet {
    pub fn start() -> Self {
        let mut nodes = Vec::new();
        let mut dirs = Vec::new();
        for _ in 0..3 {
            let dir = tempfile::tempdir().expect("tempdir");
            for (name, fixture, settings) in FUNCTIONS {
                add_function(dir.path(), name, fixture, Some(settings));
            }
            let env = std::collections::HashMap::from([("RUST_LOG", "info,fnrunner::runner=debug")]);
            nodes.push(Some(Node::start_with_env(
                dir.path(),
                &["--drain-linger", "3s"],
                &env,
            )));
            dirs.push(dir);
        }
        Self { nodes, _dirs: dirs }
    }

    pub fn node(&self, index: usize) -> &Node {
        self.nodes[index].as_ref().expect("node is up")
    }

    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.nodes.iter().flatten().map(|n| n.addr).collect()
    }

    pub fn urls(&self) -> Vec<String> {
        self.addrs().iter().map(|a| format!("http://{a}")).collect()
    }

    /// `requests_handled` of every node still up (`None` for the others).
    pub async fn handled(&self) -> Vec<Option<u64>> {
        let mut out = Vec::new();
        for node in &self.nodes {
            out.push(match node {
                Some(node) => node.status().await["requests_handled"].as_u64(),
                None => None,
            });
        }
        out
    }

    /// The logs of every node still up, joined.
    pub fn logs_of_others(&self, except: usize) -> String {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != except)
            .filter_map(|(_, n)| n.as_ref().map(Node::log))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// A free loopback port.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A load balancer process; stopped (by PID) when dropped.
pub struct Lb {
    pub child: Child,
    pub addr: SocketAddr,
    pub name: &'static str,
    _dir: tempfile::TempDir,
}

impl Drop for Lb {
    fn drop(&mut self) {
        // SAFETY: signalling our own child process.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_listening(addr: SocketAddr, what: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if TcpStream::connect(addr).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "{what} never listened on {addr}: {}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

fn deploy_file(relative: &str) -> std::path::PathBuf {
    super::repo().join("deploy").join(relative)
}

/// nginx with `deploy/nginx/fnrunner.conf` in front of `nodes`.
pub fn nginx(nodes: &[SocketAddr]) -> Lb {
    let dir = tempfile::tempdir().expect("tempdir");
    let prefix = dir.path();
    let port = free_port();
    let servers: String = nodes
        .iter()
        .map(|a| format!("server {a} max_fails=1 fail_timeout=10s;\n"))
        .collect();
    std::fs::write(prefix.join("fnrunner-nodes.conf"), servers).expect("nodes");
    std::fs::write(
        prefix.join("fnrunner-listen.conf"),
        format!("listen 127.0.0.1:{port};\n"),
    )
    .expect("listen");
    let main = format!(
        "user root;\nworker_processes 1;\npid {p}/nginx.pid;\nerror_log {p}/error.log info;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {p}/client_body;\n  proxy_temp_path {p}/proxy;\n\
         \n  include {conf};\n}}\n",
        p = prefix.display(),
        conf = deploy_file("nginx/fnrunner.conf").display()
    );
    std::fs::write(prefix.join("nginx.conf"), main).expect("main");
    let log = prefix.join("error.log");
    let child = Command::new("nginx")
        .arg("-p")
        .arg(prefix)
        .arg("-c")
        .arg(prefix.join("nginx.conf"))
        .args(["-g", "daemon off;"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nginx is installed (.ci/run installs it)");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_listening(addr, "nginx", &log);
    Lb {
        child,
        addr,
        name: "nginx",
        _dir: dir,
    }
}

/// HAProxy with `deploy/haproxy/haproxy.cfg` in front of three nodes.
pub fn haproxy(nodes: &[SocketAddr]) -> Lb {
    assert_eq!(nodes.len(), 3, "the recipe names three nodes");
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let log = dir.path().join("haproxy.log");
    let child = Command::new("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(deploy_file("haproxy/haproxy.cfg"))
        .env("FNRUNNER_LISTEN", format!("127.0.0.1:{port}"))
        .env("FNRUNNER_NODE1", nodes[0].to_string())
        .env("FNRUNNER_NODE2", nodes[1].to_string())
        .env("FNRUNNER_NODE3", nodes[2].to_string())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("haproxy is installed (.ci/run installs it)");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_listening(addr, "haproxy", &log);
    Lb {
        child,
        addr,
        name: "haproxy",
        _dir: dir,
    }
}
