//! Throughput of each ingest stage, and of the assembled pipeline, in bytes per second,
//! so a regression shows which stage moved.
//!
//!   cargo bench --bench ingest
//!
//! The input is a synthetic NAR of mixed content (incompressible runs, text-like runs,
//! repeated blocks), made here so the benchmark needs nothing outside the repository.

use std::io::Read as _;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use cachet::index::SledIndex;
use cachet::ingest::chunker::{ChunkParams, Chunker};
use cachet::ingest::{IngestSettings, Ingestor};
use cachet::metrics::Metrics;
use cachet::nix::nar::{self, write::Entry};
use cachet::nix::Compression;
use cachet::store::space::Space;
use cachet::store::PackStore;
use cachet::testing::Xorshift;

const PARAMS: ChunkParams = ChunkParams {
    min_size: 4096,
    avg_size: 16384,
    max_size: 65536,
};

fn file_contents(rng: &mut Xorshift, size: usize) -> Vec<u8> {
    const WORDS: [&str; 12] = [
        "lib",
        "nix",
        "store",
        "symbol",
        "_ZN4core3fmt",
        "\0\0\0\0",
        "GLIBC_2.34",
        "malloc",
        "\x7fELF",
        "text",
        "section",
        "0123456789",
    ];
    let mut out = Vec::with_capacity(size);
    while out.len() < size {
        match rng.next() % 3 {
            0 => (0..512).for_each(|_| out.push(rng.next() as u8)),
            _ => (0..64)
                .for_each(|_| out.extend_from_slice(WORDS[(rng.next() % 12) as usize].as_bytes())),
        }
    }
    out.truncate(size);
    out
}

fn sample_nar() -> Vec<u8> {
    let mut rng = Xorshift(0x9e3779b97f4a7c15);
    let files: Vec<(String, Vec<u8>)> = (0..160)
        .map(|i| {
            let size = 1024 << (rng.next() % 9); // 1 KiB to 256 KiB
            (format!("f{i:04}"), file_contents(&mut rng, size))
        })
        .collect();
    let big = file_contents(&mut rng, 16 << 20);
    let mut entries: Vec<(&str, Entry)> = files
        .iter()
        .map(|(n, c)| {
            (
                n.as_str(),
                Entry::File {
                    executable: false,
                    contents: c,
                },
            )
        })
        .collect();
    entries.push((
        "libbig.so",
        Entry::File {
            executable: true,
            contents: &big,
        },
    ));
    nar::write::nar(&Entry::Dir(entries))
}

fn chunks(nar: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut emit = |c: &[u8]| -> Result<(), ()> {
        out.push(c.to_vec());
        Ok(())
    };
    let mut chunker = Chunker::new(PARAMS);
    chunker.push(nar, &mut emit).unwrap();
    chunker.finish(&mut emit).unwrap();
    out
}

fn stages(c: &mut Criterion) {
    let nar = sample_nar();
    let xz = {
        let mut out = Vec::new();
        xz2::read::XzEncoder::new(&nar[..], 6)
            .read_to_end(&mut out)
            .unwrap();
        out
    };
    let zst = zstd::encode_all(&nar[..], 3).unwrap();
    let pieces = chunks(&nar);

    let mut g = c.benchmark_group("stage");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(nar.len() as u64));
    g.bench_function("decompress_xz", |b| {
        b.iter(|| {
            std::io::copy(
                &mut xz2::read::XzDecoder::new_multi_decoder(&xz[..]),
                &mut std::io::sink(),
            )
            .unwrap()
        })
    });
    g.bench_function("decompress_zstd", |b| {
        b.iter(|| {
            std::io::copy(
                &mut zstd::Decoder::new(&zst[..]).unwrap(),
                &mut std::io::sink(),
            )
            .unwrap()
        })
    });
    g.bench_function("nar_validate", |b| {
        b.iter(|| nar::validate(&nar[..], std::io::sink(), u64::MAX).unwrap())
    });
    g.bench_function("sha256", |b| b.iter(|| cachet::nix::Sha256::digest(&nar)));
    g.bench_function("fastcdc", |b| b.iter(|| chunks(&nar).len()));
    g.bench_function("blake3_per_chunk", |b| {
        b.iter(|| {
            pieces
                .iter()
                .map(|p| cachet::store::ChunkId::of(p).0[0])
                .fold(0u8, u8::wrapping_add)
        })
    });
    for level in [1, 3, 6] {
        let stored: usize = pieces
            .iter()
            .map(|p| zstd::bulk::compress(p, level).unwrap().len())
            .sum();
        eprintln!(
            "zstd level {level}: chunks stored at {:.3} of their size",
            stored as f64 / nar.len() as f64
        );
        g.bench_with_input(
            BenchmarkId::new("zstd_chunks", level),
            &level,
            |b, &level| {
                b.iter(|| {
                    pieces
                        .iter()
                        .map(|p| zstd::bulk::compress(p, level).unwrap().len())
                        .sum::<usize>()
                })
            },
        );
    }
    g.finish();
}

fn pipeline(c: &mut Criterion) {
    let nar = sample_nar();
    let zst = Bytes::from(zstd::encode_all(&nar[..], 3).unwrap());
    let plain = Bytes::from(nar.clone());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut g = c.benchmark_group("pipeline");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(nar.len() as u64));
    for (name, body, compression) in [
        ("none", plain, Compression::None),
        ("zstd", zst, Compression::Zstd),
    ] {
        g.bench_function(name, |b| {
            b.iter_batched(
                || {
                    // A fresh, empty store each time: every chunk is new and stored.
                    let dir = tempfile::tempdir().unwrap();
                    let index =
                        Arc::new(SledIndex::open(&dir.path().join("db"), 16 << 20).unwrap());
                    let objects = object_store::memory::InMemory::new();
                    let settings = IngestSettings {
                        chunking: PARAMS,
                        zstd_level: 3,
                        concurrency: 4,
                        pack_bytes: 4 << 20,
                        max_uploads: 1,
                        ..cachet::ingest::IngestSettings::of(&cachet::config::Config::default())
                            .unwrap()
                    };
                    let packs = PackStore::new(Arc::new(objects), Default::default());
                    let space = Space::new(Vec::new(), 0, None);
                    let metrics = Arc::new(Metrics::new());
                    (dir, Ingestor::new(index, packs, settings, metrics, space))
                },
                |(_dir, ingestor)| {
                    let pieces: Vec<Result<Bytes, cachet::body::BodyError>> = body
                        .chunks(256 * 1024)
                        .map(|p| Ok(body.slice_ref(p)))
                        .collect();
                    let peer = cachet::body::Peer::always();
                    rt.block_on(ingestor.ingest_nar(
                        futures::stream::iter(pieces),
                        compression,
                        peer,
                        None,
                    ))
                    .unwrap()
                },
                criterion::BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, stages, pipeline);
criterion_main!(benches);
