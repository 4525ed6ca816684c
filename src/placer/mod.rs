//! The client side of Fn's runnerpool: `Runner` (`try_exec`, `status`,
//! `close`, `address`) implemented by `LocalRunner` and by `RemoteRunner`,
//! `RunnerPool` (with a static pool), and `Placer` with the naive
//! (round-robin) and consistent-hash strategies under `PlacerConfig`.
//!
//! Placement (Fn's placer semantics): try the runners in the strategy's
//! order; a NACK or a connection that could not be made moves on to the
//! next; after a full pass with no taker wait `retry_all_delay`, fetch the
//! runner list again, and go round again — until `placer_timeout` (or
//! `detached_placer_timeout`) or the call's own deadline. A call a runner
//! committed to is never tried again elsewhere, whatever its outcome; a
//! failure after the request was sent is not retried either (at most once).

mod local;
mod remote;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

pub use remote::RemoteRunner;

use crate::call::CallOptions;
use crate::guest::GuestBody;
use crate::runner::RunnerStatus;

/// Fn's runner contract.
pub trait Runner: Send + Sync {
    /// Offers the call: `Placed` when the runner committed to it (its
    /// answer, whatever the status), `Nack` when it refused it at once.
    fn try_exec<'a>(&'a self, call: &'a PlacedCall) -> BoxFuture<'a, Result<Attempt, RunnerError>>;
    fn status(&self) -> BoxFuture<'_, Result<RunnerStatus, RunnerError>>;
    fn close(&self) -> BoxFuture<'_, Result<(), RunnerError>>;
    fn address(&self) -> &str;
}

/// A call as the placer offers it to runners: replayable, its body held.
#[derive(Debug, Clone)]
pub struct PlacedCall {
    pub function: String,
    pub method: http::Method,
    /// Path and query after `/fn/{function}`.
    pub path_and_query: http::uri::PathAndQuery,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    pub options: CallOptions,
    /// When the call arrived (its deadline counts from here).
    pub created: Instant,
}

impl PlacedCall {
    /// Time left before the call's own deadline, if it has one.
    pub fn time_left(&self) -> Option<Duration> {
        self.options
            .timeout
            .map(|t| t.saturating_sub(self.created.elapsed()))
    }
}

/// What a runner did with an offered call.
pub enum Attempt {
    /// Committed: this is the call's answer.
    Placed(http::Response<GuestBody>),
    /// Refused at once (`fn-runner-nack`); nothing ran.
    Nack { reason: String },
}

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    /// The runner could not be reached; the call was not sent.
    #[error("runner {address} unreachable: {reason}")]
    Unreachable { address: String, reason: String },
    /// The exchange failed after the call was sent: it may have run.
    #[error("runner {address} failed: {reason}")]
    Failed { address: String, reason: String },
}

/// Fn's PlacerConfig.
#[derive(Debug, Clone)]
pub struct PlacerConfig {
    /// After every runner was tried, wait this long before another pass.
    pub retry_all_delay: Duration,
    /// Longest a placer holds a call while looking for a taker.
    pub placer_timeout: Duration,
    /// The same, for detached calls.
    pub detached_placer_timeout: Duration,
}

/// Fn's defaults.
impl Default for PlacerConfig {
    fn default() -> Self {
        Self {
            retry_all_delay: Duration::from_millis(10),
            placer_timeout: Duration::from_secs(360),
            detached_placer_timeout: Duration::from_secs(30),
        }
    }
}

/// Fn's RunnerPool: the runners a call may be placed on, in order.
pub trait RunnerPool: Send + Sync {
    fn runners<'a>(&'a self, call: &'a PlacedCall) -> BoxFuture<'a, Result<Vec<Arc<dyn Runner>>, PoolError>>;
    fn shutdown(&self) -> BoxFuture<'_, Result<(), PoolError>>;
}

#[derive(Debug, thiserror::Error)]
#[error("runner pool: {0}")]
pub struct PoolError(pub String);

/// A fixed list of runners.
pub struct StaticRunnerPool {
    runners: Vec<Arc<dyn Runner>>,
}

impl StaticRunnerPool {
    pub fn new(runners: Vec<Arc<dyn Runner>>) -> Self {
        Self { runners }
    }
}

impl RunnerPool for StaticRunnerPool {
    fn runners<'a>(
        &'a self,
        _call: &'a PlacedCall,
    ) -> BoxFuture<'a, Result<Vec<Arc<dyn Runner>>, PoolError>> {
        Box::pin(async move { Ok(self.runners.clone()) })
    }

    fn shutdown(&self) -> BoxFuture<'_, Result<(), PoolError>> {
        Box::pin(async move {
            for runner in &self.runners {
                runner.close().await.map_err(|e| PoolError(e.to_string()))?;
            }
            Ok(())
        })
    }
}

/// Why a call could not be placed.
#[derive(Debug, thiserror::Error)]
pub enum PlaceError {
    /// No runner took it before the placer timeout or the call's deadline.
    #[error("no runner took the call within {0:?} ({1} attempts)")]
    NoTaker(Duration, u64),
    /// A runner failed after the call was sent; it is not retried.
    #[error(transparent)]
    Runner(RunnerError),
    #[error(transparent)]
    Pool(PoolError),
}

/// A placed call: the answer and who gave it.
pub struct Placement {
    pub response: http::Response<GuestBody>,
    pub runner: String,
    pub attempts: u64,
}

/// Fn's Placer.
pub trait Placer: Send + Sync {
    fn place_call<'a>(
        &'a self,
        pool: &'a dyn RunnerPool,
        call: &'a PlacedCall,
    ) -> BoxFuture<'a, Result<Placement, PlaceError>>;
    fn config(&self) -> &PlacerConfig;
}

/// Round robin from a start that varies per placer (Fn's naive placer).
pub struct NaivePlacer {
    config: PlacerConfig,
    next: AtomicU64,
    metrics: Option<PlacerMetrics>,
}

impl NaivePlacer {
    pub fn new(config: PlacerConfig, metrics: Option<PlacerMetrics>) -> Self {
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::from(d.subsec_nanos()));
        Self {
            config,
            next: AtomicU64::new(start),
            metrics,
        }
    }
}

impl Placer for NaivePlacer {
    fn place_call<'a>(
        &'a self,
        pool: &'a dyn RunnerPool,
        call: &'a PlacedCall,
    ) -> BoxFuture<'a, Result<Placement, PlaceError>> {
        // NB: lazily, one round-robin step per attempt (as Fn's): a call
        // placed on its first try moves the next call on by one runner.
        let next = &self.next;
        Box::pin(place(
            &self.config,
            self.metrics.as_ref(),
            pool,
            call,
            move |count| {
                Box::new(
                    (0..count).map(move |_| (next.fetch_add(1, Ordering::Relaxed) % count as u64) as usize),
                )
            },
        ))
    }

    fn config(&self) -> &PlacerConfig {
        &self.config
    }
}

/// Consistent hashing on the function (Fn's CH placer): SipHash-2-4 of the
/// function id, keys 0 and 0x4c617279426f6174; jump consistent hash over
/// the runner count picks the first; then the ring is walked once.
pub struct ConsistentHashPlacer {
    config: PlacerConfig,
    metrics: Option<PlacerMetrics>,
}

impl ConsistentHashPlacer {
    pub fn new(config: PlacerConfig, metrics: Option<PlacerMetrics>) -> Self {
        Self { config, metrics }
    }
}

/// SipHash-2-4 of a function id with Fn's keys.
pub fn function_key(function: &str) -> u64 {
    use std::hash::Hasher;
    let mut hasher = siphasher::sip::SipHasher24::new_with_keys(0, 0x4c61_7279_426f_6174);
    hasher.write(function.as_bytes());
    hasher.finish()
}

/// Jump consistent hash (Lamping & Veach 2014), as the paper gives it. Fn's
/// Go port divides integers instead, `(b+1) * ((1<<31)/(key>>33) + 1)`,
/// which never lands a key on bucket 1 first; this follows the paper.
pub fn jump_consistent_hash(mut key: u64, buckets: usize) -> usize {
    let (mut b, mut j): (i64, i64) = (-1, 0);
    let buckets = buckets as i64;
    while j < buckets {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b.max(0) as usize
}

/// The runner (index) the consistent-hash placer tries first.
pub fn first_runner(function: &str, runners: usize) -> usize {
    jump_consistent_hash(function_key(function), runners)
}

impl Placer for ConsistentHashPlacer {
    fn place_call<'a>(
        &'a self,
        pool: &'a dyn RunnerPool,
        call: &'a PlacedCall,
    ) -> BoxFuture<'a, Result<Placement, PlaceError>> {
        Box::pin(place(&self.config, self.metrics.as_ref(), pool, call, |count| {
            let first = first_runner(&call.function, count);
            Box::new((0..count).map(move |step| (first + step) % count))
        }))
    }

    fn config(&self) -> &PlacerConfig {
        &self.config
    }
}

/// The runner indices of one pass, produced as the pass goes.
type PassOrder<'a> = Box<dyn Iterator<Item = usize> + Send + 'a>;

/// The placement loop both strategies share; `order` gives the runner
/// indices of one pass.
async fn place<'a>(
    config: &PlacerConfig,
    metrics: Option<&PlacerMetrics>,
    pool: &dyn RunnerPool,
    call: &PlacedCall,
    order: impl Fn(usize) -> PassOrder<'a> + Send,
) -> Result<Placement, PlaceError> {
    let started = Instant::now();
    let limit = if call.options.detached {
        config.detached_placer_timeout
    } else {
        config.placer_timeout
    };
    let limit = call.time_left().map_or(limit, |left| left.min(limit));
    let deadline = started + limit;
    let mut attempts = 0u64;
    let record = |outcome: PlacerOutcome| {
        if let Some(metrics) = metrics {
            metrics.record(outcome, started.elapsed());
        }
    };
    loop {
        let runners = match pool.runners(call).await {
            Ok(runners) => runners,
            Err(error) => {
                record(PlacerOutcome::PoolError);
                return Err(PlaceError::Pool(error));
            }
        };
        for index in order(runners.len()) {
            if Instant::now() >= deadline {
                break;
            }
            let runner = &runners[index];
            attempts += 1;
            if let Some(metrics) = metrics {
                metrics.attempts.inc();
            }
            match runner.try_exec(call).await {
                Ok(Attempt::Placed(response)) => {
                    let outcome = if response.status().is_server_error() {
                        PlacerOutcome::PlacedError
                    } else {
                        PlacerOutcome::PlacedOk
                    };
                    record(outcome);
                    return Ok(Placement {
                        response,
                        runner: runner.address().to_owned(),
                        attempts,
                    });
                }
                Ok(Attempt::Nack { reason }) => {
                    tracing::debug!(runner = runner.address(), reason, "NACK: trying the next runner");
                    if let Some(metrics) = metrics {
                        metrics.retries(RetryReason::busy).inc();
                    }
                }
                Err(RunnerError::Unreachable { address, reason }) => {
                    tracing::debug!(runner = address, reason, "unreachable: trying the next runner");
                    if let Some(metrics) = metrics {
                        metrics.retries(RetryReason::error).inc();
                    }
                }
                Err(error @ RunnerError::Failed { .. }) => {
                    record(PlacerOutcome::PlacedError);
                    return Err(PlaceError::Runner(error));
                }
            }
        }
        // A full pass with no taker: wait, then ask the pool again.
        if Instant::now() + config.retry_all_delay >= deadline {
            record(PlacerOutcome::Timeout);
            return Err(PlaceError::NoTaker(limit, attempts));
        }
        tokio::time::sleep(config.retry_all_delay).await;
    }
}

#[derive(Clone, Copy)]
enum PlacerOutcome {
    PlacedOk,
    PlacedError,
    Timeout,
    PoolError,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
enum RetryReason {
    /// The runner NACKed.
    busy,
    /// The runner could not be reached.
    error,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RetryLabels {
    reason: RetryReason,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
enum PlacedLabel {
    ok,
    error,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PlacedLabels {
    outcome: PlacedLabel,
}

/// Fn's placer tracker, as metrics: attempts, retries (on a NACK or an
/// unreachable runner), calls placed (ok / error), placer timeouts, and the
/// latency up to the last attempt.
#[derive(Clone)]
pub struct PlacerMetrics {
    attempts: Counter,
    retries: Family<RetryLabels, Counter>,
    placed: Family<PlacedLabels, Counter>,
    timeouts: Counter,
    latency: Histogram,
}

impl PlacerMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            attempts: Counter::default(),
            retries: Family::default(),
            placed: Family::default(),
            timeouts: Counter::default(),
            latency: Histogram::new(crate::runner::latency_buckets()),
        };
        registry.register(
            "fnrunner_placer_attempts",
            "Calls offered to runners",
            metrics.attempts.clone(),
        );
        registry.register(
            "fnrunner_placer_retries",
            "Offers that moved on to the next runner, by reason (busy: NACK; error: unreachable)",
            metrics.retries.clone(),
        );
        registry.register(
            "fnrunner_placer_placed",
            "Calls a runner committed to, by outcome (error: a 5xx or a failure after sending)",
            metrics.placed.clone(),
        );
        registry.register(
            "fnrunner_placer_timeouts",
            "Calls no runner took before the placer timeout or the call's deadline",
            metrics.timeouts.clone(),
        );
        registry.register_with_unit(
            "fnrunner_placer_latency",
            "Time from the start of placement to the last attempt",
            Unit::Seconds,
            metrics.latency.clone(),
        );
        metrics
    }

    fn retries(&self, reason: RetryReason) -> Counter {
        self.retries.get_or_create(&RetryLabels { reason }).clone()
    }

    fn record(&self, outcome: PlacerOutcome, latency: Duration) {
        self.latency.observe(latency.as_secs_f64());
        match outcome {
            PlacerOutcome::PlacedOk => self
                .placed
                .get_or_create(&PlacedLabels {
                    outcome: PlacedLabel::ok,
                })
                .inc(),
            PlacerOutcome::PlacedError => self
                .placed
                .get_or_create(&PlacedLabels {
                    outcome: PlacedLabel::error,
                })
                .inc(),
            PlacerOutcome::Timeout => self.timeouts.inc(),
            PlacerOutcome::PoolError => 0,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_keys_are_sip_hash_2_4_with_fns_keys() {
        // Computed by tests/data/ch_vectors.py, an independent SipHash-2-4.
        assert_eq!(function_key("hello"), 0x5868_f783_76cd_7df3);
        assert_eq!(function_key(""), 0x4dcc_f8f6_e62e_a9ad);
    }

    #[test]
    fn jump_hash_spreads_keys_and_moves_few_when_runners_are_added() {
        let mut counts = [0usize; 5];
        let mut moved = 0;
        for k in 0..10_000u32 {
            let key = function_key(&k.to_string());
            let bucket = jump_consistent_hash(key, 5);
            counts[bucket] += 1;
            if jump_consistent_hash(key, 6) != bucket {
                moved += 1;
            }
        }
        assert!(counts.iter().all(|&c| (1800..2200).contains(&c)), "{counts:?}");
        assert!(
            (1400..1900).contains(&moved),
            "about a sixth move to the new runner: {moved}"
        );
        assert_eq!(jump_consistent_hash(12345, 1), 0);
        assert_eq!(jump_consistent_hash(12345, 0), 0);
    }
}
