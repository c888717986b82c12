//! Quotas: a cache may hold at most so many stored bytes (`--max-size`, or the
//! server's `quota.max_size_bytes` for caches that set none), so that one tenant
//! cannot take the disk from the others. What a cache holds is its paths' stored
//! bytes, its uploads waiting for a narinfo and its logs and realisations
//! (`CacheStats::used_bytes`, kept by the index), plus what its uploads in progress
//! have stored so far, counted here as they stream. An upload is checked when it is admitted and after every batch of chunks,
//! and stops with 507 as soon as it would take the cache past its quota, before
//! anything of it is visible.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::index::{Index, IndexError};
use crate::nix::CacheName;

/// A cache would go past its quota.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "cache {cache} is at its quota: it holds {used} of its {quota} bytes (max-size), and \
     this would take it past that; delete paths, or raise it with `cache-admin cache \
     update {cache} --max-size SIZE`"
)]
pub struct QuotaExceeded {
    /// The cache.
    pub cache: CacheName,
    /// What it holds, with what was being added.
    pub used: u64,
    /// Its quota.
    pub quota: u64,
}

/// What the uploads in progress have stored so far, per cache.
#[derive(Default)]
pub struct InFlight {
    bytes: Mutex<HashMap<CacheName, u64>>,
}

/// An upload's count against its cache's quota; what it counted goes when it drops,
/// which its request does once the upload's record counts it (or it failed).
pub struct Charge {
    in_flight: Arc<InFlight>,
    index: Arc<dyn Index>,
    cache: CacheName,
    quota: u64,
    counted: u64,
}

impl InFlight {
    /// Admits an upload to `cache`, whose quota is `quota`, if the cache is not at it
    /// already; `None` without a quota.
    pub async fn admit(
        self: &Arc<Self>,
        index: &Arc<dyn Index>,
        cache: &CacheName,
        quota: Option<u64>,
    ) -> Result<Option<Charge>, ChargeError> {
        let Some(quota) = quota else {
            return Ok(None);
        };
        let mut charge = Charge {
            in_flight: self.clone(),
            index: index.clone(),
            cache: cache.clone(),
            quota,
            counted: 0,
        };
        // Nothing of it yet: refused only if the cache is full already.
        charge.add(0).await?;
        Ok(Some(charge))
    }

    #[cfg(test)]
    fn of(&self, cache: &CacheName) -> u64 {
        let bytes = self.bytes.lock().expect("never poisoned");
        bytes.get(cache).copied().unwrap_or(0)
    }
}

/// Why an upload could not be charged.
#[derive(Debug, thiserror::Error)]
pub enum ChargeError {
    /// Over the quota.
    #[error(transparent)]
    Exceeded(#[from] QuotaExceeded),
    /// The cache's counts could not be read.
    #[error(transparent)]
    Index(#[from] IndexError),
}

impl Charge {
    /// Counts `bytes` more of the upload, unless that takes its cache past its quota
    /// (at admission, `bytes` is 0 and a cache at its quota refuses). The check and
    /// the count are one step: uploads at once cannot all pass on the same room. (The
    /// stored bytes are read just before: a record written meanwhile only counts its
    /// bytes twice until its upload's charge drops.)
    pub async fn add(&mut self, bytes: u64) -> Result<(), ChargeError> {
        let stored = self.index.cache_stats(&self.cache).await?.used_bytes();
        let mut all = self.in_flight.bytes.lock().expect("never poisoned");
        let in_flight = all.get(&self.cache).copied().unwrap_or(0);
        let used = stored + in_flight + bytes;
        let over = if bytes == 0 {
            used >= self.quota
        } else {
            used > self.quota
        };
        if over {
            return Err(QuotaExceeded {
                cache: self.cache.clone(),
                used,
                quota: self.quota,
            }
            .into());
        }
        *all.entry(self.cache.clone()).or_default() += bytes;
        self.counted += bytes;
        Ok(())
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        let mut all = self.in_flight.bytes.lock().expect("never poisoned");
        if let Some(n) = all.get_mut(&self.cache) {
            *n -= self.counted;
            if *n == 0 {
                all.remove(&self.cache);
            }
        }
    }
}

/// Whether a narinfo that adds `adds` stored bytes to `cache` (its NAR's frames, less
/// those of the upload it takes up) fits its quota.
pub async fn check_publish(
    index: &dyn Index,
    cache: &CacheName,
    quota: Option<u64>,
    adds: u64,
) -> Result<(), ChargeError> {
    let Some(quota) = quota else { return Ok(()) };
    if adds == 0 {
        return Ok(());
    }
    let used = index.cache_stats(cache).await?.used_bytes() + adds;
    if used > quota {
        return Err(QuotaExceeded {
            cache: cache.clone(),
            used,
            quota,
        }
        .into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{MemoryIndex, NarRecord, Upload};
    use crate::nix::{Compression, NarUrl, Sha256};
    use crate::store::{ManifestId, Stored};

    #[tokio::test]
    async fn uploads_are_charged_as_they_stream_and_uncharged_when_done() {
        let index: Arc<dyn Index> = Arc::new(MemoryIndex::new());
        let main: CacheName = "main".parse().unwrap();
        let in_flight = Arc::new(InFlight::default());
        assert!(in_flight
            .admit(&index, &main, None)
            .await
            .unwrap()
            .is_none());
        let mut a = in_flight
            .admit(&index, &main, Some(100))
            .await
            .unwrap()
            .unwrap();
        let mut b = in_flight
            .admit(&index, &main, Some(100))
            .await
            .unwrap()
            .unwrap();
        a.add(60).await.unwrap();
        // Together they would pass it.
        let err = b.add(50).await.unwrap_err();
        assert!(
            matches!(
                err,
                ChargeError::Exceeded(QuotaExceeded {
                    used: 110,
                    quota: 100,
                    ..
                })
            ),
            "{err}"
        );
        assert!(err.to_string().contains("cache main"), "{err}");
        b.add(40).await.unwrap();
        assert!(
            in_flight.admit(&index, &main, Some(100)).await.is_err(),
            "full"
        );
        drop(a);
        drop(b);
        assert_eq!(in_flight.of(&main), 0);
        // What the index counts counts too: an upload waiting for its narinfo.
        let upload = Upload {
            nar_hash: Sha256::digest(b"n"),
            file_hash: Sha256::digest(b"f"),
            nar_size: 1,
            file_size: 1,
            created: 0,
            stored_size: 90,
            claimed: false,
        };
        let stored = Stored {
            id: ManifestId::random(),
            segments: Vec::new(),
        };
        let nar = NarRecord {
            contents: stored.clone(),
            listing: stored,
        };
        let url = NarUrl {
            hash: upload.file_hash,
            compression: Compression::None,
        };
        index.put_upload(&main, &url, &upload, &nar).await.unwrap();
        let mut c = in_flight
            .admit(&index, &main, Some(100))
            .await
            .unwrap()
            .unwrap();
        assert!(c.add(11).await.is_err());
        assert!(check_publish(index.as_ref(), &main, Some(100), 11)
            .await
            .is_err());
        check_publish(index.as_ref(), &main, Some(100), 0)
            .await
            .unwrap();
    }
}
