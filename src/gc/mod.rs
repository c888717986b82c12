//! The garbage collector: retention per cache, then a sweep of everything no cache
//! needs any more. One run:
//!
//! 1. **Retention**: each cache's paths that its retention evicts (`retention`) are
//!    deleted, referrers first, each only if nothing refers to it any more (checked
//!    under the cache's exclusive lock, so no publication adds a referrer meanwhile).
//! 2. **Listing**: the packs stored and the manifests recorded now; only these may be
//!    deleted by this run (what is written later belongs to the next).
//! 3. **Marking** from the roots: the NARs that a narinfo claims or a recent upload
//!    names, and every log and realisation. Their chunks are live.
//! 4. **Unlinking**: stale uploads and unclaimed NARs lose their records (under every
//!    cache's exclusive lock, re-checking that none was claimed since, and only if the
//!    record is unchanged: an upload of the same NAR writes a new one), then the chunk
//!    records of dead chunks, so that no new upload reuses them.
//! 5. **Waiting** (`Epochs::barrier`) for every download and upload that began before:
//!    they may hold what was just unlinked.
//! 6. **Sweeping**: what the records left now name is live (all NAR records, logs and
//!    realisations, chunk records); a live chunk that lost its record to an upload that
//!    reused it in between gets it back. Manifests and packs from the listing that
//!    nothing live names are deleted (packs only once older than the grace period).
//!
//! Every step deletes only what is dead, records before the objects they name, so a
//! run killed anywhere leaves everything served intact, and the next run finishes.

pub mod compact;
pub mod retention;
pub mod stats;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use crate::app::App;
use crate::error::Result;
use crate::index::{Index, NarRecord, Retention, Upload, PAGE};
use crate::jobs::Progress;
use crate::nix::{CacheName, NarInfo, NarUrl, Sha256, StorePathHash};
use crate::store::{ChunkId, ChunkRef, ManifestId, PackId, PackInfo, Stored};
use retention::PathFacts;

/// Deletions made under the exclusive locks at a time: publications wait for a batch.
const BATCH: usize = 512;

/// What to collect.
#[derive(Debug, Clone)]
pub struct Options {
    /// Apply the retention of this cache only (the sweep is always whole: chunks are
    /// shared between caches).
    pub cache: Option<CacheName>,
    /// Report what would go, change nothing.
    pub dry_run: bool,
    /// The time retention is measured at.
    pub now: u64,
    /// Rewrite every pack with a dead byte, whatever `gc.compact_dead_fraction`.
    pub compact: bool,
}

/// What a run removed, or with `dry_run` would remove.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Report {
    /// Nothing was changed.
    pub dry_run: bool,
    /// Store paths evicted by retention, per cache.
    pub paths: BTreeMap<String, u64>,
    /// NAR records removed.
    pub nars: u64,
    /// Uploads no narinfo took up, removed.
    pub uploads: u64,
    /// Chunk records removed.
    pub chunks: u64,
    /// Manifests removed.
    pub manifests: u64,
    /// Packs deleted.
    pub packs: u64,
    /// Their bytes.
    pub bytes_freed: u64,
    /// Packs rewritten by compaction and deleted (with `dry_run`, chosen to be).
    pub packs_compacted: u64,
    /// Their bytes.
    pub bytes_compacted: u64,
    /// The bytes in them no chunk record named (what compaction reclaims beside what
    /// recompression saves).
    pub dead_bytes_compacted: u64,
    /// Of `packs`, those released by compaction (a second copy of chunks whose records
    /// now name the rewritten copy): not predicted by a dry run.
    pub packs_released: u64,
    /// Packs compaction wrote.
    pub packs_written: u64,
    /// Their bytes.
    pub bytes_written: u64,
    /// The stored bytes of moved frames, less what they take recompressed.
    pub recompression_saved: u64,
    /// Chunk records restored for chunks an upload reused while the run unlinked them.
    pub chunks_restored: u64,
    /// Downloads or uploads were still running after `gc.reader_wait_secs`: what they
    /// might use was left for the next run.
    pub waited_out: bool,
    /// Left: uploads no narinfo has taken up yet, younger than
    /// `gc.pending_upload_secs` (a push may be under way), and their NARs.
    #[serde(default)]
    pub left_pending_uploads: u64,
    /// Left: packs no record names, younger than `gc.grace_secs` (what a crash or a
    /// failed upload left; deleted by a later run).
    #[serde(default)]
    pub left_young_packs: u64,
    /// Their bytes.
    #[serde(default)]
    pub left_young_bytes: u64,
    /// Left: packs with dead bytes below `gc.compact_dead_fraction`, not rewritten
    /// (`gc --compact` rewrites them).
    #[serde(default)]
    pub left_partly_dead_packs: u64,
    /// Their dead bytes.
    #[serde(default)]
    pub left_dead_bytes: u64,
    /// Left: packs chosen for rewriting that the free space had no room for (their
    /// live bytes would have taken the disk below `storage.min_free_mib`).
    #[serde(default)]
    pub left_no_room_packs: u64,
    /// When the run started, in seconds since the epoch.
    pub started: u64,
    /// How long it took, in seconds.
    pub seconds: f64,
}

/// The key of the last run's report in the index's own records.
pub const LAST_GC: &str = "last_gc";

/// A short form of a chunk id for the sets of a run: a collision only keeps a dead
/// chunk one run longer.
fn short(id: &ChunkId) -> u64 {
    u64::from_le_bytes(id.0[..8].try_into().expect("8 bytes"))
}

/// Starts a collection as the servers' one job.
pub async fn start(
    app: &Arc<App>,
    options: Options,
) -> std::result::Result<u64, crate::coord::JobRefused> {
    let running = app.clone();
    app.coord
        .start_job("gc", crate::coord::job(move |p| run(running, options, p)))
        .await
}

/// Runs one collection: retention, then marking from the roots, unlinking what is
/// dead, the barrier, and the sweep of what nothing names (with compaction).
pub async fn run(app: Arc<App>, options: Options, progress: Arc<Progress>) -> Result<Report> {
    let clock = std::time::Instant::now();
    let mut report = Report {
        dry_run: options.dry_run,
        started: crate::clock::now(),
        ..Report::default()
    };
    app.accesses.flush(app.index.as_ref()).await?;
    progress.phase("retention");
    let evicted = apply_retention(&app, &options, &progress, &mut report).await?;

    progress.phase("listing");
    let packs = app.packs.list().await?;
    let manifests = all_manifests(app.index.as_ref()).await?;

    progress.phase("marking");
    let pending = app.config.gc.pending_upload_secs;
    let index = app.index.as_ref();
    let marked = mark(index, &evicted, pending, options.now, &progress).await?;
    let emptied = marked.emptied.clone();
    report.left_pending_uploads = marked.pending_uploads;
    let unlinked = if options.dry_run {
        Unlinked::predicted(marked, &mut report)
    } else {
        unlink_dead(&app, marked, &progress, &mut report).await?
    };

    if !report.waited_out {
        progress.phase("sweeping");
        let Unlinked {
            dead_nars,
            dead_chunks,
            restorable,
        } = unlinked;
        let live = live_now(index, &dead_nars, &dead_chunks, &restorable, &progress).await?;
        report.chunks_restored = live.restored;
        let surviving = sweep(
            &app,
            &options,
            (packs, manifests),
            &live,
            &emptied,
            &progress,
            &mut report,
        )
        .await?;
        compact(&app, &options, surviving, live.used, &progress, &mut report).await?;
    }
    report.seconds = clock.elapsed().as_secs_f64();
    if !options.dry_run {
        let text = serde_json::to_vec(&report).expect("a report always serialises");
        app.index.put_meta(LAST_GC, &text).await?;
        app.index.flush().await?;
    }
    tracing::info!(?report, "garbage collection finished");
    Ok(report)
}

/// Deletes the paths retention evicts (only counts them in a dry run, and returns
/// them: marking then treats them as gone).
async fn apply_retention(
    app: &App,
    options: &Options,
    progress: &Progress,
    report: &mut Report,
) -> Result<HashSet<(CacheName, StorePathHash)>> {
    let mut evicted: HashSet<(CacheName, StorePathHash)> = HashSet::new();
    let targets: Vec<_> = app
        .caches
        .all()
        .into_iter()
        .filter(|c| options.cache.as_ref().is_none_or(|n| *n == c.name))
        .collect();
    for cache in targets {
        let retention = retention_of(&app.config.gc, cache.record.retention);
        if retention == Retention::default() {
            continue;
        }
        let name = cache.name.clone();
        let (index, dry, now) = (app.index.as_ref(), options.dry_run, options.now);
        let doomed = select(index, &name, retention, now, dry).await?;
        let mut deleted = 0;
        if options.dry_run {
            deleted = doomed.len() as u64;
            evicted.extend(doomed.into_iter().map(|p| (name.clone(), p)));
        } else {
            for batch in doomed.chunks(BATCH) {
                let _lock = app.coord.exclusive(&name).await?;
                deleted += delete_unreferred(index, &name, batch).await?;
                progress.add(deleted, 0);
            }
        }
        if deleted > 0 {
            tracing::info!(cache = %name, paths = deleted, dry_run = options.dry_run, "retention evicted paths");
            report.paths.insert(name.to_string(), deleted);
        }
    }
    Ok(evicted)
}

/// The id of every manifest that has segments.
async fn all_manifests(index: &dyn Index) -> Result<Vec<ManifestId>> {
    let mut manifests: Vec<ManifestId> = Vec::new();
    loop {
        let page = index.manifests_after(manifests.last(), PAGE).await?;
        if page.is_empty() {
            return Ok(manifests);
        }
        manifests.extend(page);
    }
}

/// What the sweep must tell apart after unlinking.
struct Unlinked {
    /// NARs whose records are dead (a dry run keeps them).
    dead_nars: HashSet<Sha256>,
    /// Chunks whose records are dead (a dry run keeps them).
    dead_chunks: HashSet<ChunkId>,
    /// Chunks whose records may be missing while a manifest names them: live ones
    /// found without a record, and those this run removed.
    restorable: HashSet<u64>,
}

impl Unlinked {
    /// A dry run: what would be unlinked, counted, with nothing removed.
    fn predicted(marked: Marked, report: &mut Report) -> Self {
        report.uploads = marked.stale_uploads.len() as u64;
        report.nars = marked.dead_nars.len() as u64;
        report.chunks = marked.dead_chunks.len() as u64;
        Self {
            dead_nars: marked.dead_nars.iter().map(|(h, _)| *h).collect(),
            dead_chunks: marked.dead_chunks.into_iter().collect(),
            restorable: HashSet::new(),
        }
    }
}

/// Removes the records marking found dead (stale uploads, unclaimed NARs, then dead
/// chunks), then waits at the barrier for what may still use them.
async fn unlink_dead(
    app: &App,
    marked: Marked,
    progress: &Progress,
    report: &mut Report,
) -> Result<Unlinked> {
    progress.phase("unlinking");
    let names: Vec<CacheName> = app.caches.all().iter().map(|c| c.name.clone()).collect();
    let mut uploads = marked.stale_uploads;
    let mut nars = marked.dead_nars;
    while !uploads.is_empty() || !nars.is_empty() {
        let take_u: Vec<_> = uploads.drain(..uploads.len().min(BATCH)).collect();
        let take_n: Vec<_> = nars.drain(..nars.len().min(BATCH)).collect();
        // Every cache's lock, in name order: no publication is between reading an
        // upload or a NAR record and committing the narinfo that claims it.
        let mut locks = Vec::with_capacity(names.len());
        for n in &names {
            locks.push(app.coord.exclusive(n).await?);
        }
        let (u, n) = unlink(app.index.as_ref(), &names, &take_u, &take_n).await?;
        drop(locks);
        report.uploads += u;
        report.nars += n;
        progress.add(u + n, 0);
    }
    let ids = marked.dead_chunks;
    report.chunks = ids.len() as u64;
    let mut restorable = marked.unrecorded;
    restorable.extend(ids.iter().map(short));
    // Made durable every 1,024: sled holds the nodes the removals change in memory
    // until they are written (8,192 at once cost 400 MiB at 1,000,000 chunks).
    for batch in ids.chunks(1024) {
        app.index.delete_chunks(batch).await?;
        app.index.flush().await?;
    }

    progress.phase("waiting");
    let wait = Duration::from_secs(app.config.gc.reader_wait_secs);
    if !app.coord.barrier(wait).await {
        tracing::warn!(
            running = app.coord.running(),
            "downloads or uploads from before the unlinking are still running; \
             their objects are left for the next collection"
        );
        report.waited_out = true;
    }
    // The dead records are gone: nothing below needs to tell them apart.
    Ok(Unlinked {
        dead_nars: HashSet::new(),
        dead_chunks: HashSet::new(),
        restorable,
    })
}

/// Deletes the manifests and packs of the listing that nothing `live` names; returns
/// the packs that stay and something names, for compaction.
async fn sweep(
    app: &App,
    options: &Options,
    (packs, manifests): (Vec<PackInfo>, Vec<ManifestId>),
    live: &Live,
    emptied: &HashSet<PackId>,
    progress: &Progress,
    report: &mut Report,
) -> Result<Vec<PackInfo>> {
    let grace_end = options.now.saturating_sub(app.config.gc.grace_secs);
    let dead_manifests: Vec<ManifestId> = manifests
        .into_iter()
        .filter(|m| !live.manifests.contains(m))
        .collect();
    // A pack nothing names goes if this run emptied it (it removed the records that
    // named it); another only once older than the grace period.
    let (dead_packs, surviving): (Vec<PackInfo>, Vec<PackInfo>) =
        packs.into_iter().partition(|p| {
            !live.packs.contains(&p.id) && (p.modified <= grace_end || emptied.contains(&p.id))
        });
    report.manifests = dead_manifests.len() as u64;
    if !options.dry_run {
        delete_manifests(app.index.as_ref(), &dead_manifests).await?;
        let ids: Vec<PackId> = dead_packs.iter().map(|p| p.id).collect();
        delete_packs(app, &ids).await?;
    }
    for p in &dead_packs {
        report.packs += 1;
        report.bytes_freed += p.size;
        progress.add(1, p.size);
    }
    // What nothing names and is younger than the grace period stays, whatever
    // compaction does.
    let (young, surviving): (Vec<PackInfo>, Vec<PackInfo>) = surviving
        .into_iter()
        .partition(|p| !live.packs.contains(&p.id));
    report.left_young_packs = young.len() as u64;
    report.left_young_bytes = young.iter().map(|p| p.size).sum();
    Ok(surviving)
}

/// Rewrites the packs of `packs` (live ones) that compaction chooses (`used`: the
/// bytes of each that manifests name; all of them with `options.compact`), waits for
/// what may still read the old ones, and deletes those nothing names any more, and
/// any other of `packs` that the rewrite left unnamed (a copy of a chunk whose record
/// now names the rewritten one).
async fn compact(
    app: &Arc<App>,
    options: &Options,
    packs: Vec<PackInfo>,
    used: HashMap<PackId, u64>,
    progress: &Arc<Progress>,
    report: &mut Report,
) -> Result<()> {
    progress.phase("compacting");
    let mut settings = compact::Settings::of(&app.config.gc, app.config.ingest.pack_bytes);
    if options.compact {
        settings.dead_fraction = 0.0;
    }
    let index = app.index.as_ref();
    let mut chosen = compact::candidates(index, &packs, &used, &settings, options.now).await?;
    // The rewritten packs are written before the old ones go: room for their live
    // bytes is reserved like an upload's, the deadest packs first, so that a
    // compaction on a nearly full disk rewrites what fits and never takes the room
    // kept for the metadata.
    let _room = if options.dry_run || !app.packs.is_local() {
        None
    } else {
        let (room, left) = room_for(&app.space, &mut chosen);
        report.left_no_room_packs = left;
        room
    };
    report.dead_bytes_compacted = chosen.iter().map(|c| c.dead).sum();
    // What stays: packs with dead bytes too few to rewrite.
    let rewritten: HashSet<PackId> = chosen.iter().map(|c| c.pack.id).collect();
    for p in packs.iter().filter(|p| !rewritten.contains(&p.id)) {
        let used = used.get(&p.id).copied().unwrap_or(0);
        if used > 0 && used < p.size {
            report.left_partly_dead_packs += 1;
            report.left_dead_bytes += p.size - used;
        }
    }
    if options.dry_run || chosen.is_empty() {
        report.packs_compacted = chosen.len() as u64;
        return Ok(());
    }
    let sizes: HashMap<PackId, u64> = chosen.iter().map(|c| (c.pack.id, c.pack.size)).collect();
    let done = compact::rewrite(
        app.index.clone(),
        app.packs.clone(),
        chosen,
        settings,
        progress.clone(),
    )
    .await?;
    report.packs_written = done.packs_written;
    report.bytes_written = done.bytes_written;
    report.recompression_saved = done.recompression_saved;
    progress.phase("waiting");
    let wait = Duration::from_secs(app.config.gc.reader_wait_secs);
    if !app.coord.barrier(wait).await {
        report.waited_out = true;
        return Ok(());
    }
    progress.phase("sweeping compacted packs");
    let mut done = done;
    let moved = Arc::new(std::mem::take(&mut done.moved));
    let mut live;
    let mut round = 0;
    loop {
        let none = HashSet::new();
        live = live_now(index, &HashSet::new(), &HashSet::new(), &none, progress).await?;
        // Uploads made while the frames moved found their old records: their
        // manifests are given the new places too, a few times at most.
        let still: HashSet<PackId> = done
            .old_packs
            .iter()
            .filter(|p| live.packs.contains(p))
            .copied()
            .collect();
        round += 1;
        if still.is_empty() || round > 3 {
            break;
        }
        let mut again = compact::Outcome::default();
        compact::reown_again(index, &moved, &still, &mut again).await?;
        done.old_manifests.extend(again.old_manifests);
        if !app.coord.barrier(wait).await {
            report.waited_out = true;
            return Ok(());
        }
    }
    let old_manifests: Vec<ManifestId> = done
        .old_manifests
        .into_iter()
        .filter(|m| !live.manifests.contains(m))
        .collect();
    delete_manifests(index, &old_manifests).await?;
    let compacted: Vec<PackId> = done
        .old_packs
        .iter()
        .filter(|p| !live.packs.contains(p))
        .copied()
        .collect();
    delete_packs(app, &compacted).await?;
    for p in &compacted {
        report.packs_compacted += 1;
        report.bytes_compacted += sizes.get(p).copied().unwrap_or(0);
    }
    let old: HashSet<PackId> = done.old_packs.iter().copied().collect();
    let released: Vec<&PackInfo> = packs
        .iter()
        .filter(|p| !old.contains(&p.id) && !live.packs.contains(&p.id))
        .collect();
    delete_packs(app, &released.iter().map(|p| p.id).collect::<Vec<_>>()).await?;
    for p in released {
        report.packs += 1;
        report.bytes_freed += p.size;
        report.packs_released += 1;
    }
    Ok(())
}

/// Deletes `packs` from the store, and tells every process to drop them from its
/// cache of packs.
async fn delete_packs(app: &App, packs: &[PackId]) -> Result<()> {
    if packs.is_empty() {
        return Ok(());
    }
    let deleted = async {
        for p in packs {
            app.packs.delete(p).await?;
        }
        Ok::<_, object_store::Error>(())
    }
    .await;
    // Announced even when a deletion failed: those before it are gone.
    app.coord
        .announce(crate::coord::Change::PacksDeleted(packs.to_vec()))
        .await;
    Ok(deleted?)
}

/// The retention of a cache whose own is `own`: each limit it does not set is the
/// server's.
pub fn retention_of(gc: &crate::config::GcConfig, own: Retention) -> Retention {
    Retention {
        max_age_secs: own.max_age_secs.or(gc.keep_age_secs),
        max_size_bytes: own.max_size_bytes.or(gc.keep_size_bytes),
    }
}

/// Removes the segments of `manifests`, durably.
async fn delete_manifests(index: &dyn Index, manifests: &[ManifestId]) -> Result<()> {
    for m in manifests {
        index.delete_manifest(m).await?;
    }
    Ok(index.flush().await?)
}

/// Reserves room for rewriting `chosen` (their live bytes), giving up the least dead
/// packs until it fits; returns the reservation and how many packs were given up.
fn room_for(
    space: &Arc<crate::store::space::Space>,
    chosen: &mut Vec<compact::Candidate>,
) -> (Option<crate::store::space::Reservation>, u64) {
    chosen.sort_by(|a, b| {
        let dead = |c: &compact::Candidate| c.dead as f64 / c.pack.size.max(1) as f64;
        dead(b).total_cmp(&dead(a))
    });
    let mut left = 0;
    while !chosen.is_empty() {
        let live: u64 = chosen.iter().map(|c| c.pack.size - c.dead).sum();
        if let Ok(r) = space.reserve(live) {
            return (Some(r), left);
        }
        chosen.pop();
        left += 1;
    }
    (None, left)
}

/// The paths of `cache` that `retention` evicts at `now`, referrers first. A path with
/// no recorded fetch counts as fetched now (and, unless `dry`, is recorded so): data
/// from before fetches were recorded gets the whole maximum age.
async fn select(
    index: &dyn Index,
    cache: &CacheName,
    retention: Retention,
    now: u64,
    dry: bool,
) -> Result<Vec<StorePathHash>> {
    let accesses: HashMap<StorePathHash, u64> = index.accesses(cache).await?.into_iter().collect();
    let mut paths = BTreeMap::new();
    let mut unrecorded = Vec::new();
    let mut after = None;
    loop {
        let page = index.narinfos(cache, after.as_ref(), 1024).await?;
        let Some((last, _)) = page.last() else { break };
        after = Some(*last);
        for (hash, record) in page {
            let narinfo = NarInfo::parse(&record.text)
                .map_err(|_| crate::index::IndexError::corrupt_narinfo(cache, &hash))?;
            let last_access = match accesses.get(&hash) {
                Some(at) => *at,
                None => {
                    unrecorded.push((hash, now));
                    now
                }
            };
            let facts = PathFacts {
                references: narinfo.foreign_references().map(|r| r.hash()).collect(),
                size: record.file_size,
                last_access,
            };
            paths.insert(hash, facts);
        }
    }
    if !dry && !unrecorded.is_empty() {
        index.put_accesses(cache, &unrecorded).await?;
    }
    let mut pinned = Vec::new();
    for pin in index.pins(cache).await? {
        for r in crate::pins::kept(&pin, now) {
            if let Ok(p) = crate::nix::StorePath::from_full(&r.store_path) {
                pinned.push(p.hash());
            }
        }
    }
    Ok(retention::evict(&paths, &pinned, retention, now))
}

/// Deletes `paths` in order, each only if no path of the cache refers to it any more;
/// returns how many went.
async fn delete_unreferred(
    index: &dyn Index,
    cache: &CacheName,
    paths: &[StorePathHash],
) -> Result<u64> {
    let mut deleted = 0;
    for path in paths {
        let Some(record) = index.narinfo(cache, path).await? else {
            continue;
        };
        if index
            .referrers(cache, path)
            .await?
            .iter()
            .any(|r| r != path)
        {
            continue;
        }
        let narinfo = NarInfo::parse(&record.text)
            .map_err(|_| crate::index::IndexError::corrupt_narinfo(cache, path))?;
        let refs: Vec<StorePathHash> = narinfo.foreign_references().map(|r| r.hash()).collect();
        if index.delete_narinfo(cache, path, &refs).await? {
            deleted += 1;
        }
    }
    index.flush().await?;
    Ok(deleted)
}

/// What marking from the roots found dead.
struct Marked {
    /// Uploads not taken up yet, whose NARs are kept.
    pending_uploads: u64,
    stale_uploads: Vec<(CacheName, NarUrl, Upload)>,
    dead_nars: Vec<(Sha256, NarRecord)>,
    dead_chunks: Vec<ChunkId>,
    /// The packs the dead chunks' records name: once nothing names them, they are
    /// the run's own doing, not a crash's leftovers, and go without a grace period.
    emptied: HashSet<PackId>,
    /// Chunks that live manifests name and that have no record (an earlier run that
    /// could not finish removed it while an upload reused the chunk).
    unrecorded: HashSet<u64>,
}

/// Calls `f` with every chunk of a stored content.
pub(crate) async fn chunks_of(
    index: &dyn Index,
    stored: &Stored,
    f: &mut (dyn FnMut(&ChunkRef) + Send),
) -> crate::index::Result<()> {
    for i in 0..stored.segments.len() as u32 {
        // A segment missing is for `verify` to report; here it names nothing.
        if let Some(m) = index.segment(&stored.id, i).await? {
            m.chunks.iter().for_each(&mut *f);
        }
    }
    Ok(())
}

/// Marks every chunk of `nar` live (not seen with a record yet).
async fn mark_nar(
    index: &dyn Index,
    nar: &NarRecord,
    live: &mut HashMap<u64, bool>,
    progress: &Progress,
) -> crate::index::Result<()> {
    for stored in [&nar.contents, &nar.listing] {
        chunks_of(index, stored, &mut |c| {
            live.entry(short(&c.id)).or_insert(false);
        })
        .await?;
    }
    progress.add(1, nar.contents.size());
    // A walk over every NAR reads the embedded index in place: room for requests.
    tokio::task::yield_now().await;
    Ok(())
}

/// Marks from the roots: claimed NARs (but for `evicted` paths, in a dry run), the
/// NARs of uploads younger than `pending_secs`, logs and realisations.
async fn mark(
    index: &dyn Index,
    evicted: &HashSet<(CacheName, StorePathHash)>,
    pending_secs: u64,
    now: u64,
    progress: &Progress,
) -> Result<Marked> {
    let mut claimed: HashSet<Sha256> = HashSet::new();
    for cache in index.caches().await? {
        let mut after = None;
        loop {
            let page = index.narinfos(&cache.name, after.as_ref(), PAGE).await?;
            let Some((last, _)) = page.last() else { break };
            after = Some(*last);
            for (hash, record) in page {
                if !evicted.contains(&(cache.name.clone(), hash)) {
                    claimed.insert(record.nar_hash);
                }
            }
        }
    }
    // NAR records are read before uploads: a NAR and its upload are recorded
    // together, so one recorded after the NAR walk passed it is not a candidate, and
    // one recorded before is found with its upload. Only the unclaimed are held
    // (their records, for the compare-and-swap that unlinks them); the chunks of the
    // rest are marked on the way.
    // Each live chunk, and whether its record was seen.
    let mut live: HashMap<u64, bool> = HashMap::new();
    let mut unclaimed = Vec::new();
    let mut after = None;
    loop {
        let page = index.nars_after(after.as_ref(), PAGE).await?;
        let Some((last, _)) = page.last() else { break };
        after = Some(*last);
        for (hash, nar) in page {
            if claimed.contains(&hash) {
                mark_nar(index, &nar, &mut live, progress).await?;
            } else {
                unclaimed.push((hash, nar));
            }
        }
    }
    let mut pending: HashSet<Sha256> = HashSet::new();
    let mut pending_uploads = 0;
    let mut stale_uploads = Vec::new();
    let mut after = None;
    loop {
        let page = index.uploads_after(after.as_ref(), PAGE).await?;
        let Some((cache, url, _)) = page.last() else {
            break;
        };
        after = Some((cache.clone(), *url));
        for (cache, url, upload) in page {
            if claimed.contains(&upload.nar_hash) {
                continue;
            }
            // An upload a narinfo took up only lets a push skip the NAR: with no
            // narinfo claiming the NAR any more it holds nothing. One not taken up yet
            // may belong to a push under way, whose narinfo follows.
            if !upload.claimed && upload.created.saturating_add(pending_secs) > now {
                pending.insert(upload.nar_hash);
                pending_uploads += 1;
            } else {
                stale_uploads.push((cache, url, upload));
            }
        }
    }
    drop(claimed);
    let mut dead_nars = Vec::new();
    for (hash, nar) in unclaimed {
        if pending.contains(&hash) {
            mark_nar(index, &nar, &mut live, progress).await?;
        } else {
            dead_nars.push((hash, nar));
        }
    }
    let mut after = None;
    loop {
        let page = index.blobs_after(after.as_ref(), PAGE).await?;
        let Some((last, _)) = page.last() else { break };
        after = Some(last.clone());
        for (_, stored) in page {
            chunks_of(index, &stored, &mut |c| {
                live.entry(short(&c.id)).or_insert(false);
            })
            .await?;
        }
    }
    let mut dead_chunks = Vec::new();
    let mut emptied = HashSet::new();
    let mut after = None;
    loop {
        let page = index.chunks_after(after.as_ref(), PAGE).await?;
        let Some(last) = page.last() else { break };
        after = Some(last.id);
        for c in page {
            match live.get_mut(&short(&c.id)) {
                Some(seen) => *seen = true,
                None => {
                    dead_chunks.push(c.id);
                    emptied.insert(c.pack);
                }
            }
        }
    }
    let unrecorded = live
        .into_iter()
        .filter(|(_, seen)| !seen)
        .map(|(id, _)| id)
        .collect();
    Ok(Marked {
        pending_uploads,
        stale_uploads,
        dead_nars,
        dead_chunks,
        emptied,
        unrecorded,
    })
}

/// Removes stale uploads and unclaimed NARs, each only if unchanged and, for NARs,
/// still claimed by no cache. Runs under every cache's exclusive lock.
async fn unlink(
    index: &dyn Index,
    caches: &[CacheName],
    uploads: &[(CacheName, NarUrl, Upload)],
    nars: &[(Sha256, NarRecord)],
) -> Result<(u64, u64)> {
    let mut removed = (0, 0);
    for (cache, url, upload) in uploads {
        if index.delete_upload_if(cache, url, upload).await? {
            removed.0 += 1;
        }
    }
    'nars: for (hash, nar) in nars {
        for c in caches {
            if index.cache_has_nar(c, hash).await? {
                continue 'nars;
            }
        }
        if index.delete_nar_if(hash, nar).await? {
            removed.1 += 1;
        }
    }
    index.flush().await?;
    Ok(removed)
}

/// The frames that manifests name, each counted once however many name it: 12 bytes
/// a frame (a million chunks take 12 MiB where a set of `(PackId, offset)` took 60),
/// sorted and deduplicated whenever the list would grow.
#[derive(Default)]
struct Frames {
    packs: Vec<PackId>,
    numbers: HashMap<PackId, u32>,
    /// Pack number, offset, stored length.
    frames: Vec<[u32; 3]>,
}

impl Frames {
    fn add(&mut self, c: &ChunkRef) {
        let next = self.packs.len() as u32;
        let pack = *self.numbers.entry(c.pack).or_insert_with(|| {
            self.packs.push(c.pack);
            next
        });
        if self.frames.len() == self.frames.capacity() {
            self.dedup();
            // Growing only when deduplicating freed less than half.
            if self.frames.len() > self.frames.capacity() / 2 {
                self.frames.reserve(self.frames.len().max(1024));
            }
        }
        self.frames.push([pack, c.offset, c.stored_len]);
    }

    fn dedup(&mut self) {
        self.frames.sort_unstable();
        self.frames.dedup_by_key(|f| (f[0], f[1]));
    }

    /// The bytes of each pack that the frames use.
    fn used(mut self) -> HashMap<PackId, u64> {
        self.dedup();
        let mut used = HashMap::with_capacity(self.packs.len());
        for [pack, _, len] in self.frames {
            *used.entry(self.packs[pack as usize]).or_default() += u64::from(len);
        }
        used
    }
}

/// What the records name now.
pub(crate) struct Live {
    manifests: HashSet<ManifestId>,
    /// Packs a manifest or a chunk record names.
    packs: HashSet<PackId>,
    /// The bytes of each pack that manifests name (each frame once).
    pub(crate) used: HashMap<PackId, u64>,
    restored: u64,
}

/// Everything the records name after unlinking: every NAR record, log and realisation
/// and chunk record (in a dry run, but for `dead_nars` and `dead_chunks`, those the
/// run would have removed). Chunks of `restorable` that live manifests use and that
/// have no record (an upload reused them while this run unlinked them, or a run that
/// could not finish removed them) get it back.
pub(crate) async fn live_now(
    index: &dyn Index,
    dead_nars: &HashSet<Sha256>,
    dead_chunks: &HashSet<ChunkId>,
    restorable: &HashSet<u64>,
    progress: &Progress,
) -> Result<Live> {
    let mut packs: HashSet<PackId> = HashSet::new();
    let mut after = None;
    loop {
        let page = index.chunks_after(after.as_ref(), PAGE).await?;
        let Some(last) = page.last() else { break };
        after = Some(last.id);
        for c in page {
            if !dead_chunks.contains(&c.id) {
                packs.insert(c.pack);
            }
        }
    }
    let mut seen = Seen {
        restorable,
        packs,
        manifests: HashSet::new(),
        candidates: HashMap::new(),
        frames: Frames::default(),
    };
    let mut after = None;
    loop {
        let page = index.nars_after(after.as_ref(), PAGE).await?;
        let Some((last, _)) = page.last() else { break };
        after = Some(*last);
        for (hash, nar) in page {
            if dead_nars.contains(&hash) {
                continue;
            }
            progress.add(1, nar.contents.size());
            seen.visit(index, &nar.contents).await?;
            seen.visit(index, &nar.listing).await?;
        }
    }
    let mut after = None;
    loop {
        let page = index.blobs_after(after.as_ref(), PAGE).await?;
        let Some((last, _)) = page.last() else { break };
        after = Some(last.clone());
        for (_, stored) in page {
            seen.visit(index, &stored).await?;
        }
    }
    let candidates: Vec<ChunkRef> = seen.candidates.into_values().collect();
    let mut restored = Vec::new();
    for batch in candidates.chunks(PAGE) {
        let ids: Vec<ChunkId> = batch.iter().map(|c| c.id).collect();
        let found = index.chunks(&ids).await?;
        restored.extend(
            batch
                .iter()
                .zip(found)
                .filter(|(_, f)| f.is_none())
                .map(|(c, _)| *c),
        );
    }
    if !restored.is_empty() {
        tracing::info!(
            chunks = restored.len(),
            "restored chunk records an upload reused during the collection"
        );
        index.put_chunks(&restored).await?;
    }
    Ok(Live {
        manifests: seen.manifests,
        packs: seen.packs,
        used: seen.frames.used(),
        restored: restored.len() as u64,
    })
}

/// What a walk through the live manifests has seen.
struct Seen<'a> {
    restorable: &'a HashSet<u64>,
    packs: HashSet<PackId>,
    manifests: HashSet<ManifestId>,
    /// Chunks of `restorable` that live manifests name.
    candidates: HashMap<ChunkId, ChunkRef>,
    frames: Frames,
}

impl Seen<'_> {
    async fn visit(&mut self, index: &dyn Index, stored: &Stored) -> crate::index::Result<()> {
        // A walk over every NAR reads the embedded index in place: room for requests.
        tokio::task::yield_now().await;
        self.manifests.insert(stored.id);
        let (packs, frames, candidates, restorable) = (
            &mut self.packs,
            &mut self.frames,
            &mut self.candidates,
            self.restorable,
        );
        chunks_of(index, stored, &mut |c| {
            packs.insert(c.pack);
            frames.add(c);
            if restorable.contains(&short(&c.id)) {
                candidates.insert(c.id, *c);
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body::Peer;
    use crate::config::Config;
    use crate::nix::nar::write::{nar, Entry};
    use crate::nix::{Compression, StorePath};

    async fn open(dir: &std::path::Path, keep_age: Option<u64>) -> Arc<App> {
        let mut config = Config {
            data_dir: dir.to_path_buf(),
            ..Config::default()
        };
        config.gc.grace_secs = 0;
        config.gc.pending_upload_secs = 0;
        config.gc.compact_dead_fraction = 0.0;
        config.gc.keep_age_secs = keep_age;
        App::open(config).await.unwrap().app
    }

    /// A store path named `name`, its hash made of its name.
    fn store_path(name: &str) -> StorePath {
        let digest = Sha256::digest(name.as_bytes());
        let hash = StorePathHash::from_bytes(digest.as_bytes()[..20].try_into().unwrap());
        StorePath::from_basename(&format!("{hash}-{name}")).unwrap()
    }

    /// Uploads and publishes to `main` a path with a file of `contents`, referring to
    /// `refs`.
    async fn push(app: &Arc<App>, name: &str, refs: &[&str], contents: &[u8]) -> StorePath {
        let data = nar(&Entry::File {
            executable: false,
            contents,
        });
        let body = futures::stream::iter([Ok(bytes::Bytes::from(data))]);
        let got = app
            .ingestor
            .ingest_nar(body, Compression::None, Peer::always(), None)
            .await
            .unwrap();
        let main: CacheName = "main".parse().unwrap();
        let url = NarUrl {
            hash: got.file_hash,
            compression: Compression::None,
        };
        app.ingestor.record(&main, &url, &got).await.unwrap();
        let path = store_path(name);
        let refs: Vec<String> = refs.iter().map(|r| store_path(r).to_string()).collect();
        let text = format!(
            "StorePath: {}\nURL: {url}\nCompression: none\nNarHash: {}\nNarSize: {}\nReferences: {}\n",
            path.full(),
            got.nar_hash,
            got.nar_size,
            refs.join(" ")
        );
        let cache = app.caches.get(&main).unwrap();
        crate::publish::publish(&app.index, &cache, path.hash(), text.as_bytes(), None)
            .await
            .unwrap();
        path
    }

    async fn served(app: &App, path: &StorePath) -> bool {
        let main: CacheName = "main".parse().unwrap();
        app.index
            .narinfo(&main, &path.hash())
            .await
            .unwrap()
            .is_some()
    }

    async fn verified(app: &Arc<App>) {
        let options = crate::verify::Options {
            cache: None,
            deep: true,
        };
        let report = crate::verify::run(app.clone(), options, Arc::default())
            .await
            .unwrap();
        assert_eq!(report.problems, vec![], "{report:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn chunk_records_a_killed_run_removed_under_a_live_manifest_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let app = open(dir.path(), None).await;
        let kept = push(
            &app,
            "kept",
            &[],
            &crate::testing::Xorshift(7).bytes(400_000),
        )
        .await;
        let main: CacheName = "main".parse().unwrap();
        let record = app
            .index
            .narinfo(&main, &kept.hash())
            .await
            .unwrap()
            .unwrap();
        let nar = app.index.nar(&record.nar_hash).await.unwrap().unwrap();
        let mut chunks = Vec::new();
        chunks_of(app.index.as_ref(), &nar.contents, &mut |c| chunks.push(*c))
            .await
            .unwrap();
        assert!(chunks.len() > 1, "{}", chunks.len());
        // What a run killed after unlinking leaves when an upload had reused the
        // chunks: a live manifest naming chunks with no record.
        let ids: Vec<ChunkId> = chunks.iter().map(|c| c.id).collect();
        app.index.delete_chunks(&ids[1..]).await.unwrap();
        let options = Options {
            cache: None,
            dry_run: false,
            now: crate::clock::now(),
            compact: false,
        };
        let report = super::run(app.clone(), options, Arc::default())
            .await
            .unwrap();
        assert_eq!(report.chunks_restored, ids.len() as u64 - 1, "{report:?}");
        assert_eq!((report.chunks, report.packs), (0, 0), "{report:?}");
        for c in &chunks {
            assert_eq!(
                crate::index::chunk(app.index.as_ref(), &c.id)
                    .await
                    .unwrap(),
                Some(*c)
            );
        }
        verified(&app).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn retention_by_age_evicts_what_nothing_recent_needs_at_the_time_given() {
        let dir = tempfile::tempdir().unwrap();
        let app = open(dir.path(), Some(500)).await;
        let lib = push(
            &app,
            "lib",
            &[],
            &crate::testing::Xorshift(1).bytes(300_000),
        )
        .await;
        let app_a = push(
            &app,
            "a",
            &["lib"],
            &crate::testing::Xorshift(2).bytes(200_000),
        )
        .await;
        let app_d = push(
            &app,
            "d",
            &["lib"],
            &crate::testing::Xorshift(3).bytes(200_000),
        )
        .await;
        let lone = push(
            &app,
            "lone",
            &[],
            &crate::testing::Xorshift(4).bytes(200_000),
        )
        .await;
        app.accesses.flush(app.index.as_ref()).await.unwrap();
        let main: CacheName = "main".parse().unwrap();
        // Fetched long ago (as of a time 1,000 s from now): everything but d.
        let now = crate::clock::now() + 1000;
        let at = |p: &StorePath, t: u64| (p.hash(), now - t);
        app.index
            .put_accesses(
                &main,
                &[
                    at(&lib, 900),
                    at(&app_a, 900),
                    at(&lone, 900),
                    at(&app_d, 100),
                ],
            )
            .await
            .unwrap();
        let run = |dry_run| Options {
            cache: None,
            dry_run,
            now,
            compact: false,
        };
        let predicted = super::run(app.clone(), run(true), Arc::default())
            .await
            .unwrap();
        let report = super::run(app.clone(), run(false), Arc::default())
            .await
            .unwrap();
        assert_eq!(report.paths.get("main"), Some(&2));
        assert_eq!(predicted.paths, report.paths);
        assert!(!served(&app, &app_a).await && !served(&app, &lone).await);
        // lib is old, but d (recent) needs it.
        assert!(served(&app, &lib).await && served(&app, &app_d).await);
        assert_eq!(
            (report.nars, report.dead_bytes_compacted),
            (2, predicted.dead_bytes_compacted)
        );
        assert!(
            report.bytes_freed + report.bytes_compacted > 0,
            "{report:?}"
        );
        verified(&app).await;

        // Pinned, a's closure would have stayed: pin d, and age everything.
        let pin = crate::pins::add(None, "d", app_d.full(), None, None, now);
        app.index.put_pin(&main, &pin).await.unwrap();
        let later = Options {
            cache: None,
            dry_run: false,
            now: now + 10_000,
            compact: false,
        };
        let report = super::run(app.clone(), later.clone(), Arc::default())
            .await
            .unwrap();
        assert_eq!(report.paths.get("main"), None, "{report:?}");
        assert!(served(&app, &lib).await && served(&app, &app_d).await);
        // Unpinned, they go, referrer first; nothing stays stored.
        assert!(app.index.delete_pin(&main, "d").await.unwrap());
        let report = super::run(app.clone(), later, Arc::default())
            .await
            .unwrap();
        assert_eq!(report.paths.get("main"), Some(&2));
        assert!(!served(&app, &lib).await && !served(&app, &app_d).await);
        assert!(app.packs.list().await.unwrap().is_empty());
        verified(&app).await;
    }
}
