//! `fnrunner bench` through the real binary: in process and against a node.

mod common;

use std::path::Path;

use common::node::*;
use common::*;

fn bench(args: &[&str]) -> std::process::Output {
    fnrunner()
        .arg("bench")
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run fnrunner bench")
}

/// Checks the JSON report's structure; returns it.
fn check_report(path: &Path, mode: &str, phases: &[(&str, usize)]) -> serde_json::Value {
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(path).expect("json")).expect("valid JSON");
    assert_eq!(report["mode"], mode);
    assert_eq!(report["wasmtime"], "48.0.8");
    assert!(report["fnrunner"].is_string());
    assert!(report["machine"]["cpus"].as_u64().is_some_and(|n| n >= 1));
    assert!(report["machine"]["cpu"].is_string());
    assert_eq!(report["module"]["digest"].as_str().map(str::len), Some(64));
    assert!(report["settings"].is_object());
    assert!(
        report["settings"]["function"]["memory_mb"].as_u64().is_some(),
        "the function's settings are recorded: {}",
        report["settings"]
    );
    let got = report["phases"].as_array().expect("phases");
    assert_eq!(got.len(), phases.len(), "{got:?}");
    for (phase, (name, count)) in got.iter().zip(phases) {
        assert_eq!(phase["name"], *name);
        let samples = phase["samples_ns"].as_array().expect("samples");
        assert_eq!(samples.len(), *count, "{name}");
        assert!(
            samples.iter().all(|s| s.as_u64().is_some_and(|ns| ns > 0)),
            "{name}"
        );
        let summary = &phase["summary"];
        for key in ["min", "p50", "p90", "p99", "max"] {
            assert!(summary[key].as_u64().is_some_and(|ns| ns > 0), "{name} {key}");
        }
        assert!(summary["min"].as_u64() <= summary["p50"].as_u64());
        assert!(summary["p50"].as_u64() <= summary["p99"].as_u64());
        assert!(summary["p99"].as_u64() <= summary["max"].as_u64());
    }
    report
}

fn check_svg(path: &Path) {
    let text = std::fs::read_to_string(path).expect("svg written");
    let document = roxmltree::Document::parse(&text).expect("well-formed XML");
    assert_eq!(document.root_element().tag_name().name(), "svg");
    assert!(
        document
            .descendants()
            .any(|node| node.tag_name().name() == "polyline" || node.tag_name().name() == "path")
    );
}

#[test]
fn bench_in_process_writes_the_table_json_and_plot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("run.json");
    let svg = dir.path().join("run.svg");
    let module = fixture("hello-min");
    let out = bench(&[
        module.to_str().expect("path"),
        "--iterations",
        "5",
        "--compile-iterations",
        "2",
        "--json",
        json.to_str().expect("path"),
        "--plot",
        svg.to_str().expect("path"),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        out.stderr.is_empty(),
        "no progress bar off a terminal: {}",
        stderr(&out)
    );
    let table = stdout(&out);
    let phases = [
        ("compile", 2),
        ("load from store", 5),
        ("prepare", 5),
        ("instantiate", 5),
        ("new slot, first call", 5),
        ("first call", 5),
        ("warm call", 5),
    ];
    for (name, _) in phases {
        assert!(table.contains(name), "{table}");
    }
    assert!(
        table
            .lines()
            .next()
            .is_some_and(|h| h.contains("p50") && h.contains("p99"))
    );
    let report = check_report(&json, "in-process", &phases);
    assert_eq!(report["module"]["kind"], "cgi");
    assert_eq!(report["settings"]["iterations"], 5);
    check_svg(&svg);

    // Compared with itself: every phase, with its change.
    let again = bench(&[
        module.to_str().expect("path"),
        "--iterations",
        "5",
        "--compare",
        json.to_str().expect("path"),
    ]);
    assert_eq!(again.status.code(), Some(0), "{}", stderr(&again));
    let text = stdout(&again);
    assert!(text.contains("old → new"), "{text}");
    assert!(text.contains("instantiate") && text.contains('%'), "{text}");
}

#[test]
fn bench_refuses_bad_options_with_one_line() {
    let module = fixture("hello-min");
    let out = bench(&[module.to_str().expect("path"), "--iterations", "0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).starts_with("error: "));
    let out = bench(&[module.to_str().expect("path"), "--compare", "/nonexistent.json"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("--compare /nonexistent.json"),
        "{}",
        stderr(&out)
    );
    let out = bench(&[module.to_str().expect("path"), "--target", "ftp://x"]);
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_against_a_node_deploys_measures_and_cleans_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = Node::start(dir.path(), &[]);
    let out_dir = tempfile::tempdir().expect("tempdir");
    let json = out_dir.path().join("http.json");
    let svg = out_dir.path().join("http.svg");
    let target = format!("http://{}", node.addr);
    let module = fixture("hello");
    let args: Vec<String> = vec![
        "--target".into(),
        target,
        module.display().to_string(),
        "--functions".into(),
        "3".into(),
        "--iterations".into(),
        "4".into(),
        "--concurrency".into(),
        "2".into(),
        "--json".into(),
        json.display().to_string(),
        "--plot".into(),
        svg.display().to_string(),
    ];
    let out = tokio::task::spawn_blocking(move || {
        fnrunner()
            .arg("bench")
            .args(&args)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run")
    })
    .await
    .expect("join");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let report = check_report(
        &json,
        "http",
        &[
            ("cold call (client)", 3),
            ("cold: server sched", 3),
            ("cold: server exec", 3),
            ("warm call (client)", 12),
            ("warm: server sched", 12),
            ("warm: server exec", 12),
        ],
    );
    assert_eq!(report["settings"]["functions"], 3);
    check_svg(&svg);
    let left = node.get("/v1/functions").await.json();
    assert_eq!(left, serde_json::json!([]), "the variants were removed");
    let files: Vec<_> = std::fs::read_dir(dir.path()).expect("dir").collect();
    assert!(files.is_empty(), "and their files: {files:?}");
}
