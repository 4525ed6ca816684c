//! `fnrunner serve`: run a runner node. Every flag has an environment
//! variable and a documented default, and the whole configuration is
//! checked before any socket is bound.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::{EngineFlags, Exit, fail};
use crate::capacity::DEFAULT_MEMORY_BUDGET_MB;
use crate::coredump::{DEFAULT_MAX_DUMP_BYTES, DEFAULT_MAX_DUMPS, DumpDir};
use crate::deploy::FunctionDir;
use crate::engine::{DEFAULT_MAX_MEMORY_MB, DEFAULT_TOTAL_INSTANCES, Engine, EngineConfig};
use crate::guest::{
    CallLimits, DEFAULT_MAX_LOG_BYTES, DEFAULT_MAX_REQUEST_BYTES, DEFAULT_MAX_RESPONSE_BYTES,
};
use crate::metrics::PoolMetrics;
use crate::module_store::ModuleStore;
use crate::runner::{CallMetrics, DumpSink, LocalRunner, RunnerConfig, RunnerParts};
use crate::server::tls::{TlsAcceptor, TlsFiles};
use crate::server::{
    App, DEFAULT_H2_MAX_STREAMS, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_HEADER_BYTES, DEFAULT_MAX_MODULE_BYTES,
    MIN_MAX_HEADER_BYTES, Plane, ServerLimits,
};

/// Run a runner node serving the functions in DIR.
#[derive(clap::Args, Debug)]
pub struct ServeCommand {
    /// Directory of functions: `NAME.wasm` with an optional `NAME.toml`.
    /// Deploys are written here.
    #[arg(value_name = "DIR", env = "FNRUNNER_FUNCTIONS", default_value = ".")]
    dir: PathBuf,

    /// Address of the data plane (calls, status, health).
    #[arg(
        long,
        env = "FNRUNNER_LISTEN",
        default_value = "127.0.0.1:8080",
        value_name = "ADDR"
    )]
    listen: SocketAddr,

    /// Put the control plane (`/v1/functions`, `/metrics`) on its own
    /// address instead of the data plane's.
    #[arg(long, env = "FNRUNNER_ADMIN_LISTEN", value_name = "ADDR")]
    admin_listen: Option<SocketAddr>,

    /// Node memory budget: the sum of `memory_mb` of live instances.
    #[arg(long, env = "FNRUNNER_MEMORY_BUDGET_MB", default_value_t = DEFAULT_MEMORY_BUDGET_MB, value_name = "MIB")]
    memory_budget_mb: u64,

    /// How long a call waits for capacity before it is NACKed (503).
    #[arg(
        long,
        env = "FNRUNNER_ALLOCATE_TIMEOUT_MS",
        default_value_t = 20,
        value_name = "MS"
    )]
    allocate_timeout_ms: u64,

    /// How long in-flight calls get to finish after SIGTERM or Ctrl-C.
    #[arg(long, env = "FNRUNNER_DRAIN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    drain_timeout: Duration,

    /// After SIGTERM, keep answering NACKs at least this long (even once
    /// idle), so load balancers see the node leave before its port closes.
    #[arg(long, env = "FNRUNNER_DRAIN_LINGER", default_value = "2s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    drain_linger: Duration,

    /// Instances (pooling-allocator slots) live at once on this node.
    #[arg(long, env = "FNRUNNER_MAX_INSTANCES", default_value_t = DEFAULT_TOTAL_INSTANCES, value_name = "N")]
    max_instances: u32,

    /// Largest `memory_mb` a function on this node may have.
    #[arg(long, env = "FNRUNNER_MAX_MEMORY_MB", default_value_t = DEFAULT_MAX_MEMORY_MB, value_name = "MIB")]
    max_memory_mb: u64,

    /// Largest request body; larger calls get 413.
    #[arg(long, env = "FNRUNNER_MAX_BODY_BYTES", default_value_t = DEFAULT_MAX_REQUEST_BYTES, value_name = "BYTES")]
    max_body_bytes: usize,

    /// Largest response body a guest may produce; more is a 502.
    #[arg(long, env = "FNRUNNER_MAX_RESPONSE_BYTES", default_value_t = DEFAULT_MAX_RESPONSE_BYTES, value_name = "BYTES")]
    max_response_bytes: usize,

    /// Largest module a deploy may upload.
    #[arg(long, env = "FNRUNNER_MAX_MODULE_BYTES", default_value_t = DEFAULT_MAX_MODULE_BYTES, value_name = "BYTES")]
    max_module_bytes: usize,

    /// Time allowed to send a request's headers (slowloris guard).
    #[arg(
        long,
        env = "FNRUNNER_HEADER_READ_TIMEOUT_MS",
        default_value_t = 10_000,
        value_name = "MS"
    )]
    header_read_timeout_ms: u64,

    /// Largest request head, in bytes (at least 8192).
    #[arg(long, env = "FNRUNNER_MAX_HEADER_BYTES", default_value_t = DEFAULT_MAX_HEADER_BYTES, value_name = "BYTES")]
    max_header_bytes: usize,

    /// HTTP/2 streams open at once per connection.
    #[arg(long, env = "FNRUNNER_H2_MAX_STREAMS", default_value_t = DEFAULT_H2_MAX_STREAMS, value_name = "N")]
    h2_max_streams: u32,

    /// Close a connection with no request and no traffic for this long.
    #[arg(
        long,
        env = "FNRUNNER_IDLE_TIMEOUT_MS",
        default_value_t = 60_000,
        value_name = "MS"
    )]
    idle_timeout_ms: u64,

    /// Open connections per listener; more are closed at once.
    #[arg(long, env = "FNRUNNER_MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS, value_name = "N")]
    max_connections: usize,

    /// Run this function from DIR for `/v1/status` instead of the built-in
    /// health function.
    #[arg(long, env = "FNRUNNER_STATUS_FUNCTION", value_name = "NAME")]
    status_function: Option<String>,

    /// Write a Wasm core dump of every trapping call here.
    #[arg(long, env = "FNRUNNER_DUMP_DIR", value_name = "DIR")]
    dump_dir: Option<PathBuf>,

    /// Core dumps kept in `--dump-dir` (oldest removed first).
    #[arg(long, env = "FNRUNNER_MAX_DUMPS", default_value_t = DEFAULT_MAX_DUMPS, value_name = "N")]
    max_dumps: usize,

    /// Total bytes of core dumps kept in `--dump-dir`.
    #[arg(long, env = "FNRUNNER_MAX_DUMP_BYTES", default_value_t = DEFAULT_MAX_DUMP_BYTES, value_name = "BYTES")]
    max_dump_bytes: u64,

    /// Serve HTTPS with this certificate chain (PEM); needs `--tls-key`.
    #[arg(long, env = "FNRUNNER_TLS_CERT", value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<PathBuf>,

    /// Private key of `--tls-cert` (PEM).
    #[arg(long, env = "FNRUNNER_TLS_KEY", value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,

    /// Require client certificates signed by this CA (PEM): mTLS.
    #[arg(
        long,
        env = "FNRUNNER_TLS_CLIENT_CA",
        value_name = "PEM",
        requires = "tls_cert"
    )]
    tls_client_ca: Option<PathBuf>,

    /// What a guest fault does to the slot's other idle instances by
    /// default: `restart_one` (nothing) or `restart_all` (retire them).
    #[arg(long, env = "FNRUNNER_ESCALATION", default_value = "restart_one", value_parser = ["restart_one", "restart_all"])]
    escalation: String,

    /// Consecutive guest faults (traps, timeouts, memory-limit hits)
    /// within the window that quarantine a function; 0 never does.
    #[arg(long, env = "FNRUNNER_ESCALATE_AFTER", default_value_t = crate::pool::DEFAULT_ESCALATE_AFTER, value_name = "N")]
    escalate_after: u32,

    /// The window those faults must fall in.
    #[arg(
        long,
        env = "FNRUNNER_ESCALATE_WINDOW_MS",
        default_value_t = 60_000,
        value_name = "MS"
    )]
    escalate_window_ms: u64,

    /// First quarantine back-off before a probe call; doubled after each
    /// failed probe.
    #[arg(
        long,
        env = "FNRUNNER_QUARANTINE_BACKOFF_MS",
        default_value_t = 1_000,
        value_name = "MS"
    )]
    quarantine_backoff_ms: u64,

    /// Cap of the quarantine back-off.
    #[arg(
        long,
        env = "FNRUNNER_QUARANTINE_MAX_BACKOFF_MS",
        default_value_t = 60_000,
        value_name = "MS"
    )]
    quarantine_max_backoff_ms: u64,

    /// Log format.
    #[arg(long, env = "FNRUNNER_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,

    #[command(flatten)]
    engine: EngineFlags,
}

/// Everything checked and built before binding.
struct Plan {
    runner: Arc<LocalRunner>,
    registry: Arc<Registry>,
    limits: ServerLimits,
    tls: Option<TlsAcceptor>,
}

impl ServeCommand {
    pub fn execute(self) -> Exit {
        if let Err(message) = super::init_logging(&self.log_format) {
            return fail(Exit::Usage, message);
        }
        let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
            Ok(runtime) => runtime,
            Err(error) => return fail(Exit::Internal, format!("cannot start the async runtime: {error}")),
        };
        runtime.block_on(async {
            let plan = match self.plan() {
                Ok(plan) => plan,
                Err(message) => return fail(Exit::Usage, message),
            };
            self.run(plan).await
        })
    }

    fn check_flags(&self) -> Result<(), String> {
        let positive = [
            ("--memory-budget-mb", self.memory_budget_mb),
            ("--allocate-timeout-ms", self.allocate_timeout_ms),
            ("--max-memory-mb", self.max_memory_mb),
            ("--max-body-bytes", self.max_body_bytes as u64),
            ("--max-response-bytes", self.max_response_bytes as u64),
            ("--max-module-bytes", self.max_module_bytes as u64),
            ("--header-read-timeout-ms", self.header_read_timeout_ms),
            ("--h2-max-streams", u64::from(self.h2_max_streams)),
            ("--idle-timeout-ms", self.idle_timeout_ms),
            ("--max-connections", self.max_connections as u64),
            ("--max-instances", u64::from(self.max_instances)),
            ("--max-dumps", self.max_dumps as u64),
            ("--escalate-window-ms", self.escalate_window_ms),
            ("--quarantine-backoff-ms", self.quarantine_backoff_ms),
            ("--quarantine-max-backoff-ms", self.quarantine_max_backoff_ms),
        ];
        for (flag, value) in positive {
            if value == 0 {
                return Err(format!("{flag} must be greater than 0"));
            }
        }
        if self.max_header_bytes < MIN_MAX_HEADER_BYTES {
            return Err(format!(
                "--max-header-bytes must be at least {MIN_MAX_HEADER_BYTES}"
            ));
        }
        if self.max_memory_mb > DEFAULT_MAX_MEMORY_MB {
            return Err(format!("--max-memory-mb must be at most {DEFAULT_MAX_MEMORY_MB}"));
        }
        if self.admin_listen == Some(self.listen) && self.listen.port() != 0 {
            return Err("--admin-listen must differ from --listen".into());
        }
        Ok(())
    }

    fn plan(&self) -> Result<Plan, String> {
        self.check_flags()?;
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(
                TlsAcceptor::new(TlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                    client_ca: self.tls_client_ca.clone(),
                })
                .map_err(|e| e.to_string())?,
            ),
            _ => None,
        };
        let dir = FunctionDir::open(&self.dir)
            .map_err(|e| format!("functions directory {}: {e}", self.dir.display()))?;
        let mut functions = dir.load_all().map_err(|e| e.to_string())?;
        for def in &functions {
            if def.settings.memory_mb > self.max_memory_mb {
                return Err(format!(
                    "function `{}`: memory_mb {} exceeds --max-memory-mb {}",
                    def.name, def.settings.memory_mb, self.max_memory_mb
                ));
            }
            if def.settings.memory_mb > self.memory_budget_mb {
                return Err(format!(
                    "function `{}`: memory_mb {} exceeds --memory-budget-mb {}",
                    def.name, def.settings.memory_mb, self.memory_budget_mb
                ));
            }
        }
        let health = match &self.status_function {
            None => None,
            Some(name) => {
                let at = functions
                    .iter()
                    .position(|def| &*def.name == name)
                    .ok_or_else(|| {
                        format!(
                            "--status-function `{name}`: no such function in {}",
                            self.dir.display()
                        )
                    })?;
                Some(functions.remove(at))
            }
        };

        let engine = Engine::new(EngineConfig {
            total_instances: self.max_instances,
            max_memory_mb: self.max_memory_mb,
            coredump_on_trap: self.dump_dir.is_some(),
            ..EngineConfig::default()
        })
        .map_err(|e| e.to_string())?;
        let store = ModuleStore::open(engine.clone(), &self.engine.store_dir()).map_err(|e| e.to_string())?;

        let mut registry = Registry::default();
        let calls = CallMetrics::register(&mut registry);
        let pools = PoolMetrics::register(&mut registry);
        {
            let pools = pools.clone();
            store.on_compile(move |duration| pools.compiled(duration));
        }
        let dumps: Option<Arc<dyn DumpSink>> = match &self.dump_dir {
            None => None,
            Some(path) => Some(Arc::new(
                DumpDir::open(path, self.max_dumps, self.max_dump_bytes, &mut registry)
                    .map_err(|e| format!("--dump-dir {}: {e}", path.display()))?,
            )),
        };
        let pools = Arc::new(pools);
        let runner = LocalRunner::new(RunnerParts {
            engine,
            store: Arc::new(store),
            dir: Some(dir),
            functions,
            config: RunnerConfig {
                address: self.listen.to_string(),
                allocate_timeout: Duration::from_millis(self.allocate_timeout_ms),
                memory_budget_mb: self.memory_budget_mb,
                limits: CallLimits {
                    max_request_bytes: self.max_body_bytes,
                    max_response_bytes: self.max_response_bytes,
                    max_log_bytes: DEFAULT_MAX_LOG_BYTES,
                },
                supervision: crate::pool::Supervision {
                    policy: crate::pool::EscalationPolicy::parse(&self.escalation)
                        .unwrap_or(crate::pool::EscalationPolicy::RestartOne),
                    escalate_after: self.escalate_after,
                    window: Duration::from_millis(self.escalate_window_ms),
                    backoff: Duration::from_millis(self.quarantine_backoff_ms),
                    max_backoff: Duration::from_millis(
                        self.quarantine_max_backoff_ms.max(self.quarantine_backoff_ms),
                    ),
                },
                ..RunnerConfig::default()
            },
            metrics: calls,
            observer: pools.clone(),
            cold_starts: Some(pools),
            dumps,
            health,
        })?;
        Ok(Plan {
            runner,
            registry: Arc::new(registry),
            limits: ServerLimits {
                header_read_timeout: Duration::from_millis(self.header_read_timeout_ms),
                max_header_bytes: self.max_header_bytes,
                h2_max_streams: self.h2_max_streams,
                idle_connection_timeout: Duration::from_millis(self.idle_timeout_ms),
                max_connections: self.max_connections,
                max_module_bytes: self.max_module_bytes,
            },
            tls,
        })
    }

    async fn run(self, plan: Plan) -> Exit {
        let Plan {
            runner,
            registry,
            limits,
            tls,
        } = plan;
        let scheme = if tls.is_some() {
            http::uri::Scheme::HTTPS
        } else {
            http::uri::Scheme::HTTP
        };
        let data = match TcpListener::bind(self.listen).await {
            Ok(listener) => listener,
            Err(error) => return fail(Exit::Usage, format!("cannot listen on {}: {error}", self.listen)),
        };
        let admin = match self.admin_listen {
            None => None,
            Some(addr) => match TcpListener::bind(addr).await {
                Ok(listener) => Some(listener),
                Err(error) => return fail(Exit::Usage, format!("cannot listen on {addr}: {error}")),
            },
        };
        let app = |plane| {
            Arc::new(App {
                runner: runner.clone(),
                registry: registry.clone(),
                limits: limits.clone(),
                plane,
                scheme: scheme.clone(),
            })
        };
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut servers = Vec::new();
        let data_plane = if admin.is_some() { Plane::Data } else { Plane::Both };
        announce("listening", &data, &scheme);
        servers.push(tokio::spawn(crate::server::serve(
            data,
            app(data_plane),
            tls.clone(),
            stop_rx.clone(),
        )));
        if let Some(admin) = admin {
            announce("control plane on", &admin, &scheme);
            servers.push(tokio::spawn(crate::server::serve(
                admin,
                app(Plane::Control),
                tls.clone(),
                stop_rx.clone(),
            )));
        }
        let maintenance = runner.spawn_maintenance();
        {
            let runner = runner.clone();
            tokio::spawn(async move { runner.prewarm().await });
        }
        if let Some(tls) = tls {
            tokio::spawn(reload_on_hangup(tls));
        }

        shutdown_signal().await;
        tracing::info!(timeout = ?self.drain_timeout, "draining: new calls are NACKed");
        let drain_started = tokio::time::Instant::now();
        runner.drain();
        if runner.wait_idle(self.drain_timeout).await {
            tracing::info!("drained");
        } else {
            tracing::warn!(
                active = runner.active_calls(),
                "drain timeout passed with calls still running"
            );
        }
        tokio::time::sleep_until(drain_started + self.drain_linger).await;
        let _ = stop_tx.send(true);
        for server in servers {
            let _ = server.await;
        }
        maintenance.abort();
        Exit::Success
    }
}

/// Prints the bound address on stdout (scripts and tests read it).
fn announce(what: &str, listener: &TcpListener, scheme: &http::uri::Scheme) {
    use std::io::Write;
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "{what}");
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "fnrunner {what} {scheme}://{addr}");
        let _ = out.flush();
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}

/// Re-reads the TLS files on every SIGHUP; open connections are untouched.
async fn reload_on_hangup(tls: TlsAcceptor) {
    let Ok(mut hangup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        return;
    };
    while hangup.recv().await.is_some() {
        match tls.reload() {
            Ok(()) => tracing::info!("TLS certificates reloaded"),
            Err(error) => tracing::error!(%error, "TLS reload failed; keeping the previous certificates"),
        }
    }
}
