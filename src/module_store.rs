//! The module store: module digest → compiled artifact, kept on disk so a
//! module is compiled once per engine configuration, across restarts and
//! across functions that share the same bytes.
//!
//! Artifacts are never trusted blindly. Each `NAME.cwasm` (exactly what
//! wasmtime serialized, so it can be mapped with `deserialize_file` instead
//! of copied) has a `NAME.cwasm.sum` beside it recording the guest kind, the
//! length and an XXH3-128 checksum. An artifact that is missing its sum,
//! truncated, corrupt, of the other kind, or rejected by the engine (another
//! wasmtime build or configuration) is discarded and the module recompiled.
//! Files are written to temporary names and renamed into place (artifact
//! first, sum last), so a crash never leaves a torn artifact that verifies.

use std::collections::HashMap;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cap_std::ambient_authority;
use cap_std::fs::Dir;
use sha2::{Digest as _, Sha256};
use wasmtime::Module;
use wasmtime::component::Component;

use crate::engine::Engine;
use crate::guest::GuestKind;

/// SHA-256 of a module's bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModuleDigest([u8; 32]);

impl ModuleDigest {
    pub fn of(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for ModuleDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ModuleDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ModuleDigest({})", self.to_hex())
    }
}

/// A compiled guest, ready for `instantiate_pre`. Cloning is cheap.
#[derive(Clone)]
pub enum Compiled {
    Component(Component),
    Module(Module),
}

impl Compiled {
    pub fn kind(&self) -> GuestKind {
        match self {
            Compiled::Component(_) => GuestKind::Http,
            Compiled::Module(_) => GuestKind::Cgi,
        }
    }
}

/// Where a load found its compiled module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LoadSource {
    /// Already loaded in this process.
    Memory,
    /// Deserialized from an artifact on disk.
    Store,
    /// Compiled from the module bytes (and written to the store).
    Compiler,
}

impl LoadSource {
    pub fn as_str(self) -> &'static str {
        match self {
            LoadSource::Memory => "memory",
            LoadSource::Store => "store",
            LoadSource::Compiler => "compiler",
        }
    }
}

/// The result of one load: the compiled module, where it came from and how
/// long that took.
#[derive(Clone)]
pub struct Loaded {
    pub compiled: Compiled,
    pub source: LoadSource,
    pub duration: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open module store directory {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("module {digest} is not valid WebAssembly: {message}")]
    Compile { digest: String, message: String },
}

/// Counters of what the store did, for metrics and tests.
#[derive(Debug, Default)]
pub struct StoreCounters {
    pub compiles: AtomicU64,
    pub store_hits: AtomicU64,
    pub memory_hits: AtomicU64,
    pub discarded: AtomicU64,
}

type CompileObserver = Box<dyn Fn(Duration) + Send + Sync>;

/// Age past which a temporary file is a crash's leftover.
const STALE_TEMP_AGE: Duration = Duration::from_secs(3600);

/// First word of every `.sum` file; bump it when the format changes.
const SUM_MAGIC: &str = "fnrunner-artifact/2";

pub struct ModuleStore {
    engine: Arc<Engine>,
    dir: Dir,
    path: PathBuf,
    /// Hex of a stable hash of the engine's compatibility hash: artifacts
    /// from another wasmtime build or configuration get another file name.
    engine_key: String,
    loaded: Mutex<HashMap<ModuleDigest, Compiled>>,
    /// One lock per digest being loaded, so two slots of the same module
    /// never compile it twice at once.
    loading: Mutex<HashMap<ModuleDigest, Arc<Mutex<()>>>>,
    temp_counter: AtomicU64,
    counters: StoreCounters,
    compile_observer: Mutex<Option<CompileObserver>>,
}

impl ModuleStore {
    /// Opens (creating if needed) the store directory at `path`.
    pub fn open(engine: Arc<Engine>, path: &Path) -> Result<Self, StoreError> {
        let open_err = |source| StoreError::Open {
            path: path.to_owned(),
            source,
        };
        std::fs::create_dir_all(path).map_err(open_err)?;
        let dir = Dir::open_ambient_dir(path, ambient_authority()).map_err(open_err)?;
        let mut hasher = siphasher::sip::SipHasher13::new();
        engine
            .wasmtime()
            .precompile_compatibility_hash()
            .hash(&mut hasher);
        let engine_key = format!("{:016x}", hasher.finish());
        let store = Self {
            engine,
            dir,
            path: path.to_owned(),
            engine_key,
            loaded: Mutex::default(),
            loading: Mutex::default(),
            temp_counter: AtomicU64::new(0),
            counters: StoreCounters::default(),
            compile_observer: Mutex::new(None),
        };
        store.remove_stale_temp_files();
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn counters(&self) -> &StoreCounters {
        &self.counters
    }

    /// Called with the duration of every compile (for the metrics module).
    pub fn on_compile(&self, observer: impl Fn(Duration) + Send + Sync + 'static) {
        *crate::lock(&self.compile_observer) = Some(Box::new(observer));
    }

    /// The file name of `digest`'s artifact for this engine.
    pub fn artifact_name(&self, digest: &ModuleDigest, kind: GuestKind) -> String {
        format!("{digest}-{}-{}.cwasm", kind.as_str(), self.engine_key)
    }

    /// Returns the compiled form of `bytes` (whose digest is `digest`), from
    /// memory, from disk, or by compiling it. Blocking: compiles can take
    /// seconds, so async callers run this on a blocking thread.
    pub fn load(&self, digest: ModuleDigest, kind: GuestKind, bytes: &[u8]) -> Result<Loaded, StoreError> {
        let started = Instant::now();
        let digest_lock = crate::lock(&self.loading).entry(digest).or_default().clone();
        let _loading = crate::lock(&digest_lock);

        if let Some(compiled) = crate::lock(&self.loaded).get(&digest).cloned()
            && compiled.kind() == kind
        {
            self.counters.memory_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(Loaded {
                compiled,
                source: LoadSource::Memory,
                duration: started.elapsed(),
            });
        }

        let name = self.artifact_name(&digest, kind);
        let (compiled, source) = match self.read_artifact(&name, kind) {
            Some(compiled) => {
                self.counters.store_hits.fetch_add(1, Ordering::Relaxed);
                (compiled, LoadSource::Store)
            }
            None => {
                let compile_started = Instant::now();
                let (compiled, artifact) = self.compile(digest, kind, bytes)?;
                let compile_time = compile_started.elapsed();
                self.counters.compiles.fetch_add(1, Ordering::Relaxed);
                if let Some(observe) = crate::lock(&self.compile_observer).as_ref() {
                    observe(compile_time);
                }
                if let Err(error) = self.write_artifact(&name, kind, &artifact) {
                    tracing::warn!(%digest, %error, "could not store compiled module; it stays in memory only");
                }
                (compiled, LoadSource::Compiler)
            }
        };
        crate::lock(&self.loaded).insert(digest, compiled.clone());
        drop(_loading);
        crate::lock(&self.loading).remove(&digest);
        Ok(Loaded {
            compiled,
            source,
            duration: started.elapsed(),
        })
    }

    /// Forgets the in-memory copy of `digest` (the file stays), so a module
    /// no function uses any more can be freed.
    pub fn forget(&self, digest: &ModuleDigest) {
        crate::lock(&self.loaded).remove(digest);
    }

    fn compile(
        &self,
        digest: ModuleDigest,
        kind: GuestKind,
        bytes: &[u8],
    ) -> Result<(Compiled, Vec<u8>), StoreError> {
        let engine = self.engine.wasmtime();
        let compile_err = |error: wasmtime::Error| StoreError::Compile {
            digest: digest.to_hex(),
            message: crate::guest::error_chain(&error),
        };
        Ok(match kind {
            GuestKind::Http => {
                let component = Component::new(engine, bytes).map_err(compile_err)?;
                let artifact = component.serialize().map_err(compile_err)?;
                (Compiled::Component(component), artifact)
            }
            GuestKind::Cgi => {
                let module = Module::new(engine, bytes).map_err(compile_err)?;
                let artifact = module.serialize().map_err(compile_err)?;
                (Compiled::Module(module), artifact)
            }
        })
    }

    /// Reads and verifies an artifact; any doubt about it removes the files
    /// and returns `None` so the caller recompiles.
    fn read_artifact(&self, name: &str, kind: GuestKind) -> Option<Compiled> {
        let sum_name = format!("{name}.sum");
        let sum = match self.dir.read_to_string(&sum_name) {
            Ok(sum) => sum,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                // An artifact without its sum never verified: drop it.
                if self.dir.remove_file(name).is_ok() {
                    self.counters.discarded.fetch_add(1, Ordering::Relaxed);
                }
                return None;
            }
            Err(error) => {
                tracing::warn!(artifact = name, %error, "cannot read stored module; recompiling");
                return None;
            }
        };
        match self.verify_and_deserialize(name, &sum, kind) {
            Ok(compiled) => Some(compiled),
            Err(reason) => {
                tracing::warn!(artifact = name, reason, "discarding stored module; recompiling");
                self.counters.discarded.fetch_add(1, Ordering::Relaxed);
                let _ = self.dir.remove_file(&sum_name);
                let _ = self.dir.remove_file(name);
                None
            }
        }
    }

    fn verify_and_deserialize(&self, name: &str, sum: &str, kind: GuestKind) -> Result<Compiled, String> {
        let expected = Sum::parse(sum).ok_or("unreadable checksum file")?;
        if expected.kind != kind.as_str() {
            return Err("artifact is of the other guest kind".into());
        }
        let bytes = self
            .dir
            .read(name)
            .map_err(|error| format!("cannot read: {error}"))?;
        if bytes.len() as u64 != expected.len {
            return Err(format!("truncated: {} of {} bytes", bytes.len(), expected.len));
        }
        if xxhash_rust::xxh3::xxh3_128(&bytes) != expected.xxh3 {
            return Err("checksum mismatch".into());
        }
        drop(bytes);
        let path = self.path.join(name);
        let engine = self.engine.wasmtime();
        // SAFETY: `deserialize_file` trusts the file to be an artifact this
        // wasmtime produced. It was written by `write_artifact` in a
        // directory only this store writes, its length and checksum match
        // what was recorded with it, files are only ever replaced by atomic
        // renames, and wasmtime itself still checks version and engine
        // configuration.
        let compiled = unsafe {
            match kind {
                GuestKind::Http => Component::deserialize_file(engine, &path).map(Compiled::Component),
                GuestKind::Cgi => Module::deserialize_file(engine, &path).map(Compiled::Module),
            }
        };
        compiled.map_err(|error| format!("rejected by the engine: {}", crate::guest::error_chain(&error)))
    }

    fn write_artifact(&self, name: &str, kind: GuestKind, payload: &[u8]) -> std::io::Result<()> {
        let unique = format!(
            "{}-{}",
            std::process::id(),
            self.temp_counter.fetch_add(1, Ordering::Relaxed)
        );
        let temp_artifact = format!(".tmp-{unique}-{name}");
        let temp_sum = format!(".tmp-{unique}-{name}.sum");
        let sum = Sum {
            kind: kind.as_str().to_owned(),
            len: payload.len() as u64,
            xxh3: xxhash_rust::xxh3::xxh3_128(payload),
        };
        let result = (|| {
            for (file_name, bytes) in [(&temp_artifact, payload), (&temp_sum, sum.render().as_bytes())] {
                let mut file = self.dir.create(file_name)?;
                file.write_all(bytes)?;
                file.sync_all()?;
            }
            self.dir.rename(&temp_artifact, &self.dir, name)?;
            self.dir.rename(&temp_sum, &self.dir, format!("{name}.sum"))
        })();
        if result.is_err() {
            let _ = self.dir.remove_file(&temp_artifact);
            let _ = self.dir.remove_file(&temp_sum);
        }
        result
    }

    /// Temporary files left by a process that died mid-write. Only old
    /// ones: another process sharing the store may be writing right now.
    fn remove_stale_temp_files(&self) {
        let Ok(entries) = self.dir.entries() else { return };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let stale = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|modified| {
                    std::time::SystemTime::now()
                        .duration_since(modified.into_std())
                        .ok()
                })
                .is_some_and(|age| age > STALE_TEMP_AGE);
            if stale && name.to_string_lossy().starts_with(".tmp-") {
                let _ = self.dir.remove_file(&name);
            }
        }
    }
}

/// The contents of a `.sum` file.
struct Sum {
    kind: String,
    len: u64,
    xxh3: u128,
}

impl Sum {
    fn render(&self) -> String {
        format!(
            "{SUM_MAGIC} kind={} len={} xxh3={:032x}\n",
            self.kind, self.len, self.xxh3
        )
    }

    fn parse(text: &str) -> Option<Self> {
        let mut words = text.split_whitespace();
        if words.next()? != SUM_MAGIC {
            return None;
        }
        let (mut kind, mut len, mut xxh3) = (None, None, None);
        for word in words {
            match word.split_once('=')? {
                ("kind", v) => kind = Some(v.to_owned()),
                ("len", v) => len = v.parse().ok(),
                ("xxh3", v) => xxh3 = u128::from_str_radix(v, 16).ok(),
                _ => return None,
            }
        }
        Some(Self {
            kind: kind?,
            len: len?,
            xxh3: xxh3?,
        })
    }
}
