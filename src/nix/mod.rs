//! Nix's formats, pure: bytes in, bytes out. Nothing here does I/O beyond reading a
//! `Read` it is handed, and nothing depends on tokio or HTTP.

pub mod base32;
pub mod blob_name;
pub mod cache_info;
pub mod cache_name;
pub mod compression;
pub mod hash;
pub mod nar;
pub mod nar_url;
pub mod narinfo;
#[cfg(test)]
mod properties;
pub mod signing;
pub mod store_path;

pub use cache_name::CacheName;
pub use compression::Compression;
pub use hash::Sha256;
pub use nar_url::NarUrl;
pub use narinfo::NarInfo;
pub use store_path::{StorePath, StorePathHash};
