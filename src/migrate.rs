//! Growing from one machine: `cachet migrate-index` copies the embedded index into
//! another (PostgreSQL), record by record through the `Index` trait, then checks the
//! copy: the same counts per cache, and every served narinfo's NAR, manifests and chunk
//! records there. The packs are not touched: both indexes name the same ones. Run it
//! with the server stopped (the embedded index is one process's).

use std::collections::BTreeMap;

use crate::index::{BlobKey, CacheStats, Index, PAGE};
use crate::nix::{CacheName, NarInfo, StorePathHash};
use crate::store::{ChunkId, ManifestId, Stored};

/// What was copied.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Copied {
    /// Caches.
    pub caches: u64,
    /// Tokens, revoked ones included.
    pub tokens: u64,
    /// Chunk records.
    pub chunks: u64,
    /// Manifests (with all their segments).
    pub manifests: u64,
    /// NAR records.
    pub nars: u64,
    /// Upload records.
    pub uploads: u64,
    /// Narinfos.
    pub narinfos: u64,
    /// Logs and realisations.
    pub blobs: u64,
    /// Pins.
    pub pins: u64,
}

/// Copies everything of `from` into `to`, which must hold no cache yet.
pub async fn copy(from: &dyn Index, to: &dyn Index) -> anyhow::Result<Copied> {
    anyhow::ensure!(
        to.caches().await?.is_empty(),
        "the target index holds caches already: migrate into an empty database"
    );
    let mut copied = Copied::default();
    // What a record names goes first, as the server writes them.
    let mut after: Option<ChunkId> = None;
    loop {
        let page = from.chunks_after(after.as_ref(), PAGE).await?;
        let Some(last) = page.last() else { break };
        after = Some(last.id);
        to.put_chunks(&page).await?;
        copied.chunks += page.len() as u64;
    }
    let mut after: Option<ManifestId> = None;
    loop {
        let page = from.manifests_after(after.as_ref(), PAGE).await?;
        let Some(last) = page.last() else { break };
        after = Some(*last);
        for id in page {
            let mut index = 0;
            while let Some(segment) = from.segment(&id, index).await? {
                to.put_segment(&id, index, &segment).await?;
                index += 1;
            }
            copied.manifests += 1;
        }
    }
    let mut after = None;
    loop {
        let page = from.nars_after(after.as_ref(), PAGE).await?;
        let Some((last, _)) = page.last() else { break };
        after = Some(*last);
        for (hash, nar) in page {
            to.put_nar(&hash, &nar).await?;
            copied.nars += 1;
        }
    }
    let mut after: Option<(CacheName, crate::nix::NarUrl)> = None;
    loop {
        let page = from.uploads_after(after.as_ref(), PAGE).await?;
        let Some((cache, url, _)) = page.last() else {
            break;
        };
        after = Some((cache.clone(), *url));
        for (cache, url, upload) in page {
            // An upload's NAR record may be gone (collected): it is recorded again only
            // with one.
            if let Some(nar) = from.nar(&upload.nar_hash).await? {
                to.put_upload(&cache, &url, &upload, &nar).await?;
                copied.uploads += 1;
            }
        }
    }
    for token in from.tokens().await? {
        to.put_token(&token).await?;
        copied.tokens += 1;
    }
    for cache in from.caches().await? {
        to.put_cache(&cache).await?;
        copied.caches += 1;
        copied.narinfos += copy_narinfos(from, to, &cache.name).await?;
        let accesses = from.accesses(&cache.name).await?;
        for batch in accesses.chunks(PAGE) {
            to.put_accesses(&cache.name, batch).await?;
        }
        for pin in from.pins(&cache.name).await? {
            to.put_pin(&cache.name, &pin).await?;
            copied.pins += 1;
        }
    }
    let mut after: Option<BlobKey> = None;
    loop {
        let page = from.blobs_after(after.as_ref(), PAGE).await?;
        let Some((last, _)) = page.last() else { break };
        after = Some(last.clone());
        for (key, stored) in page {
            to.put_blob(key.kind, &key.cache, &key.key, &stored).await?;
            copied.blobs += 1;
        }
    }
    if let Some(last_gc) = from.meta(crate::gc::LAST_GC).await? {
        to.put_meta(crate::gc::LAST_GC, &last_gc).await?;
    }
    to.flush().await?;
    Ok(copied)
}

/// Copies the narinfos of `cache`, each with its references; how many.
async fn copy_narinfos(from: &dyn Index, to: &dyn Index, cache: &CacheName) -> anyhow::Result<u64> {
    let mut copied = 0;
    let mut after: Option<StorePathHash> = None;
    loop {
        let page = from.narinfos(cache, after.as_ref(), PAGE).await?;
        let Some((last, _)) = page.last() else { break };
        after = Some(*last);
        for (path, record) in page {
            let narinfo = NarInfo::parse(&record.text)
                .map_err(|_| crate::index::IndexError::corrupt_narinfo(cache, &path))?;
            let references: Vec<StorePathHash> =
                narinfo.foreign_references().map(|r| r.hash()).collect();
            to.commit_narinfo(cache, &path, &record, &references, None)
                .await?;
            copied += 1;
        }
    }
    Ok(copied)
}

/// Compares `to` with `from` after a copy: the same caches with the same counts, and
/// in `to`, every served narinfo's NAR record, its manifests' segments and the chunk
/// records they name. What differs, one line each; empty when the copy is whole.
pub async fn check(from: &dyn Index, to: &dyn Index) -> anyhow::Result<Vec<String>> {
    let mut problems = Vec::new();
    let names = |caches: Vec<crate::index::CacheRecord>| -> Vec<CacheName> {
        caches.into_iter().map(|c| c.name).collect()
    };
    let (ours, theirs) = (names(from.caches().await?), names(to.caches().await?));
    if ours != theirs {
        problems.push(format!("caches differ: {ours:?} against {theirs:?}"));
    }
    let mut stats: BTreeMap<CacheName, (CacheStats, CacheStats)> = BTreeMap::new();
    for cache in &ours {
        stats.insert(
            cache.clone(),
            (from.cache_stats(cache).await?, to.cache_stats(cache).await?),
        );
    }
    // The paths and their bytes must agree. Pending and log bytes are counted anew
    // by the copy: an index upgraded from an older format never counted its old logs,
    // and an upload whose NAR the collector removed is not copied.
    for (cache, (a, b)) in &stats {
        let served = |s: &CacheStats| (s.paths, s.nar_bytes, s.stored_bytes);
        if served(a) != served(b) {
            problems.push(format!("the counts of {cache} differ: {a:?} against {b:?}"));
        }
    }
    if from.tokens().await?.len() != to.tokens().await?.len() {
        problems.push("the tokens differ".into());
    }
    for cache in &ours {
        let mut after: Option<StorePathHash> = None;
        loop {
            let page = to.narinfos(cache, after.as_ref(), PAGE).await?;
            let Some((last, _)) = page.last() else { break };
            after = Some(*last);
            for (path, record) in page {
                let Some(nar) = to.nar(&record.nar_hash).await? else {
                    problems.push(format!("{cache}/{path}: its NAR has no record"));
                    continue;
                };
                for stored in [&nar.contents, &nar.listing] {
                    if let Err(what) = chunks_recorded(to, stored).await? {
                        problems.push(format!("{cache}/{path}: {what}"));
                    }
                }
            }
        }
    }
    Ok(problems)
}

/// Whether every segment of `stored` and every chunk it names is recorded in `index`.
async fn chunks_recorded(
    index: &dyn Index,
    stored: &Stored,
) -> anyhow::Result<std::result::Result<(), String>> {
    for i in 0..stored.segments.len() as u32 {
        let Some(segment) = index.segment(&stored.id, i).await? else {
            return Ok(Err(format!(
                "segment {i} of manifest {:?} is missing",
                stored.id
            )));
        };
        let ids: Vec<ChunkId> = segment.chunks.iter().map(|c| c.id).collect();
        let found = index.chunks(&ids).await?;
        if let Some((id, _)) = ids.iter().zip(&found).find(|(_, f)| f.is_none()) {
            return Ok(Err(format!("chunk {id:?} has no record")));
        }
    }
    Ok(Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::MemoryIndex;

    #[tokio::test]
    async fn a_copy_holds_everything_and_checks_whole_and_a_missing_record_is_found() {
        let from = MemoryIndex::new();
        crate::index::contract::populate(&from).await;
        let to = MemoryIndex::new();
        let copied = copy(&from, &to).await.unwrap();
        assert!(copied.narinfos > 0 && copied.chunks > 0 && copied.caches > 0);
        assert_eq!(check(&from, &to).await.unwrap(), Vec::<String>::new());
        // A second copy into a populated index is refused.
        assert!(copy(&from, &to).await.is_err());
        // A chunk record missing in the copy is said.
        let chunk = to.chunks_after(None, 1).await.unwrap()[0];
        to.delete_chunks(&[chunk.id]).await.unwrap();
        let problems = check(&from, &to).await.unwrap();
        assert!(
            problems.iter().any(|p| p.contains("has no record")),
            "{problems:?}"
        );
    }
}
