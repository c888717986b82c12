//! `/health` (the process answers), `/ready` (the index and the storage are usable)
//! and `/metrics` (Prometheus text), for orchestrators and monitoring. None needs a
//! token: they say nothing about the caches' contents.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde::Serialize;

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

/// `GET /metrics`; each cache's figures are read now.
pub async fn metrics(State(app): State<Arc<App>>) -> impl IntoResponse {
    let m = &app.metrics;
    m.cache_used_bytes.clear();
    m.cache_quota_bytes.clear();
    for cache in app.caches.all() {
        let labels = crate::metrics::CacheLabels {
            cache: cache.name.to_string(),
        };
        if let Ok(stats) = app.index.cache_stats(&cache.name) {
            m.cache_used_bytes
                .get_or_create(&labels)
                .set(stats.used_bytes() as i64);
        }
        if let Some(q) = app.config.quota.of(cache.record.quota_bytes) {
            m.cache_quota_bytes.get_or_create(&labels).set(q as i64);
        }
    }
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        app.metrics.render(),
    )
}
