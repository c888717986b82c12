//! Chunk storage over `object_store` (local filesystem or S3) and the manifests that
//! put chunks back together into NARs.

pub mod chunks;
pub mod manifest;

pub use chunks::ChunkStore;
pub use manifest::{ChunkId, ChunkRef, Manifest};
