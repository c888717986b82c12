//! Metadata behind one trait: caches, narinfos, NAR manifests and listings, chunk
//! records, pending uploads, and small blobs (build logs, realisations).
//! `sled` is the embedded implementation.

mod sled_index;

use bytes::Bytes;

use crate::nix::{CacheName, Sha256, StorePathHash};
use crate::store::{ChunkId, ChunkRef, Manifest};

pub use sled_index::SledIndex;

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("metadata database: {0}")]
    Db(#[from] sled::Error),
    #[error("metadata database: corrupt {0} record")]
    Corrupt(&'static str),
}

pub type Result<T> = std::result::Result<T, IndexError>;

/// What a cache is, as recorded at creation.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CacheRecord {
    pub name: CacheName,
    pub public: bool,
    pub priority: u32,
    /// Where the secret signing key lives (a file of mode 0600).
    pub secret_key_file: std::path::PathBuf,
}

/// A NAR received under a client-chosen URL, waiting for (or used by) a narinfo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Upload {
    pub nar_hash: Sha256,
    pub nar_size: u64,
    pub file_hash: Sha256,
    pub file_size: u64,
}

/// What happened to a narinfo commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Commit {
    Written,
    /// The path was already there; its NarHash is returned to tell a harmless repeat
    /// from a conflicting (unreproducible) rebuild.
    Exists {
        nar_hash: Sha256,
    },
}

/// Small per-cache blobs kept beside the narinfos.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobKind {
    Log,
    Realisation,
}

pub trait Index: Send + Sync + 'static {
    fn caches(&self) -> Result<Vec<CacheRecord>>;
    fn put_cache(&self, record: &CacheRecord) -> Result<()>;

    fn chunk(&self, id: &ChunkId) -> Result<Option<ChunkRef>>;
    /// Records chunks; only after their pack is stored, so a record implies its frame.
    fn put_chunks(&self, chunks: &[ChunkRef]) -> Result<()>;

    fn manifest(&self, nar_hash: &Sha256) -> Result<Option<Manifest>>;
    fn listing(&self, nar_hash: &Sha256) -> Result<Option<Bytes>>;
    /// Records a NAR; only after every chunk it names is recorded.
    fn put_nar(&self, nar_hash: &Sha256, manifest: &Manifest, listing: &[u8]) -> Result<()>;

    fn upload(&self, cache: &CacheName, url: &str) -> Result<Option<Upload>>;
    /// Records an upload; only after its NAR is recorded.
    fn put_upload(&self, cache: &CacheName, url: &str, upload: &Upload) -> Result<()>;

    fn narinfo(&self, cache: &CacheName, path: &StorePathHash) -> Result<Option<Bytes>>;
    /// The commit point of an upload: makes the narinfo and the cache's claim on its
    /// NAR visible together, unless the path is already there.
    fn commit_narinfo(
        &self,
        cache: &CacheName,
        path: &StorePathHash,
        nar_hash: &Sha256,
        text: &[u8],
    ) -> Result<Commit>;
    /// Whether `cache` holds a narinfo whose NAR is `nar_hash`.
    fn cache_has_nar(&self, cache: &CacheName, nar_hash: &Sha256) -> Result<bool>;

    fn blob(&self, kind: BlobKind, cache: &CacheName, key: &str) -> Result<Option<Bytes>>;
    fn put_blob(&self, kind: BlobKind, cache: &CacheName, key: &str, data: &[u8]) -> Result<()>;

    /// Makes everything written so far durable.
    fn flush(&self) -> Result<()>;
}
