//! The errors requests can end in. `http::error` is the one place they become statuses.

use crate::index::IndexError;
use crate::ingest::IngestError;
use crate::nix::narinfo::NarInfoError;
use crate::nix::StorePath;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("invalid {what}: {reason}")]
    BadPath { what: &'static str, reason: String },
    #[error("invalid request body: {0}")]
    BadBody(String),
    #[error("request body is larger than {0} bytes")]
    TooLarge(usize),
    #[error(transparent)]
    NarInfo(#[from] NarInfoError),
    #[error(transparent)]
    Rejected(#[from] Rejection),
    #[error(transparent)]
    Ingest(#[from] IngestError),
    #[error("credentials required")]
    Unauthorized,
    #[error("range not satisfiable for {size} bytes")]
    RangeNotSatisfiable { size: u64 },
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error("storage: {0}")]
    Storage(#[from] object_store::Error),
}

/// Why a narinfo was refused: what the client claimed and what the server knows differ.
#[derive(Debug, thiserror::Error)]
pub enum Rejection {
    #[error("StorePath {store_path:?} does not have the hash in the URL")]
    StorePathMismatch { store_path: StorePath },
    #[error("URL {0:?} names no NAR uploaded to this cache")]
    UnknownNarUrl(String),
    #[error("NAR URL {url:?} does not name the hash of its body ({actual})")]
    UrlHashMismatch { url: String, actual: String },
    #[error("{field} is {claimed} but the uploaded NAR has {actual}")]
    Mismatch {
        field: &'static str,
        claimed: String,
        actual: String,
    },
    #[error("reference {0} is not in this cache; push references first")]
    MissingReference(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
