//! The sandbox audit, against the real binary: environment, filesystem
//! (preopens, `..`, absolute paths, planted symlinks, read-only), outbound
//! HTTP, and every resource a guest could try to exhaust.

mod common;

use std::convert::Infallible;

use bytes::Bytes;
use common::node::*;

fn escape_lines(reply: &Reply) -> Vec<String> {
    reply.text().lines().map(str::to_owned).collect()
}

fn line_for<'a>(lines: &'a [String], op_path: &str) -> &'a str {
    lines
        .iter()
        .find(|l| l.starts_with(&format!("{op_path}: ")))
        .map(String::as_str)
        .unwrap_or_else(|| panic!("no result for {op_path} in {lines:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guests_see_no_host_environment() {
    let dir = function_dir(&["env", "stdio"]);
    let node = {
        let mut child_env = std::collections::HashMap::new();
        child_env.insert("FNRUNNER_TEST_SECRET", "leaked");
        Node::start_with_env(dir.path(), &[], &child_env)
    };
    let env = node.get("/fn/env").await.text();
    assert!(
        !env.contains("FNRUNNER_TEST_SECRET") && !env.contains("leaked"),
        "{env}"
    );
    assert!(
        !env.lines()
            .any(|l| l.starts_with("PATH=") || l.starts_with("HOME=")),
        "{env}"
    );
    assert_eq!(node.get("/fn/stdio").await.text(), "env=0 passwd=denied\n");
}

/// `root/data` (the preopen) with a file, a subdirectory and planted
/// symlinks pointing out of it; `root/secret.txt` beside it.
fn preopen_tree(root: &std::path::Path) {
    let data = root.join("data");
    std::fs::create_dir_all(data.join("sub")).expect("mkdir");
    std::fs::write(data.join("inside.txt"), "inside the preopen").expect("write");
    std::fs::write(root.join("secret.txt"), "host secret").expect("write");
    std::os::unix::fs::symlink("/etc/passwd", data.join("link-abs")).expect("symlink");
    std::os::unix::fs::symlink("../secret.txt", data.join("link-rel")).expect("symlink");
    std::os::unix::fs::symlink("../..", data.join("sub/up")).expect("symlink");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_file_outside_a_preopen_is_reachable_and_read_only_means_read_only() {
    let root = tempfile::tempdir().expect("tempdir");
    preopen_tree(root.path());
    let functions = root.path().join("functions");
    std::fs::create_dir(&functions).expect("mkdir");
    add_function(
        &functions,
        "ro",
        "escape",
        Some("[[preopen]]\nhost = \"../data\"\nguest = \"/data\"\n"),
    );
    add_function(
        &functions,
        "rw",
        "escape",
        Some("[[preopen]]\nhost = \"../data\"\nguest = \"/data\"\nwritable = true\n"),
    );
    let node = Node::start(&functions, &[]);
    let probes = "r /data/inside.txt\nr /data/../secret.txt\nr /data/../../etc/passwd\nr /data/link-abs\n\
                  r /data/link-rel\nr /data/sub/up/secret.txt\nr /etc/passwd\nr ../secret.txt\nr /secret.txt\n\
                  l /data\nw /data/new.txt\nw /data/../planted.txt\n";
    let ro = escape_lines(&node.post("/fn/ro", probes).await);
    assert!(
        line_for(&ro, "r /data/inside.txt").contains(": ok 18 inside the preopen"),
        "{ro:?}"
    );
    assert!(line_for(&ro, "l /data").contains(": ok "), "{ro:?}");
    for escaping in [
        "r /data/../secret.txt",
        "r /data/../../etc/passwd",
        "r /data/link-abs",
        "r /data/link-rel",
        "r /data/sub/up/secret.txt",
        "r /etc/passwd",
        "r ../secret.txt",
        "r /secret.txt",
        "w /data/new.txt",
        "w /data/../planted.txt",
    ] {
        assert!(
            line_for(&ro, escaping).contains(": error "),
            "{escaping} must be refused: {ro:?}"
        );
    }
    assert!(
        !root.path().join("data/new.txt").exists(),
        "the read-only preopen was not written"
    );
    assert!(!root.path().join("planted.txt").exists());

    let rw = escape_lines(
        &node
            .post("/fn/rw", "w /data/new.txt\nw /data/../planted.txt\n")
            .await,
    );
    assert!(line_for(&rw, "w /data/new.txt").contains(": ok 5"), "{rw:?}");
    assert_eq!(
        std::fs::read_to_string(root.path().join("data/new.txt")).expect("written"),
        "pwned"
    );
    assert!(
        line_for(&rw, "w /data/../planted.txt").contains(": error "),
        "{rw:?}"
    );
    assert!(
        !root.path().join("planted.txt").exists(),
        "no write outside the preopen"
    );
}

/// A local upstream server answering `upstream ok`; returns its address.
async fn upstream() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_request| async {
                    Ok::<_, Infallible>(http::Response::new(http_body_util::Full::new(Bytes::from(
                        "upstream ok",
                    ))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_http_is_refused_unless_the_host_is_allowed() {
    let upstream = upstream().await;
    let dir = tempfile::tempdir().expect("tempdir");
    add_function(dir.path(), "closed", "outbound", None);
    add_function(
        dir.path(),
        "open",
        "outbound",
        Some(&format!(
            "allowed_outbound_hosts = [\"http://127.0.0.1:{}\"]\n",
            upstream.port()
        )),
    );
    add_function(
        dir.path(),
        "otherport",
        "outbound",
        Some(&format!(
            "allowed_outbound_hosts = [\"http://127.0.0.1:{}\"]\n",
            upstream.port() + 1
        )),
    );
    let node = Node::start(dir.path(), &[]);
    let target = format!("http://127.0.0.1:{}/x", upstream.port());
    let call = |function: &'static str| {
        let target = target.clone();
        let addr = node.addr;
        async move {
            send(
                addr,
                Proto::Http1,
                "GET",
                &format!("/fn/{function}"),
                &[("x-target-url", &target)],
                Bytes::new(),
            )
            .await
        }
    };
    let allowed = call("open").await;
    assert_eq!(allowed.status, 200, "{}", allowed.text());
    assert_eq!(allowed.text(), "upstream ok");
    for denied in ["closed", "otherport"] {
        let reply = call(denied).await;
        assert_eq!(reply.status, 502, "{denied}");
        assert!(
            reply.text().contains("HTTP-request-denied"),
            "{denied}: {}",
            reply.text()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_guest_can_exhaust_the_node() {
    let dir = function_dir(&["membomb", "tablebomb", "stackbomb", "loop", "bigout", "hello-min"]);
    let node = Node::start(dir.path(), &["--max-response-bytes", "4194304"]);
    let memory = node.get("/fn/membomb").await;
    assert_eq!(
        (memory.status, memory.json()["code"].clone()),
        (502, "memory_limit".into())
    );
    let table = node.get("/fn/tablebomb").await;
    assert_eq!((table.status, table.json()["code"].clone()), (502, "trap".into()));
    let stack = node.get("/fn/stackbomb").await;
    assert_eq!(stack.status, 502);
    assert!(stack.text().contains("call stack exhausted"), "{}", stack.text());
    let time = node.get("/fn/loop").await;
    assert_eq!(
        (time.status, time.json()["code"].clone()),
        (504, "timeout".into())
    );
    let output = node.get("/fn/bigout?mb=8").await;
    assert_eq!(
        (output.status, output.json()["code"].clone()),
        (502, "response_too_large".into())
    );
    assert_eq!(
        node.get("/fn/hello-min").await.text(),
        "hello\n",
        "the node carries on"
    );
    assert_eq!(node.get("/healthz").await.status, 200);
}
