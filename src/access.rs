//! When paths were last fetched, for retention by age and by size. A lookup must not
//! become a write: fetches are noted in memory and written to the index in batches,
//! by a task every `FLUSH_EVERY`, before each garbage collection, and as soon as the
//! notes reach their budget. A server killed in between loses the fetches of the last
//! moments, which only makes those paths look older by as much.
//!
//! The notes are a fixed budget (`CAPACITY` entries), whatever clients ask for: a
//! client reading many distinct paths fills it, which wakes the writer early; until
//! the writer has taken the full set (it takes it whole, then writes it), new paths
//! are not noted (a path already noted still gets its newer time), and are counted in
//! `cachet_access_notes_dropped_total`. A path fetched again is noted again, so what
//! is lost is at most one fetch of paths first fetched during a flood.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;

use crate::index::{Index, Result};
use crate::nix::{CacheName, Sha256, StorePathHash};

/// How often noted fetches are written.
pub const FLUSH_EVERY: Duration = Duration::from_secs(15);

/// The most fetches noted between writes: about 80 bytes each, so about 1.3 MiB,
/// and two sets at once (one noted, one being written).
pub const CAPACITY: usize = 16 * 1024;

/// Records written to the index at once: the database keeps a copy of every node a
/// batch changes until the batch is done, so a batch of tens of thousands of records
/// took tens of MiB.
const WRITE_BATCH: usize = 256;

/// The fetches noted since the last write, per cache.
#[derive(Default)]
pub struct Accesses {
    noted: Mutex<Noted>,
    /// Woken when the notes are full.
    full: tokio::sync::Notify,
    /// Fetches not noted because the notes were full.
    dropped: Counter,
}

#[derive(Default)]
struct Noted {
    /// Paths and NARs noted, in all caches.
    entries: usize,
    caches: HashMap<CacheName, PerCache>,
}

#[derive(Default)]
struct PerCache {
    paths: HashMap<StorePathHash, u64>,
    /// NARs fetched, written as a fetch of every path of the cache naming them.
    nars: HashMap<Sha256, u64>,
}

impl Accesses {
    /// Notes counting the fetches they drop in `dropped`.
    pub fn new(dropped: Counter) -> Self {
        Self {
            dropped,
            ..Self::default()
        }
    }

    /// Notes `at` under `key` in the map `pick` chooses, within the budget.
    fn note<K: std::hash::Hash + Eq>(
        &self,
        cache: &CacheName,
        key: K,
        at: u64,
        pick: impl Fn(&mut PerCache) -> &mut HashMap<K, u64>,
    ) {
        let mut noted = self.noted.lock().expect("never poisoned");
        let full = noted.entries >= CAPACITY;
        // Looked up before inserting, so that the usual case allocates nothing.
        let per_cache = match noted.caches.get_mut(cache) {
            Some(n) => n,
            None if full => return self.overflow(),
            None => noted.caches.entry(cache.clone()).or_default(),
        };
        let map = pick(per_cache);
        if let Some(t) = map.get_mut(&key) {
            *t = (*t).max(at);
            return;
        }
        if full {
            return self.overflow();
        }
        map.insert(key, at);
        noted.entries += 1;
        if noted.entries == CAPACITY {
            self.full.notify_one();
        }
    }

    fn overflow(&self) {
        self.dropped.inc();
    }

    /// `path`'s narinfo was fetched from `cache` at `at`.
    pub fn narinfo(&self, cache: &CacheName, path: StorePathHash, at: u64) {
        self.note(cache, path, at, |n| &mut n.paths);
    }

    /// The NAR `nar_hash` was fetched from `cache` at `at`.
    pub fn nar(&self, cache: &CacheName, nar_hash: Sha256, at: u64) {
        self.note(cache, nar_hash, at, |n| &mut n.nars);
    }

    /// How many are noted now.
    #[cfg(test)]
    fn noted(&self) -> usize {
        self.noted.lock().expect("never poisoned").entries
    }

    /// Fetches not noted so far because the notes were full.
    pub fn dropped(&self) -> u64 {
        self.dropped.get()
    }

    /// Resolves when the notes have reached their budget.
    pub async fn filled(&self) {
        self.full.notified().await;
    }

    /// Writes what was noted, a batch at a time; returns how many paths.
    pub async fn flush(&self, index: &dyn Index) -> Result<usize> {
        let noted = std::mem::take(&mut *self.noted.lock().expect("never poisoned"));
        let mut written = 0;
        for (cache, n) in noted.caches {
            let mut paths = n.paths;
            for (nar, at) in n.nars {
                for p in index.paths_of_nar(&cache, &nar).await? {
                    let e = paths.entry(p).or_insert(at);
                    *e = (*e).max(at);
                }
            }
            let mut batch = Vec::with_capacity(WRITE_BATCH.min(paths.len()));
            for entry in paths {
                batch.push(entry);
                if batch.len() == WRITE_BATCH {
                    index.put_accesses(&cache, &batch).await?;
                    written += batch.len();
                    batch.clear();
                }
            }
            index.put_accesses(&cache, &batch).await?;
            written += batch.len();
        }
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{MemoryIndex, NarInfoRecord};

    #[tokio::test]
    async fn fetches_are_written_per_path_nars_through_their_paths() {
        let index = MemoryIndex::new();
        let main: CacheName = "main".parse().unwrap();
        let path = |c: &str| -> StorePathHash { c.repeat(32).parse().unwrap() };
        let nar = Sha256::digest(b"n");
        let record = NarInfoRecord {
            nar_hash: nar,
            nar_size: 1,
            file_size: 1,
            text: bytes::Bytes::from_static(b"x"),
        };
        index
            .commit_narinfo(&main, &path("b"), &record, &[], None)
            .await
            .unwrap();
        let a = Accesses::default();
        a.narinfo(&main, path("a"), 10);
        a.narinfo(&main, path("a"), 12);
        a.nar(&main, nar, 11);
        assert_eq!(a.flush(&index).await.unwrap(), 2);
        let mut got = index.accesses(&main).await.unwrap();
        got.sort();
        assert_eq!(got, vec![(path("a"), 12), (path("b"), 11)]);
        // Nothing noted since: nothing written.
        assert_eq!(a.flush(&index).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn the_notes_stay_within_their_budget_and_wake_the_writer_when_full() {
        let index = MemoryIndex::new();
        let main: CacheName = "main".parse().unwrap();
        let path = |i: usize| -> StorePathHash {
            let digest = Sha256::digest(&i.to_le_bytes());
            StorePathHash::from_bytes(digest.as_bytes()[..20].try_into().unwrap())
        };
        let a = std::sync::Arc::new(Accesses::default());
        let woken = {
            let a = a.clone();
            tokio::spawn(async move { a.filled().await })
        };
        for i in 0..CAPACITY + 100 {
            a.narinfo(&main, path(i), 1);
        }
        tokio::time::timeout(Duration::from_secs(5), woken)
            .await
            .expect("the writer is woken")
            .unwrap();
        assert_eq!(a.noted(), CAPACITY);
        assert_eq!(a.dropped(), 100);
        // A path already noted still gets its newer fetch.
        a.narinfo(&main, path(0), 5);
        assert_eq!(a.dropped(), 100);
        assert_eq!(a.flush(&index).await.unwrap(), CAPACITY);
        let got: HashMap<_, _> = index.accesses(&main).await.unwrap().into_iter().collect();
        assert_eq!(got.len(), CAPACITY);
        assert_eq!(got[&path(0)], 5);
        // Room again once written.
        a.narinfo(&main, path(CAPACITY + 1), 2);
        assert_eq!((a.noted(), a.dropped()), (1, 100));
    }
}
