//! Pool policy, instance states, events and per-slot statistics.
//!
//! The decisions are small pure functions returning enums (as `wasmtime
//! serve`'s `should_accept`), so they are tested without running Wasm. The
//! slot (`slot.rs`) applies them to real instances.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::guest::FaultKind;

/// The life of an instance: made ready (possibly ahead of demand), busy
/// with one call, ready again (reuse), then retiring and gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    Ready,
    Busy,
    Retiring,
    Gone,
}

/// Why an instance stopped serving calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RetireReason {
    /// It trapped.
    Trap,
    /// Its call ran past the deadline.
    Timeout,
    /// It hit its memory limit.
    MemoryLimit,
    /// It served `max_jobs` calls.
    MaxJobs,
    /// It sat idle past `idle_timeout_ms`.
    Idle,
    /// Its memory grew past the function's high-water mark.
    HighWater,
    /// Another failure (bad output, no response, host error).
    Error,
    /// The guest asked for it (`fn-retire: 1`).
    GuestAsked,
    /// The pool was reset or the slot closed.
    Reset,
    /// A fault escalated (`restart_all`, or a quarantine).
    Escalation,
}

impl RetireReason {
    pub const ALL: [RetireReason; 10] = [
        RetireReason::Trap,
        RetireReason::Timeout,
        RetireReason::MemoryLimit,
        RetireReason::MaxJobs,
        RetireReason::Idle,
        RetireReason::HighWater,
        RetireReason::Error,
        RetireReason::GuestAsked,
        RetireReason::Reset,
        RetireReason::Escalation,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RetireReason::Trap => "trap",
            RetireReason::Timeout => "timeout",
            RetireReason::MemoryLimit => "oom",
            RetireReason::MaxJobs => "max_jobs",
            RetireReason::Idle => "idle",
            RetireReason::HighWater => "high_water",
            RetireReason::Error => "error",
            RetireReason::GuestAsked => "guest_asked",
            RetireReason::Reset => "reset",
            RetireReason::Escalation => "escalation",
        }
    }

    /// Whether the instance was destroyed because it failed (sabuhp's
    /// "killed"), as opposed to reaching the end of a normal life.
    pub fn is_fault(self) -> bool {
        matches!(
            self,
            RetireReason::Trap | RetireReason::Timeout | RetireReason::MemoryLimit | RetireReason::Error
        )
    }

    fn of_fault(kind: FaultKind) -> Self {
        match kind {
            FaultKind::Trap => RetireReason::Trap,
            FaultKind::Timeout => RetireReason::Timeout,
            FaultKind::MemoryLimit => RetireReason::MemoryLimit,
            _ => RetireReason::Error,
        }
    }
}

/// What happens to an instance after a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterCall {
    /// Back to the pool, ready for the next call.
    Keep,
    /// Destroyed now.
    Retire(RetireReason),
}

/// Facts about the call an instance just served.
#[derive(Debug, Clone, Copy)]
pub struct CallEnd {
    /// The failure, if the call failed.
    pub fault: Option<FaultKind>,
    /// Calls the instance has served, this one included.
    pub calls_served: u32,
    /// Linear memory the instance holds now.
    pub memory_bytes: u64,
    /// Whether the guest asked to be retired.
    pub guest_asked: bool,
}

/// Reuse policy: an instance that failed in any way never serves again; one
/// that reached `max_jobs`, grew past the high-water mark, or asked to go
/// is retired after its call; any other is kept.
pub fn after_call(end: CallEnd, max_jobs: u32, high_water_bytes: Option<u64>) -> AfterCall {
    if let Some(fault) = end.fault {
        // A canceled call may have left the guest mid-request: not reusable.
        return AfterCall::Retire(RetireReason::of_fault(fault));
    }
    if end.guest_asked {
        return AfterCall::Retire(RetireReason::GuestAsked);
    }
    if end.calls_served >= max_jobs {
        return AfterCall::Retire(RetireReason::MaxJobs);
    }
    if high_water_bytes.is_some_and(|mark| end.memory_bytes > mark) {
        return AfterCall::Retire(RetireReason::HighWater);
    }
    AfterCall::Keep
}

/// Admission policy for one call on one slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// A ready instance is there: take it.
    Ready,
    /// Make a new instance (node capacity permitting).
    Create,
    /// The function is at `max_concurrency`: wait for a running call to end
    /// (up to the allocate timeout), then NACK.
    Wait,
}

pub fn admit(running: u32, max_concurrency: Option<u32>, ready: usize) -> Admit {
    if max_concurrency.is_some_and(|max| running >= max) {
        Admit::Wait
    } else if ready > 0 {
        Admit::Ready
    } else {
        Admit::Create
    }
}

/// How many instances to make ahead of demand so `min_warm` are ready,
/// never beyond `max_concurrency`.
pub fn prewarm_deficit(ready: usize, busy: usize, min_warm: u32, max_concurrency: Option<u32>) -> usize {
    let want = min_warm as usize;
    let room = max_concurrency.map_or(usize::MAX, |max| (max as usize).saturating_sub(busy + ready));
    want.saturating_sub(ready).min(room)
}

/// Whether a ready instance idle since `since` is reaped now. Instances up
/// to `min_warm` are kept however long they idle.
pub fn should_reap(
    since: Instant,
    now: Instant,
    idle_timeout: Duration,
    ready: usize,
    min_warm: u32,
) -> bool {
    ready > min_warm as usize && now.saturating_duration_since(since) >= idle_timeout
}

/// What a guest fault does to the rest of the slot's pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EscalationPolicy {
    /// Only the faulty instance goes (the default).
    RestartOne,
    /// Every idle instance of the slot goes too, for functions whose
    /// instances share a poisoned input or cache.
    RestartAll,
}

impl EscalationPolicy {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "restart_one" => Some(Self::RestartOne),
            "restart_all" => Some(Self::RestartAll),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::RestartOne => "restart_one",
            Self::RestartAll => "restart_all",
        }
    }
}

/// Supervision of one slot (sabuhp's escalation protocol).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Supervision {
    pub policy: EscalationPolicy,
    /// Consecutive guest faults (traps, timeouts, memory-limit hits) within
    /// `window` that quarantine the function; 0 never quarantines.
    pub escalate_after: u32,
    pub window: Duration,
    /// First quarantine back-off; doubled after each failed probe.
    pub backoff: Duration,
    pub max_backoff: Duration,
}

/// Node-wide supervision defaults (each overridable per function).
pub const DEFAULT_ESCALATE_AFTER: u32 = 5;
pub const DEFAULT_ESCALATE_WINDOW: Duration = Duration::from_secs(60);
pub const DEFAULT_QUARANTINE_BACKOFF: Duration = Duration::from_secs(1);
pub const DEFAULT_QUARANTINE_MAX_BACKOFF: Duration = Duration::from_secs(60);

impl Default for Supervision {
    fn default() -> Self {
        Self {
            policy: EscalationPolicy::RestartOne,
            escalate_after: DEFAULT_ESCALATE_AFTER,
            window: DEFAULT_ESCALATE_WINDOW,
            backoff: DEFAULT_QUARANTINE_BACKOFF,
            max_backoff: DEFAULT_QUARANTINE_MAX_BACKOFF,
        }
    }
}

/// Whether a call may run on a supervised slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Healthy: run it.
    Admit,
    /// Quarantined and the back-off is over: run it as the one probe.
    Probe,
    /// Quarantined: refuse it at once (NACK), retry after this long.
    Refuse { retry_after: Duration },
}

/// A change of a slot's health, for the log and the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Escalated: the function is quarantined for `backoff`.
    Quarantined { backoff: Duration },
    /// The probe failed: quarantined again for the doubled `backoff`.
    ProbeFailed { backoff: Duration },
    /// The probe succeeded: calls run again.
    Lifted,
}

/// The escalation state machine of one slot. Pure: it is told the time.
#[derive(Debug, Clone, Default)]
pub struct Supervisor {
    streak: u32,
    streak_started: Option<Instant>,
    quarantine: Option<Quarantine>,
}

#[derive(Debug, Clone, Copy)]
struct Quarantine {
    until: Instant,
    backoff: Duration,
    probing: bool,
}

impl Supervisor {
    pub fn is_quarantined(&self) -> bool {
        self.quarantine.is_some()
    }

    /// Admission: admit, let one probe through, or refuse.
    pub fn gate(&mut self, now: Instant) -> Gate {
        match &mut self.quarantine {
            None => Gate::Admit,
            Some(q) if !q.probing && now >= q.until => {
                q.probing = true;
                Gate::Probe
            }
            Some(q) => Gate::Refuse {
                retry_after: q
                    .until
                    .saturating_duration_since(now)
                    .max(Duration::from_millis(1)),
            },
        }
    }

    /// A call's result. `fault` is a guest fault that counts toward
    /// escalation (trap, timeout, memory limit); `probe` says whether the
    /// call was the quarantine's probe.
    pub fn record(
        &mut self,
        fault: bool,
        probe: bool,
        now: Instant,
        config: &Supervision,
    ) -> Option<Transition> {
        if let Some(q) = self.quarantine {
            if !probe {
                // A call admitted before the quarantine began: not evidence.
                return None;
            }
            if fault {
                let backoff = (q.backoff * 2).min(config.max_backoff);
                self.quarantine = Some(Quarantine {
                    until: now + backoff,
                    backoff,
                    probing: false,
                });
                return Some(Transition::ProbeFailed { backoff });
            }
            self.quarantine = None;
            self.streak = 0;
            self.streak_started = None;
            return Some(Transition::Lifted);
        }
        if !fault {
            self.streak = 0;
            self.streak_started = None;
            return None;
        }
        match self.streak_started {
            Some(started) if now.saturating_duration_since(started) <= config.window => self.streak += 1,
            _ => {
                self.streak = 1;
                self.streak_started = Some(now);
            }
        }
        if config.escalate_after > 0 && self.streak >= config.escalate_after {
            self.quarantine = Some(Quarantine {
                until: now + config.backoff,
                backoff: config.backoff,
                probing: false,
            });
            return Some(Transition::Quarantined {
                backoff: config.backoff,
            });
        }
        None
    }

    /// A probe ended without a verdict: the next call after the back-off
    /// probes instead.
    pub fn cancel_probe(&mut self) {
        if let Some(q) = &mut self.quarantine {
            q.probing = false;
        }
    }

    /// Time until the next probe, while quarantined.
    pub fn quarantined_for(&self, now: Instant) -> Option<Duration> {
        self.quarantine.map(|q| q.until.saturating_duration_since(now))
    }
}

/// Counters of one slot (sabuhp's WorkerStat where it applies).
#[derive(Debug, Default)]
pub struct PoolStats {
    pub received: AtomicU64,
    pub processed: AtomicU64,
    pub traps: AtomicU64,
    pub timeouts: AtomicU64,
    pub memory_limits: AtomicU64,
    /// Instances replaced after a fault.
    pub restarts: AtomicU64,
    pub created: AtomicU64,
    pub prewarmed: AtomicU64,
    pub reused: AtomicU64,
    /// Instances destroyed because they failed.
    pub killed: AtomicU64,
    /// Instances reaped for idleness.
    pub idled: AtomicU64,
    /// Instances retired at the end of a normal life (max_jobs, high water,
    /// guest asked, reset).
    pub retired: AtomicU64,
    pub busy: AtomicU64,
    /// Times the function was quarantined (sabuhp's TotalEscalations).
    pub escalations: AtomicU64,
    /// Calls refused while quarantined.
    pub quarantine_refusals: AtomicU64,
}

impl PoolStats {
    pub fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn sub(counter: &AtomicU64) {
        counter.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// A point-in-time copy of a slot's stats, for `/v1/status` `details`.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct PoolStatsSnapshot {
    pub received: u64,
    pub processed: u64,
    pub traps: u64,
    pub timeouts: u64,
    pub memory_limits: u64,
    pub restarts: u64,
    /// Live instances, busy or ready.
    pub current: u64,
    pub busy: u64,
    pub ready: u64,
    pub created: u64,
    pub prewarmed: u64,
    pub reused: u64,
    pub killed: u64,
    pub idled: u64,
    pub retired: u64,
    /// Calls that could start now without waiting: ready instances plus
    /// room under `max_concurrency` (or `null` when unbounded).
    pub available: Option<u64>,
    pub escalations: u64,
    pub quarantine_refusals: u64,
    /// Whether the function is quarantined here now.
    pub quarantined: bool,
    /// Milliseconds until the next probe, while quarantined.
    pub quarantined_for_ms: Option<u64>,
    pub escalation_policy: EscalationPolicy,
}

/// One event in the life of a slot's pool; emitted to tracing and counted
/// in the metrics.
#[derive(Debug, Clone, PartialEq)]
pub enum PoolEvent {
    /// An instance was made (on a call's path, or ahead of demand).
    Created { prewarmed: bool, duration: Duration },
    /// A ready instance took another call.
    Reused,
    /// An instance stopped serving calls.
    Retired { reason: RetireReason },
    /// A call failed because of the guest.
    Fault { kind: FaultKind },
    /// `restart_all`: idle instances were retired after a fault.
    Escalated { retired: usize },
    /// The function was quarantined.
    Quarantined { backoff: Duration },
    /// A probe call was let through a quarantine.
    Probe,
    /// The probe failed; the quarantine goes on.
    ProbeFailed { backoff: Duration },
    /// The quarantine was lifted.
    Lifted,
    /// The pool was reset (or reconfigured) by an operator.
    Reset,
}

impl PoolEvent {
    /// The event's name, as the `event` metric label and in the log.
    pub fn name(&self) -> &'static str {
        match self {
            PoolEvent::Created { .. } => "created",
            PoolEvent::Reused => "reused",
            PoolEvent::Retired { reason } if reason.is_fault() => "killed",
            PoolEvent::Retired { .. } => "retired",
            PoolEvent::Fault { .. } => "fault",
            PoolEvent::Escalated { .. } => "escalation",
            PoolEvent::Quarantined { .. } => "quarantine",
            PoolEvent::Probe => "probe",
            PoolEvent::ProbeFailed { .. } => "probe_failed",
            PoolEvent::Lifted => "lift",
            PoolEvent::Reset => "reset",
        }
    }
}

/// Every event name, in `PoolEvent::index` order.
pub const EVENT_NAMES: [&str; 11] = [
    "created",
    "reused",
    "retired",
    "killed",
    "fault",
    "escalation",
    "quarantine",
    "probe",
    "probe_failed",
    "lift",
    "reset",
];

impl PoolEvent {
    /// Position of the event's name in `EVENT_NAMES`.
    pub fn index(&self) -> usize {
        EVENT_NAMES
            .iter()
            .position(|name| *name == self.name())
            .unwrap_or(0)
    }
}

/// Receives pool events (the metrics module implements it). A slot asks
/// once, when it is made, for its function's sink, so that an event costs
/// no lookup.
pub trait PoolObserver: Send + Sync + 'static {
    fn events(&self, function: &str) -> Arc<dyn PoolEvents>;
}

/// One function's pool events.
pub trait PoolEvents: Send + Sync {
    fn on_event(&self, event: &PoolEvent);
}

/// Observer that ignores everything (for `invoke` and tests).
pub struct NoObserver;

impl PoolObserver for NoObserver {
    fn events(&self, _: &str) -> Arc<dyn PoolEvents> {
        Arc::new(NoObserver)
    }
}

impl PoolEvents for NoObserver {
    fn on_event(&self, _: &PoolEvent) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn end(fault: Option<FaultKind>, calls_served: u32) -> CallEnd {
        CallEnd {
            fault,
            calls_served,
            memory_bytes: 1 << 20,
            guest_asked: false,
        }
    }

    #[test]
    fn a_faulted_instance_is_always_retired_with_the_fault_as_reason() {
        assert_eq!(
            after_call(end(Some(FaultKind::Trap), 1), 100, None),
            AfterCall::Retire(RetireReason::Trap)
        );
        assert_eq!(
            after_call(end(Some(FaultKind::Timeout), 1), 100, None),
            AfterCall::Retire(RetireReason::Timeout)
        );
        assert_eq!(
            after_call(end(Some(FaultKind::MemoryLimit), 1), 100, None),
            AfterCall::Retire(RetireReason::MemoryLimit)
        );
        assert_eq!(
            after_call(end(Some(FaultKind::Canceled), 1), 100, None),
            AfterCall::Retire(RetireReason::Error)
        );
    }

    #[test]
    fn an_instance_is_reused_until_max_jobs() {
        assert_eq!(after_call(end(None, 1), 3, None), AfterCall::Keep);
        assert_eq!(after_call(end(None, 2), 3, None), AfterCall::Keep);
        assert_eq!(
            after_call(end(None, 3), 3, None),
            AfterCall::Retire(RetireReason::MaxJobs)
        );
        assert_eq!(
            after_call(end(None, 1), 1, None),
            AfterCall::Retire(RetireReason::MaxJobs)
        );
    }

    #[test]
    fn growth_past_the_high_water_mark_or_a_guest_request_retires() {
        let big = CallEnd {
            memory_bytes: 65 << 20,
            ..end(None, 1)
        };
        assert_eq!(
            after_call(big, 10, Some(64 << 20)),
            AfterCall::Retire(RetireReason::HighWater)
        );
        assert_eq!(after_call(big, 10, None), AfterCall::Keep);
        let asked = CallEnd {
            guest_asked: true,
            ..end(None, 1)
        };
        assert_eq!(
            after_call(asked, 10, None),
            AfterCall::Retire(RetireReason::GuestAsked)
        );
    }

    #[test]
    fn admission_waits_at_max_concurrency_and_prefers_ready_instances() {
        assert_eq!(admit(2, Some(2), 5), Admit::Wait);
        assert_eq!(admit(1, Some(2), 1), Admit::Ready);
        assert_eq!(admit(1, Some(2), 0), Admit::Create);
        assert_eq!(admit(1000, None, 0), Admit::Create);
    }

    #[test]
    fn prewarming_fills_to_min_warm_within_max_concurrency() {
        assert_eq!(prewarm_deficit(0, 0, 2, None), 2);
        assert_eq!(prewarm_deficit(1, 5, 2, None), 1);
        assert_eq!(prewarm_deficit(2, 0, 2, None), 0);
        assert_eq!(prewarm_deficit(0, 2, 2, Some(3)), 1);
    }

    fn supervision(escalate_after: u32) -> Supervision {
        Supervision {
            escalate_after,
            window: Duration::from_secs(10),
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(300),
            ..Supervision::default()
        }
    }

    #[test]
    fn consecutive_faults_quarantine_and_a_success_resets_the_streak() {
        let config = supervision(3);
        let t0 = Instant::now();
        let mut s = Supervisor::default();
        assert_eq!(s.record(true, false, t0, &config), None);
        assert_eq!(s.record(true, false, t0, &config), None);
        assert_eq!(
            s.record(false, false, t0, &config),
            None,
            "a success resets the streak"
        );
        assert_eq!(s.record(true, false, t0, &config), None);
        assert_eq!(s.record(true, false, t0, &config), None);
        assert_eq!(
            s.record(true, false, t0, &config),
            Some(Transition::Quarantined {
                backoff: Duration::from_millis(100)
            })
        );
        assert!(matches!(s.gate(t0), Gate::Refuse { .. }));
    }

    #[test]
    fn faults_outside_the_window_start_a_new_streak() {
        let config = supervision(2);
        let t0 = Instant::now();
        let mut s = Supervisor::default();
        assert_eq!(s.record(true, false, t0, &config), None);
        assert_eq!(s.record(true, false, t0 + Duration::from_secs(11), &config), None);
        assert!(
            s.record(true, false, t0 + Duration::from_secs(12), &config)
                .is_some()
        );
    }

    #[test]
    fn one_probe_after_the_backoff_lifts_or_doubles_up_to_the_cap() {
        let config = supervision(1);
        let t0 = Instant::now();
        let mut s = Supervisor::default();
        assert!(s.record(true, false, t0, &config).is_some());
        assert!(matches!(
            s.gate(t0 + Duration::from_millis(50)),
            Gate::Refuse { .. }
        ));
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(s.gate(t1), Gate::Probe);
        assert!(matches!(s.gate(t1), Gate::Refuse { .. }), "one probe at a time");
        assert_eq!(
            s.record(false, false, t1, &config),
            None,
            "non-probe results are ignored"
        );
        assert_eq!(
            s.record(true, true, t1, &config),
            Some(Transition::ProbeFailed {
                backoff: Duration::from_millis(200)
            })
        );
        let t2 = t1 + Duration::from_millis(200);
        assert_eq!(s.gate(t2), Gate::Probe);
        assert_eq!(
            s.record(true, true, t2, &config),
            Some(Transition::ProbeFailed {
                backoff: Duration::from_millis(300)
            }),
            "capped"
        );
        let t3 = t2 + Duration::from_millis(300);
        assert_eq!(s.gate(t3), Gate::Probe);
        assert_eq!(s.record(false, true, t3, &config), Some(Transition::Lifted));
        assert_eq!(s.gate(t3), Gate::Admit);
    }

    #[test]
    fn escalate_after_zero_never_quarantines() {
        let config = supervision(0);
        let mut s = Supervisor::default();
        for _ in 0..100 {
            assert_eq!(s.record(true, false, Instant::now(), &config), None);
        }
        assert!(!s.is_quarantined());
    }

    #[test]
    fn idle_instances_are_reaped_after_the_timeout_down_to_min_warm() {
        let t0 = Instant::now();
        let later = t0 + Duration::from_millis(200);
        let timeout = Duration::from_millis(100);
        assert!(should_reap(t0, later, timeout, 3, 0));
        assert!(!should_reap(t0, t0 + Duration::from_millis(50), timeout, 3, 0));
        assert!(!should_reap(t0, later, timeout, 2, 2), "min_warm instances stay");
        assert!(should_reap(t0, later, timeout, 3, 2));
    }
}
