//! The HTTP surface: the binary cache protocol under `/<cache>/` and the admin API
//! under `/_api/v1/`. Handlers are thin: they parse, authorize, and call the layers
//! below; `error` maps every failure to a status.

pub mod api;
mod blobs;
mod cache_info;
pub mod error;
mod extract;
mod nar;
mod narinfo;

use std::sync::Arc;

use axum::routing::get;
use axum::Router;
use tower_http::trace::TraceLayer;

use crate::app::App;
use crate::error::Error;

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/_api/v1/caches/{cache}", get(api::cache_info))
        .route("/{cache}/nix-cache-info", get(cache_info::get))
        .route("/{cache}/{file}", get(narinfo::get).put(narinfo::put))
        .route(
            "/{cache}/nar/{file}",
            get(nar::get).head(nar::head).put(nar::put),
        )
        .route(
            "/{cache}/log/{drv}",
            get(blobs::get_log).put(blobs::put_log),
        )
        .route(
            "/{cache}/realisations/{id}",
            get(blobs::get_realisation).put(blobs::put_realisation),
        )
        .route(
            "/{cache}/build-trace-v2/{drv}/{out}",
            get(blobs::get_trace).put(blobs::put_trace),
        )
        .fallback(|| async { Error::NotFound("route") })
        .layer(TraceLayer::new_for_http())
        .with_state(app)
}
