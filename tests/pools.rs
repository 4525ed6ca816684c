//! Warm pools against the real binary: reuse up to `max_jobs`, retirement,
//! prewarming, idle reaping and the memory high-water mark.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::node::*;

fn pool(status: &serde_json::Value, function: &str) -> serde_json::Value {
    status["details"][function]["pool"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_serves_max_jobs_calls_then_a_fresh_one_takes_over() {
    let dir = tempfile::tempdir().expect("tempdir");
    add_function(dir.path(), "counter", "counter", Some("max_jobs = 3\n"));
    let node = Node::start(dir.path(), &[]);
    let mut answers = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..4 {
        let reply = node.get("/fn/counter").await;
        answers.push(reply.text());
        ids.push(reply.header("x-instance-id"));
    }
    assert_eq!(answers, ["1\n", "2\n", "3\n", "1\n"]);
    assert_eq!(ids[0], ids[2]);
    assert_ne!(ids[2], ids[3]);
    let stats = pool(&node.status().await, "counter");
    assert_eq!(stats["created"], 2);
    assert_eq!(stats["reused"], 2);
    assert_eq!(stats["retired"], 1, "retired at max_jobs: {stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trap_retires_the_instance_so_the_next_call_starts_fresh() {
    let dir = tempfile::tempdir().expect("tempdir");
    add_function(dir.path(), "counter", "counter", Some("max_jobs = 3\n"));
    let node = Node::start(dir.path(), &[]);
    assert_eq!(node.get("/fn/counter").await.text(), "1\n");
    assert_eq!(node.get("/fn/counter?trap").await.status, 502);
    assert_eq!(
        node.get("/fn/counter").await.text(),
        "1\n",
        "a new instance after the trap"
    );
    let stats = pool(&node.status().await, "counter");
    assert_eq!(stats["traps"], 1);
    assert_eq!(stats["killed"], 1);
    assert_eq!(stats["restarts"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_calls_never_share_an_instance() {
    let dir = tempfile::tempdir().expect("tempdir");
    add_function(dir.path(), "counter", "counter", Some("max_jobs = 100\n"));
    let node = Node::start(dir.path(), &[]);
    for _round in 0..3 {
        let calls: Vec<_> = (0..2)
            .map(|_| {
                tokio::spawn(send(
                    node.addr,
                    Proto::Http1,
                    "GET",
                    "/fn/counter?sleep_ms=200",
                    &[],
                    Bytes::new(),
                ))
            })
            .collect();
        let mut ids = Vec::new();
        for call in calls {
            let reply = call.await.expect("join");
            assert_eq!(reply.status, 200);
            ids.push(reply.header("x-instance-id"));
        }
        assert_ne!(ids[0], ids[1], "concurrent calls ran on different instances");
    }
    let stats = pool(&node.status().await, "counter");
    assert_eq!(
        stats["created"], 2,
        "two instances, reused across rounds: {stats}"
    );
    assert_eq!(stats["reused"], 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_warm_instances_exist_before_the_first_call_which_makes_none() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = Node::start(dir.path(), &[]);
    let deployed = node
        .deploy("warm", "counter", "max_jobs = 10\nmin_warm = 2\n")
        .await;
    assert_eq!(deployed.status, 201, "{}", deployed.text());
    let stats = pool(&node.status().await, "warm");
    assert_eq!(stats["current"], 2, "{stats}");
    assert_eq!(stats["ready"], 2);
    assert_eq!(stats["prewarmed"], 2);
    assert_eq!(stats["created"], 2);
    let reply = node.get("/fn/warm").await;
    assert_eq!(reply.text(), "1\n", "a prewarmed instance served it");
    let stats = pool(&node.status().await, "warm");
    assert_eq!(stats["created"], 2, "the first call made no instance: {stats}");
    let metrics = node.get("/metrics").await.text();
    assert!(
        metrics.contains("fnrunner_instances_created_total{function=\"warm\",when=\"prewarm\"} 2"),
        "{metrics}"
    );
    assert!(!metrics.contains("fnrunner_instances_created_total{function=\"warm\",when=\"on_call\"}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_instances_are_reaped_and_their_slots_freed() {
    let dir = tempfile::tempdir().expect("tempdir");
    add_function(
        dir.path(),
        "counter",
        "counter",
        Some("max_jobs = 100\nidle_timeout_ms = 300\n"),
    );
    add_function(
        dir.path(),
        "other",
        "counter",
        Some("max_jobs = 100\nidle_timeout_ms = 60000\nenv = { X = \"1\" }\n"),
    );
    let node = Node::start(
        dir.path(),
        &["--max-instances", "3", "--allocate-timeout-ms", "50"],
    );
    let burst = |function: &'static str| {
        let addr = node.addr;
        async move {
            let calls: Vec<_> = (0..3)
                .map(|_| {
                    let path = format!("/fn/{function}?sleep_ms=200");
                    tokio::spawn(
                        async move { send(addr, Proto::Http1, "GET", &path, &[], Bytes::new()).await },
                    )
                })
                .collect();
            let mut statuses = Vec::new();
            for call in calls {
                statuses.push(call.await.expect("join").status);
            }
            statuses
        }
    };
    assert_eq!(burst("counter").await, [200, 200, 200]);
    assert_eq!(
        pool(&node.status().await, "counter")["ready"],
        3,
        "three idle instances hold all three slots"
    );
    let reaped = eventually(Duration::from_secs(10), async || {
        node.get("/metrics")
            .await
            .text()
            .contains("fnrunner_instances_retired_total{function=\"counter\",reason=\"idle\"} 3")
    })
    .await;
    assert!(
        reaped,
        "reaped after idle_timeout_ms: {}",
        node.get("/metrics").await.text()
    );
    // With no instance and no call past its idle time, the slot itself goes.
    let stats = pool(&node.status().await, "counter");
    assert!(stats.is_null() || stats["current"] == 0, "{stats}");
    assert_eq!(
        burst("other").await,
        [200, 200, 200],
        "the freed slots serve another burst"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_growing_its_memory_is_retired_at_the_high_water_mark() {
    let dir = tempfile::tempdir().expect("tempdir");
    add_function(
        dir.path(),
        "grower",
        "counter",
        Some("max_jobs = 100\nmemory_mb = 64\nmemory_high_water_mb = 10\n"),
    );
    let node = Node::start(dir.path(), &[]);
    let mut answers = Vec::new();
    for _ in 0..4 {
        answers.push(node.get("/fn/grower?grow_mb=4").await.text());
    }
    // 4 MiB more per call: past 10 MiB after the third call.
    assert_eq!(answers, ["1\n", "2\n", "3\n", "1\n"]);
    let metrics = node.get("/metrics").await.text();
    assert!(
        metrics.contains("fnrunner_instances_retired_total{function=\"grower\",reason=\"high_water\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_memory_grow_retires_the_instance() {
    let dir = tempfile::tempdir().expect("tempdir");
    add_function(
        dir.path(),
        "small",
        "counter",
        Some("max_jobs = 100\nmemory_mb = 8\n"),
    );
    let node = Node::start(dir.path(), &[]);
    assert_eq!(node.get("/fn/small").await.text(), "1\n");
    let refused = node.get("/fn/small?grow_mb=16").await;
    assert_eq!(refused.status, 507, "the guest saw the refusal and answered");
    assert_eq!(
        node.get("/fn/small").await.text(),
        "1\n",
        "the instance at its limit was retired"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn functions_with_the_same_module_and_settings_keep_pools_of_their_own() {
    let dir = tempfile::tempdir().expect("tempdir");
    add_function(dir.path(), "reused", "counter", Some("max_jobs = 100\n"));
    add_function(dir.path(), "fresh", "counter", Some("max_jobs = 1\n"));
    let node = Node::start(dir.path(), &[]);
    let hash = |name: &str| {
        let node = &node;
        let name = name.to_owned();
        async move { node.get(&format!("/v1/functions/{name}")).await.json()["slot_hash"].clone() }
    };
    assert_eq!(
        hash("reused").await,
        hash("fresh").await,
        "same module and instance settings"
    );
    assert_eq!(node.get("/fn/fresh").await.text(), "1\n");
    assert_eq!(node.get("/fn/reused").await.text(), "1\n");
    assert_eq!(
        node.get("/fn/reused").await.text(),
        "2\n",
        "its own max_jobs applies"
    );
    assert_eq!(node.get("/fn/fresh").await.text(), "1\n", "and this one's");
}
