//! Metrics, time accounting, core dumps and logs, through the real binary.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use common::node::*;

/// Parses a Prometheus text scrape into `series → value`, where a series
/// is the metric name and its labels, sorted, as `name{a="1",b="2"}`.
fn parse_metrics(text: &str) -> HashMap<String, f64> {
    let mut series = HashMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let Some((key, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else { continue };
        let key = match key.split_once('{') {
            Some((name, labels)) => {
                let mut labels: Vec<&str> = labels.trim_end_matches('}').split(',').collect();
                labels.sort();
                format!("{name}{{{}}}", labels.join(","))
            }
            None => key.to_owned(),
        };
        series.insert(key, value);
    }
    series
}

async fn scrape(node: &Node) -> HashMap<String, f64> {
    parse_metrics(&node.get("/metrics").await.text())
}

fn value(metrics: &HashMap<String, f64>, key: &str) -> f64 {
    metrics.get(key).copied().unwrap_or(0.0)
}

const STATUSES: [&str; 5] = ["completed", "canceled", "timeouts", "errors", "server_busy"];

fn status_counts(metrics: &HashMap<String, f64>) -> HashMap<&'static str, f64> {
    STATUSES
        .iter()
        .map(|status| {
            let key = format!("fnrunner_call_scheduler_latency_seconds_count{{call_status=\"{status}\"}}");
            (*status, value(metrics, &key))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_call_status_moves_by_exactly_one() {
    let dir = function_dir(&["hello-min", "loop", "trap"]);
    add_function(dir.path(), "one", "sleep", Some("max_concurrency = 1\n"));
    let node = Node::start(dir.path(), &[]);
    let before = status_counts(&scrape(&node).await);

    assert_eq!(node.get("/fn/hello-min").await.status, 200);
    assert_eq!(node.get("/fn/loop").await.status, 504);
    assert_eq!(node.get("/fn/trap").await.status, 502);
    // A call that holds `one`'s only slot, from a client that will leave.
    let leaving = raw_request_headers(node.addr, "GET", "/fn/one?ms=5000", 0);
    assert!(
        eventually(
            Duration::from_secs(10),
            async || node.status().await["active_request_count"] == 1
        )
        .await,
        "the long call is running"
    );
    let nacked = node.get("/fn/one?ms=1").await;
    assert_eq!(nacked.status, 503);
    // The client goes away mid-call.
    leaving.shutdown(std::net::Shutdown::Both).expect("close");
    drop(leaving);
    assert!(
        eventually(
            Duration::from_secs(10),
            async || node.status().await["active_request_count"] == 0
        )
        .await,
        "the abandoned call ended"
    );

    let after = status_counts(&scrape(&node).await);
    for status in STATUSES {
        assert_eq!(
            after[status] - before[status],
            1.0,
            "{status} moved by exactly one: {after:?}"
        );
    }
    let metrics = scrape(&node).await;
    assert_eq!(value(&metrics, "fnrunner_calls_received_total"), 5.0);
    assert_eq!(value(&metrics, "fnrunner_calls_handled_total"), 4.0);
    assert_eq!(
        value(&metrics, "fnrunner_calls_nacked_total{reason=\"busy\"}"),
        1.0
    );
    assert_eq!(value(&metrics, "fnrunner_calls_active"), 0.0);
    assert_eq!(
        value(
            &metrics,
            "fnrunner_instances_retired_total{function=\"trap\",reason=\"trap\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &metrics,
            "fnrunner_instances_retired_total{function=\"loop\",reason=\"timeout\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &metrics,
            "fnrunner_cold_starts_total{function=\"hello-min\",source=\"compiled\"}"
        ),
        1.0
    );
    assert!(
        node.log().contains("call canceled: the client went away"),
        "{}",
        node.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_guest_counts_as_user_time_not_scheduler_time() {
    let dir = function_dir(&["busy"]);
    let node = Node::start(dir.path(), &[]);
    let _warm = node.get("/fn/busy?ms=1").await;
    let before = scrape(&node).await;
    let reply = node.get("/fn/busy?ms=200").await;
    assert_eq!(reply.text(), "busy 200\n");
    let timing = reply.header("server-timing");
    let field = |name: &str| -> f64 {
        timing
            .split(", ")
            .find_map(|part| part.strip_prefix(&format!("{name};dur=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {timing}"))
    };
    assert!(field("exec") >= 200.0, "{timing}");
    assert!(field("sched") < field("exec") / 4.0, "{timing}");
    let after = scrape(&node).await;
    let user = value(&after, "fnrunner_call_user_execution_seconds_sum")
        - value(&before, "fnrunner_call_user_execution_seconds_sum");
    let sched = value(
        &after,
        "fnrunner_call_scheduler_latency_seconds_sum{call_status=\"completed\"}",
    ) - value(
        &before,
        "fnrunner_call_scheduler_latency_seconds_sum{call_status=\"completed\"}",
    );
    assert!(user >= 0.2, "user execution {user}");
    assert!(
        sched < user / 4.0,
        "scheduler latency {sched} against user {user}"
    );
}

/// Names of the custom sections of a Wasm binary.
fn custom_sections(bytes: &[u8]) -> Vec<String> {
    fn leb(bytes: &[u8], at: &mut usize) -> Option<usize> {
        let (mut value, mut shift) = (0usize, 0);
        loop {
            let byte = *bytes.get(*at)?;
            *at += 1;
            value |= usize::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(value);
            }
            shift += 7;
        }
    }
    let mut names = Vec::new();
    let mut at = 8;
    while at < bytes.len() {
        let id = bytes[at];
        at += 1;
        let Some(size) = leb(bytes, &mut at) else { break };
        let end = at + size;
        if id == 0 {
            let mut name_at = at;
            if let Some(len) = leb(bytes, &mut name_at) {
                names.push(
                    String::from_utf8_lossy(&bytes[name_at..(name_at + len).min(bytes.len())]).into_owned(),
                );
            }
        }
        at = end;
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trap_leaves_a_wasm_core_dump_that_status_counts() {
    let dir = function_dir(&["trap", "hello-min"]);
    let dumps = tempfile::tempdir().expect("tempdir");
    let node = Node::start(dir.path(), &["--dump-dir", dumps.path().to_str().expect("path")]);
    assert_eq!(node.status().await["kdumps_on_disk"], 0);
    assert_eq!(node.get("/fn/hello-min").await.status, 200);
    let trapped = node.get("/fn/trap").await;
    assert_eq!(trapped.status, 502);
    let call_id = trapped.header("fn-call-id");
    let files: Vec<_> = std::fs::read_dir(dumps.path())
        .expect("dump dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(
        files[0].to_string_lossy().contains(&call_id),
        "named after the call"
    );
    let dump = std::fs::read(&files[0]).expect("dump");
    assert_eq!(&dump[..4], b"\0asm", "a Wasm binary");
    let sections = custom_sections(&dump);
    assert!(sections.iter().any(|s| s == "core"), "{sections:?}");
    assert!(sections.iter().any(|s| s == "corestack"), "{sections:?}");
    assert_eq!(node.status().await["kdumps_on_disk"], 1);
    let metrics = scrape(&node).await;
    assert_eq!(value(&metrics, "fnrunner_core_dumps_written_total"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_a_real_scrape() {
    let dir = function_dir(&["hello-min", "trap", "hello"]);
    let node = Node::start(dir.path(), &[]);
    for path in ["/fn/hello-min", "/fn/trap", "/fn/hello", "/fn/nope"] {
        let _ = node.get(path).await;
    }
    let scrape = node.get("/metrics").await;
    assert!(
        scrape
            .header("content-type")
            .starts_with("text/plain; version=0.0.4")
    );
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is installed (.ci/run installs the `prometheus` package)");
    {
        use std::io::Write;
        promtool
            .stdin
            .take()
            .expect("stdin")
            .write_all(&scrape.body)
            .expect("feed promtool");
    }
    let out = promtool.wait_with_output().expect("promtool");
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let openmetrics = send(
        node.addr,
        Proto::Http1,
        "GET",
        "/metrics",
        &[("accept", "application/openmetrics-text;version=1.0.0")],
        Bytes::new(),
    )
    .await;
    assert!(
        openmetrics
            .header("content-type")
            .starts_with("application/openmetrics-text")
    );
    assert!(openmetrics.text().trim_end().ends_with("# EOF"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_put_guest_stderr_and_the_outcome_in_the_call_span() {
    let dir = function_dir(&["trap"]);
    let node = Node::start(dir.path(), &["--log-format", "json"]);
    let reply = node.get("/fn/trap").await;
    let call_id = reply.header("fn-call-id");
    let logged = eventually(Duration::from_secs(5), async || {
        node.log().contains("call failed")
    })
    .await;
    assert!(logged, "{}", node.log());
    let lines: Vec<serde_json::Value> = node
        .log()
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .filter(|line: &serde_json::Value| line["span"]["call_id"] == call_id.as_str())
        .collect();
    let guest_line = lines
        .iter()
        .find(|l| l["message"] == "about to trap")
        .unwrap_or_else(|| panic!("guest stderr under the call span: {}", node.log()));
    assert_eq!(guest_line["span"]["function"], "trap");
    assert!(guest_line["span"]["slot"].as_str().is_some_and(|s| s.len() == 12));
    let outcome = lines
        .iter()
        .find(|l| l["message"] == "call failed")
        .expect("outcome line");
    assert_eq!(outcome["span"]["outcome"], "trap");
}
