//! fnrunner: a runner node that executes serverless function calls as
//! WebAssembly instances — the execution core (engine, module store,
//! function settings, guests, slots and pools) and the commands built on it.

pub mod bench;
pub mod call;
pub mod capacity;
pub mod client;
pub mod commands;
pub mod coredump;
pub mod deploy;
pub mod engine;
pub mod function;
pub mod guest;
pub mod metrics;
pub mod module_store;
pub mod placer;
pub mod pool;
pub mod runner;
pub mod server;
pub mod slot;

use std::sync::{Mutex, MutexGuard};

/// Locks a mutex, recovering from poisoning: every mutex in this crate
/// guards data that stays consistent even if a holder panicked.
pub(crate) fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
