//! The execution core through the library: both guest kinds, every limit,
//! the sandbox, and the module store.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use fnrunner::call::CallStatus;
use fnrunner::function::{FunctionDef, SettingsOverrides};
use fnrunner::guest::{CallError, CallLimits, DetectError, FaultKind, GuestKind};
use fnrunner::module_store::{LoadSource, ModuleDigest, ModuleStore};
use fnrunner::slot::{Slot, SlotError};

#[tokio::test]
async fn component_get_sees_path_query_and_header() {
    let store = TestStore::new();
    let slot = store.slot("hello");
    let (report, response) = slot
        .call_to_completion(
            &capacity(),
            request("GET", "/x/y?a=1&b=2", &[("x-test", "yes")], Bytes::new()),
        )
        .await;
    let response = response.expect("hello answers");
    assert_eq!(response.status, 200);
    assert_eq!(
        &response.body[..],
        b"hello from fnrunner\npath=/x/y\nquery=a=1&b=2\nx-test=yes\n"
    );
    assert_eq!(report.status(), CallStatus::Completed);
    assert!(report.user_execution_time > Duration::ZERO);
}

#[tokio::test]
async fn component_post_echoes_a_large_body_whole() {
    let store = TestStore::new();
    let slot = store.slot("hello");
    let body: Bytes = (0..8 << 20)
        .map(|i: u32| (i % 253) as u8)
        .collect::<Vec<u8>>()
        .into();
    let (_, response) = slot
        .call_to_completion(
            &capacity(),
            request(
                "POST",
                "/",
                &[("content-type", "application/x-test")],
                body.clone(),
            ),
        )
        .await;
    let response = response.expect("echo");
    assert_eq!(response.status, 200);
    assert_eq!(response.headers["content-type"], "application/x-test");
    assert_eq!(response.headers["x-echo"], "1");
    assert_eq!(response.body.len(), body.len());
    assert!(response.body == body, "echoed body differs");
}

#[tokio::test]
async fn cgi_echo_returns_the_body_with_its_content_type() {
    let store = TestStore::new();
    let slot = store.slot("echo");
    let (_, response) = slot
        .call_to_completion(
            &capacity(),
            request("POST", "/", &[("content-type", "text/x-echo")], "ping pong"),
        )
        .await;
    let response = response.expect("echo");
    assert_eq!(response.status, 200);
    assert_eq!(response.headers["content-type"], "text/x-echo");
    assert_eq!(response.headers["x-echo-length"], "9");
    assert_eq!(&response.body[..], b"ping pong");
}

#[tokio::test]
async fn cgi_headers_guest_sets_status_and_location_and_sees_the_cgi_environment() {
    let store = TestStore::new();
    let slot = store.slot("headers");
    let (report, response) = slot
        .call_to_completion(
            &capacity(),
            request(
                "POST",
                "/some/path?status=201&location=/next",
                &[("x-foo", "bar"), ("content-type", "text/plain")],
                "abc",
            ),
        )
        .await;
    let response = response.expect("headers");
    assert_eq!(response.status, 201);
    assert_eq!(response.headers["location"], "/next");
    assert_eq!(response.headers["x-cgi-method"], "POST");
    let body = String::from_utf8_lossy(&response.body);
    for line in [
        "REQUEST_METHOD=POST",
        "PATH_INFO=/some/path",
        "QUERY_STRING=status=201&location=/next",
        "CONTENT_TYPE=text/plain",
        "CONTENT_LENGTH=3",
        "FN_FN_ID=headers",
        "HTTP_X_FOO=bar",
    ] {
        assert!(body.lines().any(|l| l == line), "missing {line} in:\n{body}");
    }
    assert!(body.contains(&format!("FN_CALL_ID={}", report.id)), "{body}");
    let deadline = body
        .lines()
        .find_map(|l| l.strip_prefix("FN_DEADLINE="))
        .expect("FN_DEADLINE");
    assert!(
        humantime::parse_rfc3339(deadline).is_ok(),
        "FN_DEADLINE {deadline} is RFC 3339"
    );
}

#[tokio::test]
async fn location_alone_answers_a_redirect() {
    let store = TestStore::new();
    let (_, response) = store
        .slot("headers")
        .call_to_completion(&capacity(), get("/?location=/x"))
        .await;
    assert_eq!(response.expect("headers").status, 302);
}

#[tokio::test]
async fn looping_guest_is_stopped_as_a_timeout_shortly_after_its_deadline() {
    let store = TestStore::new();
    let slot = store.slot("loop"); // loop.toml: timeout_ms = 500
    let (report, response) = slot.call_to_completion(&capacity(), get("/")).await;
    match response {
        Err(CallError::Timeout { function, timeout_ms }) => {
            assert_eq!(function, "loop");
            assert_eq!(timeout_ms, 500);
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert_eq!(report.status(), CallStatus::Timeouts);
    assert!(report.total >= Duration::from_millis(500));
    assert!(
        report.total < Duration::from_millis(1500),
        "stopped late: {:?}",
        report.total
    );
}

#[tokio::test]
async fn memory_bomb_is_refused_and_the_next_call_runs() {
    let store = TestStore::new();
    let bomb = store.slot("membomb"); // membomb.toml: memory_mb = 16
    let (report, response) = bomb.call_to_completion(&capacity(), get("/")).await;
    match response {
        Err(CallError::MemoryLimit { function, limit_mb }) => {
            assert_eq!(function, "membomb");
            assert_eq!(limit_mb, 16);
        }
        other => panic!("expected a memory-limit error, got {other:?}"),
    }
    assert!(
        String::from_utf8_lossy(&report.log.0).contains("refused after"),
        "the guest saw the refusal"
    );
    // The process is unharmed: the same slot and another function still run.
    let (_, again) = bomb.call_to_completion(&capacity(), get("/")).await;
    assert_eq!(again.err().map(|e| e.kind()), Some(FaultKind::MemoryLimit));
    let (_, hello) = store
        .slot("hello-min")
        .call_to_completion(&capacity(), get("/"))
        .await;
    assert_eq!(&hello.expect("hello-min").body[..], b"hello\n");
}

#[tokio::test]
async fn memory_limit_is_taken_from_the_settings_and_overrides() {
    let store = TestStore::new();
    let overrides = SettingsOverrides {
        memory_mb: Some(64),
        ..Default::default()
    };
    let slot = store.slot_with("membomb", &overrides, CallLimits::default());
    let (report, response) = slot.call_to_completion(&capacity(), get("/")).await;
    assert!(
        matches!(response, Err(CallError::MemoryLimit { limit_mb: 64, .. })),
        "{response:?}"
    );
    let log = String::from_utf8_lossy(&report.log.0).into_owned();
    let mib: u64 = log
        .trim()
        .strip_prefix("refused after ")
        .and_then(|rest| rest.strip_suffix(" MiB"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected guest log {log:?}"));
    assert!(
        (48..=64).contains(&mib),
        "the guest grew to {mib} MiB under a 64 MiB limit"
    );
}

#[tokio::test]
async fn trap_is_reported_as_a_trap_naming_the_function() {
    let store = TestStore::new();
    let (report, response) = store.slot("trap").call_to_completion(&capacity(), get("/")).await;
    let error = response.expect_err("trap");
    assert_eq!(error.kind(), FaultKind::Trap);
    let text = error.to_string();
    assert!(text.contains("function `trap` trapped"), "{text}");
    assert!(text.contains("unreachable"), "{text}");
    assert_eq!(report.status(), CallStatus::Errors);
    assert!(String::from_utf8_lossy(&report.log.0).contains("about to trap"));
}

#[tokio::test]
async fn ten_mib_of_output_is_delivered_whole() {
    let store = TestStore::new();
    let (_, response) = store
        .slot("bigout")
        .call_to_completion(&capacity(), get("/"))
        .await;
    let response = response.expect("bigout");
    assert_eq!(response.body.len(), 10 << 20);
    assert!(
        response
            .body
            .iter()
            .enumerate()
            .all(|(i, &b)| b == (i % 251) as u8),
        "the body pattern is intact"
    );
}

#[tokio::test]
async fn output_over_the_cap_is_refused_as_response_too_large() {
    let store = TestStore::new();
    let limits = CallLimits {
        max_response_bytes: 1 << 20,
        ..CallLimits::default()
    };
    let cgi = store.slot_with("bigout", &SettingsOverrides::default(), limits);
    let (_, response) = cgi.call_to_completion(&capacity(), get("/?mb=2")).await;
    assert!(
        matches!(response, Err(CallError::OutputTooLarge { limit, .. }) if limit == 1 << 20),
        "{response:?}"
    );
    let component = store.slot_with("hello", &SettingsOverrides::default(), limits);
    let big = Bytes::from(vec![7u8; 3 << 20]);
    let (report, response) = component
        .call_to_completion(&capacity(), request("POST", "/", &[], big))
        .await;
    assert!(response.is_err(), "a component's streamed body is cut at the cap");
    assert_eq!(report.status(), CallStatus::Errors);
}

#[tokio::test]
async fn request_body_over_the_limit_is_refused() {
    let store = TestStore::new();
    let limits = CallLimits {
        max_request_bytes: 1000,
        ..CallLimits::default()
    };
    for name in ["echo", "hello"] {
        let slot = store.slot_with(name, &SettingsOverrides::default(), limits);
        let (_, response) = slot
            .call_to_completion(&capacity(), request("POST", "/", &[], vec![1u8; 5000]))
            .await;
        assert!(
            matches!(response, Err(CallError::BodyTooLarge { limit: 1000 })),
            "{name}: {response:?}"
        );
    }
}

#[tokio::test]
async fn escape_guest_reads_no_host_file() {
    let store = TestStore::new();
    let (_, response) = store
        .slot("escape")
        .call_to_completion(&capacity(), get("/"))
        .await;
    let body = String::from_utf8_lossy(&response.expect("escape").body).into_owned();
    assert_eq!(body.lines().count(), 6, "{body}");
    for line in body.lines() {
        assert!(line.contains(": error "), "escaped: {line}");
    }
}

#[tokio::test]
async fn env_guest_sees_only_its_settings_and_the_cgi_variables() {
    let store = TestStore::new();
    let overrides = SettingsOverrides {
        env: vec![("GREETING".into(), "hi there".into())],
        ..Default::default()
    };
    let slot = store.slot_with("env", &overrides, CallLimits::default());
    let (_, response) = slot
        .call_to_completion(&capacity(), request("GET", "/", &[("x-a", "1")], Bytes::new()))
        .await;
    let body = String::from_utf8_lossy(&response.expect("env").body).into_owned();
    assert!(body.lines().any(|l| l == "GREETING=hi there"), "{body}");
    assert!(body.lines().any(|l| l == "HTTP_X_A=1"), "{body}");
    let cgi_names = [
        "GATEWAY_INTERFACE",
        "SERVER_SOFTWARE",
        "SERVER_PROTOCOL",
        "SERVER_NAME",
        "SERVER_PORT",
        "REQUEST_METHOD",
        "SCRIPT_NAME",
        "PATH_INFO",
        "PATH_TRANSLATED",
        "X_RAW_PATH_INFO",
        "QUERY_STRING",
        "CONTENT_TYPE",
        "CONTENT_LENGTH",
        "REMOTE_ADDR",
        "X_FULL_URL",
        "FN_CALL_ID",
        "FN_FN_ID",
        "FN_DEADLINE",
        "GREETING",
    ];
    for line in body.lines() {
        let name = line.split('=').next().unwrap_or_default();
        assert!(
            cgi_names.contains(&name) || name.starts_with("HTTP_"),
            "unexpected variable from the host: {line}"
        );
    }
}

#[tokio::test]
async fn components_from_everyday_toolchains_run_unchanged() {
    let store = TestStore::new();
    // Built with the preview1 adapter: imports wasi:cli, wasi:filesystem...
    let (report, response) = store
        .slot("stdio")
        .call_to_completion(&capacity(), get("/"))
        .await;
    assert_eq!(&response.expect("stdio").body[..], b"env=0 passwd=denied\n");
    assert!(String::from_utf8_lossy(&report.log.0).contains("stdio guest called"));
    // Built against wasi:http 0.2.0.
    let (_, response) = store
        .slot("hello-020")
        .call_to_completion(&capacity(), get("/v?k=1"))
        .await;
    assert_eq!(
        &response.expect("hello-020").body[..],
        b"hello from fnrunner\npath=/v\nquery=k=1\nx-test=\n"
    );
}

#[tokio::test]
async fn a_componentize_py_guest_runs() {
    let store = TestStore::new();
    let slot = store.slot("py-hello");
    let (_, response) = slot.call_to_completion(&capacity(), get("/")).await;
    assert_eq!(&response.expect("py-hello").body[..], b"hello from python\n");
    let (_, response) = slot
        .call_to_completion(&capacity(), request("POST", "/", &[], "from the test"))
        .await;
    assert_eq!(&response.expect("py echo").body[..], b"from the test");
}

fn load_hello(store: &ModuleStore) -> LoadSource {
    let bytes = std::fs::read(fixture("hello")).expect("fixture");
    store
        .load(ModuleDigest::of(&bytes), GuestKind::Http, &bytes)
        .expect("load")
        .source
}

#[test]
fn second_load_comes_from_the_store_not_the_compiler() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = ModuleStore::open(engine(), dir.path()).expect("store");
    assert_eq!(load_hello(&first), LoadSource::Compiler);
    assert_eq!(load_hello(&first), LoadSource::Memory);
    // A new store on the same directory is what a restart sees.
    let restarted = ModuleStore::open(engine(), dir.path()).expect("store");
    assert_eq!(load_hello(&restarted), LoadSource::Store);
    assert_eq!(
        restarted
            .counters()
            .compiles
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

#[test]
fn a_corrupted_or_truncated_stored_artifact_is_discarded_and_recompiled() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = ModuleStore::open(engine(), dir.path()).expect("store");
    assert_eq!(load_hello(&store), LoadSource::Compiler);
    let bytes = std::fs::read(fixture("hello")).expect("fixture");
    let artifact = dir
        .path()
        .join(store.artifact_name(&ModuleDigest::of(&bytes), GuestKind::Http));
    let good = std::fs::read(&artifact).expect("artifact written");

    type Damage = Box<dyn Fn(&mut Vec<u8>)>;
    let damage: [(&str, Damage); 3] = [
        (
            "flipped byte",
            Box::new(|file: &mut Vec<u8>| {
                let at = file.len() / 2;
                file[at] ^= 0xff;
            }),
        ),
        (
            "truncated",
            Box::new(|file: &mut Vec<u8>| file.truncate(file.len() / 3)),
        ),
        ("empty", Box::new(|file: &mut Vec<u8>| file.clear())),
    ];
    for (what, damage) in damage {
        let mut file = good.clone();
        damage(&mut file);
        std::fs::write(&artifact, &file).expect("damage artifact");
        let restarted = ModuleStore::open(engine(), dir.path()).expect("store");
        assert_eq!(load_hello(&restarted), LoadSource::Compiler, "{what}: recompiled");
        assert_eq!(
            restarted
                .counters()
                .discarded
                .load(std::sync::atomic::Ordering::Relaxed),
            1,
            "{what}: discarded"
        );
        assert_eq!(
            std::fs::read(&artifact).expect("rewritten"),
            good,
            "{what}: rewritten whole"
        );
    }
}

#[test]
fn an_artifact_from_another_engine_configuration_is_not_used() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = ModuleStore::open(engine(), dir.path()).expect("store");
    assert_eq!(load_hello(&store), LoadSource::Compiler);
    let other_engine = fnrunner::engine::Engine::new(fnrunner::engine::EngineConfig {
        total_instances: 10,
        coredump_on_trap: true,
        max_wasm_stack: 512 << 10,
        ..Default::default()
    })
    .expect("engine");
    let other = ModuleStore::open(other_engine, dir.path()).expect("store");
    let source = load_hello(&other);
    // Either the artifact name differs (another engine key) or wasmtime
    // accepts it as compatible; never a wrong artifact.
    assert!(matches!(source, LoadSource::Compiler | LoadSource::Store));
}

fn slot_error(path: std::path::PathBuf) -> String {
    let store = TestStore::new();
    let def = FunctionDef::load(&path, &SettingsOverrides::default()).expect("definition");
    match Slot::create(
        engine(),
        &store.store,
        def,
        fnrunner::slot::SlotConfig::default(),
        std::sync::Arc::new(fnrunner::pool::NoObserver),
    ) {
        Ok(_) => panic!("{} must be refused", path.display()),
        Err(error) => {
            let text = error.to_string();
            match &error {
                SlotError::Load { .. } | SlotError::Prepare { .. } => text,
                other => panic!("unexpected error class {other:?}"),
            }
        }
    }
}

#[test]
fn bad_modules_are_refused_with_a_clear_reason() {
    let missing = slot_error(bad_fixture("unknown-import"));
    assert!(
        missing.contains("does not provide: example:kv/store@1.0.0"),
        "{missing}"
    );
    let no_handler = slot_error(bad_fixture("no-handler"));
    assert!(
        no_handler.contains("does not export `wasi:http/incoming-handler"),
        "{no_handler}"
    );
    let no_start = slot_error(bad_fixture("no-start"));
    assert!(no_start.contains("no `_start` export"), "{no_start}");

    let dir = tempfile::tempdir().expect("tempdir");
    let truncated = dir.path().join("truncated.wasm");
    let bytes = std::fs::read(fixture("hello")).expect("fixture");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).expect("write");
    let text = slot_error(truncated);
    assert!(text.contains("is not valid WebAssembly"), "{text}");

    let not_wasm = dir.path().join("text.wasm");
    std::fs::write(&not_wasm, "hello, I am text").expect("write");
    match FunctionDef::load(&not_wasm, &SettingsOverrides::default()) {
        Err(fnrunner::function::DefineError::Detect { source, .. }) => {
            assert_eq!(source, DetectError::NotWasm)
        }
        other => panic!("expected not-wasm, got {other:?}"),
    }
}
