//! Pins: named store paths a cache keeps, with their closures, whatever its retention.
//! Pinning a path under a name that exists adds a revision; the limits of the pin
//! (a number of revisions, a number of days) drop the oldest, never the newest.

use crate::index::{PinRecord, PinRevision};

/// Seconds in a day.
const DAY: u64 = 24 * 60 * 60;

/// `pin` (a new one when `None`) with `store_path` added as its newest revision, the
/// limits given replacing its own, and what the limits drop dropped.
pub fn add(
    pin: Option<PinRecord>,
    name: &str,
    store_path: String,
    keep_revisions: Option<u32>,
    keep_days: Option<u32>,
    now: u64,
) -> PinRecord {
    let mut pin = pin.unwrap_or_else(|| PinRecord {
        name: name.to_owned(),
        revisions: Vec::new(),
        keep_revisions: None,
        keep_days: None,
    });
    if keep_revisions.is_some() || keep_days.is_some() {
        pin.keep_revisions = keep_revisions;
        pin.keep_days = keep_days;
    }
    // Pinning the newest revision again only refreshes it.
    if pin
        .revisions
        .last()
        .is_some_and(|r| r.store_path == store_path)
    {
        pin.revisions.pop();
    }
    pin.revisions.push(PinRevision {
        store_path,
        added: now,
    });
    pin.revisions = kept(&pin, now).cloned().collect();
    pin
}

/// The revisions of `pin` its limits keep at `now`, oldest first: the newest always,
/// then at most `keep_revisions` in all, none added more than `keep_days` ago.
pub fn kept(pin: &PinRecord, now: u64) -> impl Iterator<Item = &PinRevision> {
    let n = pin.revisions.len();
    let by_count = pin
        .keep_revisions
        .map_or(0, |k| n.saturating_sub(k.max(1) as usize));
    let cutoff = pin
        .keep_days
        .map(|d| now.saturating_sub(u64::from(d) * DAY));
    pin.revisions
        .iter()
        .enumerate()
        .skip(by_count)
        .filter(move |(i, r)| *i + 1 == n || cutoff.is_none_or(|c| r.added >= c))
        .map(|(_, r)| r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(pin: &PinRecord) -> Vec<&str> {
        pin.revisions
            .iter()
            .map(|r| r.store_path.as_str())
            .collect()
    }

    #[test]
    fn revision_limits_drop_the_oldest_and_keep_the_newest() {
        let mut pin = add(None, "release", "a".into(), Some(2), None, 10);
        pin = add(Some(pin), "release", "b".into(), None, None, 20);
        assert_eq!(paths(&pin), ["a", "b"]);
        pin = add(Some(pin), "release", "c".into(), None, None, 30);
        assert_eq!(paths(&pin), ["b", "c"]);
        assert_eq!(pin.keep_revisions, Some(2));
        // The same newest path again refreshes it rather than adding one.
        pin = add(Some(pin), "release", "c".into(), None, None, 40);
        assert_eq!(paths(&pin), ["b", "c"]);
        assert_eq!(pin.revisions[1].added, 40);

        let mut days = add(None, "nightly", "x".into(), None, Some(7), 0);
        days = add(Some(days), "nightly", "y".into(), None, None, 3 * DAY);
        assert_eq!(kept(&days, 5 * DAY).count(), 2);
        let later: Vec<_> = kept(&days, 8 * DAY)
            .map(|r| r.store_path.as_str())
            .collect();
        assert_eq!(later, ["y"]);
        // The newest stays however old.
        let last: Vec<_> = kept(&days, 100 * DAY)
            .map(|r| r.store_path.as_str())
            .collect();
        assert_eq!(last, ["y"]);
        // No limits: everything stays.
        let mut all = add(None, "all", "1".into(), None, None, 0);
        for p in ["2", "3", "4"] {
            all = add(Some(all), "all", p.into(), None, None, 1);
        }
        assert_eq!(paths(&all), ["1", "2", "3", "4"]);
    }
}
