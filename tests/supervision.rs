//! Pool supervision against the real binary: quarantine of crash-looping
//! functions, restart_one / restart_all, live reset and reconfiguration,
//! guest-asked retirement.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::node::*;

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            line.strip_prefix(series)
                .and_then(|rest| rest.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

fn sched_ms(reply: &Reply) -> f64 {
    reply
        .header("server-timing")
        .split(", ")
        .find_map(|part| part.strip_prefix("sched;dur="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::MAX)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_looping_function_is_quarantined_probed_and_freed_by_a_fix() {
    let dir = function_dir(&["hello-min"]);
    add_function(
        dir.path(),
        "crash",
        "trap",
        Some("escalate_after = 3\nquarantine_backoff_ms = 600\n"),
    );
    let node = Node::start(dir.path(), &[]);
    for _ in 0..3 {
        assert_eq!(node.get("/fn/crash").await.status, 502);
    }
    let created = || async {
        metric(
            &node.get("/metrics").await.text(),
            "fnrunner_instances_created_total{function=\"crash\",when=\"on_call\"}",
        )
    };
    let before = created().await;
    assert_eq!(before, 3.0);
    for _ in 0..5 {
        let refused = node.get("/fn/crash").await;
        assert_eq!(refused.status, 503);
        assert_eq!(refused.header("fn-runner-nack"), "quarantined");
        assert_eq!(refused.json()["code"], "quarantined");
        assert!(!refused.header("retry-after").is_empty());
        assert!(
            sched_ms(&refused) < 1.0,
            "refused in under a millisecond: {}",
            refused.header("server-timing")
        );
    }
    assert_eq!(created().await, before, "no instance made while quarantined");
    let details = node.status().await["details"]["crash"]["pool"].clone();
    assert_eq!(details["quarantined"], true, "{details}");
    assert_eq!(details["escalations"], 1);
    // After the back-off one probe runs (and traps again).
    tokio::time::sleep(Duration::from_millis(700)).await;
    let probe = node.get("/fn/crash").await;
    assert_eq!(probe.status, 502, "the probe ran the guest");
    assert_eq!(created().await, before + 1.0);
    assert_eq!(
        node.get("/fn/crash").await.status,
        503,
        "quarantined again after a failed probe"
    );
    let metrics = node.get("/metrics").await.text();
    assert_eq!(
        metric(
            &metrics,
            "fnrunner_pool_events_total{function=\"crash\",event=\"quarantine\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &metrics,
            "fnrunner_pool_events_total{function=\"crash\",event=\"probe\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(&metrics, "fnrunner_calls_nacked_total{reason=\"quarantined\"}"),
        6.0
    );
    assert!(
        node.log().contains("quarantined after consecutive faults"),
        "{}",
        node.log()
    );
    // A redeploy with fixed code lifts it at once: a new slot.
    let fixed = std::fs::read(common::fixture("hello-min")).expect("fixture");
    let deployed = send(
        node.addr,
        Proto::Http1,
        "PUT",
        "/v1/functions/crash",
        &[],
        Bytes::from(fixed),
    )
    .await;
    assert_eq!(deployed.status, 200, "{}", deployed.text());
    assert_eq!(deployed.json()["slot_changed"], true);
    let after_fix = node.get("/fn/crash").await;
    assert_eq!(after_fix.status, 200);
    assert_eq!(after_fix.text(), "hello\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quarantined_function_does_not_hold_up_the_others() {
    let dir = function_dir(&["hello-min"]);
    add_function(
        dir.path(),
        "crash",
        "trap",
        Some("escalate_after = 1\nquarantine_backoff_ms = 60000\n"),
    );
    let node = Node::start(dir.path(), &[]);
    assert_eq!(node.get("/fn/crash").await.status, 502);
    let mut calls = Vec::new();
    for i in 0..100 {
        let path = if i % 2 == 0 { "/fn/crash" } else { "/fn/hello-min" };
        calls.push(tokio::spawn(send(
            node.addr,
            Proto::Http1,
            "GET",
            path,
            &[],
            Bytes::new(),
        )));
    }
    let (mut refused, mut served) = (0, 0);
    for (i, call) in calls.into_iter().enumerate() {
        let reply = call.await.expect("join");
        if i % 2 == 0 {
            assert_eq!(reply.status, 503);
            assert_eq!(reply.header("fn-runner-nack"), "quarantined");
            refused += 1;
        } else {
            assert_eq!(reply.status, 200);
            assert_eq!(reply.text(), "hello\n");
            served += 1;
        }
    }
    assert_eq!((refused, served), (50, 50));
    let metrics = node.get("/metrics").await.text();
    assert_eq!(
        metric(
            &metrics,
            "fnrunner_instances_created_total{function=\"crash\",when=\"on_call\"}"
        ),
        1.0,
        "no Wasm ran for the quarantined function"
    );
}

/// Two idle instances of a counter (each answered 1), then a trap on one.
async fn two_warm_then_trap(node: &Node) {
    let calls: Vec<_> = (0..2)
        .map(|_| {
            tokio::spawn(send(
                node.addr,
                Proto::Http1,
                "GET",
                "/fn/counter?sleep_ms=150",
                &[],
                Bytes::new(),
            ))
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.expect("join").text(), "1\n");
    }
    assert_eq!(node.get("/fn/counter?trap").await.status, 502);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_all_retires_the_idle_instances_after_a_fault_and_restart_one_does_not() {
    let one_dir = tempfile::tempdir().expect("tempdir");
    add_function(
        one_dir.path(),
        "counter",
        "counter",
        Some("max_jobs = 100\nescalation = \"restart_one\"\n"),
    );
    let one = Node::start(one_dir.path(), &[]);
    two_warm_then_trap(&one).await;
    assert_eq!(
        one.get("/fn/counter").await.text(),
        "2\n",
        "restart_one: the other instance carries on"
    );

    let all_dir = tempfile::tempdir().expect("tempdir");
    add_function(
        all_dir.path(),
        "counter",
        "counter",
        Some("max_jobs = 100\nescalation = \"restart_all\"\n"),
    );
    let all = Node::start(all_dir.path(), &[]);
    two_warm_then_trap(&all).await;
    assert_eq!(
        all.get("/fn/counter").await.text(),
        "1\n",
        "restart_all: the idle instance went too"
    );
    let metrics = all.get("/metrics").await.text();
    assert_eq!(
        metric(
            &metrics,
            "fnrunner_instances_retired_total{function=\"counter\",reason=\"escalation\"}"
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_gives_fresh_instances_without_failing_a_call_in_flight() {
    let dir = tempfile::tempdir().expect("tempdir");
    add_function(dir.path(), "counter", "counter", Some("max_jobs = 100\n"));
    let node = Node::start(dir.path(), &[]);
    assert_eq!(node.get("/fn/counter").await.text(), "1\n");
    assert_eq!(node.get("/fn/counter").await.text(), "2\n");
    let in_flight = tokio::spawn(send(
        node.addr,
        Proto::Http1,
        "GET",
        "/fn/counter?sleep_ms=800",
        &[],
        Bytes::new(),
    ));
    assert!(
        eventually(
            Duration::from_secs(10),
            async || node.status().await["active_request_count"] == 1
        )
        .await,
        "the call is running"
    );
    let reset = node.post("/v1/functions/counter/reset", Bytes::new()).await;
    assert_eq!(reset.status, 200, "{}", reset.text());
    let finished = in_flight.await.expect("join");
    assert_eq!(
        finished.status, 200,
        "the in-flight call finished on its instance"
    );
    assert_eq!(finished.text(), "3\n");
    assert_eq!(
        node.get("/fn/counter").await.text(),
        "1\n",
        "a fresh instance after the reset"
    );
    let unknown = node.post("/v1/functions/nope/reset", Bytes::new()).await;
    assert_eq!(unknown.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_settings_change_keeps_the_slot_and_a_memory_change_makes_a_new_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    add_function(dir.path(), "counter", "counter", Some("max_jobs = 100\n"));
    let node = Node::start(dir.path(), &[]);
    let hash = node.get("/v1/functions/counter").await.json()["slot_hash"].clone();
    assert_eq!(node.get("/fn/counter").await.text(), "1\n");
    let patched = node.patch("/v1/functions/counter", "max_concurrency = 5\n").await;
    assert_eq!(patched.status, 200, "{}", patched.text());
    assert_eq!(patched.json()["slot_changed"], false);
    assert_eq!(patched.json()["slot_hash"], hash);
    assert_eq!(patched.json()["settings"]["max_concurrency"], 5);
    assert_eq!(
        node.get("/fn/counter").await.text(),
        "2\n",
        "the warm instance was kept"
    );
    assert_eq!(
        node.status().await["details"]["counter"]["pool"]["available"],
        5,
        "the new limit applies"
    );

    let same_bytes = node
        .deploy("counter", "counter", "max_jobs = 100\nmin_warm = 1\n")
        .await;
    assert_eq!(
        same_bytes.json()["slot_changed"],
        false,
        "a redeploy of the same bytes reconfigures"
    );
    assert_eq!(node.get("/fn/counter").await.text(), "3\n");

    let memory = node.patch("/v1/functions/counter", "memory_mb = 64\n").await;
    assert_eq!(memory.status, 200, "{}", memory.text());
    assert_eq!(memory.json()["slot_changed"], true);
    assert_ne!(memory.json()["slot_hash"], hash);
    assert_eq!(
        node.get("/fn/counter").await.text(),
        "1\n",
        "a new slot: fresh instances"
    );
    assert!(
        std::fs::read_to_string(dir.path().join("counter.toml"))
            .expect("settings")
            .contains("memory_mb = 64"),
        "the patch was persisted"
    );
    let bad = node.patch("/v1/functions/counter", "max_jobs = \"x\"\n").await;
    assert_eq!(bad.status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_patch_keeps_every_setting_it_does_not_name() {
    // An env key with both kinds of quote and a backslash once made the
    // current settings unreadable, and a PATCH fell back to the defaults.
    let dir = tempfile::tempdir().expect("tempdir");
    add_function(
        dir.path(),
        "env",
        "env",
        Some("memory_mb = 32\n[env]\n\"B '#\\\\#\\\"\" = \"kept\"\n"),
    );
    let node = Node::start(dir.path(), &[]);
    let before = node.get("/v1/functions/env").await.json();
    assert_eq!(before["settings"]["env"]["B '#\\#\""], "kept");
    let patched = node.patch("/v1/functions/env", "max_concurrency = 5\n").await;
    assert_eq!(patched.status, 200, "{}", patched.text());
    let after = patched.json();
    assert_eq!(after["settings"]["memory_mb"], 32);
    assert_eq!(after["settings"]["env"], before["settings"]["env"]);
    assert_eq!(after["slot_hash"], before["slot_hash"]);
    assert!(
        node.get("/fn/env").await.text().contains("B '#\\#\"=kept"),
        "the guest still sees its env"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_can_ask_for_its_instance_to_be_retired() {
    let dir = tempfile::tempdir().expect("tempdir");
    add_function(dir.path(), "counter", "counter", Some("max_jobs = 100\n"));
    let node = Node::start(dir.path(), &[]);
    assert_eq!(node.get("/fn/counter").await.text(), "1\n");
    let asked = node.get("/fn/counter?retire").await;
    assert_eq!(asked.text(), "2\n");
    assert!(
        asked.headers.get("fn-retire").is_none(),
        "the header never reaches the client"
    );
    assert_eq!(
        node.get("/fn/counter").await.text(),
        "1\n",
        "retired after that call"
    );
    let metrics = node.get("/metrics").await.text();
    assert_eq!(
        metric(
            &metrics,
            "fnrunner_instances_retired_total{function=\"counter\",reason=\"guest_asked\"}"
        ),
        1.0
    );
}
