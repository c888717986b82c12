//! Checking that what the records say is stored is there: every chunk record points
//! into a pack that holds its frame, and every narinfo's NAR, manifests and packs
//! exist, with its references in the cache. Deep, every stored frame decompresses to
//! the chunk its id names and every NAR reassembles to its NarHash.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use futures::StreamExt as _;

use crate::app::App;
use crate::error::Result;
use crate::index::{Index, NarRecord, PAGE};
use crate::jobs::Progress;
use crate::nix::{CacheName, NarInfo, Sha256};
use crate::serve::Encoding;
use crate::store::{ChunkId, ChunkRef, PackId, Stored};

/// What to check.
#[derive(Debug, Clone)]
pub struct Options {
    /// Only the narinfos of this cache (chunk records are checked always).
    pub cache: Option<CacheName>,
    /// Read and check every frame and every NAR.
    pub deep: bool,
}

/// One thing found wrong, with the store paths it affects.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Problem {
    /// What is wrong.
    pub what: String,
    /// `<cache>: <store path>` of each path it breaks.
    pub paths: Vec<String>,
}

/// What a verification checked and found.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Report {
    /// Narinfos checked.
    pub paths: u64,
    /// Chunk records checked.
    pub chunks: u64,
    /// Packs stored.
    pub packs: u64,
    /// Bytes read back (deep only).
    pub bytes_read: u64,
    /// What is wrong; empty when all is well.
    pub problems: Vec<Problem>,
}

/// Where a frame lies in its pack, checked against the pack's size.
fn frame_problem(c: &ChunkRef, packs: &HashMap<PackId, u64>) -> Option<String> {
    match packs.get(&c.pack) {
        None => Some(format!(
            "chunk {:?} is in pack {:?}, which is missing",
            c.id, c.pack
        )),
        Some(size) if c.end() > *size => Some(format!(
            "chunk {:?} ends at byte {} of pack {:?}, which has {size}",
            c.id,
            c.end(),
            c.pack
        )),
        Some(_) => None,
    }
}

/// Every chunk of a stored content, or what is missing of its manifest.
async fn manifest(
    index: &dyn Index,
    stored: &Stored,
) -> Result<std::result::Result<Vec<ChunkRef>, String>> {
    let mut chunks = Vec::new();
    for i in 0..stored.segments.len() as u32 {
        match index.segment(&stored.id, i).await? {
            Some(m) => chunks.extend(m.chunks),
            None => {
                return Ok(Err(format!(
                    "segment {i} of manifest {:?} is missing",
                    stored.id
                )))
            }
        }
    }
    Ok(Ok(chunks))
}

/// Runs one verification.
pub async fn run(app: Arc<App>, options: Options, progress: Arc<Progress>) -> Result<Report> {
    let mut report = Report::default();
    progress.phase("listing");
    let packs: HashMap<PackId, u64> = app
        .packs
        .list()
        .await?
        .into_iter()
        .map(|p| (p.id, p.size))
        .collect();
    report.packs = packs.len() as u64;

    progress.phase("chunks");
    let mut after = None;
    loop {
        let chunks = app.index.chunks_after(after.as_ref(), PAGE).await?;
        let Some(last) = chunks.last() else { break };
        after = Some(last.id);
        report.chunks += chunks.len() as u64;
        check_chunks(&app, &chunks, &packs, options.deep, &progress, &mut report).await;
    }

    progress.phase("paths");
    let (nars, closure_problems, paths) =
        served_nars(app.index.as_ref(), options.cache.as_ref()).await?;
    report.paths = paths;
    report.problems.extend(closure_problems);

    for (nar_hash, (record, paths)) in nars {
        let Some(record) = record else {
            report.problems.push(Problem {
                what: format!("NAR {nar_hash} has no record"),
                paths,
            });
            continue;
        };
        if let Some(what) =
            check_nar(&app, nar_hash, &record, &packs, options.deep, &mut report).await?
        {
            report.problems.push(Problem { what, paths });
        }
        progress.add(1, record.contents.size());
    }
    Ok(report)
}

/// Checks chunk records against the packs (and, `deep`, their frames against their ids).
async fn check_chunks(
    app: &App,
    chunks: &[ChunkRef],
    packs: &HashMap<PackId, u64>,
    deep: bool,
    progress: &Progress,
    report: &mut Report,
) {
    for c in chunks {
        if let Some(what) = frame_problem(c, packs) {
            report.problems.push(Problem {
                what: format!("chunk record: {what}"),
                paths: Vec::new(),
            });
        } else if deep {
            let frame = app
                .packs
                .get_range(&c.pack, u64::from(c.offset)..c.end())
                .await;
            let ok = frame.as_ref().is_ok_and(|f| {
                zstd::bulk::decompress(f, c.len as usize)
                    .is_ok_and(|data| data.len() == c.len as usize && ChunkId::of(&data) == c.id)
            });
            if !ok {
                report.problems.push(Problem {
                    what: format!("chunk {:?}: its frame does not decompress to it", c.id),
                    paths: Vec::new(),
                });
            }
            report.bytes_read += u64::from(c.stored_len);
        }
        progress.add(1, u64::from(c.stored_len));
    }
}

/// Every NAR served (its record, if it has one), with the paths that serve it.
type ServedNars = BTreeMap<Sha256, (Option<NarRecord>, Vec<String>)>;

/// Every NAR served, with the paths that serve it (of `only`, or of every cache); the
/// broken closures; how many paths.
async fn served_nars(
    index: &dyn Index,
    only: Option<&CacheName>,
) -> Result<(ServedNars, Vec<Problem>, u64)> {
    let mut nars: BTreeMap<Sha256, (Option<NarRecord>, Vec<String>)> = BTreeMap::new();
    let mut problems = Vec::new();
    let mut count = 0;
    for cache in index.caches().await? {
        if only.is_some_and(|o| *o != cache.name) {
            continue;
        }
        let mut after = None;
        loop {
            let page = index.narinfos(&cache.name, after.as_ref(), 1024).await?;
            let Some((last, _)) = page.last() else { break };
            after = Some(*last);
            for (hash, record) in page {
                count += 1;
                let Ok(narinfo) = NarInfo::parse(&record.text) else {
                    problems.push(Problem {
                        what: "the narinfo does not parse".into(),
                        paths: vec![format!("{}: {hash}", cache.name)],
                    });
                    continue;
                };
                let name = format!("{}: {}", cache.name, narinfo.store_path.full());
                for r in narinfo.foreign_references() {
                    if index.narinfo(&cache.name, &r.hash()).await?.is_none() {
                        problems.push(Problem {
                            what: format!("its reference {} is not in the cache", r.full()),
                            paths: vec![name.clone()],
                        });
                    }
                }
                let entry = nars.entry(record.nar_hash).or_insert((None, Vec::new()));
                if entry.0.is_none() {
                    entry.0 = index.nar(&record.nar_hash).await?;
                }
                entry.1.push(name);
            }
        }
    }
    Ok((nars, problems, count))
}

/// What is wrong with a served NAR's record: its manifests, its frames, and (`deep`)
/// its bytes against its hash.
async fn check_nar(
    app: &App,
    nar_hash: Sha256,
    record: &NarRecord,
    packs: &HashMap<PackId, u64>,
    deep: bool,
    report: &mut Report,
) -> Result<Option<String>> {
    let mut broken = None;
    for stored in [&record.contents, &record.listing] {
        match manifest(app.index.as_ref(), stored).await? {
            Err(what) => broken = Some(what),
            Ok(chunks) => {
                if let Some(what) = chunks.iter().find_map(|c| frame_problem(c, packs)) {
                    broken = Some(what);
                }
            }
        }
    }
    if broken.is_none() && deep {
        let mut hasher = sha2::Sha256::default();
        let mut body = std::pin::pin!(crate::serve::body(
            &app.serve,
            &record.contents,
            Encoding::Plain,
            0..record.contents.size(),
        ));
        let mut read = 0u64;
        while let Some(bytes) = body.next().await {
            match bytes {
                Ok(b) => {
                    sha2::Digest::update(&mut hasher, &b);
                    read += b.len() as u64;
                }
                Err(e) => {
                    broken = Some(format!("NAR {nar_hash} does not read back: {e}"));
                    break;
                }
            }
        }
        report.bytes_read += read;
        let got = Sha256::from_bytes(sha2::Digest::finalize(hasher).into());
        if broken.is_none() && got != nar_hash {
            broken = Some(format!("NAR {nar_hash} reassembles to {got}"));
        }
    }
    Ok(broken)
}

/// Starts a verification as the servers' one job.
pub async fn start(
    app: &Arc<App>,
    options: Options,
) -> std::result::Result<u64, crate::coord::JobRefused> {
    let running = app.clone();
    app.coord
        .start_job(
            "verify",
            crate::coord::job(move |p| run(running, options, p)),
        )
        .await
}
