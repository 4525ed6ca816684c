//! wasi:http 0.2 components: the same `wasi:http/proxy` guests `wasmtime
//! serve` and Spin run. Linked with all of WASI 0.2 (granting nothing), so
//! components from everyday toolchains that also import `wasi:cli`,
//! `wasi:filesystem` or `wasi:sockets` run unchanged.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use wasmtime::Store;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::bindings::http::types::{ErrorCode, Scheme};
use wasmtime_wasi_http::p2::bindings::{Proxy, ProxyPre};
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView};

use super::cgi::PrepareError;
use super::{
    CallEnv, CallError, CallLimiter, CallLimits, GuestBody, GuestRequest, GuestResponse, LogCapture,
    RunFacts, arm_deadline, classify, install_deadline, remaining,
};
use crate::engine::Engine;
use crate::function::{OutboundHost, Settings};

/// Resources one instance may hold in its table at once.
const MAX_RESOURCES: usize = 100_000;

/// Store state of one component instance.
pub struct HttpState {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
    outbound: OutboundPolicy,
    limiter: CallLimiter,
    deadline: Instant,
}

impl WasiView for HttpState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for HttpState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.outbound,
        }
    }
}

/// The linker components are instantiated with: all of WASI 0.2 plus
/// wasi:http, as `wasmtime serve -S cli` does.
pub(crate) fn linker(engine: &wasmtime::Engine) -> wasmtime::Result<Linker<HttpState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
    Ok(linker)
}

/// Interfaces (without version) the linker provides, at any 0.2.x version.
const HOSTED_INTERFACES: &[&str] = &[
    "wasi:cli/environment",
    "wasi:cli/exit",
    "wasi:cli/stdin",
    "wasi:cli/stdout",
    "wasi:cli/stderr",
    "wasi:cli/terminal-input",
    "wasi:cli/terminal-output",
    "wasi:cli/terminal-stdin",
    "wasi:cli/terminal-stdout",
    "wasi:cli/terminal-stderr",
    "wasi:clocks/monotonic-clock",
    "wasi:clocks/wall-clock",
    "wasi:filesystem/types",
    "wasi:filesystem/preopens",
    "wasi:io/error",
    "wasi:io/poll",
    "wasi:io/streams",
    "wasi:random/random",
    "wasi:random/insecure",
    "wasi:random/insecure-seed",
    "wasi:sockets/network",
    "wasi:sockets/instance-network",
    "wasi:sockets/udp",
    "wasi:sockets/udp-create-socket",
    "wasi:sockets/tcp",
    "wasi:sockets/tcp-create-socket",
    "wasi:sockets/ip-name-lookup",
    "wasi:http/types",
    "wasi:http/outgoing-handler",
];

fn is_hosted(import: &str) -> bool {
    match import.split_once('@') {
        Some((interface, version)) => HOSTED_INTERFACES.contains(&interface) && version.starts_with("0.2."),
        None => false,
    }
}

/// A component ready to instantiate: the slot's `ProxyPre`.
#[derive(Clone)]
pub struct HttpPre {
    pre: ProxyPre<HttpState>,
}

impl HttpPre {
    pub fn new(engine: &Engine, component: &Component) -> Result<Self, PrepareError> {
        let pre = engine.http_linker().instantiate_pre(component).map_err(|error| {
            let missing: Vec<String> = component
                .component_type()
                .imports(engine.wasmtime())
                .map(|(name, _)| name.to_owned())
                .filter(|name| !is_hosted(name))
                .collect();
            if missing.is_empty() {
                PrepareError::Link(super::error_chain(&error))
            } else {
                PrepareError::MissingImports { missing }
            }
        })?;
        let pre = ProxyPre::new(pre).map_err(|_| PrepareError::NoHandler)?;
        Ok(Self { pre })
    }

    /// Makes a new instance with the function's sandbox. Instantiation runs
    /// under the function's timeout like a call.
    pub async fn instantiate(
        &self,
        engine: &Engine,
        settings: &Settings,
        function: &str,
        limits: CallLimits,
    ) -> Result<HttpInstance, CallError> {
        let log = LogCapture::new(limits.max_log_bytes);
        let mut builder = super::sandbox(settings, function)?;
        let env: Vec<(&String, &String)> = settings.env.iter().collect();
        builder
            .stdout(log.clone())
            .stderr(log.clone())
            .envs(&env)
            .arg(function);
        let mut table = ResourceTable::new();
        table.set_max_capacity(MAX_RESOURCES);
        let deadline = Instant::now() + settings.timeout();
        let state = HttpState {
            wasi: builder.build(),
            http: WasiHttpCtx::new(),
            table,
            outbound: OutboundPolicy {
                allowed: settings.allowed_outbound_hosts.clone().into(),
            },
            limiter: CallLimiter::new(settings.memory_bytes() as usize),
            deadline,
        };
        let mut store = Store::new(engine.wasmtime(), state);
        store.limiter(|state| &mut state.limiter);
        install_deadline(&mut store, engine, |state: &HttpState| state.deadline);
        arm_deadline(&mut store, engine, deadline);
        match self.pre.instantiate_async(&mut store).await {
            Ok(proxy) => Ok(HttpInstance {
                store,
                proxy,
                log,
                calls: 0,
            }),
            Err(error) => Err(classify(
                &error,
                &RunFacts {
                    function,
                    settings,
                    memory_refused: store.data().limiter.memory_refused(),
                    output_overflowed: None,
                    timed_out: false,
                },
            )),
        }
    }
}

/// A live component instance. It serves one call at a time; a slot may
/// reuse it for several calls in sequence.
pub struct HttpInstance {
    store: Store<HttpState>,
    proxy: Proxy,
    log: LogCapture,
    calls: u32,
}

/// Where the response head goes, once, when the guest sets it — or an
/// error if the guest returns (or is stopped) without setting one.
#[derive(Clone)]
pub struct Responder(Arc<Mutex<Option<HeadSender>>>);

type HeadSender = tokio::sync::oneshot::Sender<Result<GuestResponse, CallError>>;

impl Responder {
    pub fn new() -> (
        Self,
        tokio::sync::oneshot::Receiver<Result<GuestResponse, CallError>>,
    ) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (Self(Arc::new(Mutex::new(Some(tx)))), rx)
    }

    /// Whether an answer was sent.
    pub fn is_sent(&self) -> bool {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).is_none()
    }

    /// Sends `value` if nothing was sent yet; returns whether it was sent.
    pub fn send(&self, value: Result<GuestResponse, CallError>) -> bool {
        let sender = self.0.lock().unwrap_or_else(|p| p.into_inner()).take();
        match sender {
            Some(sender) => {
                let _ = sender.send(value);
                true
            }
            None => false,
        }
    }
}

/// What one `handle` call did.
pub struct HandleOutcome {
    pub result: Result<(), CallError>,
    pub user_execution_time: Duration,
    pub started_at: Instant,
    /// Kept log bytes (stderr and stdout) and the count of dropped ones.
    pub log: (Bytes, usize),
    pub coredump: Option<Vec<u8>>,
    /// Whether the instance may serve another call.
    pub healthy: bool,
    /// The status the guest answered with, if it set a response.
    pub status: Option<http::StatusCode>,
    /// The guest asked to be retired after this call (`fn-retire: 1`).
    pub retire_requested: bool,
}

/// Response header a guest sets to have its instance retired after the
/// call (roadrunner's StopRequest); stripped before the client sees it.
pub const RETIRE_HEADER: &str = "fn-retire";

impl HttpInstance {
    /// Calls served so far.
    pub fn calls(&self) -> u32 {
        self.calls
    }

    /// Bytes of linear memory the instance holds.
    pub fn memory_used(&self) -> usize {
        self.store.data().limiter.memory_used()
    }

    /// Runs one call. The response head goes to `respond` as soon as the
    /// guest sets it (the body then streams while the guest runs on); this
    /// future completes when the guest's `handle` returns.
    ///
    /// NB: a failure is returned, not sent: the caller sends it through its
    /// own clone of the `Responder` once the pool has dealt with the
    /// instance, so a client never sees the answer before the pool does.
    pub async fn handle(
        &mut self,
        engine: &Engine,
        settings: &Settings,
        env: &CallEnv,
        request: GuestRequest,
        respond: Responder,
        limits: CallLimits,
    ) -> HandleOutcome {
        let function: &str = &env.function;
        self.calls += 1;
        self.store.data_mut().deadline = env.deadline;
        self.store.data_mut().limiter.clear_refused();
        arm_deadline(&mut self.store, engine, env.deadline);
        let overflow = Arc::new(AtomicBool::new(false));
        let head: Arc<OnceLock<(http::StatusCode, bool)>> = Arc::new(OnceLock::new());
        let started_at = Instant::now();

        let prepared = (|| {
            let hyper_request = into_hyper_request(request)?;
            let scheme = if hyper_request.uri().scheme() == Some(&http::uri::Scheme::HTTPS) {
                Scheme::Https
            } else {
                Scheme::Http
            };
            let mut view = self.store.data_mut().http();
            let request = view.new_incoming_request(scheme, hyper_request)?;
            let out = view.new_response_outparam_from_callback({
                let respond = respond.clone();
                let overflow = overflow.clone();
                let head = head.clone();
                let function = function.to_owned();
                let limit = limits.max_response_bytes;
                let entered = Instant::now();
                move |result| {
                    let response =
                        into_guest_response(result, &function, limit, overflow).map(|mut response| {
                            response.user_time = entered.elapsed();
                            let retire = response
                                .headers
                                .remove(RETIRE_HEADER)
                                .is_some_and(|value| value.as_bytes().trim_ascii() == b"1");
                            let _ = head.set((response.status, retire));
                            response
                        });
                    respond.send(response);
                }
            })?;
            wasmtime::Result::Ok((request, out))
        })();
        let (request, out) = match prepared {
            Ok(resources) => resources,
            Err(error) => {
                let error = CallError::internal(
                    function,
                    "passing the request to the guest",
                    super::error_chain(&error),
                );
                return HandleOutcome {
                    result: Err(error),
                    user_execution_time: Duration::ZERO,
                    started_at,
                    log: self.log.take(),
                    coredump: None,
                    healthy: true,
                    status: None,
                    retire_requested: false,
                };
            }
        };

        // User execution time: the wall time of the guest's `handle` call.
        // Reading the request body and writing the response body happen
        // inside it when the guest asks for them, so a guest streaming a
        // large body spends that time in its own account.
        let started = Instant::now();
        let handler = self.proxy.wasi_http_incoming_handler();
        let ran = tokio::time::timeout(
            remaining(env.deadline),
            handler.call_handle(&mut self.store, request, out),
        )
        .await;
        let user_execution_time = started.elapsed();

        let facts = |store: &Store<HttpState>, timed_out: bool| RunFacts {
            function,
            settings,
            memory_refused: store.data().limiter.memory_refused(),
            output_overflowed: overflow
                .load(Ordering::Relaxed)
                .then_some(limits.max_response_bytes),
            timed_out,
        };
        let mut coredump = None;
        let result = match ran {
            Err(_elapsed) => Err(classify(
                &wasmtime::Error::msg("deadline"),
                &facts(&self.store, true),
            )),
            Ok(Ok(())) if overflow.load(Ordering::Relaxed) => Err(classify(
                &wasmtime::Error::msg("response too large"),
                &facts(&self.store, false),
            )),
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => {
                coredump = error
                    .downcast_ref::<wasmtime::WasmCoreDump>()
                    .map(|dump| dump.serialize(&mut self.store, function));
                Err(classify(&error, &facts(&self.store, false)))
            }
        };
        // A guest that returns without setting its response is at fault.
        let result = match result {
            Ok(()) if !respond.is_sent() => Err(no_response(
                function,
                "`handle` returned without setting a response",
            )),
            other => other,
        };
        let healthy = result.is_ok() && !self.store.data().limiter.memory_refused();
        let (status, retire_requested) = match head.get() {
            Some(&(status, retire)) => (Some(status), retire),
            None => (None, false),
        };
        HandleOutcome {
            result,
            user_execution_time,
            started_at,
            log: self.log.take(),
            coredump,
            healthy,
            status,
            retire_requested,
        }
    }
}

fn no_response(function: &str, reason: &str) -> CallError {
    CallError::NoResponse {
        function: function.to_owned(),
        reason: reason.to_owned(),
    }
}

fn into_hyper_request(request: GuestRequest) -> wasmtime::Result<http::Request<GuestBody>> {
    let authority = if request.authority.is_empty() {
        "localhost"
    } else {
        &request.authority
    };
    let uri = http::Uri::builder()
        .scheme(request.scheme)
        .authority(authority)
        .path_and_query(request.path_and_query)
        .build()?;
    let mut builder = http::Request::builder().method(request.method).uri(uri);
    if let Some(headers) = builder.headers_mut() {
        *headers = request.headers;
    }
    Ok(builder.body(request.body)?)
}

fn into_guest_response(
    result: Result<hyper::Response<HyperOutgoingBody>, ErrorCode>,
    function: &str,
    limit: usize,
    overflow: Arc<AtomicBool>,
) -> Result<GuestResponse, CallError> {
    match result {
        Ok(response) => {
            let (parts, body) = response.into_parts();
            Ok(GuestResponse {
                status: parts.status,
                headers: parts.headers,
                body: super::limit_body(body, limit, overflow, || {
                    wasmtime_wasi_http::Error::HttpResponseBodySize(None)
                }),
                user_time: Duration::ZERO,
            })
        }
        Err(code) => Err(no_response(
            function,
            &format!("the guest answered with error code {code:?}"),
        )),
    }
}

/// Outbound HTTP for one instance: refused unless the destination is in
/// the function's `allowed_outbound_hosts`.
struct OutboundPolicy {
    allowed: Arc<[OutboundHost]>,
}

impl OutboundPolicy {
    fn allows(&self, uri: &http::Uri) -> bool {
        let scheme = uri.scheme_str().unwrap_or("https");
        let Some(host) = uri.host() else { return false };
        let port = uri.port_u16().unwrap_or(if scheme.eq_ignore_ascii_case("http") {
            80
        } else {
            443
        });
        self.allowed.iter().any(|entry| entry.allows(scheme, host, port))
    }
}

type SendResult = wasmtime_wasi_http::Result<(
    http::Response<wasmtime_wasi_http::WasiBody>,
    Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
)>;

impl WasiHttpHooks for OutboundPolicy {
    fn send_request(
        &mut self,
        request: http::Request<wasmtime_wasi_http::WasiBody>,
        options: Option<wasmtime_wasi_http::RequestOptions>,
        fut: Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
    ) -> Box<dyn Future<Output = SendResult> + Send> {
        drop(fut);
        if !self.allows(request.uri()) {
            tracing::info!(uri = %request.uri(), "outbound request denied: host not in allowed_outbound_hosts");
            return Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) });
        }
        Box::new(async move {
            let (response, io) = wasmtime_wasi_http::default_send_request(request, options).await?;
            Ok((
                response.map(BodyExt::boxed_unsync),
                Box::new(io) as Box<dyn Future<Output = _> + Send>,
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosted_imports_are_wasi_0_2_interfaces_at_any_minor_version() {
        assert!(is_hosted("wasi:http/types@0.2.0"));
        assert!(is_hosted("wasi:cli/environment@0.2.6"));
        assert!(is_hosted("wasi:sockets/tcp@0.2.12"));
        assert!(!is_hosted("wasi:http/types@0.3.0"));
        assert!(!is_hosted("example:kv/store@1.0.0"));
        assert!(!is_hosted("wasi:keyvalue/store@0.2.0"));
    }

    #[test]
    fn outbound_policy_allows_only_listed_destinations() {
        let policy = OutboundPolicy {
            allowed: vec![OutboundHost::parse("http://127.0.0.1:8080").expect("host")].into(),
        };
        let uri = |s: &str| s.parse::<http::Uri>().expect("uri");
        assert!(policy.allows(&uri("http://127.0.0.1:8080/x")));
        assert!(!policy.allows(&uri("http://127.0.0.1:8081/x")));
        assert!(!policy.allows(&uri("https://127.0.0.1:8080/x")));
        assert!(!policy.allows(&uri("http://example.com:8080/x")));
        let none = OutboundPolicy {
            allowed: Vec::new().into(),
        };
        assert!(!none.allows(&uri("http://127.0.0.1:8080/")));
    }
}
