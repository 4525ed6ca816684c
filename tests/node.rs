//! `fnrunner serve` through the real binary on a loopback port: routes,
//! HTTP/1.1 and HTTP/2, TryExec and NACKs, deploys, status, drain, faults.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::node::*;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_answers() {
    let dir = function_dir(&["hello", "hello-min"]);
    let node = Node::start(dir.path(), &[]);
    assert_eq!(node.get("/healthz").await.status, 200);
    assert_eq!(node.get("/readyz").await.status, 200);
    let status = node.status().await;
    assert_eq!(status["failed"], false);
    let call = node.get("/fn/hello/a?b=c").await;
    assert_eq!(call.status, 200);
    assert_eq!(call.text(), "hello from fnrunner\npath=/a\nquery=b=c\nx-test=\n");
    let bare = node.get("/fn/hello").await;
    assert!(
        bare.text().contains("path=/\n"),
        "no trailing path means `/`: {}",
        bare.text()
    );
    let list = node.get("/v1/functions").await.json();
    let names: Vec<&str> = list
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|f| f["name"].as_str())
        .collect();
    assert_eq!(names, ["hello", "hello-min"]);
    let one = node.get("/v1/functions/hello").await.json();
    assert_eq!(one["kind"], "http");
    assert_eq!(
        one["slot_hash"].as_str(),
        Some(call.header("fn-slot-hash").as_str())
    );
    assert_eq!(node.get("/metrics").await.status, 200);
    let missing = node.get("/fn/nope/x").await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["code"], "unknown_function");
    assert!(!missing.header("fn-call-id").is_empty());
    assert_eq!(node.get("/nowhere").await.status, 404);
    let wrong_method = send(node.addr, Proto::Http1, "POST", "/v1/status", &[], Bytes::new()).await;
    assert_eq!(wrong_method.status, 405);
    let deleted = send(
        node.addr,
        Proto::Http1,
        "DELETE",
        "/v1/functions/hello-min",
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(deleted.status, 200);
    assert_eq!(node.get("/fn/hello-min").await.status, 404);
    assert!(
        !dir.path().join("hello-min.wasm").exists(),
        "delete removes the files"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_work_over_http1_and_http2() {
    let dir = function_dir(&["hello", "echo"]);
    let node = Node::start(dir.path(), &[]);
    for proto in [Proto::Http1, Proto::Http2] {
        let reply = send(
            node.addr,
            proto,
            "POST",
            "/fn/hello/",
            &[("content-type", "text/x")],
            Bytes::from("hi there"),
        )
        .await;
        assert_eq!(reply.status, 200, "{proto:?}");
        assert_eq!(reply.text(), "hi there");
        let expected = if proto == Proto::Http2 {
            http::Version::HTTP_2
        } else {
            http::Version::HTTP_11
        };
        assert_eq!(reply.version, expected);
        let cgi = send(node.addr, proto, "POST", "/fn/echo", &[], Bytes::from("cgi body")).await;
        assert_eq!(cgi.text(), "cgi body", "{proto:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_carry_call_id_slot_hash_and_server_timing() {
    let dir = function_dir(&["headers"]);
    let node = Node::start(dir.path(), &[]);
    let kept = send(
        node.addr,
        Proto::Http1,
        "GET",
        "/fn/headers/",
        &[("fn-call-id", "lb-chosen-42")],
        Bytes::new(),
    )
    .await;
    assert_eq!(kept.header("fn-call-id"), "lb-chosen-42");
    assert!(
        kept.text().contains("FN_CALL_ID=lb-chosen-42"),
        "the guest sees the same id"
    );
    let made = node.get("/fn/headers/").await;
    let id = made.header("fn-call-id");
    assert_eq!(id.len(), 26, "a ULID: {id}");
    assert!(made.text().contains(&format!("FN_CALL_ID={id}")));
    let info = node.get("/v1/functions/headers").await.json();
    assert_eq!(
        made.header("fn-slot-hash"),
        info["slot_hash"].as_str().expect("hash")
    );
    let timing = made.header("server-timing");
    assert!(
        timing.starts_with("sched;dur=") && timing.contains(", exec;dur="),
        "{timing}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_headers_tighten_the_timeout_and_bad_ones_are_refused() {
    let dir = function_dir(&["loop"]);
    add_function(dir.path(), "slowloop", "loop", Some("timeout_ms = 20000\n"));
    let node = Node::start(dir.path(), &[]);
    let started = Instant::now();
    let reply = send(
        node.addr,
        Proto::Http1,
        "GET",
        "/fn/slowloop",
        &[("fn-timeout-ms", "200")],
        Bytes::new(),
    )
    .await;
    assert_eq!(reply.status, 504);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the 200 ms call timeout applied"
    );
    let bad = send(
        node.addr,
        Proto::Http1,
        "GET",
        "/fn/loop",
        &[("fn-timeout-ms", "soon")],
        Bytes::new(),
    )
    .await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.json()["code"], "bad_call_header");
    let bad = send(
        node.addr,
        Proto::Http1,
        "GET",
        "/fn/loop",
        &[("fn-call-type", "later")],
        Bytes::new(),
    )
    .await;
    assert_eq!(bad.status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_concurrency_nacks_the_excess_before_reading_their_bodies() {
    let dir = tempfile::tempdir().expect("tempdir");
    add_function(dir.path(), "slow", "sleep", Some("max_concurrency = 2\n"));
    let node = Node::start(dir.path(), &[]);
    // Five calls send their headers but hold back their 5-byte bodies.
    let mut streams: Vec<std::net::TcpStream> = (0..5)
        .map(|_| raw_request_headers(node.addr, "POST", "/fn/slow?ms=300", 5))
        .collect();
    // The three that find no room are answered without their body.
    let mut nacked = Vec::new();
    let mut waiting = Vec::new();
    for mut stream in streams.drain(..) {
        stream
            .set_read_timeout(Some(Duration::from_millis(1500)))
            .expect("timeout");
        let mut peek = [0u8; 1];
        match stream.peek(&mut peek) {
            Ok(n) if n > 0 => {
                let (status, head, body) = raw_read_response(&mut stream);
                nacked.push((status, head, body));
            }
            _ => waiting.push(stream),
        }
    }
    assert_eq!(nacked.len(), 3, "exactly three NACKs: {nacked:?}");
    for (status, head, body) in &nacked {
        assert_eq!(*status, 503);
        assert!(head.contains("fn-runner-nack: busy"), "{head}");
        assert!(head.contains("retry-after: 1"), "{head}");
        assert!(
            !String::from_utf8_lossy(body).contains("body"),
            "the guest never saw it"
        );
    }
    // The two admitted ones get their bodies now and run.
    for (i, stream) in waiting.iter_mut().enumerate() {
        write!(stream, "body{i}").expect("send body");
    }
    for (i, stream) in waiting.iter_mut().enumerate() {
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let (status, _, body) = raw_read_response(stream);
        assert_eq!(status, 200);
        assert_eq!(body, format!("body{i}").into_bytes());
    }
    let status = node.status().await;
    assert_eq!(status["requests_received"], 5);
    assert_eq!(status["requests_handled"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_budget_exhaustion_nacks() {
    let dir = tempfile::tempdir().expect("tempdir");
    add_function(dir.path(), "slow", "sleep", Some("memory_mb = 32\n"));
    let node = Node::start(dir.path(), &["--memory-budget-mb", "64"]);
    let calls: Vec<_> = (0..2)
        .map(|_| {
            tokio::spawn(send(
                node.addr,
                Proto::Http1,
                "GET",
                "/fn/slow?ms=800",
                &[],
                Bytes::new(),
            ))
        })
        .collect();
    let busy = eventually(Duration::from_secs(10), async || {
        node.status().await["active_request_count"] == 2
    })
    .await;
    assert!(busy, "both calls running");
    let third = node.get("/fn/slow?ms=1").await;
    assert_eq!(third.status, 503, "{}", third.text());
    assert_eq!(third.header("fn-runner-nack"), "busy");
    for call in calls {
        assert_eq!(call.await.expect("join").status, 200);
    }
    assert_eq!(node.get("/fn/slow?ms=1").await.status, 200, "capacity is back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_running_call_finish_nacks_new_ones_and_exits_zero() {
    let dir = function_dir(&["sleep", "hello-min"]);
    let mut node = Node::start(dir.path(), &["--drain-timeout", "20s"]);
    assert_eq!(node.get("/fn/hello-min").await.status, 200);
    let running = tokio::spawn(send(
        node.addr,
        Proto::Http1,
        "POST",
        "/fn/sleep?ms=1000",
        &[],
        Bytes::from("done"),
    ));
    assert!(
        eventually(
            Duration::from_secs(10),
            async || node.status().await["active_request_count"] == 1
        )
        .await,
        "the slow call is running"
    );
    node.signal(libc::SIGTERM);
    assert!(
        eventually(Duration::from_secs(5), async || node.get("/readyz").await.status
            == 503)
        .await,
        "/readyz turns 503"
    );
    let refused = node.get("/fn/hello-min").await;
    assert_eq!(refused.status, 503);
    assert_eq!(refused.header("fn-runner-nack"), "draining");
    let finished = running.await.expect("join");
    assert_eq!(finished.status, 200);
    assert_eq!(finished.text(), "done");
    assert_eq!(node.wait_exit(Duration::from_secs(15)), Some(0), "{}", node.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redeploy_makes_a_new_slot_while_a_call_on_the_old_one_completes() {
    let dir = tempfile::tempdir().expect("tempdir");
    add_function(dir.path(), "f", "sleep", None);
    let node = Node::start(dir.path(), &[]);
    let old_hash = node.get("/v1/functions/f").await.json()["slot_hash"]
        .as_str()
        .map(str::to_owned);
    let running = tokio::spawn(send(
        node.addr,
        Proto::Http1,
        "POST",
        "/fn/f?ms=1000",
        &[],
        Bytes::from("old code"),
    ));
    assert!(
        eventually(
            Duration::from_secs(10),
            async || node.status().await["active_request_count"] == 1
        )
        .await,
        "the call on the old slot is running"
    );
    let deployed = node.deploy("f", "echo", "memory_mb = 64\n").await;
    assert_eq!(deployed.status, 200, "{}", deployed.text());
    let new_hash = deployed.json()["slot_hash"].as_str().map(str::to_owned);
    assert_ne!(new_hash, old_hash);
    let next = node.post("/fn/f", "new code").await;
    assert_eq!(next.status, 200);
    assert_eq!(next.header("x-echo-length"), "8", "the echo module answered");
    assert_eq!(Some(next.header("fn-slot-hash")), new_hash);
    let old = running.await.expect("join");
    assert_eq!(old.status, 200);
    assert_eq!(old.text(), "old code");
    assert_eq!(Some(old.header("fn-slot-hash")), old_hash);
    assert_eq!(
        std::fs::read(dir.path().join("f.wasm")).expect("persisted"),
        std::fs::read(fixture("echo")).expect("echo"),
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("f.toml")).expect("persisted"),
        "memory_mb = 64\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploys_are_validated_persisted_and_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let module = std::fs::read(fixture("hello-min")).expect("fixture");
    {
        let node = Node::start(dir.path(), &[]);
        let raw = send(
            node.addr,
            Proto::Http1,
            "PUT",
            "/v1/functions/raw",
            &[("content-type", "application/wasm")],
            Bytes::from(module.clone()),
        )
        .await;
        assert_eq!(raw.status, 201, "{}", raw.text());
        assert_eq!(raw.json()["kind"], "cgi");
        assert_eq!(node.get("/fn/raw").await.text(), "hello\n");
    }
    let node = Node::start(dir.path(), &[]);
    assert_eq!(
        node.get("/fn/raw").await.text(),
        "hello\n",
        "the deploy survived the restart"
    );
    let before = std::fs::read(dir.path().join("raw.wasm")).expect("module");

    let rejected = [
        (
            multipart(&[("module", b"not wasm at all")]),
            "not a WebAssembly file",
        ),
        (
            multipart(&[("module", &module), ("settings", b"memroy_mb = 1\n")]),
            "unknown field",
        ),
        (
            multipart(&[("module", &module), ("settings", b"max_jobs = 5\n")]),
            "max_jobs",
        ),
        (multipart(&[("settings", b"")]), "no `module` part"),
        (
            multipart(&[(
                "module",
                &std::fs::read(bad_fixture("unknown-import")).expect("bad"),
            )]),
            "example:kv/store@1.0.0",
        ),
    ];
    for ((body, content_type), needle) in rejected {
        let reply = send(
            node.addr,
            Proto::Http1,
            "PUT",
            "/v1/functions/raw",
            &[("content-type", &content_type)],
            body,
        )
        .await;
        assert_eq!(reply.status, 400, "{}", reply.text());
        assert!(
            reply.json()["message"].as_str().unwrap_or("").contains(needle),
            "{needle}: {}",
            reply.text()
        );
        assert_eq!(
            std::fs::read(dir.path().join("raw.wasm")).expect("module"),
            before,
            "unchanged on disk"
        );
        assert_eq!(node.get("/fn/raw").await.text(), "hello\n", "unchanged in memory");
    }
    let bad_name = send(
        node.addr,
        Proto::Http1,
        "PUT",
        "/v1/functions/.hidden",
        &[],
        Bytes::from(module),
    )
    .await;
    assert_eq!(bad_name.status, 400);
    let leftovers: Vec<String> = std::fs::read_dir(dir.path())
        .expect("dir")
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "no staging files left: {leftovers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_deploy_leaves_the_previous_module_intact() {
    let dir = tempfile::tempdir().expect("tempdir");
    add_function(dir.path(), "f", "hello-min", None);
    let before = std::fs::read(dir.path().join("f.wasm")).expect("module");
    let mut node = Node::start(dir.path(), &[]);
    // A big module (CPython) takes seconds to compile; kill the node mid-deploy.
    let big = std::fs::read(fixture("py-hello")).expect("py-hello");
    let addr = node.addr;
    let deploy = tokio::spawn(async move {
        let stream = tokio::net::TcpStream::connect(addr).await;
        let Ok(stream) = stream else { return };
        let io = hyper_util::rt::TokioIo::new(stream);
        let Ok((mut sender, connection)) = hyper::client::conn::http1::handshake(io).await else {
            return;
        };
        tokio::spawn(connection);
        let request = http::Request::put(format!("http://{addr}/v1/functions/f"))
            .header("host", addr.to_string())
            .body(http_body_util::Full::new(Bytes::from(big)))
            .expect("request");
        let _ = sender.send_request(request).await;
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        node.child.try_wait().expect("poll").is_none(),
        "the node was still busy with the deploy when killed"
    );
    node.signal(libc::SIGKILL);
    let _ = deploy.await;
    let _ = node.child.wait();
    assert_eq!(
        std::fs::read(dir.path().join("f.wasm")).expect("module"),
        before,
        "the old module is intact"
    );
    let node = Node::start(dir.path(), &[]);
    assert_eq!(
        node.get("/fn/f").await.text(),
        "hello\n",
        "the node restarts with the old function"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_is_cached_for_its_ttl_and_reports_a_broken_health_path() {
    let dir = function_dir(&["hello-min"]);
    let node = Node::start(dir.path(), &[]);
    let first = node.status().await;
    assert_eq!(first["cached"], false);
    assert_eq!(first["failed"], false);
    assert!(first["execution_duration"].as_u64().is_some());
    assert!(!first["created_at"].as_str().unwrap_or("").is_empty());
    let _ = node.get("/fn/hello-min").await;
    let second = node.status().await;
    assert_eq!(second["cached"], true);
    assert_eq!(second["id"], first["id"]);
    assert_eq!(second["requests_received"], 1, "live counters are fresh");
    for field in [
        "active_request_count",
        "requests_received",
        "requests_handled",
        "kdumps_on_disk",
        "failed",
        "cached",
        "id",
        "details",
        "error_code",
        "error_str",
        "created_at",
        "started_at",
        "completed_at",
        "scheduler_duration",
        "execution_duration",
    ] {
        assert!(first.get(field).is_some(), "missing {field}");
    }

    let broken_dir = function_dir(&["hello-min"]);
    add_function(broken_dir.path(), "broken", "trap", None);
    let broken = Node::start(broken_dir.path(), &["--status-function", "broken"]);
    let status = broken.status().await;
    assert_eq!(status["failed"], true, "{status}");
    assert_eq!(status["error_code"], 502);
    assert!(
        status["error_str"].as_str().unwrap_or("").contains("trapped"),
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_faults_get_their_status_and_the_node_carries_on() {
    let dir = function_dir(&["loop", "trap", "membomb", "hello-min", "bigout"]);
    let node = Node::start(dir.path(), &["--max-response-bytes", "1048576"]);
    let looping = node.get("/fn/loop").await;
    assert_eq!(looping.status, 504);
    assert_eq!(looping.json()["code"], "timeout");
    let trap = node.get("/fn/trap").await;
    assert_eq!(trap.status, 502);
    assert_eq!(trap.json()["code"], "trap");
    assert!(
        trap.json()["message"]
            .as_str()
            .unwrap_or("")
            .contains("function `trap` trapped")
    );
    let bomb = node.get("/fn/membomb").await;
    assert_eq!(bomb.status, 502);
    assert_eq!(bomb.json()["code"], "memory_limit");
    let big = node.get("/fn/bigout?mb=2").await;
    assert_eq!(big.status, 502);
    assert_eq!(big.json()["code"], "response_too_large");
    assert_eq!(node.get("/fn/hello-min").await.text(), "hello\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_get_413() {
    let dir = function_dir(&["echo", "hello"]);
    let node = Node::start(dir.path(), &["--max-body-bytes", "1000"]);
    for function in ["echo", "hello"] {
        let reply = node.post(&format!("/fn/{function}"), vec![b'x'; 5000]).await;
        assert_eq!(reply.status, 413, "{function}: {}", reply.text());
        assert_eq!(reply.json()["code"], "request_too_large");
        assert_eq!(node.post(&format!("/fn/{function}"), "small").await.status, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detached_call_is_accepted_at_once_and_runs_in_the_background() {
    let dir = tempfile::tempdir().expect("tempdir");
    add_function(dir.path(), "counter", "counter", Some("max_jobs = 100\n"));
    let node = Node::start(dir.path(), &[]);
    let started = Instant::now();
    let accepted = send(
        node.addr,
        Proto::Http1,
        "GET",
        "/fn/counter?sleep_ms=300",
        &[("fn-call-type", "detached")],
        Bytes::new(),
    )
    .await;
    assert_eq!(accepted.status, 202);
    assert!(accepted.body.is_empty());
    assert!(!accepted.header("fn-call-id").is_empty());
    assert!(started.elapsed() < Duration::from_millis(300) + Duration::from_secs(5));
    let ran = eventually(Duration::from_secs(10), async || {
        node.status().await["details"]["counter"]["pool"]["processed"] == 1
    })
    .await;
    assert!(ran, "the detached call ran: {}", node.status().await);
    assert_eq!(
        node.get("/fn/counter").await.text(),
        "2\n",
        "it ran on the instance this call reuses"
    );
}
