//! Chunk storage over `object_store` (local filesystem or S3): zstd frames packed into
//! pack objects, and the manifests that put them back together into NARs.

pub mod frame;
mod local_read;
pub mod manifest;
pub mod packs;

pub use manifest::{ChunkId, ChunkRef, Manifest, PackId};
pub use packs::PackStore;
