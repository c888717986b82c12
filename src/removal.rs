//! Deleting store paths from a cache without breaking a closure: a path that another
//! path of the cache refers to goes only with its referrers, and those go first, so a
//! deletion cut short by a crash never leaves a path whose references are missing.
//! The NARs stay stored (other paths and caches may share their chunks) until the
//! garbage collector finds them unclaimed.

use std::collections::{BTreeMap, BTreeSet};

use crate::error::{Error, Result};
use crate::index::{Index, IndexError};
use crate::nix::{CacheName, NarInfo, StorePath, StorePathHash};

/// What a deletion did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// The paths deleted, referrers first.
    pub deleted: Vec<StorePath>,
    /// The paths asked for that the cache does not have: a retry of a deletion that
    /// was cut short finds some gone, and goes on.
    pub missing: Vec<StorePathHash>,
}

/// Deletes `paths` from `cache`, and with `with_referrers` every path that refers to
/// them, transitively. Without it, a path that others refer to is refused with the
/// list of its referrers, and nothing is deleted.
pub fn delete_paths(
    index: &dyn Index,
    cache: &CacheName,
    paths: &[StorePathHash],
    with_referrers: bool,
) -> Result<Outcome> {
    let mut outcome = Outcome::default();
    // Every path to delete, with what it refers to and what refers to it.
    let mut doomed: BTreeMap<StorePathHash, Doomed> = BTreeMap::new();
    let mut queue: Vec<StorePathHash> = paths.to_vec();
    while let Some(path) = queue.pop() {
        if doomed.contains_key(&path) {
            continue;
        }
        let Some(record) = index.narinfo(cache, &path)? else {
            if paths.contains(&path) && !outcome.missing.contains(&path) {
                outcome.missing.push(path);
            }
            continue;
        };
        let narinfo =
            NarInfo::parse(&record.text).map_err(|_| IndexError::corrupt_narinfo(cache, &path))?;
        let referrers: BTreeSet<StorePathHash> = index
            .referrers(cache, &path)?
            .into_iter()
            .filter(|r| *r != path)
            .collect();
        if with_referrers {
            queue.extend(referrers.iter().copied());
        }
        doomed.insert(
            path,
            Doomed {
                references: narinfo.foreign_references().map(StorePath::hash).collect(),
                referrers,
                store_path: narinfo.store_path,
            },
        );
    }
    // Without `with_referrers`, a referrer outside the set breaks the closure.
    let mut outside = BTreeSet::new();
    for d in doomed.values() {
        outside.extend(
            d.referrers
                .iter()
                .filter(|r| !doomed.contains_key(r))
                .copied(),
        );
    }
    if !outside.is_empty() {
        let mut names = Vec::new();
        for r in &outside {
            let name = match index.narinfo(cache, r)? {
                Some(record) => NarInfo::parse(&record.text)
                    .map(|n| n.store_path.full())
                    .unwrap_or_else(|_| r.to_string()),
                None => r.to_string(),
            };
            names.push(name);
        }
        return Err(Error::Conflict(format!(
            "other paths of {cache} refer to what would be deleted, which would break their \
             closures (with_referrers, or cache-admin's --with-referrers, deletes them too): {}",
            names.join(" ")
        )));
    }
    // Referrers before what they refer to: a path goes once nothing left in the set
    // refers to it. Store references have no cycles but a path's reference to itself.
    while !doomed.is_empty() {
        let ready: Vec<StorePathHash> = doomed
            .iter()
            .filter(|(_, d)| d.referrers.iter().all(|r| !doomed.contains_key(r)))
            .map(|(p, _)| *p)
            .collect();
        if ready.is_empty() {
            return Err(Error::Internal(format!(
                "reference cycle among paths of {cache}"
            )));
        }
        for path in ready {
            let d = doomed.remove(&path).expect("listed above");
            if index.delete_narinfo(cache, &path, &d.references)? {
                tracing::info!(cache = %cache, path = %d.store_path, "deleted store path");
                outcome.deleted.push(d.store_path);
            }
        }
    }
    index.flush()?;
    Ok(outcome)
}

struct Doomed {
    store_path: StorePath,
    references: Vec<StorePathHash>,
    referrers: BTreeSet<StorePathHash>,
}
