//! The runner: `LocalRunner`, which owns the functions, the slots keyed by
//! function and SlotHashId, the node's capacity, draining, and the call
//! metrics. It implements Fn's `Runner` contract (`placer::Runner`) for the
//! placer.
//!
//! # Admission (TryExec)
//!
//! A call is committed or NACKed before its body is read. It is NACKed when
//! the node is draining, or when within `allocate_timeout` its slot has no
//! room under `max_concurrency` and the node has no capacity for another
//! instance (pooling-allocator slots and the memory budget) even after idle
//! instances of other functions are evicted. Everything else is committed
//! and counted in `requests_handled`.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde::Serialize;

use crate::call::{Call, CallId, CallOptions, CallReport, CallStatus};
use crate::capacity::NodeCapacity;
use crate::deploy::FunctionDir;
use crate::engine::Engine;
use crate::function::{FunctionDef, Settings, SlotHashId};
use crate::guest::{CallError, CallLimits, GuestRequest, GuestResponse, full_body};
use crate::module_store::ModuleStore;
use crate::pool::{PoolObserver, PoolStatsSnapshot};
use crate::slot::{Refusal, Slot, SlotConfig, SlotError};

/// How long admission waits for capacity before a NACK (roadrunner's
/// AllocateTimeout). Small: an LB retrying another node beats a queue.
pub const DEFAULT_ALLOCATE_TIMEOUT: Duration = Duration::from_millis(20);
/// How long a status result is served from cache.
pub const DEFAULT_STATUS_TTL: Duration = Duration::from_millis(1500);
/// Timeout of the built-in health function.
pub const STATUS_CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Period of the background pool work (idle reaping, prewarming, dropping
/// unused slots).
pub const MAINTENANCE_PERIOD: Duration = Duration::from_millis(50);

/// One call for `LocalRunner::try_exec`: the function, the request (its
/// body still unread), and its metadata.
pub struct RunnerCall {
    pub function: String,
    pub request: GuestRequest,
    pub options: CallOptions,
    /// When the call arrived (for latency accounting).
    pub created: Instant,
}

/// The answer of `try_exec`.
pub enum TryExec {
    /// The call was taken; this is its outcome.
    Committed(Committed),
    /// Not taken; try another runner.
    Nack {
        reason: NackReason,
        /// How long the caller should wait before retrying here.
        retry_after: Duration,
        call: Box<RunnerCall>,
    },
}

/// `retry-after` of a NACK unless it says otherwise.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NackReason {
    /// No capacity within the allocate timeout.
    Busy,
    /// The node is draining.
    Draining,
    /// The function is quarantined on this node after repeated faults.
    Quarantined,
}

impl NackReason {
    pub fn as_str(self) -> &'static str {
        match self {
            NackReason::Busy => "busy",
            NackReason::Draining => "draining",
            NackReason::Quarantined => "quarantined",
        }
    }
}

/// A committed call's result, with what the response headers report.
pub struct Committed {
    pub call_id: CallId,
    /// `None` when the function does not exist.
    pub slot_hash: Option<SlotHashId>,
    pub result: Result<Answer, CallFailure>,
}

/// What a committed call answers.
pub enum Answer {
    /// The guest's response (its body may still be streaming).
    Response {
        response: GuestResponse,
        /// Time in the runner before the response head (`sched`).
        scheduler_time: Duration,
        /// Time in the guest before the response head (`exec`).
        execution_time: Duration,
    },
    /// A detached call was admitted and runs in the background.
    Accepted,
}

#[derive(Debug)]
pub enum CallFailure {
    /// No function of that name.
    NotFound(String),
    /// The call failed (the error names the function and the phase).
    Failed(CallError),
}

/// Fn's RunnerStatus, field for field, as JSON.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct RunnerStatus {
    pub active_request_count: i64,
    pub requests_received: u64,
    pub requests_handled: u64,
    pub kdumps_on_disk: u64,
    pub failed: bool,
    pub cached: bool,
    pub id: String,
    /// Per-function pool statistics.
    pub details: BTreeMap<String, FunctionDetails>,
    pub error_code: i32,
    pub error_str: String,
    pub created_at: String,
    pub started_at: String,
    pub completed_at: String,
    /// Nanoseconds the status call spent in the runner.
    pub scheduler_duration: u64,
    /// Nanoseconds the status call spent in the health function.
    pub execution_duration: u64,
}

/// A function's entry in `details`.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct FunctionDetails {
    pub slot_hash: String,
    /// Present once the slot exists (after the first call or a prewarm).
    pub pool: Option<PoolStatsSnapshot>,
}

/// Node-level settings of the runner.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    pub address: String,
    pub allocate_timeout: Duration,
    pub memory_budget_mb: u64,
    pub limits: CallLimits,
    pub status_ttl: Duration,
    /// Supervision defaults for every function (settings override them).
    pub supervision: crate::pool::Supervision,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            address: "local".into(),
            allocate_timeout: DEFAULT_ALLOCATE_TIMEOUT,
            memory_budget_mb: crate::capacity::DEFAULT_MEMORY_BUDGET_MB,
            limits: CallLimits::default(),
            status_ttl: DEFAULT_STATUS_TTL,
            supervision: crate::pool::Supervision::default(),
        }
    }
}

/// The call-level metric families (the runner owns them).
#[derive(Clone)]
pub struct CallMetrics {
    received: Counter,
    handled: Counter,
    nacked: Family<NackLabels, Counter>,
    active: Gauge,
    scheduler_latency: Family<StatusLabels, Histogram>,
    user_execution: Histogram,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    call_status: CallStatusLabel,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
enum CallStatusLabel {
    completed,
    canceled,
    timeouts,
    errors,
    server_busy,
}

impl From<CallStatus> for CallStatusLabel {
    fn from(status: CallStatus) -> Self {
        match status {
            CallStatus::Completed => CallStatusLabel::completed,
            CallStatus::Canceled => CallStatusLabel::canceled,
            CallStatus::Timeouts => CallStatusLabel::timeouts,
            CallStatus::Errors => CallStatusLabel::errors,
            CallStatus::ServerBusy => CallStatusLabel::server_busy,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NackLabels {
    reason: NackLabel,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
enum NackLabel {
    busy,
    draining,
    quarantined,
}

/// Latency buckets from 10 µs to about 40 s.
pub fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.000_01, 2.0, 23)
}

impl CallMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            received: Counter::default(),
            handled: Counter::default(),
            nacked: Family::default(),
            active: Gauge::default(),
            scheduler_latency: Family::new_with_constructor(|| Histogram::new(latency_buckets())),
            user_execution: Histogram::new(latency_buckets()),
        };
        registry.register(
            "fnrunner_calls_received",
            "Calls received (NACKed or not)",
            metrics.received.clone(),
        );
        registry.register(
            "fnrunner_calls_handled",
            "Calls committed (not NACKed)",
            metrics.handled.clone(),
        );
        registry.register(
            "fnrunner_calls_nacked",
            "Calls refused with a 503 NACK, by reason",
            metrics.nacked.clone(),
        );
        registry.register(
            "fnrunner_calls_active",
            "Calls committed and not yet finished",
            metrics.active.clone(),
        );
        registry.register_with_unit(
            "fnrunner_call_scheduler_latency",
            "Call latency minus user execution time (clamped at 0), by call status",
            prometheus_client::registry::Unit::Seconds,
            metrics.scheduler_latency.clone(),
        );
        registry.register_with_unit(
            "fnrunner_call_user_execution",
            "Wall time spent inside guest code per call",
            prometheus_client::registry::Unit::Seconds,
            metrics.user_execution.clone(),
        );
        metrics
    }

    fn observe(&self, report: &CallReport) {
        self.scheduler_latency
            .get_or_create(&StatusLabels {
                call_status: report.status().into(),
            })
            .observe(report.scheduler_time().as_secs_f64());
        if report.started_at.is_some() {
            self.user_execution
                .observe(report.user_execution_time.as_secs_f64());
        }
    }

    fn nack(&self, reason: NackReason, waited: Duration) {
        let label = match reason {
            NackReason::Busy => NackLabel::busy,
            NackReason::Draining => NackLabel::draining,
            NackReason::Quarantined => NackLabel::quarantined,
        };
        self.nacked.get_or_create(&NackLabels { reason: label }).inc();
        // A NACK is a call that spent all its time in the scheduler.
        self.scheduler_latency
            .get_or_create(&StatusLabels {
                call_status: CallStatusLabel::server_busy,
            })
            .observe(waited.as_secs_f64());
    }
}

/// Counters behind RunnerStatus.
#[derive(Default)]
struct Counters {
    received: AtomicU64,
    handled: AtomicU64,
    active: AtomicI64,
}

/// Where core dumps go (set by the observability wiring).
pub trait DumpSink: Send + Sync {
    /// Stores a core dump of a trapping call.
    fn write(&self, call_id: &str, function: &str, dump: &[u8]);
    /// Dumps on disk now.
    fn count(&self) -> u64;
}

/// A deployed function, and its slot once made.
struct FunctionEntry {
    def: FunctionDef,
}

/// A slot being made or made. Concurrent first calls share one cold start.
type SlotCell = Arc<tokio::sync::OnceCell<Arc<Slot>>>;

/// A slot belongs to one function: two functions with the same bytes and
/// instance settings still get a pool each, with their own pool settings.
/// (The compiled module is shared through the module store.)
type SlotKey = (Arc<str>, SlotHashId);

fn slot_key(def: &FunctionDef) -> SlotKey {
    (def.name.clone(), def.slot_hash.clone())
}

pub struct LocalRunner {
    engine: Arc<Engine>,
    store: Arc<ModuleStore>,
    dir: Option<FunctionDir>,
    functions: RwLock<BTreeMap<Arc<str>, FunctionEntry>>,
    slots: Mutex<HashMap<SlotKey, SlotCell>>,
    capacity: NodeCapacity,
    config: RunnerConfig,
    counters: Counters,
    draining: AtomicBool,
    idle: tokio::sync::Notify,
    metrics: CallMetrics,
    observer: Arc<dyn PoolObserver>,
    cold_starts: Option<Arc<dyn ColdStartObserver>>,
    dumps: Option<Arc<dyn DumpSink>>,
    status: StatusCache,
    health: FunctionDef,
}

/// Told about every slot made (a cold start), for the metrics.
pub trait ColdStartObserver: Send + Sync {
    fn cold_start(&self, function: &str, slot: &Slot);
}

/// The built-in health function: a CGI module answering `ok`.
const HEALTH_WAT: &str = r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "content-type: text/plain\n\nok\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 29))
    (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"#;

/// Name of the built-in health function (not a deployable name).
pub const HEALTH_FUNCTION: &str = "status";

/// Everything a `LocalRunner` is built from.
pub struct RunnerParts {
    pub engine: Arc<Engine>,
    pub store: Arc<ModuleStore>,
    pub dir: Option<FunctionDir>,
    pub functions: Vec<FunctionDef>,
    pub config: RunnerConfig,
    pub metrics: CallMetrics,
    pub observer: Arc<dyn PoolObserver>,
    pub cold_starts: Option<Arc<dyn ColdStartObserver>>,
    pub dumps: Option<Arc<dyn DumpSink>>,
    /// A function to run for status instead of the built-in one.
    pub health: Option<FunctionDef>,
}

impl LocalRunner {
    pub fn new(parts: RunnerParts) -> Result<Arc<Self>, String> {
        let health = match parts.health {
            Some(def) => def,
            None => {
                let bytes =
                    wat::parse_str(HEALTH_WAT).map_err(|e| format!("built-in health function: {e}"))?;
                FunctionDef::new(
                    HEALTH_FUNCTION,
                    bytes.into(),
                    Settings::default(),
                    "built-in health function",
                )
                .map_err(|e| e.to_string())?
            }
        };
        let capacity = NodeCapacity::new(
            parts.engine.config().total_instances,
            parts.config.memory_budget_mb,
        );
        let functions = parts
            .functions
            .into_iter()
            .map(|def| (def.name.clone(), FunctionEntry { def }))
            .collect();
        Ok(Arc::new(Self {
            engine: parts.engine,
            store: parts.store,
            dir: parts.dir,
            functions: RwLock::new(functions),
            slots: Mutex::new(HashMap::new()),
            capacity,
            status: StatusCache::new(parts.config.status_ttl),
            config: parts.config,
            counters: Counters::default(),
            draining: AtomicBool::new(false),
            idle: tokio::sync::Notify::new(),
            metrics: parts.metrics,
            observer: parts.observer,
            cold_starts: parts.cold_starts,
            dumps: parts.dumps,
            health,
        }))
    }

    pub fn config(&self) -> &RunnerConfig {
        &self.config
    }

    pub fn capacity(&self) -> &NodeCapacity {
        &self.capacity
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn active_calls(&self) -> i64 {
        self.counters.active.load(Ordering::Acquire)
    }

    /// TryExec: commit to the call or NACK it before its body is read.
    pub async fn try_exec(self: &Arc<Self>, call: RunnerCall) -> TryExec {
        self.counters.received.fetch_add(1, Ordering::Relaxed);
        self.metrics.received.inc();
        if self.is_draining() {
            return self.nack(NackReason::Draining, DEFAULT_RETRY_AFTER, call);
        }
        let call_id = call.options.call_id.clone().unwrap_or_default();
        let Some(def) = self.function(&call.function) else {
            self.count_handled();
            return TryExec::Committed(Committed {
                call_id,
                slot_hash: None,
                result: Err(CallFailure::NotFound(call.function)),
            });
        };
        let slot = match self.slot(&def).await {
            Ok(slot) => slot,
            Err(error) => {
                self.count_handled();
                tracing::error!(function = %def.name, %error, "cannot make the function's slot");
                return TryExec::Committed(Committed {
                    call_id,
                    slot_hash: Some(def.slot_hash.clone()),
                    result: Err(CallFailure::Failed(CallError::internal(
                        &def.name,
                        "preparing the function",
                        error,
                    ))),
                });
            }
        };
        let admission = match self.admit(&slot, call.created).await {
            Ok(admission) => admission,
            Err(Refusal::Closed) => {
                // NB: redeployed between lookup and admission: the new slot
                // takes the call (once; a second race NACKs).
                match self.function(&call.function) {
                    Some(def) => match self.slot(&def).await {
                        Ok(slot) => match self.admit(&slot, call.created).await {
                            Ok(admission) => return self.commit(slot, admission, call, call_id).await,
                            Err(refusal) => return self.refuse(refusal, call),
                        },
                        Err(_) => return self.nack(NackReason::Busy, DEFAULT_RETRY_AFTER, call),
                    },
                    None => return self.nack(NackReason::Busy, DEFAULT_RETRY_AFTER, call),
                }
            }
            Err(refusal) => return self.refuse(refusal, call),
        };
        self.commit(slot, admission, call, call_id).await
    }

    async fn commit(
        self: &Arc<Self>,
        slot: Arc<Slot>,
        admission: crate::slot::Admission,
        call: RunnerCall,
        call_id: CallId,
    ) -> TryExec {
        self.count_handled();
        self.counters.active.fetch_add(1, Ordering::AcqRel);
        self.metrics.active.inc();
        let def = slot.def();
        let timeout = match call.options.timeout {
            Some(asked) => asked.min(def.settings.timeout()),
            None => def.settings.timeout(),
        };
        let slot_hash = Some(def.slot_hash.clone());
        let runner = self.clone();
        let record = Call::new(
            call_id.clone(),
            call.function.as_str().into(),
            def.slot_hash.clone(),
            call.created,
            call.created + timeout,
            move |report| runner.finished(report),
        );
        let span = record.span().clone();
        if call.options.detached {
            let execution = async move {
                // Detached: nobody reads the response, so drain it here for
                // the guest to finish; the outcome is in the call's report.
                if let Ok(response) = slot.execute(admission, call.request, record).await {
                    use http_body_util::BodyExt;
                    let mut body = response.body;
                    while let Some(Ok(_)) = body.frame().await {}
                }
            };
            tokio::spawn(tracing::Instrument::instrument(execution, span));
            return TryExec::Committed(Committed {
                call_id,
                slot_hash,
                result: Ok(Answer::Accepted),
            });
        }
        let execution = slot.execute(admission, call.request, record);
        let result = match tracing::Instrument::instrument(execution, span).await {
            Ok(response) => {
                let execution_time = response.user_time;
                Ok(Answer::Response {
                    response,
                    scheduler_time: call.created.elapsed().saturating_sub(execution_time),
                    execution_time,
                })
            }
            Err(error) => Err(CallFailure::Failed(error)),
        };
        TryExec::Committed(Committed {
            call_id,
            slot_hash,
            result,
        })
    }

    fn count_handled(&self) {
        self.counters.handled.fetch_add(1, Ordering::Relaxed);
        self.metrics.handled.inc();
    }

    fn refuse(&self, refusal: Refusal, call: RunnerCall) -> TryExec {
        tracing::debug!(function = %call.function, reason = refusal.describe(), "NACK");
        match refusal {
            Refusal::Quarantined { retry_after } => self.nack(NackReason::Quarantined, retry_after, call),
            _ => self.nack(NackReason::Busy, DEFAULT_RETRY_AFTER, call),
        }
    }

    fn nack(&self, reason: NackReason, retry_after: Duration, call: RunnerCall) -> TryExec {
        self.metrics.nack(reason, call.created.elapsed());
        TryExec::Nack {
            reason,
            retry_after,
            call: Box::new(call),
        }
    }

    /// A call's report: metrics, logs, core dumps, and the active count.
    fn finished(&self, report: CallReport) {
        self.metrics.observe(&report);
        self.metrics.active.dec();
        if let (Some(dumps), Some(dump)) = (&self.dumps, &report.coredump) {
            dumps.write(report.id.as_str(), &report.function, dump);
        }
        log_report(&report);
        if self.counters.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle.notify_waiters();
        }
    }

    async fn admit(&self, slot: &Arc<Slot>, created: Instant) -> Result<crate::slot::Admission, Refusal> {
        let memory_mb = slot.def().settings.memory_mb;
        if self.capacity.try_acquire(memory_mb).is_err() {
            self.evict_idle(slot, memory_mb);
        }
        let waited = created.elapsed();
        let within = self.config.allocate_timeout.saturating_sub(waited);
        slot.admit(&self.capacity, within).await
    }

    /// Frees node capacity held by idle instances of other slots, oldest
    /// first, until an instance of `memory_mb` fits.
    fn evict_idle(&self, except: &Arc<Slot>, memory_mb: u64) {
        let slots: Vec<Arc<Slot>> = crate::lock(&self.slots)
            .values()
            .filter_map(|cell| cell.get().cloned())
            .filter(|slot| !Arc::ptr_eq(slot, except))
            .collect();
        for slot in slots {
            while self.capacity.try_acquire(memory_mb).is_err() {
                if slot.evict(1) == 0 {
                    break;
                }
            }
        }
    }

    fn function(&self, name: &str) -> Option<FunctionDef> {
        read(&self.functions).get(name).map(|entry| entry.def.clone())
    }

    /// The slot for `def`, made on first use (a cold start: the module from
    /// memory, the store, or the compiler, then `InstancePre`).
    async fn slot(&self, def: &FunctionDef) -> Result<Arc<Slot>, SlotError> {
        let cell = crate::lock(&self.slots).entry(slot_key(def)).or_default().clone();
        let slot = cell
            .get_or_try_init(|| async {
                let (engine, store, def, observer) = (
                    self.engine.clone(),
                    self.store.clone(),
                    def.clone(),
                    self.observer.clone(),
                );
                let config = SlotConfig {
                    limits: self.config.limits,
                    supervision: self.config.supervision,
                };
                let name = def.name.clone();
                let slot =
                    tokio::task::spawn_blocking(move || Slot::create(engine, &store, def, config, observer))
                        .await
                        .unwrap_or_else(|join| {
                            Err(SlotError::Load {
                                function: join.to_string(),
                                source: crate::module_store::StoreError::Compile {
                                    digest: String::new(),
                                    message: "the compile task panicked".into(),
                                },
                            })
                        })?;
                if let Some(observer) = &self.cold_starts {
                    observer.cold_start(&name, &slot);
                }
                tracing::info!(
                    function = %name,
                    slot = slot.def().slot_hash.short(),
                    source = slot.cold_start().source.as_str(),
                    load_us = slot.cold_start().load_time.as_micros() as u64,
                    prepare_us = slot.cold_start().prepare_time.as_micros() as u64,
                    "slot ready"
                );
                Ok(slot)
            })
            .await?;
        Ok(slot.clone())
    }

    /// Makes the slots of functions with `min_warm > 0` and fills their
    /// pools (at start-up and after a deploy).
    pub async fn prewarm(&self) {
        let defs: Vec<FunctionDef> = read(&self.functions)
            .values()
            .map(|entry| entry.def.clone())
            .filter(|def| def.settings.pool.min_warm > 0)
            .collect();
        for def in defs {
            match self.slot(&def).await {
                Ok(slot) => {
                    slot.prewarm(&self.capacity).await;
                }
                Err(error) => tracing::warn!(function = %def.name, %error, "cannot prewarm"),
            }
        }
    }

    /// Background pool work, once: reap idle instances, refill `min_warm`,
    /// drop slots nothing uses.
    pub async fn maintain(&self) {
        let now = Instant::now();
        let mut live: std::collections::HashSet<SlotKey> =
            read(&self.functions).values().map(|e| slot_key(&e.def)).collect();
        live.insert(slot_key(&self.health));
        let slots: Vec<(SlotKey, Arc<Slot>)> = crate::lock(&self.slots)
            .iter()
            .filter_map(|(key, cell)| cell.get().map(|slot| (key.clone(), slot.clone())))
            .collect();
        for (key, slot) in slots {
            slot.reap(now);
            let deployed = live.contains(&key);
            if !deployed || slot.is_unused(now) {
                if !deployed {
                    slot.close();
                }
                let mut map = crate::lock(&self.slots);
                if map
                    .get(&key)
                    .and_then(|cell| cell.get())
                    .is_some_and(|s| Arc::ptr_eq(s, &slot))
                    && (!deployed || slot.is_unused(now))
                {
                    map.remove(&key);
                }
                continue;
            }
            if slot.pool_settings().min_warm > 0 {
                slot.prewarm(&self.capacity).await;
            }
        }
    }

    /// Runs `maintain` every `MAINTENANCE_PERIOD` until the runner is dropped.
    pub fn spawn_maintenance(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(MAINTENANCE_PERIOD);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(runner) = weak.upgrade() else { return };
                runner.maintain().await;
            }
        })
    }

    /// Starts draining: new calls are NACKed, `/readyz` fails.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Waits until no call is active or `timeout` passes; returns whether
    /// the node went idle.
    pub async fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.idle.notified();
            if self.active_calls() <= 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.active_calls() <= 0;
            }
        }
    }

    // ---- functions (the deploy API) ----

    /// Every function, sorted by name.
    pub fn functions(&self) -> Vec<FunctionDef> {
        read(&self.functions)
            .values()
            .map(|entry| entry.def.clone())
            .collect()
    }

    pub fn get_function(&self, name: &str) -> Option<FunctionDef> {
        self.function(name)
    }

    /// The functions directory, for deploys to resolve relative preopens.
    pub fn functions_dir(&self) -> Option<PathBuf> {
        self.dir.as_ref().map(|dir| dir.path().to_owned())
    }

    /// Deploys (or redeploys) a function: validates it completely — it
    /// compiles and is a guest kind this host runs — then persists it, then
    /// swaps it in. Calls already running on the old slot finish there.
    pub async fn deploy(&self, def: FunctionDef, settings_text: &str) -> Result<DeployOutcome, DeployError> {
        let slot = self
            .slot(&def)
            .await
            .map_err(|error| DeployError::Invalid(error.to_string()))?;
        // NB: same SlotHashId (same bytes and instance-shaping settings):
        // the existing slot, its warm instances and its supervision state
        // stay; only the pool settings change, in place.
        slot.reconfigure(def.settings.pool.clone());
        if let Some(dir) = &self.dir {
            let (dir, name, bytes, text) = (
                dir.clone(),
                def.name.clone(),
                def.bytes.clone(),
                settings_text.to_owned(),
            );
            tokio::task::spawn_blocking(move || dir.persist(&name, &bytes, &text))
                .await
                .map_err(|e| DeployError::Persist(e.to_string()))?
                .map_err(|e| DeployError::Persist(e.to_string()))?;
        }
        let previous = write(&self.functions).insert(def.name.clone(), FunctionEntry { def: def.clone() });
        let replaced = previous.map(|entry| entry.def);
        if let Some(old) = &replaced
            && old.slot_hash != def.slot_hash
        {
            self.retire_slot(old);
        }
        if def.settings.pool.min_warm > 0 {
            slot.prewarm(&self.capacity).await;
        }
        Ok(DeployOutcome { def, replaced })
    }

    /// roadrunner's Reset for one function's pool: idle instances go,
    /// in-flight calls finish on theirs, `min_warm` is rebuilt. Returns the
    /// number of instances retired, or `None` for an unknown function.
    pub async fn reset(&self, name: &str) -> Option<usize> {
        let def = self.function(name)?;
        let slot = match self.existing_slot(name) {
            Some(slot) => slot,
            None => return Some(0),
        };
        let retired = slot.reset();
        if def.settings.pool.min_warm > 0 {
            slot.prewarm(&self.capacity).await;
        }
        Some(retired)
    }

    /// Removes a function (and its files).
    pub async fn remove(&self, name: &str) -> Result<Option<FunctionDef>, DeployError> {
        if self.function(name).is_none() {
            return Ok(None);
        }
        if let Some(dir) = &self.dir {
            let (dir, owned) = (dir.clone(), name.to_owned());
            tokio::task::spawn_blocking(move || dir.remove(&owned))
                .await
                .map_err(|e| DeployError::Persist(e.to_string()))?
                .map_err(|e| DeployError::Persist(e.to_string()))?;
        }
        let removed = write(&self.functions).remove(name).map(|entry| entry.def);
        if let Some(def) = &removed {
            self.retire_slot(def);
        }
        Ok(removed)
    }

    /// Closes the slot of a function definition that was replaced or
    /// removed; its running calls finish, its ready instances go.
    fn retire_slot(&self, def: &FunctionDef) {
        if let Some(cell) = crate::lock(&self.slots).remove(&slot_key(def))
            && let Some(slot) = cell.get()
        {
            slot.close();
        }
    }

    /// The slot of a function, if it has been made.
    pub fn existing_slot(&self, name: &str) -> Option<Arc<Slot>> {
        let def = self.function(name)?;
        crate::lock(&self.slots)
            .get(&slot_key(&def))
            .and_then(|cell| cell.get().cloned())
    }

    // ---- status ----

    /// Fn's RunnerStatus: runs the health function through the call path,
    /// one at a time, cached for the status TTL; live counters are always
    /// fresh.
    pub async fn runner_status(&self) -> RunnerStatus {
        let health = self.status.get_or_run(|| self.run_health()).await;
        RunnerStatus {
            active_request_count: self.active_calls(),
            requests_received: self.counters.received.load(Ordering::Relaxed),
            requests_handled: self.counters.handled.load(Ordering::Relaxed),
            kdumps_on_disk: self.dumps.as_ref().map_or(0, |d| d.count()),
            details: self.details(),
            ..health
        }
    }

    fn details(&self) -> BTreeMap<String, FunctionDetails> {
        let defs = self.functions();
        let slots = crate::lock(&self.slots);
        defs.into_iter()
            .map(|def| {
                let pool = slots
                    .get(&slot_key(&def))
                    .and_then(|cell| cell.get())
                    .map(|slot| slot.stats());
                (
                    def.name.to_string(),
                    FunctionDetails {
                        slot_hash: def.slot_hash.to_string(),
                        pool,
                    },
                )
            })
            .collect()
    }

    /// One health call through the real call path (slot, admission,
    /// guest), not counted as a client call.
    async fn run_health(&self) -> RunnerStatus {
        let created = Instant::now();
        let failed = |code: i32, message: String, id: String| RunnerStatus {
            failed: true,
            error_code: code,
            error_str: message,
            id,
            ..empty_status()
        };
        let slot = match self.slot(&self.health).await {
            Ok(slot) => slot,
            Err(error) => return failed(500, error.to_string(), String::new()),
        };
        let (report_tx, report_rx) = tokio::sync::oneshot::channel();
        let call = Call::new(
            CallId::new(),
            self.health.name.clone(),
            self.health.slot_hash.clone(),
            created,
            created + STATUS_CALL_TIMEOUT.min(self.health.settings.timeout()),
            move |report| {
                let _ = report_tx.send(report);
            },
        );
        let id = call.id.to_string();
        let request = GuestRequest {
            method: http::Method::GET,
            path_and_query: http::uri::PathAndQuery::from_static("/"),
            headers: http::HeaderMap::new(),
            body: full_body(bytes::Bytes::new()),
            authority: "localhost".into(),
            scheme: http::uri::Scheme::HTTP,
            remote_addr: None,
        };
        let admission = match slot.admit(&self.capacity, self.config.allocate_timeout).await {
            Ok(admission) => admission,
            Err(refusal) => {
                call.complete(Err(CallError::Busy {
                    function: self.health.name.to_string(),
                    reason: refusal.describe().into(),
                }));
                return failed(503, refusal.describe().into(), id);
            }
        };
        let response = slot.execute(admission, request, call).await;
        let body_ok = match response {
            Ok(response) => {
                use http_body_util::BodyExt;
                let status = response.status;
                match response.body.collect().await {
                    Ok(_) if status.is_success() => Ok(()),
                    Ok(_) => Err((
                        i32::from(status.as_u16()),
                        format!("health function answered {status}"),
                    )),
                    Err(error) => Err((502, error.to_string())),
                }
            }
            Err(error) => Err((
                i32::from(crate::server::errors::status_of(error.kind()).as_u16()),
                error.to_string(),
            )),
        };
        let report = report_rx.await.ok();
        let mut status = match body_ok {
            Ok(()) => RunnerStatus { id, ..empty_status() },
            Err((code, message)) => failed(code, message, id),
        };
        if let Some(report) = report {
            status.created_at = rfc3339(report.created_at);
            status.started_at = report.started_at.map(rfc3339).unwrap_or_default();
            status.completed_at = rfc3339(report.completed_at);
            status.scheduler_duration = report.scheduler_time().as_nanos() as u64;
            status.execution_duration = report.user_execution_time.as_nanos() as u64;
        }
        status
    }
}

/// What a deploy did.
pub struct DeployOutcome {
    pub def: FunctionDef,
    pub replaced: Option<FunctionDef>,
}

#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("{0}")]
    Invalid(String),
    #[error("cannot persist the function: {0}")]
    Persist(String),
}

fn empty_status() -> RunnerStatus {
    RunnerStatus {
        active_request_count: 0,
        requests_received: 0,
        requests_handled: 0,
        kdumps_on_disk: 0,
        failed: false,
        cached: false,
        id: String::new(),
        details: BTreeMap::new(),
        error_code: 0,
        error_str: String::new(),
        created_at: String::new(),
        started_at: String::new(),
        completed_at: String::new(),
        scheduler_duration: 0,
        execution_duration: 0,
    }
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

/// The health result, cached for a TTL; one health call at a time, and
/// callers that arrive meanwhile share its result.
struct StatusCache {
    ttl: Duration,
    last: Mutex<Option<(Instant, RunnerStatus)>>,
    running: tokio::sync::Mutex<()>,
}

impl StatusCache {
    fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            last: Mutex::new(None),
            running: tokio::sync::Mutex::new(()),
        }
    }

    fn fresh(&self) -> Option<RunnerStatus> {
        let last = crate::lock(&self.last);
        match &*last {
            Some((at, status)) if at.elapsed() < self.ttl => Some(RunnerStatus {
                cached: true,
                ..status.clone()
            }),
            _ => None,
        }
    }

    async fn get_or_run<F: Future<Output = RunnerStatus>>(&self, run: impl FnOnce() -> F) -> RunnerStatus {
        if let Some(status) = self.fresh() {
            return status;
        }
        let _running = self.running.lock().await;
        // NB: another caller may have refreshed it while we waited.
        if let Some(status) = self.fresh() {
            return status;
        }
        let status = run().await;
        *crate::lock(&self.last) = Some((Instant::now(), status.clone()));
        status
    }
}

/// Logs a finished call inside its span: the guest's log lines (bounded),
/// then one line with the outcome and timings.
fn log_report(report: &CallReport) {
    let _entered = report.span.enter();
    if !report.log.0.is_empty() {
        for line in String::from_utf8_lossy(&report.log.0)
            .lines()
            .take(MAX_LOGGED_GUEST_LINES)
        {
            tracing::info!(target: "fnrunner::guest", "{line}");
        }
    }
    if report.log.1 > 0 {
        tracing::info!(target: "fnrunner::guest", dropped_bytes = report.log.1, "guest output truncated");
    }
    let total_us = report.total.as_micros() as u64;
    let user_us = report.user_execution_time.as_micros() as u64;
    match &report.outcome {
        // NB: debug, not info: a line per successful call is a write per
        // call, which a busy node cannot afford by default.
        Ok(status) => tracing::debug!(status = status.as_u16(), total_us, user_us, "call completed"),
        Err(CallError::Canceled) => {
            tracing::info!(status = 444, total_us, "call canceled: the client went away")
        }
        Err(error) => tracing::warn!(%error, total_us, user_us, "call failed"),
    }
}

/// Most guest log lines logged per call.
pub const MAX_LOGGED_GUEST_LINES: usize = 200;

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|poisoned| poisoned.into_inner())
}
