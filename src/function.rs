//! Function definitions: a name bound to a module and its settings, the
//! settings file format (`NAME.toml` beside `NAME.wasm`), their validation,
//! and the SlotHashId that names the slot calls of a function run in.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use toml_writer::{ToTomlKey as _, ToTomlValue as _};

use crate::guest::GuestKind;
use crate::module_store::ModuleDigest;

/// Linear memory a function may use unless its settings say otherwise
/// (Fn's default function memory).
pub const DEFAULT_MEMORY_MB: u64 = 128;
/// Largest `memory_mb` a setting may ask for: the 32-bit Wasm address space.
pub const MAX_MEMORY_MB: u64 = 4096;
/// Wall-clock limit of one call unless the settings say otherwise (Fn's
/// default sync timeout).
pub const DEFAULT_TIMEOUT_MS: u64 = 30_000;
/// Longest `timeout_ms` a setting may ask for: one hour.
pub const MAX_TIMEOUT_MS: u64 = 3_600_000;
/// Calls one instance serves before it is retired: 1 is a fresh instance per
/// call, as `wasmtime serve` does by default.
pub const DEFAULT_MAX_JOBS: u32 = 1;
/// Upper bound of `max_jobs`.
pub const MAX_MAX_JOBS: u32 = 1_000_000;
/// Instances kept ready ahead of demand.
pub const DEFAULT_MIN_WARM: u32 = 0;
/// Upper bound of `min_warm` and `max_concurrency`.
pub const MAX_INSTANCES_SETTING: u32 = 10_000;
/// How long an idle instance (and then an unused slot) is kept (Fn's hot
/// function idle timeout).
pub const DEFAULT_IDLE_TIMEOUT_MS: u64 = 30_000;
/// Longest `idle_timeout_ms`: one day.
pub const MAX_IDLE_TIMEOUT_MS: u64 = 86_400_000;
/// Longest function name.
pub const MAX_NAME_LEN: usize = 64;

/// Settings of one function, validated. Instance-shaping settings feed the
/// SlotHashId; `pool` only steers the slot's pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Pins the guest kind; `None` means "detect from the bytes".
    pub kind: Option<GuestKind>,
    pub memory_mb: u64,
    pub timeout_ms: u64,
    /// The function's configuration, given to the guest as its environment.
    pub env: BTreeMap<String, String>,
    pub preopens: Vec<Preopen>,
    pub allowed_outbound_hosts: Vec<OutboundHost>,
    pub pool: PoolSettings,
}

/// Settings that steer a slot's pool and are not part of its hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSettings {
    pub max_jobs: u32,
    pub min_warm: u32,
    /// Calls of this function running at once on this node; `None` leaves
    /// only the node's own limits.
    pub max_concurrency: Option<u32>,
    pub idle_timeout_ms: u64,
    /// An instance whose linear memory has grown past this many MiB is
    /// retired after its call; `None` never retires for size.
    pub memory_high_water_mb: Option<u64>,
    /// Supervision overrides; `None` takes the node's default.
    pub escalation: Option<crate::pool::EscalationPolicy>,
    pub escalate_after: Option<u32>,
    pub escalate_window_ms: Option<u64>,
    pub quarantine_backoff_ms: Option<u64>,
    pub quarantine_max_backoff_ms: Option<u64>,
}

impl PoolSettings {
    /// This function's supervision: its own settings over the node's.
    pub fn supervision(&self, node: &crate::pool::Supervision) -> crate::pool::Supervision {
        let ms = |v: Option<u64>, default: Duration| v.map(Duration::from_millis).unwrap_or(default);
        let backoff = ms(self.quarantine_backoff_ms, node.backoff);
        crate::pool::Supervision {
            policy: self.escalation.unwrap_or(node.policy),
            escalate_after: self.escalate_after.unwrap_or(node.escalate_after),
            window: ms(self.escalate_window_ms, node.window),
            backoff,
            max_backoff: ms(self.quarantine_max_backoff_ms, node.max_backoff).max(backoff),
        }
    }
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            max_jobs: DEFAULT_MAX_JOBS,
            min_warm: DEFAULT_MIN_WARM,
            max_concurrency: None,
            idle_timeout_ms: DEFAULT_IDLE_TIMEOUT_MS,
            memory_high_water_mb: None,
            escalation: None,
            escalate_after: None,
            escalate_window_ms: None,
            quarantine_backoff_ms: None,
            quarantine_max_backoff_ms: None,
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            kind: None,
            memory_mb: DEFAULT_MEMORY_MB,
            timeout_ms: DEFAULT_TIMEOUT_MS,
            env: BTreeMap::new(),
            preopens: Vec::new(),
            allowed_outbound_hosts: Vec::new(),
            pool: PoolSettings::default(),
        }
    }
}

impl Settings {
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.pool.idle_timeout_ms)
    }

    pub fn memory_bytes(&self) -> u64 {
        self.memory_mb * crate::engine::MIB
    }

    /// Parses and validates a settings document. `origin` names it in errors
    /// (a file path, or "deploy settings"); relative preopen paths are
    /// resolved against `base_dir`.
    pub fn parse(text: &str, origin: &str, base_dir: &Path) -> Result<Self, SettingsError> {
        let file: SettingsFile = toml::from_str(text).map_err(|error| {
            let (line, key) = locate(text, error.span());
            SettingsError {
                origin: origin.to_owned(),
                line,
                key,
                message: error.message().trim().to_owned(),
            }
        })?;
        file.validate(origin, base_dir)
    }

    /// Reads `path`; a missing file means default settings.
    pub fn from_file(path: &Path) -> Result<Self, SettingsError> {
        let origin = path.display().to_string();
        let base_dir = path.parent().unwrap_or(Path::new("."));
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text, &origin, base_dir),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(error) => Err(SettingsError::new(&origin, None, format!("cannot read: {error}"))),
        }
    }

    /// Renders these settings as a settings file that parses back to them.
    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        if let Some(kind) = self.kind {
            out.push_str(&format!("kind = {}\n", toml_str(kind.as_str())));
        }
        out.push_str(&format!("memory_mb = {}\n", self.memory_mb));
        out.push_str(&format!("timeout_ms = {}\n", self.timeout_ms));
        out.push_str(&format!("max_jobs = {}\n", self.pool.max_jobs));
        out.push_str(&format!("min_warm = {}\n", self.pool.min_warm));
        if let Some(max) = self.pool.max_concurrency {
            out.push_str(&format!("max_concurrency = {max}\n"));
        }
        out.push_str(&format!("idle_timeout_ms = {}\n", self.pool.idle_timeout_ms));
        if let Some(mark) = self.pool.memory_high_water_mb {
            out.push_str(&format!("memory_high_water_mb = {mark}\n"));
        }
        if let Some(policy) = self.pool.escalation {
            out.push_str(&format!("escalation = {}\n", toml_str(policy.as_str())));
        }
        for (key, value) in [
            ("escalate_after", self.pool.escalate_after.map(u64::from)),
            ("escalate_window_ms", self.pool.escalate_window_ms),
            ("quarantine_backoff_ms", self.pool.quarantine_backoff_ms),
            ("quarantine_max_backoff_ms", self.pool.quarantine_max_backoff_ms),
        ] {
            if let Some(value) = value {
                out.push_str(&format!("{key} = {value}\n"));
            }
        }
        let hosts: Vec<String> = self
            .allowed_outbound_hosts
            .iter()
            .map(|h| toml_str(&h.to_string()))
            .collect();
        out.push_str(&format!("allowed_outbound_hosts = [{}]\n", hosts.join(", ")));
        for preopen in &self.preopens {
            out.push_str(&format!(
                "\n[[preopen]]\nhost = {}\nguest = {}\nwritable = {}\n",
                toml_str(&preopen.host.display().to_string()),
                toml_str(&preopen.guest),
                preopen.writable
            ));
        }
        if !self.env.is_empty() {
            out.push_str("\n[env]\n");
            for (key, value) in &self.env {
                out.push_str(&format!("{} = {}\n", key.to_toml_key(), toml_str(value)));
            }
        }
        out
    }

    /// The settings as a TOML table: what `to_toml` writes, read back (for
    /// merging a PATCH and for JSON reports).
    pub fn to_table(&self) -> Result<toml::Table, toml::de::Error> {
        toml::from_str(&self.to_toml())
    }

    /// Applies command-line overrides on top of the file's settings.
    pub fn apply(&mut self, overrides: &SettingsOverrides) -> Result<(), SettingsError> {
        let origin = "command line";
        if let Some(memory_mb) = overrides.memory_mb {
            self.memory_mb = check_range(origin, "memory_mb", memory_mb, 1, MAX_MEMORY_MB)?;
        }
        if let Some(timeout_ms) = overrides.timeout_ms {
            self.timeout_ms = check_range(origin, "timeout_ms", timeout_ms, 1, MAX_TIMEOUT_MS)?;
        }
        for (key, value) in &overrides.env {
            check_env(origin, key, value)?;
            self.env.insert(key.clone(), value.clone());
        }
        Ok(())
    }

    /// Checks the settings against a guest kind: rules that depend on it.
    pub fn check_kind(&self, kind: GuestKind, origin: &str) -> Result<(), SettingsError> {
        if kind == GuestKind::Cgi && self.pool.max_jobs > 1 {
            return Err(SettingsError::new(
                origin,
                Some("max_jobs"),
                format!(
                    "is {} but a CGI module runs `_start` once and cannot be re-entered; \
                     max_jobs must be 1 for CGI functions",
                    self.pool.max_jobs
                ),
            ));
        }
        Ok(())
    }
}

/// Settings given on a command line, applied over a function's file.
#[derive(Debug, Clone, Default)]
pub struct SettingsOverrides {
    pub memory_mb: Option<u64>,
    pub timeout_ms: Option<u64>,
    pub env: Vec<(String, String)>,
}

/// A host directory made visible to the guest.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Preopen {
    /// Absolute, canonical host path.
    pub host: PathBuf,
    /// Path the guest sees it at.
    pub guest: String,
    /// Read-only unless this is set.
    pub writable: bool,
}

/// One entry of `allowed_outbound_hosts`: `host`, `host:port`,
/// `scheme://host[:port]`; `*` as the host, or as the port, matches any;
/// `*.example.com` matches subdomains.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct OutboundHost {
    pub scheme: Option<String>,
    pub host: String,
    pub port: Option<u16>,
}

impl OutboundHost {
    pub fn parse(spec: &str) -> Result<Self, String> {
        let spec = spec.trim();
        let (scheme, rest) = match spec.split_once("://") {
            Some((scheme, rest)) => {
                let scheme = scheme.to_ascii_lowercase();
                if scheme != "http" && scheme != "https" {
                    return Err(format!("scheme `{scheme}` is not http or https"));
                }
                (Some(scheme), rest)
            }
            None => (None, spec),
        };
        let rest = rest.trim_end_matches('/');
        if rest.contains('/') || rest.contains('?') || rest.contains('@') {
            return Err(format!(
                "`{spec}` must be a host with an optional port, not a URL path"
            ));
        }
        // `[v6]:port` keeps its brackets; otherwise the last `:` starts a port.
        let split = match rest.strip_prefix('[') {
            Some(v6) => v6
                .split_once(']')
                .map(|(addr, tail)| (&rest[..addr.len() + 2], tail.strip_prefix(':')))
                .ok_or_else(|| format!("unclosed `[` in `{spec}`"))?,
            None => match rest.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (rest, None),
            },
        };
        let (host, port) = match split {
            (host, None | Some("*")) => (host, None),
            (host, Some(port)) => (
                host,
                Some(
                    port.parse::<u16>()
                        .map_err(|_| format!("bad port `{port}` in `{spec}`"))?,
                ),
            ),
        };
        let host = host.to_ascii_lowercase();
        if host.is_empty() {
            return Err(format!("`{spec}` has no host"));
        }
        let valid = host == "*"
            || host
                .trim_start_matches("*.")
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '[' | ']' | ':'));
        if !valid {
            return Err(format!("bad host `{host}` in `{spec}`"));
        }
        Ok(Self { scheme, host, port })
    }

    /// Whether a request to `scheme://host:port` is allowed by this entry.
    pub fn allows(&self, scheme: &str, host: &str, port: u16) -> bool {
        if let Some(own) = &self.scheme
            && !own.eq_ignore_ascii_case(scheme)
        {
            return false;
        }
        if let Some(own) = self.port
            && own != port
        {
            return false;
        }
        let host = host.to_ascii_lowercase();
        if self.host == "*" {
            return true;
        }
        match self.host.strip_prefix("*.") {
            Some(suffix) => host.len() > suffix.len() + 1 && host.ends_with(&format!(".{suffix}")),
            None => self.host == host,
        }
    }
}

impl fmt::Display for OutboundHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(scheme) = &self.scheme {
            write!(f, "{scheme}://")?;
        }
        f.write_str(&self.host)?;
        match self.port {
            Some(port) => write!(f, ":{port}"),
            None => f.write_str(":*"),
        }
    }
}

/// A settings problem, naming where (file, line), which key, and what.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub struct SettingsError {
    pub origin: String,
    pub line: Option<usize>,
    pub key: Option<String>,
    pub message: String,
}

impl SettingsError {
    fn new(origin: &str, key: Option<&str>, message: String) -> Self {
        Self {
            origin: origin.to_owned(),
            line: None,
            key: key.map(str::to_owned),
            message,
        }
    }
}

impl fmt::Display for SettingsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.origin)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        write!(f, ": ")?;
        if let Some(key) = &self.key {
            write!(f, "key `{key}` ")?;
        }
        write!(f, "{}", self.message)
    }
}

/// Hex SHA-256 over everything that shapes an instance of a function (see
/// DESIGN.md): change the module or any of those settings and the slot
/// changes; pool settings do not.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotHashId(Arc<str>);

impl SlotHashId {
    pub fn compute(digest: &ModuleDigest, kind: GuestKind, settings: &Settings) -> Self {
        // Canonical form: one `name=value` field per line, `\0`-separated,
        // in a fixed order; maps and lists sorted so that writing them in
        // another order hashes the same. Settings may not contain NUL
        // (validation refuses it), so the separator is unambiguous.
        let mut fields: Vec<String> = vec![
            "fnrunner-slot/1".into(),
            format!("module={digest}"),
            format!("kind={}", kind.as_str()),
            format!("memory_mb={}", settings.memory_mb),
            format!("timeout_ms={}", settings.timeout_ms),
        ];
        for (key, value) in &settings.env {
            fields.push(format!("env={key}={value}"));
        }
        let mut preopens = settings.preopens.clone();
        preopens.sort();
        for p in &preopens {
            let mode = if p.writable { "rw" } else { "ro" };
            fields.push(format!("preopen={}={}={mode}", p.guest, p.host.display()));
        }
        let mut hosts: Vec<String> = settings
            .allowed_outbound_hosts
            .iter()
            .map(|h| h.to_string())
            .collect();
        hosts.sort();
        hosts.dedup();
        for host in hosts {
            fields.push(format!("outbound={host}"));
        }
        let mut hasher = Sha256::new();
        for field in &fields {
            hasher.update(field.as_bytes());
            hasher.update([0]);
        }
        Self(hex::encode(hasher.finalize()).into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first 12 hex digits, for logs.
    pub fn short(&self) -> &str {
        &self.0[..12]
    }
}

impl fmt::Display for SlotHashId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A function: name, module bytes, detected kind, settings and slot hash.
#[derive(Clone)]
pub struct FunctionDef {
    pub name: Arc<str>,
    pub bytes: bytes::Bytes,
    pub digest: ModuleDigest,
    pub kind: GuestKind,
    pub settings: Arc<Settings>,
    pub slot_hash: SlotHashId,
}

impl fmt::Debug for FunctionDef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FunctionDef")
            .field("name", &self.name)
            .field("digest", &self.digest)
            .field("kind", &self.kind)
            .field("slot_hash", &self.slot_hash)
            .finish()
    }
}

/// Why a function could not be defined.
#[derive(Debug, thiserror::Error)]
pub enum DefineError {
    #[error("invalid function name `{0}`: use 1-64 letters, digits, `-`, `_` or `.`, not starting with `.`")]
    Name(String),
    #[error("cannot read module {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{origin}: {source}")]
    Detect {
        origin: String,
        #[source]
        source: crate::guest::DetectError,
    },
    #[error(transparent)]
    Settings(#[from] SettingsError),
}

impl FunctionDef {
    /// Builds a definition from module bytes and validated settings.
    pub fn new(
        name: &str,
        bytes: bytes::Bytes,
        settings: Settings,
        origin: &str,
    ) -> Result<Self, DefineError> {
        check_name(name)?;
        let detected = GuestKind::detect(&bytes).map_err(|source| DefineError::Detect {
            origin: origin.to_owned(),
            source,
        })?;
        let kind = match settings.kind {
            Some(pinned) if pinned != detected => {
                return Err(SettingsError::new(
                    origin,
                    Some("kind"),
                    format!(
                        "pins `{}` but the module is a {}",
                        pinned.as_str(),
                        detected.describe()
                    ),
                )
                .into());
            }
            _ => detected,
        };
        settings.check_kind(kind, origin)?;
        let digest = ModuleDigest::of(&bytes);
        let slot_hash = SlotHashId::compute(&digest, kind, &settings);
        Ok(Self {
            name: name.into(),
            bytes,
            digest,
            kind,
            settings: Arc::new(settings),
            slot_hash,
        })
    }

    /// Loads `path` (a `.wasm` file) and the `.toml` beside it, then applies
    /// the overrides.
    pub fn load(path: &Path, overrides: &SettingsOverrides) -> Result<Self, DefineError> {
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let bytes = std::fs::read(path).map_err(|source| DefineError::Read {
            path: path.to_owned(),
            source,
        })?;
        let settings_path = path.with_extension("toml");
        let mut settings = Settings::from_file(&settings_path)?;
        settings.apply(overrides)?;
        let origin = path.display().to_string();
        Self::new(&name, bytes.into(), settings, &origin)
    }

    /// Every function in `dir`: each `NAME.wasm` with its optional
    /// `NAME.toml`, sorted by name. Fails on the first bad one.
    pub fn load_dir(dir: &Path) -> Result<Vec<Self>, DefineError> {
        let entries = std::fs::read_dir(dir).map_err(|source| DefineError::Read {
            path: dir.to_owned(),
            source,
        })?;
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| path.extension().is_some_and(|ext| ext == "wasm") && path.is_file())
            .collect();
        paths.sort();
        paths
            .iter()
            .map(|path| Self::load(path, &SettingsOverrides::default()))
            .collect()
    }
}

/// Checks a function name: it becomes a file name and a URL segment.
pub fn check_name(name: &str) -> Result<(), DefineError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(DefineError::Name(name.to_owned()))
    }
}

/// The settings file as written: every key optional, unknown keys refused.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SettingsFile {
    kind: Option<String>,
    memory_mb: Option<u64>,
    timeout_ms: Option<u64>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    preopen: Vec<PreopenFile>,
    #[serde(default)]
    allowed_outbound_hosts: Vec<String>,
    max_jobs: Option<u32>,
    min_warm: Option<u32>,
    max_concurrency: Option<u32>,
    idle_timeout_ms: Option<u64>,
    memory_high_water_mb: Option<u64>,
    escalation: Option<String>,
    escalate_after: Option<u32>,
    escalate_window_ms: Option<u64>,
    quarantine_backoff_ms: Option<u64>,
    quarantine_max_backoff_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PreopenFile {
    host: PathBuf,
    guest: String,
    #[serde(default)]
    writable: bool,
}

impl SettingsFile {
    fn validate(self, origin: &str, base_dir: &Path) -> Result<Settings, SettingsError> {
        let defaults = Settings::default();
        let kind = match self.kind.as_deref() {
            None => None,
            Some(kind) => Some(GuestKind::from_name(kind).ok_or_else(|| {
                SettingsError::new(
                    origin,
                    Some("kind"),
                    format!("must be `http` or `cgi`, got `{kind}`"),
                )
            })?),
        };
        let memory_mb = match self.memory_mb {
            Some(v) => check_range(origin, "memory_mb", v, 1, MAX_MEMORY_MB)?,
            None => defaults.memory_mb,
        };
        let timeout_ms = match self.timeout_ms {
            Some(v) => check_range(origin, "timeout_ms", v, 1, MAX_TIMEOUT_MS)?,
            None => defaults.timeout_ms,
        };
        for (key, value) in &self.env {
            check_env(origin, key, value)?;
        }
        let mut preopens = Vec::with_capacity(self.preopen.len());
        for p in self.preopen {
            let host_path = if p.host.is_absolute() {
                p.host.clone()
            } else {
                base_dir.join(&p.host)
            };
            let host = host_path.canonicalize().map_err(|error| {
                SettingsError::new(
                    origin,
                    Some("preopen.host"),
                    format!("`{}` cannot be opened: {error}", p.host.display()),
                )
            })?;
            if !host.is_dir() {
                return Err(SettingsError::new(
                    origin,
                    Some("preopen.host"),
                    format!("`{}` is not a directory", p.host.display()),
                ));
            }
            if p.guest.is_empty() || p.guest.contains('\0') {
                return Err(SettingsError::new(
                    origin,
                    Some("preopen.guest"),
                    "must be a non-empty path".into(),
                ));
            }
            if preopens.iter().any(|q: &Preopen| q.guest == p.guest) {
                return Err(SettingsError::new(
                    origin,
                    Some("preopen.guest"),
                    format!("`{}` is preopened twice", p.guest),
                ));
            }
            preopens.push(Preopen {
                host,
                guest: p.guest,
                writable: p.writable,
            });
        }
        let allowed_outbound_hosts = self
            .allowed_outbound_hosts
            .iter()
            .map(|spec| {
                OutboundHost::parse(spec)
                    .map_err(|message| SettingsError::new(origin, Some("allowed_outbound_hosts"), message))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let pool = PoolSettings {
            max_jobs: match self.max_jobs {
                Some(v) => check_range(origin, "max_jobs", v, 1, MAX_MAX_JOBS)?,
                None => DEFAULT_MAX_JOBS,
            },
            min_warm: match self.min_warm {
                Some(v) => check_range(origin, "min_warm", v, 0, MAX_INSTANCES_SETTING)?,
                None => DEFAULT_MIN_WARM,
            },
            max_concurrency: match self.max_concurrency {
                Some(v) => Some(check_range(
                    origin,
                    "max_concurrency",
                    v,
                    1,
                    MAX_INSTANCES_SETTING,
                )?),
                None => None,
            },
            idle_timeout_ms: match self.idle_timeout_ms {
                Some(v) => check_range(origin, "idle_timeout_ms", v, 1, MAX_IDLE_TIMEOUT_MS)?,
                None => DEFAULT_IDLE_TIMEOUT_MS,
            },
            memory_high_water_mb: match self.memory_high_water_mb {
                Some(v) => Some(check_range(origin, "memory_high_water_mb", v, 1, memory_mb)?),
                None => None,
            },
            escalation: match self.escalation.as_deref() {
                None => None,
                Some(name) => Some(crate::pool::EscalationPolicy::parse(name).ok_or_else(|| {
                    SettingsError::new(
                        origin,
                        Some("escalation"),
                        format!("must be `restart_one` or `restart_all`, got `{name}`"),
                    )
                })?),
            },
            escalate_after: match self.escalate_after {
                Some(v) => Some(check_range(origin, "escalate_after", v, 0, 1_000_000)?),
                None => None,
            },
            escalate_window_ms: match self.escalate_window_ms {
                Some(v) => Some(check_range(
                    origin,
                    "escalate_window_ms",
                    v,
                    1,
                    MAX_IDLE_TIMEOUT_MS,
                )?),
                None => None,
            },
            quarantine_backoff_ms: match self.quarantine_backoff_ms {
                Some(v) => Some(check_range(
                    origin,
                    "quarantine_backoff_ms",
                    v,
                    1,
                    MAX_IDLE_TIMEOUT_MS,
                )?),
                None => None,
            },
            quarantine_max_backoff_ms: match self.quarantine_max_backoff_ms {
                Some(v) => Some(check_range(
                    origin,
                    "quarantine_max_backoff_ms",
                    v,
                    1,
                    MAX_IDLE_TIMEOUT_MS,
                )?),
                None => None,
            },
        };
        Ok(Settings {
            kind,
            memory_mb,
            timeout_ms,
            env: self.env,
            preopens,
            allowed_outbound_hosts,
            pool,
        })
    }
}

fn check_range<T: PartialOrd + fmt::Display + Copy>(
    origin: &str,
    key: &str,
    value: T,
    min: T,
    max: T,
) -> Result<T, SettingsError> {
    if value < min || value > max {
        return Err(SettingsError::new(
            origin,
            Some(key),
            format!("must be between {min} and {max}, got {value}"),
        ));
    }
    Ok(value)
}

fn check_env(origin: &str, key: &str, value: &str) -> Result<(), SettingsError> {
    if key.is_empty() || key.contains('=') || key.contains('\0') {
        return Err(SettingsError::new(
            origin,
            Some("env"),
            format!(
                "variable name `{}` must be non-empty without `=` or NUL",
                key.escape_default()
            ),
        ));
    }
    if value.contains('\0') {
        return Err(SettingsError::new(
            origin,
            Some("env"),
            format!("value of `{key}` contains NUL"),
        ));
    }
    Ok(())
}

/// Line number (1-based) and key of a TOML error's span.
fn locate(text: &str, span: Option<std::ops::Range<usize>>) -> (Option<usize>, Option<String>) {
    let Some(span) = span else { return (None, None) };
    let start = span.start.min(text.len());
    let line = text[..start].matches('\n').count() + 1;
    let line_text = text.lines().nth(line - 1).unwrap_or("");
    let key = line_text
        .split_once('=')
        .map(|(key, _)| key.trim().trim_matches('"').to_owned())
        .filter(|key| !key.is_empty() && !key.starts_with('['));
    (Some(line), key)
}

/// `s` as a TOML string value. NB: keys are written with `to_toml_key`,
/// for a value may be a multi-line string and a key may not.
fn toml_str(s: &str) -> String {
    s.to_toml_value()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(text: &str) -> Settings {
        Settings::parse(text, "test.toml", Path::new(".")).expect("valid settings")
    }

    fn hash(bytes: &[u8], settings: &Settings) -> SlotHashId {
        SlotHashId::compute(&ModuleDigest::of(bytes), GuestKind::Cgi, settings)
    }

    #[test]
    fn changing_any_instance_shaping_setting_or_module_byte_changes_the_slot_hash() {
        let module = b"\0asm\x01\0\0\0";
        let base = settings(
            "memory_mb = 64\ntimeout_ms = 1000\nallowed_outbound_hosts = [\"a.example\"]\n[env]\nA = \"1\"\n",
        );
        let tmp = tempfile::tempdir().expect("tempdir");
        let with_preopen = {
            let mut s = base.clone();
            s.preopens.push(Preopen {
                host: tmp.path().to_owned(),
                guest: "/data".into(),
                writable: false,
            });
            s
        };
        let variants: Vec<(&str, Settings)> = vec![
            (
                "memory_mb",
                Settings {
                    memory_mb: 65,
                    ..base.clone()
                },
            ),
            (
                "timeout_ms",
                Settings {
                    timeout_ms: 1001,
                    ..base.clone()
                },
            ),
            ("env value", {
                let mut s = base.clone();
                s.env.insert("A".into(), "2".into());
                s
            }),
            ("env key", {
                let mut s = base.clone();
                s.env.insert("B".into(), "1".into());
                s
            }),
            ("preopen", with_preopen.clone()),
            ("preopen writable", {
                let mut s = with_preopen.clone();
                s.preopens[0].writable = true;
                s
            }),
            ("outbound", {
                let mut s = base.clone();
                s.allowed_outbound_hosts
                    .push(OutboundHost::parse("b.example").expect("host"));
                s
            }),
        ];
        let base_hash = hash(module, &base);
        for (what, variant) in variants {
            assert_ne!(
                hash(module, &variant),
                base_hash,
                "changing {what} must change the hash"
            );
        }
        let mut other_module = module.to_vec();
        other_module[7] = 1;
        assert_ne!(
            hash(&other_module, &base),
            base_hash,
            "one module byte must change the hash"
        );
        assert_ne!(
            SlotHashId::compute(&ModuleDigest::of(module), GuestKind::Http, &base),
            base_hash,
            "the guest kind is part of the hash"
        );
    }

    #[test]
    fn reordering_env_keys_or_changing_pool_settings_keeps_the_slot_hash() {
        let module = b"\0asm\x01\0\0\0";
        let a = settings("[env]\nA = \"1\"\nB = \"2\"\n");
        let b = settings("[env]\nB = \"2\"\nA = \"1\"\n");
        assert_eq!(hash(module, &a), hash(module, &b));
        let pooled = settings(
            "max_jobs = 5\nmin_warm = 2\nmax_concurrency = 3\nidle_timeout_ms = 10\n[env]\nA = \"1\"\nB = \"2\"\n",
        );
        assert_ne!(pooled.pool, a.pool);
        assert_eq!(hash(module, &a), hash(module, &pooled));
        let hosts_a = settings("allowed_outbound_hosts = [\"a.example\", \"b.example\"]");
        let hosts_b = settings("allowed_outbound_hosts = [\"b.example\", \"a.example\"]");
        assert_eq!(hash(module, &hosts_a), hash(module, &hosts_b));
    }

    #[test]
    fn unknown_key_names_the_file_and_the_key() {
        let err = Settings::parse("memory_mb = 64\nmemroy = 1\n", "fn/hello.toml", Path::new("."))
            .expect_err("unknown key");
        let text = err.to_string();
        assert!(text.starts_with("fn/hello.toml:2: "), "{text}");
        assert!(text.contains("memroy"), "{text}");
    }

    #[test]
    fn bad_value_names_the_file_the_key_and_the_problem() {
        let err = Settings::parse("timeout_ms = \"soon\"\n", "x.toml", Path::new(".")).expect_err("bad type");
        assert_eq!(err.key.as_deref(), Some("timeout_ms"));
        assert_eq!(err.line, Some(1));
        assert!(err.message.contains("invalid type"), "{err}");
        let err = Settings::parse("memory_mb = 0\n", "x.toml", Path::new(".")).expect_err("out of range");
        assert_eq!(
            err.to_string(),
            "x.toml: key `memory_mb` must be between 1 and 4096, got 0"
        );
    }

    #[test]
    fn max_jobs_above_one_is_refused_for_cgi_modules() {
        let s = settings("max_jobs = 3");
        let err = s.check_kind(GuestKind::Cgi, "f.toml").expect_err("cgi max_jobs");
        assert_eq!(err.key.as_deref(), Some("max_jobs"));
        assert!(s.check_kind(GuestKind::Http, "f.toml").is_ok());
    }

    #[test]
    fn settings_round_trip_through_toml() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let text = format!(
            "memory_mb = 32\ntimeout_ms = 500\nmax_jobs = 4\nmax_concurrency = 2\n\
             escalation = \"restart_all\"\nescalate_after = 3\nquarantine_backoff_ms = 250\n\
             allowed_outbound_hosts = [\"https://api.example:443\", \"*.svc\"]\n\
             [[preopen]]\nhost = {:?}\nguest = \"/data\"\n[env]\nK = \"v w\"\n",
            tmp.path().display().to_string()
        );
        let parsed = settings(&text);
        let again = Settings::parse(&parsed.to_toml(), "again", Path::new(".")).expect("round trip");
        assert_eq!(parsed, again);
    }

    #[test]
    fn env_keys_and_values_with_quotes_and_backslashes_round_trip() {
        // Found by the `settings` fuzz target: a key holding both kinds of
        // quote and a backslash was written as a multi-line literal string.
        let parsed = settings(
            r#"[env]
"B '#\\#\"" = "d\te'''"
"#,
        );
        assert_eq!(parsed.env.get("B '#\\#\""), Some(&"d\te'''".to_owned()));
        let again = Settings::parse(&parsed.to_toml(), "again", Path::new(".")).expect("round trip");
        assert_eq!(parsed, again);
    }

    #[test]
    fn outbound_hosts_match_host_port_scheme_and_wildcards() {
        let exact = OutboundHost::parse("api.example:443").expect("host");
        assert!(exact.allows("https", "API.example", 443));
        assert!(!exact.allows("https", "api.example", 80));
        let any_port = OutboundHost::parse("http://127.0.0.1").expect("host");
        assert!(any_port.allows("http", "127.0.0.1", 8080));
        assert!(!any_port.allows("https", "127.0.0.1", 8080));
        let wild = OutboundHost::parse("*.example.com").expect("host");
        assert!(wild.allows("https", "a.example.com", 443));
        assert!(!wild.allows("https", "example.com", 443));
        assert!(!wild.allows("https", "evil-example.com", 443));
        assert!(OutboundHost::parse("http://x/path").is_err());
        assert!(OutboundHost::parse("ftp://x").is_err());
    }

    #[test]
    fn function_names_must_be_safe_file_and_url_segments() {
        for good in ["hello", "a.b-c_d", "X1"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", ".hidden", "a/b", "..", "a b", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
