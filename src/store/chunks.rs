//! Chunk objects in the object store, one zstd frame each, under
//! `chunks/<first two hex digits>/<hex>` (the prefix keeps directories small on disk).

use std::sync::Arc;

use bytes::Bytes;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt as _, PutPayload};

use super::manifest::ChunkId;

#[derive(Clone)]
pub struct ChunkStore {
    objects: Arc<dyn ObjectStore>,
}

impl ChunkStore {
    pub fn new(objects: Arc<dyn ObjectStore>) -> Self {
        Self { objects }
    }

    fn path(id: &ChunkId) -> Path {
        let hex = id.to_hex();
        Path::from(format!("chunks/{}/{}", &hex[..2], hex))
    }

    /// Writes a frame. object_store writes atomically (a temporary file renamed into
    /// place on local disk, one PUT on S3), so a killed process never leaves half a frame.
    pub async fn put(&self, id: &ChunkId, frame: Bytes) -> object_store::Result<()> {
        self.objects
            .put(&Self::path(id), PutPayload::from_bytes(frame))
            .await
            .map(drop)
    }

    pub async fn get(&self, id: &ChunkId) -> object_store::Result<Bytes> {
        self.objects.get(&Self::path(id)).await?.bytes().await
    }

    pub async fn get_range(
        &self,
        id: &ChunkId,
        range: std::ops::Range<u64>,
    ) -> object_store::Result<Bytes> {
        self.objects.get_range(&Self::path(id), range).await
    }
}
