//! Metric families of the pools and the module store: instances created,
//! reused and retired per function (the function name, never the slot hash,
//! to bound cardinality), guest faults, cold starts (compiled vs loaded)
//! and their durations, and compile times. Call-level families live with
//! the runner (`runner::CallMetrics`), core dumps with `coredump`.

use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::guest::FaultKind;
use crate::module_store::LoadSource;
use std::sync::{Arc, OnceLock};

use crate::pool::{EVENT_NAMES, PoolEvent, PoolEvents, PoolObserver, RetireReason};
use crate::runner::{ColdStartObserver, latency_buckets};
use crate::slot::Slot;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FunctionLabels {
    function: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CreatedLabels {
    function: String,
    when: CreatedWhen,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
enum CreatedWhen {
    /// On a call's path.
    on_call,
    /// Ahead of demand (`min_warm`).
    prewarm,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RetiredLabels {
    function: String,
    reason: RetiredReason,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
enum RetiredReason {
    trap,
    timeout,
    oom,
    max_jobs,
    idle,
    high_water,
    error,
    guest_asked,
    reset,
    escalation,
}

impl From<RetireReason> for RetiredReason {
    fn from(reason: RetireReason) -> Self {
        match reason {
            RetireReason::Trap => RetiredReason::trap,
            RetireReason::Timeout => RetiredReason::timeout,
            RetireReason::MemoryLimit => RetiredReason::oom,
            RetireReason::MaxJobs => RetiredReason::max_jobs,
            RetireReason::Idle => RetiredReason::idle,
            RetireReason::HighWater => RetiredReason::high_water,
            RetireReason::Error => RetiredReason::error,
            RetireReason::GuestAsked => RetiredReason::guest_asked,
            RetireReason::Reset => RetiredReason::reset,
            RetireReason::Escalation => RetiredReason::escalation,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FaultLabels {
    function: String,
    kind: FaultLabel,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
enum FaultLabel {
    trap,
    timeout,
    oom,
    other,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ColdStartLabels {
    function: String,
    source: SourceLabel,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
enum SourceLabel {
    /// Compiled from the module bytes.
    compiled,
    /// Loaded from the module store on disk.
    store,
    /// Already in memory (another slot of the same module).
    memory,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    function: String,
    event: &'static str,
}

/// The pool and cold-start families.
#[derive(Clone)]
pub struct PoolMetrics {
    events: Family<EventLabels, Counter>,
    created: Family<CreatedLabels, Counter>,
    reused: Family<FunctionLabels, Counter>,
    retired: Family<RetiredLabels, Counter>,
    faults: Family<FaultLabels, Counter>,
    cold_starts: Family<ColdStartLabels, Counter>,
    cold_start_duration: Family<FunctionLabels, Histogram>,
    instantiate_duration: Family<FunctionLabels, Histogram>,
    compile_duration: Histogram,
}

impl PoolMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            events: Family::default(),
            created: Family::default(),
            reused: Family::default(),
            retired: Family::default(),
            faults: Family::default(),
            cold_starts: Family::default(),
            cold_start_duration: Family::new_with_constructor(|| Histogram::new(latency_buckets())),
            instantiate_duration: Family::new_with_constructor(|| Histogram::new(latency_buckets())),
            compile_duration: Histogram::new(latency_buckets()),
        };
        registry.register(
            "fnrunner_pool_events",
            "Every pool event by function: created, reused, retired, killed, fault, escalation, quarantine, probe, probe_failed, lift, reset",
            metrics.events.clone(),
        );
        registry.register(
            "fnrunner_instances_created",
            "Instances made, on a call's path or ahead of demand",
            metrics.created.clone(),
        );
        registry.register(
            "fnrunner_instances_reused",
            "Calls served by an instance that had served before",
            metrics.reused.clone(),
        );
        registry.register(
            "fnrunner_instances_retired",
            "Instances destroyed, by reason",
            metrics.retired.clone(),
        );
        registry.register(
            "fnrunner_guest_faults",
            "Calls that failed because of the guest (trap, timeout, memory limit, other)",
            metrics.faults.clone(),
        );
        registry.register(
            "fnrunner_cold_starts",
            "Slots made (first call or prewarm), by where the compiled module came from",
            metrics.cold_starts.clone(),
        );
        registry.register_with_unit(
            "fnrunner_cold_start_duration",
            "Time to make a slot: load or compile the module, then prepare it",
            Unit::Seconds,
            metrics.cold_start_duration.clone(),
        );
        registry.register_with_unit(
            "fnrunner_instantiate_duration",
            "Time to make one instance",
            Unit::Seconds,
            metrics.instantiate_duration.clone(),
        );
        registry.register_with_unit(
            "fnrunner_compile_duration",
            "Time to compile a module (cache misses only)",
            Unit::Seconds,
            metrics.compile_duration.clone(),
        );
        metrics
    }

    /// Records one compile (the module store calls this).
    pub fn compiled(&self, duration: Duration) {
        self.compile_duration.observe(duration.as_secs_f64());
    }
}

fn function(name: &str) -> FunctionLabels {
    FunctionLabels {
        function: name.to_owned(),
    }
}

impl PoolObserver for PoolMetrics {
    fn events(&self, name: &str) -> Arc<dyn PoolEvents> {
        Arc::new(FunctionPoolMetrics {
            families: self.clone(),
            function: name.to_owned(),
            events: Default::default(),
            created: Default::default(),
            reused: OnceLock::new(),
            retired: Default::default(),
            faults: Default::default(),
            instantiate: OnceLock::new(),
        })
    }
}

/// One function's series, looked up on first use and then held, so an
/// event costs no label hashing or allocation.
struct FunctionPoolMetrics {
    families: PoolMetrics,
    function: String,
    events: [OnceLock<Counter>; EVENT_NAMES.len()],
    /// `[on_call, prewarm]`.
    created: [OnceLock<Counter>; 2],
    reused: OnceLock<Counter>,
    retired: [OnceLock<Counter>; RetireReason::ALL.len()],
    /// `[trap, timeout, oom, other]`.
    faults: [OnceLock<Counter>; 4],
    instantiate: OnceLock<Histogram>,
}

impl PoolEvents for FunctionPoolMetrics {
    fn on_event(&self, event: &PoolEvent) {
        let f = &self.families;
        let name = || self.function.clone();
        self.events[event.index()]
            .get_or_init(|| {
                f.events
                    .get_or_create(&EventLabels {
                        function: name(),
                        event: event.name(),
                    })
                    .clone()
            })
            .inc();
        match event {
            PoolEvent::Created { prewarmed, duration } => {
                let when = if *prewarmed {
                    CreatedWhen::prewarm
                } else {
                    CreatedWhen::on_call
                };
                self.created[usize::from(*prewarmed)]
                    .get_or_init(|| {
                        f.created
                            .get_or_create(&CreatedLabels {
                                function: name(),
                                when,
                            })
                            .clone()
                    })
                    .inc();
                self.instantiate
                    .get_or_init(|| {
                        f.instantiate_duration
                            .get_or_create(&function(&self.function))
                            .clone()
                    })
                    .observe(duration.as_secs_f64());
            }
            PoolEvent::Reused => {
                self.reused
                    .get_or_init(|| f.reused.get_or_create(&function(&self.function)).clone())
                    .inc();
            }
            PoolEvent::Retired { reason } => {
                let index = RetireReason::ALL.iter().position(|r| r == reason).unwrap_or(0);
                self.retired[index]
                    .get_or_init(|| {
                        f.retired
                            .get_or_create(&RetiredLabels {
                                function: name(),
                                reason: (*reason).into(),
                            })
                            .clone()
                    })
                    .inc();
            }
            PoolEvent::Fault { kind } => {
                let (index, kind) = match kind {
                    FaultKind::Trap => (0, FaultLabel::trap),
                    FaultKind::Timeout => (1, FaultLabel::timeout),
                    FaultKind::MemoryLimit => (2, FaultLabel::oom),
                    _ => (3, FaultLabel::other),
                };
                self.faults[index]
                    .get_or_init(|| {
                        f.faults
                            .get_or_create(&FaultLabels {
                                function: name(),
                                kind,
                            })
                            .clone()
                    })
                    .inc();
            }
            PoolEvent::Escalated { .. }
            | PoolEvent::Quarantined { .. }
            | PoolEvent::Probe
            | PoolEvent::ProbeFailed { .. }
            | PoolEvent::Lifted
            | PoolEvent::Reset => {}
        }
    }
}

impl ColdStartObserver for PoolMetrics {
    fn cold_start(&self, name: &str, slot: &Slot) {
        let cold = slot.cold_start();
        let source = match cold.source {
            LoadSource::Compiler => SourceLabel::compiled,
            LoadSource::Store => SourceLabel::store,
            LoadSource::Memory => SourceLabel::memory,
        };
        self.cold_starts
            .get_or_create(&ColdStartLabels {
                function: name.to_owned(),
                source,
            })
            .inc();
        self.cold_start_duration
            .get_or_create(&function(name))
            .observe((cold.load_time + cold.prepare_time).as_secs_f64());
    }
}

/// Content type of OpenMetrics text.
pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Content type of the Prometheus text format 0.0.4.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Renders the registry: OpenMetrics text when the scraper accepts it (as
/// Prometheus does), otherwise the Prometheus 0.0.4 text format that older
/// tools (curl, `promtool check metrics`) read. Returns the text and its
/// content type.
pub fn render(registry: &Registry, accept: &str) -> Result<(String, &'static str), std::fmt::Error> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry)?;
    if accept.contains("application/openmetrics-text") {
        return Ok((text, OPENMETRICS_CONTENT_TYPE));
    }
    Ok((openmetrics_to_prometheus(&text), PROMETHEUS_CONTENT_TYPE))
}

/// OpenMetrics → Prometheus 0.0.4 text: counters' `HELP`/`TYPE` lines take
/// the `_total` name their samples carry, and `UNIT`/`EOF` lines go.
fn openmetrics_to_prometheus(text: &str) -> String {
    let counters: std::collections::HashSet<&str> = text
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(line) => out.push_str(&line),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_names_counter_metadata_like_its_samples() {
        let openmetrics = "# HELP a_calls Calls.\n# TYPE a_calls counter\na_calls_total 2\n\
                           # HELP d Time.\n# TYPE d histogram\n# UNIT d seconds\nd_count 1\n# EOF\n";
        let text = openmetrics_to_prometheus(openmetrics);
        assert_eq!(
            text,
            "# HELP a_calls_total Calls.\n# TYPE a_calls_total counter\na_calls_total 2\n\
             # HELP d Time.\n# TYPE d histogram\nd_count 1\n"
        );
    }
}
