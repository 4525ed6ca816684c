//! Pool policy, instance states, events and per-slot statistics.
//!
//! The decisions are small pure functions returning enums (as `wasmtime
//! serve`'s `should_accept`), so they are tested without running Wasm. The
//! slot (`slot.rs`) applies them to real instances.

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
}

impl RetireReason {
    pub const ALL: [RetireReason; 9] = [
        RetireReason::Trap,
        RetireReason::Timeout,
        RetireReason::MemoryLimit,
        RetireReason::MaxJobs,
        RetireReason::Idle,
        RetireReason::HighWater,
        RetireReason::Error,
        RetireReason::GuestAsked,
        RetireReason::Reset,
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
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
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
}

/// Receives pool events (the metrics module implements it).
pub trait PoolObserver: Send + Sync + 'static {
    fn on_event(&self, function: &str, event: &PoolEvent);
}

/// Observer that ignores everything (for `invoke` and tests).
pub struct NoObserver;

impl PoolObserver for NoObserver {
    fn on_event(&self, _: &str, _: &PoolEvent) {}
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
