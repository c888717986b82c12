//! The embedded `Index`: one sled database in the data directory.
//!
//! sled's log is replayed as a prefix after a crash, so the order of writes is the
//! order of what can survive: a record written after another never outlives it.

use std::ops::Bound::{Excluded, Unbounded};
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use sled::Transactional as _;

use super::codec;
use super::{
    BlobKey, BlobKind, CacheRecord, CacheStats, Commit, Index, IndexError, NarInfoRecord,
    NarRecord, PinRecord, Result, TokenRecord, Upload,
};
use crate::nix::{CacheName, NarUrl, Sha256, StorePathHash};
use crate::store::{ChunkId, ChunkRef, Manifest, ManifestId, Stored};

/// The metadata layout; bumped on any incompatible change. Format 1 kept listings,
/// logs and realisations as whole values and manifests whole; format 2 keeps every
/// content as chunks, its manifest in segments; format 3 adds tokens, the references
/// between paths, claims per path, and caches with several keys; format 4 adds to
/// upload records their stored size and whether a narinfo took them up, and to a
/// cache's counts its pending uploads and its logs. A format 2 database is migrated
/// when opened (`migrate_from_2`); a format 3 one needs nothing (format 4 reads its
/// records, and writes its own as they change), only its version is written, so that
/// a build of format 3 refuses what format 4 wrote instead of calling it corrupt.
const FORMAT_VERSION: &[u8] = b"4";

/// The embedded index. sled answers a point read from its page cache (or with one
/// disk read) in microseconds, so those are answered in place on the runtime, as a
/// file read of the same size would be; writes, which may wait for its log, and walks
/// and flushes go to the blocking pool. That choice is made here and nowhere else.
pub struct SledIndex {
    trees: Arc<Trees>,
}

/// The sled database and its trees, one per kind of record.
struct Trees {
    db: sled::Db,
    caches: sled::Tree,
    cache_stats: sled::Tree,
    chunks: sled::Tree,
    segments: sled::Tree,
    nars: sled::Tree,
    uploads: sled::Tree,
    narinfos: sled::Tree,
    cache_nars: sled::Tree,
    referrers: sled::Tree,
    logs: sled::Tree,
    realisations: sled::Tree,
    tokens: sled::Tree,
    accesses: sled::Tree,
    pins: sled::Tree,
    meta: sled::Tree,
}

/// `<cache>\0<key>`: cache names never contain NUL, so prefixes never collide.
fn scoped(cache: &CacheName, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(cache.as_str().len() + 1 + key.len());
    k.extend_from_slice(cache.as_str().as_bytes());
    k.push(0);
    k.extend_from_slice(key);
    k
}

/// The keys of `referrer`'s references but itself: a path's reference to itself makes
/// it no referrer of its own.
fn reference_keys(
    cache: &CacheName,
    references: &[StorePathHash],
    referrer: &StorePathHash,
) -> Vec<Vec<u8>> {
    references
        .iter()
        .filter(|r| *r != referrer)
        .map(|r| reference_key(cache, r, referrer))
        .collect()
}

/// The key of a reference: `<cache>\0<referenced path><referrer>`, so that the
/// referrers of a path are one prefix scan.
fn reference_key(
    cache: &CacheName,
    referenced: &StorePathHash,
    referrer: &StorePathHash,
) -> Vec<u8> {
    let mut k = scoped(cache, referenced.as_bytes());
    k.extend_from_slice(referrer.as_bytes());
    k
}

/// The key of a cache's claim on a NAR: `<cache>\0<NarHash><path>`.
fn claim_key(cache: &CacheName, nar_hash: &Sha256, path: &StorePathHash) -> Vec<u8> {
    let mut k = scoped(cache, nar_hash.as_bytes());
    k.extend_from_slice(path.as_bytes());
    k
}

/// The store paths that end the keys of `tree` under `prefix` (the referrers of a
/// path, the paths claiming a NAR).
fn paths_under(
    tree: &sled::Tree,
    prefix: &[u8],
    record: &'static str,
) -> Result<Vec<StorePathHash>> {
    tree.scan_prefix(prefix)
        .keys()
        .map(|k| {
            let k = k?;
            let path: [u8; 20] = k[prefix.len()..]
                .try_into()
                .map_err(|_| IndexError::corrupt(record, &k))?;
            Ok(StorePathHash::from_bytes(path))
        })
        .collect()
}

/// The cache and the rest of a `scoped` key.
fn split_scoped(k: &[u8]) -> Option<(CacheName, &[u8])> {
    let split = k.iter().position(|&b| b == 0)?;
    let cache = std::str::from_utf8(&k[..split]).ok()?.parse().ok()?;
    Some((cache, &k[split + 1..]))
}

impl From<sled::Error> for IndexError {
    fn from(e: sled::Error) -> Self {
        match e {
            sled::Error::Io(e) => IndexError::io(&e),
            e => IndexError::Failed(e.to_string()),
        }
    }
}

/// The error of a transaction: the database's, or the one it aborted with.
fn transaction_error(e: sled::transaction::TransactionError<IndexError>) -> IndexError {
    match e {
        sled::transaction::TransactionError::Storage(e) => e.into(),
        sled::transaction::TransactionError::Abort(e) => e,
    }
}

/// Where a walk through `tree` resumes: past `after`'s key.
fn from_after(after: Option<Vec<u8>>) -> (std::ops::Bound<Vec<u8>>, std::ops::Bound<Vec<u8>>) {
    (after.map_or(Unbounded, Excluded), Unbounded)
}

/// Hex of a binary key, for error messages.
fn hex(key: &[u8]) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

fn corrupt_bin(record: &'static str, key: &[u8]) -> IndexError {
    IndexError::Corrupt {
        record,
        key: hex(key),
    }
}

/// A cache's stats inside a transaction.
fn read_stats(
    tree: &sled::transaction::TransactionalTree,
    key: &[u8],
) -> std::result::Result<CacheStats, sled::transaction::ConflictableTransactionError<IndexError>> {
    match tree.get(key)? {
        None => Ok(CacheStats::default()),
        Some(v) => match codec::decode_stats(&v) {
            Some(s) => Ok(s),
            None => Err(sled::transaction::ConflictableTransactionError::Abort(
                IndexError::corrupt("cache stats", key),
            )),
        },
    }
}

/// Brings a format 2 database to format 3, in place: every step can be run again, and
/// the format is written only after all of them (by the caller), so a migration cut
/// short is done again from the start.
///
/// - A cache record's one `secret_key_file` becomes its one signing key, with its name
///   and public key left empty for `caches` to fill in from the key file.
/// - Claims were keyed by cache and NarHash; they are keyed by path too now, and the
///   references between paths are recorded: both are rebuilt from the narinfos.
fn migrate_from_2(db: &sled::Db) -> Result<()> {
    let caches = db.open_tree("caches")?;
    for kv in caches.iter() {
        let (k, v) = kv?;
        let mut record: serde_json::Value =
            serde_json::from_slice(&v).map_err(|_| IndexError::corrupt("cache", &k))?;
        let Some(object) = record.as_object_mut() else {
            return Err(IndexError::corrupt("cache", &k));
        };
        if let Some(file) = object.remove("secret_key_file") {
            object.insert(
                "keys".into(),
                serde_json::json!([{
                    "name": "", "public_key": "", "secret_key_file": file, "signing": true
                }]),
            );
            caches.insert(&k, serde_json::to_vec(&record).expect("JSON serialises"))?;
        }
    }
    let (narinfos, claims, referrers) = (
        db.open_tree("narinfos")?,
        db.open_tree("cache_nars")?,
        db.open_tree("referrers")?,
    );
    claims.clear()?;
    referrers.clear()?;
    for kv in narinfos.iter() {
        let (k, v) = kv?;
        let corrupt = || IndexError::corrupt("narinfo", &k);
        let (cache, rest) = split_scoped(&k).ok_or_else(corrupt)?;
        let path = StorePathHash::from_bytes(rest.try_into().map_err(|_| corrupt())?);
        let record = codec::decode_narinfo(Bytes::copy_from_slice(&v)).ok_or_else(corrupt)?;
        let narinfo = crate::nix::NarInfo::parse(&record.text).map_err(|_| corrupt())?;
        claims.insert(claim_key(&cache, &record.nar_hash, &path), &[])?;
        let references: Vec<StorePathHash> =
            narinfo.foreign_references().map(|r| r.hash()).collect();
        for r in reference_keys(&cache, &references, &path) {
            referrers.insert(r, &[])?;
        }
    }
    Ok(())
}

impl SledIndex {
    /// Opens (or creates) the database in `dir` with a page cache of `cache_bytes`.
    pub fn open(dir: &Path, cache_bytes: u64) -> anyhow::Result<Self> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .open()
            .map_err(|e| anyhow::anyhow!("opening the metadata in {}: {e}", dir.display()))?;
        match db.get("format_version")? {
            None if db.tree_names().len() <= 1 && db.is_empty() => {
                db.insert("format_version", FORMAT_VERSION)?;
            }
            None => anyhow::bail!(
                "metadata in {} has no format version; it was not written by cachet",
                dir.display()
            ),
            Some(v) if v.as_ref() == FORMAT_VERSION => {}
            Some(v) if v.as_ref() == b"2" => {
                migrate_from_2(&db).map_err(|e| {
                    anyhow::anyhow!("migrating the metadata in {}: {e}", dir.display())
                })?;
                db.insert("format_version", FORMAT_VERSION)?;
                db.flush()?;
                tracing::info!(dir = %dir.display(), "migrated the metadata from format 2 to 4");
            }
            Some(v) if v.as_ref() == b"3" => {
                db.insert("format_version", FORMAT_VERSION)?;
                db.flush()?;
                tracing::info!(dir = %dir.display(), "the metadata is format 4 from now on");
            }
            Some(v) => anyhow::bail!(
                "metadata in {} has format {:?}; this build reads format {:?} only \
                 (start from an empty data directory, or use the build that wrote it)",
                dir.display(),
                String::from_utf8_lossy(&v),
                String::from_utf8_lossy(FORMAT_VERSION)
            ),
        }
        let trees = Trees {
            caches: db.open_tree("caches")?,
            cache_stats: db.open_tree("cache_stats")?,
            chunks: db.open_tree("chunks")?,
            segments: db.open_tree("segments")?,
            nars: db.open_tree("nars")?,
            uploads: db.open_tree("uploads")?,
            narinfos: db.open_tree("narinfos")?,
            cache_nars: db.open_tree("cache_nars")?,
            referrers: db.open_tree("referrers")?,
            logs: db.open_tree("logs")?,
            realisations: db.open_tree("realisations")?,
            tokens: db.open_tree("tokens")?,
            accesses: db.open_tree("accesses")?,
            pins: db.open_tree("pins")?,
            meta: db.open_tree("meta")?,
            db,
        };
        Ok(Self {
            trees: Arc::new(trees),
        })
    }

    /// Runs `f` on the blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Trees) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let trees = self.trees.clone();
        tokio::task::spawn_blocking(move || f(&trees))
            .await
            .map_err(|e| IndexError::Failed(format!("a metadata task failed: {e}")))?
    }

    /// Writes raw bytes under a key of a tree, to test how damaged records are read.
    #[cfg(test)]
    fn damage(&self, tree: &str, key: &[u8], value: &[u8]) {
        self.trees
            .db
            .open_tree(tree)
            .unwrap()
            .insert(key, value)
            .unwrap();
    }
}

impl Trees {
    fn blob_tree(&self, kind: BlobKind) -> &sled::Tree {
        match kind {
            BlobKind::Log => &self.logs,
            BlobKind::Realisation => &self.realisations,
        }
    }

    fn caches(&self) -> Result<Vec<CacheRecord>> {
        self.caches
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                serde_json::from_slice(&v).map_err(|_| IndexError::corrupt("cache", &k))
            })
            .collect()
    }

    fn put_cache(&self, record: &CacheRecord) -> Result<()> {
        let value = serde_json::to_vec(record).expect("a cache record always serialises");
        self.caches.insert(record.name.as_str(), value)?;
        Ok(())
    }

    fn delete_cache(&self, cache: &CacheName) -> Result<()> {
        // The record goes first: from then on the cache is not served, and what is
        // left of it if this is interrupted is purged before the name is used again.
        self.caches.remove(cache.as_str())?;
        self.db.flush()?;
        self.purge_cache(cache)
    }

    fn purge_cache(&self, cache: &CacheName) -> Result<()> {
        let prefix = scoped(cache, b"");
        for tree in [
            &self.narinfos,
            &self.cache_nars,
            &self.referrers,
            &self.uploads,
            &self.logs,
            &self.realisations,
            &self.accesses,
            &self.pins,
        ] {
            let mut batch = sled::Batch::default();
            for key in tree.scan_prefix(&prefix).keys() {
                batch.remove(key?);
            }
            tree.apply_batch(batch)?;
        }
        self.cache_stats.remove(cache.as_str())?;
        Ok(())
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>> {
        self.tokens
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                serde_json::from_slice(&v).map_err(|_| corrupt_bin("token", &k))
            })
            .collect()
    }

    fn put_token(&self, token: &TokenRecord) -> Result<()> {
        let value = serde_json::to_vec(token).expect("a token record always serialises");
        self.tokens.insert(token.hash.as_bytes(), value)?;
        Ok(())
    }

    fn cache_stats(&self, cache: &CacheName) -> Result<CacheStats> {
        match self.cache_stats.get(cache.as_str())? {
            None => Ok(CacheStats::default()),
            Some(v) => codec::decode_stats(&v)
                .ok_or_else(|| IndexError::corrupt("cache stats", cache.as_str().as_bytes())),
        }
    }

    fn chunks(&self, ids: &[ChunkId]) -> Result<Vec<Option<ChunkRef>>> {
        ids.iter()
            .map(|id| {
                self.chunks
                    .get(id.0)?
                    .map(|v| {
                        ChunkRef::decode_location(*id, &v)
                            .ok_or_else(|| corrupt_bin("chunk", &id.0))
                    })
                    .transpose()
            })
            .collect()
    }

    fn put_chunks(&self, chunks: &[ChunkRef]) -> Result<()> {
        let mut batch = sled::Batch::default();
        for c in chunks {
            batch.insert(&c.id.0, &c.encode_location());
        }
        self.chunks.apply_batch(batch)?;
        Ok(())
    }

    fn segment(&self, id: &ManifestId, index: u32) -> Result<Option<Manifest>> {
        let key = codec::segment_key(id, index);
        self.segments
            .get(key)?
            .map(|v| Manifest::decode(&v).ok_or_else(|| corrupt_bin("segment", &key)))
            .transpose()
    }

    fn put_segment(&self, id: &ManifestId, index: u32, chunks: &Manifest) -> Result<()> {
        self.segments
            .insert(codec::segment_key(id, index), chunks.encode())?;
        Ok(())
    }

    fn nar(&self, nar_hash: &Sha256) -> Result<Option<NarRecord>> {
        self.nars
            .get(nar_hash.as_bytes())?
            .map(|v| {
                codec::decode_nar(&v).ok_or_else(|| IndexError::Corrupt {
                    record: "NAR",
                    key: nar_hash.to_string(),
                })
            })
            .transpose()
    }

    fn upload(&self, cache: &CacheName, url: &NarUrl) -> Result<Option<Upload>> {
        let key = scoped(cache, url.to_string().as_bytes());
        self.uploads
            .get(&key)?
            .map(|v| codec::decode_upload(&v).ok_or_else(|| IndexError::corrupt("upload", &key)))
            .transpose()
    }

    fn put_upload(
        &self,
        cache: &CacheName,
        url: &NarUrl,
        upload: &Upload,
        nar: &NarRecord,
    ) -> Result<()> {
        let key = scoped(cache, url.to_string().as_bytes());
        let value = codec::encode_upload(upload);
        let nar_value = codec::encode_nar(nar);
        let stats_key = cache.as_str().as_bytes();
        let trees = (&self.nars, &self.uploads, &self.cache_stats);
        let outcome = trees.transaction(|(nars, uploads, cache_stats)| {
            nars.insert(upload.nar_hash.as_bytes(), nar_value.as_slice())?;
            let replaced = match uploads.insert(key.as_slice(), value.as_slice())? {
                Some(old) => match codec::decode_upload(&old) {
                    Some(old) => Some(old),
                    None => return sled::transaction::abort(IndexError::corrupt("upload", &key)),
                },
                None => None,
            };
            let mut stats = read_stats(cache_stats, stats_key)?;
            stats.pending_bytes =
                super::memory::pending_after(stats.pending_bytes, replaced.as_ref(), Some(upload));
            cache_stats.insert(stats_key, codec::encode_stats(&stats).as_slice())?;
            Ok(())
        });
        outcome.map_err(transaction_error)
    }

    fn narinfo(&self, cache: &CacheName, path: &StorePathHash) -> Result<Option<NarInfoRecord>> {
        let key = scoped(cache, path.as_bytes());
        self.narinfos
            .get(&key)?
            .map(|v| {
                codec::decode_narinfo(Bytes::copy_from_slice(&v))
                    .ok_or_else(|| IndexError::corrupt_narinfo(cache, path))
            })
            .transpose()
    }

    fn commit_narinfo(
        &self,
        cache: &CacheName,
        path: &StorePathHash,
        record: &NarInfoRecord,
        references: &[StorePathHash],
        upload: Option<&NarUrl>,
    ) -> Result<Commit> {
        let key = scoped(cache, path.as_bytes());
        let value = codec::encode_narinfo(record);
        let claim = claim_key(cache, &record.nar_hash, path);
        let refs = reference_keys(cache, references, path);
        let stats_key = cache.as_str().as_bytes();
        let upload_key = upload.map(|u| scoped(cache, u.to_string().as_bytes()));
        let corrupt = || IndexError::corrupt_narinfo(cache, path);

        let trees = (
            &self.narinfos,
            &self.cache_nars,
            &self.cache_stats,
            &self.referrers,
            &self.uploads,
        );
        let outcome =
            trees.transaction(|(narinfos, cache_nars, cache_stats, referrers, uploads)| {
                let kept = match narinfos.get(&key)? {
                    Some(existing) => match codec::narinfo_nar_hash(&existing) {
                        Some(nar_hash) => Some(nar_hash),
                        None => return sled::transaction::abort(corrupt()),
                    },
                    None => None,
                };
                let mut stats = read_stats(cache_stats, stats_key)?;
                // The upload the narinfo takes up stops counting as pending.
                if let Some(upload_key) = &upload_key {
                    if let Some(v) = uploads.get(upload_key)? {
                        let Some(mut u) = codec::decode_upload(&v) else {
                            return sled::transaction::abort(IndexError::corrupt(
                                "upload", upload_key,
                            ));
                        };
                        if !u.claimed && u.nar_hash == kept.unwrap_or(record.nar_hash) {
                            u.claimed = true;
                            stats.pending_bytes = stats.pending_bytes.saturating_sub(u.stored_size);
                            uploads.insert(upload_key.as_slice(), codec::encode_upload(&u))?;
                            cache_stats
                                .insert(stats_key, codec::encode_stats(&stats).as_slice())?;
                        }
                    }
                }
                if let Some(nar_hash) = kept {
                    return Ok(Commit::Exists { nar_hash });
                }
                stats.paths += 1;
                stats.nar_bytes += record.nar_size;
                stats.stored_bytes += record.file_size;
                narinfos.insert(key.as_slice(), value.as_slice())?;
                cache_nars.insert(claim.as_slice(), &[])?;
                for r in &refs {
                    referrers.insert(r.as_slice(), &[])?;
                }
                cache_stats.insert(stats_key, codec::encode_stats(&stats).as_slice())?;
                Ok(Commit::Written)
            });
        outcome.map_err(transaction_error)
    }

    fn referrers(&self, cache: &CacheName, path: &StorePathHash) -> Result<Vec<StorePathHash>> {
        paths_under(
            &self.referrers,
            &scoped(cache, path.as_bytes()),
            "reference",
        )
    }

    fn narinfos(
        &self,
        cache: &CacheName,
        after: Option<&StorePathHash>,
        limit: usize,
    ) -> Result<Vec<(StorePathHash, NarInfoRecord)>> {
        let prefix = scoped(cache, b"");
        let start = match after {
            Some(a) => scoped(cache, a.as_bytes()),
            None => prefix.clone(),
        };
        let mut out = Vec::new();
        for kv in self.narinfos.range(start.clone()..) {
            let (k, v) = kv?;
            if !k.starts_with(&prefix) || out.len() == limit {
                break;
            }
            if after.is_some() && k.as_ref() == start.as_slice() {
                continue;
            }
            let corrupt = || IndexError::corrupt("narinfo", &k);
            let hash: [u8; 20] = k[prefix.len()..].try_into().map_err(|_| corrupt())?;
            let record = codec::decode_narinfo(Bytes::copy_from_slice(&v)).ok_or_else(corrupt)?;
            out.push((StorePathHash::from_bytes(hash), record));
        }
        Ok(out)
    }

    fn replace_narinfo(
        &self,
        cache: &CacheName,
        path: &StorePathHash,
        expected: &[u8],
        text: &[u8],
        file_size: Option<u64>,
    ) -> Result<bool> {
        let key = scoped(cache, path.as_bytes());
        let stats_key = cache.as_str().as_bytes();
        let trees = (&self.narinfos, &self.cache_stats);
        let outcome = trees.transaction(|(narinfos, cache_stats)| {
            let Some(existing) = narinfos.get(&key)? else {
                return Ok(false);
            };
            let Some(mut record) = codec::decode_narinfo(Bytes::copy_from_slice(&existing)) else {
                return sled::transaction::abort(IndexError::corrupt("narinfo", &key));
            };
            if record.text != expected {
                return Ok(false);
            }
            record.text = Bytes::copy_from_slice(text);
            if let Some(size) = file_size.filter(|s| *s != record.file_size) {
                let mut stats = read_stats(cache_stats, stats_key)?;
                stats.stored_bytes = stats.stored_bytes.saturating_sub(record.file_size) + size;
                cache_stats.insert(stats_key, codec::encode_stats(&stats).as_slice())?;
                record.file_size = size;
            }
            narinfos.insert(key.as_slice(), codec::encode_narinfo(&record))?;
            Ok(true)
        });
        outcome.map_err(transaction_error)
    }

    fn delete_narinfo(
        &self,
        cache: &CacheName,
        path: &StorePathHash,
        references: &[StorePathHash],
    ) -> Result<bool> {
        let key = scoped(cache, path.as_bytes());
        let refs = reference_keys(cache, references, path);
        let stats_key = cache.as_str().as_bytes();
        let trees = (
            &self.narinfos,
            &self.cache_nars,
            &self.cache_stats,
            &self.referrers,
        );
        let outcome = trees.transaction(|(narinfos, cache_nars, cache_stats, referrers)| {
            let Some(existing) = narinfos.get(&key)? else {
                return Ok(false);
            };
            let Some(record) = codec::decode_narinfo(Bytes::copy_from_slice(&existing)) else {
                return sled::transaction::abort(IndexError::corrupt("narinfo", &key));
            };
            narinfos.remove(key.as_slice())?;
            cache_nars.remove(claim_key(cache, &record.nar_hash, path))?;
            // The access record goes with it below; a leftover is harmless.
            for r in &refs {
                referrers.remove(r.as_slice())?;
            }
            let mut stats = read_stats(cache_stats, stats_key)?;
            stats.paths = stats.paths.saturating_sub(1);
            stats.nar_bytes = stats.nar_bytes.saturating_sub(record.nar_size);
            stats.stored_bytes = stats.stored_bytes.saturating_sub(record.file_size);
            cache_stats.insert(stats_key, codec::encode_stats(&stats).as_slice())?;
            Ok(true)
        });
        let deleted = outcome.map_err(transaction_error)?;
        if deleted {
            self.accesses.remove(&key)?;
        }
        Ok(deleted)
    }

    fn cache_has_nar(&self, cache: &CacheName, nar_hash: &Sha256) -> Result<bool> {
        let prefix = scoped(cache, nar_hash.as_bytes());
        Ok(self
            .cache_nars
            .scan_prefix(prefix)
            .next()
            .transpose()?
            .is_some())
    }

    fn blob(&self, kind: BlobKind, cache: &CacheName, key: &str) -> Result<Option<Stored>> {
        let key = scoped(cache, key.as_bytes());
        self.blob_tree(kind)
            .get(&key)?
            .map(|v| codec::decode_stored(&v).ok_or_else(|| IndexError::corrupt("blob", &key)))
            .transpose()
    }

    fn put_blob(
        &self,
        kind: BlobKind,
        cache: &CacheName,
        key: &str,
        stored: &Stored,
    ) -> Result<()> {
        let mut value = Vec::new();
        codec::encode_stored(stored, &mut value);
        let key = scoped(cache, key.as_bytes());
        let stats_key = cache.as_str().as_bytes();
        let trees = (self.blob_tree(kind), &self.cache_stats);
        let outcome = trees.transaction(|(blobs, cache_stats)| {
            let old = match blobs.insert(key.as_slice(), value.as_slice())? {
                Some(v) => match codec::decode_stored(&v) {
                    Some(old) => old.stored_size(),
                    None => return sled::transaction::abort(IndexError::corrupt("blob", &key)),
                },
                None => 0,
            };
            let mut stats = read_stats(cache_stats, stats_key)?;
            stats.blob_bytes = stats
                .blob_bytes
                .saturating_sub(old)
                .saturating_add(stored.stored_size());
            cache_stats.insert(stats_key, codec::encode_stats(&stats).as_slice())?;
            Ok(())
        });
        outcome.map_err(transaction_error)
    }

    fn accesses(&self, cache: &CacheName) -> Result<Vec<(StorePathHash, u64)>> {
        let prefix = scoped(cache, b"");
        self.accesses
            .scan_prefix(&prefix)
            .map(|kv| {
                let (k, v) = kv?;
                let corrupt = || IndexError::corrupt("access", &k);
                let path: [u8; 20] = k[prefix.len()..].try_into().map_err(|_| corrupt())?;
                let at: [u8; 8] = v.as_ref().try_into().map_err(|_| corrupt())?;
                Ok((StorePathHash::from_bytes(path), u64::from_le_bytes(at)))
            })
            .collect()
    }

    fn put_accesses(&self, cache: &CacheName, accesses: &[(StorePathHash, u64)]) -> Result<()> {
        // One at a time: nothing needs them together, and a batch keeps a copy of
        // every node it changes until it is applied.
        for (path, at) in accesses {
            self.accesses
                .insert(scoped(cache, path.as_bytes()), &at.to_le_bytes())?;
        }
        Ok(())
    }

    fn paths_of_nar(&self, cache: &CacheName, nar_hash: &Sha256) -> Result<Vec<StorePathHash>> {
        paths_under(
            &self.cache_nars,
            &scoped(cache, nar_hash.as_bytes()),
            "claim",
        )
    }

    fn pins(&self, cache: &CacheName) -> Result<Vec<PinRecord>> {
        self.pins
            .scan_prefix(scoped(cache, b""))
            .map(|kv| {
                let (k, v) = kv?;
                serde_json::from_slice(&v).map_err(|_| IndexError::corrupt("pin", &k))
            })
            .collect()
    }

    fn put_pin(&self, cache: &CacheName, pin: &PinRecord) -> Result<()> {
        let value = serde_json::to_vec(pin).expect("a pin record always serialises");
        self.pins
            .insert(scoped(cache, pin.name.as_bytes()), value)?;
        Ok(())
    }

    fn delete_pin(&self, cache: &CacheName, name: &str) -> Result<bool> {
        Ok(self.pins.remove(scoped(cache, name.as_bytes()))?.is_some())
    }

    fn nars_after(&self, after: Option<Sha256>, limit: usize) -> Result<Vec<(Sha256, NarRecord)>> {
        let start = after.map(|h| h.as_bytes().to_vec());
        self.nars
            .range(from_after(start))
            .take(limit)
            .map(|kv| {
                let (k, v) = kv?;
                let corrupt = || corrupt_bin("NAR", &k);
                let hash: [u8; 32] = k.as_ref().try_into().map_err(|_| corrupt())?;
                Ok((
                    Sha256::from_bytes(hash),
                    codec::decode_nar(&v).ok_or_else(corrupt)?,
                ))
            })
            .collect()
    }

    fn replace_nar(
        &self,
        nar_hash: &Sha256,
        expected: &NarRecord,
        new: &NarRecord,
    ) -> Result<bool> {
        let (expected, new) = (codec::encode_nar(expected), codec::encode_nar(new));
        let swapped = self.nars.compare_and_swap(
            nar_hash.as_bytes(),
            Some(expected.as_slice()),
            Some(new.as_slice()),
        )?;
        Ok(swapped.is_ok())
    }

    fn replace_blob(&self, blob: &BlobKey, expected: &Stored, new: &Stored) -> Result<bool> {
        let (mut old, mut value) = (Vec::new(), Vec::new());
        codec::encode_stored(expected, &mut old);
        codec::encode_stored(new, &mut value);
        let key = scoped(&blob.cache, blob.key.as_bytes());
        let stats_key = blob.cache.as_str().as_bytes();
        let trees = (self.blob_tree(blob.kind), &self.cache_stats);
        let outcome = trees.transaction(|(blobs, cache_stats)| {
            if blobs.get(&key)?.as_deref() != Some(old.as_slice()) {
                return Ok(false);
            }
            blobs.insert(key.as_slice(), value.as_slice())?;
            let mut stats = read_stats(cache_stats, stats_key)?;
            stats.blob_bytes = stats
                .blob_bytes
                .saturating_sub(expected.stored_size())
                .saturating_add(new.stored_size());
            cache_stats.insert(stats_key, codec::encode_stats(&stats).as_slice())?;
            Ok(true)
        });
        outcome.map_err(transaction_error)
    }

    fn delete_nar_if(&self, nar_hash: &Sha256, expected: &NarRecord) -> Result<bool> {
        let expected = codec::encode_nar(expected);
        let swapped = self.nars.compare_and_swap(
            nar_hash.as_bytes(),
            Some(expected.as_slice()),
            None::<&[u8]>,
        )?;
        Ok(swapped.is_ok())
    }

    fn uploads_after(
        &self,
        after: Option<(CacheName, NarUrl)>,
        limit: usize,
    ) -> Result<Vec<(CacheName, NarUrl, Upload)>> {
        let start = after.map(|(c, u)| scoped(&c, u.to_string().as_bytes()));
        self.uploads
            .range(from_after(start))
            .take(limit)
            .map(|kv| {
                let (k, v) = kv?;
                let corrupt = || IndexError::corrupt("upload", &k);
                let (cache, rest) = split_scoped(&k).ok_or_else(corrupt)?;
                let url: NarUrl = std::str::from_utf8(rest)
                    .ok()
                    .and_then(|u| u.parse().ok())
                    .ok_or_else(corrupt)?;
                Ok((cache, url, codec::decode_upload(&v).ok_or_else(corrupt)?))
            })
            .collect()
    }

    fn delete_upload_if(&self, cache: &CacheName, url: &NarUrl, expected: &Upload) -> Result<bool> {
        let key = scoped(cache, url.to_string().as_bytes());
        let stats_key = cache.as_str().as_bytes();
        let trees = (&self.uploads, &self.cache_stats);
        let outcome = trees.transaction(|(uploads, cache_stats)| {
            // Compared as records, not bytes: one written in an older layout decodes
            // to what the caller read, and re-encodes to other bytes.
            let current = uploads.get(&key)?.map(|v| codec::decode_upload(&v));
            if current != Some(Some(*expected)) {
                return Ok(false);
            }
            uploads.remove(key.as_slice())?;
            let mut stats = read_stats(cache_stats, stats_key)?;
            stats.pending_bytes =
                super::memory::pending_after(stats.pending_bytes, Some(expected), None);
            cache_stats.insert(stats_key, codec::encode_stats(&stats).as_slice())?;
            Ok(true)
        });
        outcome.map_err(transaction_error)
    }

    fn blobs_after(&self, after: Option<BlobKey>, limit: usize) -> Result<Vec<(BlobKey, Stored)>> {
        let mut page = Vec::new();
        // Logs then realisations, as `BlobKind` orders them.
        for kind in [BlobKind::Log, BlobKind::Realisation] {
            let start = match &after {
                Some(a) if a.kind > kind => continue,
                Some(a) if a.kind == kind => Some(scoped(&a.cache, a.key.as_bytes())),
                _ => None,
            };
            for kv in self.blob_tree(kind).range(from_after(start)) {
                if page.len() == limit {
                    return Ok(page);
                }
                let (k, v) = kv?;
                let corrupt = || IndexError::corrupt("blob", &k);
                let (cache, rest) = split_scoped(&k).ok_or_else(corrupt)?;
                let key = std::str::from_utf8(rest).map_err(|_| corrupt())?.to_owned();
                let stored = codec::decode_stored(&v).ok_or_else(corrupt)?;
                page.push((BlobKey { kind, cache, key }, stored));
            }
        }
        Ok(page)
    }

    fn chunks_after(&self, after: Option<ChunkId>, limit: usize) -> Result<Vec<ChunkRef>> {
        self.chunks
            .range(from_after(after.map(|id| id.0.to_vec())))
            .take(limit)
            .map(|kv| {
                let (k, v) = kv?;
                let corrupt = || corrupt_bin("chunk", &k);
                let id: [u8; 32] = k.as_ref().try_into().map_err(|_| corrupt())?;
                ChunkRef::decode_location(ChunkId(id), &v).ok_or_else(corrupt)
            })
            .collect()
    }

    fn delete_chunks(&self, ids: &[ChunkId]) -> Result<()> {
        // One at a time: a batch kept a copy of every node it changed until it was
        // applied (50 MiB more at 100,000 removals), and nothing needs them together.
        for id in ids {
            self.chunks.remove(id.0)?;
        }
        Ok(())
    }

    fn manifests_after(&self, after: Option<ManifestId>, limit: usize) -> Result<Vec<ManifestId>> {
        // Past every segment of `after`.
        let start = after.map(|id| codec::segment_key(&id, u32::MAX).to_vec());
        let mut ids: Vec<ManifestId> = Vec::new();
        for k in self.segments.range(from_after(start)).keys() {
            let k = k?;
            let id: [u8; 16] = k
                .get(..16)
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| corrupt_bin("segment", &k))?;
            if ids.last().map(|m| m.0) != Some(id) {
                if ids.len() == limit {
                    break;
                }
                ids.push(ManifestId(id));
            }
        }
        Ok(ids)
    }

    fn delete_manifest(&self, id: &ManifestId) -> Result<()> {
        let mut batch = sled::Batch::default();
        for k in self.segments.scan_prefix(id.0).keys() {
            batch.remove(k?);
        }
        self.segments.apply_batch(batch)?;
        Ok(())
    }

    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.meta.get(key)?.map(|v| v.to_vec()))
    }

    fn put_meta(&self, key: &str, value: &[u8]) -> Result<()> {
        self.meta.insert(key, value)?;
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }

    fn check(&self) -> Result<()> {
        // A write proves more than a read: after an I/O error (a full disk) sled
        // refuses every write until it is reopened.
        self.db.insert("ready_probe", &[])?;
        self.db.get("format_version")?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl Index for SledIndex {
    async fn caches(&self) -> Result<Vec<CacheRecord>> {
        self.blocking(|t| t.caches()).await
    }

    async fn put_cache(&self, record: &CacheRecord) -> Result<()> {
        let record = record.clone();
        self.blocking(move |t| t.put_cache(&record)).await
    }

    async fn delete_cache(&self, cache: &CacheName) -> Result<()> {
        let cache = cache.clone();
        self.blocking(move |t| t.delete_cache(&cache)).await
    }

    async fn purge_cache(&self, cache: &CacheName) -> Result<()> {
        let cache = cache.clone();
        self.blocking(move |t| t.purge_cache(&cache)).await
    }

    async fn tokens(&self) -> Result<Vec<TokenRecord>> {
        self.blocking(|t| t.tokens()).await
    }

    async fn put_token(&self, token: &TokenRecord) -> Result<()> {
        let token = token.clone();
        self.blocking(move |t| t.put_token(&token)).await
    }

    async fn cache_stats(&self, cache: &CacheName) -> Result<CacheStats> {
        self.trees.cache_stats(cache)
    }

    async fn chunks(&self, ids: &[ChunkId]) -> Result<Vec<Option<ChunkRef>>> {
        self.trees.chunks(ids)
    }

    async fn put_chunks(&self, chunks: &[ChunkRef]) -> Result<()> {
        let chunks = chunks.to_vec();
        self.blocking(move |t| t.put_chunks(&chunks)).await
    }

    async fn segment(&self, id: &ManifestId, index: u32) -> Result<Option<Manifest>> {
        self.trees.segment(id, index)
    }

    async fn put_segment(&self, id: &ManifestId, index: u32, chunks: &Manifest) -> Result<()> {
        let (id, chunks) = (*id, chunks.clone());
        self.blocking(move |t| t.put_segment(&id, index, &chunks))
            .await
    }

    async fn nar(&self, nar_hash: &Sha256) -> Result<Option<NarRecord>> {
        self.trees.nar(nar_hash)
    }

    async fn put_nar(&self, nar_hash: &Sha256, nar: &NarRecord) -> Result<()> {
        let (key, value) = (*nar_hash.as_bytes(), codec::encode_nar(nar));
        self.blocking(move |t| Ok(t.nars.insert(key, value).map(|_| ())?))
            .await
    }

    async fn upload(&self, cache: &CacheName, url: &NarUrl) -> Result<Option<Upload>> {
        self.trees.upload(cache, url)
    }

    async fn put_upload(
        &self,
        cache: &CacheName,
        url: &NarUrl,
        upload: &Upload,
        nar: &NarRecord,
    ) -> Result<()> {
        let (cache, url, upload, nar) = (cache.clone(), *url, *upload, nar.clone());
        self.blocking(move |t| t.put_upload(&cache, &url, &upload, &nar))
            .await
    }

    async fn narinfo(
        &self,
        cache: &CacheName,
        path: &StorePathHash,
    ) -> Result<Option<NarInfoRecord>> {
        self.trees.narinfo(cache, path)
    }

    async fn commit_narinfo(
        &self,
        cache: &CacheName,
        path: &StorePathHash,
        record: &NarInfoRecord,
        references: &[StorePathHash],
        upload: Option<&NarUrl>,
    ) -> Result<Commit> {
        let (cache, path, record) = (cache.clone(), *path, record.clone());
        let (references, upload) = (references.to_vec(), upload.copied());
        self.blocking(move |t| {
            t.commit_narinfo(&cache, &path, &record, &references, upload.as_ref())
        })
        .await
    }

    async fn referrers(
        &self,
        cache: &CacheName,
        path: &StorePathHash,
    ) -> Result<Vec<StorePathHash>> {
        self.trees.referrers(cache, path)
    }

    async fn narinfos(
        &self,
        cache: &CacheName,
        after: Option<&StorePathHash>,
        limit: usize,
    ) -> Result<Vec<(StorePathHash, NarInfoRecord)>> {
        let (cache, after) = (cache.clone(), after.copied());
        self.blocking(move |t| t.narinfos(&cache, after.as_ref(), limit))
            .await
    }

    async fn replace_narinfo(
        &self,
        cache: &CacheName,
        path: &StorePathHash,
        expected: &[u8],
        text: &[u8],
        file_size: Option<u64>,
    ) -> Result<bool> {
        let (cache, path) = (cache.clone(), *path);
        let (expected, text) = (expected.to_vec(), text.to_vec());
        self.blocking(move |t| t.replace_narinfo(&cache, &path, &expected, &text, file_size))
            .await
    }

    async fn delete_narinfo(
        &self,
        cache: &CacheName,
        path: &StorePathHash,
        references: &[StorePathHash],
    ) -> Result<bool> {
        let (cache, path, references) = (cache.clone(), *path, references.to_vec());
        self.blocking(move |t| t.delete_narinfo(&cache, &path, &references))
            .await
    }

    async fn cache_has_nar(&self, cache: &CacheName, nar_hash: &Sha256) -> Result<bool> {
        self.trees.cache_has_nar(cache, nar_hash)
    }

    async fn blob(&self, kind: BlobKind, cache: &CacheName, key: &str) -> Result<Option<Stored>> {
        self.trees.blob(kind, cache, key)
    }

    async fn put_blob(
        &self,
        kind: BlobKind,
        cache: &CacheName,
        key: &str,
        stored: &Stored,
    ) -> Result<()> {
        let (cache, key, stored) = (cache.clone(), key.to_owned(), stored.clone());
        self.blocking(move |t| t.put_blob(kind, &cache, &key, &stored))
            .await
    }

    async fn accesses(&self, cache: &CacheName) -> Result<Vec<(StorePathHash, u64)>> {
        let cache = cache.clone();
        self.blocking(move |t| t.accesses(&cache)).await
    }

    async fn put_accesses(
        &self,
        cache: &CacheName,
        accesses: &[(StorePathHash, u64)],
    ) -> Result<()> {
        let (cache, accesses) = (cache.clone(), accesses.to_vec());
        self.blocking(move |t| t.put_accesses(&cache, &accesses))
            .await
    }

    async fn paths_of_nar(
        &self,
        cache: &CacheName,
        nar_hash: &Sha256,
    ) -> Result<Vec<StorePathHash>> {
        self.trees.paths_of_nar(cache, nar_hash)
    }

    async fn pins(&self, cache: &CacheName) -> Result<Vec<PinRecord>> {
        self.trees.pins(cache)
    }

    async fn put_pin(&self, cache: &CacheName, pin: &PinRecord) -> Result<()> {
        let (cache, pin) = (cache.clone(), pin.clone());
        self.blocking(move |t| t.put_pin(&cache, &pin)).await
    }

    async fn delete_pin(&self, cache: &CacheName, name: &str) -> Result<bool> {
        let (cache, name) = (cache.clone(), name.to_owned());
        self.blocking(move |t| t.delete_pin(&cache, &name)).await
    }

    async fn nars_after(
        &self,
        after: Option<&Sha256>,
        limit: usize,
    ) -> Result<Vec<(Sha256, NarRecord)>> {
        let after = after.copied();
        self.blocking(move |t| t.nars_after(after, limit)).await
    }

    async fn replace_nar(
        &self,
        nar_hash: &Sha256,
        expected: &NarRecord,
        new: &NarRecord,
    ) -> Result<bool> {
        let (hash, expected, new) = (*nar_hash, expected.clone(), new.clone());
        self.blocking(move |t| t.replace_nar(&hash, &expected, &new))
            .await
    }

    async fn replace_blob(&self, key: &BlobKey, expected: &Stored, new: &Stored) -> Result<bool> {
        let (key, expected, new) = (key.clone(), expected.clone(), new.clone());
        self.blocking(move |t| t.replace_blob(&key, &expected, &new))
            .await
    }

    async fn delete_nar_if(&self, nar_hash: &Sha256, expected: &NarRecord) -> Result<bool> {
        let (hash, expected) = (*nar_hash, expected.clone());
        self.blocking(move |t| t.delete_nar_if(&hash, &expected))
            .await
    }

    async fn uploads_after(
        &self,
        after: Option<&(CacheName, NarUrl)>,
        limit: usize,
    ) -> Result<Vec<(CacheName, NarUrl, Upload)>> {
        let after = after.cloned();
        self.blocking(move |t| t.uploads_after(after, limit)).await
    }

    async fn delete_upload_if(
        &self,
        cache: &CacheName,
        url: &NarUrl,
        expected: &Upload,
    ) -> Result<bool> {
        let (cache, url, expected) = (cache.clone(), *url, *expected);
        self.blocking(move |t| t.delete_upload_if(&cache, &url, &expected))
            .await
    }

    async fn blobs_after(
        &self,
        after: Option<&BlobKey>,
        limit: usize,
    ) -> Result<Vec<(BlobKey, Stored)>> {
        let after = after.cloned();
        self.blocking(move |t| t.blobs_after(after, limit)).await
    }

    async fn chunks_after(&self, after: Option<&ChunkId>, limit: usize) -> Result<Vec<ChunkRef>> {
        let after = after.copied();
        self.blocking(move |t| t.chunks_after(after, limit)).await
    }

    async fn delete_chunks(&self, ids: &[ChunkId]) -> Result<()> {
        let ids = ids.to_vec();
        self.blocking(move |t| t.delete_chunks(&ids)).await
    }

    async fn manifests_after(
        &self,
        after: Option<&ManifestId>,
        limit: usize,
    ) -> Result<Vec<ManifestId>> {
        let after = after.copied();
        self.blocking(move |t| t.manifests_after(after, limit))
            .await
    }

    async fn delete_manifest(&self, id: &ManifestId) -> Result<()> {
        let id = *id;
        self.blocking(move |t| t.delete_manifest(&id)).await
    }

    async fn meta(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.trees.meta(key)
    }

    async fn put_meta(&self, key: &str, value: &[u8]) -> Result<()> {
        let (key, value) = (key.to_owned(), value.to_vec());
        self.blocking(move |t| t.put_meta(&key, &value)).await
    }

    async fn flush(&self) -> Result<()> {
        self.blocking(|t| t.flush()).await
    }

    async fn check(&self) -> Result<()> {
        self.blocking(|t| t.check()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn open() -> (tempfile::TempDir, Box<dyn Index>) {
        let dir = tempfile::tempdir().unwrap();
        let index = SledIndex::open(&dir.path().join("db"), 1 << 20).unwrap();
        (dir, Box::new(index))
    }

    /// sled is one process's: two views of it are one handle.
    async fn pair() -> (tempfile::TempDir, [Arc<dyn Index>; 2]) {
        let dir = tempfile::tempdir().unwrap();
        let index = SledIndex::open(&dir.path().join("db"), 1 << 20).unwrap();
        let one: Arc<dyn Index> = Arc::new(index);
        (dir, [one.clone(), one])
    }

    crate::index::contract::tests!(open, pair);

    fn cache() -> CacheName {
        "main".parse().unwrap()
    }

    #[tokio::test]
    async fn damaged_records_are_corrupt_errors_that_name_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let index = SledIndex::open(&dir.path().join("db"), 1 << 20).unwrap();
        let path: StorePathHash = "7h7qgvs4kgzsn8a6rb273saxyqh4jxlz".parse().unwrap();
        index.damage("narinfos", &scoped(&cache(), path.as_bytes()), b"short");
        let err = index.narinfo(&cache(), &path).await.unwrap_err();
        assert!(
            err.to_string()
                .contains("corrupt narinfo record under key main/7h7qgvs4"),
            "{err}"
        );
        // A commit over a damaged record refuses rather than panicking.
        let record = NarInfoRecord {
            nar_hash: Sha256::digest(b"n"),
            nar_size: 1,
            file_size: 1,
            text: Bytes::from_static(b"x"),
        };
        let err = index
            .commit_narinfo(&cache(), &path, &record, &[], None)
            .await
            .unwrap_err();
        assert!(matches!(err, IndexError::Corrupt { .. }), "{err}");

        let nar = Sha256::digest(b"nar");
        index.damage("nars", nar.as_bytes(), &[1, 200, 0, 0, 0, 0, 0, 0, 0]);
        let id = ManifestId([4; 16]);
        index.damage("segments", &codec::segment_key(&id, 2), &[1, 2, 3]);
        let err = index.segment(&id, 2).await.unwrap_err();
        assert!(
            matches!(
                err,
                IndexError::Corrupt {
                    record: "segment",
                    ..
                }
            ),
            "{err}"
        );
        let err = index.nar(&nar).await.unwrap_err();
        assert!(err.to_string().contains(&nar.to_string()), "{err}");
        let id = ChunkId::of(b"c");
        index.damage("chunks", &id.0, &[0; 3]);
        assert!(matches!(
            crate::index::chunk(&index, &id).await.unwrap_err(),
            IndexError::Corrupt {
                record: "chunk",
                ..
            }
        ));
        index.damage("logs", &scoped(&cache(), b"x.drv"), &[9]);
        let err = index
            .blob(BlobKind::Log, &cache(), "x.drv")
            .await
            .unwrap_err();
        assert!(err.to_string().contains("main?x.drv"), "{err}");
        index.damage("cache_stats", b"main", b"?");
        assert!(index.cache_stats(&cache()).await.is_err());
        index.damage("caches", b"bad", b"{");
        assert!(index.caches().await.is_err());
    }

    /// Opens the database in `dir`, waiting for a handle just dropped to let go of it
    /// (sled's background thread releases the lock a moment after).
    fn reopen(dir: &Path) -> anyhow::Result<SledIndex> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match SledIndex::open(dir, 1 << 20) {
                Err(e)
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                other => return other,
            }
        }
    }

    #[tokio::test]
    async fn a_format_2_database_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let db_dir = dir.path().join("db");
        let leaf = "0a5ym8j4ycmssbbmrcd1iv3lz8mfghb6";
        let top = "1x5vmr3a5v6aadm0zq9nd6jq2k1rkzgz";
        let text = |path: &str, refs: &str| {
            format!(
                "StorePath: /nix/store/{path}-x\nURL: nar/x.nar\nCompression: none\n\
                 NarHash: sha256:{}\nNarSize: 1\nReferences: {refs}\n",
                Sha256::digest(path.as_bytes()).to_nix32()
            )
        };
        {
            // What a format 2 build wrote: the old cache record, claims by NarHash.
            let db = sled::open(&db_dir).unwrap();
            db.insert("format_version", b"2").unwrap();
            let caches = db.open_tree("caches").unwrap();
            caches
                .insert(
                    "main",
                    br#"{"name":"main","public":true,"priority":40,"secret_key_file":"/k"}"#
                        .to_vec(),
                )
                .unwrap();
            let narinfos = db.open_tree("narinfos").unwrap();
            for (path, refs) in [
                (leaf, format!("{leaf}-x")),
                (top, format!("{leaf}-x {top}-x")),
            ] {
                let hash: StorePathHash = path.parse().unwrap();
                let record = NarInfoRecord {
                    nar_hash: Sha256::digest(path.as_bytes()),
                    nar_size: 1,
                    file_size: 1,
                    text: text(path, &refs).into(),
                };
                narinfos
                    .insert(
                        scoped(&cache(), hash.as_bytes()),
                        codec::encode_narinfo(&record),
                    )
                    .unwrap();
                let old_claim = scoped(&cache(), record.nar_hash.as_bytes());
                db.open_tree("cache_nars")
                    .unwrap()
                    .insert(old_claim, &[])
                    .unwrap();
            }
            db.flush().unwrap();
        }
        let index = reopen(&db_dir).unwrap();
        let caches = index.caches().await.unwrap();
        assert_eq!(caches.len(), 1);
        assert_eq!(caches[0].keys.len(), 1);
        assert_eq!(
            caches[0].keys[0].secret_key_file.as_deref(),
            Some(Path::new("/k"))
        );
        assert!(caches[0].keep_client_signatures);
        let (leaf, top): (StorePathHash, StorePathHash) =
            (leaf.parse().unwrap(), top.parse().unwrap());
        assert_eq!(index.referrers(&cache(), &leaf).await.unwrap(), vec![top]);
        assert!(
            index.referrers(&cache(), &top).await.unwrap().is_empty(),
            "a self-reference is none"
        );
        let nar = Sha256::digest(leaf.to_string().as_bytes());
        assert!(index.cache_has_nar(&cache(), &nar).await.unwrap());
        let refs = [leaf];
        assert!(index.delete_narinfo(&cache(), &top, &refs).await.unwrap());
        assert!(index.delete_narinfo(&cache(), &leaf, &[]).await.unwrap());
        assert!(
            !index.cache_has_nar(&cache(), &nar).await.unwrap(),
            "the old claims are gone"
        );
        drop(index);
        // Opened again, it is format 3 and stays as it is.
        let again = reopen(&db_dir).unwrap();
        assert!(again.narinfos(&cache(), None, 10).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn an_upload_recorded_in_an_older_layout_is_removed_and_uncounted() {
        let dir = tempfile::tempdir().unwrap();
        let index = SledIndex::open(&dir.path().join("db"), 1 << 20).unwrap();
        let url = NarUrl {
            hash: Sha256::digest(b"f"),
            compression: crate::nix::Compression::Xz,
        };
        let upload = Upload {
            nar_hash: Sha256::digest(b"n"),
            file_hash: url.hash,
            nar_size: 1,
            file_size: 2,
            created: 3,
            stored_size: 0,
            claimed: false,
        };
        // What format 3 wrote: 88 bytes, no stored size, no claim.
        let old = &codec::encode_upload(&upload)[..88];
        index.damage(
            "uploads",
            &scoped(&cache(), url.to_string().as_bytes()),
            old,
        );
        let read = index.upload(&cache(), &url).await.unwrap().unwrap();
        assert_eq!(read, upload);
        assert!(index.delete_upload_if(&cache(), &url, &read).await.unwrap());
        assert_eq!(index.upload(&cache(), &url).await.unwrap(), None);
        assert_eq!(index.cache_stats(&cache()).await.unwrap().pending_bytes, 0);
    }

    #[tokio::test]
    async fn a_format_3_database_is_format_4_once_opened() {
        let dir = tempfile::tempdir().unwrap();
        let db_dir = dir.path().join("db");
        {
            let db = sled::open(&db_dir).unwrap();
            db.insert("format_version", b"3").unwrap();
            db.flush().unwrap();
        }
        let index = reopen(&db_dir).unwrap();
        assert_eq!(
            index.trees.db.get("format_version").unwrap().as_deref(),
            Some(FORMAT_VERSION)
        );
    }

    #[tokio::test]
    async fn an_older_format_is_refused_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path().join("db")).unwrap();
        db.insert("format_version", b"1").unwrap();
        db.flush().unwrap();
        drop(db);
        let err = reopen(&dir.path().join("db")).err().unwrap().to_string();
        assert!(err.contains("format \"1\""), "{err}");
    }
}
