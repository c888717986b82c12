//! The upload pipeline: decompress, validate the NAR, hash, chunk, skip chunks already
//! stored, compress and store new ones, all streaming with bounded memory.
//!
//! The CPU-bound front (decompression, NAR validation, SHA-256, FastCDC, BLAKE3) runs
//! on one blocking thread reading the request body synchronously; chunks cross a
//! bounded channel to async tasks that compress (on the blocking pool) and store them,
//! a bounded number at a time. The manifest keeps the chunks' order.

pub mod chunker;
pub mod reader;

use std::io::{self, BufRead, BufReader, Read};
use std::sync::Arc;

use bytes::Bytes;
use futures::{Stream, StreamExt as _, TryStreamExt as _};
use tokio::sync::mpsc;

use crate::index::{Index, IndexError};
use crate::nix::nar::{self, NarError};
use crate::nix::{Compression, Sha256};
use crate::store::{ChunkId, ChunkRef, ChunkStore, Manifest};
use chunker::{ChunkParams, Chunker};
use reader::{ChunkingReader, HashingReader};

/// Buffer size between the stages: large enough that per-call overheads vanish.
const STAGE_BUFFER: usize = 256 * 1024;

#[derive(Debug, Clone, Copy)]
pub struct IngestSettings {
    pub chunking: ChunkParams,
    pub zstd_level: i32,
    /// Chunks compressed and stored at once per upload.
    pub concurrency: usize,
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
    } else if inner.is_some_and(|i| i.is::<StorageGone>()) {
        // Replaced by the storage error the async side reports.
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
    chunks: ChunkStore,
    settings: IngestSettings,
}

struct Front {
    nar_hash: Sha256,
    nar_size: u64,
    file_hash: Sha256,
    file_size: u64,
    listing: Vec<u8>,
}

impl Ingestor {
    pub fn new(index: Arc<dyn Index>, chunks: ChunkStore, settings: IngestSettings) -> Self {
        Self {
            index,
            chunks,
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
        let body = Box::pin(body.map_err(|e| io::Error::other(BodyError(e.to_string()))));
        let reader = tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(body));
        let (tx, mut rx) = mpsc::channel::<(ChunkId, Bytes)>(self.settings.concurrency * 2);
        let params = self.settings.chunking;
        let front = tokio::task::spawn_blocking(move || front(reader, compression, params, tx));

        let chunks = futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
            .map(|(id, data)| self.store_chunk(id, data))
            .buffered(self.settings.concurrency)
            .try_collect::<Vec<(ChunkRef, Option<u64>)>>();
        let (chunks, front) = tokio::join!(chunks, front);
        let chunks = chunks?;
        let front = front.expect("the ingest thread does not panic")?;

        let new: Vec<u64> = chunks.iter().filter_map(|(_, n)| *n).collect();
        Ok(IngestedNar {
            nar_hash: front.nar_hash,
            nar_size: front.nar_size,
            file_hash: front.file_hash,
            file_size: front.file_size,
            manifest: Manifest {
                chunks: chunks.into_iter().map(|(c, _)| c).collect(),
            },
            listing: front.listing,
            new_chunks: new.len() as u64,
            new_bytes: new.iter().sum(),
        })
    }

    /// Stores a chunk unless it already is; returns its record and, when it was new,
    /// the bytes stored.
    async fn store_chunk(
        &self,
        id: ChunkId,
        data: Bytes,
    ) -> Result<(ChunkRef, Option<u64>), IngestError> {
        if let Some(existing) = self.index.chunk(&id)? {
            return Ok((existing, None));
        }
        let level = self.settings.zstd_level;
        let len = data.len() as u32;
        let frame = tokio::task::spawn_blocking(move || zstd::bulk::compress(&data, level))
            .await
            .expect("compression does not panic")
            .map_err(|e| {
                IngestError::Storage(object_store::Error::Generic {
                    store: "zstd",
                    source: Box::new(e),
                })
            })?;
        let chunk = ChunkRef {
            id,
            stored_len: frame.len() as u32,
            len,
        };
        self.chunks.put(&id, Bytes::from(frame)).await?;
        self.index.put_chunk(&chunk)?;
        Ok((chunk, Some(u64::from(chunk.stored_len))))
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
        Compression::Xz => Box::new(xz2::bufread::XzDecoder::new_multi_decoder(r)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(r)?),
        Compression::Bzip2 => Box::new(bzip2::bufread::MultiBzDecoder::new(r)),
        Compression::Brotli | Compression::Lz4 => unreachable!("refused before reading"),
    })
}

/// The blocking front of the pipeline.
fn front(
    body: impl Read,
    compression: Compression,
    params: ChunkParams,
    tx: mpsc::Sender<(ChunkId, Bytes)>,
) -> Result<Front, IngestError> {
    let mut file = HashingReader::new(body);
    let (listing, nar_hash, nar_size) = {
        let raw = BufReader::with_capacity(STAGE_BUFFER, &mut file);
        let decoded = decoder(compression, raw).map_err(|e| classify(e, compression))?;
        let emit = |chunk: &[u8]| {
            let id = ChunkId::of(chunk);
            tx.blocking_send((id, Bytes::copy_from_slice(chunk)))
                .map_err(|_| io::Error::other(StorageGone))
        };
        let tee = ChunkingReader::new(decoded, Chunker::new(params), emit);
        let mut nar_input = BufReader::with_capacity(STAGE_BUFFER, tee);
        let listing = nar::validate(&mut nar_input).map_err(|e| match e {
            NarError::Read(e) => classify(e, compression),
            e => IngestError::Nar(e),
        })?;
        let (nar_hash, nar_size) = nar_input
            .into_inner()
            .finish()
            .map_err(|e| classify(e, compression))?;
        (listing.to_listing_json(), nar_hash, nar_size)
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
    Ok(Front {
        nar_hash,
        nar_size,
        file_hash,
        file_size,
        listing,
    })
}
