//! The HTTP surface: the binary cache protocol under `/<cache>/`, the admin API under
//! `/_api/v1/`, pages for people, and `/health`, `/ready`, `/metrics`. Handlers are
//! thin: they parse, authorize, and call the layers below; `error` maps every failure
//! to a status.
//!
//! Every request enters through `Service`: it gets an id (`x-request-id`, kept from a
//! proxy that set one) that its log lines carry, a count and a latency in the metrics;
//! a handler that panics costs its own request a 500, not the server.

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

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use axum::http::{HeaderName, HeaderValue, Method, StatusCode};
use axum::response::Response;
use axum::routing::{delete, get, post};
use axum::Router;
use tower::ServiceExt as _;
use tower_http::catch_panic::CatchPanicLayer;
use tracing::Instrument as _;

use crate::app::App;
use crate::error::Error;
use crate::metrics::{FamilyLabels, RequestLabels};

/// Marks a request that came over the server's own TLS.
#[derive(Debug, Clone, Copy)]
pub struct OverTls;

/// The client a trusted proxy names for a request it forwards (see `server::client`);
/// other requests are their connection's peer's (`body::Peer::address`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub std::net::IpAddr);

/// The header that carries a request's id.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The server's routes. A handler that panics costs its own request a 500.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/", get(page::index))
        .route("/health", get(health::health))
        .route("/ready", get(health::ready))
        .route("/metrics", get(health::metrics))
        .route(
            "/_api/v1/caches",
            get(api::list_caches).post(api::create_cache),
        )
        .route(
            "/_api/v1/caches/{cache}",
            get(api::cache_info)
                .patch(api::update_cache)
                .delete(api::delete_cache),
        )
        .route("/_api/v1/caches/{cache}/keys", get(api::keys))
        .route("/_api/v1/caches/{cache}/keys/rotate", post(api::rotate))
        .route("/_api/v1/caches/{cache}/keys/resign", post(api::resign))
        .route(
            "/_api/v1/caches/{cache}/paths/delete",
            post(api::delete_paths),
        )
        .route(
            "/_api/v1/tokens",
            get(api::list_tokens).post(api::create_token),
        )
        .route("/_api/v1/tokens/{name}", delete(api::revoke_token))
        .route("/_api/v1/gc", post(api::maintenance::gc))
        .route("/_api/v1/verify", post(api::maintenance::verify))
        .route("/_api/v1/jobs/{id}", get(api::maintenance::job))
        .route("/_api/v1/stats", get(api::maintenance::stats))
        .route(
            "/_api/v1/caches/{cache}/pins",
            get(api::maintenance::pins).post(api::maintenance::add_pin),
        )
        .route(
            "/_api/v1/caches/{cache}/pins/{name}",
            delete(api::maintenance::remove_pin),
        )
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
        .with_state(app)
}

/// Where every request enters: it gets a count and a latency in the metrics, a log line
/// if it failed (with its id, method, URL and cause), and an id in `x-request-id` when
/// a log line names it (a proxy's id is kept); a request that changes something (an
/// upload) runs in a span carrying its id, so every line it logs has it. One function rather than a
/// stack of middleware layers, and no span for reads: this is the narinfo path, where
/// each layer's boxing and cloning, and above all a span's formatted fields (a fifth
/// of a narinfo lookup's instructions), showed in the profile.
#[derive(Clone)]
pub struct Service {
    router: Router,
    metrics: Arc<crate::metrics::Metrics>,
    /// A random prefix for this run of the server, and a counter: ids such as
    /// `5f3a9c2e-17`, unique across restarts in practice, with no system call.
    id_prefix: Arc<str>,
    next_id: Arc<std::sync::atomic::AtomicU64>,
}

impl Service {
    /// The entry point of `app`'s routes.
    pub fn new(app: Arc<App>) -> Self {
        let mut seed = [0u8; 4];
        getrandom::fill(&mut seed).expect("the operating system's random source failed");
        Self {
            metrics: app.metrics.clone(),
            router: router(app),
            id_prefix: seed
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
                .into(),
            next_id: Arc::new(std::sync::atomic::AtomicU64::new(1)),
        }
    }

    /// A new request id.
    fn new_id(prefix: &str, next: &std::sync::atomic::AtomicU64) -> HeaderValue {
        let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        HeaderValue::try_from(format!("{prefix}-{n}")).expect("hex digits, a dash and digits")
    }

    /// Handles one request.
    pub fn call<B>(&self, req: axum::http::Request<B>) -> impl Future<Output = Response> + Send
    where
        B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<axum::BoxError>,
    {
        let (method, uri) = (req.method().clone(), req.uri().clone());
        let client = req
            .extensions()
            .get::<ClientAddr>()
            .map(|c| c.0)
            .or_else(|| {
                let peer = req.extensions().get::<crate::body::Peer>();
                peer.and_then(crate::body::Peer::address)
            });
        let reads = matches!(method, Method::GET | Method::HEAD);
        // An id is made when a log line will name it: for every upload, and for a read
        // only if it fails. One a proxy gave is always kept and returned.
        let (prefix, next) = (self.id_prefix.clone(), self.next_id.clone());
        let id = match req.headers().get(REQUEST_ID) {
            Some(given) => Some(given.clone()),
            None if reads => None,
            None => Some(Self::new_id(&prefix, &next)),
        };
        let span = match (&id, reads) {
            (Some(id), false) => Some(tracing::info_span!(
                "request",
                id = id.to_str().unwrap_or("-"),
                %method,
                %uri,
            )),
            _ => None,
        };
        let family = family(uri.path());
        let (router, metrics) = (self.router.clone(), self.metrics.clone());
        let started = Instant::now();
        let handled = async move {
            let mut response = if req.extensions().get::<TooBusy>().is_some() {
                too_busy()
            } else {
                match router.oneshot(req.map(axum::body::Body::new)).await {
                    Ok(r) => r,
                    Err(never) => match never {},
                }
            };
            let status = response.status();
            metrics
                .requests
                .get_or_create(&RequestLabels {
                    family,
                    status: status.as_u16(),
                })
                .inc();
            metrics
                .request_seconds
                .get_or_create(&FamilyLabels { family })
                .observe(started.elapsed().as_secs_f64());
            let id = match response.extensions_mut().remove() {
                Some(error::Failure(cause)) => {
                    let id = id.unwrap_or_else(|| Self::new_id(&prefix, &next));
                    let shown = id.to_str().unwrap_or("-");
                    // Formatted only if the line is written: most refusals (misses)
                    // are not.
                    let client = Shown(client);
                    if status.is_server_error() {
                        tracing::error!(id = shown, %client, %method, %uri, %status, error = %cause, "request failed");
                    } else {
                        tracing::debug!(id = shown, %client, %method, %uri, %status, error = %cause, "request refused");
                    }
                    Some(id)
                }
                None => id,
            };
            if let Some(id) = id {
                response.headers_mut().insert(REQUEST_ID, id);
            }
            response
        };
        match span {
            Some(span) => futures::future::Either::Left(handled.instrument(span)),
            None => futures::future::Either::Right(handled),
        }
    }
}

/// Marks a request of a client that a trusted proxy forwards and that has
/// `server.max_connections_per_address` requests in flight already.
#[derive(Debug, Clone, Copy)]
pub struct TooBusy;

/// The answer to a `TooBusy` request: 429, which clients retry, after a second.
fn too_busy() -> Response {
    let mut response = error::text_response(
        StatusCode::TOO_MANY_REQUESTS,
        "too many requests in flight from this address; try again shortly\n".into(),
    );
    response.headers_mut().insert(
        axum::http::header::RETRY_AFTER,
        HeaderValue::from_static("1"),
    );
    response.extensions_mut().insert(error::Failure(
        "the client's requests in flight are at server.max_connections_per_address".into(),
    ));
    response
}

/// An address in a log line, or `-`.
struct Shown(Option<std::net::IpAddr>);

impl std::fmt::Display for Shown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(a) => a.fmt(f),
            None => f.write_str("-"),
        }
    }
}

/// A handler panicked: the client gets a 500 that says only that, and the log the panic
/// (see `Service`).
fn panicked(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(not a string)".into());
    let status = StatusCode::INTERNAL_SERVER_ERROR;
    let mut response = error::text_response(status, error::server_error_text(status));
    let failure = error::Failure(format!("a request handler panicked: {message}"));
    response.extensions_mut().insert(failure);
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
