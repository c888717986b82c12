//! Build logs (`log/<drv>`) and realisations (`realisations/<id>.doi`, and the
//! `build-trace-v2/<drv>/<output>.doi` form of current Nix), stored as chunks like NARs
//! and streamed back.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;

use super::content::stream;
use super::extract::{guarded, small_body, Credentials};
use crate::app::App;
use crate::body::{Kept, Peer, LINGER};
use crate::error::{Error, Result};
use crate::grants::Permission;
use crate::index::BlobKind;
use crate::nix::{blob_name, CacheName};
use crate::serve::Encoding;

fn bad(what: &'static str) -> Error {
    Error::BadPath {
        what,
        reason: "not a valid name".into(),
    }
}

/// A log's key from its URL.
fn drv_key(drv: &str) -> Result<String> {
    blob_name::log_key(drv).ok_or(bad("derivation"))
}

/// A realisation's key from its URL.
fn realisation_key(id: &str) -> Result<String> {
    blob_name::realisation_key(id).ok_or(bad("realisation"))
}

/// A build trace entry's key from its URL.
fn trace_key(drv: &str, output: &str) -> Result<String> {
    blob_name::trace_key(drv, output).ok_or(bad("output"))
}

async fn get_blob(
    app: &App,
    cache: CacheName,
    creds: Credentials,
    (kind, key): (BlobKind, String),
    headers: &HeaderMap,
    content_type: &'static str,
) -> Result<Response> {
    let cache = creds.cache(app, &cache, Permission::Pull)?;
    let epoch = app.coord.lease();
    let stored = app
        .index
        .blob(kind, &cache.name, &key)
        .await?
        .ok_or(Error::NotFound("file"))?;
    stream(app, epoch, &stored, Encoding::Plain, headers, content_type).await
}

async fn put_blob(
    app: &App,
    cache: CacheName,
    creds: Credentials,
    (kind, key): (BlobKind, String),
    (peer, body): (Peer, Body),
) -> Result<StatusCode> {
    let cache = creds.cache(app, &cache, Permission::Push)?;
    // Counted against the cache's quota until its record counts it.
    let mut charge = app.charge(&cache).await?;
    // Held until the file is recorded: the chunks it finds stored stay stored.
    let epoch = app.coord.lease();
    let stored = match kind {
        // Logs are streamed into chunks: they may be tens of MiB.
        BlobKind::Log => {
            let body = Kept::new(guarded(app, body));
            let rest = body.handle();
            let max = app.config.ingest.max_log_bytes;
            match app
                .ingestor
                .ingest_blob(body, max, peer, charge.as_mut())
                .await
            {
                Ok(stored) => stored,
                Err(e) => {
                    // The answer must reach a client that is still sending; nothing
                    // of the upload is held meanwhile.
                    drop((epoch, charge));
                    rest.linger(LINGER).await;
                    return Err(e.into());
                }
            }
        }
        // A realisation is a small JSON document, checked before it is stored.
        BlobKind::Realisation => {
            let data = small_body(app, body, app.config.ingest.max_narinfo_bytes).await?;
            if serde_json::from_slice::<serde_json::Value>(&data).is_err() {
                return Err(Error::BadBody("a realisation must be JSON".into()));
            }
            let len = data.len() as u64;
            let body = futures::stream::iter([Ok(data)]);
            app.ingestor
                .ingest_blob(body, len, peer, charge.as_mut())
                .await?
        }
    };
    app.index.put_blob(kind, &cache.name, &key, &stored).await?;
    drop(charge);
    Ok(StatusCode::OK)
}

const LOG_TYPE: &str = "text/plain; charset=utf-8";
const JSON_TYPE: &str = "application/json";

/// `GET log/<drv>`.
pub async fn get_log(
    State(app): State<Arc<App>>,
    Path((cache, drv)): Path<(CacheName, String)>,
    creds: Credentials,
    headers: HeaderMap,
) -> Result<Response> {
    let key = (BlobKind::Log, drv_key(&drv)?);
    get_blob(&app, cache, creds, key, &headers, LOG_TYPE).await
}

/// `PUT log/<drv>`.
pub async fn put_log(
    State(app): State<Arc<App>>,
    Path((cache, drv)): Path<(CacheName, String)>,
    creds: Credentials,
    peer: Peer,
    body: Body,
) -> Result<StatusCode> {
    let key = (BlobKind::Log, drv_key(&drv)?);
    put_blob(&app, cache, creds, key, (peer, body)).await
}

/// `GET realisations/<id>.doi`.
pub async fn get_realisation(
    State(app): State<Arc<App>>,
    Path((cache, id)): Path<(CacheName, String)>,
    creds: Credentials,
    headers: HeaderMap,
) -> Result<Response> {
    let key = (BlobKind::Realisation, realisation_key(&id)?);
    get_blob(&app, cache, creds, key, &headers, JSON_TYPE).await
}

/// `PUT realisations/<id>.doi`.
pub async fn put_realisation(
    State(app): State<Arc<App>>,
    Path((cache, id)): Path<(CacheName, String)>,
    creds: Credentials,
    peer: Peer,
    body: Body,
) -> Result<StatusCode> {
    let key = (BlobKind::Realisation, realisation_key(&id)?);
    put_blob(&app, cache, creds, key, (peer, body)).await
}

/// `GET build-trace-v2/<drv>/<output>.doi`.
pub async fn get_trace(
    State(app): State<Arc<App>>,
    Path((cache, drv, out)): Path<(CacheName, String, String)>,
    creds: Credentials,
    headers: HeaderMap,
) -> Result<Response> {
    let key = (BlobKind::Realisation, trace_key(&drv, &out)?);
    get_blob(&app, cache, creds, key, &headers, JSON_TYPE).await
}

/// `PUT build-trace-v2/<drv>/<output>.doi`.
pub async fn put_trace(
    State(app): State<Arc<App>>,
    Path((cache, drv, out)): Path<(CacheName, String, String)>,
    creds: Credentials,
    peer: Peer,
    body: Body,
) -> Result<StatusCode> {
    let key = (BlobKind::Realisation, trace_key(&drv, &out)?);
    put_blob(&app, cache, creds, key, (peer, body)).await
}
