//! Guests: the two kinds of Wasm function fnrunner runs (wasi:http
//! components and WASI preview1 CGI modules), what they share — request and
//! response types, the per-instance resource limiter, bounded output
//! capture, the sandbox every instance gets — and how a failed call is
//! classified.

pub mod cgi;
pub mod http;
mod io;

use std::fmt;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;

pub use io::{LogCapture, OutputCapture, limit_body};

use crate::engine::Engine;
use crate::function::Settings;

/// Guest kind, detected from a module's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GuestKind {
    /// A `wasi:http/proxy` 0.2 component.
    Http,
    /// A WASI preview1 command module run CGI-style.
    Cgi,
}

impl GuestKind {
    pub fn as_str(self) -> &'static str {
        match self {
            GuestKind::Http => "http",
            GuestKind::Cgi => "cgi",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "http" => Some(GuestKind::Http),
            "cgi" => Some(GuestKind::Cgi),
            _ => None,
        }
    }

    /// What a module of this kind is, for messages.
    pub fn describe(self) -> &'static str {
        match self {
            GuestKind::Http => "component (wasi:http)",
            GuestKind::Cgi => "core module (WASI preview1 CGI)",
        }
    }

    /// Tells a component from a core module by the binary header.
    pub fn detect(bytes: &[u8]) -> Result<Self, DetectError> {
        if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
            let text = String::from_utf8_lossy(&bytes[..bytes.len().min(64)]);
            if text.trim_start().starts_with('(') {
                return Err(DetectError::Text);
            }
            return Err(DetectError::NotWasm);
        }
        match (&bytes[4..6], &bytes[6..8]) {
            ([1, 0], [0, 0]) => Ok(GuestKind::Cgi),
            (_, [1, 0]) => Ok(GuestKind::Http),
            _ => Err(DetectError::UnknownVersion(u32::from_le_bytes([
                bytes[4], bytes[5], bytes[6], bytes[7],
            ]))),
        }
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DetectError {
    #[error("not a WebAssembly file (no `\\0asm` header)")]
    NotWasm,
    #[error("WebAssembly text format is not accepted; compile it to a binary first")]
    Text,
    #[error("unsupported WebAssembly binary version {0:#x}")]
    UnknownVersion(u32),
}

/// Body of requests into and responses out of a guest.
pub type GuestBody = UnsyncBoxBody<Bytes, wasmtime_wasi_http::Error>;

/// A body with all of its bytes at hand.
pub fn full_body(bytes: impl Into<Bytes>) -> GuestBody {
    use http_body_util::BodyExt;
    http_body_util::Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A request as the guest sees it: the path is the part after
/// `/fn/{function}`.
pub struct GuestRequest {
    pub method: ::http::Method,
    pub path_and_query: ::http::uri::PathAndQuery,
    pub headers: ::http::HeaderMap,
    pub body: GuestBody,
    /// Host (and port) the request was addressed to.
    pub authority: String,
    /// `http` or `https`, as the client used.
    pub scheme: ::http::uri::Scheme,
    /// The client's address, when there is one.
    pub remote_addr: Option<std::net::SocketAddr>,
}

/// A guest's response. The body may still be streaming from the guest.
pub struct GuestResponse {
    pub status: ::http::StatusCode,
    pub headers: ::http::HeaderMap,
    pub body: GuestBody,
    /// Time the guest had run when the response head was ready.
    pub user_time: Duration,
}

/// The call's identity and limits, as the guest is told them.
#[derive(Debug, Clone)]
pub struct CallEnv {
    pub call_id: String,
    pub function: std::sync::Arc<str>,
    pub deadline: Instant,
    /// The deadline as wall-clock time (for `FN_DEADLINE`).
    pub deadline_wall: SystemTime,
}

/// Node-wide caps every call is held to.
#[derive(Debug, Clone, Copy)]
pub struct CallLimits {
    /// Largest request body; more is refused with 413.
    pub max_request_bytes: usize,
    /// Largest response body (CGI stdout, or a component's streamed body).
    pub max_response_bytes: usize,
    /// Largest stderr (and component stdout) kept for the call's log.
    pub max_log_bytes: usize,
}

/// Largest request body a call may carry.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 16 << 20;
/// Largest response body a guest may produce (CGI stdout is buffered in
/// memory, so this also bounds a CGI call's memory on the host).
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 32 << 20;
/// Guest stderr kept per call; the rest is counted and dropped.
pub const DEFAULT_MAX_LOG_BYTES: usize = 64 << 10;

impl Default for CallLimits {
    fn default() -> Self {
        Self {
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            max_log_bytes: DEFAULT_MAX_LOG_BYTES,
        }
    }
}

/// How a call failed. Every variant names the function; the server maps
/// each to a status, the CLI to an exit code, the metrics to a
/// `call_status`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    #[error("function `{function}` timed out after {timeout_ms} ms")]
    Timeout { function: String, timeout_ms: u64 },
    #[error("function `{function}` trapped: {message}")]
    Trap { function: String, message: String },
    #[error("function `{function}` exceeded its memory limit of {limit_mb} MiB")]
    MemoryLimit { function: String, limit_mb: u64 },
    #[error("function `{function}` produced a response larger than {limit} bytes")]
    OutputTooLarge { function: String, limit: usize },
    #[error("function `{function}` wrote bad CGI output: {reason}")]
    BadOutput { function: String, reason: String },
    #[error("function `{function}` exited with status {code}")]
    Exit { function: String, code: i32 },
    #[error("function `{function}` returned no response: {reason}")]
    NoResponse { function: String, reason: String },
    #[error("request body is larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("failed to read the request body: {reason}")]
    BodyRead { reason: String },
    #[error("the client went away")]
    Canceled,
    #[error("no capacity to run function `{function}`: {reason}")]
    Busy { function: String, reason: String },
    #[error("runner fault in function `{function}` while {phase}: {message}")]
    Internal {
        function: String,
        phase: &'static str,
        message: String,
    },
}

/// The class of a call failure, for everything that maps them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultKind {
    Timeout,
    Trap,
    MemoryLimit,
    OutputTooLarge,
    BadOutput,
    Exit,
    NoResponse,
    BodyTooLarge,
    BodyRead,
    Canceled,
    Busy,
    Internal,
}

impl FaultKind {
    /// A stable machine-readable code, used in error bodies and logs.
    pub fn code(self) -> &'static str {
        match self {
            FaultKind::Timeout => "timeout",
            FaultKind::Trap => "trap",
            FaultKind::MemoryLimit => "memory_limit",
            FaultKind::OutputTooLarge => "response_too_large",
            FaultKind::BadOutput => "bad_cgi_output",
            FaultKind::Exit => "guest_exit",
            FaultKind::NoResponse => "no_response",
            FaultKind::BodyTooLarge => "request_too_large",
            FaultKind::BodyRead => "bad_request_body",
            FaultKind::Canceled => "canceled",
            FaultKind::Busy => "server_busy",
            FaultKind::Internal => "internal",
        }
    }

    /// Whether the guest (rather than the client or the runner) is at
    /// fault: its instance must not serve another call.
    pub fn is_guest_fault(self) -> bool {
        matches!(
            self,
            FaultKind::Timeout
                | FaultKind::Trap
                | FaultKind::MemoryLimit
                | FaultKind::OutputTooLarge
                | FaultKind::BadOutput
                | FaultKind::Exit
                | FaultKind::NoResponse
        )
    }
}

impl CallError {
    pub fn kind(&self) -> FaultKind {
        match self {
            CallError::Timeout { .. } => FaultKind::Timeout,
            CallError::Trap { .. } => FaultKind::Trap,
            CallError::MemoryLimit { .. } => FaultKind::MemoryLimit,
            CallError::OutputTooLarge { .. } => FaultKind::OutputTooLarge,
            CallError::BadOutput { .. } => FaultKind::BadOutput,
            CallError::Exit { .. } => FaultKind::Exit,
            CallError::NoResponse { .. } => FaultKind::NoResponse,
            CallError::BodyTooLarge { .. } => FaultKind::BodyTooLarge,
            CallError::BodyRead { .. } => FaultKind::BodyRead,
            CallError::Canceled => FaultKind::Canceled,
            CallError::Busy { .. } => FaultKind::Busy,
            CallError::Internal { .. } => FaultKind::Internal,
        }
    }

    pub(crate) fn internal(function: &str, phase: &'static str, error: impl fmt::Display) -> Self {
        CallError::Internal {
            function: function.to_owned(),
            phase,
            message: error.to_string(),
        }
    }
}

/// What happened while a guest ran, as the executor saw it.
pub(crate) struct RunFacts<'a> {
    pub function: &'a str,
    pub settings: &'a Settings,
    pub memory_refused: bool,
    pub output_overflowed: Option<usize>,
    pub timed_out: bool,
}

/// Turns the error of a guest call into a `CallError`. The order matters:
/// a guest that trapped because its output was cut off or its memory grow
/// refused is reported by that cause, not as a bare trap.
pub(crate) fn classify(error: &wasmtime::Error, facts: &RunFacts<'_>) -> CallError {
    let function = facts.function.to_owned();
    if facts.timed_out
        || matches!(
            error.downcast_ref::<wasmtime::Trap>(),
            Some(wasmtime::Trap::Interrupt)
        )
    {
        return CallError::Timeout {
            function,
            timeout_ms: facts.settings.timeout_ms,
        };
    }
    if let Some(limit) = facts.output_overflowed {
        return CallError::OutputTooLarge { function, limit };
    }
    if facts.memory_refused {
        return CallError::MemoryLimit {
            function,
            limit_mb: facts.settings.memory_mb,
        };
    }
    if let Some(exit) = error.downcast_ref::<wasmtime_wasi::I32Exit>() {
        return CallError::Exit {
            function,
            code: exit.0,
        };
    }
    if let Some(limit) = error.downcast_ref::<wasmtime::PoolConcurrencyLimitError>() {
        return CallError::Busy {
            function,
            reason: limit.to_string(),
        };
    }
    let message = match error.downcast_ref::<wasmtime::Trap>() {
        Some(trap) => trap.to_string(),
        None => error_chain(error),
    };
    CallError::Trap { function, message }
}

/// An error and its causes on one line, `: `-separated.
pub fn error_chain(error: &wasmtime::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in error.chain() {
        let text = cause.to_string();
        // wasmtime puts the wasm backtrace in the message; keep only the
        // first line of each cause for a one-line summary.
        let first = text.lines().next().unwrap_or("").trim().to_owned();
        if !first.is_empty() && parts.last() != Some(&first) {
            parts.push(first);
        }
    }
    parts.join(": ")
}

/// Per-store resource limiter: caps a store's total linear memory at the
/// function's `memory_mb` and remembers a refused grow, so a guest that
/// traps after `memory.grow` returned -1 is reported as a memory-limit hit.
pub struct CallLimiter {
    memory_limit: usize,
    memory_used: usize,
    memory_peak: usize,
    memory_refused: bool,
    table_elements_limit: usize,
}

impl CallLimiter {
    pub fn new(memory_limit: usize) -> Self {
        Self {
            memory_limit,
            memory_used: 0,
            memory_peak: 0,
            memory_refused: false,
            table_elements_limit: crate::engine::DEFAULT_TABLE_ELEMENTS,
        }
    }

    pub fn memory_refused(&self) -> bool {
        self.memory_refused
    }

    /// Forgets a refusal, before the next call on a reused instance.
    pub fn clear_refused(&mut self) {
        self.memory_refused = false;
    }

    /// Bytes of linear memory the store's instances hold now.
    pub fn memory_used(&self) -> usize {
        self.memory_used
    }

    pub fn memory_peak(&self) -> usize {
        self.memory_peak
    }
}

impl wasmtime::ResourceLimiter for CallLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let grow = desired.saturating_sub(current);
        let total = self.memory_used.saturating_add(grow);
        if total > self.memory_limit || maximum.is_some_and(|max| desired > max) {
            self.memory_refused = true;
            return Ok(false);
        }
        self.memory_used = total;
        self.memory_peak = self.memory_peak.max(total);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= self.table_elements_limit && maximum.is_none_or(|max| desired <= max))
    }
}

/// Epoch-deadline policy shared by both kinds: yield to the executor every
/// few ticks, and interrupt the guest once the call's deadline has passed.
pub(crate) fn install_deadline<T: 'static>(
    store: &mut wasmtime::Store<T>,
    engine: &Engine,
    deadline_of: fn(&T) -> Instant,
) {
    let yield_ticks = crate::engine::DEFAULT_YIELD_TICKS;
    let tick = engine.config().epoch_tick;
    store.epoch_deadline_callback(move |ctx| {
        let deadline = deadline_of(ctx.data());
        let now = Instant::now();
        if now >= deadline {
            return Ok(wasmtime::UpdateDeadline::Interrupt);
        }
        let remaining = (deadline - now).as_nanos() / tick.as_nanos().max(1);
        let next = (remaining as u64).clamp(1, yield_ticks);
        Ok(wasmtime::UpdateDeadline::Yield(next))
    });
}

/// Arms the epoch deadline for a call ending at `deadline`.
pub(crate) fn arm_deadline<T>(store: &mut wasmtime::Store<T>, engine: &Engine, deadline: Instant) {
    let remaining = deadline.saturating_duration_since(Instant::now());
    let ticks = engine
        .ticks_for(remaining)
        .min(crate::engine::DEFAULT_YIELD_TICKS);
    store.set_epoch_deadline(ticks);
}

/// A WASI context with the sandbox every instance gets: no host
/// environment (only the function's configured env), no filesystem but the
/// preopens in its settings (read-only unless marked writable; cap-std
/// confines every path to them), no sockets.
pub(crate) fn sandbox(
    settings: &Settings,
    function: &str,
) -> Result<wasmtime_wasi::WasiCtxBuilder, CallError> {
    let mut builder = wasmtime_wasi::WasiCtxBuilder::new();
    builder
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false);
    for preopen in &settings.preopens {
        let perms = if preopen.writable {
            wasmtime_wasi::FsPerms::ReadWrite
        } else {
            wasmtime_wasi::FsPerms::ReadOnly
        };
        builder
            .preopened_dir(&preopen.host, &preopen.guest, perms)
            .map_err(|error| CallError::internal(function, "opening a preopened directory", error))?;
    }
    Ok(builder)
}

/// Reads a whole request body (for CGI guests, before they start), refusing
/// one over `limit` bytes.
pub async fn collect_body(body: GuestBody, limit: usize) -> Result<Bytes, CallError> {
    use http_body_util::BodyExt;
    if http_body::Body::size_hint(&body).lower() > limit as u64 {
        return Err(CallError::BodyTooLarge { limit });
    }
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => {
            Err(CallError::BodyTooLarge { limit })
        }
        Err(error) => Err(CallError::BodyRead {
            reason: error.to_string(),
        }),
    }
}

/// Remaining time until `deadline`, for timers.
pub(crate) fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_is_detected_from_the_binary_header() {
        assert_eq!(GuestKind::detect(b"\0asm\x01\0\0\0rest"), Ok(GuestKind::Cgi));
        assert_eq!(GuestKind::detect(b"\0asm\x0d\0\x01\0rest"), Ok(GuestKind::Http));
        assert_eq!(GuestKind::detect(b"hello world"), Err(DetectError::NotWasm));
        assert_eq!(GuestKind::detect(b"\0as"), Err(DetectError::NotWasm));
        assert_eq!(GuestKind::detect(b"(module)"), Err(DetectError::Text));
        assert!(matches!(
            GuestKind::detect(b"\0asm\x02\0\0\0"),
            Err(DetectError::UnknownVersion(2))
        ));
    }

    #[test]
    fn limiter_caps_total_memory_and_remembers_refusal() {
        use wasmtime::ResourceLimiter;
        let mut limiter = CallLimiter::new(10 << 20);
        assert!(limiter.memory_growing(0, 4 << 20, None).expect("grow"));
        assert!(limiter.memory_growing(0, 4 << 20, None).expect("second memory"));
        assert!(!limiter.memory_refused());
        assert!(
            !limiter
                .memory_growing(4 << 20, 8 << 20, None)
                .expect("over the cap")
        );
        assert!(limiter.memory_refused());
        assert_eq!(limiter.memory_used(), 8 << 20);
        limiter.clear_refused();
        assert!(!limiter.memory_refused());
    }
}
