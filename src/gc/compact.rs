//! Compaction: packs that are mostly dead are rewritten with their live frames only,
//! and the frames are recompressed at a high level on the way (by a setting, also
//! packs that are all live but old and never recompressed). Still one independent
//! zstd frame per chunk, so a `.nar.zst` stays the concatenation of stored frames.
//!
//! Manifests hold chunk locations, so every NAR, log and realisation whose manifest
//! names a moved frame gets a new manifest (new id: a download reading the old one is
//! unaffected), swapped in only if its record is unchanged, and each narinfo of a NAR
//! gets the new FileSize. The old packs and manifests are then unreferenced, and the
//! collector deletes them after its next barrier.
//!
//! The work runs on one thread of its own, at a lower priority (`gc.compact_nice`) and
//! optionally at a bounded rate, so that serving and pushes keep their speed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::chunks_of;
use crate::error::{Error, Result};
use crate::index::{BlobKey, Index, NarRecord, PAGE};
use crate::jobs::Progress;
use crate::nix::{NarInfo, Sha256};
use crate::store::{
    ChunkId, ChunkRef, Manifest, ManifestId, PackId, PackInfo, PackStore, Segment, Stored,
};

/// How compaction runs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Packs at least this dead (a fraction of their bytes) are rewritten; 0 rewrites
    /// every pack with any dead byte.
    pub dead_fraction: f64,
    /// The zstd level of rewritten frames.
    pub level: i32,
    /// Packs older than this (seconds) that were never rewritten are recompressed even
    /// when all live; 0 never.
    pub recompress_after_secs: u64,
    /// The niceness of the compacting thread.
    pub nice: i32,
    /// At most this many MiB of packs read per second; 0 no limit.
    pub mib_per_sec: u64,
    /// The size new packs are cut at.
    pub pack_bytes: usize,
}

impl Settings {
    /// How compaction runs, cutting packs at `pack_bytes`.
    pub fn of(gc: &crate::config::GcConfig, pack_bytes: usize) -> Self {
        Self {
            dead_fraction: gc.compact_dead_fraction,
            level: gc.recompress_level,
            recompress_after_secs: gc.recompress_after_secs,
            nice: gc.compact_nice,
            mib_per_sec: gc.compact_mib_per_sec,
            pack_bytes,
        }
    }
}

/// The index's own record that a pack was written by compaction.
fn compacted_key(id: &PackId) -> String {
    format!("compacted:{}", id.to_hex())
}

/// A pack chosen, with its bytes no manifest names.
#[derive(Debug, Clone, Copy)]
pub struct Candidate {
    /// The pack.
    pub pack: PackInfo,
    /// Its dead bytes.
    pub dead: u64,
}

/// The packs of `packs` to rewrite at `now`, `used` saying how many bytes of each
/// manifests name.
pub async fn candidates(
    index: &dyn Index,
    packs: &[PackInfo],
    used: &HashMap<PackId, u64>,
    settings: &Settings,
    now: u64,
) -> Result<Vec<Candidate>> {
    let mut out = Vec::new();
    for p in packs {
        let used = used.get(&p.id).copied().unwrap_or(0);
        if used == 0 {
            // Nothing to keep: the sweep deletes it once nothing names it.
            continue;
        }
        let dead = p.size.saturating_sub(used);
        let mostly_dead = dead > 0 && dead as f64 >= settings.dead_fraction * p.size as f64;
        let old = settings.recompress_after_secs > 0
            && now.saturating_sub(p.modified) >= settings.recompress_after_secs
            && index.meta(&compacted_key(&p.id)).await?.is_none();
        if mostly_dead || old {
            out.push(Candidate { pack: *p, dead });
        }
    }
    Ok(out)
}

/// What a compaction did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Packs rewritten (to be deleted once unreferenced).
    pub old_packs: Vec<PackId>,
    /// Manifests replaced (to be deleted once unreferenced).
    pub old_manifests: Vec<ManifestId>,
    /// Packs written.
    pub packs_written: u64,
    /// Bytes of the packs written.
    pub bytes_written: u64,
    /// Frames moved.
    pub frames: u64,
    /// Their stored bytes before, less after: what recompression saved.
    pub recompression_saved: u64,
    /// NARs, logs and realisations given new manifests.
    pub contents: u64,
    /// Where each moved frame went, by its old pack and offset.
    pub moved: HashMap<(PackId, u32), ChunkRef>,
}

/// Whose manifest names a moved frame.
enum Owner {
    Nar(Sha256, NarRecord),
    Blob(BlobKey, Stored),
}

/// Gives the contents whose manifests still name frames of `old` (uploads made while
/// the frames moved found the old records) manifests naming where `moved` put them.
pub async fn reown_again(
    index: &dyn Index,
    moved: &HashMap<(PackId, u32), ChunkRef>,
    old: &HashSet<PackId>,
    out: &mut Outcome,
) -> Result<()> {
    let owners = owners_naming(index, old, &mut |_| {}).await?;
    let relocate = |c: &ChunkRef| moved.get(&(c.pack, c.offset)).copied().unwrap_or(*c);
    for owner in owners {
        reown(index, owner, &relocate, out).await?;
    }
    Ok(index.flush().await?)
}

/// The NARs, logs and realisations whose manifests name a frame of `packs`; `frame`
/// is called with each such frame (once per naming).
async fn owners_naming(
    index: &dyn Index,
    packs: &HashSet<PackId>,
    frame: &mut (dyn FnMut(&ChunkRef) + Send),
) -> Result<Vec<Owner>> {
    let mut owners = Vec::new();
    let mut after = None;
    loop {
        let page = index.nars_after(after.as_ref(), PAGE).await?;
        let Some((last, _)) = page.last() else { break };
        after = Some(*last);
        for (hash, nar) in page {
            let contents = names(index, packs, &nar.contents, frame).await?;
            if contents | names(index, packs, &nar.listing, frame).await? {
                owners.push(Owner::Nar(hash, nar));
            }
        }
    }
    let mut after = None;
    loop {
        let page = index.blobs_after(after.as_ref(), PAGE).await?;
        let Some((last, _)) = page.last() else { break };
        after = Some(last.clone());
        for (key, stored) in page {
            if names(index, packs, &stored, frame).await? {
                owners.push(Owner::Blob(key, stored));
            }
        }
    }
    Ok(owners)
}

/// Whether `stored` names a frame of `packs`; `frame` is called with each it names.
async fn names(
    index: &dyn Index,
    packs: &HashSet<PackId>,
    stored: &Stored,
    frame: &mut (dyn FnMut(&ChunkRef) + Send),
) -> Result<bool> {
    let mut named = false;
    chunks_of(index, stored, &mut |c| {
        if packs.contains(&c.pack) {
            frame(c);
            named = true;
        }
    })
    .await?;
    Ok(named)
}

/// Rewrites `candidates`: on a thread of its own, at the configured priority.
pub async fn rewrite(
    index: Arc<dyn Index>,
    store: PackStore,
    candidates: Vec<Candidate>,
    settings: Settings,
    progress: Arc<Progress>,
) -> Result<Outcome> {
    let runtime = tokio::runtime::Handle::current();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("compaction".into())
        .spawn(move || {
            // On Linux the niceness of PRIO_PROCESS 0 is the calling thread's own.
            if let Err(e) = rustix::process::setpriority_process(None, settings.nice) {
                tracing::warn!(error = %e, "could not lower the compaction thread's priority");
            }
            let work = Work {
                index: index.as_ref(),
                store: &store,
                runtime: &runtime,
                settings: &settings,
                progress: &progress,
            };
            let _ = tx.send(work.run(&candidates));
        })
        .map_err(|e| Error::Internal(format!("starting the compaction thread: {e}")))?;
    rx.await
        .map_err(|_| Error::Internal("the compaction thread died".into()))?
}

struct Work<'a> {
    index: &'a dyn Index,
    store: &'a PackStore,
    runtime: &'a tokio::runtime::Handle,
    settings: &'a Settings,
    progress: &'a Progress,
}

impl Work<'_> {
    /// The thread's work: the reading and recompressing here, the index's and the
    /// store's calls on the runtime (`block_on`).
    fn run(&self, candidates: &[Candidate]) -> Result<Outcome> {
        let chosen: HashSet<PackId> = candidates.iter().map(|c| c.pack.id).collect();
        // The live frames of the chosen packs, by pack and offset, and their owners.
        let mut frames: BTreeMap<PackId, BTreeMap<u32, ChunkRef>> = BTreeMap::new();
        let owners = self
            .runtime
            .block_on(owners_naming(self.index, &chosen, &mut |c| {
                frames.entry(c.pack).or_default().insert(c.offset, *c);
            }))?;

        let mut out = Outcome::default();
        let moved = self.recompress(&frames, &mut out)?;
        // Chunk records follow their frames, so that new uploads reuse the new frames;
        // also a record that named another copy of the chunk, which is then unnamed
        // and goes (two uploads at once may each have stored the chunk).
        let records: Vec<ChunkRef> = moved.values().map(|m| m.2).collect();
        let relocate = |c: &ChunkRef| moved.get(&(c.pack, c.offset)).map_or(*c, |m| m.2);
        self.runtime.block_on(async {
            self.index.put_chunks(&records).await?;
            self.index.flush().await?;
            self.progress.phase("compacting: manifests");
            for owner in owners {
                reown(self.index, owner, &relocate, &mut out).await?;
                self.progress.add(1, 0);
            }
            Ok::<_, Error>(self.index.flush().await?)
        })?;
        // Only packs whose every frame moved are done with; one whose frames did not
        // all read back right stays.
        out.old_packs = candidates
            .iter()
            .map(|c| c.pack.id)
            .filter(|p| {
                frames
                    .get(p)
                    .is_none_or(|f| f.values().all(|c| moved.contains_key(&(c.pack, c.offset))))
            })
            .collect();
        out.moved = moved.into_iter().map(|(k, m)| (k, m.2)).collect();
        Ok(out)
    }

    /// Reads the live frames of each pack, recompresses them into new packs, and
    /// returns where each went: (old pack, old offset) → (old pack, old offset, new).
    #[allow(clippy::type_complexity)]
    fn recompress(
        &self,
        frames: &BTreeMap<PackId, BTreeMap<u32, ChunkRef>>,
        out: &mut Outcome,
    ) -> Result<HashMap<(PackId, u32), (PackId, u32, ChunkRef)>> {
        let started = Instant::now();
        let mut read = 0u64;
        let mut compressor = zstd::bulk::Compressor::new(self.settings.level)
            .map_err(|e| Error::Internal(format!("zstd level {}: {e}", self.settings.level)))?;
        let mut moved = HashMap::new();
        let mut pack = PackId::random();
        let mut buf: Vec<u8> = Vec::with_capacity(self.settings.pack_bytes + 65536);
        let mut in_buf: Vec<(PackId, u32, ChunkRef)> = Vec::new();
        for (old_pack, live) in frames {
            let Some(end) = live.values().map(ChunkRef::end).max() else {
                continue;
            };
            let data = self
                .runtime
                .block_on(self.store.get_range(old_pack, 0..end))
                .map_err(|e| Error::Internal(format!("reading pack {old_pack:?}: {e}")))?;
            read += end;
            for c in live.values() {
                let frame = &data[c.offset as usize..c.end() as usize];
                let chunk = match zstd::bulk::decompress(frame, c.len as usize) {
                    Ok(d) if d.len() == c.len as usize && ChunkId::of(&d) == c.id => d,
                    _ => {
                        tracing::error!(pack = ?old_pack, chunk = ?c.id, "a stored frame does not decompress to its chunk; its pack is left as it is");
                        continue;
                    }
                };
                let new_frame = compressor
                    .compress(&chunk)
                    .map_err(|e| Error::Internal(format!("zstd: {e}")))?;
                // A frame that does not shrink stays as it was.
                let frame: &[u8] = if new_frame.len() < frame.len() {
                    &new_frame
                } else {
                    frame
                };
                out.recompression_saved += u64::from(c.stored_len) - frame.len() as u64;
                let new = ChunkRef {
                    id: c.id,
                    pack,
                    offset: buf.len() as u32,
                    stored_len: frame.len() as u32,
                    len: c.len,
                };
                buf.extend_from_slice(frame);
                in_buf.push((*old_pack, c.offset, new));
                out.frames += 1;
                if buf.len() >= self.settings.pack_bytes {
                    self.seal(&mut pack, &mut buf, &mut in_buf, &mut moved, out)?;
                }
            }
            self.progress.add(1, end);
            if self.settings.mib_per_sec > 0 {
                let due = Duration::from_secs_f64(
                    read as f64 / (self.settings.mib_per_sec as f64 * 1048576.0),
                );
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
        }
        self.seal(&mut pack, &mut buf, &mut in_buf, &mut moved, out)?;
        Ok(moved)
    }

    #[allow(clippy::type_complexity)]
    fn seal(
        &self,
        pack: &mut PackId,
        buf: &mut Vec<u8>,
        in_buf: &mut Vec<(PackId, u32, ChunkRef)>,
        moved: &mut HashMap<(PackId, u32), (PackId, u32, ChunkRef)>,
        out: &mut Outcome,
    ) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let data = bytes::Bytes::from(std::mem::take(buf));
        out.bytes_written += data.len() as u64;
        self.runtime.block_on(async {
            self.store.put(pack, data).await?;
            let level = self.settings.level.to_le_bytes();
            Ok::<_, Error>(self.index.put_meta(&compacted_key(pack), &level).await?)
        })?;
        out.packs_written += 1;
        for m in in_buf.drain(..) {
            moved.insert((m.0, m.1), m);
        }
        *pack = PackId::random();
        Ok(())
    }
}

/// `stored` with its moved chunks in their new places, under a new manifest; `None`
/// if nothing of it moved.
async fn moved_copy(
    index: &dyn Index,
    stored: &Stored,
    relocate: &(dyn Fn(&ChunkRef) -> ChunkRef + Sync),
) -> Result<Option<Stored>> {
    let mut segments = Vec::with_capacity(stored.segments.len());
    let mut manifests = Vec::with_capacity(stored.segments.len());
    let mut changed = false;
    for i in 0..stored.segments.len() as u32 {
        let Some(m) = index.segment(&stored.id, i).await? else {
            return Ok(None);
        };
        let chunks: Vec<ChunkRef> = m.chunks.iter().map(relocate).collect();
        changed |= chunks != m.chunks;
        let m = Manifest { chunks };
        segments.push(Segment::of(&m));
        manifests.push(m);
    }
    if !changed {
        return Ok(None);
    }
    let id = ManifestId::random();
    for (i, m) in manifests.iter().enumerate() {
        index.put_segment(&id, i as u32, m).await?;
    }
    Ok(Some(Stored { id, segments }))
}

/// Gives `owner` manifests with the moved frames, if its record is unchanged.
async fn reown(
    index: &dyn Index,
    owner: Owner,
    relocate: &(dyn Fn(&ChunkRef) -> ChunkRef + Sync),
    out: &mut Outcome,
) -> Result<()> {
    match owner {
        Owner::Nar(hash, nar) => {
            let contents = moved_copy(index, &nar.contents, relocate).await?;
            let listing = moved_copy(index, &nar.listing, relocate).await?;
            let new = NarRecord {
                contents: contents.clone().unwrap_or_else(|| nar.contents.clone()),
                listing: listing.clone().unwrap_or_else(|| nar.listing.clone()),
            };
            let fresh: Vec<ManifestId> = [&contents, &listing]
                .into_iter()
                .flatten()
                .map(|s| s.id)
                .collect();
            if !index.replace_nar(&hash, &nar, &new).await? {
                // Uploaded again meanwhile: that upload's record stands.
                for m in &fresh {
                    index.delete_manifest(m).await?;
                }
                return Ok(());
            }
            out.contents += 1;
            if contents.is_some() {
                out.old_manifests.push(nar.contents.id);
            }
            if listing.is_some() {
                out.old_manifests.push(nar.listing.id);
            }
            let size = new.contents.stored_size();
            if size != nar.contents.stored_size() {
                resize_narinfos(index, &hash, size).await?;
            }
        }
        Owner::Blob(key, stored) => {
            let Some(new) = moved_copy(index, &stored, relocate).await? else {
                return Ok(());
            };
            if index.replace_blob(&key, &stored, &new).await? {
                out.contents += 1;
                out.old_manifests.push(stored.id);
            } else {
                index.delete_manifest(&new.id).await?;
            }
        }
    }
    Ok(())
}

/// Every narinfo of the NAR `hash` says its new FileSize.
async fn resize_narinfos(index: &dyn Index, hash: &Sha256, size: u64) -> Result<()> {
    for cache in index.caches().await? {
        for path in index.paths_of_nar(&cache.name, hash).await? {
            let Some(record) = index.narinfo(&cache.name, &path).await? else {
                continue;
            };
            let Ok(mut narinfo) = NarInfo::parse(&record.text) else {
                continue;
            };
            narinfo.file_size = Some(size);
            // Lost to a concurrent change (a re-signing): the next run sets it.
            index
                .replace_narinfo(
                    &cache.name,
                    &path,
                    &record.text,
                    narinfo.render().as_bytes(),
                    Some(size),
                )
                .await?;
        }
    }
    Ok(())
}
