//! The HTTP server. The request path reads top-down in this file:
//! `serve` (accept) → `run_connection` (HTTP/1.1 or HTTP/2, limits) →
//! `App::handle` (route) → `App::call` (TryExec) → the response.

pub mod api;
pub mod errors;
pub mod tls;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::call::{CALL_ID_HEADER, CallId, DEADLINE_HEADER, parse_call_headers};
use crate::guest::{GuestBody, GuestRequest, full_body};
use crate::runner::{Answer, CallFailure, LocalRunner, RunnerCall, TryExec};
use errors::{call_error_response, error_response, nack_response};

/// Time to read a request's headers before the connection is closed
/// (slowloris).
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head (HTTP/1 buffer; HTTP/2 header list).
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 << 10;
/// Smallest `max_header_bytes` hyper accepts for HTTP/1.
pub const MIN_MAX_HEADER_BYTES: usize = 8192;
/// Concurrent HTTP/2 streams per connection.
pub const DEFAULT_H2_MAX_STREAMS: u32 = 256;
/// A connection with no request in flight and no bytes moving for this
/// long is closed.
pub const DEFAULT_IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);
/// Open connections per listener; one more is closed as soon as accepted.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Largest module a deploy may upload.
pub const DEFAULT_MAX_MODULE_BYTES: usize = 128 << 20;
/// After the drain, how long open connections get to close.
pub const CONNECTION_GRACE: Duration = Duration::from_secs(5);

/// Per-listener protocol limits.
#[derive(Debug, Clone)]
pub struct ServerLimits {
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub h2_max_streams: u32,
    pub idle_connection_timeout: Duration,
    pub max_connections: usize,
    pub max_module_bytes: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            h2_max_streams: DEFAULT_H2_MAX_STREAMS,
            idle_connection_timeout: DEFAULT_IDLE_CONNECTION_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_module_bytes: DEFAULT_MAX_MODULE_BYTES,
        }
    }
}

/// Which routes a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plane {
    /// Calls, status and health (when the control plane has its own listener).
    Data,
    /// Deploys and metrics (plus status and health).
    Control,
    /// Everything.
    Both,
}

impl Plane {
    fn serves_calls(self) -> bool {
        matches!(self, Plane::Data | Plane::Both)
    }
    fn serves_control(self) -> bool {
        matches!(self, Plane::Control | Plane::Both)
    }
}

/// The application behind one listener.
pub struct App {
    pub runner: Arc<LocalRunner>,
    pub registry: Arc<Registry>,
    pub limits: ServerLimits,
    pub plane: Plane,
    /// `https` on a TLS listener.
    pub scheme: http::uri::Scheme,
}

/// Accepts connections until `stop` turns true, then lets open ones finish
/// (up to `CONNECTION_GRACE`).
pub async fn serve(
    listener: TcpListener,
    app: Arc<App>,
    tls: Option<tls::TlsAcceptor>,
    mut stop: watch::Receiver<bool>,
) {
    let builder = Arc::new(connection_builder(&app.limits));
    let connections = Arc::new(Semaphore::new(app.limits.max_connections));
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // NB: EMFILE and friends: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        // Max connections: one over the limit is closed at once.
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "connection refused: at max connections");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (app, builder, stop, tls) = (app.clone(), builder.clone(), stop.clone(), tls.clone());
        tokio::spawn(async move {
            let _permit = permit;
            match tls {
                None => run_connection(stream, peer, app, builder, stop).await,
                Some(acceptor) => {
                    let handshake =
                        tokio::time::timeout(app.limits.header_read_timeout, acceptor.accept(stream)).await;
                    match handshake {
                        Ok(Ok(stream)) => run_connection(stream, peer, app, builder, stop).await,
                        Ok(Err(error)) => tracing::info!(%peer, %error, "TLS handshake failed"),
                        Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
    drop(listener);
    let all = app.limits.max_connections.min(Semaphore::MAX_PERMITS) as u32;
    let _ = tokio::time::timeout(CONNECTION_GRACE, connections.acquire_many(all)).await;
}

fn connection_builder(limits: &ServerLimits) -> hyper_util::server::conn::auto::Builder<TokioExecutor> {
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(MIN_MAX_HEADER_BYTES))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.h2_max_streams)
        .max_header_list_size(limits.max_header_bytes as u32);
    builder
}

/// Serves one connection (HTTP/1.1, or HTTP/2 by prior knowledge or ALPN)
/// until it closes, goes idle, or the server stops.
async fn run_connection<IO>(
    io: IO,
    peer: SocketAddr,
    app: Arc<App>,
    builder: Arc<hyper_util::server::conn::auto::Builder<TokioExecutor>>,
    mut stop: watch::Receiver<bool>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let idle_timeout = app.limits.idle_connection_timeout;
    let activity = Activity::new();
    let io = TokioIo::new(ActivityIo {
        inner: io,
        activity: activity.clone(),
    });
    let service = {
        let activity = activity.clone();
        hyper::service::service_fn(move |request: Request<Incoming>| {
            let app = app.clone();
            let in_flight = activity.request_started();
            async move {
                let response = app.handle(request, peer).await;
                drop(in_flight);
                Ok::<_, Infallible>(response)
            }
        })
    };
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);
    let mut closing = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%peer, %error, "connection ended with an error");
                }
                return;
            }
            _ = stop.changed(), if !closing => {
                connection.as_mut().graceful_shutdown();
                closing = true;
            }
            _ = activity.idle(idle_timeout), if !closing => {
                tracing::debug!(%peer, "closing an idle connection");
                connection.as_mut().graceful_shutdown();
                closing = true;
            }
        }
    }
}

impl App {
    /// Routes one request.
    pub async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<GuestBody> {
        let path = request.uri().path().to_owned();
        if let Some(rest) = path.strip_prefix("/fn/") {
            if self.plane.serves_calls() {
                return self.call(rest.to_owned(), request, peer).await;
            }
            return not_found();
        }
        let method = request.method().clone();
        match path.as_str() {
            "/healthz" => only_get(&method, || text(StatusCode::OK, "ok\n")),
            "/readyz" => only_get(&method, || {
                if self.runner.is_draining() {
                    text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
                } else {
                    text(StatusCode::OK, "ready\n")
                }
            }),
            "/v1/status" if method == Method::GET => json(StatusCode::OK, &self.runner.runner_status().await),
            "/v1/status" => method_not_allowed(),
            "/metrics" if self.plane.serves_control() => {
                let accept = request
                    .headers()
                    .get(http::header::ACCEPT)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                only_get(&method, || self.metrics(&accept))
            }
            p if self.plane.serves_control() && (p == "/v1/functions" || p.starts_with("/v1/functions/")) => {
                api::handle(&self, request).await
            }
            _ => not_found(),
        }
    }

    /// `ANY /fn/{function}/{*path}`: one call, through TryExec.
    async fn call(&self, rest: String, request: Request<Incoming>, peer: SocketAddr) -> Response<GuestBody> {
        let created = Instant::now();
        let (function, guest_path) = match rest.find('/') {
            Some(at) => (rest[..at].to_owned(), rest[at..].to_owned()),
            None => (rest, "/".to_owned()),
        };
        let options = match parse_call_headers(request.headers(), SystemTime::now()) {
            Ok(options) => options,
            Err(error) => {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    "bad_call_header",
                    &error.to_string(),
                    None,
                );
            }
        };
        let call_id = options.call_id.clone().unwrap_or_default();
        let options = crate::call::CallOptions {
            call_id: Some(call_id.clone()),
            ..options
        };
        let limit = self.runner.config().limits.max_request_bytes;
        if declared_length(request.headers()).is_some_and(|length| length > limit as u64) {
            return error_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request_too_large",
                &format!("request body is larger than {limit} bytes"),
                Some(call_id.as_str()),
            );
        }
        let guest_request = match self.guest_request(request, &guest_path, peer, &call_id, &options) {
            Ok(guest_request) => guest_request,
            Err(message) => {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    &message,
                    Some(call_id.as_str()),
                );
            }
        };
        let outcome = self
            .runner
            .try_exec(RunnerCall {
                function,
                request: guest_request,
                options,
                created,
            })
            .await;
        try_exec_response(outcome, created).await
    }

    /// The request as the guest sees it: the path after `/fn/{function}`,
    /// hop-by-hop headers dropped, and the call's id and deadline added.
    fn guest_request(
        &self,
        request: Request<Incoming>,
        guest_path: &str,
        peer: SocketAddr,
        call_id: &CallId,
        options: &crate::call::CallOptions,
    ) -> Result<GuestRequest, String> {
        let (parts, body) = request.into_parts();
        let path_and_query = match parts.uri.query() {
            Some(query) => format!("{guest_path}?{query}"),
            None => guest_path.to_owned(),
        };
        let path_and_query = path_and_query
            .parse::<http::uri::PathAndQuery>()
            .map_err(|error| format!("bad path: {error}"))?;
        let authority = parts
            .uri
            .authority()
            .map(|a| a.to_string())
            .or_else(|| {
                parts
                    .headers
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| "localhost".into());
        let mut headers = parts.headers;
        for name in HOP_BY_HOP {
            headers.remove(*name);
        }
        if let Ok(value) = HeaderValue::from_str(call_id.as_str()) {
            headers.insert(CALL_ID_HEADER, value);
        }
        if let Some(timeout) = options.timeout
            && let Ok(value) = HeaderValue::from_str(
                &humantime::format_rfc3339_millis(SystemTime::now() + timeout).to_string(),
            )
        {
            headers.insert(DEADLINE_HEADER, value);
        }
        Ok(GuestRequest {
            method: parts.method,
            path_and_query,
            headers,
            body: body.map_err(wasmtime_wasi_http::Error::from).boxed_unsync(),
            authority,
            scheme: self.scheme.clone(),
            remote_addr: Some(peer),
        })
    }

    fn metrics(&self, accept: &str) -> Response<GuestBody> {
        match crate::metrics::render(&self.registry, accept) {
            Ok((text, content_type)) => {
                let mut response = Response::new(full_body(text));
                response
                    .headers_mut()
                    .insert(http::header::CONTENT_TYPE, HeaderValue::from_static(content_type));
                response
            }
            Err(error) => {
                tracing::error!(%error, "cannot encode metrics");
                error_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error",
                    None,
                )
            }
        }
    }
}

/// The HTTP response for what `LocalRunner::try_exec` did with a call:
/// a NACK, or the committed call's answer with its `fn-call-id`,
/// `fn-slot-hash` and `server-timing`.
pub async fn try_exec_response(outcome: TryExec, created: Instant) -> Response<GuestBody> {
    let committed = match outcome {
        TryExec::Nack {
            reason,
            retry_after,
            call,
        } => {
            let call_id = call.options.call_id.map(|id| id.to_string()).unwrap_or_default();
            let mut response = nack_response(reason, retry_after, &call_id);
            response
                .headers_mut()
                .insert("server-timing", server_timing(created.elapsed(), Duration::ZERO));
            return response;
        }
        TryExec::Committed(committed) => committed,
    };
    let mut response = match committed.result {
        Ok(Answer::Response {
            response,
            scheduler_time,
            execution_time,
        }) => {
            let mut headers = response.headers;
            let body = settle(response.body, &mut headers).await;
            let mut out = Response::new(body);
            *out.status_mut() = response.status;
            *out.headers_mut() = headers;
            out.headers_mut()
                .insert("server-timing", server_timing(scheduler_time, execution_time));
            out
        }
        Ok(Answer::Accepted) => {
            let mut out = Response::new(full_body(Bytes::new()));
            *out.status_mut() = StatusCode::ACCEPTED;
            out
        }
        Err(CallFailure::NotFound(name)) => error_response(
            StatusCode::NOT_FOUND,
            "unknown_function",
            &format!("no function named `{name}`"),
            Some(committed.call_id.as_str()),
        ),
        Err(CallFailure::Failed(error)) => call_error_response(&error, committed.call_id.as_str()),
    };
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(committed.call_id.as_str()) {
        headers.insert(CALL_ID_HEADER, value);
    }
    if let Some(hash) = committed.slot_hash
        && let Ok(value) = HeaderValue::from_str(hash.as_str())
    {
        headers.insert("fn-slot-hash", value);
    }
    response
}

/// Most bytes of a streamed body held back to send it whole.
pub const SETTLE_MAX_BYTES: usize = 64 << 10;
/// Longest a response head is held back waiting for its body to end.
pub const SETTLE_WAIT: Duration = Duration::from_millis(2);

/// Sends small bodies whole: if a streamed body ends within
/// `SETTLE_WAIT` and `SETTLE_MAX_BYTES`, it becomes a body of known length
/// (a `content-length` instead of chunks: one write instead of three on
/// HTTP/1.1). Otherwise the frames read so far go first and the rest
/// streams as it comes.
async fn settle(mut body: GuestBody, headers: &mut http::HeaderMap) -> GuestBody {
    use http_body::Body as _;
    if body.is_end_stream() || body.size_hint().exact().is_some() {
        return body;
    }
    let deadline = tokio::time::Instant::now() + SETTLE_WAIT;
    let mut frames: Vec<http_body::Frame<Bytes>> = Vec::new();
    let mut held = 0usize;
    let mut error = None;
    loop {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(None) => {
                if frames.iter().all(http_body::Frame::is_data) {
                    let mut whole = bytes::BytesMut::with_capacity(held);
                    for frame in frames {
                        if let Ok(data) = frame.into_data() {
                            whole.extend_from_slice(&data);
                        }
                    }
                    if !headers.contains_key(http::header::CONTENT_LENGTH) {
                        headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(whole.len()));
                    }
                    return full_body(whole.freeze());
                }
                break;
            }
            Ok(Some(Ok(frame))) => {
                held += frame.data_ref().map_or(0, Bytes::len);
                frames.push(frame);
                if held > SETTLE_MAX_BYTES {
                    break;
                }
            }
            Ok(Some(Err(failure))) => {
                error = Some(failure);
                break;
            }
            Err(_elapsed) => break,
        }
    }
    let held: futures::stream::Iter<_> =
        futures::stream::iter(frames.into_iter().map(Ok).chain(error.map(Err)));
    let rest = http_body_util::BodyStream::new(body);
    http_body_util::StreamBody::new(futures::StreamExt::chain(held, rest)).boxed_unsync()
}

/// Connection-level headers that are not the guest's business.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "http2-settings",
];

fn declared_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// `server-timing: sched;dur=…, exec;dur=…` (milliseconds).
fn server_timing(scheduler: Duration, execution: Duration) -> HeaderValue {
    let value = format!(
        "sched;dur={:.3}, exec;dur={:.3}",
        scheduler.as_secs_f64() * 1000.0,
        execution.as_secs_f64() * 1000.0
    );
    HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static("sched;dur=0, exec;dur=0"))
}

fn text(status: StatusCode, body: &'static str) -> Response<GuestBody> {
    let mut response = Response::new(full_body(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

pub(crate) fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<GuestBody> {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => {
            let mut response = Response::new(full_body(body));
            *response.status_mut() = status;
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            response
        }
        Err(error) => {
            tracing::error!(%error, "cannot encode a JSON response");
            error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error",
                None,
            )
        }
    }
}

fn only_get(method: &Method, respond: impl FnOnce() -> Response<GuestBody>) -> Response<GuestBody> {
    if method == Method::GET || method == Method::HEAD {
        respond()
    } else {
        method_not_allowed()
    }
}

pub(crate) fn not_found() -> Response<GuestBody> {
    error_response(StatusCode::NOT_FOUND, "not_found", "no such route", None)
}

pub(crate) fn method_not_allowed() -> Response<GuestBody> {
    error_response(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed here",
        None,
    )
}

/// A connection's activity: when bytes last moved, and requests in flight.
#[derive(Clone)]
struct Activity {
    inner: Arc<ActivityState>,
}

struct ActivityState {
    base: Instant,
    last_nanos: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    fn new() -> Self {
        Self {
            inner: Arc::new(ActivityState {
                base: Instant::now(),
                last_nanos: AtomicU64::new(0),
                in_flight: AtomicUsize::new(0),
            }),
        }
    }

    fn touch(&self) {
        let now = self.inner.base.elapsed().as_nanos() as u64;
        self.inner.last_nanos.store(now, Ordering::Relaxed);
    }

    fn request_started(&self) -> InFlight {
        self.inner.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// Resolves once no request is in flight and nothing has moved for
    /// `timeout`.
    async fn idle(&self, timeout: Duration) {
        loop {
            let last = Duration::from_nanos(self.inner.last_nanos.load(Ordering::Relaxed));
            let quiet = self.inner.base.elapsed().saturating_sub(last);
            if self.inner.in_flight.load(Ordering::Acquire) == 0 && quiet >= timeout {
                return;
            }
            tokio::time::sleep(timeout.saturating_sub(quiet).max(Duration::from_millis(10))).await;
        }
    }
}

/// A request in flight on a connection; ends when dropped.
struct InFlight(Activity);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.inner.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An I/O stream that records when bytes last moved.
struct ActivityIo<T> {
    inner: T,
    activity: Activity,
}

impl<T: AsyncRead + Unpin> AsyncRead for ActivityIo<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        poll
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ActivityIo<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let poll = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(poll, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        poll
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let poll = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(poll, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
