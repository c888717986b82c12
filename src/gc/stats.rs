//! What the storage holds, for `cache-admin stats`: per cache its paths and bytes, and
//! for the server the chunks, packs and the dead bytes in packs that compaction would
//! reclaim.

use std::collections::HashSet;

use crate::error::Result;
use crate::index::Index;
use crate::nix::CacheName;
use crate::store::PackInfo;

/// The figures of the server, or of one cache.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Stats {
    /// The cache these are for; none for the whole server.
    pub cache: Option<String>,
    /// Store paths served.
    pub paths: u64,
    /// The sum of their NAR sizes.
    pub nar_bytes: u64,
    /// Bytes stored: for the server, the packs; for a cache, its NARs' frames (before
    /// the sharing of chunks between NARs and caches).
    pub stored_bytes: u64,
    /// `nar_bytes / stored_bytes`.
    pub dedup_ratio: f64,
    /// Chunk records (server only).
    pub chunks: u64,
    /// Packs stored (server only).
    pub packs: u64,
    /// Bytes of packs that no manifest names (server only): what compaction would
    /// reclaim.
    pub dead_bytes: u64,
    /// The last garbage collection's report, if any ran.
    pub last_gc: Option<super::Report>,
    /// For a cache: what it holds against its quota (its paths' stored bytes, its
    /// uploads waiting for a narinfo, its logs and realisations).
    #[serde(default)]
    pub used_bytes: u64,
    /// For a cache: its quota, if it has one (its own or the server's default).
    #[serde(default)]
    pub quota_bytes: Option<u64>,
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// The figures of `cache` (whose quota is `quota`), or of the server with `packs`
/// listed.
pub async fn stats(
    index: &dyn Index,
    cache: Option<&CacheName>,
    quota: Option<u64>,
    packs: &[PackInfo],
) -> Result<Stats> {
    let last_gc = index
        .meta(super::LAST_GC)
        .await?
        .and_then(|v| serde_json::from_slice(&v).ok());
    if let Some(c) = cache {
        let s = index.cache_stats(c).await?;
        return Ok(Stats {
            cache: Some(c.to_string()),
            paths: s.paths,
            nar_bytes: s.nar_bytes,
            stored_bytes: s.stored_bytes,
            dedup_ratio: ratio(s.nar_bytes, s.stored_bytes),
            last_gc,
            used_bytes: s.used_bytes(),
            quota_bytes: quota,
            ..Stats::default()
        });
    }
    let mut out = Stats {
        last_gc,
        ..Stats::default()
    };
    for c in index.caches().await? {
        let s = index.cache_stats(&c.name).await?;
        out.paths += s.paths;
        out.nar_bytes += s.nar_bytes;
    }
    let mut after = None;
    loop {
        let page = index
            .chunks_after(after.as_ref(), crate::index::PAGE)
            .await?;
        let Some(last) = page.last() else { break };
        after = Some(last.id);
        out.chunks += page.len() as u64;
    }
    let none = HashSet::new();
    let live = super::live_now(
        index,
        &none,
        &HashSet::new(),
        &HashSet::new(),
        &Default::default(),
    )
    .await?;
    for p in packs {
        out.packs += 1;
        out.stored_bytes += p.size;
        let used = live.used.get(&p.id).copied().unwrap_or(0);
        out.dead_bytes += p.size.saturating_sub(used);
    }
    out.dedup_ratio = ratio(out.nar_bytes, out.stored_bytes);
    Ok(out)
}
