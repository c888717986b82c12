//! The HTTP surface: the binary cache protocol under `/<cache>/`, the admin API under
//! `/_api/v1/`, pages for people, and `/health`, `/ready`, `/metrics`. Handlers are
//! thin: they parse, authorize, and call the layers below; `error` maps every failure
//! to a status.
//!
//! Every request gets an id (`x-request-id`, kept from a proxy that set one), a span
//! carrying it in the logs, a count and a latency in the metrics; a handler that
//! panics costs its own request a 500, not the server.

pub mod api;
mod blobs;
mod cache_info;
mod content;
pub mod error;
mod extract;
pub mod health;
mod nar;
mod narinfo;
pub mod page;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::{HeaderName, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::app::App;
use crate::error::Error;
use crate::metrics::{FamilyLabels, RequestLabels};

/// The header that carries a request's id.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The server's routes, with the layers every request passes.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/", get(page::index))
        .route("/health", get(health::health))
        .route("/ready", get(health::ready))
        .route("/metrics", get(health::metrics))
        .route("/_api/v1/caches/{cache}", get(api::cache_info))
        .route("/{cache}/", get(page::cache))
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
        .layer(CatchPanicLayer::custom(panicked))
        .layer(axum::middleware::from_fn_with_state(app.clone(), count))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(TraceLayer::new_for_http().make_span_with(span))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .with_state(app)
}

/// Each request's span: what it asked for, and its id, on every line it logs.
fn span(req: &Request) -> tracing::Span {
    let id = req
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    tracing::info_span!("request", id, method = %req.method(), uri = %req.uri())
}

/// A handler panicked: the panic is logged in the request's span, and the client gets
/// a 500 that says only that.
fn panicked(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(not a string)".into());
    tracing::error!(panic = %message, "a request handler panicked");
    let status = StatusCode::INTERNAL_SERVER_ERROR;
    error::text_response(status, error::server_error_text(status))
}

/// Counts every request by route family and status, and times it to its response head.
async fn count(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let family = family(req.uri().path());
    let started = Instant::now();
    let response = next.run(req).await;
    let m = &app.metrics;
    m.requests
        .get_or_create(&RequestLabels {
            family,
            status: response.status().as_u16(),
        })
        .inc();
    m.request_seconds
        .get_or_create(&FamilyLabels { family })
        .observe(started.elapsed().as_secs_f64());
    response
}

/// The route family of a path, for the metrics (a fixed set, whatever clients send).
pub fn family(path: &str) -> &'static str {
    let mut parts = path.strip_prefix('/').unwrap_or(path).splitn(3, '/');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(""), None, None) => "page",
        (Some("_api"), _, _) => "api",
        (Some("health"), None, None) => "health",
        (Some("ready"), None, None) => "ready",
        (Some("metrics"), None, None) => "metrics",
        (Some(_), Some(""), None) => "page",
        (Some(_), Some("nix-cache-info"), None) => "cache_info",
        (Some(_), Some("nar"), Some(_)) => "nar",
        (Some(_), Some("log"), Some(_)) => "log",
        (Some(_), Some("realisations" | "build-trace-v2"), Some(_)) => "realisation",
        (Some(_), Some(f), None) if f.ends_with(".narinfo") => "narinfo",
        (Some(_), Some(f), None) if f.ends_with(".ls") => "listing",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use tower::ServiceExt as _;

    use super::*;

    #[tokio::test]
    async fn a_panicking_handler_costs_its_request_a_500() {
        let router: Router = Router::new()
            .route(
                "/boom",
                get(|| async {
                    if true {
                        panic!("a bug");
                    }
                    "unreachable"
                }),
            )
            .route("/fine", get(|| async { "fine" }))
            .layer(CatchPanicLayer::custom(panicked));
        let call = |path: &'static str| {
            let request = axum::http::Request::get(path)
                .body(axum::body::Body::empty())
                .unwrap();
            router.clone().oneshot(request)
        };
        let r = call("/boom").await.unwrap();
        assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = axum::body::to_bytes(r.into_body(), 1024).await.unwrap();
        assert_eq!(&body[..], b"Internal Server Error\n");
        // The router still serves.
        assert_eq!(call("/fine").await.unwrap().status(), StatusCode::OK);
    }

    #[test]
    fn paths_fall_into_a_few_families() {
        for (path, family_) in [
            ("/", "page"),
            ("/main/", "page"),
            ("/metrics", "metrics"),
            ("/ready", "ready"),
            ("/_api/v1/caches/main", "api"),
            ("/main/nix-cache-info", "cache_info"),
            ("/main/abc.narinfo", "narinfo"),
            ("/main/abc.ls", "listing"),
            ("/main/nar/x.nar.zst", "nar"),
            ("/main/log/x.drv", "log"),
            ("/main/realisations/x.doi", "realisation"),
            ("/main/build-trace-v2/a/b.doi", "realisation"),
            ("/main/favicon.ico", "other"),
            ("/a/b/c/d", "other"),
        ] {
            assert_eq!(family(path), family_, "{path}");
        }
    }
}
