//! The process-wide Wasm engine: its configuration, the pooling allocator's
//! limits, the linkers for both guest kinds, and the one epoch ticker.

use std::sync::Arc;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use wasmtime::{Config, Enabled, InstanceAllocationStrategy, OptLevel, PoolingAllocationConfig};

use crate::guest::{cgi, http};

/// Mebibyte, the unit of every memory setting.
pub const MIB: u64 = 1024 * 1024;

/// Instances (component or core) that can be live at once. 1000 matches
/// `wasmtime serve`'s pool; on a 24 GiB, 2-core machine the memory budget,
/// not this count, is what binds first.
pub const DEFAULT_TOTAL_INSTANCES: u32 = 1000;
/// Core instances a single component may create (a componentize-py guest
/// uses about a dozen, the preview1 adapter adds a few).
pub const DEFAULT_MAX_CORE_INSTANCES_PER_COMPONENT: u32 = 50;
/// Core instances (and tables) pooled per instance slot.
const CORE_INSTANCES_PER_INSTANCE: u32 = 8;
/// Linear memories and tables per component (adapter-built components have
/// two or three of each).
pub const DEFAULT_MAX_MEMORIES_PER_COMPONENT: u32 = 10;
/// Largest linear memory any one instance may reach: 4 GiB, the whole 32-bit
/// space. Only address space is reserved up front; `memory_mb` in a
/// function's settings is the real cap.
pub const DEFAULT_MAX_MEMORY_MB: u64 = 4096;
/// Table elements per table (componentize-py needs tens of thousands).
pub const DEFAULT_TABLE_ELEMENTS: usize = 100_000;
/// Size of a core instance's VM context. Large guests (CPython) need more
/// than wasmtime's 1 MiB default.
pub const DEFAULT_MAX_CORE_INSTANCE_SIZE: usize = 4 << 20;
/// Bytes of a linear memory kept resident (not returned to the kernel) when
/// an instance is dropped, so the next instance in that slot faults no pages
/// back in. 1 MiB covers the working set of small guests; larger guests pay
/// for their own pages.
pub const DEFAULT_MEMORY_KEEP_RESIDENT: usize = 1 << 20;
/// Bytes of a table kept resident between instances, for the same reason.
pub const DEFAULT_TABLE_KEEP_RESIDENT: usize = 64 << 10;
/// Wasm stack a guest may use before it traps with stack overflow.
pub const DEFAULT_MAX_WASM_STACK: usize = 1 << 20;
/// Native stack of the fiber each async call runs on; must exceed the Wasm
/// stack plus room for host calls.
pub const DEFAULT_ASYNC_STACK_SIZE: usize = 2 << 20;
/// Period of the epoch ticker. Deadlines are checked once per tick, so a
/// guest overruns its timeout by at most about this much.
pub const DEFAULT_EPOCH_TICK: Duration = Duration::from_millis(1);
/// Ticks a guest runs before it yields to the async executor, so one busy
/// guest cannot starve other calls on the same worker thread.
pub const DEFAULT_YIELD_TICKS: u64 = 10;

/// How the engine is built. Every field has a named default above; tests
/// and commands build one with `EngineConfig::default()` and adjust.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Instances (component or core) that can be live at once.
    pub total_instances: u32,
    /// Largest linear memory an instance may reach, in MiB.
    pub max_memory_mb: u64,
    /// Wasm stack bytes before a stack-overflow trap.
    pub max_wasm_stack: usize,
    /// Epoch ticker period.
    pub epoch_tick: Duration,
    /// Capture a Wasm core dump when a guest traps.
    pub coredump_on_trap: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            total_instances: DEFAULT_TOTAL_INSTANCES,
            max_memory_mb: DEFAULT_MAX_MEMORY_MB,
            max_wasm_stack: DEFAULT_MAX_WASM_STACK,
            epoch_tick: DEFAULT_EPOCH_TICK,
            coredump_on_trap: false,
        }
    }
}

/// Why the engine could not be built.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("invalid engine configuration: {0}")]
    Config(String),
    #[error("failed to create the wasm engine: {0}")]
    Create(#[source] wasmtime::Error),
    #[error("failed to link the host interfaces: {0}")]
    Link(#[source] wasmtime::Error),
    #[error("failed to start the epoch ticker thread: {0}")]
    Ticker(#[source] std::io::Error),
}

/// One per process: the wasmtime engine, the linkers for both guest kinds,
/// and the epoch ticker that drives every call's deadline.
pub struct Engine {
    inner: wasmtime::Engine,
    config: EngineConfig,
    http_linker: wasmtime::component::Linker<http::HttpState>,
    cgi_linker: wasmtime::Linker<cgi::CgiState>,
    _ticker: EpochTicker,
}

impl Engine {
    pub fn new(config: EngineConfig) -> Result<Arc<Self>, EngineError> {
        if config.total_instances == 0 {
            return Err(EngineError::Config("total instances must be at least 1".into()));
        }
        if config.max_memory_mb == 0 || config.max_memory_mb > 4096 {
            return Err(EngineError::Config(format!(
                "max memory per instance must be 1..=4096 MiB, got {}",
                config.max_memory_mb
            )));
        }
        if config.epoch_tick.is_zero() {
            return Err(EngineError::Config("epoch tick must be positive".into()));
        }
        let inner = wasmtime::Engine::new(&wasmtime_config(&config)).map_err(EngineError::Create)?;
        let http_linker = http::linker(&inner).map_err(EngineError::Link)?;
        let cgi_linker = cgi::linker(&inner).map_err(EngineError::Link)?;
        let ticker = EpochTicker::start(inner.clone(), config.epoch_tick).map_err(EngineError::Ticker)?;
        Ok(Arc::new(Self {
            inner,
            config,
            http_linker,
            cgi_linker,
            _ticker: ticker,
        }))
    }

    pub fn wasmtime(&self) -> &wasmtime::Engine {
        &self.inner
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub(crate) fn http_linker(&self) -> &wasmtime::component::Linker<http::HttpState> {
        &self.http_linker
    }

    pub(crate) fn cgi_linker(&self) -> &wasmtime::Linker<cgi::CgiState> {
        &self.cgi_linker
    }

    /// Epoch ticks covering `duration`, rounded up, at least one.
    pub fn ticks_for(&self, duration: Duration) -> u64 {
        let tick = self.config.epoch_tick.as_nanos().max(1);
        (duration.as_nanos().div_ceil(tick)).clamp(1, u64::MAX as u128) as u64
    }
}

fn wasmtime_config(config: &EngineConfig) -> Config {
    let max_memory_bytes = (config.max_memory_mb * MIB) as usize;
    let mut pooling = PoolingAllocationConfig::new();
    // NB: a component is several core instances (its modules plus the
    // shim and fixup modules wit-component adds) with a table or more each,
    // so those pools are sized per component; they cost little until used.
    // Memories reserve address space, so they get 2 per instance (enough
    // for adapter-built components; a rarer guest that needs more finds
    // the pool full and is NACKed).
    pooling
        .total_component_instances(config.total_instances)
        .total_core_instances(config.total_instances.saturating_mul(CORE_INSTANCES_PER_INSTANCE))
        .total_memories(config.total_instances.saturating_mul(2))
        .total_tables(config.total_instances.saturating_mul(CORE_INSTANCES_PER_INSTANCE))
        .total_stacks(config.total_instances)
        .max_core_instances_per_component(DEFAULT_MAX_CORE_INSTANCES_PER_COMPONENT)
        .max_memories_per_component(DEFAULT_MAX_MEMORIES_PER_COMPONENT)
        .max_tables_per_component(DEFAULT_MAX_MEMORIES_PER_COMPONENT)
        .max_memory_size(max_memory_bytes)
        .table_elements(DEFAULT_TABLE_ELEMENTS)
        .max_core_instance_size(DEFAULT_MAX_CORE_INSTANCE_SIZE)
        .max_component_instance_size(DEFAULT_MAX_CORE_INSTANCE_SIZE)
        .linear_memory_keep_resident(DEFAULT_MEMORY_KEEP_RESIDENT)
        .table_keep_resident(DEFAULT_TABLE_KEEP_RESIDENT)
        .pagemap_scan(Enabled::Auto);

    let mut wasm = Config::new();
    wasm.allocation_strategy(InstanceAllocationStrategy::Pooling(pooling))
        .memory_init_cow(true)
        .epoch_interruption(true)
        .max_wasm_stack(config.max_wasm_stack)
        .async_stack_size(DEFAULT_ASYNC_STACK_SIZE)
        .cranelift_opt_level(OptLevel::Speed)
        .wasm_component_model(true)
        .coredump_on_trap(config.coredump_on_trap)
        // NB: on by default, and it costs every p2 store drop a formatted
        // error (with a backtrace when RUST_BACKTRACE is set). Only p3
        // guests need it and this host runs p2, so leave it off. Artifacts
        // compiled with either setting are rejected by an engine with the
        // other, which the module store's engine key accounts for.
        .concurrency_support(false);
    wasm
}

/// Drives `Engine::increment_epoch` from one thread for the whole process.
/// Dropping it stops the thread.
struct EpochTicker {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl EpochTicker {
    fn start(engine: wasmtime::Engine, tick: Duration) -> std::io::Result<Self> {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = thread::Builder::new()
            .name("fnrunner-epoch".into())
            .spawn(move || {
                // NB: `recv_timeout` doubles as the sleep; a dropped sender
                // ends the loop at once instead of after a last tick.
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(tick) {
                    engine.increment_epoch();
                }
            })?;
        Ok(Self {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
