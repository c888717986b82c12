//! An `Index` in memory, for tests of the layers above the index that need no server
//! and no disk. It keeps the same rules as the durable index (first narinfo wins,
//! claims and stats move with the commit), checked by the same contract suite.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use super::{
    BlobKind, CacheRecord, CacheStats, Commit, Index, NarInfoRecord, NarRecord, Result,
    TokenRecord, Upload,
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
    /// (cache, NarHash, path): a cache's claim on a NAR, one per path naming it.
    claims: BTreeSet<(CacheName, Sha256, StorePathHash)>,
    /// (cache, referenced, referrer).
    references: BTreeSet<(CacheName, StorePathHash, StorePathHash)>,
    tokens: BTreeMap<Sha256, TokenRecord>,
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

    fn delete_cache(&self, cache: &CacheName) -> Result<()> {
        self.with(|s| {
            s.caches.remove(cache);
        })?;
        self.purge_cache(cache)
    }

    fn purge_cache(&self, cache: &CacheName) -> Result<()> {
        self.with(|s| {
            s.stats.remove(cache);
            s.uploads.retain(|(c, _), _| c != cache);
            s.narinfos.retain(|(c, _), _| c != cache);
            s.claims.retain(|(c, _, _)| c != cache);
            s.references.retain(|(c, _, _)| c != cache);
            s.blobs.retain(|(_, c, _), _| c != cache);
        })
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>> {
        self.with(|s| s.tokens.values().cloned().collect())
    }

    fn put_token(&self, token: &TokenRecord) -> Result<()> {
        self.with(|s| {
            s.tokens.insert(token.hash, token.clone());
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
        references: &[StorePathHash],
    ) -> Result<Commit> {
        self.with(|s| {
            let key = (cache.clone(), *path);
            if let Some(existing) = s.narinfos.get(&key) {
                return Commit::Exists {
                    nar_hash: existing.nar_hash,
                };
            }
            s.narinfos.insert(key, record.clone());
            s.claims.insert((cache.clone(), record.nar_hash, *path));
            for r in references.iter().filter(|r| *r != path) {
                s.references.insert((cache.clone(), *r, *path));
            }
            let stats = s.stats.entry(cache.clone()).or_default();
            stats.paths += 1;
            stats.nar_bytes += record.nar_size;
            stats.stored_bytes += record.file_size;
            Commit::Written
        })
    }

    fn referrers(&self, cache: &CacheName, path: &StorePathHash) -> Result<Vec<StorePathHash>> {
        self.with(|s| {
            s.references
                .iter()
                .filter(|(c, r, _)| c == cache && r == path)
                .map(|(_, _, by)| *by)
                .collect()
        })
    }

    fn narinfos(
        &self,
        cache: &CacheName,
        after: Option<&StorePathHash>,
        limit: usize,
    ) -> Result<Vec<(StorePathHash, NarInfoRecord)>> {
        self.with(|s| {
            s.narinfos
                .iter()
                .filter(|((c, h), _)| c == cache && after.is_none_or(|a| h > a))
                .take(limit)
                .map(|((_, h), r)| (*h, r.clone()))
                .collect()
        })
    }

    fn replace_narinfo(
        &self,
        cache: &CacheName,
        path: &StorePathHash,
        expected: &[u8],
        text: &[u8],
    ) -> Result<bool> {
        self.with(|s| match s.narinfos.get_mut(&(cache.clone(), *path)) {
            Some(r) if r.text == expected => {
                r.text = bytes::Bytes::copy_from_slice(text);
                true
            }
            _ => false,
        })
    }

    fn delete_narinfo(
        &self,
        cache: &CacheName,
        path: &StorePathHash,
        references: &[StorePathHash],
    ) -> Result<bool> {
        self.with(|s| {
            let Some(record) = s.narinfos.remove(&(cache.clone(), *path)) else {
                return false;
            };
            s.claims.remove(&(cache.clone(), record.nar_hash, *path));
            for r in references.iter().filter(|r| *r != path) {
                s.references.remove(&(cache.clone(), *r, *path));
            }
            let stats = s.stats.entry(cache.clone()).or_default();
            stats.paths = stats.paths.saturating_sub(1);
            stats.nar_bytes = stats.nar_bytes.saturating_sub(record.nar_size);
            stats.stored_bytes = stats.stored_bytes.saturating_sub(record.file_size);
            true
        })
    }

    fn cache_has_nar(&self, cache: &CacheName, nar_hash: &Sha256) -> Result<bool> {
        self.with(|s| {
            s.claims
                .range((cache.clone(), *nar_hash, StorePathHash::from_bytes([0; 20]))..)
                .next()
                .is_some_and(|(c, h, _)| c == cache && h == nar_hash)
        })
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
