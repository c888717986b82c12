//! What the server's processes must agree on, beside the metadata: a contract with an
//! implementation for one process (`LocalCoordination`, in memory) that a database
//! implementation for replicas keeps too, checked by the same suite (`contract`).
//!
//! - **Leases**: every download and upload holds one while it runs. The garbage
//!   collector, once it has removed records (so that nothing new can find them), calls
//!   `barrier`: it waits until no lease taken before is still held, anywhere, and only
//!   then deletes what those records named. A lease of a process that died expires
//!   with it; a barrier never waits on a dead process, and never passes a live lease.
//! - **Cache locks**: a publication holds `shared` on its cache from before it looks
//!   the cache up until its narinfo is committed; a change of the cache's keys,
//!   settings or existence holds `exclusive`, which waits for the publications under
//!   way. `key_change` is held through a whole key rotation or re-signing and by a
//!   deletion, so that two walks over a cache's narinfos never interleave.
//! - **One job**: one garbage collection or verification at a time, its progress
//!   readable by id.
//! - **Change notices**: whoever changes tokens, caches or keys, or deletes packs,
//!   announces it; every handle's subscribers hear of it (and drop their copies).

#[cfg(test)]
pub(crate) mod contract;
mod epochs;
mod local;
mod postgres;

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;

use crate::index::IndexError;
use crate::jobs::{Busy, JobStatus, Progress};
use crate::nix::CacheName;
use crate::store::PackId;

pub use local::LocalCoordination;
pub use postgres::{PgCoordination, LEASE_TIME};

/// What a coordination call ends in: the database behind it may be unavailable.
pub type Result<T> = std::result::Result<T, IndexError>;

/// Something held, released when dropped: what the guards below keep.
type Held = Box<dyn Send + Sync>;

/// Held by a download or an upload for as long as it runs.
pub struct Lease {
    _held: Held,
}

impl Lease {
    /// A lease that holds `held` until it drops.
    pub fn new(held: impl Send + Sync + 'static) -> Self {
        Self {
            _held: Box::new(held),
        }
    }
}

/// A publication's hold on its cache: no change of the cache until it drops.
pub struct Shared {
    _held: Held,
}

impl Shared {
    /// A shared hold that lasts until `held` drops.
    pub fn new(held: impl Send + Sync + 'static) -> Self {
        Self {
            _held: Box::new(held),
        }
    }
}

/// Proof that no publication to a cache is under way, and none will start until it
/// is dropped. The methods that change a cache take it.
pub struct Exclusive {
    name: CacheName,
    _held: Held,
}

impl Exclusive {
    /// An exclusive hold on `name` that lasts until `held` drops.
    pub fn new(name: CacheName, held: impl Send + Sync + 'static) -> Self {
        Self {
            name,
            _held: Box::new(held),
        }
    }

    /// The cache it holds.
    pub fn name(&self) -> &CacheName {
        &self.name
    }
}

/// Held through a whole change of a cache's keys (its walk included), or its deletion.
pub struct KeyChange {
    _held: Held,
}

impl KeyChange {
    /// A hold that lasts until `held` drops.
    pub fn new(held: impl Send + Sync + 'static) -> Self {
        Self {
            _held: Box::new(held),
        }
    }
}

/// Held by the process that creates what a first start needs (the configured caches,
/// the admin token), so that of several starting at once one creates and the others
/// find it made.
pub struct FirstStart {
    _held: Held,
}

impl FirstStart {
    /// A hold that lasts until `held` drops.
    pub fn new(held: impl Send + Sync + 'static) -> Self {
        Self {
            _held: Box::new(held),
        }
    }
}

/// Why a job was not started.
#[derive(Debug, thiserror::Error)]
pub enum JobRefused {
    /// Another job runs.
    #[error("a {} is running", .0.kind)]
    Busy(Busy),
    /// The coordination could not be reached.
    #[error(transparent)]
    Unavailable(#[from] IndexError),
}

/// What changed, for the processes that keep copies of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A token was created, revoked or used.
    Tokens,
    /// A cache was created, changed or deleted, or its keys were.
    Caches,
    /// The garbage collector deleted these packs.
    PacksDeleted(Vec<PackId>),
}

/// The work of a job, started with its progress to report to.
pub type JobWork = Box<
    dyn FnOnce(Arc<Progress>) -> BoxFuture<'static, std::result::Result<serde_json::Value, String>>
        + Send,
>;

/// The work of a job from a function that runs it to its report.
pub fn job<F, R, E>(run: impl FnOnce(Arc<Progress>) -> F + Send + 'static) -> JobWork
where
    F: std::future::Future<Output = std::result::Result<R, E>> + Send + 'static,
    R: serde::Serialize,
    E: std::fmt::Display,
{
    Box::new(move |progress| {
        Box::pin(async move {
            run(progress)
                .await
                .map(|r| serde_json::to_value(r).expect("a report always serialises"))
                .map_err(|e| e.to_string())
        })
    })
}

/// The coordination contract (see the module's comment).
#[async_trait::async_trait]
pub trait Coordination: Send + Sync + 'static {
    /// A lease for a download or an upload starting now.
    fn lease(&self) -> Lease;
    /// Waits, at most `limit`, until no lease taken before this call is still held by
    /// a live process. False if one still is.
    async fn barrier(&self, limit: Duration) -> bool;
    /// How many leases this process holds.
    fn running(&self) -> usize;
    /// Whether other processes may change what this one keeps copies of (then a
    /// publication reads its cache's record under `shared` rather than trust the copy).
    fn replicated(&self) -> bool {
        false
    }

    /// Holds off changes of `cache` (see the module's comment).
    async fn shared(&self, cache: &CacheName) -> Result<Shared>;
    /// Waits for the publications to `cache` under way, and holds off new ones.
    async fn exclusive(&self, cache: &CacheName) -> Result<Exclusive>;
    /// Held through a whole change of `cache`'s keys, or its deletion.
    async fn key_change(&self, cache: &CacheName) -> Result<KeyChange>;
    /// Held while a process creates what a first start needs.
    async fn first_start(&self) -> Result<FirstStart>;

    /// Starts `work` as the one job of `kind`, unless a job runs anywhere.
    async fn start_job(
        &self,
        kind: &'static str,
        work: JobWork,
    ) -> std::result::Result<u64, JobRefused>;
    /// How job `id` goes, if it is known.
    async fn job(&self, id: u64) -> Result<Option<JobStatus>>;

    /// Tells every handle's subscribers of `change`.
    async fn announce(&self, change: Change);
    /// The changes announced from now on, through any handle.
    fn changes(&self) -> tokio::sync::broadcast::Receiver<Change>;
}
