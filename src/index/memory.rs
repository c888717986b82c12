//! An `Index` in memory, for tests of the layers above the index that need no server
//! and no disk. It keeps the same rules as the durable index (first narinfo wins,
//! claims and stats move with the commit), checked by the same contract suite.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use super::{
    BlobKind, CacheRecord, CacheStats, Commit, Index, NarInfoRecord, NarRecord, Result, Upload,
};
use crate::nix::{CacheName, NarUrl, Sha256, StorePathHash};
use crate::store::{ChunkId, ChunkRef, Manifest, ManifestId, Stored};

#[derive(Default)]
struct State {
    caches: BTreeMap<CacheName, CacheRecord>,
    stats: BTreeMap<CacheName, CacheStats>,
    chunks: BTreeMap<ChunkId, ChunkRef>,
    segments: BTreeMap<(ManifestId, u32), Manifest>,
    nars: BTreeMap<Sha256, NarRecord>,
    uploads: BTreeMap<(CacheName, NarUrl), Upload>,
    narinfos: BTreeMap<(CacheName, StorePathHash), NarInfoRecord>,
    claims: BTreeSet<(CacheName, Sha256)>,
    blobs: BTreeMap<(u8, CacheName, String), Stored>,
}

/// Metadata held in memory only; everything is lost when it is dropped.
#[derive(Default)]
pub struct MemoryIndex {
    state: Mutex<State>,
}

impl MemoryIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> Result<T> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        Ok(f(&mut state))
    }
}

fn kind_tag(kind: BlobKind) -> u8 {
    match kind {
        BlobKind::Log => 0,
        BlobKind::Realisation => 1,
    }
}

impl Index for MemoryIndex {
    fn caches(&self) -> Result<Vec<CacheRecord>> {
        self.with(|s| s.caches.values().cloned().collect())
    }

    fn put_cache(&self, record: &CacheRecord) -> Result<()> {
        self.with(|s| {
            s.caches.insert(record.name.clone(), record.clone());
        })
    }

    fn cache_stats(&self, cache: &CacheName) -> Result<CacheStats> {
        self.with(|s| s.stats.get(cache).copied().unwrap_or_default())
    }

    fn chunk(&self, id: &ChunkId) -> Result<Option<ChunkRef>> {
        self.with(|s| s.chunks.get(id).copied())
    }

    fn put_chunks(&self, chunks: &[ChunkRef]) -> Result<()> {
        self.with(|s| s.chunks.extend(chunks.iter().map(|c| (c.id, *c))))
    }

    fn segment(&self, id: &ManifestId, index: u32) -> Result<Option<Manifest>> {
        self.with(|s| s.segments.get(&(*id, index)).cloned())
    }

    fn put_segment(&self, id: &ManifestId, index: u32, chunks: &Manifest) -> Result<()> {
        self.with(|s| {
            s.segments.insert((*id, index), chunks.clone());
        })
    }

    fn nar(&self, nar_hash: &Sha256) -> Result<Option<NarRecord>> {
        self.with(|s| s.nars.get(nar_hash).cloned())
    }

    fn put_nar(&self, nar_hash: &Sha256, nar: &NarRecord) -> Result<()> {
        self.with(|s| {
            s.nars.insert(*nar_hash, nar.clone());
        })
    }

    fn upload(&self, cache: &CacheName, url: &NarUrl) -> Result<Option<Upload>> {
        self.with(|s| s.uploads.get(&(cache.clone(), *url)).copied())
    }

    fn put_upload(&self, cache: &CacheName, url: &NarUrl, upload: &Upload) -> Result<()> {
        self.with(|s| {
            s.uploads.insert((cache.clone(), *url), *upload);
        })
    }

    fn narinfo(&self, cache: &CacheName, path: &StorePathHash) -> Result<Option<NarInfoRecord>> {
        self.with(|s| s.narinfos.get(&(cache.clone(), *path)).cloned())
    }

    fn commit_narinfo(
        &self,
        cache: &CacheName,
        path: &StorePathHash,
        record: &NarInfoRecord,
    ) -> Result<Commit> {
        self.with(|s| {
            let key = (cache.clone(), *path);
            if let Some(existing) = s.narinfos.get(&key) {
                return Commit::Exists {
                    nar_hash: existing.nar_hash,
                };
            }
            s.narinfos.insert(key, record.clone());
            s.claims.insert((cache.clone(), record.nar_hash));
            let stats = s.stats.entry(cache.clone()).or_default();
            stats.paths += 1;
            stats.nar_bytes += record.nar_size;
            stats.stored_bytes += record.file_size;
            Commit::Written
        })
    }

    fn cache_has_nar(&self, cache: &CacheName, nar_hash: &Sha256) -> Result<bool> {
        self.with(|s| s.claims.contains(&(cache.clone(), *nar_hash)))
    }

    fn blob(&self, kind: BlobKind, cache: &CacheName, key: &str) -> Result<Option<Stored>> {
        self.with(|s| {
            s.blobs
                .get(&(kind_tag(kind), cache.clone(), key.to_owned()))
                .cloned()
        })
    }

    fn put_blob(
        &self,
        kind: BlobKind,
        cache: &CacheName,
        key: &str,
        stored: &Stored,
    ) -> Result<()> {
        self.with(|s| {
            s.blobs.insert(
                (kind_tag(kind), cache.clone(), key.to_owned()),
                stored.clone(),
            );
        })
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn check(&self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open() -> ((), Box<dyn Index>) {
        ((), Box::new(MemoryIndex::new()))
    }

    crate::index::contract::tests!(open);
}
