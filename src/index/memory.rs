//! An `Index` in memory, for tests of the layers above the index that need no server
//! and no disk. It keeps the same rules as the durable index (first narinfo wins,
//! claims and stats move with the commit), checked by the same contract suite.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use super::{
    BlobKey, BlobKind, CacheRecord, CacheStats, Commit, Index, NarInfoRecord, NarRecord, PinRecord,
    Result, TokenRecord, Upload,
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
    blobs: BTreeMap<BlobKey, Stored>,
    accesses: BTreeMap<(CacheName, StorePathHash), u64>,
    pins: BTreeMap<(CacheName, String), PinRecord>,
    meta: BTreeMap<String, Vec<u8>>,
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

fn blob_key(kind: BlobKind, cache: &CacheName, key: &str) -> BlobKey {
    BlobKey {
        kind,
        cache: cache.clone(),
        key: key.to_owned(),
    }
}

/// Up to `limit` entries of `map` after `after`, cloned.
fn page_of<K: Ord + Clone, V: Clone>(
    map: &BTreeMap<K, V>,
    after: Option<&K>,
    limit: usize,
) -> Vec<(K, V)> {
    use std::ops::Bound::{Excluded, Unbounded};
    let start = after.map_or(Unbounded, Excluded);
    map.range((start, Unbounded))
        .take(limit)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// A cache's pending bytes after the upload `old` (if any) is replaced by `new` (or
/// removed): only unclaimed uploads count.
pub(super) fn pending_after(pending: u64, old: Option<&Upload>, new: Option<&Upload>) -> u64 {
    let counted = |u: Option<&Upload>| u.filter(|u| !u.claimed).map_or(0, |u| u.stored_size);
    pending
        .saturating_sub(counted(old))
        .saturating_add(counted(new))
}

#[async_trait::async_trait]
impl Index for MemoryIndex {
    async fn caches(&self) -> Result<Vec<CacheRecord>> {
        self.with(|s| s.caches.values().cloned().collect())
    }

    async fn put_cache(&self, record: &CacheRecord) -> Result<()> {
        self.with(|s| {
            s.caches.insert(record.name.clone(), record.clone());
        })
    }

    async fn delete_cache(&self, cache: &CacheName) -> Result<()> {
        self.with(|s| {
            s.caches.remove(cache);
        })?;
        self.purge_cache(cache).await
    }

    async fn purge_cache(&self, cache: &CacheName) -> Result<()> {
        self.with(|s| {
            s.stats.remove(cache);
            s.uploads.retain(|(c, _), _| c != cache);
            s.narinfos.retain(|(c, _), _| c != cache);
            s.claims.retain(|(c, _, _)| c != cache);
            s.references.retain(|(c, _, _)| c != cache);
            s.blobs.retain(|k, _| k.cache != *cache);
            s.accesses.retain(|(c, _), _| c != cache);
            s.pins.retain(|(c, _), _| c != cache);
        })
    }

    async fn tokens(&self) -> Result<Vec<TokenRecord>> {
        self.with(|s| s.tokens.values().cloned().collect())
    }

    async fn put_token(&self, token: &TokenRecord) -> Result<()> {
        self.with(|s| {
            s.tokens.insert(token.hash, token.clone());
        })
    }

    async fn cache_stats(&self, cache: &CacheName) -> Result<CacheStats> {
        self.with(|s| s.stats.get(cache).copied().unwrap_or_default())
    }

    async fn chunks(&self, ids: &[ChunkId]) -> Result<Vec<Option<ChunkRef>>> {
        self.with(|s| ids.iter().map(|id| s.chunks.get(id).copied()).collect())
    }

    async fn put_chunks(&self, chunks: &[ChunkRef]) -> Result<()> {
        self.with(|s| s.chunks.extend(chunks.iter().map(|c| (c.id, *c))))
    }

    async fn segment(&self, id: &ManifestId, index: u32) -> Result<Option<Manifest>> {
        self.with(|s| s.segments.get(&(*id, index)).cloned())
    }

    async fn put_segment(&self, id: &ManifestId, index: u32, chunks: &Manifest) -> Result<()> {
        self.with(|s| {
            s.segments.insert((*id, index), chunks.clone());
        })
    }

    async fn nar(&self, nar_hash: &Sha256) -> Result<Option<NarRecord>> {
        self.with(|s| s.nars.get(nar_hash).cloned())
    }

    async fn put_nar(&self, nar_hash: &Sha256, nar: &NarRecord) -> Result<()> {
        self.with(|s| {
            s.nars.insert(*nar_hash, nar.clone());
        })
    }

    async fn upload(&self, cache: &CacheName, url: &NarUrl) -> Result<Option<Upload>> {
        self.with(|s| s.uploads.get(&(cache.clone(), *url)).copied())
    }

    async fn put_upload(
        &self,
        cache: &CacheName,
        url: &NarUrl,
        upload: &Upload,
        nar: &NarRecord,
    ) -> Result<()> {
        self.with(|s| {
            s.nars.insert(upload.nar_hash, nar.clone());
            let replaced = s.uploads.insert((cache.clone(), *url), *upload);
            let stats = s.stats.entry(cache.clone()).or_default();
            stats.pending_bytes =
                pending_after(stats.pending_bytes, replaced.as_ref(), Some(upload));
        })
    }

    async fn narinfo(
        &self,
        cache: &CacheName,
        path: &StorePathHash,
    ) -> Result<Option<NarInfoRecord>> {
        self.with(|s| s.narinfos.get(&(cache.clone(), *path)).cloned())
    }

    async fn commit_narinfo(
        &self,
        cache: &CacheName,
        path: &StorePathHash,
        record: &NarInfoRecord,
        references: &[StorePathHash],
        upload: Option<&NarUrl>,
    ) -> Result<Commit> {
        self.with(|s| {
            let key = (cache.clone(), *path);
            let kept = s.narinfos.get(&key).map(|r| r.nar_hash);
            let nar_hash = kept.unwrap_or(record.nar_hash);
            if let Some(u) = upload.and_then(|url| s.uploads.get_mut(&(cache.clone(), *url))) {
                if !u.claimed && u.nar_hash == nar_hash {
                    u.claimed = true;
                    let stats = s.stats.entry(cache.clone()).or_default();
                    stats.pending_bytes = stats.pending_bytes.saturating_sub(u.stored_size);
                }
            }
            if let Some(nar_hash) = kept {
                return Commit::Exists { nar_hash };
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

    async fn referrers(
        &self,
        cache: &CacheName,
        path: &StorePathHash,
    ) -> Result<Vec<StorePathHash>> {
        self.with(|s| {
            s.references
                .iter()
                .filter(|(c, r, _)| c == cache && r == path)
                .map(|(_, _, by)| *by)
                .collect()
        })
    }

    async fn narinfos(
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

    async fn replace_narinfo(
        &self,
        cache: &CacheName,
        path: &StorePathHash,
        expected: &[u8],
        text: &[u8],
        file_size: Option<u64>,
    ) -> Result<bool> {
        self.with(|s| match s.narinfos.get_mut(&(cache.clone(), *path)) {
            Some(r) if r.text == expected => {
                r.text = bytes::Bytes::copy_from_slice(text);
                if let Some(size) = file_size {
                    let old = std::mem::replace(&mut r.file_size, size);
                    let stats = s.stats.entry(cache.clone()).or_default();
                    stats.stored_bytes = stats.stored_bytes.saturating_sub(old) + size;
                }
                true
            }
            _ => false,
        })
    }

    async fn delete_narinfo(
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
            s.accesses.remove(&(cache.clone(), *path));
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

    async fn cache_has_nar(&self, cache: &CacheName, nar_hash: &Sha256) -> Result<bool> {
        self.with(|s| {
            s.claims
                .range((cache.clone(), *nar_hash, StorePathHash::from_bytes([0; 20]))..)
                .next()
                .is_some_and(|(c, h, _)| c == cache && h == nar_hash)
        })
    }

    async fn blob(&self, kind: BlobKind, cache: &CacheName, key: &str) -> Result<Option<Stored>> {
        self.with(|s| s.blobs.get(&blob_key(kind, cache, key)).cloned())
    }

    async fn put_blob(
        &self,
        kind: BlobKind,
        cache: &CacheName,
        key: &str,
        stored: &Stored,
    ) -> Result<()> {
        self.with(|s| {
            let old = s.blobs.insert(blob_key(kind, cache, key), stored.clone());
            let stats = s.stats.entry(cache.clone()).or_default();
            stats.blob_bytes = stats
                .blob_bytes
                .saturating_sub(old.map_or(0, |o| o.stored_size()))
                .saturating_add(stored.stored_size());
        })
    }

    async fn accesses(&self, cache: &CacheName) -> Result<Vec<(StorePathHash, u64)>> {
        self.with(|s| {
            s.accesses
                .iter()
                .filter(|((c, _), _)| c == cache)
                .map(|((_, p), at)| (*p, *at))
                .collect()
        })
    }

    async fn put_accesses(
        &self,
        cache: &CacheName,
        accesses: &[(StorePathHash, u64)],
    ) -> Result<()> {
        self.with(|s| {
            for (p, at) in accesses {
                s.accesses.insert((cache.clone(), *p), *at);
            }
        })
    }

    async fn paths_of_nar(
        &self,
        cache: &CacheName,
        nar_hash: &Sha256,
    ) -> Result<Vec<StorePathHash>> {
        self.with(|s| {
            s.claims
                .iter()
                .filter(|(c, h, _)| c == cache && h == nar_hash)
                .map(|(_, _, p)| *p)
                .collect()
        })
    }

    async fn pins(&self, cache: &CacheName) -> Result<Vec<PinRecord>> {
        self.with(|s| {
            s.pins
                .iter()
                .filter(|((c, _), _)| c == cache)
                .map(|(_, p)| p.clone())
                .collect()
        })
    }

    async fn put_pin(&self, cache: &CacheName, pin: &PinRecord) -> Result<()> {
        self.with(|s| {
            s.pins
                .insert((cache.clone(), pin.name.clone()), pin.clone());
        })
    }

    async fn delete_pin(&self, cache: &CacheName, name: &str) -> Result<bool> {
        self.with(|s| s.pins.remove(&(cache.clone(), name.to_owned())).is_some())
    }

    async fn nars_after(
        &self,
        after: Option<&Sha256>,
        limit: usize,
    ) -> Result<Vec<(Sha256, NarRecord)>> {
        self.with(|s| page_of(&s.nars, after, limit))
    }

    async fn replace_nar(
        &self,
        nar_hash: &Sha256,
        expected: &NarRecord,
        new: &NarRecord,
    ) -> Result<bool> {
        self.with(|s| match s.nars.get_mut(nar_hash) {
            Some(n) if n == expected => {
                *n = new.clone();
                true
            }
            _ => false,
        })
    }

    async fn replace_blob(&self, key: &BlobKey, expected: &Stored, new: &Stored) -> Result<bool> {
        self.with(|s| match s.blobs.get_mut(key) {
            Some(b) if b == expected => {
                *b = new.clone();
                let stats = s.stats.entry(key.cache.clone()).or_default();
                stats.blob_bytes = stats
                    .blob_bytes
                    .saturating_sub(expected.stored_size())
                    .saturating_add(new.stored_size());
                true
            }
            _ => false,
        })
    }

    async fn delete_nar_if(&self, nar_hash: &Sha256, expected: &NarRecord) -> Result<bool> {
        self.with(|s| match s.nars.get(nar_hash) {
            Some(n) if n == expected => s.nars.remove(nar_hash).is_some(),
            _ => false,
        })
    }

    async fn uploads_after(
        &self,
        after: Option<&(CacheName, NarUrl)>,
        limit: usize,
    ) -> Result<Vec<(CacheName, NarUrl, Upload)>> {
        self.with(|s| {
            page_of(&s.uploads, after, limit)
                .into_iter()
                .map(|((c, u), up)| (c, u, up))
                .collect()
        })
    }

    async fn delete_upload_if(
        &self,
        cache: &CacheName,
        url: &NarUrl,
        expected: &Upload,
    ) -> Result<bool> {
        let key = (cache.clone(), *url);
        self.with(|s| match s.uploads.get(&key) {
            Some(u) if u == expected => {
                let removed = s.uploads.remove(&key);
                let stats = s.stats.entry(cache.clone()).or_default();
                stats.pending_bytes = pending_after(stats.pending_bytes, removed.as_ref(), None);
                true
            }
            _ => false,
        })
    }

    async fn blobs_after(
        &self,
        after: Option<&BlobKey>,
        limit: usize,
    ) -> Result<Vec<(BlobKey, Stored)>> {
        self.with(|s| page_of(&s.blobs, after, limit))
    }

    async fn chunks_after(&self, after: Option<&ChunkId>, limit: usize) -> Result<Vec<ChunkRef>> {
        self.with(|s| {
            page_of(&s.chunks, after, limit)
                .into_iter()
                .map(|(_, c)| c)
                .collect()
        })
    }

    async fn delete_chunks(&self, ids: &[ChunkId]) -> Result<()> {
        self.with(|s| {
            for id in ids {
                s.chunks.remove(id);
            }
        })
    }

    async fn manifests_after(
        &self,
        after: Option<&ManifestId>,
        limit: usize,
    ) -> Result<Vec<ManifestId>> {
        use std::ops::Bound::{Excluded, Unbounded};
        // Past every segment of `after`.
        let start = after.map_or(Unbounded, |id| Excluded((*id, u32::MAX)));
        self.with(|s| {
            let mut ids: Vec<ManifestId> = Vec::new();
            for (id, _) in s.segments.range((start, Unbounded)).map(|(k, _)| k) {
                if ids.last() != Some(id) {
                    if ids.len() == limit {
                        break;
                    }
                    ids.push(*id);
                }
            }
            ids
        })
    }

    async fn delete_manifest(&self, id: &ManifestId) -> Result<()> {
        self.with(|s| s.segments.retain(|(m, _), _| m != id))
    }

    async fn meta(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.with(|s| s.meta.get(key).cloned())
    }

    async fn put_meta(&self, key: &str, value: &[u8]) -> Result<()> {
        self.with(|s| {
            s.meta.insert(key.to_owned(), value.to_vec());
        })
    }

    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    async fn check(&self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn open() -> ((), Box<dyn Index>) {
        ((), Box::new(MemoryIndex::new()))
    }

    async fn pair() -> ((), [std::sync::Arc<dyn Index>; 2]) {
        let one: std::sync::Arc<dyn Index> = std::sync::Arc::new(MemoryIndex::new());
        ((), [one.clone(), one])
    }

    crate::index::contract::tests!(open, pair);
}
