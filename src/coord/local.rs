//! Coordination within one process: the embedded default. Leases are epochs counted
//! in memory (after a restart nothing from before it runs), locks are tokio's, the job
//! slot is `Jobs`, and notices go to the subscribers of this process only.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::epochs::Epochs;
use super::{
    Change, Coordination, Exclusive, FirstStart, JobRefused, JobWork, KeyChange, Lease, Result,
    Shared,
};
use crate::jobs::{JobStatus, Jobs};
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
    /// Tells this process's subscribers of `change`.
    pub(super) fn tell(&self, change: Change) {
        // No subscriber is no one to tell.
        let _ = self.notices.send(change);
    }

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

    async fn shared(&self, cache: &CacheName) -> Result<Shared> {
        Ok(Shared::new(
            self.locks(cache).changes.clone().read_owned().await,
        ))
    }

    async fn exclusive(&self, cache: &CacheName) -> Result<Exclusive> {
        let held = self.locks(cache).changes.clone().write_owned().await;
        Ok(Exclusive::new(cache.clone(), held))
    }

    async fn key_change(&self, cache: &CacheName) -> Result<KeyChange> {
        Ok(KeyChange::new(
            self.locks(cache).keys.clone().lock_owned().await,
        ))
    }

    async fn first_start(&self) -> Result<FirstStart> {
        // One process: no other starts beside it.
        Ok(FirstStart::new(()))
    }

    async fn start_job(
        &self,
        kind: &'static str,
        work: JobWork,
    ) -> std::result::Result<u64, JobRefused> {
        self.jobs.start(kind, work).map_err(JobRefused::Busy)
    }

    async fn job(&self, id: u64) -> Result<Option<JobStatus>> {
        Ok(self.jobs.status(id))
    }

    async fn announce(&self, change: Change) {
        self.tell(change);
    }

    fn changes(&self) -> tokio::sync::broadcast::Receiver<Change> {
        self.notices.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn open() -> ((), [Arc<dyn Coordination>; 2]) {
        // Two handles of one process's coordination are the same one.
        let one: Arc<dyn Coordination> = Arc::new(LocalCoordination::default());
        ((), [one.clone(), one])
    }

    crate::coord::contract::tests!(open);
}
