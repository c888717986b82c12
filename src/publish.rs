//! Publishing a narinfo: the commit point of an upload. Every claim the client makes is
//! checked against what the server itself computed from the NAR it received, the
//! closure is kept whole, and the server signs what it serves.

use crate::app::App;
use crate::caches::Cache;
use crate::error::{Rejection, Result};
use crate::index::{Commit, Upload};
use crate::nix::{Compression, NarInfo, Sha256, StorePathHash};

fn mismatch(field: &'static str, claimed: impl ToString, actual: impl ToString) -> Rejection {
    Rejection::Mismatch {
        field,
        claimed: claimed.to_string(),
        actual: actual.to_string(),
    }
}

/// The URL a NAR is served at: its NarHash, as the stored zstd frames.
pub fn served_url(nar_hash: &crate::nix::Sha256) -> String {
    format!("nar/{}.nar.zst", nar_hash.to_nix32())
}

/// The NAR a client's narinfo URL names in this cache: one uploaded under that URL, or
/// one the cache already serves uncompressed there. The latter happens with
/// `compression=none`, where Nix names the file by its NarHash: after another runner
/// published the same NAR, `HEAD` finds it served and the client skips the upload.
pub fn resolve_nar_url(app: &App, cache: &Cache, url: &str) -> Result<Option<Upload>> {
    if let Some(upload) = app.index.upload(&cache.name, url)? {
        return Ok(Some(upload));
    }
    let served = url
        .strip_prefix("nar/")
        .and_then(Compression::split_nar_file_name)
        .filter(|(_, c)| *c == Compression::None)
        .and_then(|(stem, _)| Sha256::from_nix32(stem));
    let Some(nar_hash) = served else {
        return Ok(None);
    };
    if !app.index.cache_has_nar(&cache.name, &nar_hash)? {
        return Ok(None);
    }
    Ok(app.index.manifest(&nar_hash)?.map(|m| Upload {
        nar_hash,
        nar_size: m.nar_size(),
        file_hash: nar_hash,
        file_size: m.nar_size(),
    }))
}

pub async fn publish(app: &App, cache: &Cache, hash: StorePathHash, body: &[u8]) -> Result<()> {
    let claimed = NarInfo::parse(body)?;
    if claimed.store_path.hash() != hash {
        return Err(Rejection::StorePathMismatch {
            store_path: claimed.store_path,
        }
        .into());
    }
    let upload = resolve_nar_url(app, cache, &claimed.url)?
        .ok_or_else(|| Rejection::UnknownNarUrl(claimed.url.clone()))?;
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
    for r in claimed.foreign_references() {
        if app.index.narinfo(&cache.name, &r.hash())?.is_none() {
            return Err(Rejection::MissingReference(r.full()).into());
        }
    }
    let manifest = app
        .index
        .manifest(&upload.nar_hash)?
        .ok_or(crate::index::IndexError::Corrupt("upload without manifest"))?;

    let mut served = NarInfo {
        url: served_url(&upload.nar_hash),
        compression: Compression::Zstd,
        // The served bytes are chunk frames, not the client's file: FileHash would need
        // every frame re-read, so it is left out (it is optional and unsigned).
        file_hash: None,
        file_size: Some(manifest.stored_size()),
        ..claimed
    };
    // Our signature replaces any the client made under our key's name.
    served.sigs.retain(|s| s.key_name() != cache.key.name());
    served.sigs.push(cache.key.sign(&served.fingerprint()));

    let text = served.render();
    let outcome =
        app.index
            .commit_narinfo(&cache.name, &hash, &served.nar_hash, text.as_bytes())?;
    // Acknowledge only what would survive a crash; a path found already there may
    // come from a commit whose own flush has not finished yet.
    let index = app.index.clone();
    tokio::task::spawn_blocking(move || index.flush())
        .await
        .expect("flush does not panic")?;
    match outcome {
        Commit::Written => {
            tracing::info!(cache = %cache.name, path = %served.store_path, nar_size = served.nar_size, "published");
        }
        Commit::Exists { nar_hash } if nar_hash == served.nar_hash => {}
        Commit::Exists { nar_hash } => {
            app.stats
                .narinfo_conflicts
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(
                cache = %cache.name,
                path = %served.store_path,
                kept = %nar_hash,
                refused = %served.nar_hash,
                "path pushed again with a different NarHash (unreproducible build); keeping the first"
            );
        }
    }
    Ok(())
}
