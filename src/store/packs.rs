//! Pack objects in the object store, under `packs/<first two hex digits>/<hex>`
//! (the prefix keeps directories small on disk). On local disk, reads for serving go
//! around the object store (see `local_read`); from a remote store, through the
//! optional cache of packs on local disk (`pack_cache`).

use std::io;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt as _, PutPayload};
use prometheus_client::metrics::counter::Counter;

use super::manifest::PackId;
use super::pack_cache::PackCache;
use super::{local_read, remote_read};

/// A stored pack, as listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackInfo {
    /// Its name.
    pub id: PackId,
    /// Its size in bytes.
    pub size: u64,
    /// When it was written, in seconds since the epoch.
    pub modified: u64,
}

/// The pack objects, wherever they are stored.
#[derive(Clone)]
pub struct PackStore {
    objects: Arc<dyn ObjectStore>,
    /// The directory of a local store, read directly when serving.
    local_root: Option<Arc<PathBuf>>,
    /// Packs of a remote store kept on local disk for serving.
    cache: Option<Arc<PackCache>>,
    /// Failed reads and writes, for the metrics.
    errors: Counter,
}

impl PackStore {
    /// Packs in any object store, read through it.
    pub fn new(objects: Arc<dyn ObjectStore>, errors: Counter) -> Self {
        Self {
            objects,
            local_root: None,
            cache: None,
            errors,
        }
    }

    /// The same store, its reads for serving going through `cache`.
    pub fn with_cache(self, cache: Arc<PackCache>) -> Self {
        Self {
            cache: Some(cache),
            ..self
        }
    }

    /// Packs in the directory `root`, which must exist. Writes fsync the pack and its
    /// directory before they return: a narinfo is acknowledged as durable, and so must
    /// be every pack it depends on.
    pub fn local(root: PathBuf, errors: Counter) -> object_store::Result<Self> {
        let objects = LocalFileSystem::new_with_prefix(&root)?.with_fsync(true);
        // Reads resolve pack paths as the object store does, from the absolute root.
        let root = std::fs::canonicalize(&root).map_err(|source| object_store::Error::Generic {
            store: "local",
            source: Box::new(source),
        })?;
        Ok(Self {
            objects: Arc::new(objects),
            local_root: Some(Arc::new(root)),
            cache: None,
            errors,
        })
    }

    /// Whether the packs are on local disk (not in a remote store).
    pub fn is_local(&self) -> bool {
        self.local_root.is_some()
    }

    fn path(id: &PackId) -> Path {
        let hex = id.to_hex();
        Path::from(format!("packs/{}/{}", &hex[..2], hex))
    }

    fn count<T, E>(&self, r: Result<T, E>) -> Result<T, E> {
        if r.is_err() {
            self.errors.inc();
        }
        r
    }

    /// Writes a pack. object_store writes atomically (a temporary file renamed into
    /// place on local disk, one PUT on S3), so a killed process never leaves half a pack.
    pub async fn put(&self, id: &PackId, data: Bytes) -> object_store::Result<()> {
        let put = self
            .objects
            .put(&Self::path(id), PutPayload::from_bytes(data))
            .await;
        self.count(put).map(drop)
    }

    /// Writes a pack an upload made, which its first downloads are likely to read soon:
    /// the cache of packs of a remote store keeps a copy.
    pub async fn put_uploaded(&self, id: &PackId, data: Bytes) -> object_store::Result<()> {
        self.put(id, data.clone()).await?;
        if let Some(cache) = &self.cache {
            cache.keep(*id, data);
        }
        Ok(())
    }

    /// Bytes `range` of a pack; fewer bytes than asked is an error.
    pub async fn get_range(&self, id: &PackId, range: Range<u64>) -> io::Result<Bytes> {
        let path = Self::path(id);
        let got = match &self.local_root {
            Some(root) => local_read::read_range(root.join(path.as_ref()), range).await,
            None => match &self.cache {
                Some(cache) => cache.read(&self.objects, id, &path, range).await,
                None => remote_read::read_range(self.objects.as_ref(), &path, range).await,
            },
        };
        self.count(got)
    }

    /// Whether the pack is stored.
    pub async fn exists(&self, id: &PackId) -> object_store::Result<bool> {
        match self.objects.head(&Self::path(id)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => self.count(Err(e)),
        }
    }

    /// Every pack stored, with its size and when it was written.
    pub async fn list(&self) -> object_store::Result<Vec<PackInfo>> {
        use futures::TryStreamExt as _;
        let prefix = Path::from("packs");
        let listed: object_store::Result<Vec<_>> =
            self.objects.list(Some(&prefix)).try_collect().await;
        let listed = self.count(listed)?;
        Ok(listed
            .into_iter()
            .filter_map(|meta| {
                // Anything else under `packs/` (a temporary file of a write under way)
                // is not a pack.
                let id = PackId::from_hex(meta.location.filename()?)?;
                Some(PackInfo {
                    id,
                    size: meta.size,
                    modified: meta.last_modified.timestamp().max(0) as u64,
                })
            })
            .collect())
    }

    /// Drops a pack from the cache of packs, if there is one: another process deleted
    /// it.
    pub fn forget(&self, id: &PackId) {
        if let Some(cache) = &self.cache {
            cache.forget(id);
        }
    }

    /// Deletes a pack; one already gone is no error.
    pub async fn delete(&self, id: &PackId) -> object_store::Result<()> {
        if let Some(cache) = &self.cache {
            cache.forget(id);
        }
        match self.objects.delete(&Self::path(id)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => self.count(Err(e)),
        }
    }

    /// Proves the storage usable: a local root must still be a directory (a storage
    /// mount gone missing must not be silently recreated empty), and a small object
    /// can be written, read back and deleted. Each probe has its own name, so probes
    /// at once do not delete each other's. The probe is a task of its own: a caller
    /// that stops waiting (the readiness timeout) does not leave its object behind.
    pub async fn check(&self) -> object_store::Result<()> {
        let this = self.clone();
        let checked = match tokio::spawn(async move { this.probe().await }).await {
            Ok(r) => r,
            Err(e) => Err(object_store::Error::Generic {
                store: "probe",
                source: Box::new(e),
            }),
        };
        self.count(checked)
    }

    async fn probe(&self) -> object_store::Result<()> {
        if let Some(root) = &self.local_root {
            let meta = std::fs::metadata(root.as_path()).map_err(|source| {
                object_store::Error::Generic {
                    store: "local",
                    source: Box::new(source),
                }
            })?;
            if !meta.is_dir() {
                return Err(object_store::Error::Generic {
                    store: "local",
                    source: format!("{} is not a directory", root.display()).into(),
                });
            }
        }
        let path = Path::from(format!("ready-probe-{}", PackId::random().to_hex()));
        self.objects
            .put(&path, PutPayload::from_static(b"ready"))
            .await?;
        let read = async { self.objects.get(&path).await?.bytes().await }.await;
        // Deleted whether or not it read back.
        let deleted = self.objects.delete(&path).await;
        read?;
        deleted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn check_fails_when_the_root_is_replaced_and_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        std::fs::create_dir(&root).unwrap();
        let errors = Counter::default();
        let store = PackStore::local(root.clone(), errors.clone()).unwrap();
        store.check().await.unwrap();
        let id = PackId::random();
        store.put(&id, Bytes::from_static(b"frames")).await.unwrap();
        assert_eq!(&store.get_range(&id, 1..4).await.unwrap()[..], b"ram");
        std::fs::rename(&root, dir.path().join("moved")).unwrap();
        std::fs::write(&root, b"not a directory").unwrap();
        assert!(store.check().await.is_err());
        assert!(store.get_range(&id, 0..1).await.is_err());
        assert_eq!(errors.get(), 2);
        std::fs::remove_file(&root).unwrap();
        std::fs::rename(dir.path().join("moved"), &root).unwrap();
        store.check().await.unwrap();
    }
}
