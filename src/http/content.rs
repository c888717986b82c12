//! Responses of stored content (NARs, listings, logs): the bytes of a manifest, whole
//! or the `Range` asked for, streamed from the packs.

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use futures::StreamExt as _;

use crate::app::App;
use crate::coord::Lease;
use crate::error::{Error, Result};
use crate::serve::{self, range, Encoding};
use crate::store::Stored;

/// A response of the bytes of `stored` in `encoding`, whole or the `Range` asked
/// for: NARs, listings and logs are all served this way.
///
/// `epoch` was entered before `stored` was read, and is held until the body ends: the
/// garbage collector deletes nothing that a body still reads.
pub async fn stream(
    app: &App,
    epoch: Lease,
    stored: &Stored,
    encoding: Encoding,
    headers: &HeaderMap,
    content_type: &'static str,
) -> Result<Response> {
    let size = encoding.body_size(stored);
    let requested = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let range = range::parse(requested, size).map_err(|_| Error::RangeNotSatisfiable { size })?;
    let (status, span) = match &range {
        Some(r) => (StatusCode::PARTIAL_CONTENT, r.clone()),
        None => (StatusCode::OK, 0..size),
    };
    let len = span.end - span.start;
    let mut body = Box::pin(serve::body(&app.serve, stored, encoding, span.clone()));
    // The first read comes before the status: a store that cannot be read (an S3
    // store down) answers 503 rather than a 200 whose body breaks at once. Later
    // failures can only cut the body short of its Content-Length.
    let first = match body.next().await {
        Some(Err(e)) => return Err(Error::Read(e)),
        first => first,
    };
    let body = futures::stream::iter(first).chain(body).map(move |read| {
        let _held = &epoch;
        read
    });
    let mut response = (status, Body::from_stream(body)).into_response();
    content_headers(&mut response, content_type, len);
    if range.is_some() {
        let v = format!("bytes {}-{}/{size}", span.start, span.end - 1);
        response.headers_mut().insert(
            header::CONTENT_RANGE,
            HeaderValue::from_str(&v).expect("ASCII"),
        );
    }
    Ok(response)
}

/// The headers of a response of stored content: its type, its length, ranges served.
pub fn content_headers(r: &mut Response, content_type: &'static str, len: u64) {
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
}
