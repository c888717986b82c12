//! What a server over a shared database keeps of its hottest reads (narinfos, NAR
//! records, a cache's claims on NARs, manifest segments), so that a narinfo or a
//! download asked for before asks the database nothing. Only downloads read through
//! the copies (`PgIndex::with_copies`); whatever checks or changes the metadata (a
//! publication, the collector, verify) reads the database.
//!
//! The copies follow notices. The process that changes a narinfo or a NAR record drops
//! its own copy at once (it reads its writes) and announces the change to the others
//! (`narinfo_notice`, `nar_notice`, sent by the index after its commit); the
//! coordination session hands what it hears to `heard`, and says for how long it has
//! heard everything (`hearing_until`: half a lease after a heartbeat began). A session
//! lost stops the use at once and drops every copy; so does hearing again after a
//! lapse.
//!
//! Safety does not rest on the notices. A barrier empties the copies (`clear`) before
//! the process drains it, so past a collector's barrier no process answers from a copy
//! made before it: the collector's order (narinfos deleted, barrier, then their data)
//! holds on every replica, and a copy never names data that is gone. A notice lost
//! (its sender died between its commit and its notice) leaves a copy stale until the
//! next barrier or the periodic clear of the coordination (30 s), never wrong about
//! data.
//!
//! Segments need no notice: a manifest's id is random, its segments are never
//! rewritten, and one is read only through a NAR record that names it.
//!
//! An answer read from the database is kept only if its key was not forgotten since
//! the read began (`Ticket`): a read that raced a change cannot put back what the
//! change's notice removed.

use std::future::Future;
use std::hash::{BuildHasher, Hash};
use std::sync::Mutex;
use std::time::Instant;

use quick_cache::sync::{Cache, DefaultLifecycle};
use quick_cache::{DefaultHashBuilder, OptionsBuilder};

use super::{NarInfoRecord, NarRecord, Result};
use crate::nix::{CacheName, Sha256, StorePathHash};
use crate::store::{Manifest, ManifestId};

/// Generations kept, one per group of keys: a change makes only the reads in flight
/// of its group's keys unkeepable, not every read in flight.
const GROUPS: usize = 64;

/// The copies of one process's hot lookups.
pub struct Lookups {
    entries: Cache<Key, Value, Weigh>,
    state: Mutex<State>,
    /// Which group a key is in.
    grouping: DefaultHashBuilder,
    /// This process's name in its notices (`origin`): what it announced, it has
    /// dropped already, and hearing it back would only drop copies made since.
    origin: String,
}

struct State {
    /// Counts the forgettings of each group's keys.
    generations: [u64; GROUPS],
    /// Counts the clears: a read across one is not kept either.
    clears: u64,
    /// Until when every change is being heard; never, until the session says so.
    hearing_until: Option<Instant>,
    /// Counts the sessions lost: a heartbeat of a lost one says nothing of the next.
    lost: u64,
}

/// The session a heartbeat is sent on, as `Lookups::session` names it.
#[derive(Clone, Copy)]
pub struct Session(u64);

#[derive(Clone, PartialEq, Eq, Hash)]
enum Key {
    NarInfo(CacheName, StorePathHash),
    /// Whether the cache holds a narinfo of the NAR.
    Claim(CacheName, Sha256),
    Nar(Sha256),
    Segment(ManifestId, u32),
}

#[derive(Clone)]
enum Value {
    NarInfo(Option<NarInfoRecord>),
    Claim(bool),
    Nar(Option<NarRecord>),
    Segment(Manifest),
}

/// The bytes an entry holds, about.
#[derive(Clone)]
struct Weigh;

impl quick_cache::Weighter<Key, Value> for Weigh {
    fn weight(&self, _: &Key, value: &Value) -> u64 {
        const ENTRY: u64 = 96;
        const SEGMENT: u64 = 32;
        const CHUNK: u64 = 64;
        ENTRY
            + match value {
                Value::NarInfo(r) => r.as_ref().map_or(0, |r| r.text.len() as u64),
                Value::Claim(_) => 0,
                Value::Nar(r) => r.as_ref().map_or(0, |r| {
                    SEGMENT * (r.contents.segments.len() + r.listing.segments.len()) as u64
                }),
                Value::Segment(m) => CHUNK * m.chunks.len() as u64,
            }
    }
}

/// Leave to keep what a read of a key returns, if the key is not forgotten meanwhile:
/// the clears and the key's group's generation when the read began.
#[derive(Clone, Copy)]
struct Ticket(Option<(u64, u64)>);

/// The notice of a change of every copy at once.
pub const ALL_CHANGED: &str = "*";

/// The notice of a change of the narinfo of `path` in `cache`, of the NAR `nar_hash`.
pub fn narinfo_notice(cache: &CacheName, path: &StorePathHash, nar_hash: &Sha256) -> String {
    format!(
        "i {} {} {cache}",
        hex(path.as_bytes()),
        hex(nar_hash.as_bytes())
    )
}

/// The notice of a change of the record of the NAR `nar_hash`.
pub fn nar_notice(nar_hash: &Sha256) -> String {
    format!("n {}", hex(nar_hash.as_bytes()))
}

impl Lookups {
    /// Copies of at most about `bytes`; none used until `hearing_until` is called.
    pub fn new(bytes: u64) -> Self {
        // Few shards, so that each can hold a whole segment (4,096 chunks, 256 KiB)
        // at the default size: the budget is split between them.
        let options = OptionsBuilder::new()
            .estimated_items_capacity(1024)
            .weight_capacity(bytes.max(1))
            .shards(4)
            .build()
            .expect("valid options");
        Self {
            entries: Cache::with_options(
                options,
                Weigh,
                DefaultHashBuilder::default(),
                DefaultLifecycle::default(),
            ),
            state: Mutex::new(State {
                generations: [0; GROUPS],
                clears: 0,
                hearing_until: None,
                lost: 0,
            }),
            grouping: DefaultHashBuilder::default(),
            origin: {
                let mut id = [0u8; 8];
                getrandom::fill(&mut id).expect("the operating system's random source failed");
                format!("@{}", hex(&id))
            },
        }
    }

    /// The first line of this process's notices.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("never poisoned")
    }

    fn group(&self, key: &Key) -> usize {
        (self.grouping.hash_one(key) % GROUPS as u64) as usize
    }

    fn usable(state: &State) -> bool {
        state.hearing_until.is_some_and(|t| Instant::now() < t)
    }

    /// The copies of `keys`, all or none: one look at the state for them all.
    fn get<const N: usize>(&self, keys: [&Key; N]) -> Option<[Value; N]> {
        if !Self::usable(&self.state()) {
            return None;
        }
        let mut found = keys.map(|k| self.entries.get(k));
        if found.iter().any(Option::is_none) {
            return None;
        }
        Some(found.each_mut().map(|v| v.take().expect("checked above")))
    }

    /// Empties the copies, and makes every read in flight unkeepable.
    fn empty(&self, state: &mut State) {
        state.clears += 1;
        self.entries.clear();
    }

    fn ticket(&self, key: &Key) -> Ticket {
        let group = self.group(key);
        let state = self.state();
        Ticket(Self::usable(&state).then_some((state.clears, state.generations[group])))
    }

    /// Keeps `value` unless `key` was forgotten since `ticket`: under the state's lock,
    /// so that no forgetting falls between the check and the insert.
    fn keep(&self, ticket: Ticket, key: Key, value: Value) {
        let group = self.group(&key);
        let state = self.state();
        if ticket.0 == Some((state.clears, state.generations[group])) && Self::usable(&state) {
            self.entries.insert(key, value);
        }
    }

    fn forget(&self, keys: &[Key]) {
        let groups: Vec<usize> = keys.iter().map(|k| self.group(k)).collect();
        let mut state = self.state();
        for (key, group) in keys.iter().zip(groups) {
            state.generations[group] += 1;
            self.entries.remove(key);
        }
    }

    /// `key`'s copy, or what `read` returns, kept.
    async fn through<T: Clone>(
        &self,
        key: Key,
        read: impl Future<Output = Result<T>>,
        wrap: fn(T) -> Value,
        unwrap: fn(Value) -> Option<T>,
    ) -> Result<T> {
        if let Some(v) = self.get([&key]).and_then(|[v]| unwrap(v)) {
            return Ok(v);
        }
        let ticket = self.ticket(&key);
        let v = read.await?;
        self.keep(ticket, key, wrap(v.clone()));
        Ok(v)
    }

    /// The narinfo of `path` in `cache`, or what `read` finds.
    pub async fn narinfo(
        &self,
        cache: &CacheName,
        path: &StorePathHash,
        read: impl Future<Output = Result<Option<NarInfoRecord>>>,
    ) -> Result<Option<NarInfoRecord>> {
        let key = Key::NarInfo(cache.clone(), *path);
        self.through(key, read, Value::NarInfo, |v| match v {
            Value::NarInfo(r) => Some(r),
            _ => None,
        })
        .await
    }

    /// The NAR record of `nar_hash`, or what `read` finds.
    pub async fn nar(
        &self,
        nar_hash: &Sha256,
        read: impl Future<Output = Result<Option<NarRecord>>>,
    ) -> Result<Option<NarRecord>> {
        self.through(Key::Nar(*nar_hash), read, Value::Nar, |v| match v {
            Value::Nar(r) => Some(r),
            _ => None,
        })
        .await
    }

    /// The NAR `nar_hash` if `cache` holds a narinfo of it, or what `read` finds:
    /// whether it does, and the NAR's record.
    pub async fn served_nar(
        &self,
        cache: &CacheName,
        nar_hash: &Sha256,
        read: impl Future<Output = Result<(bool, Option<NarRecord>)>>,
    ) -> Result<Option<NarRecord>> {
        let (claim, nar) = (Key::Claim(cache.clone(), *nar_hash), Key::Nar(*nar_hash));
        if let Some([Value::Claim(claimed), Value::Nar(record)]) = self.get([&claim, &nar]) {
            return Ok(record.filter(|_| claimed));
        }
        let tickets = (self.ticket(&claim), self.ticket(&nar));
        let (claimed, record) = read.await?;
        self.keep(tickets.0, claim, Value::Claim(claimed));
        self.keep(tickets.1, nar, Value::Nar(record.clone()));
        Ok(record.filter(|_| claimed))
    }

    /// Segment `index` of the manifest `id`, or what `read` finds (kept only if found).
    pub async fn segment(
        &self,
        id: &ManifestId,
        index: u32,
        read: impl Future<Output = Result<Option<Manifest>>>,
    ) -> Result<Option<Manifest>> {
        let key = Key::Segment(*id, index);
        if let Some([Value::Segment(m)]) = self.get([&key]) {
            return Ok(Some(m));
        }
        let ticket = self.ticket(&key);
        let found = read.await?;
        if let Some(m) = &found {
            self.keep(ticket, key, Value::Segment(m.clone()));
        }
        Ok(found)
    }

    /// The narinfo of `path` in `cache`, of the NAR `nar_hash`, changed.
    pub fn narinfo_changed(&self, cache: &CacheName, path: &StorePathHash, nar_hash: &Sha256) {
        self.forget(&[
            Key::NarInfo(cache.clone(), *path),
            Key::Claim(cache.clone(), *nar_hash),
        ]);
    }

    /// The record of the NAR `nar_hash` changed.
    pub fn nar_changed(&self, nar_hash: &Sha256) {
        self.forget(&[Key::Nar(*nar_hash)]);
    }

    /// Forgets everything: much changed at once, or changes may have gone unheard.
    pub fn clear(&self) {
        self.empty(&mut self.state());
    }

    /// The session now, taken before a heartbeat is sent on it.
    pub fn session(&self) -> Session {
        Session(self.state().lost)
    }

    /// Every change until `until` is heard: a heartbeat sent on `session` reached the
    /// database. Nothing if that session was lost since. After a lapse (heartbeats
    /// that did not get through for half a lease, so that a barrier may have gone on
    /// without this process) what was kept is forgotten first.
    pub fn hearing_until(&self, session: Session, until: Instant) {
        let mut state = self.state();
        if session.0 != state.lost {
            return;
        }
        if !Self::usable(&state) {
            self.empty(&mut state);
        }
        state.hearing_until = Some(state.hearing_until.map_or(until, |t| t.max(until)));
    }

    /// Changes may go unheard from now on (the session was lost): nothing is used or
    /// kept until a heartbeat of the next session, and what was kept is forgotten.
    pub fn deaf(&self) {
        let mut state = self.state();
        state.hearing_until = None;
        state.lost += 1;
        self.empty(&mut state);
    }

    /// A notice of changes (one per line, after the line of its origin), as a process
    /// announced them; this process's own are passed over.
    pub fn heard(&self, payload: &str) {
        let mut lines = payload.lines().peekable();
        if let Some(origin) = lines.next_if(|l| l.starts_with('@')) {
            if origin == self.origin {
                return;
            }
        }
        for line in lines {
            if !self.apply(line) {
                tracing::warn!(line, "a lookup notice that does not parse");
                self.clear();
                return;
            }
        }
    }

    fn apply(&self, line: &str) -> bool {
        if line == ALL_CHANGED {
            self.clear();
            return true;
        }
        let mut words = line.splitn(4, ' ');
        match (words.next(), words.next(), words.next(), words.next()) {
            (Some("i"), Some(path), Some(nar), Some(cache)) => {
                let (Some(path), Some(nar), Ok(cache)) =
                    (unhex(path), unhex(nar), cache.parse::<CacheName>())
                else {
                    return false;
                };
                let (path, nar) = (StorePathHash::from_bytes(path), Sha256::from_bytes(nar));
                self.narinfo_changed(&cache, &path, &nar);
                true
            }
            (Some("n"), Some(nar), None, None) => match unhex(nar) {
                Some(nar) => {
                    self.nar_changed(&Sha256::from_bytes(nar));
                    true
                }
                None => false,
            },
            _ => false,
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `N` bytes from lower-case hex.
fn unhex<const N: usize>(hex: &str) -> Option<[u8; N]> {
    if hex.len() != 2 * N || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; N];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use bytes::Bytes;

    use super::*;

    fn record(text: &str) -> NarInfoRecord {
        NarInfoRecord {
            nar_hash: Sha256::digest(text.as_bytes()),
            nar_size: 1,
            file_size: 1,
            text: Bytes::copy_from_slice(text.as_bytes()),
        }
    }

    fn names() -> (CacheName, StorePathHash) {
        let path = "7h7qgvs4kgzsn8a6rb273saxyqh4jxlz".parse().unwrap();
        ("main".parse().unwrap(), path)
    }

    /// Reads through `lookups`, counting the reads that reach the "database".
    async fn read(
        lookups: &Lookups,
        reads: &AtomicUsize,
        stored: Option<NarInfoRecord>,
    ) -> Option<NarInfoRecord> {
        let (cache, path) = names();
        let answer = async {
            reads.fetch_add(1, Ordering::SeqCst);
            Ok(stored)
        };
        lookups.narinfo(&cache, &path, answer).await.unwrap()
    }

    fn hearing(lookups: &Lookups) {
        lookups.hearing_until(lookups.session(), Instant::now() + Duration::from_secs(60));
    }

    #[tokio::test]
    async fn nothing_is_kept_until_the_changes_are_heard() {
        let (lookups, reads) = (Lookups::new(1 << 20), AtomicUsize::new(0));
        read(&lookups, &reads, None).await;
        read(&lookups, &reads, None).await;
        assert_eq!(reads.load(Ordering::SeqCst), 2);
        hearing(&lookups);
        assert_eq!(
            read(&lookups, &reads, Some(record("a"))).await,
            Some(record("a"))
        );
        assert_eq!(
            read(&lookups, &reads, None).await,
            Some(record("a")),
            "kept"
        );
        assert_eq!(reads.load(Ordering::SeqCst), 3);
        // A lost session: the copy goes, and nothing is kept until heard again, not
        // even by a heartbeat of that session that comes in late.
        let lost = lookups.session();
        lookups.deaf();
        lookups.hearing_until(lost, Instant::now() + Duration::from_secs(60));
        assert_eq!(read(&lookups, &reads, None).await, None);
        assert_eq!(
            read(&lookups, &reads, Some(record("b"))).await,
            Some(record("b"))
        );
        assert_eq!(reads.load(Ordering::SeqCst), 5);
        // Hearing that ended is the same.
        lookups.hearing_until(lookups.session(), Instant::now());
        read(&lookups, &reads, None).await;
        assert_eq!(reads.load(Ordering::SeqCst), 6);
    }

    #[tokio::test]
    async fn a_notice_or_a_barrier_drops_the_copy() {
        let (lookups, reads) = (Lookups::new(1 << 20), AtomicUsize::new(0));
        hearing(&lookups);
        let (cache, path) = names();
        let a = record("a");
        read(&lookups, &reads, Some(a.clone())).await;
        // Notices come a line each, several to a payload.
        let other: StorePathHash = "0123456789abcdfghijklmnpqrsvwxyz".parse().unwrap();
        let notice = format!(
            "{}\n{}",
            narinfo_notice(&cache, &other, &a.nar_hash),
            narinfo_notice(&cache, &path, &a.nar_hash)
        );
        lookups.heard(&notice);
        // Its own notices, heard back, drop nothing: it dropped them when it wrote.
        read(&lookups, &reads, None).await;
        lookups.heard(&format!("{}\n{notice}", lookups.origin()));
        assert_eq!(read(&lookups, &reads, Some(a.clone())).await, None, "kept");
        lookups.heard(&format!("@0000000000000000\n{notice}"));
        assert_eq!(read(&lookups, &reads, None).await, None);
        assert_eq!(read(&lookups, &reads, Some(a.clone())).await, None, "kept");
        lookups.clear();
        assert_eq!(
            read(&lookups, &reads, Some(a.clone())).await,
            Some(a.clone())
        );
        // Many changes at once, and a notice that does not parse, forget everything.
        lookups.heard("*");
        assert_eq!(read(&lookups, &reads, None).await, None);
        assert_eq!(read(&lookups, &reads, Some(a.clone())).await, None, "kept");
        lookups.clear();
        assert_eq!(
            read(&lookups, &reads, Some(a.clone())).await,
            Some(a.clone())
        );
        lookups.heard("i what");
        assert_eq!(read(&lookups, &reads, None).await, None);
        assert_eq!(reads.load(Ordering::SeqCst), 7);
    }

    #[tokio::test]
    async fn a_read_that_raced_a_change_is_not_kept() {
        let (lookups, reads) = (Lookups::new(1 << 20), AtomicUsize::new(0));
        hearing(&lookups);
        let (cache, path) = names();
        let a = record("a");
        // The read began before the change and returns what was there before it.
        let raced = async {
            reads.fetch_add(1, Ordering::SeqCst);
            lookups.narinfo_changed(&cache, &path, &a.nar_hash);
            Ok(None)
        };
        assert_eq!(lookups.narinfo(&cache, &path, raced).await.unwrap(), None);
        assert_eq!(read(&lookups, &reads, Some(a.clone())).await, Some(a));
    }

    #[tokio::test]
    async fn served_nars_need_the_claim_and_the_record() {
        let lookups = Lookups::new(1 << 20);
        hearing(&lookups);
        let (cache, _) = names();
        let nar = Sha256::digest(b"nar");
        let empty = crate::store::Stored {
            id: ManifestId([0; 16]),
            segments: Vec::new(),
        };
        let stored = NarRecord {
            contents: empty.clone(),
            listing: empty,
        };
        let unclaimed = async { Ok((false, Some(stored.clone()))) };
        let got = lookups.served_nar(&cache, &nar, unclaimed).await.unwrap();
        assert_eq!(got, None);
        // Both halves kept: the record answers a plain lookup of the NAR.
        let never = async { panic!("kept") };
        assert_eq!(
            lookups.nar(&nar, never).await.unwrap(),
            Some(stored.clone())
        );
        let never = async { panic!("kept") };
        assert_eq!(lookups.served_nar(&cache, &nar, never).await.unwrap(), None);
        lookups.heard(&nar_notice(&nar));
        // Either half missing: both are read again.
        let claimed = async { Ok((true, Some(stored.clone()))) };
        let got = lookups.served_nar(&cache, &nar, claimed).await.unwrap();
        assert_eq!(got, Some(stored.clone()));
        let never = async { panic!("kept") };
        assert_eq!(
            lookups.served_nar(&cache, &nar, never).await.unwrap(),
            Some(stored)
        );
    }

    #[test]
    fn the_weight_stays_within_the_bytes() {
        let lookups = Lookups::new(64 * 1024);
        hearing(&lookups);
        let cache: CacheName = "main".parse().unwrap();
        for i in 0..10_000u32 {
            let mut p = [0u8; 20];
            p[..4].copy_from_slice(&i.to_le_bytes());
            let key = Key::NarInfo(cache.clone(), StorePathHash::from_bytes(p));
            let ticket = lookups.ticket(&key);
            lookups.keep(ticket, key, Value::NarInfo(Some(record(&"x".repeat(900)))));
        }
        // Each weighs about 1,000 bytes: at most about 64 of them.
        assert!(lookups.entries.weight() <= 64 * 1024);
        assert!(
            (10..=70).contains(&lookups.entries.len()),
            "{}",
            lookups.entries.len()
        );
        // A whole segment (4,096 chunks) fits at the default size.
        let lookups = Lookups::new(8 << 20);
        hearing(&lookups);
        let key = Key::Segment(ManifestId([1; 16]), 0);
        let chunk = crate::store::ChunkRef {
            id: crate::store::ChunkId([0; 32]),
            pack: crate::store::PackId([0; 16]),
            offset: 0,
            stored_len: 1,
            len: 1,
        };
        let segment = Manifest {
            chunks: vec![chunk; 4096],
        };
        lookups.keep(lookups.ticket(&key), key.clone(), Value::Segment(segment));
        assert!(lookups.get([&key]).is_some());
    }
}
