//! WASI preview1 command modules run CGI-style, with WAGI's conventions:
//! the request body on stdin, the CGI/1.1 environment, stdout parsed as
//! header lines, a blank line and the body.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use wasmtime::{InstancePre, Linker, Module, Store};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::MemoryInputPipe;

use super::{
    CallEnv, CallError, CallLimiter, CallLimits, GuestRequest, GuestResponse, LogCapture, OutputCapture,
    RunFacts, arm_deadline, classify, full_body, install_deadline, remaining,
};
use crate::engine::Engine;
use crate::function::Settings;

/// Store state of one CGI instance.
pub struct CgiState {
    wasi: WasiP1Ctx,
    limiter: CallLimiter,
    deadline: Instant,
}

/// The linker CGI modules are instantiated with: all of WASI preview1.
pub(crate) fn linker(engine: &wasmtime::Engine) -> wasmtime::Result<Linker<CgiState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p1::add_to_linker_async(&mut linker, |state: &mut CgiState| &mut state.wasi)?;
    Ok(linker)
}

/// Why a module cannot be made ready to run.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PrepareError {
    #[error(
        "module has no `_start` export: a CGI function must be a WASI command module, \
         not a reactor or library"
    )]
    NoStart,
    #[error("it imports what this host does not provide: {}", .missing.join(", "))]
    MissingImports { missing: Vec<String> },
    #[error(
        "component does not export `wasi:http/incoming-handler@0.2.x`; \
         a component function must target the wasi:http proxy world"
    )]
    NoHandler,
    #[error("cannot link module: {0}")]
    Link(String),
}

/// A CGI module ready to instantiate: the slot's `InstancePre`.
#[derive(Clone)]
pub struct CgiPre {
    pre: InstancePre<CgiState>,
}

/// Core-module import namespaces this host provides.
const HOSTED_MODULES: &[&str] = &["wasi_snapshot_preview1"];

impl CgiPre {
    pub fn new(engine: &Engine, module: &Module) -> Result<Self, PrepareError> {
        let has_start = module
            .exports()
            .any(|export| export.name() == "_start" && export.ty().func().is_some());
        if !has_start {
            return Err(PrepareError::NoStart);
        }
        let missing: Vec<String> = module
            .imports()
            .filter(|import| !HOSTED_MODULES.contains(&import.module()))
            .map(|import| format!("{}::{}", import.module(), import.name()))
            .collect();
        if !missing.is_empty() {
            return Err(PrepareError::MissingImports { missing });
        }
        let pre = engine
            .cgi_linker()
            .instantiate_pre(module)
            .map_err(|error| PrepareError::Link(super::error_chain(&error)))?;
        Ok(Self { pre })
    }

    /// Makes an instance with the function's sandbox and an empty request,
    /// then drops it: the instantiate phase alone, for benchmarks.
    pub async fn instantiate_idle(
        &self,
        engine: &Engine,
        settings: &Settings,
        function: &str,
    ) -> Result<(), CallError> {
        let mut builder = super::sandbox(settings, function)?;
        builder.arg(function);
        let deadline = Instant::now() + settings.timeout();
        let mut store = Store::new(
            engine.wasmtime(),
            CgiState {
                wasi: builder.build_p1(),
                limiter: CallLimiter::new(settings.memory_bytes() as usize),
                deadline,
            },
        );
        store.limiter(|state| &mut state.limiter);
        install_deadline(&mut store, engine, |state: &CgiState| state.deadline);
        arm_deadline(&mut store, engine, deadline);
        match self.pre.instantiate_async(&mut store).await {
            Ok(_) => Ok(()),
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

    /// Runs one call: a fresh instance, `_start` once, stdout parsed.
    pub async fn run(&self, engine: &Engine, call: CgiCall<'_>) -> CgiOutcome {
        let CgiCall {
            settings,
            env,
            environment,
            body,
            limits,
        } = call;
        let function: &str = &env.function;
        let stdout = OutputCapture::new(limits.max_response_bytes);
        let stderr = LogCapture::new(limits.max_log_bytes);
        let mut outcome = CgiOutcome {
            result: Err(CallError::Canceled),
            instantiate_time: Duration::ZERO,
            user_execution_time: Duration::ZERO,
            started_at: None,
            stderr: (Bytes::new(), 0),
            coredump: None,
        };

        let mut builder = match super::sandbox(settings, function) {
            Ok(builder) => builder,
            Err(error) => {
                outcome.result = Err(error);
                return outcome;
            }
        };
        builder
            .stdin(MemoryInputPipe::new(body))
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .arg(function)
            .envs(&environment);
        let state = CgiState {
            wasi: builder.build_p1(),
            limiter: CallLimiter::new(settings.memory_bytes() as usize),
            deadline: env.deadline,
        };
        let mut store = Store::new(engine.wasmtime(), state);
        store.limiter(|state| &mut state.limiter);
        install_deadline(&mut store, engine, |state: &CgiState| state.deadline);
        arm_deadline(&mut store, engine, env.deadline);

        let facts = |store: &Store<CgiState>, timed_out: bool| RunFacts {
            function,
            settings,
            memory_refused: store.data().limiter.memory_refused(),
            output_overflowed: stdout.overflowed(),
            timed_out,
        };

        let instantiate_started = Instant::now();
        let instance = match self.pre.instantiate_async(&mut store).await {
            Ok(instance) => instance,
            Err(error) => {
                outcome.instantiate_time = instantiate_started.elapsed();
                outcome.result = Err(classify(&error, &facts(&store, false)));
                outcome.stderr = stderr.take();
                return outcome;
            }
        };
        outcome.instantiate_time = instantiate_started.elapsed();
        let start = match instance.get_typed_func::<(), ()>(&mut store, "_start") {
            Ok(start) => start,
            Err(error) => {
                outcome.result = Err(CallError::internal(function, "looking up `_start`", error));
                return outcome;
            }
        };

        // User execution time: the wall time of the `_start` call, nothing
        // else. The body was read before it and the output is parsed after.
        let started = Instant::now();
        outcome.started_at = Some(started);
        let ran = tokio::time::timeout(remaining(env.deadline), start.call_async(&mut store, ())).await;
        outcome.user_execution_time = started.elapsed();
        outcome.stderr = stderr.take();

        let exit = match ran {
            Err(_elapsed) => Err(classify(&wasmtime::Error::msg("deadline"), &facts(&store, true))),
            Ok(Ok(())) => Ok(0),
            Ok(Err(error)) => match error.downcast_ref::<wasmtime_wasi::I32Exit>() {
                Some(exit) if stdout.overflowed().is_none() => Ok(exit.0),
                _ => {
                    outcome.coredump = error
                        .downcast_ref::<wasmtime::WasmCoreDump>()
                        .map(|dump| dump.serialize(&mut store, function));
                    Err(classify(&error, &facts(&store, false)))
                }
            },
        };
        outcome.result = match exit {
            Err(error) => Err(error),
            Ok(_) if stdout.overflowed().is_some() => Err(classify(
                &wasmtime::Error::msg("output overflow"),
                &facts(&store, false),
            )),
            Ok(0) => parse_output(stdout.take())
                .map(|(status, headers, body)| GuestResponse {
                    status,
                    headers,
                    body: full_body(body),
                    user_time: outcome.user_execution_time,
                })
                .map_err(|reason| CallError::BadOutput {
                    function: function.to_owned(),
                    reason,
                }),
            Ok(code) => Err(CallError::Exit {
                function: function.to_owned(),
                code,
            }),
        };
        outcome
    }
}

/// Everything one CGI call needs.
pub struct CgiCall<'a> {
    pub settings: &'a Settings,
    pub env: &'a CallEnv,
    /// The CGI environment (`cgi_environment` of the request).
    pub environment: Vec<(String, String)>,
    /// The request body, read in full before the guest starts.
    pub body: Bytes,
    pub limits: CallLimits,
}

/// What a CGI call did.
pub struct CgiOutcome {
    pub result: Result<GuestResponse, CallError>,
    pub instantiate_time: Duration,
    pub user_execution_time: Duration,
    pub started_at: Option<Instant>,
    /// Kept stderr bytes and the count of dropped ones.
    pub stderr: (Bytes, usize),
    pub coredump: Option<Vec<u8>>,
}

/// Request headers that never become `HTTP_*` variables: the body's own
/// (they have CGI variables), and `Proxy`, whose `HTTP_PROXY` would steer
/// a guest's HTTP client (httpoxy).
const SKIPPED_HEADERS: &[&str] = &["content-type", "content-length", "proxy"];

/// The CGI/1.1 environment of a call, WAGI-style, plus Fn's call
/// variables. The function's configured env comes first; the CGI
/// meta-variables describing the request override it; `HTTP_*` variables
/// never override configuration, so a client cannot replace it.
pub fn cgi_environment(settings: &Settings, env: &CallEnv, request: &GuestRequest) -> Vec<(String, String)> {
    let mut vars: BTreeMap<String, String> = settings.env.clone();
    let header = |name: &str| {
        request
            .headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default()
    };
    let (host, port) = match request.authority.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() && !host.ends_with('[') => {
            (host.to_owned(), port.to_owned())
        }
        _ => (
            request.authority.clone(),
            if request.scheme == http::uri::Scheme::HTTPS {
                "443"
            } else {
                "80"
            }
            .to_owned(),
        ),
    };
    let raw_path = request.path_and_query.path().to_owned();
    let query = request.path_and_query.query().unwrap_or("").to_owned();
    let script_name = format!("/fn/{}", env.function);
    let meta: Vec<(&str, String)> = vec![
        ("GATEWAY_INTERFACE", "CGI/1.1".into()),
        (
            "SERVER_SOFTWARE",
            concat!("fnrunner/", env!("CARGO_PKG_VERSION")).into(),
        ),
        ("SERVER_PROTOCOL", "HTTP/1.1".into()),
        ("SERVER_NAME", host),
        ("SERVER_PORT", port),
        ("REQUEST_METHOD", request.method.as_str().to_owned()),
        ("SCRIPT_NAME", script_name.clone()),
        ("PATH_INFO", percent_decode(&raw_path)),
        ("PATH_TRANSLATED", percent_decode(&raw_path)),
        ("X_RAW_PATH_INFO", raw_path.clone()),
        ("QUERY_STRING", query.clone()),
        ("CONTENT_TYPE", header("content-type")),
        ("CONTENT_LENGTH", header("content-length")),
        (
            "REMOTE_ADDR",
            request
                .remote_addr
                .map(|a| a.ip().to_string())
                .unwrap_or_default(),
        ),
        (
            "X_FULL_URL",
            format!(
                "{}://{}{script_name}{raw_path}{}{query}",
                request.scheme,
                request.authority,
                if query.is_empty() { "" } else { "?" }
            ),
        ),
        ("FN_CALL_ID", env.call_id.clone()),
        ("FN_FN_ID", env.function.to_string()),
        (
            "FN_DEADLINE",
            humantime::format_rfc3339_millis(env.deadline_wall).to_string(),
        ),
    ];
    for (name, value) in meta {
        vars.insert(name.to_owned(), value);
    }
    let mut http_vars: BTreeMap<String, String> = BTreeMap::new();
    for name in request.headers.keys() {
        if SKIPPED_HEADERS.contains(&name.as_str()) {
            continue;
        }
        let values: Vec<String> = request
            .headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect();
        let var = format!("HTTP_{}", name.as_str().to_ascii_uppercase().replace('-', "_"));
        http_vars.insert(var, values.join(", "));
    }
    for (name, value) in http_vars {
        vars.entry(name).or_insert(value);
    }
    vars.into_iter().filter(|(_, v)| !v.contains('\0')).collect()
}

/// Decodes `%XX` escapes; invalid escapes stay as written, invalid UTF-8
/// becomes U+FFFD.
fn percent_decode(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(hi), Some(lo)) = (hex_value(bytes[i + 1]), hex_value(bytes[i + 2]))
        {
            out.push(hi << 4 | lo);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex_value(byte: u8) -> Option<u8> {
    (byte as char).to_digit(16).map(|d| d as u8)
}

/// Most header lines a CGI response may have.
pub const MAX_CGI_HEADERS: usize = 100;

/// Parses CGI stdout into status, headers and body.
///
/// Output whose first line is a `name: value` header, and which has a blank
/// line after its header block, is a CGI response: `status:` sets the
/// status (200 otherwise, 302 with only `location:`), other lines become
/// response headers (hop-by-hop ones and `content-length` are dropped; the
/// server frames the body itself). Any other output — no header line
/// first, or no blank line — is a `200` whose body is the whole stdout.
/// A header block with a malformed line or status is an error.
pub fn parse_output(stdout: Bytes) -> Result<(StatusCode, HeaderMap, Bytes), String> {
    let Some((block_len, body_start)) = header_block(&stdout) else {
        return Ok((StatusCode::OK, HeaderMap::new(), stdout));
    };
    let block = &stdout[..block_len];
    let mut headers = HeaderMap::new();
    let mut status: Option<StatusCode> = None;
    let mut lines = 0usize;
    for (index, raw_line) in block.split(|&b| b == b'\n').enumerate() {
        let line = raw_line.strip_suffix(b"\r").unwrap_or(raw_line);
        lines += 1;
        if lines > MAX_CGI_HEADERS {
            return Err(format!("more than {MAX_CGI_HEADERS} header lines"));
        }
        let Some((name, value)) = split_header(line) else {
            return Err(format!(
                "header line {} is not `name: value`: {:?}",
                index + 1,
                String::from_utf8_lossy(line)
            ));
        };
        let value = value.trim_ascii();
        if name.eq_ignore_ascii_case(b"status") {
            status = Some(parse_status(value)?);
            continue;
        }
        let header_name = HeaderName::from_bytes(name)
            .map_err(|_| format!("invalid header name {:?}", String::from_utf8_lossy(name)))?;
        if is_dropped_header(&header_name) {
            continue;
        }
        let header_value = HeaderValue::from_bytes(value)
            .map_err(|_| format!("invalid value for header `{header_name}`"))?;
        headers.append(header_name, header_value);
    }
    let status = match status {
        Some(status) => status,
        None if headers.contains_key(http::header::LOCATION) => StatusCode::FOUND,
        None => StatusCode::OK,
    };
    Ok((status, headers, stdout.slice(body_start..)))
}

/// If the output starts with a header line and has a blank line after the
/// header block, returns the block's length and where the body starts.
fn header_block(out: &[u8]) -> Option<(usize, usize)> {
    let first_end = out.iter().position(|&b| b == b'\n')?;
    let first = out[..first_end].strip_suffix(b"\r").unwrap_or(&out[..first_end]);
    let (name, _) = split_header(first)?;
    if HeaderName::from_bytes(name).is_err() {
        return None;
    }
    // Find the first empty line: "\n\n" or "\n\r\n".
    let mut line_start = 0;
    while line_start < out.len() {
        let end = out[line_start..].iter().position(|&b| b == b'\n')? + line_start;
        let line = &out[line_start..end];
        if line.is_empty() || line == b"\r" {
            let block_len = line_start.saturating_sub(1);
            return Some((block_len, end + 1));
        }
        line_start = end + 1;
    }
    None
}

fn split_header(line: &[u8]) -> Option<(&[u8], &[u8])> {
    let colon = line.iter().position(|&b| b == b':')?;
    let name = &line[..colon];
    if name.is_empty() || name.iter().any(|b| b.is_ascii_whitespace()) {
        return None;
    }
    Some((name, &line[colon + 1..]))
}

fn parse_status(value: &[u8]) -> Result<StatusCode, String> {
    let text = String::from_utf8_lossy(value);
    let code = text.split_whitespace().next().unwrap_or("");
    match code.parse::<u16>() {
        Ok(code) if (200..=599).contains(&code) => {
            StatusCode::from_u16(code).map_err(|_| format!("invalid status `{text}`"))
        }
        _ => Err(format!("invalid status `{text}`: want a code from 200 to 599")),
    }
}

fn is_dropped_header(name: &HeaderName) -> bool {
    *name == http::header::CONTENT_LENGTH || wasmtime_wasi_http::DEFAULT_FORBIDDEN_HEADERS.contains(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &[u8]) -> Result<(StatusCode, HeaderMap, Bytes), String> {
        parse_output(Bytes::copy_from_slice(text))
    }

    #[test]
    fn headers_blank_line_and_body() {
        let (status, headers, body) =
            parse(b"content-type: text/plain\r\nx-a: 1\r\n\r\nhello\n").expect("valid");
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["content-type"], "text/plain");
        assert_eq!(headers["x-a"], "1");
        assert_eq!(&body[..], b"hello\n");
    }

    #[test]
    fn status_and_location_set_the_status() {
        let (status, _, body) = parse(b"Status: 404 Not Found\n\nnope").expect("valid");
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(&body[..], b"nope");
        let (status, headers, _) = parse(b"location: /elsewhere\n\n").expect("valid");
        assert_eq!(status, StatusCode::FOUND);
        assert_eq!(headers["location"], "/elsewhere");
    }

    #[test]
    fn output_without_a_header_block_is_a_200_body() {
        for text in [
            &b"just text\nmore\n"[..],
            b"",
            b"no newline",
            b"Note: no blank line follows\n",
        ] {
            let (status, headers, body) = parse(text).expect("plain body");
            assert_eq!(status, StatusCode::OK);
            assert!(headers.is_empty());
            assert_eq!(&body[..], text);
        }
    }

    #[test]
    fn malformed_header_block_is_an_error() {
        assert!(parse(b"content-type: text/plain\nnot a header\n\nbody").is_err());
        assert!(parse(b"status: abc\n\n").is_err());
        assert!(parse(b"status: 99\n\n").is_err());
        assert!(parse(b"status: 700\n\n").is_err());
        assert!(parse(b"x-bad: a\x01b\n\n").is_err());
    }

    #[test]
    fn hop_by_hop_and_length_headers_are_dropped() {
        let (_, headers, _) =
            parse(b"content-length: 99\ntransfer-encoding: chunked\nconnection: close\nx-ok: 1\n\nbody")
                .expect("valid");
        assert_eq!(headers.len(), 1);
        assert_eq!(headers["x-ok"], "1");
    }

    #[test]
    fn percent_decoding_keeps_invalid_escapes() {
        assert_eq!(percent_decode("/a%20b/%zz/%4"), "/a b/%zz/%4");
        assert_eq!(percent_decode("/%E2%9C%93"), "/✓");
    }
}
