//! The upload pipeline: decompress, validate the NAR, hash, chunk, skip chunks already
//! stored, compress and store new ones, all streaming with bounded memory.
//!
//! The CPU-bound front runs on two blocking threads, so that one upload uses two
//! cores: one reads the request body synchronously, hashes it, decompresses it and
//! hashes the NAR; the other validates the NAR, cuts it into chunks and names them
//! (FastCDC, BLAKE3). Chunks cross a bounded channel to async tasks that look them up
//! and compress the new ones (on the blocking pool), a bounded number at a time, in
//! order; the packer appends new frames to pack objects. The manifest keeps the
//! chunks' order.

pub mod chunker;
mod packer;
pub mod reader;

use std::cell::RefCell;
use std::io::{self, BufRead, BufReader, Read};
use std::sync::Arc;

use bytes::Bytes;
use futures::{Stream, StreamExt as _, TryStreamExt as _};
use tokio::sync::mpsc;

use crate::index::{Index, IndexError};
use crate::nix::nar::{self, NarError};
use crate::nix::{Compression, Sha256};
use crate::store::{frame, ChunkId, ChunkRef, Manifest, PackStore};
use chunker::{ChunkParams, Chunker};
use packer::Packer;
use reader::{ChannelReader, ChunkingReader, HashingReader};

/// Buffer size between the stages: large enough that per-call overheads vanish.
const STAGE_BUFFER: usize = 256 * 1024;
/// Decompressed buffers in flight between the decoding and the chunking stage.
const DECODED_BUFFERS: usize = 4;

#[derive(Debug, Clone, Copy)]
pub struct IngestSettings {
    pub chunking: ChunkParams,
    pub zstd_level: i32,
    /// Chunks compressed at once per upload.
    pub concurrency: usize,
    /// Size at which a pack object is closed and written.
    pub pack_bytes: usize,
    /// Uploads ingested at once; more wait their turn.
    pub max_uploads: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("compression {0} is not supported for uploads")]
    Unsupported(Compression),
    #[error("body does not decompress as {compression}: {source}")]
    Decompress {
        compression: Compression,
        source: io::Error,
    },
    #[error("{0}")]
    Nar(NarError),
    #[error("data after the end of the compressed stream")]
    TrailingData,
    #[error("upload body ended early: {0}")]
    Body(io::Error),
    #[error("chunk storage: {0}")]
    Storage(#[from] object_store::Error),
    #[error(transparent)]
    Index(#[from] IndexError),
}

/// What an upload turned out to be.
#[derive(Debug, Clone)]
pub struct IngestedNar {
    pub nar_hash: Sha256,
    pub nar_size: u64,
    pub file_hash: Sha256,
    pub file_size: u64,
    pub manifest: Manifest,
    pub listing: Vec<u8>,
    /// Chunks this upload stored that were not stored before, and their stored bytes.
    pub new_chunks: u64,
    pub new_bytes: u64,
}

/// The most memory an xz upload's decoder may take. The body names its dictionary
/// size; `xz -9` needs 65 MiB to decode and Nix's default level 9 MiB, so this admits
/// every stream Nix makes and refuses one that asks for gigabytes.
const XZ_MEMORY_LIMIT: u64 = 80 * 1024 * 1024;

/// Chunks travel from the chunking stage in batches of about this many bytes, so
/// per-message and per-task costs are paid per batch, not per chunk.
const BATCH_BYTES: usize = 256 * 1024;

type Batch = Vec<(ChunkId, Bytes)>;

/// One chunk as a stored frame: zstd at `level`, or a raw frame at level 0. zstd uses
/// one reused context per thread: creating a context per chunk cost more than a tenth
/// of the ingest time.
fn compress(data: &[u8], level: i32) -> Result<Vec<u8>, IngestError> {
    if level == 0 {
        let mut frame = Vec::new();
        frame::write_raw(data, &mut frame);
        return Ok(frame);
    }
    thread_local! {
        static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
    }
    let failed = |e: io::Error| {
        IngestError::Storage(object_store::Error::Generic {
            store: "zstd",
            source: Box::new(e),
        })
    };
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|(l, _)| *l != level) {
            *slot = Some((level, zstd::bulk::Compressor::new(level).map_err(failed)?));
        }
        let (_, compressor) = slot.as_mut().expect("just set");
        compressor.compress(data).map_err(failed)
    })
}

/// Marks an I/O error as coming from the request body, not from decoding it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BodyError(pub String);

/// The blocking side stops when the storing side has gone away (it failed).
#[derive(Debug, thiserror::Error)]
#[error("chunk storage stopped")]
struct StorageGone;

fn classify(e: io::Error, compression: Compression) -> IngestError {
    let inner = e.get_ref();
    if inner.is_some_and(|i| i.is::<BodyError>()) {
        IngestError::Body(e)
    } else {
        IngestError::Decompress {
            compression,
            source: e,
        }
    }
}

pub struct Ingestor {
    index: Arc<dyn Index>,
    packs: PackStore,
    settings: IngestSettings,
    /// Each upload holds two threads of the blocking pool for its whole life and
    /// borrows more to compress; bounding the uploads keeps the pool from running out,
    /// which would stall every upload, and bounds their memory.
    uploads: tokio::sync::Semaphore,
}

/// A chunk on its way to the manifest.
enum Prepared {
    Known(ChunkRef),
    New {
        id: ChunkId,
        len: u32,
        frame: Vec<u8>,
    },
}

impl Ingestor {
    pub fn new(index: Arc<dyn Index>, packs: PackStore, settings: IngestSettings) -> Self {
        Self {
            index,
            packs,
            uploads: tokio::sync::Semaphore::new(settings.max_uploads),
            settings,
        }
    }

    /// Ingests one compressed NAR from `body`. On success its chunks are stored and
    /// recorded; nothing names them yet (see `record`).
    pub async fn ingest<S, E>(
        &self,
        body: S,
        compression: Compression,
    ) -> Result<IngestedNar, IngestError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + 'static,
        E: std::fmt::Display,
    {
        if matches!(compression, Compression::Brotli | Compression::Lz4) {
            return Err(IngestError::Unsupported(compression));
        }
        let _turn = self.uploads.acquire().await.expect("never closed");
        let body = Box::pin(body.map_err(|e| io::Error::other(BodyError(e.to_string()))));
        let reader = tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(body));
        let (tx, mut rx) = mpsc::channel::<Batch>(self.settings.concurrency);
        let (nar_tx, nar_rx) = std::sync::mpsc::sync_channel(DECODED_BUFFERS);
        let params = self.settings.chunking;
        let decoding = tokio::task::spawn_blocking(move || decode(reader, compression, nar_tx));
        let chunking =
            tokio::task::spawn_blocking(move || chunk(ChannelReader::new(nar_rx), params, tx));

        let stored = async {
            let mut prepared = futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
                .map(|batch| self.prepare(batch))
                .buffered(self.settings.concurrency);
            let mut packer = Packer::new(
                self.packs.clone(),
                self.index.clone(),
                self.settings.pack_bytes,
            );
            let mut chunks = Vec::new();
            while let Some(batch) = prepared.next().await {
                for p in batch? {
                    chunks.push(match p {
                        Prepared::Known(c) => c,
                        Prepared::New { id, len, frame } => packer.add(id, len, &frame).await?,
                    });
                }
            }
            Ok::<_, IngestError>((chunks, packer))
        };
        let (stored, decoded, listing) = tokio::join!(stored, decoding, chunking);
        let (chunks, mut packer) = stored?;
        // A body that fails to decode also truncates the NAR the chunking stage sees:
        // the decoding error is the cause.
        let decoded = decoded.expect("the decoding stage does not panic")?;
        let listing = listing.expect("the chunking stage does not panic")?;
        let decoded = decoded.expect("the decoding stage stops early only when chunking failed");
        // Only a NAR that checked out gets its last pack written.
        packer.finish().await?;
        let (new_chunks, new_bytes) = (packer.new_chunks, packer.new_bytes);

        Ok(IngestedNar {
            nar_hash: decoded.nar_hash,
            nar_size: decoded.nar_size,
            file_hash: decoded.file_hash,
            file_size: decoded.file_size,
            manifest: Manifest { chunks },
            listing,
            new_chunks,
            new_bytes,
        })
    }

    /// Looks a batch of chunks up, and compresses the new ones with one blocking task.
    async fn prepare(&self, batch: Batch) -> Result<Vec<Prepared>, IngestError> {
        let known = batch
            .iter()
            .map(|(id, _)| self.index.chunk(id))
            .collect::<Result<Vec<_>, _>>()?;
        let level = self.settings.zstd_level;
        tokio::task::spawn_blocking(move || {
            batch
                .into_iter()
                .zip(known)
                .map(|((id, data), known)| match known {
                    Some(c) => Ok(Prepared::Known(c)),
                    None => Ok(Prepared::New {
                        id,
                        len: data.len() as u32,
                        frame: compress(&data, level)?,
                    }),
                })
                .collect::<Result<Vec<_>, IngestError>>()
        })
        .await
        .expect("compression does not panic")
    }

    /// Makes an ingested NAR known by its NarHash (manifest and listing).
    pub fn record(&self, nar: &IngestedNar) -> Result<(), IndexError> {
        self.index
            .put_nar(&nar.nar_hash, &nar.manifest, &nar.listing)
    }
}

fn decoder<'a, R: BufRead + 'a>(compression: Compression, r: R) -> io::Result<Box<dyn Read + 'a>> {
    Ok(match compression {
        Compression::None => Box::new(r),
        // Multi-stream decoders: a stream may be several concatenated streams/frames.
        Compression::Xz => {
            let stream =
                xz2::stream::Stream::new_stream_decoder(XZ_MEMORY_LIMIT, xz2::stream::CONCATENATED)
                    .map_err(io::Error::other)?;
            Box::new(xz2::bufread::XzDecoder::new_stream(r, stream))
        }
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(r)?),
        Compression::Bzip2 => Box::new(bzip2::bufread::MultiBzDecoder::new(r)),
        Compression::Brotli | Compression::Lz4 => unreachable!("refused before reading"),
    })
}

/// What the decoding stage found: the body's and the NAR's hash and size.
struct Decoded {
    file_hash: Sha256,
    file_size: u64,
    nar_hash: Sha256,
    nar_size: u64,
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// The first blocking stage: hashes the body (FileHash), decompresses it, hashes the
/// NAR (NarHash) and sends it on in buffers. `None` when the next stage stopped
/// first: its error is the one to report.
fn decode(
    body: impl Read,
    compression: Compression,
    tx: std::sync::mpsc::SyncSender<Vec<u8>>,
) -> Result<Option<Decoded>, IngestError> {
    let mut file = HashingReader::new(body);
    let (nar_hash, nar_size) = {
        let raw = BufReader::with_capacity(STAGE_BUFFER, &mut file);
        let decoded = decoder(compression, raw).map_err(|e| classify(e, compression))?;
        let mut nar = HashingReader::new(decoded);
        loop {
            let mut buf = vec![0u8; STAGE_BUFFER];
            let n = read_full(&mut nar, &mut buf).map_err(|e| classify(e, compression))?;
            if n == 0 {
                break;
            }
            buf.truncate(n);
            if tx.send(buf).is_err() {
                return Ok(None);
            }
        }
        nar.finish()
    };
    // The decoder stops at the end of its stream; nothing may follow it.
    let mut extra = [0u8; 1];
    if file
        .read(&mut extra)
        .map_err(|e| classify(e, compression))?
        != 0
    {
        return Err(IngestError::TrailingData);
    }
    let (file_hash, file_size) = file.finish();
    Ok(Some(Decoded {
        file_hash,
        file_size,
        nar_hash,
        nar_size,
    }))
}

/// The second blocking stage: validates the NAR and lists it, cuts it into chunks,
/// names them (BLAKE3) and sends them on in batches. Returns the listing.
fn chunk(
    nar: impl Read,
    params: ChunkParams,
    tx: mpsc::Sender<Batch>,
) -> Result<Vec<u8>, IngestError> {
    // The only reading error here is the storing side having stopped (the decoding
    // stage ends the channel cleanly), and the storing side's own error is the one
    // reported; `Body` stands in for it.
    let mut batch: Batch = Vec::new();
    let mut batch_bytes = 0;
    let send = |batch: &mut Batch| {
        tx.blocking_send(std::mem::take(batch))
            .map_err(|_| io::Error::other(StorageGone))
    };
    let listing = {
        let emit = |chunk: &[u8]| {
            batch.push((ChunkId::of(chunk), Bytes::copy_from_slice(chunk)));
            batch_bytes += chunk.len();
            if batch_bytes >= BATCH_BYTES {
                batch_bytes = 0;
                send(&mut batch)?;
            }
            Ok(())
        };
        let tee = ChunkingReader::new(nar, Chunker::new(params), emit);
        let mut nar_input = BufReader::with_capacity(STAGE_BUFFER, tee);
        let listing = nar::validate(&mut nar_input).map_err(|e| match e {
            NarError::Read(e) => IngestError::Body(e),
            e => IngestError::Nar(e),
        })?;
        nar_input.into_inner().finish().map_err(IngestError::Body)?;
        listing.to_listing_json()
    };
    if !batch.is_empty() {
        send(&mut batch).map_err(IngestError::Body)?;
    }
    Ok(listing)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::index::SledIndex;
    use crate::nix::nar::write::{nar, Entry};
    use crate::testing::Xorshift;

    /// The defaults, with small packs so that a few MiB fill several.
    fn settings() -> IngestSettings {
        IngestSettings {
            concurrency: 2,
            pack_bytes: 256 * 1024,
            max_uploads: 2,
            ..crate::config::Config::default().ingest_settings()
        }
    }

    /// An ingestor over a local store in `dir`.
    fn ingestor(dir: &std::path::Path) -> Ingestor {
        let index = Arc::new(SledIndex::open(&dir.join("index"), 1 << 20).unwrap());
        std::fs::create_dir_all(dir.join("store")).unwrap();
        let packs = PackStore::local(dir.join("store")).unwrap();
        Ingestor::new(index, packs, settings())
    }

    /// A NAR of a few MiB of incompressible file contents.
    fn big_nar() -> Vec<u8> {
        let contents = Xorshift(3).bytes(3 * 1024 * 1024);
        nar(&Entry::File {
            executable: false,
            contents: &contents,
        })
    }

    type Piece = Result<Bytes, String>;

    fn pieces(data: &[u8]) -> Vec<Piece> {
        data.chunks(64 * 1024)
            .map(|p| Ok(Bytes::copy_from_slice(p)))
            .collect()
    }

    /// Runs an ingest, failing the test rather than hanging if it never ends.
    async fn ingest(ingestor: &Ingestor, body: Vec<Piece>) -> Result<IngestedNar, IngestError> {
        let run = ingestor.ingest(futures::stream::iter(body), Compression::None);
        tokio::time::timeout(Duration::from_secs(60), run)
            .await
            .expect("an ingest ends")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_whole_nar_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let data = big_nar();
        let got = ingest(&ingestor(dir.path()), pieces(&data)).await.unwrap();
        assert_eq!(got.nar_size, data.len() as u64);
        assert_eq!(got.manifest.nar_size(), data.len() as u64);
        assert!(got.manifest.chunks.len() > 10);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_body_that_breaks_off_is_a_body_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut body = pieces(&big_nar());
        body.truncate(20);
        body.push(Err("connection reset".into()));
        let err = ingest(&ingestor(dir.path()), body).await.unwrap_err();
        assert!(matches!(err, IngestError::Body(_)), "{err:?}");
        assert!(err.to_string().contains("connection reset"), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_bad_nar_fails_early_however_long_the_body() {
        let dir = tempfile::tempdir().unwrap();
        let mut data = b"not a NAR at all".to_vec();
        data.extend(Xorshift(5).bytes(40 * 1024 * 1024));
        let err = ingest(&ingestor(dir.path()), pieces(&data))
            .await
            .unwrap_err();
        assert!(matches!(err, IngestError::Nar(_)), "{err:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_store_is_a_storage_error() {
        let dir = tempfile::tempdir().unwrap();
        let ingestor = ingestor(dir.path());
        // Packs cannot be written under a root that has become a file.
        std::fs::remove_dir_all(dir.path().join("store")).unwrap();
        std::fs::write(dir.path().join("store"), b"").unwrap();
        let err = ingest(&ingestor, pieces(&big_nar())).await.unwrap_err();
        assert!(matches!(err, IngestError::Storage(_)), "{err:?}");
    }
}
