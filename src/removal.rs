//! Deleting store paths from a cache without breaking a closure: a path that another
//! path of the cache refers to goes only with its referrers, and those go first, so a
//! deletion cut short by a crash never leaves a path whose references are missing.
//! The NARs stay stored (other paths and caches may share their chunks) until the
//! garbage collector finds them unclaimed.

use std::collections::{BTreeSet, HashMap, HashSet};

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

/// Deletions made durable at a time: the database keeps what they change in memory
/// until it is written, so a deletion of tens of thousands of paths would otherwise
/// hold all of it.
const FLUSH_EVERY: usize = 1024;

/// Referrers named in a refusal at most; the count says how many more.
const NAMED_REFERRERS: usize = 20;

/// Deletes `paths` from `cache`, and with `with_referrers` every path that refers to
/// them, transitively. Without it, a path that others refer to is refused with the
/// list of its referrers, and nothing is deleted.
///
/// What it holds grows with the paths deleted only by a hash, a count and the list of
/// references each (and the names it reports), not with what the cache holds.
pub async fn delete_paths(
    index: &dyn Index,
    cache: &CacheName,
    paths: &[StorePathHash],
    with_referrers: bool,
) -> Result<Outcome> {
    let mut outcome = Outcome::default();
    let asked: HashSet<StorePathHash> = paths.iter().copied().collect();
    // Every path to delete, with what it refers to.
    let mut doomed: HashMap<StorePathHash, Doomed> = HashMap::new();
    let mut outside: BTreeSet<StorePathHash> = BTreeSet::new();
    let mut queue: Vec<StorePathHash> = paths.to_vec();
    while let Some(path) = queue.pop() {
        if doomed.contains_key(&path) {
            continue;
        }
        let Some(record) = index.narinfo(cache, &path).await? else {
            if asked.contains(&path) && !outcome.missing.contains(&path) {
                outcome.missing.push(path);
            }
            continue;
        };
        let narinfo =
            NarInfo::parse(&record.text).map_err(|_| IndexError::corrupt_narinfo(cache, &path))?;
        for r in index.referrers(cache, &path).await? {
            if r == path {
                continue;
            }
            if with_referrers {
                queue.push(r);
            } else if !asked.contains(&r) {
                // Without `with_referrers`, a referrer outside the set breaks the
                // closure.
                outside.insert(r);
            }
        }
        doomed.insert(
            path,
            Doomed {
                references: narinfo
                    .foreign_references()
                    .map(StorePath::hash)
                    .filter(|r| *r != path)
                    .collect(),
                store_path: narinfo.store_path,
                referrers_left: 0,
            },
        );
    }
    if !outside.is_empty() {
        return Err(refusal(index, cache, &outside).await);
    }
    // Referrers before what they refer to: a path goes once nothing left in the set
    // refers to it (store references have no cycles but a path's to itself).
    let references: Vec<StorePathHash> = doomed
        .values()
        .flat_map(|d| d.references.iter().copied())
        .collect();
    for r in references {
        if let Some(d) = doomed.get_mut(&r) {
            d.referrers_left += 1;
        }
    }
    let mut ready: Vec<StorePathHash> = doomed
        .iter()
        .filter(|(_, d)| d.referrers_left == 0)
        .map(|(p, _)| *p)
        .collect();
    let mut since_flush = 0;
    while let Some(path) = ready.pop() {
        let d = doomed.remove(&path).expect("ready paths are doomed");
        if index.delete_narinfo(cache, &path, &d.references).await? {
            tracing::info!(cache = %cache, path = %d.store_path, "deleted store path");
            outcome.deleted.push(d.store_path);
            since_flush += 1;
            if since_flush == FLUSH_EVERY {
                index.flush().await?;
                since_flush = 0;
            }
        }
        for r in &d.references {
            if let Some(next) = doomed.get_mut(r) {
                next.referrers_left -= 1;
                if next.referrers_left == 0 {
                    ready.push(*r);
                }
            }
        }
    }
    index.flush().await?;
    if !doomed.is_empty() {
        return Err(Error::Internal(format!(
            "reference cycle among paths of {cache}"
        )));
    }
    Ok(outcome)
}

/// The refusal of a deletion that would leave `outside` (paths of the cache that
/// refer to what would go) with a reference missing, naming some of them.
async fn refusal(index: &dyn Index, cache: &CacheName, outside: &BTreeSet<StorePathHash>) -> Error {
    let mut names = Vec::new();
    for r in outside.iter().take(NAMED_REFERRERS) {
        let name = match index.narinfo(cache, r).await {
            Ok(Some(record)) => NarInfo::parse(&record.text)
                .map(|n| n.store_path.full())
                .unwrap_or_else(|_| r.to_string()),
            _ => r.to_string(),
        };
        names.push(name);
    }
    if outside.len() > NAMED_REFERRERS {
        names.push(format!("and {} more", outside.len() - NAMED_REFERRERS));
    }
    Error::Conflict(format!(
        "other paths of {cache} refer to what would be deleted, which would break their \
         closures (with_referrers, or cache-admin's --with-referrers, deletes them too): {}",
        names.join(" ")
    ))
}

struct Doomed {
    store_path: StorePath,
    /// What it refers to, itself excepted.
    references: Vec<StorePathHash>,
    /// Paths of the set that refer to it and are not deleted yet.
    referrers_left: u32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{MemoryIndex, NarInfoRecord};
    use crate::nix::Sha256;

    fn hash(name: &str) -> StorePathHash {
        let digest = Sha256::digest(name.as_bytes());
        StorePathHash::from_bytes(digest.as_bytes()[..20].try_into().unwrap())
    }

    /// Publishes `name` referring to `refs` (and to itself).
    async fn publish(index: &dyn Index, cache: &CacheName, name: &str, refs: &[&str]) {
        let mut all: Vec<String> = refs.iter().map(|r| format!("{}-{r}", hash(r))).collect();
        all.push(format!("{}-{name}", hash(name)));
        let nar_hash = Sha256::digest(name.as_bytes());
        let text = format!(
            "StorePath: /nix/store/{}-{name}\nURL: nar/x.nar\nCompression: none\n\
             NarHash: {nar_hash}\nNarSize: 1\nReferences: {}\n",
            hash(name),
            all.join(" ")
        );
        let record = NarInfoRecord {
            nar_hash,
            nar_size: 1,
            file_size: 1,
            text: text.into(),
        };
        let references: Vec<StorePathHash> = refs.iter().map(|r| hash(r)).collect();
        index
            .commit_narinfo(cache, &hash(name), &record, &references, None)
            .await
            .unwrap();
    }

    fn names(outcome: &Outcome) -> Vec<String> {
        outcome
            .deleted
            .iter()
            .map(|p| p.full().rsplit('-').next().unwrap().to_owned())
            .collect()
    }

    #[tokio::test]
    async fn referrers_go_first_and_without_them_nothing_goes() {
        let index = MemoryIndex::new();
        let main: CacheName = "main".parse().unwrap();
        publish(&index, &main, "a", &[]).await;
        publish(&index, &main, "b", &["a"]).await;
        publish(&index, &main, "c", &["b"]).await;
        publish(&index, &main, "d", &["a"]).await;
        publish(&index, &main, "other", &[]).await;
        let err = delete_paths(&index, &main, &[hash("a")], false)
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("-b") && text.contains("-d"), "{text}");
        assert!(!text.contains("-c"), "c refers to a through b only: {text}");
        assert!(index.narinfo(&main, &hash("a")).await.unwrap().is_some());
        // Asked for together, a path and its referrers go.
        let both = delete_paths(&index, &main, &[hash("d"), hash("c")], false)
            .await
            .unwrap();
        assert_eq!(names(&both).len(), 2);
        publish(&index, &main, "c", &["b"]).await;
        publish(&index, &main, "d", &["a"]).await;
        let gone = delete_paths(&index, &main, &[hash("a"), hash("nope")], true)
            .await
            .unwrap();
        let order = names(&gone);
        assert_eq!(order.len(), 4, "{order:?}");
        let at = |n: &str| order.iter().position(|o| o == n).unwrap();
        assert!(
            at("c") < at("b") && at("b") < at("a") && at("d") < at("a"),
            "{order:?}"
        );
        assert_eq!(gone.missing, vec![hash("nope")]);
        assert!(index.referrers(&main, &hash("a")).await.unwrap().is_empty());
        assert!(index
            .narinfo(&main, &hash("other"))
            .await
            .unwrap()
            .is_some());
    }

    #[tokio::test]
    async fn a_long_chain_goes_in_one_pass() {
        let index = MemoryIndex::new();
        let main: CacheName = "main".parse().unwrap();
        let names: Vec<String> = (0..3000).map(|i| format!("p{i}")).collect();
        publish(&index, &main, &names[0], &[]).await;
        for w in names.windows(2) {
            publish(&index, &main, &w[1], &[&w[0]]).await;
        }
        let gone = delete_paths(&index, &main, &[hash(&names[0])], true)
            .await
            .unwrap();
        assert_eq!(gone.deleted.len(), 3000);
        assert_eq!(index.cache_stats(&main).await.unwrap().paths, 0);
    }

    #[tokio::test]
    async fn a_refusal_names_a_few_referrers_and_counts_the_rest() {
        let index = MemoryIndex::new();
        let main: CacheName = "main".parse().unwrap();
        publish(&index, &main, "lib", &[]).await;
        for i in 0..50 {
            publish(&index, &main, &format!("app{i}"), &["lib"]).await;
        }
        let err = delete_paths(&index, &main, &[hash("lib")], false)
            .await
            .unwrap_err();
        assert!(err.to_string().ends_with("and 30 more"), "{err}");
    }
}
