//! `GET`/`HEAD`/`PUT /<cache>/<hash>.narinfo` and `GET /<cache>/<hash>.ls`.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::extract::{small_body, Credentials};
use crate::app::App;
use crate::auth::Permission;
use crate::error::{Error, Result};
use crate::nix::{CacheName, StorePathHash};
use crate::publish;

/// What `/<cache>/<file>` names.
enum File {
    NarInfo(StorePathHash),
    Listing(StorePathHash),
}

fn parse_file(file: &str) -> Result<File> {
    let hash = |stem: &str| {
        stem.parse::<StorePathHash>().map_err(|e| Error::BadPath {
            what: "store path hash",
            reason: e.to_string(),
        })
    };
    if let Some(stem) = file.strip_suffix(".narinfo") {
        Ok(File::NarInfo(hash(stem)?))
    } else if let Some(stem) = file.strip_suffix(".ls") {
        Ok(File::Listing(hash(stem)?))
    } else {
        Err(Error::NotFound("file"))
    }
}

fn with_type(body: bytes::Bytes, content_type: &'static str) -> Response {
    let mut r = body.into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

pub async fn get(
    State(app): State<Arc<App>>,
    Path((cache, file)): Path<(CacheName, String)>,
    creds: Credentials,
) -> Result<Response> {
    let file = parse_file(&file)?;
    let cache = creds.cache(&app, &cache, Permission::Pull)?;
    let (File::NarInfo(hash) | File::Listing(hash)) = file;
    let text = app
        .index
        .narinfo(&cache.name, &hash)?
        .ok_or(Error::NotFound("narinfo"))?;
    match file {
        File::NarInfo(_) => Ok(with_type(text, "text/x-nix-narinfo")),
        File::Listing(_) => {
            let info = crate::nix::NarInfo::parse(&text)
                .map_err(|_| crate::index::IndexError::Corrupt("narinfo"))?;
            let listing = app
                .index
                .listing(&info.nar_hash)?
                .ok_or(Error::NotFound("listing"))?;
            Ok(with_type(listing, "application/json"))
        }
    }
}

pub async fn put(
    State(app): State<Arc<App>>,
    Path((cache, file)): Path<(CacheName, String)>,
    creds: Credentials,
    body: Body,
) -> Result<StatusCode> {
    let file = parse_file(&file)?;
    let cache = creds.cache(&app, &cache, Permission::Push)?;
    let body = small_body(body, app.config.ingest.max_narinfo_bytes).await?;
    match file {
        File::NarInfo(hash) => publish::publish(&app, &cache, hash, &body).await?,
        // The listing is built from the NAR itself while ingesting; a client's own
        // (`write-nar-listing=1`) is accepted and not needed.
        File::Listing(_) => {}
    }
    Ok(StatusCode::OK)
}
