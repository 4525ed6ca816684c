//! `fnrunner bench`: measure cold starts, in process (each phase apart) or
//! against running nodes over HTTP (the client's view, with the
//! `server-timing` split beside it).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};

use super::{EngineFlags, Exit, fail};
use crate::bench::{ModuleInfo, Phase, Report};
use crate::capacity::NodeCapacity;
use crate::client::HttpClient;
use crate::engine::{Engine, EngineConfig};
use crate::function::{FunctionDef, Settings, SettingsOverrides};
use crate::guest::cgi::CgiPre;
use crate::guest::http::HttpPre;
use crate::guest::{CallLimits, GuestKind, GuestRequest, full_body};
use crate::module_store::{Compiled, ModuleStore};
use crate::pool::NoObserver;
use crate::slot::{Slot, SlotConfig};

/// Measure cold starts: each phase in process, or over HTTP against nodes.
#[derive(clap::Args, Debug)]
pub struct BenchCommand {
    /// The module to measure (a `.wasm`; its `.toml` beside it applies).
    #[arg(value_name = "MODULE")]
    module: PathBuf,

    /// Samples per phase (compiles are fewer, see --compile-iterations).
    #[arg(long, default_value_t = 200, value_name = "N")]
    iterations: usize,

    /// Compiles to measure [default: a tenth of --iterations, at least 3].
    #[arg(long, value_name = "N")]
    compile_iterations: Option<usize>,

    /// Write the raw samples and the summary, with the machine and the
    /// settings, as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,

    /// Print the change of each phase against an earlier `--json` report.
    #[arg(long, value_name = "OLD.json")]
    compare: Option<PathBuf>,

    /// Draw each phase's latency distribution (CDF, log scale) as SVG.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,

    /// Measure over HTTP against these nodes (comma-separated base URLs)
    /// instead of in process.
    #[arg(long, value_delimiter = ',', value_name = "URL")]
    target: Vec<String>,

    /// With --target: variants of the module to deploy, under distinct names
    /// and slot hashes, spread over the nodes.
    #[arg(long, default_value_t = 10, value_name = "K")]
    functions: usize,

    /// With --target: calls in flight at once.
    #[arg(long, default_value_t = 1, value_name = "C")]
    concurrency: usize,

    #[command(flatten)]
    tls: super::ClientTlsFlags,

    #[command(flatten)]
    engine: EngineFlags,
}

impl BenchCommand {
    pub fn execute(self) -> Exit {
        if self.iterations == 0 || self.functions == 0 || self.concurrency == 0 {
            return fail(
                Exit::Usage,
                "--iterations, --functions and --concurrency must be at least 1",
            );
        }
        if self.compile_iterations == Some(0) {
            return fail(Exit::Usage, "--compile-iterations must be at least 1");
        }
        let old = match &self.compare {
            None => None,
            Some(path) => match std::fs::read(path)
                .map_err(|e| e.to_string())
                .and_then(|bytes| serde_json::from_slice::<Report>(&bytes).map_err(|e| e.to_string()))
            {
                Ok(report) => Some(report),
                Err(error) => return fail(Exit::Usage, format!("--compare {}: {error}", path.display())),
            },
        };
        let def = match FunctionDef::load(&self.module, &SettingsOverrides::default()) {
            Ok(def) => def,
            Err(error) => return fail(Exit::Usage, error),
        };
        let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(runtime) => runtime,
            Err(error) => return fail(Exit::Internal, error),
        };
        let result = if self.target.is_empty() {
            runtime.block_on(self.in_process(&def))
        } else {
            runtime.block_on(self.over_http(&def))
        };
        let report = match result {
            Ok(report) => report,
            Err((code, message)) => return fail(code, message),
        };
        print!("{}", report.table());
        if let Some(old) = &old {
            println!();
            print!("{}", report.compare(old));
        }
        if let Some(path) = &self.json {
            let written = serde_json::to_vec_pretty(&report)
                .map_err(|e| e.to_string())
                .and_then(|json| std::fs::write(path, json).map_err(|e| e.to_string()));
            if let Err(error) = written {
                return fail(Exit::Internal, format!("--json {}: {error}", path.display()));
            }
        }
        if let Some(path) = &self.plot {
            let title = format!(
                "{} — {} ({})",
                self.module
                    .file_name()
                    .map(|n| n.to_string_lossy())
                    .unwrap_or_default(),
                if self.target.is_empty() {
                    "in process"
                } else {
                    "over HTTP"
                },
                report.machine.cpu
            );
            if let Err(error) = report.plot(path, &title) {
                return fail(Exit::Internal, format!("--plot {}: {error}", path.display()));
            }
        }
        Exit::Success
    }

    fn progress(&self, total: usize) -> ProgressBar {
        if !std::io::stderr().is_terminal() {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new(total as u64);
        if let Ok(style) = ProgressStyle::with_template("{msg:>24} [{bar:40}] {pos}/{len} ({eta})") {
            bar.set_style(style.progress_chars("=> "));
        }
        bar
    }

    fn module_info(&self, def: &FunctionDef) -> ModuleInfo {
        ModuleInfo {
            path: self.module.display().to_string(),
            digest: def.digest.to_hex(),
            kind: def.kind.as_str().to_owned(),
            size: def.bytes.len(),
        }
    }

    /// Each phase of a cold start apart, in this process.
    async fn in_process(&self, def: &FunctionDef) -> Result<Report, (Exit, String)> {
        let internal = |e: &dyn std::fmt::Display| (Exit::Internal, e.to_string());
        let n = self.iterations;
        let compiles = self.compile_iterations.unwrap_or((n / 10).max(3));
        let config = EngineConfig::default();
        let engine = Engine::new(config.clone()).map_err(|e| internal(&e))?;
        let dir = tempfile::tempdir().map_err(|e| internal(&e))?;
        let store = ModuleStore::open(engine.clone(), dir.path()).map_err(|e| internal(&e))?;
        let progress = self.progress(compiles + 6 * n + 1);
        let capacity = NodeCapacity::unbounded();
        let mut phases = Vec::new();

        progress.set_message("compile");
        let mut samples = Vec::with_capacity(compiles);
        for _ in 0..compiles {
            let started = Instant::now();
            let compiled = match def.kind {
                GuestKind::Http => wasmtime::component::Component::new(engine.wasmtime(), &def.bytes)
                    .map(Compiled::Component),
                GuestKind::Cgi => wasmtime::Module::new(engine.wasmtime(), &def.bytes).map(Compiled::Module),
            };
            samples.push(started.elapsed());
            compiled.map_err(|e| (Exit::Usage, crate::guest::error_chain(&e)))?;
            progress.inc(1);
        }
        phases.push(Phase::new(
            "compile",
            "compile the module from its bytes",
            samples,
        ));

        progress.set_message("load from store");
        store
            .load(def.digest, def.kind, &def.bytes)
            .map_err(|e| (Exit::Usage, e.to_string()))?;
        let mut samples = Vec::with_capacity(n);
        let mut compiled = None;
        for _ in 0..n {
            store.forget(&def.digest);
            let started = Instant::now();
            let loaded = store
                .load(def.digest, def.kind, &def.bytes)
                .map_err(|e| internal(&e))?;
            samples.push(started.elapsed());
            compiled = Some(loaded.compiled);
            progress.inc(1);
        }
        phases.push(Phase::new(
            "load from store",
            "read, verify and map the stored artifact",
            samples,
        ));
        let compiled = compiled.ok_or_else(|| internal(&"no module loaded"))?;

        progress.set_message("prepare");
        let mut samples = Vec::with_capacity(n);
        let (mut http_pre, mut cgi_pre) = (None, None);
        for _ in 0..n {
            let started = Instant::now();
            match &compiled {
                Compiled::Component(c) => {
                    http_pre = Some(HttpPre::new(&engine, c).map_err(|e| (Exit::Usage, e.to_string()))?)
                }
                Compiled::Module(m) => {
                    cgi_pre = Some(CgiPre::new(&engine, m).map_err(|e| (Exit::Usage, e.to_string()))?)
                }
            }
            samples.push(started.elapsed());
            progress.inc(1);
        }
        phases.push(Phase::new("prepare", "instantiate_pre (+ ProxyPre)", samples));

        progress.set_message("instantiate");
        let mut samples = Vec::with_capacity(n);
        for _ in 0..n {
            let started = Instant::now();
            let made = match (&http_pre, &cgi_pre) {
                (Some(pre), _) => pre
                    .instantiate(&engine, &def.settings, &def.name, CallLimits::default())
                    .await
                    .map(|instance| {
                        let elapsed = started.elapsed();
                        drop(instance);
                        elapsed
                    }),
                (None, Some(pre)) => pre
                    .instantiate_idle(&engine, &def.settings, &def.name)
                    .await
                    .map(|()| started.elapsed()),
                (None, None) => return Err(internal(&"not prepared")),
            };
            samples.push(made.map_err(|e| (Exit::Usage, e.to_string()))?);
            progress.inc(1);
        }
        phases.push(Phase::new(
            "instantiate",
            "a new instance (store, WASI context, instance)",
            samples,
        ));

        progress.set_message("new slot, first call");
        let mut samples = Vec::with_capacity(n);
        for _ in 0..n {
            store.forget(&def.digest);
            let started = Instant::now();
            let slot = Slot::create(
                engine.clone(),
                &store,
                def.clone(),
                SlotConfig::default(),
                Arc::new(NoObserver),
            )
            .map_err(|e| (Exit::Usage, e.to_string()))?;
            let (_, response) = slot.call_to_completion(&capacity, get()).await;
            samples.push(started.elapsed());
            response.map_err(|e| (Exit::Usage, e.to_string()))?;
            progress.inc(1);
        }
        phases.push(Phase::new(
            "new slot, first call",
            "load from store, prepare, instantiate, call: a never-called function",
            samples,
        ));

        progress.set_message("first call");
        let fresh = Slot::create(
            engine.clone(),
            &store,
            with_max_jobs(def, 1),
            SlotConfig::default(),
            Arc::new(NoObserver),
        )
        .map_err(|e| (Exit::Usage, e.to_string()))?;
        let mut samples = Vec::with_capacity(n);
        for _ in 0..n {
            let started = Instant::now();
            let (_, response) = fresh.call_to_completion(&capacity, get()).await;
            samples.push(started.elapsed());
            response.map_err(|e| (Exit::Usage, e.to_string()))?;
            progress.inc(1);
        }
        phases.push(Phase::new(
            "first call",
            "a call on a ready slot with a fresh instance (instantiate + run)",
            samples,
        ));

        progress.set_message("warm call");
        let jobs = if def.kind == GuestKind::Http {
            n as u32 + 1
        } else {
            1
        };
        let warm = Slot::create(
            engine.clone(),
            &store,
            with_max_jobs(def, jobs),
            SlotConfig::default(),
            Arc::new(NoObserver),
        )
        .map_err(|e| (Exit::Usage, e.to_string()))?;
        let (_, first) = warm.call_to_completion(&capacity, get()).await;
        first.map_err(|e| (Exit::Usage, e.to_string()))?;
        progress.inc(1);
        let mut samples = Vec::with_capacity(n);
        for _ in 0..n {
            let started = Instant::now();
            let (_, response) = warm.call_to_completion(&capacity, get()).await;
            samples.push(started.elapsed());
            response.map_err(|e| (Exit::Usage, e.to_string()))?;
            progress.inc(1);
        }
        phases.push(Phase::new(
            "warm call",
            "a call on an instance that served before (CGI modules: a fresh one, they cannot be reused)",
            samples,
        ));
        progress.finish_and_clear();

        let settings = serde_json::json!({
            "iterations": n,
            "compile_iterations": compiles,
            "engine": {
                "total_instances": config.total_instances,
                "max_memory_mb": config.max_memory_mb,
                "max_wasm_stack": config.max_wasm_stack,
                "epoch_tick_us": config.epoch_tick.as_micros() as u64,
                "pooling_allocator": true,
                "memory_init_cow": true,
            },
            "function": def.settings.to_table().ok(),
        });
        Ok(Report::new("in-process", self.module_info(def), settings, phases))
    }

    /// Over HTTP: deploy K variants, time each one's first call (cold) and
    /// the following ones (warm) from the client, with the node's
    /// `server-timing` split beside them; remove the variants at the end.
    async fn over_http(&self, def: &FunctionDef) -> Result<Report, (Exit, String)> {
        let client = HttpClient::new(self.tls.config().map_err(|e| (Exit::Usage, e))?)
            .map_err(|e| (Exit::Usage, e.to_string()))?;
        let targets: Vec<String> = self
            .target
            .iter()
            .map(|t| t.trim_end_matches('/').to_owned())
            .collect();
        for target in &targets {
            if !(target.starts_with("http://") || target.starts_with("https://")) {
                return Err((
                    Exit::Usage,
                    format!("--target `{target}`: use http:// or https://"),
                ));
            }
        }
        let digest = def.digest.to_hex();
        let functions: Vec<(String, String)> = (0..self.functions)
            .map(|k| {
                (
                    targets[k % targets.len()].clone(),
                    format!("bench-{}-{k}", &digest[..12]),
                )
            })
            .collect();
        let total = self.functions * (self.iterations + 2);
        let progress = self.progress(total);

        progress.set_message("deploy");
        let mut deployed = Vec::new();
        let mut outcome = async {
            for (k, (target, name)) in functions.iter().enumerate() {
                // NB: a variant differs in its env, so each has its own
                // slot hash, as distinct functions would.
                let mut settings = (*def.settings).clone();
                settings
                    .env
                    .insert("FNRUNNER_BENCH_VARIANT".into(), k.to_string());
                client
                    .deploy(target, name, def.bytes.clone(), &settings.to_toml())
                    .await
                    .map_err(|e| (Exit::Internal, format!("deploying {name} to {target}: {e}")))?;
                deployed.push((target.clone(), name.clone()));
                progress.inc(1);
            }
            progress.set_message("cold calls");
            let cold = self.timed_calls(&client, &functions, 1, &progress).await?;
            progress.set_message("warm calls");
            let warm = self
                .timed_calls(&client, &functions, self.iterations, &progress)
                .await?;
            Ok::<_, (Exit, String)>((cold, warm))
        }
        .await;
        progress.set_message("remove");
        for (target, name) in &deployed {
            if let Err(error) = client.remove(target, name).await
                && outcome.is_ok()
            {
                outcome = Err((Exit::Internal, format!("removing {name} from {target}: {error}")));
            }
            progress.inc(1);
        }
        progress.finish_and_clear();
        let (cold, warm) = outcome?;
        let phases = vec![
            Phase::new(
                "cold call (client)",
                "first call of a just-deployed function, end to end",
                cold.client,
            ),
            Phase::new(
                "cold: server sched",
                "server-timing sched of the cold calls",
                cold.sched,
            ),
            Phase::new(
                "cold: server exec",
                "server-timing exec of the cold calls",
                cold.exec,
            ),
            Phase::new("warm call (client)", "following calls, end to end", warm.client),
            Phase::new(
                "warm: server sched",
                "server-timing sched of the warm calls",
                warm.sched,
            ),
            Phase::new(
                "warm: server exec",
                "server-timing exec of the warm calls",
                warm.exec,
            ),
        ];
        let settings = serde_json::json!({
            "targets": targets,
            "functions": self.functions,
            "iterations": self.iterations,
            "concurrency": self.concurrency,
            "function": def.settings.to_table().ok(),
        });
        Ok(Report::new("http", self.module_info(def), settings, phases))
    }

    /// `calls` calls of every function, `--concurrency` at a time.
    async fn timed_calls(
        &self,
        client: &HttpClient,
        functions: &[(String, String)],
        calls: usize,
        progress: &ProgressBar,
    ) -> Result<Timings, (Exit, String)> {
        let jobs = functions
            .iter()
            .flat_map(|(target, name)| std::iter::repeat_n(format!("{target}/fn/{name}/"), calls));
        let mut results = futures::stream::iter(jobs)
            .map(|url| async move {
                let started = Instant::now();
                let answer = client.get(&url).await;
                (started.elapsed(), answer, url)
            })
            .buffer_unordered(self.concurrency);
        let mut timings = Timings::default();
        while let Some((elapsed, answer, url)) = results.next().await {
            let answer = answer.map_err(|e| (Exit::Internal, format!("GET {url}: {e}")))?;
            if !answer.status.is_success() {
                return Err((Exit::Internal, format!("GET {url}: {}", answer.status)));
            }
            timings.client.push(elapsed);
            if let Some((sched, exec)) = answer.server_timing {
                timings.sched.push(sched);
                timings.exec.push(exec);
            }
            progress.inc(1);
        }
        Ok(timings)
    }
}

#[derive(Default)]
struct Timings {
    client: Vec<Duration>,
    sched: Vec<Duration>,
    exec: Vec<Duration>,
}

fn with_max_jobs(def: &FunctionDef, max_jobs: u32) -> FunctionDef {
    let mut settings: Settings = (*def.settings).clone();
    settings.pool.max_jobs = max_jobs;
    FunctionDef {
        settings: Arc::new(settings),
        ..def.clone()
    }
}

fn get() -> GuestRequest {
    GuestRequest {
        method: http::Method::GET,
        path_and_query: http::uri::PathAndQuery::from_static("/"),
        headers: http::HeaderMap::new(),
        body: full_body(Bytes::new()),
        authority: "localhost".into(),
        scheme: http::uri::Scheme::HTTP,
        remote_addr: None,
    }
}
