//! Node capacity: what every live instance holds while it exists — one of
//! the pooling allocator's instance slots and its `memory_mb` of the node's
//! memory budget. Admission (TryExec) waits a bounded time for both and
//! NACKs the call when they do not come.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};

/// The node's memory budget unless configured: 16 GiB of a 24 GiB machine,
/// leaving the rest to the host, compiled code and the kernel.
pub const DEFAULT_MEMORY_BUDGET_MB: u64 = 16 * 1024;

/// Why capacity was not granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shortage {
    /// Every pooling-allocator instance slot is taken.
    Instances,
    /// The memory budget is spent.
    Memory,
    /// The request asks for more memory than the whole budget.
    TooLarge,
}

impl Shortage {
    pub fn describe(self) -> &'static str {
        match self {
            Shortage::Instances => "all instance slots are in use",
            Shortage::Memory => "the node memory budget is spent",
            Shortage::TooLarge => "the function's memory_mb exceeds the node memory budget",
        }
    }
}

/// The node's instance slots and memory budget.
#[derive(Clone)]
pub struct NodeCapacity {
    instances: Arc<Semaphore>,
    memory_mb: Arc<Semaphore>,
    total_instances: u32,
    total_memory_mb: u32,
}

/// Capacity held by one live instance; released when dropped.
#[derive(Debug)]
pub struct InstancePermit {
    _instance: OwnedSemaphorePermit,
    _memory: OwnedSemaphorePermit,
    memory_mb: u32,
}

impl InstancePermit {
    pub fn memory_mb(&self) -> u32 {
        self.memory_mb
    }
}

impl NodeCapacity {
    pub fn new(total_instances: u32, memory_budget_mb: u64) -> Self {
        let total_memory_mb = memory_budget_mb.min(Semaphore::MAX_PERMITS as u64) as u32;
        Self {
            instances: Arc::new(Semaphore::new(total_instances as usize)),
            memory_mb: Arc::new(Semaphore::new(total_memory_mb as usize)),
            total_instances,
            total_memory_mb,
        }
    }

    /// Capacity that never runs out in practice (for `invoke` and `bench`).
    pub fn unbounded() -> Self {
        Self::new(u32::MAX >> 3, u64::from(u32::MAX >> 3))
    }

    pub fn total_instances(&self) -> u32 {
        self.total_instances
    }

    pub fn total_memory_mb(&self) -> u32 {
        self.total_memory_mb
    }

    pub fn available_instances(&self) -> usize {
        self.instances.available_permits()
    }

    pub fn available_memory_mb(&self) -> usize {
        self.memory_mb.available_permits()
    }

    /// Takes capacity for an instance of `memory_mb` if it is free now.
    pub fn try_acquire(&self, memory_mb: u64) -> Result<InstancePermit, Shortage> {
        let memory_mb = self.check_size(memory_mb)?;
        let instance = self.instances.clone().try_acquire_owned().map_err(|e| match e {
            TryAcquireError::Closed | TryAcquireError::NoPermits => Shortage::Instances,
        })?;
        let memory = self
            .memory_mb
            .clone()
            .try_acquire_many_owned(memory_mb)
            .map_err(|_| Shortage::Memory)?;
        Ok(InstancePermit {
            _instance: instance,
            _memory: memory,
            memory_mb,
        })
    }

    /// Waits up to `within` for capacity for an instance of `memory_mb`.
    pub async fn acquire(&self, memory_mb: u64, within: Duration) -> Result<InstancePermit, Shortage> {
        let memory_mb = self.check_size(memory_mb)?;
        let wait = async {
            let instance = self
                .instances
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| Shortage::Instances)?;
            let memory = self
                .memory_mb
                .clone()
                .acquire_many_owned(memory_mb)
                .await
                .map_err(|_| Shortage::Memory)?;
            Ok(InstancePermit {
                _instance: instance,
                _memory: memory,
                memory_mb,
            })
        };
        match tokio::time::timeout(within, wait).await {
            Ok(result) => result,
            Err(_) if self.instances.available_permits() == 0 => Err(Shortage::Instances),
            Err(_) => Err(Shortage::Memory),
        }
    }

    fn check_size(&self, memory_mb: u64) -> Result<u32, Shortage> {
        if memory_mb > u64::from(self.total_memory_mb) {
            return Err(Shortage::TooLarge);
        }
        Ok(memory_mb.max(1) as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_budget_bounds_live_instances_and_frees_on_drop() {
        let capacity = NodeCapacity::new(10, 100);
        let a = capacity.try_acquire(60).expect("fits");
        assert_eq!(capacity.try_acquire(60).err(), Some(Shortage::Memory));
        assert_eq!(
            capacity.acquire(60, Duration::from_millis(5)).await.err(),
            Some(Shortage::Memory)
        );
        drop(a);
        assert!(capacity.try_acquire(60).is_ok());
        assert_eq!(capacity.try_acquire(101).err(), Some(Shortage::TooLarge));
    }

    #[tokio::test]
    async fn instance_slots_bound_live_instances() {
        let capacity = NodeCapacity::new(1, 1000);
        let held = capacity.try_acquire(1).expect("one");
        assert_eq!(capacity.try_acquire(1).err(), Some(Shortage::Instances));
        let waiter = {
            let capacity = capacity.clone();
            tokio::spawn(async move { capacity.acquire(1, Duration::from_secs(5)).await.is_ok() })
        };
        drop(held);
        assert!(waiter.await.expect("join"), "a waiter gets the freed slot");
    }
}
