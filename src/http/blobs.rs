//! Build logs (`log/<drv>`) and realisations (`realisations/<id>.doi`, and the
//! `build-trace-v2/<drv>/<output>.doi` form of current Nix): small blobs, pushed and
//! fetched whole.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::extract::{small_body, Credentials};
use crate::app::App;
use crate::auth::Permission;
use crate::error::{Error, Result};
use crate::index::BlobKind;
use crate::nix::{CacheName, StorePath};

fn bad(what: &'static str) -> Error {
    Error::BadPath {
        what,
        reason: "not a valid name".into(),
    }
}

/// A derivation's basename, `<hash>-<name>.drv`.
fn drv_key(drv: &str) -> Result<String> {
    let path = StorePath::from_basename(drv).map_err(|_| bad("derivation"))?;
    if !path.name().ends_with(".drv") {
        return Err(bad("derivation"));
    }
    Ok(path.to_string())
}

/// A realisation id, `sha256:<hex>!<output>`, with the `.doi` suffix.
fn realisation_key(id: &str) -> Result<String> {
    let stem = id.strip_suffix(".doi").ok_or(bad("realisation"))?;
    let (hash, output) = stem.split_once('!').ok_or(bad("realisation"))?;
    let ok = hash.starts_with("sha256:")
        && hash[7..].bytes().all(|c| c.is_ascii_alphanumeric())
        && output_name_ok(output);
    if !ok {
        return Err(bad("realisation"));
    }
    Ok(stem.to_owned())
}

fn output_name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-_+.".contains(&c))
}

fn trace_key(drv: &str, output: &str) -> Result<String> {
    let drv = drv_key(drv)?;
    let output = output
        .strip_suffix(".doi")
        .filter(|o| output_name_ok(o))
        .ok_or(bad("output"))?;
    Ok(format!("{drv}/{output}"))
}

async fn get_blob(
    app: &App,
    cache: CacheName,
    creds: Credentials,
    kind: BlobKind,
    key: String,
    content_type: &'static str,
) -> Result<Response> {
    let cache = creds.cache(app, &cache, Permission::Pull)?;
    let data = app
        .index
        .blob(kind, &cache.name, &key)?
        .ok_or(Error::NotFound("file"))?;
    let mut r = data.into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    Ok(r)
}

async fn put_blob(
    app: &App,
    cache: CacheName,
    creds: Credentials,
    kind: BlobKind,
    key: String,
    body: Body,
) -> Result<StatusCode> {
    let cache = creds.cache(app, &cache, Permission::Push)?;
    let data = small_body(body, app.config.ingest.max_small_body_bytes).await?;
    if kind == BlobKind::Realisation && serde_json::from_slice::<serde_json::Value>(&data).is_err()
    {
        return Err(Error::BadBody("a realisation must be JSON".into()));
    }
    app.index.put_blob(kind, &cache.name, &key, &data)?;
    Ok(StatusCode::OK)
}

const LOG_TYPE: &str = "text/plain; charset=utf-8";
const JSON_TYPE: &str = "application/json";

pub async fn get_log(
    State(app): State<Arc<App>>,
    Path((cache, drv)): Path<(CacheName, String)>,
    creds: Credentials,
) -> Result<Response> {
    let key = drv_key(&drv)?;
    get_blob(&app, cache, creds, BlobKind::Log, key, LOG_TYPE).await
}

pub async fn put_log(
    State(app): State<Arc<App>>,
    Path((cache, drv)): Path<(CacheName, String)>,
    creds: Credentials,
    body: Body,
) -> Result<StatusCode> {
    let key = drv_key(&drv)?;
    put_blob(&app, cache, creds, BlobKind::Log, key, body).await
}

pub async fn get_realisation(
    State(app): State<Arc<App>>,
    Path((cache, id)): Path<(CacheName, String)>,
    creds: Credentials,
) -> Result<Response> {
    let key = realisation_key(&id)?;
    get_blob(&app, cache, creds, BlobKind::Realisation, key, JSON_TYPE).await
}

pub async fn put_realisation(
    State(app): State<Arc<App>>,
    Path((cache, id)): Path<(CacheName, String)>,
    creds: Credentials,
    body: Body,
) -> Result<StatusCode> {
    let key = realisation_key(&id)?;
    put_blob(&app, cache, creds, BlobKind::Realisation, key, body).await
}

pub async fn get_trace(
    State(app): State<Arc<App>>,
    Path((cache, drv, out)): Path<(CacheName, String, String)>,
    creds: Credentials,
) -> Result<Response> {
    let key = trace_key(&drv, &out)?;
    get_blob(&app, cache, creds, BlobKind::Realisation, key, JSON_TYPE).await
}

pub async fn put_trace(
    State(app): State<Arc<App>>,
    Path((cache, drv, out)): Path<(CacheName, String, String)>,
    creds: Credentials,
    body: Body,
) -> Result<StatusCode> {
    let key = trace_key(&drv, &out)?;
    put_blob(&app, cache, creds, BlobKind::Realisation, key, body).await
}
