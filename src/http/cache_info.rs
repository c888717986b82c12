//! `GET /<cache>/nix-cache-info`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::header;
use axum::response::IntoResponse;

use super::extract::Credentials;
use crate::app::App;
use crate::error::Result;
use crate::grants::Permission;
use crate::nix::{cache_info, CacheName};

pub async fn get(
    State(app): State<Arc<App>>,
    Path(cache): Path<CacheName>,
    creds: Credentials,
) -> Result<impl IntoResponse> {
    let cache = creds.cache(&app, &cache, Permission::Pull)?;
    Ok((
        [(header::CONTENT_TYPE, "text/x-nix-cache-info")],
        cache_info::render(cache.priority),
    ))
}
