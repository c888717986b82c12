//! When paths were last fetched, for retention by age and by size. A lookup must not
//! become a write: fetches are noted in memory and written to the index in batches,
//! by a task every `FLUSH_EVERY` and before each garbage collection. A server killed in
//! between loses the fetches of the last moments, which only makes those paths look
//! older by as much.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use crate::index::{Index, Result};
use crate::nix::{CacheName, Sha256, StorePathHash};

/// How often noted fetches are written.
pub const FLUSH_EVERY: Duration = Duration::from_secs(15);

/// The fetches noted since the last write, per cache.
#[derive(Default)]
pub struct Accesses {
    noted: Mutex<HashMap<CacheName, Noted>>,
}

#[derive(Default)]
struct Noted {
    paths: HashMap<StorePathHash, u64>,
    /// NARs fetched, written as a fetch of every path of the cache naming them.
    nars: HashMap<Sha256, u64>,
}

impl Accesses {
    fn note(&self, cache: &CacheName, f: impl FnOnce(&mut Noted)) {
        let mut noted = self.noted.lock().expect("never poisoned");
        // Looked up before inserting, so that the usual case allocates nothing.
        match noted.get_mut(cache) {
            Some(n) => f(n),
            None => f(noted.entry(cache.clone()).or_default()),
        }
    }

    /// `path`'s narinfo was fetched from `cache` at `at`.
    pub fn narinfo(&self, cache: &CacheName, path: StorePathHash, at: u64) {
        self.note(cache, |n| {
            n.paths.insert(path, at);
        });
    }

    /// The NAR `nar_hash` was fetched from `cache` at `at`.
    pub fn nar(&self, cache: &CacheName, nar_hash: Sha256, at: u64) {
        self.note(cache, |n| {
            n.nars.insert(nar_hash, at);
        });
    }

    /// Writes what was noted; returns how many paths.
    pub fn flush(&self, index: &dyn Index) -> Result<usize> {
        let noted = std::mem::take(&mut *self.noted.lock().expect("never poisoned"));
        let mut written = 0;
        for (cache, n) in noted {
            let mut paths = n.paths;
            for (nar, at) in n.nars {
                for p in index.paths_of_nar(&cache, &nar)? {
                    let e = paths.entry(p).or_insert(at);
                    *e = (*e).max(at);
                }
            }
            let batch: Vec<_> = paths.into_iter().collect();
            index.put_accesses(&cache, &batch)?;
            written += batch.len();
        }
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{MemoryIndex, NarInfoRecord};

    #[test]
    fn fetches_are_written_per_path_nars_through_their_paths() {
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
            .commit_narinfo(&main, &path("b"), &record, &[])
            .unwrap();
        let a = Accesses::default();
        a.narinfo(&main, path("a"), 10);
        a.narinfo(&main, path("a"), 12);
        a.nar(&main, nar, 11);
        assert_eq!(a.flush(&index).unwrap(), 2);
        let mut got = index.accesses(&main).unwrap();
        got.sort();
        assert_eq!(got, vec![(path("a"), 12), (path("b"), 11)]);
        // Nothing noted since: nothing written.
        assert_eq!(a.flush(&index).unwrap(), 0);
    }
}
