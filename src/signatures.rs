//! The signatures a cache serves on its narinfos: its signing keys' (one, or two
//! during a key rotation), and the clients' when the cache keeps them. The same rule
//! signs a narinfo at publication and rewrites every stored one when the keys change.

use std::collections::BTreeMap;

use crate::caches::Cache;
use crate::index::{Index, IndexError, Result};
use crate::nix::{CacheName, NarInfo};

/// Narinfos read from the index at a time during a walk.
const PAGE: usize = 512;

/// Gives `narinfo` the signatures `cache` serves: those of its signers, and the
/// client's unless they are dropped or made under one of the cache's own key names.
pub fn apply(narinfo: &mut NarInfo, cache: &Cache) {
    let keep = cache.keep_client_signatures;
    narinfo
        .sigs
        .retain(|s| keep && !cache.key_names.iter().any(|k| k == s.key_name()));
    let fingerprint = narinfo.fingerprint();
    for key in &cache.signers {
        narinfo.sigs.push(key.sign(&fingerprint));
    }
}

/// What a walk over a cache's narinfos did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Resigned {
    /// Narinfos looked at.
    pub paths: u64,
    /// Narinfos whose signatures changed.
    pub rewritten: u64,
}

/// Rewrites every narinfo of `cache` whose signatures are not what `apply` gives
/// (after a key was added or retired). Idempotent: a walk cut short is finished by
/// running it again. A narinfo that changed since its page was read (deleted, or
/// deleted and pushed again) is left as it is: one published since was signed by the
/// current signers.
pub async fn resign_all(index: &dyn Index, cache: &Cache) -> Result<Resigned> {
    let mut done = Resigned::default();
    let mut after = None;
    while let Some(page) = next_page(index, &cache.name, &mut after).await? {
        for (path, record) in &page {
            done.paths += 1;
            let text = &record.text;
            let mut narinfo = parse(&cache.name, path, text)?;
            let before = narinfo.sigs.clone();
            apply(&mut narinfo, cache);
            if narinfo.sigs != before
                && index
                    .replace_narinfo(&cache.name, path, text, narinfo.render().as_bytes(), None)
                    .await?
            {
                done.rewritten += 1;
            }
        }
    }
    Ok(done)
}

/// How many narinfos of `cache` carry a signature under each key name (the cache's
/// and the clients').
pub async fn count_by_key(
    index: &dyn Index,
    cache: &CacheName,
) -> Result<(u64, BTreeMap<String, u64>)> {
    let mut counts = BTreeMap::new();
    let mut paths = 0;
    let mut after = None;
    while let Some(page) = next_page(index, cache, &mut after).await? {
        for (path, record) in &page {
            paths += 1;
            for sig in parse(cache, path, &record.text)?.sigs {
                *counts.entry(sig.key_name().to_owned()).or_insert(0) += 1;
            }
        }
    }
    Ok((paths, counts))
}

fn parse(cache: &CacheName, path: &crate::nix::StorePathHash, text: &[u8]) -> Result<NarInfo> {
    NarInfo::parse(text).map_err(|_| IndexError::corrupt_narinfo(cache, path))
}

/// The next page of the narinfos of `cache` after `after` (which it moves on), or
/// `None` at the end.
async fn next_page(
    index: &dyn Index,
    cache: &CacheName,
    after: &mut Option<crate::nix::StorePathHash>,
) -> Result<Option<Vec<(crate::nix::StorePathHash, crate::index::NarInfoRecord)>>> {
    let page = index.narinfos(cache, after.as_ref(), PAGE).await?;
    match page.last() {
        Some((last, _)) => {
            *after = Some(*last);
            Ok(Some(page))
        }
        None => Ok(None),
    }
}
