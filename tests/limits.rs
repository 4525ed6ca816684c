//! Server limits, each tripped against the real binary: header read
//! timeout, header size, HTTP/2 streams, idle connections, connection
//! count (body size: see `node.rs`, `oversized_bodies_get_413`).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use bytes::Bytes;
use common::node::*;

/// Reads until the peer closes; returns what came (bounded wait).
fn read_until_closed(stream: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
    stream.set_read_timeout(Some(within)).expect("timeout");
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Some(data),
            Ok(n) => data.extend_from_slice(&buf[..n]),
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => return Some(data),
            Err(_) => return None,
        }
    }
}

#[test]
fn slow_partial_headers_are_cut_off_by_the_header_read_timeout() {
    let dir = function_dir(&["hello-min"]);
    let node = Node::start(dir.path(), &["--header-read-timeout-ms", "300"]);
    let mut stream = TcpStream::connect(node.addr).expect("connect");
    stream
        .write_all(b"GET /fn/hello-min HTTP/1.1\r\nhost: x\r\nx-slow: ")
        .expect("write");
    let answer =
        read_until_closed(&mut stream, Duration::from_secs(10)).expect("the node closed the connection");
    let text = String::from_utf8_lossy(&answer);
    assert!(!text.contains("200 OK"), "{text}");
    assert!(text.is_empty() || text.starts_with("HTTP/1.1 408"), "{text}");
}

#[test]
fn an_oversized_request_head_is_refused() {
    let dir = function_dir(&["hello-min"]);
    let node = Node::start(dir.path(), &["--max-header-bytes", "8192"]);
    let mut stream = TcpStream::connect(node.addr).expect("connect");
    let big = "a".repeat(20_000);
    // NB: the node may close the connection before the head is all sent.
    let _ = write!(
        stream,
        "GET /fn/hello-min HTTP/1.1\r\nhost: x\r\nx-big: {big}\r\n\r\n"
    );
    let answer = read_until_closed(&mut stream, Duration::from_secs(10)).expect("closed");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.is_empty() || text.starts_with("HTTP/1.1 431"), "{text}");
    let mut ok = TcpStream::connect(node.addr).expect("connect");
    write!(
        ok,
        "GET /fn/hello-min HTTP/1.1\r\nhost: x\r\nconnection: close\r\nx-small: {}\r\n\r\n",
        "a".repeat(1000)
    )
    .expect("write");
    let answer = read_until_closed(&mut ok, Duration::from_secs(10)).expect("answered");
    assert!(
        String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"),
        "a normal head passes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_beyond_the_limit_wait_their_turn() {
    let dir = function_dir(&["sleep"]);
    let node = Node::start(dir.path(), &["--h2-max-streams", "2"]);
    let stream = tokio::net::TcpStream::connect(node.addr).await.expect("connect");
    let (sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("h2");
    tokio::spawn(connection);
    // One call first: then the client has the node's SETTINGS and queues
    // streams past the limit. (A client that ignores the limit has the
    // excess streams refused with REFUSED_STREAM.)
    let warm = http::Request::post(format!("http://{}/fn/sleep?ms=1", node.addr))
        .body(http_body_util::Full::new(Bytes::from("x")))
        .expect("request");
    assert_eq!(
        sender
            .clone()
            .send_request(warm)
            .await
            .expect("warm call")
            .status(),
        200
    );
    let calls: Vec<_> = (0..4)
        .map(|_| {
            let mut sender = sender.clone();
            let addr = node.addr;
            tokio::spawn(async move {
                let request = http::Request::post(format!("http://{addr}/fn/sleep?ms=500"))
                    .body(http_body_util::Full::new(Bytes::from("x")))
                    .expect("request");
                sender.send_request(request).await.map(|r| r.status().as_u16())
            })
        })
        .collect();
    let mut most = 0;
    for _ in 0..60 {
        let active = node.status().await["active_request_count"].as_u64().unwrap_or(0);
        most = most.max(active);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    for call in calls {
        assert_eq!(call.await.expect("join").expect("call"), 200);
    }
    assert_eq!(most, 2, "never more than 2 streams at once on the connection");
}

#[test]
fn an_idle_connection_is_closed() {
    let dir = function_dir(&["hello-min"]);
    let node = Node::start(dir.path(), &["--idle-timeout-ms", "300"]);
    let mut stream = TcpStream::connect(node.addr).expect("connect");
    stream
        .write_all(b"GET /fn/hello-min HTTP/1.1\r\nhost: x\r\n\r\n")
        .expect("write");
    let mut first = [0u8; 15];
    stream.read_exact(&mut first).expect("answer");
    assert_eq!(&first, b"HTTP/1.1 200 OK");
    let rest = read_until_closed(&mut stream, Duration::from_secs(10));
    assert!(rest.is_some(), "the idle keep-alive connection was closed");
}

#[test]
fn connections_beyond_the_limit_are_closed_at_once() {
    let dir = function_dir(&["hello-min"]);
    let node = Node::start(dir.path(), &["--max-connections", "2"]);
    let mut held: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(node.addr).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut extra = TcpStream::connect(node.addr).expect("the kernel accepts");
    let _ = extra.write_all(b"GET /fn/hello-min HTTP/1.1\r\nhost: x\r\n\r\n");
    let answer = read_until_closed(&mut extra, Duration::from_secs(10)).expect("closed by the node");
    assert!(
        answer.is_empty(),
        "no answer past the limit: {}",
        String::from_utf8_lossy(&answer)
    );
    for stream in &mut held {
        stream
            .write_all(b"GET /fn/hello-min HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .expect("write");
        let answer = read_until_closed(stream, Duration::from_secs(10)).expect("answered");
        assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
    }
}
