//! `nix-cache-info`, the first thing every client fetches.

use super::store_path::STORE_DIR;

pub fn render(priority: u32) -> String {
    format!("StoreDir: {STORE_DIR}\nWantMassQuery: 1\nPriority: {priority}\n")
}
