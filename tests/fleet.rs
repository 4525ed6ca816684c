//! Beyond one node: three real nodes behind the real nginx and HAProxy
//! configurations from `deploy/`, and behind `fnrunner call` with each
//! placer — affinity, NACK replay with the body intact, a node killed
//! mid-call (at most once), and a drain with no failed call.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::fleet::*;
use common::node::*;

async fn via(lb: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    send(
        lb,
        Proto::Http1,
        method,
        path,
        headers,
        Bytes::from(body.to_owned()),
    )
    .await
}

/// Which node a call to `path` through `lb` lands on (by the handled
/// counters).
async fn owner(fleet: &Fleet, lb: SocketAddr, path: &str) -> usize {
    let before = fleet.handled().await;
    assert_eq!(via(lb, "POST", path, &[], "probe").await.status, 200);
    let after = fleet.handled().await;
    let moved: Vec<usize> = (0..3).filter(|&i| after[i] != before[i]).collect();
    assert_eq!(moved.len(), 1, "{before:?} → {after:?}");
    moved[0]
}

async fn wait_active(node: &Node, count: u64) {
    let busy = eventually(Duration::from_secs(15), async || {
        node.status().await["active_request_count"].as_u64() == Some(count)
    })
    .await;
    assert!(busy, "{count} calls running on {}", node.addr);
}

/// Starts a POST to `path` on `node` and returns once it runs there (it
/// holds one of the node's places until it ends).
async fn hold(node: &Node, path: &'static str, body: &'static str) -> tokio::task::JoinHandle<Reply> {
    let call = tokio::spawn(send(
        node.addr,
        Proto::Http1,
        "POST",
        path,
        &[],
        Bytes::from_static(body.as_bytes()),
    ));
    wait_active(node, 1).await;
    call
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_functions_calls_stay_on_one_node_behind_nginx_and_haproxy() {
    let fleet = Fleet::start();
    for lb in [nginx(&fleet.addrs()), haproxy(&fleet.addrs())] {
        for function in ["hello", "long"] {
            let before = fleet.handled().await;
            for i in 0..20 {
                let reply = via(lb.addr, "POST", &format!("/fn/{function}/{i}"), &[], "x").await;
                assert_eq!(reply.status, 200, "{}: {}", lb.name, reply.text());
            }
            let after = fleet.handled().await;
            let moved: Vec<u64> = (0..3)
                .map(|i| after[i].unwrap_or(0) - before[i].unwrap_or(0))
                .collect();
            let mut sorted = moved.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, [0, 0, 20], "{}: {function} spread as {moved:?}", lb.name);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_saturated_node_nacks_and_the_lb_replays_the_call_body_and_all() {
    let fleet = Fleet::start();
    for lb in [nginx(&fleet.addrs()), haproxy(&fleet.addrs())] {
        let owner_index = owner(&fleet, lb.addr, "/fn/slow?ms=1").await;
        let owner = fleet.node(owner_index);
        let holder = hold(owner, "/fn/slow?ms=3000", "hold").await;
        let before = owner.status().await;
        let payload = format!("payload for {} — replayed whole", lb.name);
        let reply = via(lb.addr, "POST", "/fn/slow?ms=1", &[], &payload).await;
        assert_eq!(reply.status, 200, "{}: {}", lb.name, reply.text());
        assert_eq!(
            reply.text(),
            payload,
            "{}: the body arrived intact at the next node",
            lb.name
        );
        let after = owner.status().await;
        let nacks = |s: &serde_json::Value| {
            s["requests_received"].as_u64().unwrap_or(0) - s["requests_handled"].as_u64().unwrap_or(0)
        };
        assert_eq!(
            nacks(&after) - nacks(&before),
            1,
            "{}: the owner NACKed once",
            lb.name
        );
        assert_eq!(holder.await.expect("join").text(), "hold");
    }
}

/// Kills the owner of `long` with calls in flight through `lb`; checks
/// they failed and ran nowhere else. Returns the fleet minus that node.
async fn kill_mid_call(mut fleet: Fleet, lb: &Lb) -> Fleet {
    let victim = owner(&fleet, lb.addr, "/fn/long?ms=1").await;
    let addr = lb.addr;
    let ids: Vec<String> = (0..3).map(|i| format!("inflight-{}-{i}", lb.name)).collect();
    let in_flight: Vec<_> = ids
        .iter()
        .map(|id| {
            let id = id.clone();
            tokio::spawn(
                async move { via(addr, "POST", "/fn/long?ms=4000", &[("fn-call-id", &id)], "x").await },
            )
        })
        .collect();
    wait_active(fleet.node(victim), 3).await;
    fleet.node(victim).signal(libc::SIGKILL);
    if let Some(mut node) = fleet.nodes[victim].take() {
        let _ = node.child.wait();
    }
    for call in in_flight {
        let reply = call.await.expect("join");
        assert!(
            reply.status >= 500,
            "{}: a call in flight on the dead node failed: {}",
            lb.name,
            reply.status
        );
    }
    // Had the LB replayed one elsewhere, it would finish there by now.
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let logs = fleet.logs_of_others(victim);
    for id in &ids {
        assert!(
            !logs.contains(id.as_str()),
            "{}: {id} ran a second time elsewhere",
            lb.name
        );
    }
    fleet
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_killed_mid_call_behind_haproxy_fails_those_calls_once_and_no_later_one() {
    let fleet = Fleet::start();
    let lb = haproxy(&fleet.addrs());
    let _fleet = kill_mid_call(fleet, &lb).await;
    for i in 0..20 {
        let reply = via(lb.addr, "POST", &format!("/fn/long/{i}?ms=1"), &[], "after").await;
        assert_eq!(reply.status, 200, "call {i} after the kill: {}", reply.text());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nginx_keeps_at_most_once_when_a_node_dies_mid_call() {
    let fleet = Fleet::start();
    let lb = nginx(&fleet.addrs());
    let _fleet = kill_mid_call(fleet, &lb).await;
    // At most once costs at most a call that meets the dead node before
    // `max_fails` takes it out; then every call succeeds.
    let mut consecutive = 0;
    for _ in 0..30 {
        if via(lb.addr, "POST", "/fn/long?ms=1", &[], "after").await.status == 200 {
            consecutive += 1;
            if consecutive == 10 {
                break;
            }
        } else {
            consecutive = 0;
        }
    }
    assert_eq!(
        consecutive, 10,
        "calls succeed again once nginx has marked the node down"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn draining_a_node_moves_its_traffic_with_no_failed_call() {
    for make_lb in [nginx as fn(&[SocketAddr]) -> Lb, haproxy] {
        let mut fleet = Fleet::start();
        let lb = make_lb(&fleet.addrs());
        let victim = owner(&fleet, lb.addr, "/fn/long?ms=1").await;
        let running = tokio::spawn(via(lb.addr, "POST", "/fn/long?ms=1500", &[], "finishing"));
        wait_active(fleet.node(victim), 1).await;
        fleet.node(victim).signal(libc::SIGTERM);
        for i in 0..60 {
            let reply = via(lb.addr, "POST", &format!("/fn/long/{i}?ms=50"), &[], "moved").await;
            assert_eq!(
                reply.status,
                200,
                "{}: call {i} during the drain: {}",
                lb.name,
                reply.text()
            );
        }
        assert_eq!(running.await.expect("join").text(), "finishing", "{}", lb.name);
        let mut node = fleet.nodes[victim].take().expect("victim");
        assert_eq!(node.wait_exit(Duration::from_secs(20)), Some(0), "{}", lb.name);
    }
}

// ---- the same contract through `fnrunner call` and its placers ----

fn call_cli(urls: &[String], placer: &str, function: &str, extra: &[&str]) -> std::process::Output {
    common::fnrunner()
        .args([
            "call",
            "--runner",
            &urls.join(","),
            "--placer",
            placer,
            "-v",
            function,
        ])
        .args(extra)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run fnrunner call")
}

async fn call_cli_async(
    urls: Vec<String>,
    placer: &'static str,
    function: &'static str,
    extra: Vec<String>,
) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        call_cli(&urls, placer, function, &extra)
    })
    .await
    .expect("join")
}

fn runner_of(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr)
        .lines()
        .find_map(|l| l.strip_prefix("* runner:"))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fnrunner_call_replays_a_nacked_call_with_each_placer() {
    let fleet = Fleet::start();
    let urls = fleet.urls();
    // ch: the function's first runner is busy, the next in the ring takes it.
    let first = fnrunner::placer::first_runner("slow", 3);
    let holder = hold(fleet.node(first), "/fn/slow?ms=3000", "hold").await;
    let out = call_cli_async(
        urls.clone(),
        "ch",
        "slow",
        vec!["-d".into(), "ch payload".into(), "--path".into(), "/?ms=1".into()],
    )
    .await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ch payload");
    assert_eq!(
        runner_of(&out),
        urls[(first + 1) % 3],
        "the next runner in the ring"
    );
    assert_eq!(holder.await.expect("join").text(), "hold");

    // naive: two runners busy; wherever the round robin starts, the free
    // one takes it.
    let holders: Vec<_> = (0..2)
        .map(|i| {
            tokio::spawn(send(
                fleet.node(i).addr,
                Proto::Http1,
                "POST",
                "/fn/slow?ms=3000",
                &[],
                Bytes::from("hold"),
            ))
        })
        .collect();
    wait_active(fleet.node(0), 1).await;
    wait_active(fleet.node(1), 1).await;
    let out = call_cli_async(
        urls.clone(),
        "naive",
        "slow",
        vec![
            "-d".into(),
            "naive payload".into(),
            "--path".into(),
            "/?ms=1".into(),
        ],
    )
    .await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "naive payload");
    assert_eq!(runner_of(&out), urls[2]);
    for holder in holders {
        assert_eq!(holder.await.expect("join").status, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fnrunner_call_never_runs_a_call_twice_when_a_node_dies() {
    for placer in ["ch", "naive"] {
        let mut fleet = Fleet::start();
        let urls = fleet.urls();
        let victim = fnrunner::placer::first_runner("long", 3);
        let ids: Vec<String> = (0..6).map(|i| format!("cli-{placer}-{i}")).collect();
        let calls: Vec<_> = ids
            .iter()
            .map(|id| {
                let extra = vec![
                    "--path".into(),
                    "/?ms=4000".into(),
                    "--call-id".into(),
                    id.clone(),
                ];
                tokio::spawn(call_cli_async(urls.clone(), placer, "long", extra))
            })
            .collect();
        // Wait until all six run somewhere, then kill the victim.
        let running = eventually(Duration::from_secs(15), async || {
            let mut total = 0;
            for node in fleet.nodes.iter().flatten() {
                total += node.status().await["active_request_count"].as_u64().unwrap_or(0);
            }
            total == 6
        })
        .await;
        assert!(running, "{placer}: all six calls running");
        fleet.node(victim).signal(libc::SIGKILL);
        if let Some(mut node) = fleet.nodes[victim].take() {
            let _ = node.child.wait();
        }
        let mut failed = Vec::new();
        for (id, call) in ids.iter().zip(calls) {
            let out = call.await.expect("join");
            match out.status.code() {
                Some(0) => {}
                Some(5) => failed.push(id.clone()),
                other => panic!(
                    "{placer} {id}: exit {other:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                ),
            }
        }
        tokio::time::sleep(Duration::from_millis(4500)).await;
        let logs = fleet.logs_of_others(victim);
        for id in &ids {
            let ran = logs.matches(&format!("call_id={id}")).count();
            let expected = usize::from(!failed.contains(id));
            assert_eq!(
                ran, expected,
                "{placer}: {id} ran {ran} times on the surviving nodes"
            );
        }
        if placer == "ch" {
            assert_eq!(failed.len(), 6, "ch: all six were on the victim");
        }
        let out = call_cli_async(
            urls.clone(),
            placer,
            "long",
            vec!["--path".into(), "/?ms=1".into()],
        )
        .await;
        assert_eq!(
            out.status.code(),
            Some(0),
            "{placer}: a later call skips the dead node"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fnrunner_call_moves_off_a_draining_node_with_no_failed_call() {
    for placer in ["ch", "naive"] {
        let mut fleet = Fleet::start();
        let urls = fleet.urls();
        let victim = fnrunner::placer::first_runner("long", 3);
        let running = hold(fleet.node(victim), "/fn/long?ms=1500", "finishing").await;
        fleet.node(victim).signal(libc::SIGTERM);
        for i in 0..15 {
            let out = call_cli_async(
                urls.clone(),
                placer,
                "long",
                vec!["--path".into(), "/?ms=50".into()],
            )
            .await;
            assert_eq!(
                out.status.code(),
                Some(0),
                "{placer} call {i}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert_eq!(running.await.expect("join").text(), "finishing");
        let mut node = fleet.nodes[victim].take().expect("victim");
        assert_eq!(node.wait_exit(Duration::from_secs(20)), Some(0), "{placer}");
    }
}
