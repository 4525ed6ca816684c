//! TLS, mTLS, certificate reload and the separate control-plane listener,
//! through the real binary.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::node::*;
use common::tls::*;

struct Pki {
    _dir: tempfile::TempDir,
    ca: std::path::PathBuf,
    server: CertFiles,
    client: CertFiles,
    foreign_client: CertFiles,
    ca_issuer: Ca,
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("fnrunner test CA");
    let other = Ca::new("some other CA");
    Pki {
        ca: ca.write(&dir.path().join("ca.crt")),
        server: ca.issue(&["localhost", "127.0.0.1"], dir.path(), "server"),
        client: ca.issue(&["lb.internal"], dir.path(), "client"),
        foreign_client: other.issue(&["intruder"], dir.path(), "foreign"),
        ca_issuer: ca,
        _dir: dir,
    }
}

fn tls_args(pki: &Pki, mtls: bool) -> Vec<String> {
    let mut args = vec![
        "--tls-cert".to_owned(),
        pki.server.cert.display().to_string(),
        "--tls-key".to_owned(),
        pki.server.key.display().to_string(),
    ];
    if mtls {
        args.push("--tls-client-ca".into());
        args.push(pki.ca.display().to_string());
    }
    args
}

fn start(dir: &std::path::Path, args: &[String]) -> Node {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Node::start(dir, &args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mtls_call_succeeds_over_http1_and_http2() {
    let pki = pki();
    let dir = function_dir(&["hello"]);
    let node = start(dir.path(), &tls_args(&pki, true));
    assert_eq!(node.scheme, "https");
    for (alpn, version) in [
        (&b"http/1.1"[..], http::Version::HTTP_11),
        (&b"h2"[..], http::Version::HTTP_2),
    ] {
        let config = client_config(&pki.ca, Some(&pki.client), &[alpn]);
        let reply = get(node.addr, config, "/fn/hello/tls")
            .await
            .expect("call over mTLS");
        assert_eq!(reply.status, 200);
        assert_eq!(reply.version, version);
        assert!(String::from_utf8_lossy(&reply.body).contains("path=/tls"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_foreign_client_certificate_is_refused_at_the_handshake() {
    let pki = pki();
    let dir = function_dir(&["hello"]);
    let node = start(dir.path(), &tls_args(&pki, true));
    let none = get(
        node.addr,
        client_config(&pki.ca, None, &[b"http/1.1"]),
        "/fn/hello",
    )
    .await;
    assert!(none.is_err(), "no client certificate: {none:?}");
    let foreign = get(
        node.addr,
        client_config(&pki.ca, Some(&pki.foreign_client), &[b"http/1.1"]),
        "/fn/hello",
    )
    .await;
    assert!(foreign.is_err(), "a certificate of another CA: {foreign:?}");
    // The node is unharmed.
    let good = get(
        node.addr,
        client_config(&pki.ca, Some(&pki.client), &[b"h2"]),
        "/fn/hello",
    )
    .await;
    assert_eq!(good.expect("still serving").status, 200);
    assert!(node.log().contains("TLS handshake failed"), "{}", node.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_to_the_tls_port_fails_cleanly() {
    let pki = pki();
    let dir = function_dir(&["hello"]);
    let node = start(dir.path(), &tls_args(&pki, false));
    let mut stream = std::net::TcpStream::connect(node.addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream
        .write_all(b"GET /fn/hello HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .expect("write");
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    assert!(!answer.starts_with(b"HTTP/"), "no HTTP answer on a TLS port");
    let reply = get(
        node.addr,
        client_config(&pki.ca, None, &[b"http/1.1"]),
        "/fn/hello",
    )
    .await;
    assert_eq!(reply.expect("TLS still works").status, 200);
}

#[test]
fn a_bad_certificate_or_key_fails_at_start_up_with_a_clear_message() {
    let pki = pki();
    let dir = tempfile::tempdir().expect("tempdir");
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate").expect("write");
    let other_key = pki.ca_issuer.issue(&["x"], dir.path(), "other");
    let cases: [(&std::path::Path, &std::path::Path, &str); 3] = [
        (&junk, &pki.server.key, "TLS certificate"),
        (&pki.server.cert, &junk, "TLS key"),
        (&pki.server.cert, &other_key.key, "does not match the certificate"),
    ];
    for (cert, key, needle) in cases {
        let out = common::fnrunner()
            .args(["serve", "--listen", "127.0.0.1:0", "--tls-cert"])
            .arg(cert)
            .arg("--tls-key")
            .arg(key)
            .arg(dir.path())
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(2), "{needle}");
        let err = common::stderr(&out);
        assert!(
            err.lines()
                .any(|l| l.starts_with("error: ") && l.contains(needle)),
            "{needle}: {err}"
        );
        assert!(out.stdout.is_empty(), "nothing was bound");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_certificates_without_dropping_connections() {
    let pki = pki();
    let dir = function_dir(&["hello-min"]);
    let node = start(dir.path(), &tls_args(&pki, false));
    let config = || client_config(&pki.ca, None, &[b"http/1.1"]);
    let mut open = connect(node.addr, config()).await.expect("connect");
    assert_eq!(open.get("/fn/hello-min").await.expect("first").status, 200);
    let before = open.server_cert.clone();

    // New certificate and key at the same paths, then SIGHUP.
    let fresh_dir = tempfile::tempdir().expect("tempdir");
    let fresh = pki
        .ca_issuer
        .issue(&["localhost", "127.0.0.1"], fresh_dir.path(), "server2");
    std::fs::copy(&fresh.cert, &pki.server.cert).expect("replace cert");
    std::fs::copy(&fresh.key, &pki.server.key).expect("replace key");
    node.signal(libc::SIGHUP);
    let reloaded = eventually(Duration::from_secs(10), async || {
        get(node.addr, config(), "/fn/hello-min")
            .await
            .is_ok_and(|reply| reply.server_cert != before)
    })
    .await;
    assert!(
        reloaded,
        "new connections get the new certificate: {}",
        node.log()
    );
    let again = open
        .get("/fn/hello-min")
        .await
        .expect("the open connection carries on");
    assert_eq!(again.status, 200);
    assert_eq!(again.server_cert, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_can_have_its_own_listener() {
    let dir = function_dir(&["hello-min"]);
    let node = Node::start(dir.path(), &["--admin-listen", "127.0.0.1:0"]);
    let admin = node.admin.expect("admin address");
    assert_eq!(node.get("/fn/hello-min").await.status, 200);
    assert_eq!(
        node.get("/v1/functions").await.status,
        404,
        "no deploy API on the data plane"
    );
    assert_eq!(node.get("/metrics").await.status, 404);
    assert_eq!(node.get("/v1/status").await.status, 200);
    let on_admin = |path: &'static str| send(admin, Proto::Http1, "GET", path, &[], bytes::Bytes::new());
    assert_eq!(on_admin("/v1/functions").await.status, 200);
    assert_eq!(on_admin("/metrics").await.status, 200);
    assert_eq!(
        on_admin("/fn/hello-min").await.status,
        404,
        "no calls on the control plane"
    );
}
