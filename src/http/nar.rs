//! `/<cache>/nar/<file>`: `PUT` takes an upload under the URL the client chose;
//! `GET` serves `<narhash>.nar.zst` (stored frames) or `<narhash>.nar` (decompressed);
//! `HEAD` answers for both, so clients skip NARs already uploaded.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::extract::Credentials;
use crate::app::App;
use crate::auth::Permission;
use crate::caches::Cache;
use crate::error::{Error, Rejection, Result};
use crate::index::Upload;
use crate::nix::{CacheName, Compression, Sha256};
use crate::serve::{self, range, Encoding};
use crate::store::Manifest;

/// The hash and compression a NAR file name (`<nix32 sha256>.nar[.ext]`) gives.
fn parse_file(file: &str) -> Result<(Sha256, Compression)> {
    let bad = |reason: &str| Error::BadPath {
        what: "NAR file name",
        reason: reason.to_owned(),
    };
    let (stem, compression) = Compression::split_nar_file_name(file)
        .ok_or_else(|| bad("expected <hash>.nar[.xz|.zst|.bz2]"))?;
    let hash = Sha256::from_nix32(stem).ok_or_else(|| bad("hash is not 52 nix32 letters"))?;
    Ok((hash, compression))
}

fn url_of(file: &str) -> String {
    format!("nar/{file}")
}

/// The served NAR `file` names in `cache`, if any: `<narhash>.nar.zst` or
/// `<narhash>.nar`, or the `<filehash>.nar.zst` a client uploaded under. The last is
/// served because Nix keeps the narinfo it pushed in its own cache (for a month), so
/// the pushing machine fetches the URL it chose rather than ours; any zstd stream of the
/// NAR satisfies it.
fn served(app: &App, cache: &Cache, file: &str) -> Result<Option<(Manifest, Encoding)>> {
    let (hash, compression) = parse_file(file)?;
    let encoding = match compression {
        Compression::None => Encoding::Plain,
        Compression::Zstd => Encoding::Zstd,
        _ => return Ok(None),
    };
    // A NAR is readable through a cache only if that cache holds a narinfo for it.
    let nar_hash = if app.index.cache_has_nar(&cache.name, &hash)? {
        hash
    } else {
        match app.index.upload(&cache.name, &url_of(file))? {
            Some(u)
                if encoding == Encoding::Zstd
                    && app.index.cache_has_nar(&cache.name, &u.nar_hash)? =>
            {
                u.nar_hash
            }
            _ => return Ok(None),
        }
    };
    Ok(app.index.manifest(&nar_hash)?.map(|m| (m, encoding)))
}

fn nar_headers(r: &mut Response, len: u64) {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-nix-nar"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
}

pub async fn get(
    State(app): State<Arc<App>>,
    Path((cache, file)): Path<(CacheName, String)>,
    creds: Credentials,
    headers: HeaderMap,
) -> Result<Response> {
    let cache = creds.cache(&app, &cache, Permission::Pull)?;
    let (manifest, encoding) = served(&app, &cache, &file)?.ok_or(Error::NotFound("NAR"))?;
    let size = encoding.body_size(&manifest);
    let requested = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let range = range::parse(requested, size).map_err(|_| Error::RangeNotSatisfiable { size })?;
    let (status, span) = match &range {
        Some(r) => (StatusCode::PARTIAL_CONTENT, r.clone()),
        None => (StatusCode::OK, 0..size),
    };
    let len = span.end - span.start;
    let body = serve::body(
        app.packs.clone(),
        &manifest,
        encoding,
        span.clone(),
        app.config.serve.read_plan(),
    );
    let mut response = (status, Body::from_stream(body)).into_response();
    nar_headers(&mut response, len);
    if range.is_some() {
        let v = format!("bytes {}-{}/{size}", span.start, span.end - 1);
        response.headers_mut().insert(
            header::CONTENT_RANGE,
            HeaderValue::from_str(&v).expect("ASCII"),
        );
    }
    Ok(response)
}

pub async fn head(
    State(app): State<Arc<App>>,
    Path((cache, file)): Path<(CacheName, String)>,
    creds: Credentials,
) -> Result<Response> {
    let cache = creds.cache(&app, &cache, Permission::Pull)?;
    let len = match served(&app, &cache, &file)? {
        Some((manifest, encoding)) => encoding.body_size(&manifest),
        None => {
            let upload = app.index.upload(&cache.name, &url_of(&file))?;
            upload.ok_or(Error::NotFound("NAR"))?.file_size
        }
    };
    let mut response = StatusCode::OK.into_response();
    nar_headers(&mut response, len);
    Ok(response)
}

pub async fn put(
    State(app): State<Arc<App>>,
    Path((cache, file)): Path<(CacheName, String)>,
    creds: Credentials,
    body: Body,
) -> Result<StatusCode> {
    let (file_hash, compression) = parse_file(&file)?;
    let cache = creds.cache(&app, &cache, Permission::Push)?;
    let nar = app
        .ingestor
        .ingest(body.into_data_stream(), compression)
        .await?;
    // Nix names the file after the SHA-256 of the bytes it sends; holding uploads to
    // that keeps one URL from standing for two different bodies.
    if nar.file_hash != file_hash {
        return Err(Rejection::UrlHashMismatch {
            url: url_of(&file),
            actual: nar.file_hash.to_nix32(),
        }
        .into());
    }
    app.ingestor.record(&nar)?;
    let upload = Upload {
        nar_hash: nar.nar_hash,
        nar_size: nar.nar_size,
        file_hash: nar.file_hash,
        file_size: nar.file_size,
    };
    app.index.put_upload(&cache.name, &url_of(&file), &upload)?;
    tracing::info!(
        cache = %cache.name,
        url = %url_of(&file),
        nar_size = nar.nar_size,
        chunks = nar.manifest.chunks.len(),
        new_chunks = nar.new_chunks,
        new_bytes = nar.new_bytes,
        "NAR received"
    );
    Ok(StatusCode::OK)
}
