//! `fnrunner invoke`: run one call of a function locally — the function
//! author's test loop. The response body goes to stdout; with `-v` the
//! status, headers, ids and phase timings go to stderr.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::{EngineFlags, Exit, fail, human};
use crate::call::CallReport;
use crate::capacity::NodeCapacity;
use crate::engine::{Engine, EngineConfig};
use crate::function::{FunctionDef, SettingsOverrides};
use crate::guest::{FaultKind, GuestRequest, full_body};
use crate::module_store::ModuleStore;
use crate::pool::NoObserver;
use crate::slot::{ColdStart, Slot, SlotConfig};

/// Run one function call locally and print the response body.
#[derive(clap::Args, Debug)]
pub struct InvokeCommand {
    /// The function: a `.wasm` file (with its optional `.toml` beside it),
    /// or `DIR/NAME` for `DIR/NAME.wasm` and `DIR/NAME.toml`.
    #[arg(value_name = "TARGET")]
    target: PathBuf,

    /// Request body. `@FILE` reads a file, `@-` reads stdin. Without `-d`,
    /// stdin is read for POST, PUT and PATCH when it is not a terminal.
    #[arg(short = 'd', long = "data", value_name = "DATA")]
    data: Option<String>,

    /// Request method [default: GET, or POST when a body is given].
    #[arg(short = 'X', long = "request", value_name = "METHOD")]
    method: Option<String>,

    /// Path and query the guest sees.
    #[arg(long, default_value = "/", value_name = "PATH")]
    path: String,

    /// Request header, `NAME: VALUE` (repeatable).
    #[arg(short = 'H', long = "header", value_name = "HEADER")]
    headers: Vec<String>,

    /// Environment variable for the guest, `KEY=VALUE` (repeatable); added
    /// to the `env` of the function's settings.
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,

    /// Call timeout in milliseconds (overrides the settings).
    #[arg(long, value_name = "MS")]
    timeout_ms: Option<u64>,

    /// Memory limit in MiB (overrides the settings).
    #[arg(long, value_name = "MIB")]
    memory_mb: Option<u64>,

    /// Run the call N times: the first is the cold start, the rest are warm
    /// calls on the ready slot. Only the first response body is printed.
    #[arg(long, default_value_t = 1, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    repeat: u32,

    /// Print status, headers, call id, slot hash and phase timings to stderr.
    #[arg(short, long)]
    verbose: bool,

    #[command(flatten)]
    engine: EngineFlags,
}

/// The request, parsed from the flags.
struct RequestSpec {
    method: http::Method,
    path_and_query: http::uri::PathAndQuery,
    headers: http::HeaderMap,
    body: Bytes,
}

impl RequestSpec {
    fn request(&self) -> GuestRequest {
        GuestRequest {
            method: self.method.clone(),
            path_and_query: self.path_and_query.clone(),
            headers: self.headers.clone(),
            body: full_body(self.body.clone()),
            authority: "localhost".into(),
            scheme: http::uri::Scheme::HTTP,
            remote_addr: None,
        }
    }
}

impl InvokeCommand {
    pub fn execute(self) -> Exit {
        let spec = match self.request_spec() {
            Ok(spec) => spec,
            Err(message) => return fail(Exit::Usage, message),
        };
        let def = match self.load_function() {
            Ok(def) => def,
            Err(message) => return fail(Exit::Usage, message),
        };
        let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(runtime) => runtime,
            Err(error) => return fail(Exit::Internal, format!("cannot start the async runtime: {error}")),
        };
        runtime.block_on(self.run(def, spec))
    }

    fn load_function(&self) -> Result<FunctionDef, String> {
        let path = resolve_target(&self.target)?;
        let mut env = Vec::with_capacity(self.env.len());
        for pair in &self.env {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| format!("--env `{pair}`: expected KEY=VALUE"))?;
            env.push((key.to_owned(), value.to_owned()));
        }
        let overrides = SettingsOverrides {
            memory_mb: self.memory_mb,
            timeout_ms: self.timeout_ms,
            env,
        };
        FunctionDef::load(&path, &overrides).map_err(|error| error.to_string())
    }

    fn request_spec(&self) -> Result<RequestSpec, String> {
        let explicit_body = match self.data.as_deref() {
            None => None,
            Some("@-") => Some(read_stdin()?),
            Some(data) => match data.strip_prefix('@') {
                Some(file) => Some(
                    std::fs::read(file)
                        .map(Bytes::from)
                        .map_err(|error| format!("-d @{file}: {error}"))?,
                ),
                None => Some(Bytes::copy_from_slice(data.as_bytes())),
            },
        };
        let method = match &self.method {
            Some(method) => http::Method::from_bytes(method.to_ascii_uppercase().as_bytes())
                .map_err(|_| format!("-X `{method}` is not an HTTP method"))?,
            None if explicit_body.is_some() => http::Method::POST,
            None => http::Method::GET,
        };
        let carries_body = matches!(method.as_str(), "POST" | "PUT" | "PATCH");
        let body = match explicit_body {
            Some(body) => body,
            None if carries_body && !std::io::stdin().is_terminal() => read_stdin()?,
            None => Bytes::new(),
        };
        if !self.path.starts_with('/') {
            return Err(format!("--path `{}` must start with `/`", self.path));
        }
        let path_and_query = self
            .path
            .parse::<http::uri::PathAndQuery>()
            .map_err(|error| format!("--path `{}`: {error}", self.path))?;
        let mut headers = http::HeaderMap::new();
        for header in &self.headers {
            let (name, value) = header
                .split_once(':')
                .ok_or_else(|| format!("-H `{header}`: expected `NAME: VALUE`"))?;
            let name = http::HeaderName::from_bytes(name.trim().as_bytes())
                .map_err(|_| format!("-H `{header}`: invalid header name"))?;
            let value = http::HeaderValue::from_str(value.trim())
                .map_err(|_| format!("-H `{header}`: invalid header value"))?;
            headers.append(name, value);
        }
        if !body.is_empty() && !headers.contains_key(http::header::CONTENT_LENGTH) {
            headers.insert(http::header::CONTENT_LENGTH, body.len().into());
        }
        Ok(RequestSpec {
            method,
            path_and_query,
            headers,
            body,
        })
    }

    async fn run(self, def: FunctionDef, spec: RequestSpec) -> Exit {
        let engine = match Engine::new(EngineConfig::default()) {
            Ok(engine) => engine,
            Err(error) => return fail(Exit::Internal, error),
        };
        let store_dir = self.engine.store_dir();
        let store = match ModuleStore::open(engine.clone(), &store_dir) {
            Ok(store) => Arc::new(store),
            Err(error) => return fail(Exit::Usage, error),
        };
        let slot = {
            let (engine, store, def) = (engine.clone(), store.clone(), def.clone());
            let created = tokio::task::spawn_blocking(move || {
                Slot::create(engine, &store, def, SlotConfig::default(), Arc::new(NoObserver))
            })
            .await;
            match created {
                Ok(Ok(slot)) => slot,
                Ok(Err(error)) => return fail(Exit::Usage, error),
                Err(error) => return fail(Exit::Internal, error),
            }
        };
        let capacity = NodeCapacity::unbounded();
        let mut reports = Vec::with_capacity(self.repeat as usize);
        let mut exit = Exit::Success;
        for index in 0..self.repeat {
            let (report, body) = slot.call_to_completion(&capacity, spec.request()).await;
            let first = index == 0;
            if first && self.verbose {
                let headers = body.as_ref().ok().map(|collected| &collected.headers);
                print_verbose(&def, slot.cold_start(), &report, headers, &spec);
            }
            if !report.log.0.is_empty() || report.log.1 > 0 {
                let mut stderr = std::io::stderr().lock();
                let _ = stderr.write_all(&report.log.0);
                if report.log.1 > 0 {
                    let _ = writeln!(stderr, "[{} more bytes of guest output dropped]", report.log.1);
                }
            }
            match (&report.outcome, &body) {
                (Ok(status), Ok(collected)) => {
                    if first {
                        let mut stdout = std::io::stdout().lock();
                        if stdout
                            .write_all(&collected.body)
                            .and_then(|()| stdout.flush())
                            .is_err()
                        {
                            return fail(Exit::Internal, "cannot write the response body to stdout");
                        }
                    }
                    if exit == Exit::Success && (status.is_client_error() || status.is_server_error()) {
                        exit = Exit::GuestErrorResponse;
                    }
                }
                (Err(error), _) | (Ok(_), Err(error)) => {
                    if exit == Exit::Success {
                        eprintln!("error: {error}");
                        exit = exit_for(error.kind());
                    }
                }
            }
            reports.push(report);
        }
        if self.repeat > 1 {
            print_repeat_summary(slot.cold_start(), &reports);
        }
        exit
    }
}

fn exit_for(kind: FaultKind) -> Exit {
    match kind {
        FaultKind::Timeout => Exit::Timeout,
        FaultKind::Trap
        | FaultKind::MemoryLimit
        | FaultKind::OutputTooLarge
        | FaultKind::BadOutput
        | FaultKind::Exit
        | FaultKind::NoResponse => Exit::TrapOrLimit,
        FaultKind::BodyTooLarge | FaultKind::BodyRead => Exit::Usage,
        FaultKind::Busy | FaultKind::Internal | FaultKind::Canceled => Exit::Internal,
    }
}

/// `path.wasm`, or `DIR/NAME` → `DIR/NAME.wasm`.
fn resolve_target(target: &Path) -> Result<PathBuf, String> {
    if target.extension().is_some_and(|ext| ext == "wasm") {
        if target.is_file() {
            return Ok(target.to_owned());
        }
        return Err(format!("{}: no such file", target.display()));
    }
    let with_ext = target.with_extension("wasm");
    if with_ext.is_file() {
        return Ok(with_ext);
    }
    if target.is_file() {
        return Ok(target.to_owned());
    }
    Err(format!(
        "{}: no such function (looked for {})",
        target.display(),
        with_ext.display()
    ))
}

fn read_stdin() -> Result<Bytes, String> {
    let mut body = Vec::new();
    std::io::stdin()
        .read_to_end(&mut body)
        .map_err(|error| format!("reading the body from stdin: {error}"))?;
    Ok(body.into())
}

fn print_verbose(
    def: &FunctionDef,
    cold: ColdStart,
    report: &CallReport,
    headers: Option<&http::HeaderMap>,
    spec: &RequestSpec,
) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "> {} {}", spec.method, spec.path_and_query);
    for (name, value) in &spec.headers {
        let _ = writeln!(err, "> {name}: {}", String::from_utf8_lossy(value.as_bytes()));
    }
    if let Ok(status) = &report.outcome {
        let _ = writeln!(err, "< {status}");
    }
    for (name, value) in headers.into_iter().flatten() {
        let _ = writeln!(err, "< {name}: {}", String::from_utf8_lossy(value.as_bytes()));
    }
    let _ = writeln!(err, "* call id:   {}", report.id);
    let _ = writeln!(err, "* function:  {} ({})", def.name, def.kind.describe());
    let _ = writeln!(err, "* digest:    {}", def.digest);
    let _ = writeln!(err, "* slot hash: {}", def.slot_hash);
    let _ = writeln!(
        err,
        "* load:      {} ({})",
        human(cold.load_time),
        match cold.source {
            crate::module_store::LoadSource::Compiler => "compiled",
            crate::module_store::LoadSource::Store => "from the module store",
            crate::module_store::LoadSource::Memory => "already in memory",
        }
    );
    let _ = writeln!(err, "* prepare:   {}", human(cold.prepare_time));
    let _ = writeln!(err, "* instantiate: {}", human(report.instantiate_time));
    let _ = writeln!(err, "* user execution: {}", human(report.user_execution_time));
    let _ = writeln!(
        err,
        "* total:     {} (call; excludes load and prepare)",
        human(report.total)
    );
}

/// With `--repeat`: the cold call apart from the warm ones.
fn print_repeat_summary(cold: ColdStart, reports: &[CallReport]) {
    let Some((first, warm)) = reports.split_first() else {
        return;
    };
    let mut err = std::io::stderr().lock();
    let _ = writeln!(
        err,
        "cold: {} = load {} + prepare {} + call {} (instantiate {}, user {})",
        human(cold.load_time + cold.prepare_time + first.total),
        human(cold.load_time),
        human(cold.prepare_time),
        human(first.total),
        human(first.instantiate_time),
        human(first.user_execution_time),
    );
    if warm.is_empty() {
        return;
    }
    let stat = |pick: fn(&CallReport) -> Duration| {
        let mut values: Vec<Duration> = warm.iter().map(pick).collect();
        values.sort();
        let p50 = values[values.len() / 2];
        let p99 = values[((values.len() * 99) / 100).min(values.len() - 1)];
        format!(
            "p50 {} p99 {} (min {}, max {})",
            human(p50),
            human(p99),
            human(values[0]),
            human(values[values.len() - 1])
        )
    };
    let _ = writeln!(err, "warm: {} calls", warm.len());
    let _ = writeln!(err, "  total:       {}", stat(|r| r.total));
    let _ = writeln!(err, "  instantiate: {}", stat(|r| r.instantiate_time));
    let _ = writeln!(err, "  user:        {}", stat(|r| r.user_execution_time));
}
