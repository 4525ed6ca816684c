//! `fnrunner call`: place one call across runner nodes, as the placer in a
//! load balancer would — for scripts, smoke tests and debugging a fleet.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;

use super::{ClientTlsFlags, Exit, fail};
use crate::call::{CallId, CallOptions};
use crate::client::HttpClient;
use crate::placer::{
    ConsistentHashPlacer, NaivePlacer, PlaceError, PlacedCall, Placer, PlacerConfig, RemoteRunner, Runner,
    StaticRunnerPool,
};

/// Place one call across runner nodes and print the response body.
#[derive(clap::Args, Debug)]
pub struct CallCommand {
    /// A runner node's base URL, `http://HOST:PORT` or `https://HOST:PORT`
    /// (repeatable, or comma-separated). The order is the pool's order.
    #[arg(long = "runner", required = true, value_delimiter = ',', value_name = "URL")]
    runners: Vec<String>,

    /// The function to call.
    #[arg(value_name = "FUNCTION")]
    function: String,

    /// Request body; `@FILE` reads a file, `@-` reads stdin.
    #[arg(short = 'd', long = "data", value_name = "DATA")]
    data: Option<String>,

    /// Request method [default: GET, or POST when a body is given].
    #[arg(short = 'X', long = "request", value_name = "METHOD")]
    method: Option<String>,

    /// Path and query after `/fn/FUNCTION`.
    #[arg(long, default_value = "/", value_name = "PATH")]
    path: String,

    /// Request header, `NAME: VALUE` (repeatable).
    #[arg(short = 'H', long = "header", value_name = "HEADER")]
    headers: Vec<String>,

    /// Placement strategy: `ch` (consistent hashing on the function) or
    /// `naive` (round robin).
    #[arg(long, default_value = "ch", value_parser = ["ch", "naive"])]
    placer: String,

    /// The call's deadline, in milliseconds; placement stops with it too.
    #[arg(long, value_name = "MS")]
    timeout_ms: Option<u64>,

    /// Longest placement looks for a taker.
    #[arg(long, default_value_t = 30_000, value_name = "MS")]
    placer_timeout_ms: u64,

    /// Wait between full passes over the runners with no taker.
    #[arg(long, default_value_t = 10, value_name = "MS")]
    retry_all_delay_ms: u64,

    /// A detached call: the runner answers 202 once it takes it.
    #[arg(long)]
    detached: bool,

    /// The call id to send (`fn-call-id`) [default: a new ULID].
    #[arg(long, value_name = "ID")]
    call_id: Option<String>,

    /// Print which runner took the call, the attempts, status and headers
    /// to stderr.
    #[arg(short, long)]
    verbose: bool,

    #[command(flatten)]
    tls: ClientTlsFlags,
}

impl CallCommand {
    pub fn execute(self) -> Exit {
        let call = match self.call() {
            Ok(call) => call,
            Err(message) => return fail(Exit::Usage, message),
        };
        let tls = match self.tls.config() {
            Ok(tls) => tls,
            Err(message) => return fail(Exit::Usage, message),
        };
        let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(runtime) => runtime,
            Err(error) => return fail(Exit::Internal, error),
        };
        runtime.block_on(self.run(call, tls))
    }

    fn call(&self) -> Result<PlacedCall, String> {
        crate::function::check_name(&self.function).map_err(|e| e.to_string())?;
        let body = match self.data.as_deref() {
            None => Bytes::new(),
            Some("@-") => {
                let mut bytes = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut bytes)
                    .map_err(|e| format!("reading the body from stdin: {e}"))?;
                bytes.into()
            }
            Some(data) => match data.strip_prefix('@') {
                Some(file) => std::fs::read(file)
                    .map_err(|e| format!("-d @{file}: {e}"))?
                    .into(),
                None => Bytes::copy_from_slice(data.as_bytes()),
            },
        };
        let method = match &self.method {
            Some(m) => http::Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                .map_err(|_| format!("-X `{m}` is not an HTTP method"))?,
            None if self.data.is_some() => http::Method::POST,
            None => http::Method::GET,
        };
        if !self.path.starts_with('/') {
            return Err(format!("--path `{}` must start with `/`", self.path));
        }
        let path_and_query = self
            .path
            .parse()
            .map_err(|e| format!("--path `{}`: {e}", self.path))?;
        let mut headers = http::HeaderMap::new();
        for header in &self.headers {
            let (name, value) = header
                .split_once(':')
                .ok_or_else(|| format!("-H `{header}`: expected `NAME: VALUE`"))?;
            headers.append(
                http::HeaderName::from_bytes(name.trim().as_bytes())
                    .map_err(|_| format!("-H `{header}`: bad name"))?,
                http::HeaderValue::from_str(value.trim()).map_err(|_| format!("-H `{header}`: bad value"))?,
            );
        }
        let call_id = match &self.call_id {
            Some(id) => Some(
                CallId::from_client(id)
                    .ok_or_else(|| format!("--call-id `{id}`: use 1-128 of [A-Za-z0-9._:-]"))?,
            ),
            None => Some(CallId::new()),
        };
        Ok(PlacedCall {
            function: self.function.clone(),
            method,
            path_and_query,
            headers,
            body,
            options: CallOptions {
                call_id,
                timeout: self.timeout_ms.map(Duration::from_millis),
                detached: self.detached,
            },
            created: Instant::now(),
        })
    }

    async fn run(&self, call: PlacedCall, tls: rustls::ClientConfig) -> Exit {
        let client = match HttpClient::new(tls) {
            Ok(client) => client,
            Err(error) => return fail(Exit::Usage, error),
        };
        let mut runners: Vec<Arc<dyn Runner>> = Vec::new();
        for url in &self.runners {
            match RemoteRunner::new(url, client.clone()) {
                Ok(runner) => runners.push(Arc::new(runner)),
                Err(message) => return fail(Exit::Usage, message),
            }
        }
        let pool = StaticRunnerPool::new(runners);
        let config = PlacerConfig {
            retry_all_delay: Duration::from_millis(self.retry_all_delay_ms),
            placer_timeout: Duration::from_millis(self.placer_timeout_ms),
            detached_placer_timeout: Duration::from_millis(self.placer_timeout_ms),
        };
        let placer: Box<dyn Placer> = match self.placer.as_str() {
            "naive" => Box::new(NaivePlacer::new(config, None)),
            _ => Box::new(ConsistentHashPlacer::new(config, None)),
        };
        let placement = match placer.place_call(&pool, &call).await {
            Ok(placement) => placement,
            Err(error @ (PlaceError::NoTaker(..) | PlaceError::Runner(_) | PlaceError::Pool(_))) => {
                return fail(Exit::Internal, format!("call not placed: {error}"));
            }
        };
        let status = placement.response.status();
        if self.verbose {
            let mut err = std::io::stderr().lock();
            let _ = writeln!(
                err,
                "* runner:   {} (after {} attempt(s))",
                placement.runner, placement.attempts
            );
            let _ = writeln!(err, "< {status}");
            for (name, value) in placement.response.headers() {
                let _ = writeln!(err, "< {name}: {}", String::from_utf8_lossy(value.as_bytes()));
            }
        }
        let body = match placement.response.into_body().collect().await {
            Ok(body) => body.to_bytes(),
            Err(error) => return fail(Exit::Internal, format!("reading the answer: {error}")),
        };
        let mut out = std::io::stdout().lock();
        if out.write_all(&body).and_then(|()| out.flush()).is_err() {
            return fail(Exit::Internal, "cannot write the response body to stdout");
        }
        if status.is_client_error() || status.is_server_error() {
            Exit::GuestErrorResponse
        } else {
            Exit::Success
        }
    }
}
