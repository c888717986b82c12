//! Which paths of a cache its retention evicts: pure, on facts gathered by the caller,
//! so that every rule is tested without a server.
//!
//! A path is kept if it is pinned, fetched within the maximum age, or referenced by a
//! kept path; the rest goes. Then, while the kept paths are larger than the maximum
//! size, the least recently fetched path that is not in a pinned closure goes, with
//! every path that refers to it (else their closures would break). The result is in
//! deletion order: referrers before what they refer to.

use std::collections::{BTreeMap, BTreeSet};

use crate::index::Retention;
use crate::nix::StorePathHash;

/// What retention needs to know of a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathFacts {
    /// The paths it refers to (itself excluded).
    pub references: Vec<StorePathHash>,
    /// The bytes it takes: its served NAR's size.
    pub size: u64,
    /// When it was last fetched (or pushed), in seconds since the epoch.
    pub last_access: u64,
}

/// The paths `retention` evicts from a cache of `paths` at `now`, referrers first.
/// `pinned` are the paths its pins keep (with their closures).
pub fn evict(
    paths: &BTreeMap<StorePathHash, PathFacts>,
    pinned: &[StorePathHash],
    retention: Retention,
    now: u64,
) -> Vec<StorePathHash> {
    let pinned = closure(paths, pinned.iter().copied());
    let mut kept = match retention.max_age_secs {
        None => paths.keys().copied().collect(),
        Some(age) => {
            let cutoff = now.saturating_sub(age);
            let young = paths
                .iter()
                .filter(|(_, f)| f.last_access >= cutoff)
                .map(|(h, _)| *h);
            closure(paths, pinned.iter().copied().chain(young))
        }
    };
    if let Some(max) = retention.max_size_bytes {
        let referrers = referrers(paths);
        let mut total: u64 = kept.iter().map(|h| paths[h].size).sum();
        let mut by_age: Vec<(u64, StorePathHash)> = kept
            .iter()
            .filter(|h| !pinned.contains(h))
            .map(|h| (paths[h].last_access, *h))
            .collect();
        by_age.sort();
        for (_, oldest) in by_age {
            if total <= max {
                break;
            }
            if !kept.contains(&oldest) {
                continue;
            }
            // The path with everything that refers to it, transitively. None of them
            // is pinned: a pinned closure holds whatever its paths refer to.
            let mut queue = vec![oldest];
            while let Some(h) = queue.pop() {
                if kept.remove(&h) {
                    total -= paths[&h].size;
                    queue.extend(referrers.get(&h).into_iter().flatten().copied());
                }
            }
        }
    }
    let evicted: BTreeSet<StorePathHash> = paths
        .keys()
        .filter(|h| !kept.contains(h))
        .copied()
        .collect();
    referrers_first(paths, &evicted)
}

/// `roots` and everything they refer to, transitively, among `paths`.
fn closure(
    paths: &BTreeMap<StorePathHash, PathFacts>,
    roots: impl Iterator<Item = StorePathHash>,
) -> BTreeSet<StorePathHash> {
    let mut seen = BTreeSet::new();
    let mut queue: Vec<StorePathHash> = roots.filter(|h| paths.contains_key(h)).collect();
    while let Some(h) = queue.pop() {
        if seen.insert(h) {
            let refs = &paths[&h].references;
            queue.extend(refs.iter().filter(|r| paths.contains_key(r)).copied());
        }
    }
    seen
}

/// For each path, the paths that refer to it.
fn referrers(
    paths: &BTreeMap<StorePathHash, PathFacts>,
) -> BTreeMap<StorePathHash, Vec<StorePathHash>> {
    let mut out: BTreeMap<StorePathHash, Vec<StorePathHash>> = BTreeMap::new();
    for (h, f) in paths {
        for r in &f.references {
            out.entry(*r).or_default().push(*h);
        }
    }
    out
}

/// `set` ordered so that each path comes after every path of the set that refers to it.
fn referrers_first(
    paths: &BTreeMap<StorePathHash, PathFacts>,
    set: &BTreeSet<StorePathHash>,
) -> Vec<StorePathHash> {
    // How many referrers in the set each path waits for.
    let mut waiting: BTreeMap<StorePathHash, usize> = set.iter().map(|h| (*h, 0)).collect();
    for h in set {
        for r in paths[h].references.iter().filter(|r| *r != h) {
            if let Some(n) = waiting.get_mut(r) {
                *n += 1;
            }
        }
    }
    let mut ready: Vec<StorePathHash> = waiting
        .iter()
        .filter(|(_, n)| **n == 0)
        .map(|(h, _)| *h)
        .collect();
    let mut order = Vec::with_capacity(set.len());
    while let Some(h) = ready.pop() {
        order.push(h);
        for r in paths[&h].references.iter().filter(|r| **r != h) {
            if let Some(n) = waiting.get_mut(r) {
                *n -= 1;
                if *n == 0 {
                    ready.push(*r);
                }
            }
        }
    }
    // Store paths cannot refer to each other in a cycle; should the records say so, the
    // rest go last, and the deletion's own check keeps any that is still referred to.
    let placed: BTreeSet<StorePathHash> = order.iter().copied().collect();
    order.extend(set.iter().filter(|h| !placed.contains(h)));
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(n: u8) -> StorePathHash {
        let letters = b"0123456789abcdfghijklmnpqrsvwxyz";
        (letters[usize::from(n) % 32] as char)
            .to_string()
            .repeat(32)
            .parse()
            .unwrap()
    }

    /// A cache of `(path, references, size, last access)`.
    fn cache(spec: &[(u8, &[u8], u64, u64)]) -> BTreeMap<StorePathHash, PathFacts> {
        spec.iter()
            .map(|(p, refs, size, at)| {
                let facts = PathFacts {
                    references: refs.iter().map(|r| h(*r)).collect(),
                    size: *size,
                    last_access: *at,
                };
                (h(*p), facts)
            })
            .collect()
    }

    fn age(secs: u64) -> Retention {
        Retention {
            max_age_secs: Some(secs),
            max_size_bytes: None,
        }
    }

    fn size(bytes: u64) -> Retention {
        Retention {
            max_age_secs: None,
            max_size_bytes: Some(bytes),
        }
    }

    /// Checks that every kept path has its references kept.
    fn closed(paths: &BTreeMap<StorePathHash, PathFacts>, evicted: &[StorePathHash]) {
        for (p, f) in paths.iter().filter(|(p, _)| !evicted.contains(p)) {
            for r in &f.references {
                assert!(
                    !evicted.contains(r),
                    "{p:?} kept, its reference {r:?} evicted"
                );
            }
        }
        // Referrers first.
        for (i, p) in evicted.iter().enumerate() {
            for later in &evicted[i + 1..] {
                assert!(
                    !paths[later].references.contains(p),
                    "{later:?} refers to {p:?} but is deleted after it"
                );
            }
        }
    }

    #[test]
    fn age_evicts_what_nothing_young_needs() {
        // 1 -> 2 -> 3; 4 -> 3; 5 alone. Fetched: 1 old, 2 old, 3 old, 4 young, 5 old.
        let paths = cache(&[
            (1, &[2], 10, 100),
            (2, &[3], 10, 100),
            (3, &[], 10, 100),
            (4, &[3], 10, 900),
            (5, &[], 10, 100),
        ]);
        let evicted = evict(&paths, &[], age(500), 1000);
        closed(&paths, &evicted);
        let set: BTreeSet<_> = evicted.iter().copied().collect();
        assert_eq!(set, BTreeSet::from([h(1), h(2), h(5)]));
        // 1 before 2, which it refers to.
        let pos = |x| evicted.iter().position(|e| *e == h(x)).unwrap();
        assert!(pos(1) < pos(2));
        // No limit: nothing goes.
        assert!(evict(&paths, &[], Retention::default(), 1000).is_empty());
    }

    #[test]
    fn size_evicts_the_least_recently_fetched_with_their_referrers() {
        // 1 -> 2 (2 fetched oldest); 3 newest; 4 in between.
        let paths = cache(&[
            (1, &[2], 10, 500),
            (2, &[], 10, 100),
            (3, &[], 10, 900),
            (4, &[], 10, 300),
        ]);
        // 40 bytes, at most 25: 2 goes first, taking 1 (which refers to it): 20 left.
        let evicted = evict(&paths, &[], size(25), 1000);
        closed(&paths, &evicted);
        assert_eq!(evicted, vec![h(1), h(2)]);
        // At most 15: then 4 as well.
        let evicted = evict(&paths, &[], size(15), 1000);
        let set: BTreeSet<_> = evicted.iter().copied().collect();
        assert_eq!(set, BTreeSet::from([h(1), h(2), h(4)]));
        // Under the limit: nothing.
        assert!(evict(&paths, &[], size(40), 1000).is_empty());
    }

    #[test]
    fn pinned_closures_survive_any_retention() {
        let paths = cache(&[(1, &[2], 10, 100), (2, &[], 10, 100), (3, &[], 10, 100)]);
        let evicted = evict(&paths, &[h(1)], age(10), 1000);
        assert_eq!(evicted, vec![h(3)]);
        let both = Retention {
            max_age_secs: Some(10),
            max_size_bytes: Some(0),
        };
        let evicted = evict(&paths, &[h(1)], both, 1000);
        assert_eq!(evicted, vec![h(3)]);
        // Unpinned, everything may go.
        let evicted = evict(&paths, &[], both, 1000);
        closed(&paths, &evicted);
        assert_eq!(evicted.len(), 3);
        // A pinned path the cache does not have pins nothing.
        assert_eq!(evict(&paths, &[h(9)], age(10), 1000).len(), 3);
    }
}
