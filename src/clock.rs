//! The time records carry: whole seconds since the Unix epoch.

/// Seconds since the epoch, now (0 on a clock set before it).
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
