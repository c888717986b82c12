//! `/<cache>/nar/<file>`: `PUT` takes an upload under the URL the client chose;
//! `GET` serves `<narhash>.nar.zst` (stored frames) or `<narhash>.nar` (decompressed);
//! `HEAD` answers for both, so clients skip NARs already uploaded.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::content::{content_headers, stream};
use super::extract::{guarded, Credentials};
use crate::app::App;
use crate::body::{Kept, Peer, LINGER};
use crate::caches::Cache;
use crate::error::{Error, Rejection, Result};
use crate::grants::Permission;
use crate::nix::{CacheName, Compression, NarUrl, Sha256};
use crate::serve::Encoding;
use crate::store::Stored;

/// The NAR URL a file name under `nar/` gives.
fn parse_file(file: &str) -> Result<NarUrl> {
    NarUrl::from_file_name(file).map_err(|e| Error::BadPath {
        what: "NAR file name",
        reason: e.to_string(),
    })
}

/// The served NAR `url` names in `cache`, if any: `<narhash>.nar.zst` or
/// `<narhash>.nar`, or the `<filehash>.nar.zst` a client uploaded under. The last is
/// served because Nix keeps the narinfo it pushed in its own cache (for a month), so
/// the pushing machine fetches the URL it chose rather than ours; any zstd stream of the
/// NAR satisfies it.
async fn served(
    app: &App,
    cache: &Cache,
    url: &NarUrl,
) -> Result<Option<(Sha256, Stored, Encoding)>> {
    let encoding = match url.compression {
        Compression::None => Encoding::Plain,
        Compression::Zstd => Encoding::Zstd,
        _ => return Ok(None),
    };
    // A NAR is readable through a cache only if that cache holds a narinfo for it.
    // Read as downloads read, from copies where the index keeps them.
    let index = &app.serve.index;
    if let Some(nar) = index.served_nar(&cache.name, &url.hash).await? {
        return Ok(Some((url.hash, nar.contents, encoding)));
    }
    if encoding != Encoding::Zstd {
        return Ok(None);
    }
    let Some(upload) = index.upload(&cache.name, url).await? else {
        return Ok(None);
    };
    Ok(index
        .served_nar(&cache.name, &upload.nar_hash)
        .await?
        .map(|n| (upload.nar_hash, n.contents, encoding)))
}

const NAR_TYPE: &str = "application/x-nix-nar";

/// `GET`: the NAR, whole or a range.
pub async fn get(
    State(app): State<Arc<App>>,
    Path((cache, file)): Path<(CacheName, String)>,
    creds: Credentials,
    headers: HeaderMap,
) -> Result<Response> {
    let url = parse_file(&file)?;
    let cache = creds.cache(&app, &cache, Permission::Pull)?;
    let epoch = app.coord.lease();
    let (nar_hash, stored, encoding) = served(&app, &cache, &url)
        .await?
        .ok_or(Error::NotFound("NAR"))?;
    app.accesses.nar(&cache.name, nar_hash, crate::clock::now());
    stream(&app, epoch, &stored, encoding, &headers, NAR_TYPE).await
}

/// `HEAD`: whether the NAR is served, or uploaded and waiting for its narinfo.
pub async fn head(
    State(app): State<Arc<App>>,
    Path((cache, file)): Path<(CacheName, String)>,
    creds: Credentials,
) -> Result<Response> {
    let url = parse_file(&file)?;
    let cache = creds.cache(&app, &cache, Permission::Pull)?;
    let len = match served(&app, &cache, &url).await? {
        Some((_, stored, encoding)) => encoding.body_size(&stored),
        None => {
            // An upload counts only with its NAR, so that a client sends what is gone.
            let upload = app.serve.index.upload(&cache.name, &url).await?;
            let upload = upload.ok_or(Error::NotFound("NAR"))?;
            app.serve
                .index
                .nar(&upload.nar_hash)
                .await?
                .ok_or(Error::NotFound("NAR"))?;
            upload.file_size
        }
    };
    let mut response = StatusCode::OK.into_response();
    content_headers(&mut response, NAR_TYPE, len);
    Ok(response)
}

/// `PUT`: an upload, ingested and recorded under its URL.
pub async fn put(
    State(app): State<Arc<App>>,
    Path((cache, file)): Path<(CacheName, String)>,
    creds: Credentials,
    peer: Peer,
    body: Body,
) -> Result<StatusCode> {
    let url = parse_file(&file)?;
    let cache = creds.cache(&app, &cache, Permission::Push)?;
    // Counted against the cache's quota until its record counts it.
    let mut charge = app.charge(&cache).await?;
    // Held until the upload is recorded: the chunks it finds stored stay stored.
    let epoch = app.coord.lease();
    let body = Kept::new(guarded(&app, body));
    let rest = body.handle();
    let ingested = app
        .ingestor
        .ingest_nar(body, url.compression, peer, charge.as_mut())
        .await;
    let nar = match ingested {
        Ok(nar) => nar,
        Err(e) => {
            // The answer must reach a client that is still sending; nothing of the
            // upload is held meanwhile.
            drop((epoch, charge));
            rest.linger(LINGER).await;
            return Err(e.into());
        }
    };
    // Nix names the file after the SHA-256 of the bytes it sends; holding uploads to
    // that keeps one URL from standing for two different bodies.
    if nar.file_hash != url.hash {
        app.metrics.reject_upload("url_hash");
        return Err(Rejection::UrlHashMismatch {
            url: url.to_string(),
            actual: nar.file_hash.to_nix32(),
        }
        .into());
    }
    app.ingestor.record(&cache.name, &url, &nar).await?;
    drop(charge);
    tracing::info!(
        cache = %cache.name,
        %url,
        nar_size = nar.nar_size,
        segments = nar.record.contents.segments.len(),
        new_chunks = nar.new_chunks,
        new_bytes = nar.new_bytes,
        "NAR received"
    );
    Ok(StatusCode::OK)
}
