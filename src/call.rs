//! The call: its id, its timestamps (created → started → completed), its
//! user execution time, and its outcome. A `Call` reports exactly once: when
//! it is completed, or — if whatever was running it is dropped first, as
//! when a client goes away — as canceled.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;

use crate::function::SlotHashId;
use crate::guest::{CallError, FaultKind};

/// A call id: kept from the `fn-call-id` header when it is sane, otherwise
/// a new ULID (time-ordered, as Fn's ids are).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CallId(Arc<str>);

/// Longest call id accepted from a client.
pub const MAX_CALL_ID_LEN: usize = 128;

impl CallId {
    pub fn new() -> Self {
        Self(ulid::Ulid::new().to_string().into())
    }

    /// Accepts an id chosen by the LB or client if it is 1-128 characters
    /// of `[A-Za-z0-9._:-]`; anything else gets `None`.
    pub fn from_client(value: &str) -> Option<Self> {
        let ok = !value.is_empty()
            && value.len() <= MAX_CALL_ID_LEN
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
        ok.then(|| Self(value.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for CallId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for CallId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Fn's call statuses, as the `call_status` metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CallStatus {
    Completed,
    Canceled,
    Timeouts,
    Errors,
    ServerBusy,
}

impl CallStatus {
    pub const ALL: [CallStatus; 5] = [
        CallStatus::Completed,
        CallStatus::Canceled,
        CallStatus::Timeouts,
        CallStatus::Errors,
        CallStatus::ServerBusy,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CallStatus::Completed => "completed",
            CallStatus::Canceled => "canceled",
            CallStatus::Timeouts => "timeouts",
            CallStatus::Errors => "errors",
            CallStatus::ServerBusy => "server_busy",
        }
    }
}

/// How the instance a call ran on came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceUse {
    /// The call never got an instance.
    None,
    /// A new instance was made for the call (instantiate on the call path).
    Fresh,
    /// An instance made ahead of the call (prewarmed) served it.
    Prewarmed,
    /// An instance that had served earlier calls served it again.
    Reused,
}

/// Everything known about a finished call.
#[derive(Debug, Clone)]
pub struct CallReport {
    pub id: CallId,
    pub function: Arc<str>,
    pub slot_hash: SlotHashId,
    pub created_at: SystemTime,
    /// When the guest was entered.
    pub started_at: Option<SystemTime>,
    pub completed_at: SystemTime,
    /// Created → completed.
    pub total: Duration,
    /// Wall time inside guest code (see `guest` for what counts).
    pub user_execution_time: Duration,
    /// Time spent instantiating on the call path (zero for a ready instance).
    pub instantiate_time: Duration,
    pub instance: InstanceUse,
    /// `Ok(status)` with the guest's own status, or how the call failed.
    pub outcome: Result<http::StatusCode, CallError>,
    /// Guest log output kept for this call, and the count of dropped bytes.
    pub log: (Bytes, usize),
    pub coredump: Option<Vec<u8>>,
    /// The call's tracing span (call id, function, slot hash, outcome).
    pub span: tracing::Span,
}

impl CallReport {
    /// Total latency minus user execution time, clamped at zero: the time
    /// the call spent in the runner (Fn's scheduler latency).
    pub fn scheduler_time(&self) -> Duration {
        self.total.saturating_sub(self.user_execution_time)
    }

    pub fn status(&self) -> CallStatus {
        match &self.outcome {
            Ok(_) => CallStatus::Completed,
            Err(error) => call_status_of(error.kind()),
        }
    }
}

/// The `call_status` a failure counts under (DESIGN.md's table).
pub fn call_status_of(kind: FaultKind) -> CallStatus {
    match kind {
        FaultKind::Timeout => CallStatus::Timeouts,
        FaultKind::Canceled => CallStatus::Canceled,
        FaultKind::Busy => CallStatus::ServerBusy,
        FaultKind::Trap
        | FaultKind::MemoryLimit
        | FaultKind::OutputTooLarge
        | FaultKind::BadOutput
        | FaultKind::Exit
        | FaultKind::NoResponse
        | FaultKind::BodyTooLarge
        | FaultKind::BodyRead
        | FaultKind::Internal => CallStatus::Errors,
    }
}

type OnComplete = Box<dyn FnOnce(CallReport) + Send>;

/// A call in flight. Completing it (or dropping it) hands its report to
/// the `on_complete` callback given at creation, exactly once.
pub struct Call {
    pub id: CallId,
    pub function: Arc<str>,
    pub slot_hash: SlotHashId,
    pub deadline: Instant,
    created: Instant,
    created_at: SystemTime,
    started_at: Option<SystemTime>,
    user_execution_time: Duration,
    instantiate_time: Duration,
    instance: InstanceUse,
    log: (Bytes, usize),
    coredump: Option<Vec<u8>>,
    span: tracing::Span,
    on_complete: Option<OnComplete>,
}

impl Call {
    pub fn new(
        id: CallId,
        function: Arc<str>,
        slot_hash: SlotHashId,
        created: Instant,
        deadline: Instant,
        on_complete: impl FnOnce(CallReport) + Send + 'static,
    ) -> Self {
        let span = tracing::info_span!(
            "call",
            call_id = %id,
            function = %function,
            slot = slot_hash.short(),
            outcome = tracing::field::Empty,
        );
        Self {
            span,
            id,
            function,
            slot_hash,
            deadline,
            created,
            created_at: SystemTime::now() - created.elapsed(),
            started_at: None,
            user_execution_time: Duration::ZERO,
            instantiate_time: Duration::ZERO,
            instance: InstanceUse::None,
            log: (Bytes::new(), 0),
            coredump: None,
            on_complete: Some(Box::new(on_complete)),
        }
    }

    /// The call's span: everything logged while running the call is in it.
    pub fn span(&self) -> &tracing::Span {
        &self.span
    }

    /// Records that the guest was entered at `at`.
    pub fn started(&mut self, at: Instant) {
        self.started_at = Some(SystemTime::now() - at.elapsed());
    }

    pub fn set_instance(&mut self, instance: InstanceUse, instantiate_time: Duration) {
        self.instance = instance;
        self.instantiate_time += instantiate_time;
    }

    /// Fn's `AddUserExecutionTime`.
    pub fn add_user_execution_time(&mut self, time: Duration) {
        self.user_execution_time += time;
    }

    /// Attaches the guest's log and core dump (if any) to the report.
    pub fn set_artifacts(&mut self, log: (Bytes, usize), coredump: Option<Vec<u8>>) {
        self.log = log;
        self.coredump = coredump;
    }

    /// Time since the call was created.
    pub fn elapsed(&self) -> Duration {
        self.created.elapsed()
    }

    /// User execution time recorded so far.
    pub fn user_execution_time(&self) -> Duration {
        self.user_execution_time
    }

    /// Finishes the call with `outcome` and reports it.
    pub fn complete(mut self, outcome: Result<http::StatusCode, CallError>) {
        self.finish(outcome);
    }

    fn finish(&mut self, outcome: Result<http::StatusCode, CallError>) {
        let Some(on_complete) = self.on_complete.take() else {
            return;
        };
        let total = self.created.elapsed();
        let outcome_label = match &outcome {
            Ok(status) => status.as_u16().to_string(),
            Err(error) => error.kind().code().to_owned(),
        };
        self.span.record("outcome", outcome_label.as_str());
        on_complete(CallReport {
            id: self.id.clone(),
            function: self.function.clone(),
            slot_hash: self.slot_hash.clone(),
            created_at: self.created_at,
            started_at: self.started_at,
            completed_at: self.created_at + total,
            total,
            user_execution_time: self.user_execution_time,
            instantiate_time: self.instantiate_time,
            instance: self.instance,
            outcome,
            log: std::mem::take(&mut self.log),
            coredump: self.coredump.take(),
            span: self.span.clone(),
        });
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        // NB: does something only when the call was not completed: whatever
        // ran it was dropped (the client went away, or its task aborted).
        self.finish(Err(CallError::Canceled));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn call(sink: Arc<Mutex<Vec<CallReport>>>) -> Call {
        let slot = SlotHashId::compute(
            &crate::module_store::ModuleDigest::of(b"x"),
            crate::guest::GuestKind::Cgi,
            &Default::default(),
        );
        Call::new(
            CallId::new(),
            "f".into(),
            slot,
            Instant::now(),
            Instant::now() + Duration::from_secs(1),
            move |report| sink.lock().expect("lock").push(report),
        )
    }

    #[test]
    fn a_dropped_call_reports_canceled_exactly_once() {
        let sink = Arc::new(Mutex::new(Vec::new()));
        drop(call(sink.clone()));
        let reports = sink.lock().expect("lock");
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0].status(), CallStatus::Canceled);
    }

    #[test]
    fn a_completed_call_reports_its_outcome_and_scheduler_time() {
        let sink = Arc::new(Mutex::new(Vec::new()));
        let mut c = call(sink.clone());
        std::thread::sleep(Duration::from_millis(5));
        c.add_user_execution_time(Duration::from_secs(10));
        c.complete(Ok(http::StatusCode::OK));
        let reports = sink.lock().expect("lock");
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0].status(), CallStatus::Completed);
        assert!(reports[0].total >= Duration::from_millis(5));
        assert_eq!(reports[0].scheduler_time(), Duration::ZERO, "clamped at zero");
    }

    #[test]
    fn client_call_ids_are_kept_only_when_sane() {
        assert_eq!(
            CallId::from_client("01HX-abc.1:2_3").map(|c| c.to_string()),
            Some("01HX-abc.1:2_3".into())
        );
        assert!(CallId::from_client("").is_none());
        assert!(CallId::from_client("a b").is_none());
        assert!(CallId::from_client(&"a".repeat(129)).is_none());
        assert_ne!(CallId::new(), CallId::new());
    }
}

/// Call metadata a client or LB sends in request headers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CallOptions {
    /// `fn-call-id`, when sane.
    pub call_id: Option<CallId>,
    /// The tighter of `fn-deadline` and `fn-timeout-ms`, as a duration from
    /// now; only ever tightens the function's own timeout.
    pub timeout: Option<Duration>,
    /// `fn-call-type: detached`.
    pub detached: bool,
}

/// Header names of the call metadata.
pub const CALL_ID_HEADER: &str = "fn-call-id";
pub const DEADLINE_HEADER: &str = "fn-deadline";
pub const TIMEOUT_HEADER: &str = "fn-timeout-ms";
pub const CALL_TYPE_HEADER: &str = "fn-call-type";

/// Why call headers were refused (400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad `{header}` header: {reason}")]
pub struct CallHeaderError {
    pub header: &'static str,
    pub reason: String,
}

/// Parses the call headers. `now` is the wall clock (for `fn-deadline`,
/// an RFC 3339 time). An unusable `fn-call-id` is replaced, not refused;
/// a malformed deadline, timeout or call type is refused. A deadline
/// already past gives a zero timeout.
pub fn parse_call_headers(
    headers: &http::HeaderMap,
    now: SystemTime,
) -> Result<CallOptions, CallHeaderError> {
    let text = |name: &'static str| -> Result<Option<&str>, CallHeaderError> {
        match headers.get(name) {
            None => Ok(None),
            Some(value) => value
                .to_str()
                .map(|v| Some(v.trim()))
                .map_err(|_| CallHeaderError {
                    header: name,
                    reason: "not visible ASCII".into(),
                }),
        }
    };
    let call_id = headers
        .get(CALL_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| CallId::from_client(v.trim()));
    let mut timeout: Option<Duration> = None;
    if let Some(ms) = text(TIMEOUT_HEADER)? {
        let ms: u64 = ms.parse().map_err(|_| CallHeaderError {
            header: TIMEOUT_HEADER,
            reason: format!("`{ms}` is not a whole number of milliseconds"),
        })?;
        if ms == 0 {
            return Err(CallHeaderError {
                header: TIMEOUT_HEADER,
                reason: "must be at least 1".into(),
            });
        }
        timeout = Some(Duration::from_millis(ms));
    }
    if let Some(deadline) = text(DEADLINE_HEADER)? {
        let at = humantime::parse_rfc3339_weak(deadline).map_err(|error| CallHeaderError {
            header: DEADLINE_HEADER,
            reason: format!("`{deadline}` is not an RFC 3339 time: {error}"),
        })?;
        let left = at.duration_since(now).unwrap_or(Duration::ZERO);
        timeout = Some(timeout.map_or(left, |t| t.min(left)));
    }
    let detached = match text(CALL_TYPE_HEADER)? {
        None => false,
        Some(kind) if kind.eq_ignore_ascii_case("sync") => false,
        Some(kind) if kind.eq_ignore_ascii_case("detached") => true,
        Some(kind) => {
            return Err(CallHeaderError {
                header: CALL_TYPE_HEADER,
                reason: format!("`{kind}` is neither `sync` nor `detached`"),
            });
        }
    };
    Ok(CallOptions {
        call_id,
        timeout,
        detached,
    })
}

#[cfg(test)]
mod header_tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> http::HeaderMap {
        let mut map = http::HeaderMap::new();
        for (name, value) in pairs {
            map.insert(
                http::HeaderName::from_bytes(name.as_bytes()).expect("name"),
                http::HeaderValue::from_str(value).expect("value"),
            );
        }
        map
    }

    #[test]
    fn call_headers_give_id_tightest_timeout_and_type() {
        let now = humantime::parse_rfc3339("2026-01-01T00:00:00Z").expect("time");
        let options = parse_call_headers(
            &headers(&[
                ("fn-call-id", "abc-1"),
                ("fn-timeout-ms", "5000"),
                ("fn-deadline", "2026-01-01T00:00:02Z"),
                ("fn-call-type", "detached"),
            ]),
            now,
        )
        .expect("valid");
        assert_eq!(options.call_id.map(|c| c.to_string()), Some("abc-1".into()));
        assert_eq!(options.timeout, Some(Duration::from_secs(2)));
        assert!(options.detached);
        let past =
            parse_call_headers(&headers(&[("fn-deadline", "2025-12-31T23:59:59Z")]), now).expect("valid");
        assert_eq!(past.timeout, Some(Duration::ZERO));
        assert_eq!(
            parse_call_headers(&headers(&[]), now).expect("empty"),
            CallOptions::default()
        );
    }

    #[test]
    fn malformed_call_headers_are_refused_and_bad_ids_replaced() {
        let now = SystemTime::now();
        for (name, value) in [
            ("fn-timeout-ms", "soon"),
            ("fn-timeout-ms", "0"),
            ("fn-timeout-ms", "-5"),
            ("fn-deadline", "tomorrow"),
            ("fn-call-type", "async"),
        ] {
            let error = parse_call_headers(&headers(&[(name, value)]), now).expect_err(value);
            assert_eq!(error.header, name);
        }
        let options = parse_call_headers(&headers(&[("fn-call-id", "has space")]), now).expect("valid");
        assert!(options.call_id.is_none());
    }
}
