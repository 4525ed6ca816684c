//! A slot: what every call of one function with the same SlotHashId shares
//! — the compiled module, its `InstancePre`/`ProxyPre`, the pool of ready
//! instances, the concurrency limit and the counters.
//!
//! The call path through a slot is `admit` (TryExec's slot half: a ready
//! instance, or node capacity for a new one, within the allocate timeout)
//! then `execute` (the guest runs; the response comes back). Nothing in
//! `admit` reads the request body, so a refused call can be NACKed before
//! its body is read.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::call::{Call, InstanceUse};
use crate::capacity::{InstancePermit, NodeCapacity, Shortage};
use crate::engine::Engine;
use crate::function::{FunctionDef, PoolSettings};
use crate::guest::cgi::{CgiCall, CgiPre, PrepareError};
use crate::guest::http::{HttpInstance, HttpPre, Responder};
use crate::guest::{CallEnv, CallError, CallLimits, GuestRequest, GuestResponse, collect_body, full_body};
use crate::module_store::{Compiled, LoadSource, ModuleStore, StoreError};
use crate::pool::{
    self, AfterCall, CallEnd, EscalationPolicy, Gate, PoolEvent, PoolObserver, PoolStats, PoolStatsSnapshot,
    RetireReason, Supervision, Supervisor, Transition,
};

/// How a slot came to be: where its compiled module came from and what
/// each step of the cold start cost.
#[derive(Debug, Clone, Copy)]
pub struct ColdStart {
    pub source: LoadSource,
    /// Compile, or load from the store (or memory).
    pub load_time: Duration,
    /// `instantiate_pre` (+ `ProxyPre`).
    pub prepare_time: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("function `{function}`: {source}")]
    Load {
        function: String,
        #[source]
        source: StoreError,
    },
    #[error("function `{function}`: {source}")]
    Prepare {
        function: String,
        #[source]
        source: PrepareError,
    },
    #[error(
        "function `{function}`: memory_mb {memory_mb} exceeds this node's limit of {max} MiB per instance"
    )]
    TooMuchMemory {
        function: String,
        memory_mb: u64,
        max: u64,
    },
}

/// Why a slot refused a call (the call is NACKed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The function is at its `max_concurrency`.
    Concurrency,
    /// The node has no capacity for another instance.
    Capacity(Shortage),
    /// The slot was replaced or removed.
    Closed,
    /// The function is quarantined here; retry after this long.
    Quarantined { retry_after: Duration },
}

impl Refusal {
    pub fn describe(self) -> &'static str {
        match self {
            Refusal::Concurrency => "the function is at its max_concurrency",
            Refusal::Capacity(shortage) => shortage.describe(),
            Refusal::Closed => "the function was redeployed or removed",
            Refusal::Quarantined { .. } => "the function is quarantined after repeated faults",
        }
    }
}

enum SlotPre {
    Http(HttpPre),
    Cgi(CgiPre),
}

struct ReadyInstance {
    instance: HttpInstance,
    permit: InstancePermit,
    since: Instant,
    /// The pool generation it was made in (see `reset`).
    generation: u64,
}

enum Lease {
    Ready(ReadyInstance),
    New(InstancePermit),
}

/// A call admitted to a slot: the capacity (or ready instance) it will run
/// on, and its place under the function's concurrency limit.
pub struct Admission {
    lease: Lease,
    _concurrency: Option<OwnedSemaphorePermit>,
    probe: Option<ProbeGuard>,
}

/// The quarantine's one probe call. If the call never reports a verdict
/// (it could not get capacity, or was dropped), the probe is given back so
/// a later call can probe.
struct ProbeGuard {
    supervisor: Arc<Mutex<Supervisor>>,
    armed: bool,
}

impl Drop for ProbeGuard {
    fn drop(&mut self) {
        if self.armed {
            crate::lock(&self.supervisor).cancel_probe();
        }
    }
}

/// How a call's result counts for supervision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// A trap, timeout or memory-limit hit.
    Fault,
    /// The guest answered.
    Success,
    /// Anything else (the client left, no capacity, a runner fault...).
    Neutral,
}

impl Verdict {
    fn of(result: Option<crate::guest::FaultKind>) -> Self {
        use crate::guest::FaultKind;
        match result {
            None => Verdict::Success,
            Some(FaultKind::Trap | FaultKind::Timeout | FaultKind::MemoryLimit) => Verdict::Fault,
            Some(_) => Verdict::Neutral,
        }
    }
}

/// Node-wide settings every slot is made with.
#[derive(Debug, Clone, Copy, Default)]
pub struct SlotConfig {
    pub limits: CallLimits,
    /// Supervision defaults; a function's settings override them.
    pub supervision: Supervision,
}

pub struct Slot {
    def: FunctionDef,
    engine: Arc<Engine>,
    pre: SlotPre,
    limits: CallLimits,
    node_supervision: Supervision,
    supervisor: Arc<Mutex<Supervisor>>,
    /// Bumped by `reset`: instances of an older generation are retired
    /// when their call ends instead of going back to the pool.
    generation: std::sync::atomic::AtomicU64,
    pool_settings: Mutex<PoolSettings>,
    /// Ready instances, oldest first.
    ready: Mutex<Vec<ReadyInstance>>,
    concurrency: Mutex<Option<Arc<Semaphore>>>,
    stats: PoolStats,
    events: Arc<dyn crate::pool::PoolEvents>,
    cold: ColdStart,
    closed: AtomicBool,
    last_active: Mutex<Instant>,
}

impl Slot {
    /// Makes a slot: loads (or compiles) the module and prepares it.
    /// Blocking — a compile can take seconds; async callers run it on a
    /// blocking thread.
    pub fn create(
        engine: Arc<Engine>,
        store: &ModuleStore,
        def: FunctionDef,
        config: SlotConfig,
        observer: Arc<dyn PoolObserver>,
    ) -> Result<Arc<Self>, SlotError> {
        let function = def.name.to_string();
        let max = engine.config().max_memory_mb;
        if def.settings.memory_mb > max {
            return Err(SlotError::TooMuchMemory {
                function,
                memory_mb: def.settings.memory_mb,
                max,
            });
        }
        let loaded = store
            .load(def.digest, def.kind, &def.bytes)
            .map_err(|source| SlotError::Load {
                function: function.clone(),
                source,
            })?;
        let prepare_started = Instant::now();
        let pre = match &loaded.compiled {
            Compiled::Component(component) => HttpPre::new(&engine, component).map(SlotPre::Http),
            Compiled::Module(module) => CgiPre::new(&engine, module).map(SlotPre::Cgi),
        }
        .map_err(|source| SlotError::Prepare { function, source })?;
        let events = observer.events(&def.name);
        let cold = ColdStart {
            source: loaded.source,
            load_time: loaded.duration,
            prepare_time: prepare_started.elapsed(),
        };
        let concurrency = def
            .settings
            .pool
            .max_concurrency
            .map(|max| Arc::new(Semaphore::new(max as usize)));
        Ok(Arc::new(Self {
            pool_settings: Mutex::new(def.settings.pool.clone()),
            def,
            engine,
            pre,
            limits: config.limits,
            node_supervision: config.supervision,
            supervisor: Arc::default(),
            generation: std::sync::atomic::AtomicU64::new(0),
            ready: Mutex::new(Vec::new()),
            concurrency: Mutex::new(concurrency),
            stats: PoolStats::default(),
            events,
            cold,
            closed: AtomicBool::new(false),
            last_active: Mutex::new(Instant::now()),
        }))
    }

    pub fn def(&self) -> &FunctionDef {
        &self.def
    }

    pub fn cold_start(&self) -> ColdStart {
        self.cold
    }

    pub fn pool_settings(&self) -> PoolSettings {
        crate::lock(&self.pool_settings).clone()
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// TryExec's slot half: a ready instance, or node capacity for a new
    /// one, waiting at most `within`. Never touches the request body.
    pub async fn admit(&self, capacity: &NodeCapacity, within: Duration) -> Result<Admission, Refusal> {
        if self.is_closed() {
            return Err(Refusal::Closed);
        }
        let probe = match crate::lock(&self.supervisor).gate(Instant::now()) {
            Gate::Admit => None,
            Gate::Probe => Some(ProbeGuard {
                supervisor: self.supervisor.clone(),
                armed: true,
            }),
            Gate::Refuse { retry_after } => {
                PoolStats::add(&self.stats.quarantine_refusals);
                return Err(Refusal::Quarantined { retry_after });
            }
        };
        if probe.is_some() {
            tracing::info!(function = %self.def.name, "quarantine: letting one probe call through");
            self.emit(PoolEvent::Probe);
        }
        PoolStats::add(&self.stats.received);
        self.touch();
        let started = Instant::now();
        let semaphore = crate::lock(&self.concurrency).clone();
        let concurrency = match semaphore {
            Some(semaphore) => match semaphore.clone().try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => match tokio::time::timeout(within, semaphore.acquire_owned()).await {
                    Ok(Ok(permit)) => Some(permit),
                    _ => return Err(Refusal::Concurrency),
                },
            },
            None => None,
        };
        if let Some(ready) = self.take_ready() {
            return Ok(Admission {
                lease: Lease::Ready(ready),
                _concurrency: concurrency,
                probe,
            });
        }
        let remaining = within.saturating_sub(started.elapsed());
        let permit = match capacity.try_acquire(self.def.settings.memory_mb) {
            Ok(permit) => permit,
            Err(Shortage::TooLarge) => return Err(Refusal::Capacity(Shortage::TooLarge)),
            Err(_) => capacity
                .acquire(self.def.settings.memory_mb, remaining)
                .await
                .map_err(Refusal::Capacity)?,
        };
        Ok(Admission {
            lease: Lease::New(permit),
            _concurrency: concurrency,
            probe,
        })
    }

    /// Runs an admitted call. The call is completed (and reported) here for
    /// a CGI guest, or by the task that runs a component once its `handle`
    /// returns; the response that comes back may still be streaming.
    pub async fn execute(
        self: &Arc<Self>,
        admission: Admission,
        request: GuestRequest,
        call: Call,
    ) -> Result<GuestResponse, CallError> {
        match &self.pre {
            SlotPre::Cgi(pre) => self.execute_cgi(pre, admission, request, call).await,
            SlotPre::Http(pre) => self.execute_http(pre, admission, request, call).await,
        }
    }

    async fn execute_cgi(
        &self,
        pre: &CgiPre,
        admission: Admission,
        mut request: GuestRequest,
        mut call: Call,
    ) -> Result<GuestResponse, CallError> {
        let Admission {
            lease,
            _concurrency: concurrency,
            probe,
        } = admission;
        let permit = match lease {
            Lease::New(permit) => permit,
            // NB: a CGI instance is bound to its request's environment, so
            // CGI slots never hold ready instances; keep the capacity.
            Lease::Ready(ready) => ready.permit,
        };
        let body = std::mem::replace(&mut request.body, full_body(Bytes::new()));
        let body = match collect_body(body, self.limits.max_request_bytes).await {
            Ok(body) => body,
            Err(error) => {
                self.supervise(Some(error.kind()), probe);
                call.complete(Err(error.clone()));
                return Err(error);
            }
        };
        let env = call_env(&call);
        let environment = crate::guest::cgi::cgi_environment(&self.def.settings, &env, &request);
        drop(request);
        PoolStats::add(&self.stats.busy);
        let outcome = pre
            .run(
                &self.engine,
                CgiCall {
                    settings: &self.def.settings,
                    env: &env,
                    environment,
                    body,
                    limits: self.limits,
                },
            )
            .await;
        PoolStats::sub(&self.stats.busy);
        drop(permit);
        drop(concurrency);
        if let Some(started) = outcome.started_at {
            PoolStats::add(&self.stats.created);
            self.emit(PoolEvent::Created {
                prewarmed: false,
                duration: outcome.instantiate_time,
            });
            call.started(started);
        }
        call.set_instance(InstanceUse::Fresh, outcome.instantiate_time);
        call.add_user_execution_time(outcome.user_execution_time);
        call.set_artifacts(outcome.stderr, outcome.coredump);
        let fault = outcome.result.as_ref().err().map(CallError::kind);
        if outcome.started_at.is_some() {
            // A CGI instance serves one call: its life ends with it.
            let reason = match pool::after_call(
                CallEnd {
                    fault,
                    calls_served: 1,
                    memory_bytes: 0,
                    guest_asked: false,
                },
                1,
                None,
            ) {
                AfterCall::Retire(reason) => reason,
                AfterCall::Keep => RetireReason::MaxJobs,
            };
            self.count_retirement(reason, fault.is_some());
        }
        self.record_fault(fault);
        self.supervise(fault, probe);
        PoolStats::add(&self.stats.processed);
        self.touch();
        call.complete(outcome.result.as_ref().map(|r| r.status).map_err(Clone::clone));
        outcome.result
    }

    async fn execute_http(
        self: &Arc<Self>,
        pre: &HttpPre,
        admission: Admission,
        mut request: GuestRequest,
        mut call: Call,
    ) -> Result<GuestResponse, CallError> {
        let Admission {
            lease,
            _concurrency: concurrency,
            probe,
        } = admission;
        let (mut instance, permit, generation) = match lease {
            Lease::Ready(ready) => {
                let reused = ready.instance.calls() > 0;
                call.set_instance(
                    if reused {
                        InstanceUse::Reused
                    } else {
                        InstanceUse::Prewarmed
                    },
                    Duration::ZERO,
                );
                if reused {
                    PoolStats::add(&self.stats.reused);
                    self.emit(PoolEvent::Reused);
                }
                (ready.instance, ready.permit, ready.generation)
            }
            Lease::New(permit) => {
                let generation = self.generation.load(Ordering::Acquire);
                let started = Instant::now();
                let made = pre
                    .instantiate(&self.engine, &self.def.settings, &self.def.name, self.limits)
                    .await;
                let duration = started.elapsed();
                call.set_instance(InstanceUse::Fresh, duration);
                match made {
                    Ok(instance) => {
                        PoolStats::add(&self.stats.created);
                        self.emit(PoolEvent::Created {
                            prewarmed: false,
                            duration,
                        });
                        (instance, permit, generation)
                    }
                    Err(error) => {
                        self.record_fault(Some(error.kind()));
                        self.supervise(Some(error.kind()), probe);
                        PoolStats::add(&self.stats.processed);
                        call.complete(Err(error.clone()));
                        return Err(error);
                    }
                }
            }
        };

        let body_too_large = Arc::new(AtomicBool::new(false));
        request.body = crate::guest::limit_body(
            std::mem::replace(&mut request.body, full_body(Bytes::new())),
            self.limits.max_request_bytes,
            body_too_large.clone(),
            || wasmtime_wasi_http::Error::HttpRequestBodySize(None),
        );
        let (responder, head) = Responder::new();
        let answer = responder.clone();
        let env = call_env(&call);
        let slot = self.clone();
        let too_large = body_too_large.clone();
        PoolStats::add(&self.stats.busy);
        let span = call.span().clone();
        let task = tokio::spawn(tracing::Instrument::instrument(
            async move {
                let _concurrency = concurrency;
                let outcome = instance
                    .handle(
                        &slot.engine,
                        &slot.def.settings,
                        &env,
                        request,
                        responder,
                        slot.limits,
                    )
                    .await;
                PoolStats::sub(&slot.stats.busy);
                call.started(outcome.started_at);
                call.add_user_execution_time(outcome.user_execution_time);
                call.set_artifacts(outcome.log, outcome.coredump);
                let result = if too_large.load(Ordering::Relaxed) {
                    Err(CallError::BodyTooLarge {
                        limit: slot.limits.max_request_bytes,
                    })
                } else {
                    outcome
                        .result
                        .map(|()| outcome.status.unwrap_or(http::StatusCode::OK))
                };
                let fault = result.as_ref().err().map(CallError::kind);
                slot.record_fault(fault);
                slot.supervise(fault, probe);
                let end = CallEnd {
                    fault: if outcome.healthy {
                        fault
                    } else {
                        fault.or(Some(crate::guest::FaultKind::MemoryLimit))
                    },
                    calls_served: instance.calls(),
                    memory_bytes: instance.memory_used() as u64,
                    guest_asked: outcome.retire_requested,
                };
                slot.after_call(instance, permit, end, generation);
                PoolStats::add(&slot.stats.processed);
                slot.touch();
                if let Err(error) = &result {
                    answer.send(Err(error.clone()));
                }
                call.complete(result);
            },
            span,
        ));
        // NB: until the response head arrives, dropping this future (the
        // client went away) aborts the guest's task; the call then reports
        // itself canceled. Once the head is out, the guest runs to the end
        // of its `handle` under its deadline even if the client leaves.
        let mut abort = AbortOnDrop(Some(task.abort_handle()));
        let head = head.await;
        abort.disarm();
        match head {
            Ok(Ok(_)) if body_too_large.load(Ordering::Relaxed) => Err(CallError::BodyTooLarge {
                limit: self.limits.max_request_bytes,
            }),
            Ok(result) => result,
            Err(_) => Err(CallError::internal(
                &self.def.name,
                "waiting for the guest's response",
                "the call's task ended without an answer",
            )),
        }
    }

    /// Applies the reuse policy to an instance that finished a call.
    fn after_call(&self, instance: HttpInstance, permit: InstancePermit, end: CallEnd, generation: u64) {
        let settings = self.pool_settings();
        let high_water = settings.memory_high_water_mb.map(|mb| mb * crate::engine::MIB);
        let current = generation == self.generation.load(Ordering::Acquire);
        match pool::after_call(end, settings.max_jobs, high_water) {
            AfterCall::Keep if current && !self.is_closed() => {
                crate::lock(&self.ready).push(ReadyInstance {
                    instance,
                    permit,
                    since: Instant::now(),
                    generation,
                });
            }
            AfterCall::Keep => self.count_retirement(RetireReason::Reset, false),
            AfterCall::Retire(reason) => self.count_retirement(reason, end.fault.is_some()),
        }
    }

    fn count_retirement(&self, reason: RetireReason, after_fault: bool) {
        let counter = match reason {
            RetireReason::Idle => &self.stats.idled,
            reason if reason.is_fault() => &self.stats.killed,
            _ => &self.stats.retired,
        };
        PoolStats::add(counter);
        if after_fault {
            PoolStats::add(&self.stats.restarts);
        }
        tracing::debug!(function = %self.def.name, reason = reason.as_str(), "instance retired");
        self.emit(PoolEvent::Retired { reason });
    }

    fn record_fault(&self, fault: Option<crate::guest::FaultKind>) {
        use crate::guest::FaultKind;
        let Some(kind) = fault.filter(|kind| kind.is_guest_fault()) else {
            return;
        };
        match kind {
            FaultKind::Timeout => PoolStats::add(&self.stats.timeouts),
            FaultKind::MemoryLimit => PoolStats::add(&self.stats.memory_limits),
            _ => {}
        }
        PoolStats::add(&self.stats.traps);
        self.emit(PoolEvent::Fault { kind });
    }

    /// The supervision this slot runs under: the function's settings over
    /// the node's defaults.
    pub fn supervision(&self) -> Supervision {
        self.pool_settings().supervision(&self.node_supervision)
    }

    /// Feeds a call's result to the supervisor: `restart_all` clears the
    /// idle instances after a fault; enough consecutive faults quarantine
    /// the function; a probe's result lifts or extends the quarantine.
    fn supervise(&self, fault: Option<crate::guest::FaultKind>, probe: Option<ProbeGuard>) {
        let verdict = Verdict::of(fault);
        let is_probe = probe.is_some();
        if let Some(mut probe) = probe {
            // NB: a neutral result gives the probe back (the guard's drop);
            // a verdict consumes it.
            probe.armed = verdict == Verdict::Neutral;
        }
        if verdict == Verdict::Neutral {
            return;
        }
        let config = self.supervision();
        let faulted = verdict == Verdict::Fault;
        if faulted && config.policy == EscalationPolicy::RestartAll {
            let retired = self.retire_ready(RetireReason::Escalation);
            if retired > 0 {
                tracing::info!(function = %self.def.name, retired, "restart_all: idle instances retired after a fault");
            }
            self.emit(PoolEvent::Escalated { retired });
        }
        let transition = crate::lock(&self.supervisor).record(faulted, is_probe, Instant::now(), &config);
        match transition {
            Some(Transition::Quarantined { backoff }) => {
                PoolStats::add(&self.stats.escalations);
                tracing::warn!(
                    function = %self.def.name,
                    faults = config.escalate_after,
                    backoff_ms = backoff.as_millis() as u64,
                    "quarantined after consecutive faults: calls are NACKed until a probe succeeds"
                );
                self.retire_ready(RetireReason::Escalation);
                self.emit(PoolEvent::Quarantined { backoff });
            }
            Some(Transition::ProbeFailed { backoff }) => {
                tracing::warn!(function = %self.def.name, backoff_ms = backoff.as_millis() as u64, "probe failed: still quarantined");
                self.emit(PoolEvent::ProbeFailed { backoff });
            }
            Some(Transition::Lifted) => {
                tracing::info!(function = %self.def.name, "probe succeeded: quarantine lifted");
                self.emit(PoolEvent::Lifted);
            }
            None => {}
        }
    }

    /// Destroys every ready instance; returns how many went.
    fn retire_ready(&self, reason: RetireReason) -> usize {
        let ready: Vec<ReadyInstance> = std::mem::take(&mut *crate::lock(&self.ready));
        let count = ready.len();
        drop(ready);
        for _ in 0..count {
            self.count_retirement(reason, false);
        }
        count
    }

    /// roadrunner's Reset: the idle instances go, calls in flight finish on
    /// their own instances (which are then retired, not pooled), and
    /// `min_warm` is rebuilt from scratch by the caller's `prewarm`.
    pub fn reset(&self) -> usize {
        self.generation.fetch_add(1, Ordering::AcqRel);
        let retired = self.retire_ready(RetireReason::Reset);
        tracing::info!(function = %self.def.name, retired, "pool reset");
        self.emit(PoolEvent::Reset);
        retired
    }

    /// Applies new pool settings in place (roadrunner's Reconfigure): the
    /// ready instances stay; a new `max_concurrency` applies to calls
    /// admitted from now on.
    pub fn reconfigure(&self, settings: PoolSettings) {
        let mut current = crate::lock(&self.pool_settings);
        if current.max_concurrency != settings.max_concurrency {
            *crate::lock(&self.concurrency) = settings
                .max_concurrency
                .map(|max| Arc::new(Semaphore::new(max as usize)));
        }
        if *current != settings {
            tracing::info!(function = %self.def.name, "pool reconfigured in place");
        }
        *current = settings;
    }

    fn take_ready(&self) -> Option<ReadyInstance> {
        // NB: newest first — its memory is the most likely to be warm.
        crate::lock(&self.ready).pop()
    }

    /// Makes instances ahead of demand until `min_warm` are ready, with
    /// capacity that is free now (it never waits for, or NACKs, a call).
    /// Returns how many were made.
    pub async fn prewarm(&self, capacity: &NodeCapacity) -> usize {
        let SlotPre::Http(pre) = &self.pre else { return 0 };
        let settings = self.pool_settings();
        let mut made = 0;
        loop {
            if self.is_closed() {
                return made;
            }
            let ready = crate::lock(&self.ready).len();
            let busy = PoolStats::get(&self.stats.busy) as usize;
            if pool::prewarm_deficit(ready, busy, settings.min_warm, settings.max_concurrency) == 0 {
                return made;
            }
            let Ok(permit) = capacity.try_acquire(self.def.settings.memory_mb) else {
                return made;
            };
            let generation = self.generation.load(Ordering::Acquire);
            let started = Instant::now();
            match pre
                .instantiate(&self.engine, &self.def.settings, &self.def.name, self.limits)
                .await
            {
                Ok(instance) => {
                    PoolStats::add(&self.stats.created);
                    PoolStats::add(&self.stats.prewarmed);
                    self.emit(PoolEvent::Created {
                        prewarmed: true,
                        duration: started.elapsed(),
                    });
                    crate::lock(&self.ready).push(ReadyInstance {
                        instance,
                        permit,
                        since: Instant::now(),
                        generation,
                    });
                    made += 1;
                }
                Err(error) => {
                    tracing::warn!(function = %self.def.name, %error, "prewarming an instance failed");
                    return made;
                }
            }
        }
    }

    /// Destroys ready instances idle past the idle timeout, keeping
    /// `min_warm`. Returns how many were reaped.
    pub fn reap(&self, now: Instant) -> usize {
        let settings = self.pool_settings();
        let idle_timeout = Duration::from_millis(settings.idle_timeout_ms);
        let reaped: Vec<ReadyInstance> = {
            let mut ready = crate::lock(&self.ready);
            let mut count = 0;
            while count < ready.len()
                && pool::should_reap(
                    ready[count].since,
                    now,
                    idle_timeout,
                    ready.len() - count,
                    settings.min_warm,
                )
            {
                count += 1;
            }
            ready.drain(..count).collect()
        };
        // Dropped outside the lock: a store drop can take a while.
        let count = reaped.len();
        drop(reaped);
        for _ in 0..count {
            self.count_retirement(RetireReason::Idle, false);
        }
        count
    }

    /// Destroys up to `count` ready instances, oldest first, to free node
    /// capacity for calls that need it. Returns how many went.
    pub fn evict(&self, count: usize) -> usize {
        let evicted: Vec<ReadyInstance> = {
            let mut ready = crate::lock(&self.ready);
            let count = count.min(ready.len());
            ready.drain(..count).collect()
        };
        let count = evicted.len();
        drop(evicted);
        for _ in 0..count {
            self.count_retirement(RetireReason::Idle, false);
        }
        count
    }

    /// Closes the slot: no new calls, ready instances destroyed; calls in
    /// flight finish on their own instances, which are then dropped.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.retire_ready(RetireReason::Reset);
    }

    /// Whether the slot has had no instance and no call for its idle
    /// timeout (and keeps no warm instances), so it can be dropped.
    pub fn is_unused(&self, now: Instant) -> bool {
        let settings = self.pool_settings();
        settings.min_warm == 0
            && PoolStats::get(&self.stats.busy) == 0
            && crate::lock(&self.ready).is_empty()
            && now.saturating_duration_since(*crate::lock(&self.last_active))
                >= Duration::from_millis(settings.idle_timeout_ms)
    }

    pub fn stats(&self) -> PoolStatsSnapshot {
        let s = &self.stats;
        let busy = PoolStats::get(&s.busy);
        let ready = crate::lock(&self.ready).len() as u64;
        let available = crate::lock(&self.concurrency)
            .as_ref()
            .map(|semaphore| semaphore.available_permits() as u64);
        let quarantined_for = crate::lock(&self.supervisor).quarantined_for(Instant::now());
        PoolStatsSnapshot {
            received: PoolStats::get(&s.received),
            processed: PoolStats::get(&s.processed),
            traps: PoolStats::get(&s.traps),
            timeouts: PoolStats::get(&s.timeouts),
            memory_limits: PoolStats::get(&s.memory_limits),
            restarts: PoolStats::get(&s.restarts),
            current: busy + ready,
            busy,
            ready,
            created: PoolStats::get(&s.created),
            prewarmed: PoolStats::get(&s.prewarmed),
            reused: PoolStats::get(&s.reused),
            killed: PoolStats::get(&s.killed),
            idled: PoolStats::get(&s.idled),
            retired: PoolStats::get(&s.retired),
            available,
            escalations: PoolStats::get(&s.escalations),
            quarantine_refusals: PoolStats::get(&s.quarantine_refusals),
            quarantined: quarantined_for.is_some(),
            quarantined_for_ms: quarantined_for.map(|d| d.as_millis() as u64),
            escalation_policy: self.supervision().policy,
        }
    }

    fn emit(&self, event: PoolEvent) {
        self.events.on_event(&event);
    }

    fn touch(&self) {
        *crate::lock(&self.last_active) = Instant::now();
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let ready = std::mem::take(&mut *crate::lock(&self.ready));
        for _ in 0..ready.len() {
            self.emit(PoolEvent::Retired {
                reason: RetireReason::Reset,
            });
        }
    }
}

/// A response read to its end.
#[derive(Debug, Clone)]
pub struct Collected {
    pub status: http::StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Slot {
    /// Runs one call to completion — admission (waiting up to a minute),
    /// execution, the whole response body — and returns it with the call's
    /// report. For the CLI, benchmarks and tests; the node streams instead.
    pub async fn call_to_completion(
        self: &Arc<Self>,
        capacity: &NodeCapacity,
        request: GuestRequest,
    ) -> (crate::call::CallReport, Result<Collected, CallError>) {
        use http_body_util::BodyExt;
        let created = Instant::now();
        let (report_tx, report_rx) = tokio::sync::oneshot::channel();
        let call = Call::new(
            crate::call::CallId::new(),
            self.def.name.clone(),
            self.def.slot_hash.clone(),
            created,
            created + self.def.settings.timeout(),
            move |report| {
                let _ = report_tx.send(report);
            },
        );
        let collected = match self.admit(capacity, Duration::from_secs(60)).await {
            Ok(admission) => match self.execute(admission, request, call).await {
                Ok(response) => match response.body.collect().await {
                    Ok(body) => Ok(Collected {
                        status: response.status,
                        headers: response.headers,
                        body: body.to_bytes(),
                    }),
                    Err(error) => Err(CallError::BodyRead {
                        reason: format!("reading the guest's response: {error}"),
                    }),
                },
                Err(error) => Err(error),
            },
            Err(refusal) => {
                let error = CallError::Busy {
                    function: self.def.name.to_string(),
                    reason: refusal.describe().into(),
                };
                call.complete(Err(error.clone()));
                Err(error)
            }
        };
        // NB: `Call` reports when completed and when dropped, so the sender
        // always fires; the fallback only guards against a logic error.
        let report = match report_rx.await {
            Ok(report) => report,
            Err(_) => return (missing_report(&self.def), collected),
        };
        (report, collected)
    }
}

#[cold]
fn missing_report(def: &FunctionDef) -> crate::call::CallReport {
    let now = SystemTime::now();
    crate::call::CallReport {
        id: crate::call::CallId::new(),
        function: def.name.clone(),
        slot_hash: def.slot_hash.clone(),
        created_at: now,
        started_at: None,
        completed_at: now,
        total: Duration::ZERO,
        user_execution_time: Duration::ZERO,
        instantiate_time: Duration::ZERO,
        instance: InstanceUse::None,
        outcome: Err(CallError::internal(&def.name, "reporting the call", "no report")),
        log: (Bytes::new(), 0),
        coredump: None,
        span: tracing::Span::none(),
    }
}

fn call_env(call: &Call) -> CallEnv {
    CallEnv {
        call_id: call.id.to_string(),
        function: call.function.clone(),
        deadline: call.deadline,
        deadline_wall: SystemTime::now() + call.deadline.saturating_duration_since(Instant::now()),
    }
}

/// Aborts a task when dropped, unless disarmed first.
struct AbortOnDrop(Option<tokio::task::AbortHandle>);

impl AbortOnDrop {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(handle) = self.0.take() {
            handle.abort();
        }
    }
}
