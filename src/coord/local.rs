//! Coordination within one process: the embedded default. Leases are epochs counted
//! in memory (after a restart nothing from before it runs), locks are tokio's, the job
//! slot is `Jobs`, and notices go to the subscribers of this process only.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::epochs::Epochs;
use super::{Change, Coordination, Exclusive, JobWork, KeyChange, Lease, Shared};
use crate::jobs::{Busy, JobStatus, Jobs};
use crate::nix::CacheName;

/// The locks of one cache name.
#[derive(Default)]
struct CacheLocks {
    changes: Arc<tokio::sync::RwLock<()>>,
    keys: Arc<tokio::sync::Mutex<()>>,
}

/// Coordination of the one process there is.
pub struct LocalCoordination {
    epochs: Arc<Epochs>,
    /// Per cache name, made when first asked for and kept: one entry per name ever
    /// used, a few bytes each.
    locks: Mutex<HashMap<CacheName, Arc<CacheLocks>>>,
    jobs: Jobs,
    notices: tokio::sync::broadcast::Sender<Change>,
}

impl Default for LocalCoordination {
    fn default() -> Self {
        Self {
            epochs: Arc::default(),
            locks: Mutex::default(),
            jobs: Jobs::default(),
            notices: tokio::sync::broadcast::channel(64).0,
        }
    }
}

impl LocalCoordination {
    fn locks(&self, name: &CacheName) -> Arc<CacheLocks> {
        self.locks
            .lock()
            .expect("never poisoned")
            .entry(name.clone())
            .or_default()
            .clone()
    }
}

#[async_trait::async_trait]
impl Coordination for LocalCoordination {
    fn lease(&self) -> Lease {
        Lease::new(self.epochs.enter())
    }

    async fn barrier(&self, limit: Duration) -> bool {
        self.epochs.barrier(limit).await
    }

    fn running(&self) -> usize {
        self.epochs.running()
    }

    async fn shared(&self, cache: &CacheName) -> Shared {
        Shared::new(self.locks(cache).changes.clone().read_owned().await)
    }

    async fn exclusive(&self, cache: &CacheName) -> Exclusive {
        let held = self.locks(cache).changes.clone().write_owned().await;
        Exclusive::new(cache.clone(), held)
    }

    async fn key_change(&self, cache: &CacheName) -> KeyChange {
        KeyChange::new(self.locks(cache).keys.clone().lock_owned().await)
    }

    fn start_job(&self, kind: &'static str, work: JobWork) -> Result<u64, Busy> {
        self.jobs.start(kind, work)
    }

    async fn job(&self, id: u64) -> Option<JobStatus> {
        self.jobs.status(id)
    }

    async fn announce(&self, change: Change) {
        // No subscriber is no one to tell.
        let _ = self.notices.send(change);
    }

    fn changes(&self) -> tokio::sync::broadcast::Receiver<Change> {
        self.notices.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open() -> [Arc<dyn Coordination>; 2] {
        // Two handles of one process's coordination are the same one.
        let one: Arc<dyn Coordination> = Arc::new(LocalCoordination::default());
        [one.clone(), one]
    }

    crate::coord::contract::tests!(open);
}
