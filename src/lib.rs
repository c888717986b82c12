//! cachet: a self-hosted Nix binary cache server with chunk-level deduplication.
//! ARCHITECTURE.md maps the modules and their invariants.

pub mod app;
pub mod auth;
pub mod caches;
pub mod config;
pub mod error;
pub mod http;
pub mod index;
pub mod ingest;
pub mod nix;
pub mod publish;
pub mod serve;
pub mod server;
pub mod store;
#[cfg(test)]
mod testing;
