//! Chunk storage over `object_store` (the local filesystem, or an S3-compatible store:
//! `s3`): zstd frames packed into pack objects, and the manifests that put them back
//! together into NARs. Local packs are read for serving directly (`local_read`), remote
//! ones through a cache of packs on local disk (`pack_cache`).

pub mod frame;
mod local_read;
pub mod manifest;
pub mod pack_cache;
pub mod packs;
mod remote_read;
pub mod s3;
pub mod space;

pub use manifest::{
    ChunkId, ChunkRef, Manifest, ManifestId, PackId, Segment, Stored, SEGMENT_CHUNKS,
};
pub use pack_cache::PackCache;
pub use packs::{PackInfo, PackStore};
pub use space::is_disk_full;
