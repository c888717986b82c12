//! cachet: a self-hosted Nix binary cache server with chunk-level deduplication.
//! ARCHITECTURE.md maps the modules and their invariants.
#![warn(missing_docs)]

pub mod access;
pub mod admin;
pub mod allocator;
pub mod app;
pub mod auth;
pub mod body;
pub mod budget;
pub mod caches;
pub mod clock;
pub mod config;
pub mod coord;
pub mod error;
pub mod gc;
pub mod grants;
pub mod http;
pub mod index;
pub mod ingest;
pub mod jobs;
pub mod keyfiles;
pub mod keyseal;
pub mod metrics;
pub mod nix;
pub mod pins;
pub mod publish;
pub mod quota;
pub mod removal;
pub mod secret_file;
pub mod serve;
pub mod server;
pub mod signatures;
pub mod stall;
pub mod store;
pub mod testing;
pub mod verify;
