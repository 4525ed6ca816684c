//! The CLI: one struct per subcommand, each with an `execute()`, and the
//! exit codes they share.

mod bench;
mod call;
mod invoke;
mod serve;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

pub use bench::BenchCommand;
pub use call::CallCommand;
pub use invoke::InvokeCommand;
pub use serve::{ServeCommand, shutdown_signal};

/// Run serverless function calls as WebAssembly instances.
#[derive(Parser, Debug)]
#[command(name = "fnrunner", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run one function call locally and print the response body.
    Invoke(InvokeCommand),
    /// Run a runner node serving a directory of functions over HTTP(S).
    Serve(Box<ServeCommand>),
    /// Measure cold starts, in process or against running nodes.
    Bench(Box<BenchCommand>),
    /// Place one call across runner nodes and print the response body.
    Call(Box<CallCommand>),
}

impl Command {
    pub fn execute(self) -> std::process::ExitCode {
        let code = match self {
            Command::Invoke(command) => command.execute(),
            Command::Serve(command) => command.execute(),
            Command::Bench(command) => command.execute(),
            Command::Call(command) => command.execute(),
        };
        std::process::ExitCode::from(code as u8)
    }
}

/// Exit statuses of the commands (documented in the README).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    /// The call answered 2xx or 3xx.
    Success = 0,
    /// The guest answered with a 4xx or 5xx status of its own.
    GuestErrorResponse = 1,
    /// Bad command line, settings, or module (nothing ran).
    Usage = 2,
    /// The call ran past its deadline.
    Timeout = 3,
    /// The guest trapped, hit a limit (memory, output size), exited
    /// non-zero, or produced no valid response.
    TrapOrLimit = 4,
    /// The runner itself failed.
    Internal = 5,
}

/// Flags shared by commands that run Wasm.
#[derive(clap::Args, Debug, Clone)]
pub struct EngineFlags {
    /// Directory of the module store (compiled artifacts).
    #[arg(long, env = "FNRUNNER_STORE_DIR", value_name = "DIR")]
    pub store_dir: Option<PathBuf>,
}

impl EngineFlags {
    /// The store directory: the flag, else `$XDG_CACHE_HOME/fnrunner/store`,
    /// else `~/.cache/fnrunner/store`, else a directory under the temp dir.
    pub fn store_dir(&self) -> PathBuf {
        if let Some(dir) = &self.store_dir {
            return dir.clone();
        }
        let cache = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")));
        match cache {
            Some(cache) => cache.join("fnrunner").join("store"),
            None => std::env::temp_dir().join("fnrunner-store"),
        }
    }
}

/// TLS flags of commands that talk to nodes.
#[derive(clap::Args, Debug, Clone)]
pub struct ClientTlsFlags {
    /// CA certificates (PEM) to trust for `https://` nodes [default: the
    /// public web roots].
    #[arg(long, env = "FNRUNNER_TLS_CA", value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for nodes that require mTLS.
    #[arg(
        long,
        env = "FNRUNNER_TLS_CLIENT_CERT",
        value_name = "PEM",
        requires = "tls_client_key"
    )]
    pub tls_client_cert: Option<PathBuf>,
    /// Key of `--tls-client-cert` (PEM).
    #[arg(
        long,
        env = "FNRUNNER_TLS_CLIENT_KEY",
        value_name = "PEM",
        requires = "tls_client_cert"
    )]
    pub tls_client_key: Option<PathBuf>,
}

impl ClientTlsFlags {
    pub fn config(&self) -> Result<rustls::ClientConfig, String> {
        crate::client::ClientTls {
            ca: self.tls_ca.clone(),
            cert: self.tls_client_cert.clone(),
            key: self.tls_client_key.clone(),
        }
        .config()
    }
}

/// Prints a one-line error and returns `code`.
pub(crate) fn fail(code: Exit, message: impl std::fmt::Display) -> Exit {
    eprintln!("error: {message}");
    code
}

/// A duration in the unit that reads best: ns, µs, ms or s.
pub fn human(duration: std::time::Duration) -> String {
    let nanos = duration.as_nanos() as f64;
    if nanos < 1_000.0 {
        format!("{nanos:.0} ns")
    } else if nanos < 1_000_000.0 {
        format!("{:.1} µs", nanos / 1_000.0)
    } else if nanos < 1_000_000_000.0 {
        format!("{:.2} ms", nanos / 1_000_000.0)
    } else {
        format!("{:.2} s", nanos / 1_000_000_000.0)
    }
}

/// Sets up logging to stderr: `text` or `json`, filtered by `RUST_LOG`
/// (default `info`).
pub fn init_logging(format: &str) -> Result<(), String> {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    // NB: colours only on a terminal; a log file gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let result = match format {
        "json" => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
        "text" => builder.try_init(),
        other => return Err(format!("--log-format `{other}`: use `text` or `json`")),
    };
    result.map_err(|error| format!("cannot set up logging: {error}"))
}
