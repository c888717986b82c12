//! The JSON admin API under `/_api/v1/`, which `cache-admin` talks to. The types of
//! its bodies are in `types`, shared with `cache-admin`.
//!
//! Who may call what: reading a cache's settings needs pull on it; changing it, its
//! keys or deleting it needs admin of it, and its quota the server admin; deleting store paths needs delete; creating
//! a cache needs admin of its name (a token with admin on `team-*` may create
//! `team-x`); tokens are the server admin's (admin on `*`). No response carries a
//! secret but the one `POST /tokens` makes, once.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;

use super::extract::{small_body, Credentials};
use crate::app::App;
use crate::caches::{Cache, CacheChange, NewCache};
use crate::error::{Error, Result};
use crate::grants::{Grants, Permission};
use crate::nix::signing::SecretKey;
use crate::nix::{CacheName, StorePath};

pub mod maintenance;
pub mod types;

use types::{
    CacheInfo, CreateCache, CreateToken, CreatedToken, DeletePaths, Deleted, KeyChange, KeyInfo,
    KeysInfo, Rotate, SecretText, TokenInfo,
};

/// The largest JSON body the admin API reads.
const MAX_BODY: usize = 1024 * 1024;

/// Reads a JSON body of the admin API.
async fn json<T: serde::de::DeserializeOwned>(app: &App, body: Body) -> Result<T> {
    let bytes = small_body(app, body, MAX_BODY).await?;
    serde_json::from_slice(&bytes).map_err(|e| Error::BadBody(format!("JSON: {e}")))
}

/// Reads a JSON body of the admin API, where an empty one means the defaults.
async fn json_or_default<T: serde::de::DeserializeOwned + Default>(
    app: &App,
    body: Body,
) -> Result<T> {
    let bytes = small_body(app, body, MAX_BODY).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(&bytes).map_err(|e| Error::BadBody(format!("JSON: {e}")))
}

fn secret_key(text: &Option<SecretText>) -> Result<Option<SecretKey>> {
    text.as_ref()
        .map(|t| {
            t.key()
                .map_err(|e| Error::BadBody(format!("secret key: {e}")))
        })
        .transpose()
}

/// Runs `f` as a task of its own: a change of the metadata (a walk over a cache's
/// narinfos, a deletion) runs to its end even if the client goes away, and what `f`
/// holds (its locks) goes with it.
pub(crate) async fn detached<T: Send + 'static>(
    f: impl std::future::Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    tokio::spawn(f)
        .await
        .map_err(|e| Error::Internal(format!("an admin task failed: {e}")))?
}

/// Quotas limit the tenants that hold admin of their own caches: only the server
/// admin sets them.
fn quota_setter(holder: &crate::index::TokenRecord) -> Result<()> {
    if holder.grants.server_admin() {
        Ok(())
    } else {
        Err(Error::Forbidden(
            "only the server admin (admin on '*') sets quotas".into(),
        ))
    }
}

async fn describe(app: &App, cache: &Cache) -> Result<CacheInfo> {
    let stats = app.index.cache_stats(&cache.name).await?;
    Ok(CacheInfo {
        name: cache.name.to_string(),
        public: cache.public,
        public_key: cache.public_key().to_string(),
        signing_keys: cache.signing_keys(),
        priority: cache.priority,
        store_dir: crate::nix::store_path::STORE_DIR.to_owned(),
        keep_client_signatures: cache.keep_client_signatures,
        retention: cache.record.retention,
        quota_bytes: cache.record.quota_bytes,
        effective_quota_bytes: app.config.quota.of(cache.record.quota_bytes),
        declared: cache.declared,
        paths: stats.paths,
        nar_bytes: stats.nar_bytes,
        used_bytes: stats.used_bytes(),
        created: cache.record.created,
    })
}

/// `GET /_api/v1/caches`: the caches the caller may pull from (without a valid
/// token, the public ones).
pub async fn list_caches(
    State(app): State<Arc<App>>,
    creds: Credentials,
) -> Result<Json<Vec<CacheInfo>>> {
    let holder = app.auth.identify(creds.token());
    let mut out = Vec::new();
    for cache in app.caches.all() {
        let visible = cache.public
            || holder
                .as_ref()
                .is_some_and(|t| t.grants.allow(&cache.name, Permission::Pull));
        if visible {
            out.push(describe(&app, &cache).await?);
        }
    }
    Ok(Json(out))
}

/// `POST /_api/v1/caches`.
pub async fn create_cache(
    State(app): State<Arc<App>>,
    creds: Credentials,
    body: Body,
) -> Result<(StatusCode, Json<CacheInfo>)> {
    let holder = app.auth.bearer(creds.token())?;
    let req: CreateCache = json(&app, body).await?;
    let name: CacheName = req
        .name
        .parse()
        .map_err(|e| Error::BadBody(format!("{e}")))?;
    if !holder.grants.allow(&name, Permission::Admin) {
        return Err(Error::Forbidden(format!("the token may not create {name}")));
    }
    if req.quota_bytes.is_some() {
        quota_setter(&holder)?;
    }
    let new = NewCache {
        public: req.public.unwrap_or(true),
        priority: req.priority.unwrap_or(40),
        keep_client_signatures: req.keep_client_signatures.unwrap_or(true),
        retention: req.retention,
        quota_bytes: req.quota_bytes,
        key: secret_key(&req.secret_key)?,
    };
    let lock = app.coord.exclusive(&name).await?;
    let creating = app.clone();
    let cache = detached(async move { creating.caches.create(&lock, new).await }).await?;
    tracing::info!(cache = %cache.name, by = %holder.name, "created cache");
    Ok((StatusCode::CREATED, Json(describe(&app, &cache).await?)))
}

/// `GET /_api/v1/caches/<cache>`: readable by whoever may pull from the cache.
pub async fn cache_info(
    State(app): State<Arc<App>>,
    Path(cache): Path<CacheName>,
    creds: Credentials,
) -> Result<Json<CacheInfo>> {
    let cache = creds.cache(&app, &cache, Permission::Pull)?;
    Ok(Json(describe(&app, &cache).await?))
}

/// `PATCH /_api/v1/caches/<cache>`.
pub async fn update_cache(
    State(app): State<Arc<App>>,
    Path(cache): Path<CacheName>,
    creds: Credentials,
    body: Body,
) -> Result<Json<CacheInfo>> {
    let cache = creds.cache(&app, &cache, Permission::Admin)?;
    let change: CacheChange = json(&app, body).await?;
    if change.quota_bytes.is_some() {
        quota_setter(&app.auth.bearer(creds.token())?)?;
    }
    let lock = app.coord.exclusive(&cache.name).await?;
    let updated = app.caches.update(&lock, &change).await?;
    Ok(Json(describe(&app, &updated).await?))
}

/// `?confirm=<cache>` on a deletion.
#[derive(Debug, Deserialize)]
pub struct Confirm {
    confirm: Option<String>,
}

/// `DELETE /_api/v1/caches/<cache>?confirm=<cache>`.
pub async fn delete_cache(
    State(app): State<Arc<App>>,
    Path(cache): Path<CacheName>,
    Query(confirm): Query<Confirm>,
    creds: Credentials,
) -> Result<StatusCode> {
    let cache = creds.cache(&app, &cache, Permission::Admin)?;
    if confirm.confirm.as_deref() != Some(cache.name.as_str()) {
        return Err(Error::BadBody(format!(
            "deleting a cache needs ?confirm={} (cache-admin: --yes)",
            cache.name
        )));
    }
    // No key walk of this cache runs on, and no publication, while it goes.
    let walks = app.coord.key_change(&cache.name).await?;
    let lock = app.coord.exclusive(&cache.name).await?;
    let deleting = app.clone();
    detached(async move {
        let _walks = walks;
        deleting.caches.delete(&lock).await
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /_api/v1/caches/<cache>/keys`: the keys, and how many paths each signs.
pub async fn keys(
    State(app): State<Arc<App>>,
    Path(cache): Path<CacheName>,
    creds: Credentials,
) -> Result<Json<KeysInfo>> {
    let cache = creds.cache(&app, &cache, Permission::Admin)?;
    let (paths, mut counts) =
        crate::signatures::count_by_key(app.index.as_ref(), &cache.name).await?;
    let keys = cache
        .record
        .keys
        .iter()
        .map(|k| KeyInfo {
            name: k.name.clone(),
            public_key: k.public_key.clone(),
            signing: k.signing,
            created: k.created,
            paths_signed: counts.remove(&k.name).unwrap_or(0),
        })
        .collect();
    Ok(Json(KeysInfo {
        paths,
        keys,
        other_signatures: counts.into_iter().collect(),
    }))
}

/// `POST /_api/v1/caches/<cache>/keys/rotate` (body optional): a new key signs beside
/// the current one, and every path gets its signature too. During a rotation under
/// way, finishes its walk (one cut short by a crash, say).
pub async fn rotate(
    State(app): State<Arc<App>>,
    Path(cache): Path<CacheName>,
    creds: Credentials,
    body: Body,
) -> Result<Json<KeyChange>> {
    let cache = creds.cache(&app, &cache, Permission::Admin)?;
    let req: Rotate = json_or_default(&app, body).await?;
    let imported = secret_key(&req.secret_key)?;
    let walking = app.coord.key_change(&cache.name).await?;
    let (rotated, added) = {
        let lock = app.coord.exclusive(&cache.name).await?;
        app.caches.add_signer(&lock, imported).await?
    };
    tracing::info!(cache = %rotated.name, key = %rotated.public_key().name(), resumed = !added, "rotating keys");
    walk(&app, rotated, Vec::new(), !added, walking).await
}

/// `POST /_api/v1/caches/<cache>/keys/resign`: the newest key alone signs, and every
/// path carries its signature and no retired key's.
pub async fn resign(
    State(app): State<Arc<App>>,
    Path(cache): Path<CacheName>,
    creds: Credentials,
) -> Result<Json<KeyChange>> {
    let cache = creds.cache(&app, &cache, Permission::Admin)?;
    let walking = app.coord.key_change(&cache.name).await?;
    let (cache, retired) = {
        let lock = app.coord.exclusive(&cache.name).await?;
        app.caches.retire_old_signers(&lock).await?
    };
    tracing::info!(cache = %cache.name, retired = ?retired, "re-signing");
    walk(&app, cache, retired, false, walking).await
}

/// Brings every narinfo of `cache` to its current signers, holding `walking`.
async fn walk(
    app: &Arc<App>,
    cache: Arc<Cache>,
    retired: Vec<String>,
    resumed: bool,
    walking: crate::coord::KeyChange,
) -> Result<Json<KeyChange>> {
    let index = app.index.clone();
    let walked = cache.clone();
    let done = detached(async move {
        let _walking = walking;
        let done = crate::signatures::resign_all(index.as_ref(), &walked).await?;
        index.flush().await?;
        Ok(done)
    })
    .await?;
    Ok(Json(KeyChange {
        public_key: cache.public_key().to_string(),
        signing_keys: cache.signing_keys(),
        retired,
        resumed,
        paths: done.paths,
        rewritten: done.rewritten,
    }))
}

/// `POST /_api/v1/caches/<cache>/paths/delete`.
pub async fn delete_paths(
    State(app): State<Arc<App>>,
    Path(cache): Path<CacheName>,
    creds: Credentials,
    body: Body,
) -> Result<Json<Deleted>> {
    let cache = creds.cache(&app, &cache, Permission::Delete)?;
    let req: DeletePaths = json(&app, body).await?;
    let mut hashes = Vec::new();
    for p in &req.paths {
        let parsed = StorePath::from_full(p)
            .or_else(|_| StorePath::from_basename(p))
            .map(|p| p.hash())
            .or_else(|_| p.parse())
            .map_err(|_| Error::BadBody(format!("{p:?} is not a store path")))?;
        hashes.push(parsed);
    }
    let index = app.index.clone();
    let with = req.with_referrers;
    // No publication to the cache is under way: one could otherwise commit a path
    // whose reference is being deleted.
    let lock = app.coord.exclusive(&cache.name).await?;
    let outcome = detached(async move {
        crate::removal::delete_paths(index.as_ref(), lock.name(), &hashes, with).await
    })
    .await?;
    Ok(Json(Deleted {
        deleted: outcome.deleted.iter().map(StorePath::full).collect(),
        missing: outcome.missing.iter().map(|h| h.to_string()).collect(),
    }))
}

/// `GET /_api/v1/tokens`.
pub async fn list_tokens(
    State(app): State<Arc<App>>,
    creds: Credentials,
) -> Result<Json<Vec<TokenInfo>>> {
    app.auth.server_admin(creds.token())?;
    Ok(Json(app.auth.list().iter().map(TokenInfo::from).collect()))
}

/// `POST /_api/v1/tokens`.
pub async fn create_token(
    State(app): State<Arc<App>>,
    creds: Credentials,
    body: Body,
) -> Result<(StatusCode, Json<CreatedToken>)> {
    let by = app.auth.server_admin(creds.token())?;
    let req: CreateToken = json(&app, body).await?;
    let expires = req
        .expires_in_secs
        .map(|s| crate::clock::now().saturating_add(s));
    let grants = Grants {
        permissions: req.permissions,
        caches: req.caches,
    };
    let made = app.auth.create(&req.name, grants, expires).await?;
    tracing::info!(token = %made.record.name, by = %by.name, "token created");
    Ok((
        StatusCode::CREATED,
        Json(CreatedToken {
            token: TokenInfo::from(&made.record),
            secret: SecretText(made.secret.to_string()),
        }),
    ))
}

/// `DELETE /_api/v1/tokens/<name>`: revokes it.
pub async fn revoke_token(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
    creds: Credentials,
) -> Result<Json<TokenInfo>> {
    let by = app.auth.server_admin(creds.token())?;
    let revoked = app.auth.revoke(&name).await?;
    tracing::info!(token = %revoked.name, by = %by.name, "token revoked");
    Ok(Json(TokenInfo::from(&revoked)))
}
