//! The embedded `Index`: one sled database in the data directory.
//!
//! sled's log is replayed as a prefix after a crash, so the order of writes is the
//! order of what can survive: a record written after another never outlives it.

use std::path::Path;

use bytes::Bytes;
use sled::Transactional as _;

use super::{BlobKind, CacheRecord, Commit, Index, IndexError, Result, Upload};
use crate::nix::{CacheName, Sha256, StorePathHash};
use crate::store::{ChunkId, ChunkRef, Manifest};

/// The metadata layout; bumped on any incompatible change.
const FORMAT_VERSION: &[u8] = b"1";

pub struct SledIndex {
    db: sled::Db,
    caches: sled::Tree,
    chunks: sled::Tree,
    nars: sled::Tree,
    listings: sled::Tree,
    uploads: sled::Tree,
    narinfos: sled::Tree,
    cache_nars: sled::Tree,
    logs: sled::Tree,
    realisations: sled::Tree,
}

/// `<cache>\0<key>`: cache names never contain NUL, so prefixes never collide.
fn scoped(cache: &CacheName, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(cache.as_str().len() + 1 + key.len());
    k.extend_from_slice(cache.as_str().as_bytes());
    k.push(0);
    k.extend_from_slice(key);
    k
}

fn to_bytes(v: sled::IVec) -> Bytes {
    Bytes::copy_from_slice(&v)
}

impl SledIndex {
    pub fn open(dir: &Path, cache_bytes: u64) -> anyhow::Result<Self> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .open()?;
        match db.get("format_version")? {
            None => {
                db.insert("format_version", FORMAT_VERSION)?;
            }
            Some(v) if v.as_ref() == FORMAT_VERSION => {}
            Some(v) => anyhow::bail!(
                "metadata in {} has format {:?}; this build reads {:?}",
                dir.display(),
                String::from_utf8_lossy(&v),
                String::from_utf8_lossy(FORMAT_VERSION)
            ),
        }
        Ok(Self {
            caches: db.open_tree("caches")?,
            chunks: db.open_tree("chunks")?,
            nars: db.open_tree("nars")?,
            listings: db.open_tree("listings")?,
            uploads: db.open_tree("uploads")?,
            narinfos: db.open_tree("narinfos")?,
            cache_nars: db.open_tree("cache_nars")?,
            logs: db.open_tree("logs")?,
            realisations: db.open_tree("realisations")?,
            db,
        })
    }

    fn blob_tree(&self, kind: BlobKind) -> &sled::Tree {
        match kind {
            BlobKind::Log => &self.logs,
            BlobKind::Realisation => &self.realisations,
        }
    }
}

fn encode_upload(u: &Upload) -> [u8; 80] {
    let mut out = [0u8; 80];
    out[..32].copy_from_slice(u.nar_hash.as_bytes());
    out[32..64].copy_from_slice(u.file_hash.as_bytes());
    out[64..72].copy_from_slice(&u.nar_size.to_le_bytes());
    out[72..].copy_from_slice(&u.file_size.to_le_bytes());
    out
}

fn decode_upload(b: &[u8]) -> Option<Upload> {
    let b: &[u8; 80] = b.try_into().ok()?;
    Some(Upload {
        nar_hash: Sha256::from_bytes(b[..32].try_into().ok()?),
        file_hash: Sha256::from_bytes(b[32..64].try_into().ok()?),
        nar_size: u64::from_le_bytes(b[64..72].try_into().ok()?),
        file_size: u64::from_le_bytes(b[72..].try_into().ok()?),
    })
}

impl Index for SledIndex {
    fn caches(&self) -> Result<Vec<CacheRecord>> {
        self.caches
            .iter()
            .values()
            .map(|v| serde_json::from_slice(&v?).map_err(|_| IndexError::Corrupt("cache")))
            .collect()
    }

    fn put_cache(&self, record: &CacheRecord) -> Result<()> {
        let value = serde_json::to_vec(record).expect("a cache record always serialises");
        self.caches.insert(record.name.as_str(), value)?;
        Ok(())
    }

    fn chunk(&self, id: &ChunkId) -> Result<Option<ChunkRef>> {
        self.chunks
            .get(id.0)?
            .map(|v| ChunkRef::decode_location(*id, &v).ok_or(IndexError::Corrupt("chunk")))
            .transpose()
    }

    fn put_chunks(&self, chunks: &[ChunkRef]) -> Result<()> {
        let mut batch = sled::Batch::default();
        for c in chunks {
            batch.insert(&c.id.0, &c.encode_location());
        }
        self.chunks.apply_batch(batch)?;
        Ok(())
    }

    fn manifest(&self, nar_hash: &Sha256) -> Result<Option<Manifest>> {
        self.nars
            .get(nar_hash.as_bytes())?
            .map(|v| Manifest::decode(&v).ok_or(IndexError::Corrupt("manifest")))
            .transpose()
    }

    fn listing(&self, nar_hash: &Sha256) -> Result<Option<Bytes>> {
        Ok(self.listings.get(nar_hash.as_bytes())?.map(to_bytes))
    }

    fn put_nar(&self, nar_hash: &Sha256, manifest: &Manifest, listing: &[u8]) -> Result<()> {
        // The listing first: a manifest (what makes the NAR count as stored) is only
        // ever seen with its listing beside it.
        self.listings.insert(nar_hash.as_bytes(), listing)?;
        self.nars.insert(nar_hash.as_bytes(), manifest.encode())?;
        Ok(())
    }

    fn upload(&self, cache: &CacheName, url: &str) -> Result<Option<Upload>> {
        self.uploads
            .get(scoped(cache, url.as_bytes()))?
            .map(|v| decode_upload(&v).ok_or(IndexError::Corrupt("upload")))
            .transpose()
    }

    fn put_upload(&self, cache: &CacheName, url: &str, upload: &Upload) -> Result<()> {
        self.uploads.insert(
            scoped(cache, url.as_bytes()),
            encode_upload(upload).as_slice(),
        )?;
        Ok(())
    }

    fn narinfo(&self, cache: &CacheName, path: &StorePathHash) -> Result<Option<Bytes>> {
        Ok(self
            .narinfos
            .get(scoped(cache, path.as_bytes()))?
            .map(|v| to_bytes(v).slice(32..)))
    }

    fn commit_narinfo(
        &self,
        cache: &CacheName,
        path: &StorePathHash,
        nar_hash: &Sha256,
        text: &[u8],
    ) -> Result<Commit> {
        // A narinfo record is the NarHash followed by the served text, so conflicts
        // are told apart without parsing.
        let key = scoped(cache, path.as_bytes());
        let mut value = Vec::with_capacity(32 + text.len());
        value.extend_from_slice(nar_hash.as_bytes());
        value.extend_from_slice(text);
        let mut claim = scoped(cache, nar_hash.as_bytes());
        claim.extend_from_slice(path.as_bytes());

        let outcome = (&self.narinfos, &self.cache_nars).transaction(|(narinfos, cache_nars)| {
            if let Some(existing) = narinfos.get(&key)? {
                let hash: [u8; 32] = existing[..32]
                    .try_into()
                    .expect("records start with 32 bytes");
                return Ok(Commit::Exists {
                    nar_hash: Sha256::from_bytes(hash),
                });
            }
            narinfos.insert(key.as_slice(), value.as_slice())?;
            cache_nars.insert(claim.as_slice(), &[])?;
            Ok(Commit::Written)
        });
        outcome.map_err(|e| match e {
            sled::transaction::TransactionError::Storage(e) => IndexError::Db(e),
            sled::transaction::TransactionError::Abort(()) => {
                unreachable!("the commit transaction never aborts")
            }
        })
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

    fn blob(&self, kind: BlobKind, cache: &CacheName, key: &str) -> Result<Option<Bytes>> {
        Ok(self
            .blob_tree(kind)
            .get(scoped(cache, key.as_bytes()))?
            .map(to_bytes))
    }

    fn put_blob(&self, kind: BlobKind, cache: &CacheName, key: &str, data: &[u8]) -> Result<()> {
        self.blob_tree(kind)
            .insert(scoped(cache, key.as_bytes()), data)?;
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::PackId;

    fn open() -> (tempfile::TempDir, SledIndex) {
        let dir = tempfile::tempdir().unwrap();
        let index = SledIndex::open(&dir.path().join("db"), 1 << 20).unwrap();
        (dir, index)
    }

    #[test]
    fn commit_is_first_writer_wins() {
        let (_dir, index) = open();
        let cache: CacheName = "main".parse().unwrap();
        let path: StorePathHash = "7h7qgvs4kgzsn8a6rb273saxyqh4jxlz".parse().unwrap();
        let a = Sha256::digest(b"a");
        let b = Sha256::digest(b"b");
        assert_eq!(
            index.commit_narinfo(&cache, &path, &a, b"one").unwrap(),
            Commit::Written
        );
        assert_eq!(
            index.commit_narinfo(&cache, &path, &b, b"two").unwrap(),
            Commit::Exists { nar_hash: a }
        );
        assert_eq!(index.narinfo(&cache, &path).unwrap().unwrap(), &b"one"[..]);
        assert!(index.cache_has_nar(&cache, &a).unwrap());
        assert!(!index.cache_has_nar(&cache, &b).unwrap());
        let other: CacheName = "other".parse().unwrap();
        assert!(!index.cache_has_nar(&other, &a).unwrap());
        assert!(index.narinfo(&other, &path).unwrap().is_none());
    }

    #[test]
    fn records_round_trip() {
        let (_dir, index) = open();
        let cache: CacheName = "main".parse().unwrap();
        let up = Upload {
            nar_hash: Sha256::digest(b"n"),
            nar_size: 9,
            file_hash: Sha256::digest(b"f"),
            file_size: 3,
        };
        index.put_upload(&cache, "nar/x.nar.xz", &up).unwrap();
        assert_eq!(index.upload(&cache, "nar/x.nar.xz").unwrap(), Some(up));
        assert_eq!(index.upload(&cache, "nar/y.nar.xz").unwrap(), None);
        let c = ChunkRef {
            id: ChunkId::of(b"c"),
            pack: PackId::random(),
            offset: 4,
            stored_len: 5,
            len: 6,
        };
        index.put_chunks(&[c]).unwrap();
        assert_eq!(index.chunk(&c.id).unwrap(), Some(c));
    }
}
