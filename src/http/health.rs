//! `/health` (the process answers), `/ready` (the index and the storage are usable)
//! and `/metrics` (Prometheus text), for orchestrators and monitoring. None needs a
//! token: they say nothing about the caches or their contents. The caches' figures in
//! `/metrics` are added for a server admin token only.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde::Serialize;

use super::extract::Credentials;
use crate::app::App;

/// What `/health` and `/ready` answer.
#[derive(Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Status {
    /// `ok` or `unavailable`.
    pub status: String,
    /// Per part, `ok` or why not (`/ready` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<String>,
    /// See `index`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storage: Option<String>,
}

/// `GET /health`: liveness.
pub async fn health() -> Json<Status> {
    Json(Status {
        status: "ok".into(),
        index: None,
        storage: None,
    })
}

/// `GET /ready`: 200 when the metadata can be written and the storage written, read
/// and deleted; 503 otherwise, naming the part that is not.
pub async fn ready(State(app): State<Arc<App>>) -> impl IntoResponse {
    let r = app.readiness().await;
    let word = |ok: bool| if ok { "ok" } else { "unavailable" }.to_owned();
    let ok = r.index && r.storage;
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = Status {
        status: word(ok),
        index: Some(word(r.index)),
        storage: Some(word(r.storage)),
    };
    (status, Json(body))
}

/// `GET /metrics`. With a server admin token (a scraper's `bearer_token`), each
/// cache's use and quota too: those series name the caches, private ones included,
/// which nobody else may learn.
pub async fn metrics(State(app): State<Arc<App>>, creds: Credentials) -> impl IntoResponse {
    let mut text = app.metrics.render();
    if app.auth.server_admin(creds.token()).is_ok() {
        let mut figures = Vec::new();
        for cache in app.caches.all() {
            if let Ok(stats) = app.index.cache_stats(&cache.name).await {
                figures.push(crate::metrics::CacheFigures {
                    name: cache.name.to_string(),
                    used_bytes: stats.used_bytes(),
                    quota_bytes: app.config.quota.of(cache.record.quota_bytes),
                });
            }
        }
        text.push_str(&crate::metrics::render_caches(&figures));
    }
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text)
}
