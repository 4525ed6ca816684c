//! Soak: 64 concurrent clients of mixed traffic against one node on
//! loopback — good calls to two functions, traps, timeouts, memory bombs,
//! oversized bodies, slow partial headers, clients that leave mid-body —
//! while `/healthz` is polled. Every good call must answer 200, every bad
//! one its documented status, the log must hold no panic, and resident
//! memory at the end must be within 10% of what it was after warm-up.
//!
//! `FNRUNNER_SOAK_SECS` sets the length (default 20 s, the CI run);
//! `benches/soak.sh` runs it for minutes on a release build.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::node::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CLIENTS: usize = 64;
const MAX_BODY: usize = 65_536;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Component,
    Cgi,
    Trap,
    Timeout,
    MemoryBomb,
    Oversized,
    SlowHeaders,
    LeavesMidBody,
}

const KINDS: [Kind; 8] = [
    Kind::Component,
    Kind::Cgi,
    Kind::Trap,
    Kind::Timeout,
    Kind::MemoryBomb,
    Kind::Oversized,
    Kind::SlowHeaders,
    Kind::LeavesMidBody,
];

#[derive(Default)]
struct Tally {
    calls: BTreeMap<(Kind, u16), u64>,
    wrong: Vec<String>,
}

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// One client's call of `kind`; returns the status it got (0: no HTTP
/// answer, as expected for the raw-socket kinds) or what went wrong.
async fn one_call(addr: std::net::SocketAddr, kind: Kind, n: u64) -> Result<u16, String> {
    match kind {
        Kind::Component => {
            let reply = send(
                addr,
                Proto::Http1,
                "GET",
                &format!("/fn/hello/soak/{n}"),
                &[],
                Bytes::new(),
            )
            .await;
            if reply.status == 200 && reply.text().contains(&format!("path=/soak/{n}")) {
                Ok(200)
            } else {
                Err(format!("component: {} {}", reply.status, reply.text()))
            }
        }
        Kind::Cgi => {
            let body = format!("body-{n}-").repeat(1 + (n % 50) as usize);
            let reply = send(
                addr,
                Proto::Http1,
                "POST",
                "/fn/echo",
                &[],
                Bytes::from(body.clone()),
            )
            .await;
            if reply.status == 200 && reply.text() == body {
                Ok(200)
            } else {
                Err(format!("cgi echo: {} ({} bytes)", reply.status, reply.body.len()))
            }
        }
        Kind::Trap | Kind::Timeout | Kind::MemoryBomb | Kind::Oversized => {
            let (path, body, want, code) = match kind {
                Kind::Trap => ("/fn/trap", Bytes::new(), 502, "trap"),
                Kind::Timeout => ("/fn/loop", Bytes::new(), 504, "timeout"),
                Kind::MemoryBomb => ("/fn/membomb", Bytes::new(), 502, "memory_limit"),
                _ => (
                    "/fn/echo",
                    Bytes::from(vec![b'x'; MAX_BODY * 2]),
                    413,
                    "request_too_large",
                ),
            };
            let reply = send(addr, Proto::Http1, "POST", path, &[], body).await;
            let got_code = serde_json::from_slice::<serde_json::Value>(&reply.body)
                .ok()
                .and_then(|v| v["code"].as_str().map(str::to_owned))
                .unwrap_or_default();
            if reply.status == want && got_code == code {
                Ok(reply.status)
            } else {
                Err(format!("{kind:?}: {} {}", reply.status, reply.text()))
            }
        }
        Kind::SlowHeaders => {
            let mut stream = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| e.to_string())?;
            stream
                .write_all(b"GET /fn/hello HTTP/1.1\r\nhost: soak\r\nx-slow: ")
                .await
                .map_err(|e| e.to_string())?;
            let mut answer = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
            match read {
                Ok(_) if !String::from_utf8_lossy(&answer).contains("200 OK") => Ok(0),
                Ok(_) => Err("slow headers got an answer".into()),
                Err(_) => Err("slow headers were never cut off".into()),
            }
        }
        Kind::LeavesMidBody => {
            let mut stream = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| e.to_string())?;
            let _ = stream
                .write_all(b"POST /fn/echo HTTP/1.1\r\nhost: soak\r\ncontent-length: 10000\r\n\r\npartial")
                .await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(stream);
            Ok(0)
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mixed_traffic_soak() {
    let seconds: u64 = std::env::var("FNRUNNER_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let dir = function_dir(&["hello", "echo"]);
    // NB: the faulting functions are never quarantined here, so that every
    // one of their calls really traps, times out or hits its memory limit.
    add_function(dir.path(), "trap", "trap", Some("escalate_after = 0\n"));
    add_function(
        dir.path(),
        "membomb",
        "membomb",
        Some("memory_mb = 16\nescalate_after = 0\n"),
    );
    add_function(
        dir.path(),
        "loop",
        "loop",
        Some("timeout_ms = 200\nescalate_after = 0\n"),
    );
    let node = Node::start(
        dir.path(),
        &["--max-body-bytes", "65536", "--header-read-timeout-ms", "500"],
    );
    let addr = node.addr;
    let pid = node.pid();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let tally = Arc::new(Mutex::new(Tally::default()));
    let counter = Arc::new(AtomicU64::new(0));

    let health_failures = Arc::new(AtomicU64::new(0));
    let health = {
        let failures = health_failures.clone();
        tokio::spawn(async move {
            let mut checks = 0u64;
            while Instant::now() < deadline {
                let reply = tokio::time::timeout(
                    Duration::from_secs(5),
                    send(addr, Proto::Http1, "GET", "/healthz", &[], Bytes::new()),
                )
                .await;
                if !matches!(reply, Ok(ref r) if r.status == 200) {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
                checks += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            checks
        })
    };

    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (tally, counter) = (tally.clone(), counter.clone());
            tokio::spawn(async move {
                let kind = KINDS[i % KINDS.len()];
                while Instant::now() < deadline {
                    let n = counter.fetch_add(1, Ordering::Relaxed);
                    let outcome = one_call(addr, kind, n).await;
                    let mut tally = tally.lock().expect("tally");
                    match outcome {
                        Ok(status) => *tally.calls.entry((kind, status)).or_default() += 1,
                        Err(wrong) => {
                            if tally.wrong.len() < 20 {
                                tally.wrong.push(wrong);
                            }
                            *tally.calls.entry((kind, 1)).or_default() += 1;
                        }
                    }
                }
            })
        })
        .collect();

    // Resident memory once the pools and the allocator have warmed up.
    tokio::time::sleep(Duration::from_secs(seconds / 4).max(Duration::from_secs(3))).await;
    let warm_rss = rss_kib(pid);
    for client in clients {
        client.await.expect("client");
    }
    let checks = health.await.expect("health checker");
    let end_rss = rss_kib(pid);

    let tally = std::mem::take(&mut *tally.lock().expect("tally"));
    let total: u64 = tally.calls.values().sum();
    println!(
        "soak: {seconds} s, {total} calls, {checks} health checks, RSS {warm_rss} KiB after warm-up, {end_rss} KiB at the end"
    );
    for ((kind, status), count) in &tally.calls {
        println!("  {kind:?} → {status}: {count}");
    }
    assert!(
        tally.wrong.is_empty(),
        "calls that got the wrong answer: {:#?}",
        tally.wrong
    );
    for kind in KINDS {
        assert!(
            tally.calls.keys().any(|(k, _)| *k == kind),
            "no {kind:?} call completed"
        );
    }
    assert_eq!(
        health_failures.load(Ordering::Relaxed),
        0,
        "/healthz failed during the soak"
    );
    assert!(
        !node.log().contains("panicked"),
        "a panic in the log:\n{}",
        node.log()
    );
    assert!(warm_rss > 0 && end_rss > 0, "RSS readable");
    assert!(
        end_rss as f64 <= warm_rss as f64 * 1.10,
        "resident memory grew from {warm_rss} KiB to {end_rss} KiB"
    );
    assert_eq!(
        node.get("/fn/hello/after").await.status,
        200,
        "the node still serves"
    );
}
