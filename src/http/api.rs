//! The JSON admin API under `/_api/v1/`, which `cache-admin` talks to.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::Json;
use serde::Serialize;

use super::extract::Credentials;
use crate::app::App;
use crate::auth::Permission;
use crate::error::Result;
use crate::nix::CacheName;

/// A cache as the admin API describes it.
#[derive(Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct CacheInfo {
    /// Its name.
    pub name: String,
    /// Whether anyone may pull from it.
    pub public: bool,
    /// Its public key, for `trusted-public-keys`.
    pub public_key: String,
    /// The priority its `nix-cache-info` announces.
    pub priority: u32,
    /// The store directory its paths live in.
    pub store_dir: String,
}

/// `GET /_api/v1/caches/<cache>`: readable by whoever may pull from the cache.
pub async fn cache_info(
    State(app): State<Arc<App>>,
    Path(cache): Path<CacheName>,
    creds: Credentials,
) -> Result<Json<CacheInfo>> {
    let cache = creds.cache(&app, &cache, Permission::Pull)?;
    Ok(Json(CacheInfo {
        name: cache.name.to_string(),
        public: cache.public,
        public_key: cache.public_key.to_string(),
        priority: cache.priority,
        store_dir: crate::nix::store_path::STORE_DIR.to_owned(),
    }))
}
