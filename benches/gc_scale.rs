//! The garbage collector at scale, on synthetic metadata: a cache of 100,000 paths
//! whose NARs have 10 chunks each (1,000,000 chunks in 7,813 packs), every path
//! referring to a few others, a tenth of the paths deleted. Two steps, so that the
//! figures are the collection's own:
//!
//!     cargo run --release --example gc_scale -- populate DIR [PATHS]
//!     cargo run --release --example gc_scale -- collect DIR
//!
//! `collect` prints the run's report, its wall time and the process's peak RSS. The
//! frames are not real zstd (compaction is off: nothing here is partly dead); what is
//! measured is marking, unlinking and sweeping over every record.

use std::sync::Arc;
use std::time::Instant;

use cachet::app::App;
use cachet::config::Config;
use cachet::index::{NarInfoRecord, NarRecord, Upload};
use cachet::nix::{CacheName, Compression, NarUrl, Sha256, StorePath, StorePathHash};
use cachet::store::{ChunkId, ChunkRef, Manifest, ManifestId, PackId, Segment, Stored};

const CHUNKS_PER_NAR: u64 = 10;
const CHUNKS_PER_PACK: u64 = 128;
const FRAME: u32 = 4096;

fn config(dir: &std::path::Path) -> Config {
    let mut c = Config {
        data_dir: dir.to_path_buf(),
        ..Config::default()
    };
    c.gc.grace_secs = 0;
    c.gc.pending_upload_secs = 0;
    // Nothing here is partly dead, and the synthetic frames are not zstd.
    c.gc.compact_dead_fraction = 2.0;
    if let Ok(mib) = std::env::var("CACHE_MIB") {
        c.index.cache_mib = mib.parse().unwrap();
    }
    c
}

fn hash_of(n: u64) -> StorePathHash {
    let d = Sha256::digest(&n.to_le_bytes());
    StorePathHash::from_bytes(d.as_bytes()[..20].try_into().unwrap())
}

fn path_of(n: u64) -> StorePath {
    StorePath::from_basename(&format!("{}-p{n}", hash_of(n))).unwrap()
}

async fn populate(dir: &std::path::Path, paths: u64) {
    let app = App::open(config(dir)).await.unwrap().app;
    let index = &app.index;
    let main: CacheName = "main".parse().unwrap();
    let doomed: CacheName = "doomed".parse().unwrap();
    let mut record = index.caches().await.unwrap().into_iter().next().unwrap();
    record.name = doomed.clone();
    index.put_cache(&record).await.unwrap();
    let packs = (paths * CHUNKS_PER_NAR).div_ceil(CHUNKS_PER_PACK);
    let pack_id = |p: u64| {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&p.to_le_bytes());
        PackId(id)
    };
    let body = bytes::Bytes::from(vec![0u8; (CHUNKS_PER_PACK as usize) * FRAME as usize]);
    for p in 0..packs {
        app.packs.put(&pack_id(p), body.clone()).await.unwrap();
    }
    let mut chunk_no = 0u64;
    for n in 0..paths {
        let mut chunks = Vec::new();
        for _ in 0..CHUNKS_PER_NAR {
            let mut id = [0u8; 32];
            id[..8].copy_from_slice(&chunk_no.to_le_bytes());
            chunks.push(ChunkRef {
                id: ChunkId(id),
                pack: pack_id(chunk_no / CHUNKS_PER_PACK),
                offset: ((chunk_no % CHUNKS_PER_PACK) as u32) * FRAME,
                stored_len: FRAME,
                len: FRAME * 3,
            });
            chunk_no += 1;
        }
        index.put_chunks(&chunks).await.unwrap();
        let m = Manifest { chunks };
        let id = ManifestId::random();
        index.put_segment(&id, 0, &m).await.unwrap();
        let nar = NarRecord {
            contents: Stored {
                id,
                segments: vec![Segment::of(&m)],
            },
            listing: Stored {
                id: ManifestId::random(),
                segments: Vec::new(),
            },
        };
        let nar_hash = Sha256::digest(format!("nar{n}").as_bytes());
        let url = NarUrl {
            hash: nar_hash,
            compression: Compression::None,
        };
        let upload = Upload {
            nar_hash,
            nar_size: nar.contents.size(),
            file_hash: nar_hash,
            file_size: nar.contents.size(),
            created: 0,
            stored_size: 0,
            claimed: false,
        };
        // A tenth of the paths in the cache to delete.
        let cache = if n % 10 == 0 { &doomed } else { &main };
        index.put_upload(cache, &url, &upload, &nar).await.unwrap();
        let refs: Vec<u64> = (1..=3)
            .filter(|k| n >= k * 7)
            .map(|k| n - k * 7)
            .filter(|r| (r % 10 == 0) == (n % 10 == 0))
            .collect();
        let path = path_of(n);
        let text = format!(
            "StorePath: {}\nURL: {url}\nCompression: none\nNarHash: {nar_hash}\nNarSize: {}\nReferences: {}\n",
            path.full(),
            upload.nar_size,
            refs.iter().map(|r| path_of(*r).to_string()).collect::<Vec<_>>().join(" ")
        );
        let record = NarInfoRecord {
            nar_hash,
            nar_size: upload.nar_size,
            file_size: upload.file_size,
            text: text.into(),
        };
        let ref_hashes: Vec<StorePathHash> = refs.iter().map(|r| hash_of(*r)).collect();
        index
            .commit_narinfo(cache, &path.hash(), &record, &ref_hashes, None)
            .await
            .unwrap();
    }
    index.flush().await.unwrap();
    println!(
        "{paths} paths, {chunk_no} chunks, {packs} packs in {}",
        dir.display()
    );
}

fn collect(dir: &std::path::Path) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let app = App::open(config(dir)).await.unwrap().app;
        let doomed: CacheName = "doomed".parse().unwrap();
        app.index.delete_cache(&doomed).await.unwrap();
        let started = Instant::now();
        let options = cachet::gc::Options {
            cache: None,
            dry_run: false,
            now: cachet::clock::now(),
            compact: false,
        };
        let report = cachet::gc::run(app.clone(), options, Arc::default())
            .await
            .unwrap();
        let secs = started.elapsed().as_secs_f64();
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let hwm = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .unwrap_or("");
        println!("{}", serde_json::to_string(&report).unwrap());
        println!(
            "gc: {secs:.1} s, peak {}",
            hwm.trim_start_matches("VmHWM:").trim()
        );
    });
}

fn main() {
    cachet::allocator::configure();
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::Path::new(&args[2]);
    match args[1].as_str() {
        "populate" => {
            let paths = args.get(3).map_or(100_000, |n| n.parse().unwrap());
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(populate(dir, paths));
        }
        "collect" => collect(dir),
        other => panic!("unknown step {other}"),
    }
}
