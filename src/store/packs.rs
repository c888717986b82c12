//! Pack objects in the object store, under `packs/<first two hex digits>/<hex>`
//! (the prefix keeps directories small on disk). On local disk, reads for serving go
//! around the object store (see `local_read`).

use std::io;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt as _, PutPayload};

use super::local_read;
use super::manifest::PackId;

#[derive(Clone)]
pub struct PackStore {
    objects: Arc<dyn ObjectStore>,
    /// The directory of a local store, read directly when serving.
    local_root: Option<Arc<PathBuf>>,
}

impl PackStore {
    /// Packs in any object store, read through it.
    pub fn new(objects: Arc<dyn ObjectStore>) -> Self {
        Self {
            objects,
            local_root: None,
        }
    }

    /// Packs in the directory `root`, which must exist. Writes fsync the pack and its
    /// directory before they return: a narinfo is acknowledged as durable, and so must
    /// be every pack it depends on.
    pub fn local(root: PathBuf) -> object_store::Result<Self> {
        let objects = LocalFileSystem::new_with_prefix(&root)?.with_fsync(true);
        // Reads resolve pack paths as the object store does, from the absolute root.
        let root = std::fs::canonicalize(&root).map_err(|source| object_store::Error::Generic {
            store: "local",
            source: Box::new(source),
        })?;
        Ok(Self {
            objects: Arc::new(objects),
            local_root: Some(Arc::new(root)),
        })
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

    /// Bytes `range` of a pack; fewer bytes than asked is an error.
    pub async fn get_range(&self, id: &PackId, range: Range<u64>) -> io::Result<Bytes> {
        let path = Self::path(id);
        match &self.local_root {
            Some(root) => local_read::read_range(root.join(path.as_ref()), range).await,
            None => {
                let want = range.end.saturating_sub(range.start);
                let data = self.objects.get_range(&path, range).await;
                let data = data.map_err(io::Error::other)?;
                if data.len() as u64 != want {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "pack is shorter than its records",
                    ));
                }
                Ok(data)
            }
        }
    }
}
