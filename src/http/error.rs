//! The one place errors become HTTP statuses. The match is exhaustive on purpose: a new
//! error kind must be given a status here, or a malformed input could become a 500.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::error::Error;
use crate::ingest::IngestError;

pub fn status(e: &Error) -> StatusCode {
    match e {
        Error::NotFound(_) => StatusCode::NOT_FOUND,
        Error::BadPath { .. } | Error::BadBody(_) | Error::NarInfo(_) | Error::Rejected(_) => {
            StatusCode::BAD_REQUEST
        }
        Error::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        Error::Unauthorized => StatusCode::UNAUTHORIZED,
        Error::RangeNotSatisfiable { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
        Error::Ingest(e) => match e {
            IngestError::Unsupported(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            IngestError::Decompress { .. }
            | IngestError::Nar(_)
            | IngestError::TrailingData
            | IngestError::Body(_) => StatusCode::BAD_REQUEST,
            IngestError::Storage(e) => storage_status(e),
            IngestError::Index(_) => StatusCode::INTERNAL_SERVER_ERROR,
        },
        Error::Index(_) => StatusCode::INTERNAL_SERVER_ERROR,
        Error::Storage(e) => storage_status(e),
    }
}

/// A chunk that is recorded but missing is corruption (500); any other storage failure
/// is the backend being unavailable (503, which clients retry).
fn storage_status(e: &object_store::Error) -> StatusCode {
    match e {
        object_store::Error::NotFound { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = status(&self);
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        } else {
            tracing::debug!(error = %self, %status, "request refused");
        }
        let mut response = (status, format!("{self}\n")).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
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
    use super::*;
    use crate::error::Rejection;
    use crate::nix::narinfo::NarInfoError;

    #[test]
    fn misses_are_404_and_bad_input_is_4xx() {
        assert_eq!(status(&Error::NotFound("narinfo")), StatusCode::NOT_FOUND);
        let client_errors = [
            Error::NarInfo(NarInfoError::MissingField("NarHash")),
            Error::Rejected(Rejection::UnknownNarUrl("nar/x.nar".into())),
            Error::Ingest(IngestError::TrailingData),
            Error::Ingest(IngestError::Nar(crate::nix::nar::NarError::BadMagic)),
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
        let unavailable = object_store::Error::Generic {
            store: "s3",
            source: "down".into(),
        };
        assert_eq!(
            status(&Error::Storage(unavailable)),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
