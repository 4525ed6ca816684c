//! Helpers shared by the integration tests: fixture paths, one engine per
//! test process, slots from fixtures, and running the real binary.
#![allow(dead_code)]

pub mod fleet;
pub mod node;
pub mod tls;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use fnrunner::capacity::NodeCapacity;
use fnrunner::engine::{Engine, EngineConfig};
use fnrunner::function::{FunctionDef, SettingsOverrides};
use fnrunner::guest::{CallLimits, GuestRequest, full_body};
use fnrunner::module_store::ModuleStore;
use fnrunner::pool::NoObserver;
use fnrunner::slot::Slot;

pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `fixtures/functions/NAME.wasm`.
pub fn fixture(name: &str) -> PathBuf {
    repo().join("fixtures/functions").join(format!("{name}.wasm"))
}

/// `fixtures/bad/NAME.wasm`.
pub fn bad_fixture(name: &str) -> PathBuf {
    repo().join("fixtures/bad").join(format!("{name}.wasm"))
}

/// One engine for the whole test process: engines reserve address space
/// for their instance pool, so tests share one of modest size.
pub fn engine() -> Arc<Engine> {
    static ENGINE: OnceLock<Arc<Engine>> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            Engine::new(EngineConfig {
                total_instances: 200,
                ..EngineConfig::default()
            })
            .expect("engine")
        })
        .clone()
}

/// A module store in a fresh temporary directory.
pub struct TestStore {
    pub store: Arc<ModuleStore>,
    pub dir: tempfile::TempDir,
}

impl TestStore {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(ModuleStore::open(engine(), dir.path()).expect("store"));
        Self { store, dir }
    }

    pub fn slot(&self, name: &str) -> Arc<Slot> {
        self.slot_with(name, &SettingsOverrides::default(), CallLimits::default())
    }

    pub fn slot_with(&self, name: &str, overrides: &SettingsOverrides, limits: CallLimits) -> Arc<Slot> {
        let def = FunctionDef::load(&fixture(name), overrides).expect("function definition");
        Slot::create(
            engine(),
            &self.store,
            def,
            fnrunner::slot::SlotConfig {
                limits,
                ..Default::default()
            },
            Arc::new(NoObserver),
        )
        .expect("slot")
    }
}

pub fn capacity() -> NodeCapacity {
    NodeCapacity::unbounded()
}

/// A request as a client would send it to `/fn/NAME{path}`.
pub fn request(method: &str, path: &str, headers: &[(&str, &str)], body: impl Into<Bytes>) -> GuestRequest {
    let body: Bytes = body.into();
    let mut map = http::HeaderMap::new();
    for (name, value) in headers {
        map.append(
            http::HeaderName::from_bytes(name.as_bytes()).expect("name"),
            http::HeaderValue::from_str(value).expect("value"),
        );
    }
    if !body.is_empty() {
        map.insert(http::header::CONTENT_LENGTH, body.len().into());
    }
    GuestRequest {
        method: method.parse().expect("method"),
        path_and_query: path.parse().expect("path"),
        headers: map,
        body: full_body(body),
        authority: "localhost:8080".into(),
        scheme: http::uri::Scheme::HTTP,
        remote_addr: None,
    }
}

pub fn get(path: &str) -> GuestRequest {
    request("GET", path, &[], Bytes::new())
}

/// The `fnrunner` binary built for these tests.
pub fn fnrunner() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fnrunner"))
}

/// Runs `fnrunner invoke ARGS…` with its own module store directory.
pub fn invoke(store: &Path, args: &[&str]) -> Output {
    fnrunner()
        .arg("invoke")
        .arg("--store-dir")
        .arg(store)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run fnrunner invoke")
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}
