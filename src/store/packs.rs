//! Pack objects in the object store, under `packs/<first two hex digits>/<hex>`
//! (the prefix keeps directories small on disk).

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt as _, PutPayload};

use super::manifest::PackId;

#[derive(Clone)]
pub struct PackStore {
    objects: Arc<dyn ObjectStore>,
}

impl PackStore {
    pub fn new(objects: Arc<dyn ObjectStore>) -> Self {
        Self { objects }
    }

    fn path(id: &PackId) -> Path {
        let hex = id.to_hex();
        Path::from(format!("packs/{}/{}", &hex[..2], hex))
    }

    /// Writes a pack. object_store writes atomically (a temporary file renamed into
    /// place on local disk, one PUT on S3), so a killed process never leaves half a pack.
    pub async fn put(&self, id: &PackId, data: Bytes) -> object_store::Result<()> {
        self.objects
            .put(&Self::path(id), PutPayload::from_bytes(data))
            .await
            .map(drop)
    }

    pub async fn get_range(&self, id: &PackId, range: Range<u64>) -> object_store::Result<Bytes> {
        self.objects.get_range(&Self::path(id), range).await
    }
}
