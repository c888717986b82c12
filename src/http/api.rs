//! The JSON admin API under `/_api/v1/`, which `cache-admin` talks to. The types of
//! its bodies are here, shared with `cache-admin`.
//!
//! Who may call what: reading a cache's settings needs pull on it; changing it, its
//! keys or deleting it needs admin of it; deleting store paths needs delete; creating
//! a cache needs admin of its name (a token with admin on `team-*` may create
//! `team-x`); tokens are the server admin's (admin on `*`). No response carries a
//! secret but the one `POST /tokens` makes, once.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};

use super::extract::{small_body, Credentials};
use crate::app::App;
use crate::caches::{Cache, CacheChange, NewCache};
use crate::error::{Error, Result};
use crate::grants::{CachePattern, Grants, Permission};
use crate::index::{Retention, TokenRecord};
use crate::nix::signing::SecretKey;
use crate::nix::{CacheName, StorePath};

/// The largest JSON body the admin API reads.
const MAX_BODY: usize = 1024 * 1024;

/// A cache as the admin API describes it.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CacheInfo {
    /// Its name.
    pub name: String,
    /// Whether anyone may pull from it.
    pub public: bool,
    /// The public key of its newest signing key, for `trusted-public-keys`.
    pub public_key: String,
    /// The public keys of every key that signs (two during a rotation).
    pub signing_keys: Vec<String>,
    /// The priority its `nix-cache-info` announces.
    pub priority: u32,
    /// The store directory its paths live in.
    pub store_dir: String,
    /// Whether client signatures are served beside the cache's.
    pub keep_client_signatures: bool,
    /// What the garbage collector keeps.
    pub retention: Retention,
    /// Whether the config file declares it (and so owns its settings).
    pub declared: bool,
    /// Store paths it serves.
    pub paths: u64,
    /// The sum of their NAR sizes.
    pub nar_bytes: u64,
    /// When it was created, in seconds since the epoch.
    pub created: u64,
}

/// `POST /_api/v1/caches`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateCache {
    /// Its name.
    pub name: String,
    /// Whether anyone may pull from it (default: yes).
    #[serde(default)]
    pub public: Option<bool>,
    /// The priority to announce (default 40).
    #[serde(default)]
    pub priority: Option<u32>,
    /// Whether client signatures are served (default: yes).
    #[serde(default)]
    pub keep_client_signatures: Option<bool>,
    /// Retention, read by the garbage collector.
    #[serde(default)]
    pub retention: Retention,
    /// A secret key to import, in the text of a Nix secret-key file; generated when
    /// absent.
    #[serde(default)]
    pub secret_key: Option<SecretText>,
}

/// The text of a secret key in a request. `Debug` never shows it.
#[derive(Serialize, Deserialize, Clone)]
#[serde(transparent)]
pub struct SecretText(pub String);

impl std::fmt::Debug for SecretText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretText(<redacted>)")
    }
}

impl Drop for SecretText {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

impl SecretText {
    fn key(&self) -> Result<SecretKey> {
        self.0
            .parse()
            .map_err(|e| Error::BadBody(format!("secret key: {e}")))
    }
}

/// `GET /_api/v1/caches/<cache>/keys`.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeysInfo {
    /// The cache's store paths.
    pub paths: u64,
    /// Its keys, oldest first.
    pub keys: Vec<KeyInfo>,
    /// Signatures under other names (clients'), and how many paths carry each.
    pub other_signatures: Vec<(String, u64)>,
}

/// One of a cache's keys.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeyInfo {
    /// Its name.
    pub name: String,
    /// Its public key.
    pub public_key: String,
    /// Whether it signs what the cache publishes.
    pub signing: bool,
    /// When it was added.
    pub created: u64,
    /// How many paths carry its signature.
    pub paths_signed: u64,
}

/// `POST /_api/v1/caches/<cache>/keys/rotate`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rotate {
    /// A secret key to import as the new key; generated when absent.
    #[serde(default)]
    pub secret_key: Option<SecretText>,
}

/// What a rotation or a re-signing did.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeyChange {
    /// The public key hosts should trust from now on.
    pub public_key: String,
    /// The keys that sign now.
    pub signing_keys: Vec<String>,
    /// Keys retired by this change.
    pub retired: Vec<String>,
    /// Paths looked at.
    pub paths: u64,
    /// Paths whose signatures were rewritten.
    pub rewritten: u64,
}

/// `POST /_api/v1/caches/<cache>/paths/delete`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeletePaths {
    /// Store paths, full (`/nix/store/…`) or base names, or their hashes.
    pub paths: Vec<String>,
    /// Whether the paths that refer to them go too.
    #[serde(default)]
    pub with_referrers: bool,
}

/// What a deletion of paths did.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Deleted {
    /// The paths deleted.
    pub deleted: Vec<String>,
}

/// A token as the admin API describes it: never its secret.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenInfo {
    /// Its name.
    pub name: String,
    /// What it may do.
    pub permissions: Vec<Permission>,
    /// The caches it covers.
    pub caches: Vec<CachePattern>,
    /// When it was made.
    pub created: u64,
    /// When it stops working.
    pub expires: Option<u64>,
    /// When it was last used, to about a minute.
    pub last_used: Option<u64>,
    /// When it was revoked.
    pub revoked: Option<u64>,
}

impl From<&TokenRecord> for TokenInfo {
    fn from(t: &TokenRecord) -> Self {
        Self {
            name: t.name.clone(),
            permissions: t.grants.permissions.clone(),
            caches: t.grants.caches.clone(),
            created: t.created,
            expires: t.expires,
            last_used: t.last_used,
            revoked: t.revoked,
        }
    }
}

/// `POST /_api/v1/tokens`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// Its name, unique among tokens not revoked.
    pub name: String,
    /// What it may do.
    pub permissions: Vec<Permission>,
    /// The caches it covers: names, or patterns with `*`.
    pub caches: Vec<CachePattern>,
    /// Seconds from now until it stops working; never when absent.
    #[serde(default)]
    pub expires_in_secs: Option<u64>,
}

/// A token just made, with its secret: shown this once.
#[derive(Debug, Serialize, Deserialize)]
pub struct CreatedToken {
    /// The token.
    pub token: TokenInfo,
    /// Its secret.
    pub secret: String,
}

/// Reads a JSON body of the admin API.
async fn json<T: serde::de::DeserializeOwned>(app: &App, body: Body) -> Result<T> {
    let bytes = small_body(app, body, MAX_BODY).await?;
    serde_json::from_slice(&bytes).map_err(|e| Error::BadBody(format!("JSON: {e}")))
}

/// Runs `f` on the blocking pool: walks over a cache's narinfos take a while.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("an admin task failed: {e}")))?
}

fn describe(app: &App, cache: &Cache) -> Result<CacheInfo> {
    let stats = app.index.cache_stats(&cache.name)?;
    Ok(CacheInfo {
        name: cache.name.to_string(),
        public: cache.public,
        public_key: cache.public_key().to_string(),
        signing_keys: cache
            .signers
            .iter()
            .map(|k| k.public().to_string())
            .collect(),
        priority: cache.priority,
        store_dir: crate::nix::store_path::STORE_DIR.to_owned(),
        keep_client_signatures: cache.keep_client_signatures,
        retention: cache.record.retention,
        declared: cache.declared,
        paths: stats.paths,
        nar_bytes: stats.nar_bytes,
        created: cache.record.created,
    })
}

/// `GET /_api/v1/caches`: the caches the caller may pull from (without a token, the
/// public ones).
pub async fn list_caches(
    State(app): State<Arc<App>>,
    creds: Credentials,
) -> Result<Json<Vec<CacheInfo>>> {
    // A token that is not (or no longer) valid sees what anyone sees.
    let holder = app.auth.identify(creds.token());
    let mut out = Vec::new();
    for cache in app.caches.all() {
        let visible = cache.public
            || holder
                .as_ref()
                .is_some_and(|t| t.grants.allow(&cache.name, Permission::Pull));
        if visible {
            out.push(describe(&app, &cache)?);
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
    let key = req.secret_key.as_ref().map(SecretText::key).transpose()?;
    let new = NewCache {
        name,
        public: req.public.unwrap_or(true),
        priority: req.priority.unwrap_or(40),
        keep_client_signatures: req.keep_client_signatures.unwrap_or(true),
        retention: req.retention,
        key,
    };
    let _alone = app.caches.exclusive().await;
    let app2 = app.clone();
    let cache = blocking(move || app2.caches.create(new)).await?;
    tracing::info!(cache = %cache.name, by = %holder.name, "created cache");
    Ok((StatusCode::CREATED, Json(describe(&app, &cache)?)))
}

/// `GET /_api/v1/caches/<cache>`: readable by whoever may pull from the cache.
pub async fn cache_info(
    State(app): State<Arc<App>>,
    Path(cache): Path<CacheName>,
    creds: Credentials,
) -> Result<Json<CacheInfo>> {
    let cache = creds.cache(&app, &cache, Permission::Pull)?;
    Ok(Json(describe(&app, &cache)?))
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
    let _alone = app.caches.exclusive().await;
    let updated = app.caches.update(&cache.name, &change)?;
    Ok(Json(describe(&app, &updated)?))
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
    let alone = app.caches.exclusive().await;
    let app2 = app.clone();
    blocking(move || {
        let _alone = alone;
        app2.caches.delete(&cache.name)
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
    let index = app.index.clone();
    let name = cache.name.clone();
    let (paths, mut counts) =
        blocking(move || Ok(crate::signatures::count_by_key(index.as_ref(), &name)?)).await?;
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

/// `POST /_api/v1/caches/<cache>/keys/rotate`: a new key signs beside the current one,
/// and every path gets its signature too.
pub async fn rotate(
    State(app): State<Arc<App>>,
    Path(cache): Path<CacheName>,
    creds: Credentials,
    body: Body,
) -> Result<Json<KeyChange>> {
    let cache = creds.cache(&app, &cache, Permission::Admin)?;
    let req: Rotate = json(&app, body).await?;
    let imported = req.secret_key.as_ref().map(SecretText::key).transpose()?;
    let _one_at_a_time = app.caches.key_change().await;
    let rotated = {
        let _alone = app.caches.exclusive().await;
        app.caches.add_signer(&cache.name, imported)?
    };
    tracing::info!(cache = %rotated.name, key = %rotated.public_key().name(), "rotating keys");
    walk(&app, rotated, Vec::new()).await
}

/// `POST /_api/v1/caches/<cache>/keys/resign`: the newest key alone signs, and every
/// path carries its signature and no retired key's.
pub async fn resign(
    State(app): State<Arc<App>>,
    Path(cache): Path<CacheName>,
    creds: Credentials,
) -> Result<Json<KeyChange>> {
    let cache = creds.cache(&app, &cache, Permission::Admin)?;
    let _one_at_a_time = app.caches.key_change().await;
    let (cache, retired) = {
        let _alone = app.caches.exclusive().await;
        app.caches.retire_old_signers(&cache.name)?
    };
    tracing::info!(cache = %cache.name, retired = ?retired, "re-signing");
    walk(&app, cache, retired).await
}

/// Brings every narinfo of `cache` to its current signers.
async fn walk(app: &Arc<App>, cache: Arc<Cache>, retired: Vec<String>) -> Result<Json<KeyChange>> {
    let index = app.index.clone();
    let walked = cache.clone();
    let done =
        blocking(move || Ok(crate::signatures::resign_all(index.as_ref(), &walked)?)).await?;
    app.index.flush()?;
    Ok(Json(KeyChange {
        public_key: cache.public_key().to_string(),
        signing_keys: cache
            .signers
            .iter()
            .map(|k| k.public().to_string())
            .collect(),
        retired,
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
    // No publication is under way: one could otherwise commit a path whose reference
    // is being deleted.
    let alone = app.caches.exclusive().await;
    let deleted = blocking(move || {
        let _alone = alone;
        crate::removal::delete_paths(index.as_ref(), &cache.name, &hashes, with)
    })
    .await?;
    Ok(Json(Deleted {
        deleted: deleted.iter().map(StorePath::full).collect(),
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
        .map(|s| crate::caches::now().saturating_add(s));
    let grants = Grants {
        permissions: req.permissions,
        caches: req.caches,
    };
    let made = app.auth.create(&req.name, grants, expires)?;
    tracing::info!(token = %made.record.name, by = %by.name, "token created");
    Ok((
        StatusCode::CREATED,
        Json(CreatedToken {
            token: TokenInfo::from(&made.record),
            secret: made.secret.to_string(),
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
    let revoked = app.auth.revoke(&name)?;
    tracing::info!(token = %revoked.name, by = %by.name, "token revoked");
    Ok(Json(TokenInfo::from(&revoked)))
}
