//! The errors requests can end in. `http::error` is the one place they become statuses.

use crate::body::{BodyError, CollectError};
use crate::index::IndexError;
use crate::ingest::IngestError;
use crate::nix::narinfo::NarInfoError;
use crate::nix::StorePath;

/// How a request failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// What was asked for does not exist (a miss).
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The URL names something malformed.
    #[error("invalid {what}: {reason}")]
    BadPath {
        /// What part of the URL.
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The body is malformed.
    #[error("invalid request body: {0}")]
    BadBody(String),
    /// The body is over its limit.
    #[error("request body is larger than {0} bytes")]
    TooLarge(u64),
    /// The body stalled or broke off.
    #[error("request body: {0}")]
    Body(#[from] BodyError),
    /// The narinfo does not parse.
    #[error(transparent)]
    NarInfo(#[from] NarInfoError),
    /// The narinfo disagrees with what the server knows.
    #[error(transparent)]
    Rejected(#[from] Rejection),
    /// The upload was refused or failed.
    #[error(transparent)]
    Ingest(#[from] IngestError),
    /// The cache is at its quota.
    #[error(transparent)]
    Quota(#[from] crate::quota::QuotaExceeded),
    /// Credentials are missing or wrong.
    #[error("credentials required")]
    Unauthorized,
    /// The credentials are valid but do not allow this.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// The request contradicts the state it would change.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The `Range` lies outside the body.
    #[error("range not satisfiable for {size} bytes")]
    RangeNotSatisfiable {
        /// The body's size.
        size: u64,
    },
    /// The metadata failed.
    #[error(transparent)]
    Index(#[from] IndexError),
    /// The chunk storage failed.
    #[error("storage: {0}")]
    Storage(#[from] object_store::Error),
    /// Reading stored content for a response failed before it began.
    #[error("reading stored content: {0}")]
    Read(std::io::Error),
    /// A bug: a task panicked, an invariant broke.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<crate::quota::ChargeError> for Error {
    fn from(e: crate::quota::ChargeError) -> Self {
        match e {
            crate::quota::ChargeError::Exceeded(e) => Self::Quota(e),
            crate::quota::ChargeError::Index(e) => Self::Index(e),
        }
    }
}

impl From<CollectError> for Error {
    fn from(e: CollectError) -> Self {
        match e {
            CollectError::TooLarge(limit) => Self::TooLarge(limit),
            CollectError::Body(e) => Self::Body(e),
        }
    }
}

/// Why a narinfo was refused: what the client claimed and what the server knows differ.
#[derive(Debug, thiserror::Error)]
pub enum Rejection {
    /// The narinfo's StorePath is not the path of its URL.
    #[error("StorePath {store_path:?} does not have the hash in the URL")]
    StorePathMismatch {
        /// The path the narinfo names.
        store_path: StorePath,
    },
    /// The narinfo's URL names no upload of this cache.
    #[error("URL {0:?} names no NAR uploaded to this cache")]
    UnknownNarUrl(String),
    /// A NAR was uploaded under a URL that is not the hash of its body.
    #[error("NAR URL {url:?} does not name the hash of its body ({actual})")]
    UrlHashMismatch {
        /// The URL.
        url: String,
        /// The body's hash.
        actual: String,
    },
    /// A field disagrees with the uploaded NAR.
    #[error("{field} is {claimed} but the uploaded NAR has {actual}")]
    Mismatch {
        /// Which field.
        field: &'static str,
        /// What the narinfo says.
        claimed: String,
        /// What the server computed.
        actual: String,
    },
    /// A reference is not in the cache yet.
    #[error("reference {0} is not in this cache; push references first")]
    MissingReference(String),
}

/// What requests return.
pub type Result<T, E = Error> = std::result::Result<T, E>;
