//! Metadata behind one trait: caches, narinfos, NARs (where the manifests of their
//! chunks and of their listings are), chunk records, pending uploads, build logs and
//! realisations, and the segments of every manifest. `SledIndex` is the embedded
//! implementation, `MemoryIndex` one for tests; both pass the same contract suite
//! (`contract`).
//!
//! Everything large (NAR contents, listings, logs) lives in the chunk store, and the
//! manifests that list their chunks are kept in segments of at most `SEGMENT_CHUNKS`
//! chunks: no record read to answer a request is large.

mod codec;
#[cfg(test)]
pub(crate) mod contract;
pub mod lookups;
mod memory;
pub(crate) mod postgres;
mod sled_index;

use bytes::Bytes;

use crate::nix::{CacheName, NarUrl, Sha256, StorePathHash};
use crate::store::{ChunkId, ChunkRef, Manifest, ManifestId, Stored};

pub use memory::MemoryIndex;
pub use postgres::{PgIndex, PgSettings};
pub use sled_index::SledIndex;

/// Why the index could not answer. It names no backend: the layers above map it to a
/// status the same way whichever database stands behind the index.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// The database cannot be reached or refuses for now (a restart, a full pool, a
    /// lost connection): clients retry (503).
    #[error("metadata database unavailable: {0}")]
    Unavailable(String),
    /// The database's disk is full (507).
    #[error("metadata database: no space left: {0}")]
    DiskFull(String),
    /// The database failed in a way a retry does not mend (I/O, its own invariants).
    #[error("metadata database: {0}")]
    Failed(String),
    /// A stored record does not decode: the data on disk is damaged or was written by
    /// an incompatible build.
    #[error("metadata database: corrupt {record} record under key {key}")]
    Corrupt {
        /// Which kind of record.
        record: &'static str,
        /// The key it was found under, printable.
        key: String,
    },
}

impl IndexError {
    /// A `Corrupt` error for the record of `kind` stored under the raw `key`.
    pub fn corrupt(record: &'static str, key: &[u8]) -> Self {
        Self::Corrupt {
            record,
            key: String::from_utf8_lossy(key)
                .chars()
                .map(|c| if c.is_control() { '?' } else { c })
                .collect(),
        }
    }

    /// A `Corrupt` error for the narinfo of `path` in `cache`.
    pub fn corrupt_narinfo(cache: &CacheName, path: &StorePathHash) -> Self {
        Self::Corrupt {
            record: "narinfo",
            key: format!("{cache}/{path}"),
        }
    }

    /// The error of an I/O failure under the database: a full disk, or a failure.
    pub fn io(e: &std::io::Error) -> Self {
        if crate::store::is_disk_full(e) {
            Self::DiskFull(e.to_string())
        } else {
            Self::Failed(e.to_string())
        }
    }

    /// Whether the database failed because its disk is full.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, Self::DiskFull(_))
    }

    /// Whether the database is unavailable for now (a retry may succeed).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

/// What index operations return.
pub type Result<T> = std::result::Result<T, IndexError>;

/// What a cache is.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CacheRecord {
    /// The cache's name, the first segment of its URLs.
    pub name: CacheName,
    /// Whether anyone may pull from it without a token.
    pub public: bool,
    /// The `Priority` its `nix-cache-info` announces (lower wins).
    pub priority: u32,
    /// Its signing keys, oldest first.
    pub keys: Vec<KeyRecord>,
    /// Whether the signatures clients send in their narinfos are served too.
    #[serde(default = "yes")]
    pub keep_client_signatures: bool,
    /// How long and how much it keeps (read by the garbage collector).
    #[serde(default)]
    pub retention: Retention,
    /// The most stored bytes it may hold (`None`: the server's default, if any).
    #[serde(default)]
    pub quota_bytes: Option<u64>,
    /// When it was created, in seconds since the epoch.
    #[serde(default)]
    pub created: u64,
}

fn yes() -> bool {
    true
}

/// One of a cache's signing keys.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeyRecord {
    /// The key's name, the part of its signatures before the colon.
    pub name: String,
    /// Its public half, as `trusted-public-keys` takes it.
    pub public_key: String,
    /// Where the secret key lives (a file of mode 0600); none once the key is retired
    /// and its file removed.
    pub secret_key_file: Option<std::path::PathBuf>,
    /// The secret key sealed under the key encryption file (`keyseal`), when the
    /// server keeps keys in the index instead of in files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_secret_key: Option<String>,
    /// Whether it signs what the cache serves. Several keys sign while a rotation is
    /// under way; a retired key signs nothing.
    pub signing: bool,
    /// When it was added, in seconds since the epoch.
    #[serde(default)]
    pub created: u64,
}

/// What a cache keeps; `None` keeps without that limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Retention {
    /// Paths not fetched for this many seconds may go.
    pub max_age_secs: Option<u64>,
    /// The least recently fetched paths go when the cache holds more than this.
    pub max_size_bytes: Option<u64>,
}

/// A token, as recorded: never its secret, only the secret's hash.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TokenRecord {
    /// Its name, unique among tokens.
    pub name: String,
    /// The SHA-256 of its secret, under which it is looked up.
    pub hash: Sha256,
    /// What it may do.
    pub grants: crate::grants::Grants,
    /// When it was made, in seconds since the epoch.
    pub created: u64,
    /// When it stops working, if ever.
    pub expires: Option<u64>,
    /// When it was last used, to about a minute.
    pub last_used: Option<u64>,
    /// When it was revoked, if it was.
    pub revoked: Option<u64>,
}

/// Counts kept per cache as narinfos are committed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Store paths the cache serves.
    pub paths: u64,
    /// The sum of their NarSize.
    pub nar_bytes: u64,
    /// The sum of their served `.nar.zst` sizes (their stored frames, before the
    /// sharing of chunks between NARs).
    pub stored_bytes: u64,
    /// The stored sizes of the NARs uploaded to the cache that no narinfo has taken
    /// up yet (`Upload::stored_size` of the unclaimed uploads): with `stored_bytes`,
    /// what the cache holds against its quota.
    pub pending_bytes: u64,
    /// The stored bytes of its build logs and realisations.
    pub blob_bytes: u64,
}

impl CacheStats {
    /// What the cache holds against its quota: its paths' stored bytes, its uploads
    /// waiting for their narinfos, its logs and realisations.
    pub fn used_bytes(&self) -> u64 {
        self.stored_bytes
            .saturating_add(self.pending_bytes)
            .saturating_add(self.blob_bytes)
    }
}

/// A NAR received under a client-chosen URL, waiting for (or used by) a narinfo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Upload {
    /// The SHA-256 of the NAR the server decoded.
    pub nar_hash: Sha256,
    /// Its size.
    pub nar_size: u64,
    /// The SHA-256 of the body the client sent.
    pub file_hash: Sha256,
    /// The body's size.
    pub file_size: u64,
    /// When it was received, in seconds since the epoch (0 for uploads recorded before
    /// the time was): an upload no narinfo took up is collected after a while.
    pub created: u64,
    /// The stored bytes of the NAR's frames when it was received (0 for uploads
    /// recorded before): what it counts against the cache's quota until a narinfo
    /// takes it up.
    pub stored_size: u64,
    /// Whether a narinfo of the cache took it up. From then on it only lets a client
    /// skip sending the NAR again: it holds nothing once no narinfo claims the NAR.
    pub claimed: bool,
}

/// A stored NAR: its chunks, and the chunks of its `.ls` listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarRecord {
    /// The NAR.
    pub contents: Stored,
    /// The listing's JSON, chunked and stored like the NAR.
    pub listing: Stored,
}

/// A served narinfo and what the server needs of it without parsing the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarInfoRecord {
    /// The NarHash of the NAR it names.
    pub nar_hash: Sha256,
    /// Its NarSize.
    pub nar_size: u64,
    /// Its FileSize: the bytes of the served `.nar.zst`.
    pub file_size: u64,
    /// The narinfo as served, signed.
    pub text: Bytes,
}

/// A named pin of a cache: the paths it keeps, with their closures, newest last.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PinRecord {
    /// Its name, unique in the cache.
    pub name: String,
    /// The paths pinned under the name, oldest first; adding to a pin adds a revision.
    pub revisions: Vec<PinRevision>,
    /// How many revisions are kept (the oldest go first); all when `None`.
    pub keep_revisions: Option<u32>,
    /// How many days a revision is kept after a newer one is added; ever when `None`.
    pub keep_days: Option<u32>,
}

/// One revision of a pin.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PinRevision {
    /// The store path, in full.
    pub store_path: String,
    /// When it was pinned, in seconds since the epoch.
    pub added: u64,
}

/// What happened to a narinfo commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Commit {
    /// The narinfo is new and now served.
    Written,
    /// The path was already there; its NarHash is returned to tell a harmless repeat
    /// from a conflicting (unreproducible) rebuild.
    Exists {
        /// The NarHash of the narinfo that stays.
        nar_hash: Sha256,
    },
}

/// Per-cache files kept beside the narinfos, stored as chunks like NARs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BlobKind {
    /// `log/<drv>`: a build log.
    Log,
    /// `realisations/<id>.doi` and `build-trace-v2/<drv>/<output>.doi`.
    Realisation,
}

/// A log or realisation's place among all of them: the order of a walk through them.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct BlobKey {
    /// Which kind of file.
    pub kind: BlobKind,
    /// The cache it belongs to.
    pub cache: CacheName,
    /// Its key in the cache (`<drv>` of a log, the realisation's id).
    pub key: String,
}

/// How many records a walk through a whole table reads at a time.
pub const PAGE: usize = 1024;

/// All metadata, behind one trait so that another database can stand behind it.
///
/// The interface is async: a backend decides how its calls leave the runtime (the
/// embedded one answers point reads in place and sends writes and walks to the
/// blocking pool; a networked one awaits its queries). Walks through whole tables go a
/// page at a time (`*_after`), so that none holds a transaction or a cursor open, and
/// lookups on hot paths are batched (`chunks`).
///
/// Writes that make something visible come after the writes it depends on (chunks
/// before the NAR that names them, the NAR before its upload, the upload before a
/// narinfo); implementations must keep that order across a crash: what survives is a
/// prefix of what was written.
#[async_trait::async_trait]
pub trait Index: Send + Sync + 'static {
    /// Every cache.
    async fn caches(&self) -> Result<Vec<CacheRecord>>;
    /// Creates or replaces a cache's record.
    async fn put_cache(&self, record: &CacheRecord) -> Result<()>;
    /// Removes a cache's record, then everything recorded under its name.
    async fn delete_cache(&self, cache: &CacheName) -> Result<()>;
    /// Removes everything recorded under a cache's name but its record: what a deletion
    /// interrupted by a crash left, before the name is used again.
    async fn purge_cache(&self, cache: &CacheName) -> Result<()>;

    /// Every token, revoked ones included.
    async fn tokens(&self) -> Result<Vec<TokenRecord>>;
    /// Creates or replaces a token's record.
    async fn put_token(&self, token: &TokenRecord) -> Result<()>;
    /// The counts of a cache (zero for one with no narinfo).
    async fn cache_stats(&self, cache: &CacheName) -> Result<CacheStats>;

    /// Where each of `ids` is stored, if it is, in their order: one lookup for a batch.
    async fn chunks(&self, ids: &[ChunkId]) -> Result<Vec<Option<ChunkRef>>>;
    /// Records chunks; only after their pack is stored, so a record implies its frame.
    async fn put_chunks(&self, chunks: &[ChunkRef]) -> Result<()>;

    /// Segment `index` of the manifest `id`.
    async fn segment(&self, id: &ManifestId, index: u32) -> Result<Option<Manifest>>;
    /// Records a segment of a manifest; only after every chunk it names is recorded.
    async fn put_segment(&self, id: &ManifestId, index: u32, chunks: &Manifest) -> Result<()>;

    /// A stored NAR by its NarHash.
    async fn nar(&self, nar_hash: &Sha256) -> Result<Option<NarRecord>>;
    /// Records a NAR without an upload: only to copy an index (`migrate`), whose NARs
    /// may have outlived their uploads. Only after its manifests' segments are recorded.
    async fn put_nar(&self, nar_hash: &Sha256, nar: &NarRecord) -> Result<()>;

    /// The upload a client made to `cache` under `url`.
    async fn upload(&self, cache: &CacheName, url: &NarUrl) -> Result<Option<Upload>>;
    /// Records an upload and its NAR (under `upload.nar_hash`) together, only after the
    /// segments of the NAR's manifests are recorded. Together, so that the garbage
    /// collector never sees a NAR that an upload is about to name without the upload.
    /// An unclaimed upload counts in the cache's `pending_bytes` (one it replaces
    /// stops counting).
    async fn put_upload(
        &self,
        cache: &CacheName,
        url: &NarUrl,
        upload: &Upload,
        nar: &NarRecord,
    ) -> Result<()>;

    /// The narinfo `cache` serves for `path`.
    async fn narinfo(
        &self,
        cache: &CacheName,
        path: &StorePathHash,
    ) -> Result<Option<NarInfoRecord>>;
    /// The commit point of an upload: makes the narinfo, the cache's claim on its NAR
    /// and the path's references visible together, and counts it in the cache's stats,
    /// unless the path is already there. In the same step the upload under `upload`,
    /// if it is unclaimed and of the NAR the path now has, becomes claimed and stops
    /// counting as pending.
    async fn commit_narinfo(
        &self,
        cache: &CacheName,
        path: &StorePathHash,
        record: &NarInfoRecord,
        references: &[StorePathHash],
        upload: Option<&NarUrl>,
    ) -> Result<Commit>;
    /// The paths of `cache` whose narinfos name `path` among their references.
    async fn referrers(
        &self,
        cache: &CacheName,
        path: &StorePathHash,
    ) -> Result<Vec<StorePathHash>>;
    /// Up to `limit` narinfos of `cache` in the order of their hashes, from after
    /// `after`: a walk through all of them a page at a time.
    async fn narinfos(
        &self,
        cache: &CacheName,
        after: Option<&StorePathHash>,
        limit: usize,
    ) -> Result<Vec<(StorePathHash, NarInfoRecord)>>;
    /// Replaces the text of a narinfo (its signatures changed, or its FileSize with
    /// `file_size` when the NAR's frames were stored anew; the NAR is the same) if it
    /// is still `expected`; false when it is not, or the path is not there (deleted, or
    /// deleted and pushed again, since it was read). The cache's stats follow.
    async fn replace_narinfo(
        &self,
        cache: &CacheName,
        path: &StorePathHash,
        expected: &[u8],
        text: &[u8],
        file_size: Option<u64>,
    ) -> Result<bool>;
    /// Removes a narinfo with the cache's claim on its NAR and its `references`, and
    /// uncounts it; false when the path is not there.
    async fn delete_narinfo(
        &self,
        cache: &CacheName,
        path: &StorePathHash,
        references: &[StorePathHash],
    ) -> Result<bool>;
    /// Whether `cache` holds a narinfo for each of `paths`, in their order: a
    /// publication's references and the path itself, in one lookup where the database
    /// is a round trip away.
    async fn holds_paths(&self, cache: &CacheName, paths: &[StorePathHash]) -> Result<Vec<bool>> {
        let mut held = Vec::with_capacity(paths.len());
        for p in paths {
            held.push(self.narinfo(cache, p).await?.is_some());
        }
        Ok(held)
    }
    /// Whether `cache` holds a narinfo whose NAR is `nar_hash`.
    async fn cache_has_nar(&self, cache: &CacheName, nar_hash: &Sha256) -> Result<bool>;
    /// The NAR `nar_hash` as `cache` serves it: its record, if the cache holds a
    /// narinfo for it (a NAR is readable through a cache only then). A database
    /// answers both in one statement, a download's first.
    async fn served_nar(&self, cache: &CacheName, nar_hash: &Sha256) -> Result<Option<NarRecord>> {
        if !self.cache_has_nar(cache, nar_hash).await? {
            return Ok(None);
        }
        self.nar(nar_hash).await
    }

    /// Where a log or realisation is stored.
    async fn blob(&self, kind: BlobKind, cache: &CacheName, key: &str) -> Result<Option<Stored>>;
    /// Records a log or realisation (counted in the cache's `blob_bytes`, instead of
    /// one it replaces); only after its segments are recorded.
    async fn put_blob(
        &self,
        kind: BlobKind,
        cache: &CacheName,
        key: &str,
        stored: &Stored,
    ) -> Result<()>;

    /// When each path of `cache` was last fetched, as far as recorded.
    async fn accesses(&self, cache: &CacheName) -> Result<Vec<(StorePathHash, u64)>>;
    /// Records when paths of `cache` were last fetched.
    async fn put_accesses(
        &self,
        cache: &CacheName,
        accesses: &[(StorePathHash, u64)],
    ) -> Result<()>;
    /// The paths of `cache` whose narinfos name the NAR `nar_hash`.
    async fn paths_of_nar(
        &self,
        cache: &CacheName,
        nar_hash: &Sha256,
    ) -> Result<Vec<StorePathHash>>;

    /// The pins of `cache`.
    async fn pins(&self, cache: &CacheName) -> Result<Vec<PinRecord>>;
    /// Creates or replaces a pin of `cache`.
    async fn put_pin(&self, cache: &CacheName, pin: &PinRecord) -> Result<()>;
    /// Removes a pin; false when there is none of that name.
    async fn delete_pin(&self, cache: &CacheName, name: &str) -> Result<bool>;

    /// Up to `limit` NAR records in the order of their hashes, from after `after`.
    async fn nars_after(
        &self,
        after: Option<&Sha256>,
        limit: usize,
    ) -> Result<Vec<(Sha256, NarRecord)>>;
    /// Replaces a NAR record (its frames were stored anew) if it is still `expected`.
    async fn replace_nar(
        &self,
        nar_hash: &Sha256,
        expected: &NarRecord,
        new: &NarRecord,
    ) -> Result<bool>;
    /// Replaces where a log or realisation is stored if it is still `expected`.
    async fn replace_blob(&self, key: &BlobKey, expected: &Stored, new: &Stored) -> Result<bool>;
    /// Removes a NAR record if it is still `expected` (an upload of the same NAR since
    /// it was read writes a new one); false when it is not.
    async fn delete_nar_if(&self, nar_hash: &Sha256, expected: &NarRecord) -> Result<bool>;
    /// Up to `limit` uploads of every cache in the order of cache and URL, from after
    /// `after`.
    async fn uploads_after(
        &self,
        after: Option<&(CacheName, NarUrl)>,
        limit: usize,
    ) -> Result<Vec<(CacheName, NarUrl, Upload)>>;
    /// Removes an upload record if it is still `expected` (uncounting it from the
    /// cache's `pending_bytes` if unclaimed); false when it is not.
    async fn delete_upload_if(
        &self,
        cache: &CacheName,
        url: &NarUrl,
        expected: &Upload,
    ) -> Result<bool>;
    /// Up to `limit` logs and realisations of every cache in the order of `BlobKey`,
    /// from after `after`.
    async fn blobs_after(
        &self,
        after: Option<&BlobKey>,
        limit: usize,
    ) -> Result<Vec<(BlobKey, Stored)>>;
    /// Up to `limit` chunk records in the order of their ids, from after `after`.
    async fn chunks_after(&self, after: Option<&ChunkId>, limit: usize) -> Result<Vec<ChunkRef>>;
    /// Removes chunk records.
    async fn delete_chunks(&self, ids: &[ChunkId]) -> Result<()>;
    /// Up to `limit` ids of manifests that have segments, in order, from after `after`.
    async fn manifests_after(
        &self,
        after: Option<&ManifestId>,
        limit: usize,
    ) -> Result<Vec<ManifestId>>;
    /// Removes every segment of a manifest.
    async fn delete_manifest(&self, id: &ManifestId) -> Result<()>;

    /// A small record of the server's own (the last garbage collection, say).
    async fn meta(&self, key: &str) -> Result<Option<Vec<u8>>>;
    /// Writes a record of the server's own.
    async fn put_meta(&self, key: &str, value: &[u8]) -> Result<()>;

    /// Makes everything written so far durable.
    async fn flush(&self) -> Result<()>;
    /// Reads and writes a record, to prove the database usable (for `/ready`).
    async fn check(&self) -> Result<()>;
}

/// Where one chunk is stored, if it is (for tests: the server looks chunks up in
/// batches).
#[cfg(test)]
pub(crate) async fn chunk(index: &dyn Index, id: &ChunkId) -> Result<Option<ChunkRef>> {
    Ok(index
        .chunks(std::slice::from_ref(id))
        .await?
        .pop()
        .flatten())
}
