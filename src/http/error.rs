//! The one place errors become HTTP statuses. The matches are exhaustive on purpose: a
//! new error kind must be given a status here, or a malformed input could become a 500.
//!
//! A 4xx body says precisely what was wrong, for the client to act on. A 5xx body says
//! only the status: the error itself may name files, keys or internals, so it goes to
//! the log with the request's id, which the response carries in `x-request-id`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::body::BodyError;
use crate::error::Error;
use crate::index::IndexError;
use crate::ingest::IngestError;
use crate::nix::nar::NarError;
use crate::store::space::chain_is_disk_full;

/// The status of an error.
pub fn status(e: &Error) -> StatusCode {
    match e {
        Error::NotFound(_) => StatusCode::NOT_FOUND,
        Error::BadPath { .. } | Error::BadBody(_) | Error::NarInfo(_) | Error::Rejected(_) => {
            StatusCode::BAD_REQUEST
        }
        Error::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        Error::Body(e) => body_status(e),
        Error::Unauthorized => StatusCode::UNAUTHORIZED,
        Error::Forbidden(_) => StatusCode::FORBIDDEN,
        Error::Conflict(_) => StatusCode::CONFLICT,
        Error::Quota(_) => StatusCode::INSUFFICIENT_STORAGE,
        Error::RangeNotSatisfiable { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
        Error::Ingest(e) => match e {
            IngestError::Unsupported(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            IngestError::Nar(NarError::TooManyEntries { .. })
            | IngestError::TooLarge { .. }
            | IngestError::Expansion { .. }
            | IngestError::DecoderMemory { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            IngestError::Quota(_) => StatusCode::INSUFFICIENT_STORAGE,
            IngestError::Decompress { .. } | IngestError::Nar(_) | IngestError::TrailingData => {
                StatusCode::BAD_REQUEST
            }
            IngestError::Body(e) => body_status(e),
            // Nobody reads this answer; a 4xx keeps it out of the server errors.
            IngestError::ClientGone => StatusCode::BAD_REQUEST,
            IngestError::LowSpace(_) => StatusCode::INSUFFICIENT_STORAGE,
            IngestError::Storage(e) => storage_status(e),
            IngestError::Index(e) => index_status(e),
            IngestError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        },
        Error::Index(e) => index_status(e),
        Error::Storage(e) => storage_status(e),
        Error::Read(e) => read_status(e),
        Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// A client that stalls timed out (408, which clients retry on a new request); a body
/// that broke off is the client's failure.
fn body_status(e: &BodyError) -> StatusCode {
    match e {
        BodyError::Stalled { .. } => StatusCode::REQUEST_TIMEOUT,
        BodyError::Broken(_) => StatusCode::BAD_REQUEST,
    }
}

/// A chunk that is recorded but missing is corruption (500); a full disk is 507; any
/// other storage failure is the backend being unavailable (503, which clients retry).
fn storage_status(e: &object_store::Error) -> StatusCode {
    match e {
        object_store::Error::NotFound { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        e if chain_is_disk_full(e) => StatusCode::INSUFFICIENT_STORAGE,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// A store that fails or cannot be reached is unavailable (503); a recorded pack that
/// is missing or short, a frame that does not decompress, a manifest segment that is
/// gone, is damage (500).
fn read_status(e: &std::io::Error) -> StatusCode {
    use std::io::ErrorKind::{NotFound, UnexpectedEof};
    if let Some(store) = e
        .get_ref()
        .and_then(|i| i.downcast_ref::<object_store::Error>())
    {
        return storage_status(store);
    }
    match e.kind() {
        NotFound | UnexpectedEof => StatusCode::INTERNAL_SERVER_ERROR,
        // The disk under a local store.
        _ if e.raw_os_error().is_some() => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The metadata on a full disk is 507; a database that cannot be reached for now is
/// 503 (clients retry); any other failure of it is a bug or damage.
fn index_status(e: &IndexError) -> StatusCode {
    match e {
        IndexError::DiskFull(_) => StatusCode::INSUFFICIENT_STORAGE,
        IndexError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        IndexError::Failed(_) | IndexError::Corrupt { .. } => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// A plain-text response of `status` with `text`.
pub fn text_response(status: StatusCode, text: String) -> Response {
    let mut response = (status, text).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// The body of a 5xx: the status alone.
pub fn server_error_text(status: StatusCode) -> String {
    format!("{}\n", status.canonical_reason().unwrap_or("Server Error"))
}

/// Why a request failed, carried in its response's extensions to the one place that
/// logs it with the request's id, method and URL (`http::Service`).
#[derive(Debug, Clone)]
pub struct Failure(pub String);

/// Whether a 5xx error's text is for the client: a cache at its quota is the
/// pusher's to act on, and says nothing of the server's internals.
fn says_why(e: &Error) -> bool {
    matches!(e, Error::Quota(_) | Error::Ingest(IngestError::Quota(_)))
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = status(&self);
        let text = if status.is_server_error() && !says_why(&self) {
            server_error_text(status)
        } else {
            format!("{self}\n")
        };
        let mut response = text_response(status, text);
        response.extensions_mut().insert(Failure(self.to_string()));
        let headers = response.headers_mut();
        match self {
            Error::Unauthorized => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"cachet\""),
                );
            }
            Error::RangeNotSatisfiable { size } => {
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                    headers.insert(header::CONTENT_RANGE, v);
                }
            }
            _ => {}
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::*;
    use crate::error::Rejection;
    use crate::nix::narinfo::NarInfoError;

    fn full() -> io::Error {
        io::Error::from(io::ErrorKind::StorageFull)
    }

    #[test]
    fn misses_are_404_and_bad_input_is_4xx() {
        assert_eq!(status(&Error::NotFound("narinfo")), StatusCode::NOT_FOUND);
        let client_errors = [
            Error::NarInfo(NarInfoError::MissingField("NarHash")),
            Error::Rejected(Rejection::UnknownNarUrl("nar/x.nar".into())),
            Error::Ingest(IngestError::TrailingData),
            Error::Ingest(IngestError::Nar(NarError::BadMagic)),
            Error::Ingest(IngestError::Nar(NarError::TooManyEntries { max: 1 })),
            Error::Ingest(IngestError::DecoderMemory {
                needed_mib: 129,
                budget_mib: 128,
            }),
            Error::Ingest(IngestError::Body(BodyError::Stalled {
                secs: 1,
                min_bytes: 1,
            })),
            Error::Body(BodyError::Broken("reset".into())),
            Error::TooLarge(1),
            Error::Unauthorized,
            Error::BadPath {
                what: "cache",
                reason: "x".into(),
            },
        ];
        for e in client_errors {
            assert!(status(&e).is_client_error(), "{e}");
        }
    }

    #[test]
    fn server_errors_are_bugs_full_disks_or_unavailable_backends() {
        let unavailable = object_store::Error::Generic {
            store: "s3",
            source: "down".into(),
        };
        assert_eq!(
            status(&Error::Storage(unavailable)),
            StatusCode::SERVICE_UNAVAILABLE
        );
        let disk = object_store::Error::Generic {
            store: "local",
            source: Box::new(full()),
        };
        assert_eq!(
            status(&Error::Ingest(IngestError::Storage(disk))),
            StatusCode::INSUFFICIENT_STORAGE
        );
        assert_eq!(
            status(&Error::Index(IndexError::io(&full()))),
            StatusCode::INSUFFICIENT_STORAGE
        );
        assert_eq!(
            status(&Error::Index(IndexError::Unavailable("restarting".into()))),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            status(&Error::Index(IndexError::Failed("bad".into()))),
            StatusCode::INTERNAL_SERVER_ERROR
        );
        let low = crate::store::space::LowSpace {
            dir: "/x".into(),
            free_mib: 1,
            promised_mib: 0,
            min_mib: 2,
        };
        assert_eq!(
            status(&Error::Ingest(IngestError::LowSpace(low))),
            StatusCode::INSUFFICIENT_STORAGE
        );
        // A failed task or compressor is a bug, never "retry later".
        assert_eq!(
            status(&Error::Ingest(IngestError::Internal("zstd".into()))),
            StatusCode::INTERNAL_SERVER_ERROR
        );
        assert_eq!(
            status(&Error::Index(IndexError::corrupt("narinfo", b"k"))),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }

    #[tokio::test]
    async fn server_error_bodies_say_only_the_status_and_client_errors_say_why() {
        let e = Error::Index(IndexError::corrupt("narinfo", b"/secret/path"));
        let r = e.into_response();
        assert_eq!(r.status(), 500);
        let body = axum::body::to_bytes(r.into_body(), 1024).await.unwrap();
        assert_eq!(&body[..], b"Internal Server Error\n");
        let r = Error::Rejected(Rejection::MissingReference("/nix/store/x".into())).into_response();
        let body = axum::body::to_bytes(r.into_body(), 1024).await.unwrap();
        assert!(String::from_utf8_lossy(&body).contains("push references first"));
    }
}
