//! The admin API of maintenance: garbage collection and verification (jobs that run
//! in the background and are polled), storage figures, and pins.
//!
//! Collection, verification and the server's figures are the server admin's: they
//! concern every cache. A cache's figures need admin of it; its pins are listed with
//! pull and changed with push, so that CI can pin what it releases.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;

use super::types::{AddPin, GcRequest, JobStarted, VerifyRequest};
use super::{detached, json, json_or_default};
use crate::app::App;
use crate::coord::JobRefused;
use crate::error::{Error, Result};
use crate::gc::stats::Stats;
use crate::grants::Permission;
use crate::http::extract::Credentials;
use crate::index::PinRecord;
use crate::jobs::JobStatus;
use crate::nix::{CacheName, StorePath};

fn cache_name(name: Option<String>) -> Result<Option<CacheName>> {
    name.map(|n| {
        n.parse()
            .map_err(|e| Error::BadBody(format!("cache {n:?}: {e}")))
    })
    .transpose()
}

fn started(r: std::result::Result<u64, JobRefused>) -> Result<(StatusCode, Json<JobStarted>)> {
    match r {
        Ok(id) => Ok((StatusCode::ACCEPTED, Json(JobStarted { id }))),
        Err(JobRefused::Unavailable(e)) => Err(e.into()),
        Err(JobRefused::Busy(busy)) => Err(Error::Conflict(format!(
            "a {} is running (started {} s ago); one job at a time",
            busy.kind,
            crate::clock::now().saturating_sub(busy.started)
        ))),
    }
}

/// `POST /_api/v1/gc`: starts a collection.
pub async fn gc(
    State(app): State<Arc<App>>,
    creds: Credentials,
    body: Body,
) -> Result<(StatusCode, Json<JobStarted>)> {
    let by = app.auth.server_admin(creds.token())?;
    let req: GcRequest = json_or_default(&app, body).await?;
    let cache = cache_name(req.cache)?;
    if let Some(c) = &cache {
        app.caches.get(c).ok_or(Error::NotFound("cache"))?;
    }
    let options = crate::gc::Options {
        cache,
        dry_run: req.dry_run,
        now: crate::clock::now(),
        compact: req.compact,
    };
    tracing::info!(by = %by.name, ?options, "garbage collection requested");
    started(crate::gc::start(&app, options).await)
}

/// `POST /_api/v1/verify`: starts a verification.
pub async fn verify(
    State(app): State<Arc<App>>,
    creds: Credentials,
    body: Body,
) -> Result<(StatusCode, Json<JobStarted>)> {
    app.auth.server_admin(creds.token())?;
    let req: VerifyRequest = json_or_default(&app, body).await?;
    let cache = cache_name(req.cache)?;
    if let Some(c) = &cache {
        app.caches.get(c).ok_or(Error::NotFound("cache"))?;
    }
    let options = crate::verify::Options {
        cache,
        deep: req.deep,
    };
    started(crate::verify::start(&app, options).await)
}

/// `GET /_api/v1/jobs/<id>`: how a job goes, and its report once done.
pub async fn job(
    State(app): State<Arc<App>>,
    Path(id): Path<u64>,
    creds: Credentials,
) -> Result<Json<JobStatus>> {
    app.auth.server_admin(creds.token())?;
    app.coord
        .job(id)
        .await?
        .map(Json)
        .ok_or(Error::NotFound("job"))
}

/// The query of `GET /_api/v1/stats`.
#[derive(Deserialize)]
pub struct StatsQuery {
    cache: Option<CacheName>,
}

/// `GET /_api/v1/stats[?cache=<cache>]`.
pub async fn stats(
    State(app): State<Arc<App>>,
    Query(q): Query<StatsQuery>,
    creds: Credentials,
) -> Result<Json<Stats>> {
    let (packs, quota) = match &q.cache {
        Some(c) => {
            let cache = creds.cache(&app, c, Permission::Admin)?;
            (Vec::new(), app.config.quota.of(cache.record.quota_bytes))
        }
        None => {
            app.auth.server_admin(creds.token())?;
            (app.packs.list().await?, None)
        }
    };
    let stats =
        crate::gc::stats::stats(app.index.as_ref(), q.cache.as_ref(), quota, &packs).await?;
    Ok(Json(stats))
}

/// `GET /_api/v1/caches/<cache>/pins`.
pub async fn pins(
    State(app): State<Arc<App>>,
    Path(cache): Path<CacheName>,
    creds: Credentials,
) -> Result<Json<Vec<PinRecord>>> {
    let cache = creds.cache(&app, &cache, Permission::Pull)?;
    let mut pins = app.index.pins(&cache.name).await?;
    pins.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Json(pins))
}

/// A pin's name: what a path segment and a table cell can hold.
fn pin_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-+".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::BadBody(format!(
            "pin name {name:?}: 1 to 128 of letters, digits and ._-+"
        )))
    }
}

/// `POST /_api/v1/caches/<cache>/pins`: pins a path, or adds a revision to a pin.
pub async fn add_pin(
    State(app): State<Arc<App>>,
    Path(cache): Path<CacheName>,
    creds: Credentials,
    body: Body,
) -> Result<Json<PinRecord>> {
    let cache = creds.cache(&app, &cache, Permission::Push)?;
    let req: AddPin = json(&app, body).await?;
    pin_name(&req.name)?;
    let path = StorePath::from_full(&req.store_path)
        .or_else(|_| StorePath::from_basename(&req.store_path))
        .map_err(|_| Error::BadBody(format!("{:?} is not a store path", req.store_path)))?;
    // Held so that the path cannot be deleted between the check and the pin.
    let lock = app.coord.exclusive(&cache.name).await?;
    let index = app.index.clone();
    let pin = detached(async move {
        let cache = lock.name();
        if index.narinfo(cache, &path.hash()).await?.is_none() {
            return Err(Error::NotFound("store path"));
        }
        let existing = index
            .pins(cache)
            .await?
            .into_iter()
            .find(|p| p.name == req.name);
        let pin = crate::pins::add(
            existing,
            &req.name,
            path.full(),
            req.keep_revisions,
            req.keep_days,
            crate::clock::now(),
        );
        index.put_pin(cache, &pin).await?;
        index.flush().await?;
        Ok(pin)
    })
    .await?;
    Ok(Json(pin))
}

/// `DELETE /_api/v1/caches/<cache>/pins/<name>`.
pub async fn remove_pin(
    State(app): State<Arc<App>>,
    Path((cache, name)): Path<(CacheName, String)>,
    creds: Credentials,
) -> Result<StatusCode> {
    let cache = creds.cache(&app, &cache, Permission::Push)?;
    if !app.index.delete_pin(&cache.name, &name).await? {
        return Err(Error::NotFound("pin"));
    }
    app.index.flush().await?;
    Ok(StatusCode::NO_CONTENT)
}
