//! Engine-level phases of a cold start and a call, for the developers' own
//! regression checks: compile, load from the module store, prepare
//! (`InstancePre`), instantiate, and one whole call on a ready slot — for
//! the smallest CGI module and the hello component.

use std::path::PathBuf;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use fnrunner::capacity::NodeCapacity;
use fnrunner::engine::{Engine, EngineConfig};
use fnrunner::function::{FunctionDef, SettingsOverrides};
use fnrunner::guest::cgi::CgiPre;
use fnrunner::guest::http::HttpPre;
use fnrunner::guest::{CallLimits, GuestKind, GuestRequest, full_body};
use fnrunner::module_store::{Compiled, ModuleStore};
use fnrunner::pool::NoObserver;
use fnrunner::slot::Slot;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("fixtures/functions/{name}.wasm"))
}

fn get() -> GuestRequest {
    GuestRequest {
        method: http::Method::GET,
        path_and_query: "/".parse().expect("path"),
        headers: http::HeaderMap::new(),
        body: full_body(bytes::Bytes::new()),
        authority: "localhost".into(),
        scheme: http::uri::Scheme::HTTP,
        remote_addr: None,
    }
}

fn phases(c: &mut Criterion) {
    let engine = Engine::new(EngineConfig::default()).expect("engine");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let capacity = NodeCapacity::unbounded();

    for name in ["hello-min", "hello"] {
        let def = FunctionDef::load(&fixture(name), &SettingsOverrides::default()).expect("definition");
        let mut group = c.benchmark_group(name);

        group.bench_function("compile", |b| {
            b.iter_with_large_drop(|| match def.kind {
                GuestKind::Http => wasmtime::component::Component::new(engine.wasmtime(), &def.bytes)
                    .map(Compiled::Component),
                GuestKind::Cgi => wasmtime::Module::new(engine.wasmtime(), &def.bytes).map(Compiled::Module),
            })
        });

        // Write the on-disk artifact once, then load it with nothing in
        // memory each time, as a restarted node would.
        let store = ModuleStore::open(engine.clone(), dir.path()).expect("store");
        store.load(def.digest, def.kind, &def.bytes).expect("compile");
        group.bench_function("load_from_store", |b| {
            // NB: dropping the loaded module (an munmap) is not part of a
            // load; `iter_with_large_drop` keeps it out of the timing.
            b.iter_with_large_drop(|| {
                store.forget(&def.digest);
                store.load(def.digest, def.kind, &def.bytes).expect("load")
            })
        });

        let compiled = store
            .load(def.digest, def.kind, &def.bytes)
            .expect("load")
            .compiled;
        match &compiled {
            Compiled::Component(component) => {
                group.bench_function("prepare", |b| {
                    b.iter(|| HttpPre::new(&engine, component).expect("pre"))
                });
                let pre = HttpPre::new(&engine, component).expect("pre");
                group.bench_function("instantiate", |b| {
                    b.iter(|| {
                        runtime
                            .block_on(pre.instantiate(
                                &engine,
                                &def.settings,
                                &def.name,
                                CallLimits::default(),
                            ))
                            .map(drop)
                    })
                });
            }
            Compiled::Module(module) => {
                group.bench_function("prepare", |b| {
                    b.iter(|| CgiPre::new(&engine, module).expect("pre"))
                });
                let pre = CgiPre::new(&engine, module).expect("pre");
                group.bench_function("instantiate", |b| {
                    b.iter(|| runtime.block_on(pre.instantiate_idle(&engine, &def.settings, &def.name)))
                });
            }
        }

        let slot = Slot::create(
            engine.clone(),
            &store,
            def.clone(),
            fnrunner::slot::SlotConfig::default(),
            Arc::new(NoObserver),
        )
        .expect("slot");
        group.bench_function("call_fresh_instance", |b| {
            b.iter(|| {
                let (_, response) = runtime.block_on(slot.call_to_completion(&capacity, get()));
                response.expect("call")
            })
        });
        group.finish();
    }
}

criterion_group!(benches, phases);
criterion_main!(benches);
