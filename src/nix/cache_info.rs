//! `nix-cache-info`, the first thing every client fetches.

use super::store_path::STORE_DIR;

/// The `nix-cache-info` of a cache with `priority`.
pub fn render(priority: u32) -> String {
    format!("StoreDir: {STORE_DIR}\nWantMassQuery: 1\nPriority: {priority}\n")
}
