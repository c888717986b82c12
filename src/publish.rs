//! Publishing a narinfo: the commit point of an upload. Every claim the client makes is
//! checked against what the server itself computed from the NAR it received, the
//! closure is kept whole, and the server signs what it serves. It needs only the index
//! and the cache, so it is tested without a server.

use std::sync::Arc;

use crate::caches::Cache;
use crate::error::{Rejection, Result};
use crate::index::{Commit, Index, NarInfoRecord, Upload};
use crate::nix::{CacheName, Compression, NarInfo, NarUrl, StorePath, StorePathHash};

fn mismatch(field: &'static str, claimed: impl ToString, actual: impl ToString) -> Rejection {
    Rejection::Mismatch {
        field,
        claimed: claimed.to_string(),
        actual: actual.to_string(),
    }
}

/// What a publication did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Published {
    /// The narinfo is new.
    New,
    /// The same path with the same NarHash was there already: nothing changed.
    Repeat,
    /// The path was there with another NarHash (an unreproducible build); the first
    /// stays.
    Conflict {
        /// The NarHash kept.
        kept: crate::nix::Sha256,
    },
}

/// The NAR a client's narinfo URL names in this cache: one uploaded under that URL, or
/// one the cache already serves uncompressed there. The latter happens with
/// `compression=none`, where Nix names the file by its NarHash: after another runner
/// published the same NAR, `HEAD` finds it served and the client skips the upload.
pub async fn resolve_nar_url(
    index: &dyn Index,
    cache: &CacheName,
    url: &NarUrl,
) -> Result<Option<Upload>> {
    if let Some(upload) = index.upload(cache, url).await? {
        return Ok(Some(upload));
    }
    if url.compression != Compression::None || !index.cache_has_nar(cache, &url.hash).await? {
        return Ok(None);
    }
    // Nothing of it waits for a narinfo: the cache serves it already.
    Ok(index.nar(&url.hash).await?.map(|nar| Upload {
        nar_hash: url.hash,
        nar_size: nar.contents.size(),
        file_hash: url.hash,
        file_size: nar.contents.size(),
        created: 0,
        stored_size: 0,
        claimed: true,
    }))
}

/// Checks the narinfo `body` a client pushed for `hash` to `cache`, signs it and makes
/// it visible, durably, within the cache's `quota`.
pub async fn publish(
    index: &Arc<dyn Index>,
    cache: &Cache,
    hash: StorePathHash,
    body: &[u8],
    quota: Option<u64>,
) -> Result<Published> {
    let claimed = NarInfo::parse(body)?;
    if claimed.store_path.hash() != hash {
        return Err(Rejection::StorePathMismatch {
            store_path: claimed.store_path,
        }
        .into());
    }
    let unknown = || Rejection::UnknownNarUrl(claimed.url.clone());
    let url: NarUrl = claimed.url.parse().map_err(|_| unknown())?;
    let upload = resolve_nar_url(index.as_ref(), &cache.name, &url)
        .await?
        .ok_or_else(unknown)?;
    if claimed.nar_hash != upload.nar_hash {
        return Err(mismatch("NarHash", claimed.nar_hash, upload.nar_hash).into());
    }
    if claimed.nar_size != upload.nar_size {
        return Err(mismatch("NarSize", claimed.nar_size, upload.nar_size).into());
    }
    if let Some(h) = claimed.file_hash.filter(|h| *h != upload.file_hash) {
        return Err(mismatch("FileHash", h, upload.file_hash).into());
    }
    if let Some(s) = claimed.file_size.filter(|s| *s != upload.file_size) {
        return Err(mismatch("FileSize", s, upload.file_size).into());
    }
    // Its references and the path itself, in one lookup.
    let foreign: Vec<&StorePath> = claimed.foreign_references().collect();
    let asked: Vec<StorePathHash> = foreign
        .iter()
        .map(|r| r.hash())
        .chain(std::iter::once(hash))
        .collect();
    let held = index.holds_paths(&cache.name, &asked).await?;
    if let Some((r, _)) = foreign.iter().zip(&held).find(|(_, held)| !**held) {
        return Err(Rejection::MissingReference(r.full()).into());
    }
    let already_there = held.last().copied().unwrap_or(false);
    // An upload record without its NAR (one a collection of an earlier build could not
    // remove) names nothing: the client sends the NAR again.
    let nar = index.nar(&upload.nar_hash).await?.ok_or_else(unknown)?;

    let file_size = nar.contents.stored_size();
    // Taking up its own upload moves that upload's bytes from pending to stored; a
    // narinfo for a NAR held already adds its frames; a repeat adds nothing.
    let taken_up = if upload.claimed {
        0
    } else {
        upload.stored_size
    };
    let adds = if already_there {
        0
    } else {
        file_size.saturating_sub(taken_up)
    };
    crate::quota::check_publish(index.as_ref(), &cache.name, quota, adds).await?;
    let mut served = NarInfo {
        url: NarUrl::served(upload.nar_hash).to_string(),
        compression: Compression::Zstd,
        // The served bytes are chunk frames, not the client's file: FileHash would need
        // every frame re-read, so it is left out (it is optional and unsigned).
        file_hash: None,
        file_size: Some(file_size),
        ..claimed
    };
    crate::signatures::apply(&mut served, cache);
    let references: Vec<StorePathHash> = served.foreign_references().map(|r| r.hash()).collect();

    let record = NarInfoRecord {
        nar_hash: served.nar_hash,
        nar_size: served.nar_size,
        file_size,
        text: served.render().into(),
    };
    let outcome = index
        .commit_narinfo(&cache.name, &hash, &record, &references, Some(&url))
        .await?;
    // Acknowledge only what would survive a crash; a path found already there may
    // come from a commit whose own flush has not finished yet.
    index.flush().await?;
    Ok(match outcome {
        Commit::Written => {
            tracing::info!(cache = %cache.name, path = %served.store_path, nar_size = served.nar_size, "published");
            Published::New
        }
        Commit::Exists { nar_hash } if nar_hash == served.nar_hash => Published::Repeat,
        Commit::Exists { nar_hash } => {
            tracing::warn!(
                cache = %cache.name,
                path = %served.store_path,
                kept = %nar_hash,
                refused = %served.nar_hash,
                "path pushed again with a different NarHash (unreproducible build); keeping the first"
            );
            Published::Conflict { kept: nar_hash }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{MemoryIndex, NarRecord};
    use crate::nix::signing::SecretKey;
    use crate::nix::Sha256;
    use crate::store::{ManifestId, Segment, Stored};

    const LEAF: &str = "0a5ym8j4ycmssbbmrcd1iv3lz8mfghb6";
    const TOP: &str = "1x5vmr3a5v6aadm0zq9nd6jq2k1rkzgz";

    fn cache() -> Cache {
        Cache::for_test("main", true, SecretKey::generate("test-1").unwrap())
    }

    /// Records a NAR of `nar_size` bytes uploaded under a URL; returns the URL.
    async fn upload(
        index: &dyn Index,
        cache: &Cache,
        seed: &[u8],
        nar_size: u32,
    ) -> (NarUrl, Upload) {
        let nar_hash = Sha256::digest(seed);
        let file_hash = Sha256::digest(&[seed, b".xz"].concat());
        // Publishing reads a NAR's sizes, not its chunks: the record is enough.
        let stored = |size, stored_size| Stored {
            id: ManifestId::random(),
            segments: vec![Segment { size, stored_size }],
        };
        let record = NarRecord {
            contents: stored(u64::from(nar_size), 10),
            listing: stored(50, 20),
        };
        let url = NarUrl {
            hash: file_hash,
            compression: Compression::Xz,
        };
        let up = Upload {
            nar_hash,
            nar_size: u64::from(nar_size),
            file_hash,
            file_size: 7,
            created: 1,
            stored_size: 10,
            claimed: false,
        };
        index
            .put_upload(&cache.name, &url, &up, &record)
            .await
            .unwrap();
        (url, up)
    }

    fn narinfo(path: &str, url: &NarUrl, up: &Upload, refs: &str) -> String {
        format!(
            "StorePath: /nix/store/{path}-x\nURL: {url}\nCompression: xz\nFileHash: {}\nFileSize: {}\n\
             NarHash: {}\nNarSize: {}\nReferences: {refs}\n",
            up.file_hash, up.file_size, up.nar_hash, up.nar_size
        )
    }

    async fn run(
        index: &Arc<dyn Index>,
        cache: &Cache,
        path: &str,
        text: &str,
    ) -> Result<Published> {
        publish(index, cache, path.parse().unwrap(), text.as_bytes(), None).await
    }

    #[tokio::test]
    async fn a_narinfo_that_agrees_with_its_upload_is_signed_and_served() {
        let index: Arc<dyn Index> = Arc::new(MemoryIndex::new());
        let cache = cache();
        let (url, up) = upload(index.as_ref(), &cache, b"leaf", 100).await;
        let text = narinfo(LEAF, &url, &up, &format!("{LEAF}-x"));
        assert_eq!(
            run(&index, &cache, LEAF, &text).await.unwrap(),
            Published::New
        );
        assert_eq!(
            run(&index, &cache, LEAF, &text).await.unwrap(),
            Published::Repeat
        );
        let record = index
            .narinfo(&cache.name, &LEAF.parse().unwrap())
            .await
            .unwrap()
            .unwrap();
        let served = NarInfo::parse(&record.text).unwrap();
        assert_eq!(served.url, NarUrl::served(up.nar_hash).to_string());
        assert_eq!(served.file_size, Some(10));
        assert_eq!(served.file_hash, None);
        assert!(cache
            .public_key()
            .verify(&served.fingerprint(), &served.sigs[0]));
        assert_eq!(index.cache_stats(&cache.name).await.unwrap().paths, 1);
    }

    #[tokio::test]
    async fn claims_that_differ_from_the_upload_are_refused() {
        let index: Arc<dyn Index> = Arc::new(MemoryIndex::new());
        let cache = cache();
        let (url, up) = upload(index.as_ref(), &cache, b"leaf", 100).await;
        let good = narinfo(LEAF, &url, &up, "");
        let other = Sha256::digest(b"other");
        let cases = [
            (
                good.replace(&up.nar_hash.to_string(), &other.to_string()),
                "NarHash",
            ),
            (good.replace("NarSize: 100", "NarSize: 101"), "NarSize"),
            (good.replace("FileSize: 7", "FileSize: 8"), "FileSize"),
            (
                good.replace(&up.file_hash.to_string(), &other.to_string()),
                "FileHash",
            ),
            (
                good.replace(&url.to_string(), "nar/elsewhere.nar.xz"),
                "names no NAR",
            ),
            (
                good.replace(&url.to_string(), &NarUrl { hash: other, ..url }.to_string()),
                "names no NAR",
            ),
            (
                narinfo(LEAF, &url, &up, &format!("{TOP}-y")),
                "push references first",
            ),
            (good.replace("NarHash", "NarHosh"), "missing"),
        ];
        for (text, reason) in cases {
            let err = run(&index, &cache, LEAF, &text).await.unwrap_err();
            assert!(
                err.to_string().contains(reason),
                "{err} should say {reason}"
            );
        }
        let err = run(&index, &cache, TOP, &good).await.unwrap_err();
        assert!(err.to_string().contains("hash in the URL"), "{err}");
        assert_eq!(
            index
                .narinfo(&cache.name, &LEAF.parse().unwrap())
                .await
                .unwrap(),
            None
        );
        // Another cache cannot claim the upload.
        let elsewhere = Cache::for_test("other", true, SecretKey::generate("test-1").unwrap());
        let err = run(&index, &elsewhere, LEAF, &good).await.unwrap_err();
        assert!(err.to_string().contains("names no NAR"), "{err}");
    }

    #[tokio::test]
    async fn a_different_nar_for_a_published_path_is_a_conflict_and_the_first_stays() {
        let index: Arc<dyn Index> = Arc::new(MemoryIndex::new());
        let cache = cache();
        let (url1, up1) = upload(index.as_ref(), &cache, b"one", 100).await;
        let (url2, up2) = upload(index.as_ref(), &cache, b"two", 100).await;
        run(&index, &cache, LEAF, &narinfo(LEAF, &url1, &up1, ""))
            .await
            .unwrap();
        let second = run(&index, &cache, LEAF, &narinfo(LEAF, &url2, &up2, ""))
            .await
            .unwrap();
        assert_eq!(second, Published::Conflict { kept: up1.nar_hash });
        let record = index
            .narinfo(&cache.name, &LEAF.parse().unwrap())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(record.nar_hash, up1.nar_hash);
    }

    #[tokio::test]
    async fn an_uncompressed_url_resolves_to_a_nar_the_cache_serves() {
        let index: Arc<dyn Index> = Arc::new(MemoryIndex::new());
        let cache = cache();
        let (url, up) = upload(index.as_ref(), &cache, b"leaf", 100).await;
        run(&index, &cache, LEAF, &narinfo(LEAF, &url, &up, ""))
            .await
            .unwrap();
        let plain = NarUrl {
            hash: up.nar_hash,
            compression: Compression::None,
        };
        let resolved = resolve_nar_url(index.as_ref(), &cache.name, &plain)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((resolved.nar_hash, resolved.file_size), (up.nar_hash, 100));
        let other: CacheName = "other".parse().unwrap();
        assert_eq!(
            resolve_nar_url(index.as_ref(), &other, &plain)
                .await
                .unwrap(),
            None
        );
    }
}
