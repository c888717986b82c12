//! The upload pipeline: decompress, validate the NAR, hash, chunk, skip chunks already
//! stored, compress and store new ones, all streaming with bounded memory. Build logs
//! and realisations take the same path without the NAR's decoding and validation, and
//! a NAR's `.ls` listing, written while it is validated, is chunked and stored beside it.
//!
//! The CPU-bound front runs on two blocking threads, so that one upload uses two
//! cores: one reads the request body synchronously, hashes it, decompresses it and
//! hashes the NAR; the other validates the NAR, cuts it (and its listing) into chunks
//! and names them (FastCDC, BLAKE3). Chunks cross a bounded channel to async tasks that
//! look them up and compress the new ones (on the blocking pool), a bounded number at a
//! time, in order; the packer appends new frames to pack objects. The manifests keep
//! the chunks' order.
//!
//! Before it reads a body past its first bytes, an upload takes an ingest slot and
//! reserves its memory from a budget shared by all uploads (`budget`); an upload whose
//! client goes away is dropped with its future, and its blocking stages stop at their
//! next hand-over.

pub mod chunker;
pub mod decoder;
mod packer;
pub mod reader;

use std::cell::RefCell;
use std::io::{self, BufReader, Read, Write as _};
use std::sync::Arc;

use bytes::Bytes;
use futures::{Stream, StreamExt as _};
use tokio::sync::mpsc;

use crate::body::{BodyError, Peer};
use crate::budget::Budget;
use crate::index::{Index, IndexError, NarRecord, Upload};
use crate::metrics::Metrics;
use crate::nix::nar::{self, NarError};
use crate::nix::{CacheName, Compression, NarUrl, Sha256};
use crate::quota::{Charge, ChargeError};
use crate::store::space::{LowSpace, Space};
use crate::store::{
    frame, ChunkId, ChunkRef, Manifest, ManifestId, PackStore, Segment, Stored, SEGMENT_CHUNKS,
};
use chunker::{ChunkParams, Chunker};
use packer::Packer;
use reader::{ChannelReader, ChunkingReader, ChunkingWriter, HashingReader};

/// Buffer size between the stages: large enough that per-call overheads vanish.
const STAGE_BUFFER: usize = 256 * 1024;
/// Decompressed buffers in flight between the decoding and the chunking stage.
const DECODED_BUFFERS: usize = 4;
/// The listing's JSON is written in small pieces; they reach its chunker in blocks.
const LISTING_BUFFER: usize = 64 * 1024;
/// The NAR validator's block for file contents.
const VALIDATOR_BLOCK: usize = 64 * 1024;

/// How uploads are ingested.
#[derive(Debug, Clone, Copy)]
pub struct IngestSettings {
    /// Chunk sizes.
    pub chunking: ChunkParams,
    /// zstd level of new chunks (0: raw frames).
    pub zstd_level: i32,
    /// Chunk batches compressed at once per upload.
    pub concurrency: usize,
    /// Size at which a pack object is closed and written.
    pub pack_bytes: usize,
    /// Uploads ingested at once; more wait their turn.
    pub max_uploads: usize,
    /// Largest NAR accepted, uncompressed.
    pub max_nar_bytes: u64,
    /// Most files, directories and symlinks in one NAR.
    pub max_nar_entries: u64,
    /// Memory all uploads together may reserve (see `upload_memory`).
    pub memory_bytes: u64,
    /// How much larger than its body a NAR may decode to, beyond `expansion_floor`.
    pub max_expansion: u64,
    /// NAR bytes decoded before `max_expansion` applies.
    pub expansion_floor: u64,
}

impl IngestSettings {
    /// The pipeline's settings from the config; refused when the memory for uploads
    /// does not hold one upload.
    pub fn of(config: &crate::config::Config) -> anyhow::Result<Self> {
        const MIB: u64 = 1024 * 1024;
        let settings = Self {
            chunking: config.chunking,
            zstd_level: config.ingest.zstd_level,
            concurrency: config.ingest.concurrency,
            pack_bytes: config.ingest.pack_bytes,
            max_uploads: config.ingest.max_uploads,
            max_nar_bytes: config.ingest.max_nar_bytes,
            max_nar_entries: config.ingest.max_nar_entries,
            memory_bytes: config.ingest.memory_mib * MIB,
            max_expansion: config.ingest.max_expansion,
            expansion_floor: config.ingest.expansion_floor_mib * MIB,
        };
        let upload = settings.upload_memory();
        anyhow::ensure!(
            settings.memory_bytes > upload,
            "ingest.memory_mib must be more than one upload takes ({} MiB with these settings)",
            upload.div_ceil(MIB)
        );
        Ok(settings)
    }

    /// The most memory one upload uses besides its decoder: nine stage buffers (the
    /// body's, two read buffers, four queued between the two threads, one being
    /// filled and one being read), the validator's block, the NAR's and the listing's
    /// chunkers (each up to four maximal chunks and a stage buffer) and the listing's
    /// buffer; batches of chunks: `concurrency` in the channel, one being filled, as
    /// many being compressed (data and frames), and the one being packed; the pack
    /// being filled and those being written; and one segment of each manifest. It does
    /// not grow with the NAR.
    pub fn upload_memory(&self) -> u64 {
        let max_chunk = self.chunking.max_size as usize;
        let stage = 9 * STAGE_BUFFER + VALIDATOR_BLOCK;
        let chunkers = 2 * (4 * max_chunk + STAGE_BUFFER) + LISTING_BUFFER;
        // A batch ends with the chunk that took it past its size; a compressed frame
        // may be slightly larger than its chunk.
        let batch = BATCH_BYTES + max_chunk;
        let batches = (3 * self.concurrency + 3) * batch;
        let packs = (1 + packer::WRITES_IN_FLIGHT) * (self.pack_bytes + 2 * max_chunk);
        let segments = 2 * SEGMENT_CHUNKS * std::mem::size_of::<ChunkRef>();
        (stage + chunkers + batches + packs + segments) as u64
    }
}

/// Why an upload was not stored.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The body's compression is one the server does not decode.
    #[error("compression {0} is not supported for uploads")]
    Unsupported(Compression),
    /// The body is not valid in its compression.
    #[error("body does not decompress as {compression}: {source}")]
    Decompress {
        /// The compression the URL named.
        compression: Compression,
        /// The decoder's complaint.
        source: io::Error,
    },
    /// The decompressed body is not a valid NAR.
    #[error("{0}")]
    Nar(NarError),
    /// Bytes follow the compressed stream.
    #[error("data after the end of the compressed stream")]
    TrailingData,
    /// The client stalled or the connection broke.
    #[error("upload body: {0}")]
    Body(BodyError),
    /// The content is larger than the server accepts.
    #[error("the {what} is larger than {limit} bytes ({setting})")]
    TooLarge {
        /// What was too large.
        what: &'static str,
        /// The limit.
        limit: u64,
        /// The setting that sets it.
        setting: &'static str,
    },
    /// The body decodes to far more than it is: a compression bomb.
    #[error(
        "the NAR decodes to more than {max_expansion} times the bytes of its body past its \
         first {floor_mib} MiB (ingest.max_expansion): refused as a compression bomb"
    )]
    Expansion {
        /// The most a body may expand.
        max_expansion: u64,
        /// The NAR bytes allowed before that.
        floor_mib: u64,
    },
    /// The cache would go past its quota.
    #[error(transparent)]
    Quota(#[from] crate::quota::QuotaExceeded),
    /// The decoder the stream asks for needs more memory than the server allows.
    #[error("decoding this stream needs {needed_mib} MiB, more than the {budget_mib} MiB the server gives all uploads (ingest.memory_mib)")]
    DecoderMemory {
        /// What the stream's header asks for.
        needed_mib: u64,
        /// The whole budget.
        budget_mib: u64,
    },
    /// A filesystem the upload would write to is short of space.
    #[error(transparent)]
    LowSpace(#[from] LowSpace),
    /// The chunk storage failed.
    #[error("chunk storage: {0}")]
    Storage(#[from] object_store::Error),
    /// The metadata failed.
    #[error(transparent)]
    Index(#[from] IndexError),
    /// The client closed its connection before the upload was stored.
    #[error("the client went away")]
    ClientGone,
    /// A stage failed in a way that is a bug (a panicked task, a failing compressor).
    #[error("internal error: {0}")]
    Internal(String),
}

impl IngestError {
    /// A short name for why, as counted in `cachet_uploads_rejected_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unsupported(_) => "unsupported",
            Self::Decompress { .. } | Self::TrailingData => "decompress",
            Self::Nar(NarError::TooManyEntries { .. }) => "too_many_entries",
            Self::Nar(_) => "bad_nar",
            Self::Body(BodyError::Stalled { .. }) => "stalled",
            Self::Body(BodyError::Broken(_)) => "body",
            Self::TooLarge { .. } => "too_large",
            Self::Expansion { .. } => "expansion",
            Self::Quota(_) => "quota",
            Self::DecoderMemory { .. } => "decoder_memory",
            Self::LowSpace(_) => "disk_full",
            Self::Storage(_) | Self::Index(_) => "storage",
            Self::ClientGone => "client_gone",
            Self::Internal(_) => "internal",
        }
    }
}

/// What an upload turned out to be.
#[derive(Debug, Clone)]
pub struct IngestedNar {
    /// SHA-256 of the NAR.
    pub nar_hash: Sha256,
    /// Size of the NAR.
    pub nar_size: u64,
    /// SHA-256 of the body as sent.
    pub file_hash: Sha256,
    /// Size of the body as sent.
    pub file_size: u64,
    /// The NAR's chunks and its listing's.
    pub record: NarRecord,
    /// Chunks this upload stored that were not stored before, and their stored bytes.
    pub new_chunks: u64,
    /// Stored bytes of those chunks.
    pub new_bytes: u64,
}

/// What a body holds, which decides the checks it gets.
#[derive(Debug, Clone, Copy)]
enum Content {
    /// A NAR in a compression: decoded, validated and listed.
    Nar(Compression),
    /// A file stored as it is (a build log, a realisation), of at most this many bytes.
    Blob(u64),
}

/// Which manifest a chunk belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Contents = 0,
    Listing = 1,
}

/// The most memory one upload's decoder may take, if the budget allows. `xz -9` needs
/// 65 MiB to decode and Nix's default level 9 MiB, zstd's level 19 8 MiB, so this
/// admits every stream Nix makes and refuses one that asks for gigabytes.
const MAX_DECODER_MEMORY: u64 = 80 * 1024 * 1024;

/// Chunks travel from the chunking stage in batches of about this many bytes, so
/// per-message and per-task costs are paid per batch, not per chunk.
const BATCH_BYTES: usize = 256 * 1024;

type Batch = Vec<(Part, ChunkId, Bytes)>;

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
    // zstd fails only on a bad parameter or an allocation failure: a bug, not an
    // unavailable backend.
    let failed = |e: io::Error| IngestError::Internal(format!("zstd compression: {e}"));
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|(l, _)| *l != level) {
            *slot = Some((level, zstd::bulk::Compressor::new(level).map_err(failed)?));
        }
        let (_, compressor) = slot.as_mut().expect("just set");
        compressor.compress(data).map_err(failed)
    })
}

/// Carries a body error through the `io::Read` of the decoding stage.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct FromBody(BodyError);

/// The blocking side stops when the storing side has gone away (it failed).
#[derive(Debug, thiserror::Error)]
#[error("chunk storage stopped")]
struct StorageGone;

/// The body was larger than its limit; found by the decoding stage.
#[derive(Debug, thiserror::Error)]
#[error("too large")]
struct OverLimit;

fn classify(e: io::Error, content: Content, limit: u64) -> IngestError {
    let inner = e.get_ref();
    if let Some(FromBody(b)) = inner.and_then(|i| i.downcast_ref::<FromBody>()) {
        return IngestError::Body(b.clone());
    }
    if inner.is_some_and(|i| i.is::<OverLimit>()) {
        return match content {
            Content::Nar(_) => IngestError::TooLarge {
                what: "NAR",
                limit,
                setting: "ingest.max_nar_bytes",
            },
            Content::Blob(_) => IngestError::TooLarge {
                what: "file",
                limit,
                setting: "ingest.max_log_bytes",
            },
        };
    }
    match content {
        Content::Nar(compression) => IngestError::Decompress {
            compression,
            source: e,
        },
        Content::Blob(_) => IngestError::Body(BodyError::Broken(e.to_string())),
    }
}

/// Turns the failure of a blocking stage's task into an error: it panicked, a bug.
fn joined<T>(
    stage: &str,
    r: Result<Result<T, IngestError>, tokio::task::JoinError>,
) -> Result<T, IngestError> {
    r.map_err(|e| IngestError::Internal(format!("the {stage} stage failed: {e}")))?
}

/// Decrements a gauge when dropped.
struct GaugeGuard<'a>(&'a prometheus_client::metrics::gauge::Gauge);

impl<'a> GaugeGuard<'a> {
    fn new(g: &'a prometheus_client::metrics::gauge::Gauge) -> Self {
        g.inc();
        Self(g)
    }
}

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Counts and logs an upload dropped before it finished: its client went away.
struct Abandoned<'a> {
    metrics: &'a Metrics,
    done: bool,
}

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.metrics.reject_upload("client_gone");
            tracing::info!("upload abandoned: the client went away");
        }
    }
}

/// The upload pipeline, shared by all uploads.
pub struct Ingestor {
    index: Arc<dyn Index>,
    packs: PackStore,
    settings: IngestSettings,
    metrics: Arc<Metrics>,
    space: Arc<Space>,
    /// Each upload holds two threads of the blocking pool for its whole life and
    /// borrows more to compress; bounding the uploads keeps the pool from running out,
    /// which would stall every upload.
    slots: Arc<tokio::sync::Semaphore>,
    budget: Budget,
}

/// A chunk on its way to the manifest.
enum Prepared {
    Known(Part, ChunkRef),
    New {
        part: Part,
        id: ChunkId,
        len: u32,
        frame: Vec<u8>,
    },
}

impl Prepared {
    /// Which manifest it belongs to.
    fn part(&self) -> Part {
        match self {
            Self::Known(part, _) | Self::New { part, .. } => *part,
        }
    }

    /// The bytes of its frame.
    fn stored_len(&self) -> u64 {
        match self {
            Self::Known(_, c) => u64::from(c.stored_len),
            Self::New { frame, .. } => frame.len() as u64,
        }
    }
}

/// How far a body may expand when decoded: at most `max` times its own bytes once the
/// NAR is past `floor` bytes. Nix's NARs compress a few times; only long runs of one
/// byte (a disk image of zeros, a bomb) reach a thousand.
#[derive(Debug, Clone, Copy)]
struct Expansion {
    max: u64,
    floor: u64,
}

impl Expansion {
    /// Whether `nar` bytes decoded from `body` bytes go past it.
    fn exceeded(&self, nar: u64, body: u64) -> bool {
        self.max > 0 && nar > self.floor && nar / self.max.max(1) > body
    }
}

/// What the blocking stages and the storing loop produced.
struct Ingested {
    decoded: Decoded,
    contents: Stored,
    listing: Stored,
    new_chunks: u64,
    new_bytes: u64,
}

/// The manifest of one part of an upload, written to the index a segment at a time.
struct Segments {
    stored: Stored,
    current: Manifest,
}

impl Segments {
    fn new() -> Self {
        Self {
            stored: Stored {
                id: ManifestId::random(),
                segments: Vec::new(),
            },
            current: Manifest::default(),
        }
    }

    fn is_full(&self) -> bool {
        self.current.chunks.len() >= SEGMENT_CHUNKS
    }

    /// Records the current segment; only once its chunks are recorded.
    async fn write(&mut self, index: &dyn Index) -> Result<(), IndexError> {
        if self.current.chunks.is_empty() {
            return Ok(());
        }
        let i = self.stored.segments.len() as u32;
        index.put_segment(&self.stored.id, i, &self.current).await?;
        self.stored.segments.push(Segment::of(&self.current));
        self.current.chunks.clear();
        Ok(())
    }
}

impl Ingestor {
    /// The pipeline over `index` and `packs`, refusing uploads when `space` is short.
    pub fn new(
        index: Arc<dyn Index>,
        packs: PackStore,
        settings: IngestSettings,
        metrics: Arc<Metrics>,
        space: Arc<Space>,
    ) -> Self {
        Self {
            index,
            packs,
            metrics,
            space,
            slots: Arc::new(tokio::sync::Semaphore::new(settings.max_uploads)),
            budget: Budget::new(settings.memory_bytes),
            settings,
        }
    }

    /// Ingests one compressed NAR from `body`. On success its chunks and its listing's
    /// are stored and recorded; nothing names them yet (see `record`).
    pub async fn ingest_nar<S>(
        &self,
        body: S,
        compression: Compression,
        peer: Peer,
        charge: Option<&mut Charge>,
    ) -> Result<IngestedNar, IngestError>
    where
        S: Stream<Item = Result<Bytes, BodyError>> + Send + Unpin + 'static,
    {
        let s = self
            .run(body, Content::Nar(compression), peer, charge)
            .await?;
        Ok(IngestedNar {
            nar_hash: s.decoded.nar_hash,
            nar_size: s.decoded.nar_size,
            file_hash: s.decoded.file_hash,
            file_size: s.decoded.file_size,
            record: NarRecord {
                contents: s.contents,
                listing: s.listing,
            },
            new_chunks: s.new_chunks,
            new_bytes: s.new_bytes,
        })
    }

    /// Stores a file of at most `max_bytes` (a build log, a realisation) as chunks and
    /// returns where it is.
    pub async fn ingest_blob<S>(
        &self,
        body: S,
        max_bytes: u64,
        peer: Peer,
        charge: Option<&mut Charge>,
    ) -> Result<Stored, IngestError>
    where
        S: Stream<Item = Result<Bytes, BodyError>> + Send + Unpin + 'static,
    {
        let s = self
            .run(body, Content::Blob(max_bytes), peer, charge)
            .await?;
        Ok(s.contents)
    }

    /// Records an ingested NAR, and the upload of it to `cache` under `url`, once the
    /// upload is found right.
    pub async fn record(
        &self,
        cache: &CacheName,
        url: &NarUrl,
        nar: &IngestedNar,
    ) -> Result<Upload, IndexError> {
        let upload = Upload {
            nar_hash: nar.nar_hash,
            nar_size: nar.nar_size,
            file_hash: nar.file_hash,
            file_size: nar.file_size,
            created: crate::clock::now(),
            stored_size: nar.record.contents.stored_size(),
            claimed: false,
        };
        self.index
            .put_upload(cache, url, &upload, &nar.record)
            .await?;
        self.metrics.nars_ingested.inc();
        self.metrics.nar_bytes_ingested.inc_by(nar.nar_size);
        Ok(upload)
    }

    async fn run<S>(
        &self,
        body: S,
        content: Content,
        peer: Peer,
        charge: Option<&mut Charge>,
    ) -> Result<Ingested, IngestError>
    where
        S: Stream<Item = Result<Bytes, BodyError>> + Send + Unpin + 'static,
    {
        let mut abandoned = Abandoned {
            metrics: &self.metrics,
            done: false,
        };
        let result = self.run_counted(body, content, peer, charge).await;
        abandoned.done = true;
        if let Err(e) = &result {
            self.metrics.reject_upload(e.reason());
        }
        if let Ok(s) = &result {
            self.metrics.stored_bytes_added.inc_by(s.new_bytes);
        }
        result
    }

    async fn run_counted<S>(
        &self,
        mut body: S,
        content: Content,
        peer: Peer,
        mut charge: Option<&mut Charge>,
    ) -> Result<Ingested, IngestError>
    where
        S: Stream<Item = Result<Bytes, BodyError>> + Send + Unpin + 'static,
    {
        let compression = match content {
            Content::Nar(c @ (Compression::Brotli | Compression::Lz4)) => {
                return Err(IngestError::Unsupported(c))
            }
            Content::Nar(c) => c,
            Content::Blob(_) => Compression::None,
        };
        self.space.ensure()?;
        let waiting = GaugeGuard::new(&self.metrics.uploads_waiting);
        // The first bytes name the decoder's memory; they are read before the upload
        // waits for its turn, and put back in front of the body.
        let mut head = Vec::with_capacity(decoder::PEEK_BYTES);
        while head.len() < decoder::PEEK_BYTES {
            match body.next().await {
                Some(data) => head.extend_from_slice(&data.map_err(IngestError::Body)?),
                None => break,
            }
        }
        let fixed = self.settings.upload_memory();
        let decoder_limit = MAX_DECODER_MEMORY.min(self.budget.total().saturating_sub(fixed));
        let mib = |b: u64| b.div_ceil(1 << 20);
        let memory = decoder::memory(compression, &head, decoder_limit).map_err(|needed| {
            IngestError::DecoderMemory {
                needed_mib: mib(needed),
                budget_mib: mib(self.budget.total()),
            }
        })?;
        let slot = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("the slots' semaphore is never closed");
        let reservation =
            self.budget
                .reserve(fixed + memory.bytes)
                .await
                .ok_or(IngestError::DecoderMemory {
                    needed_mib: mib(fixed + memory.bytes),
                    budget_mib: mib(self.budget.total()),
                })?;
        drop(waiting);
        let _in_flight = GaugeGuard::new(&self.metrics.uploads_in_flight);
        // The blocking stages hold the turn too: an abandoned upload's threads run
        // until their next hand-over, and their memory is counted until then.
        let turn = Arc::new((slot, reservation));

        let body = futures::stream::iter([Ok::<_, BodyError>(Bytes::from(head))]).chain(body);
        let body = body.map(|r| r.map_err(|e| io::Error::other(FromBody(e))));
        let reader = tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(body));
        let (tx, mut rx) = mpsc::channel::<Batch>(self.settings.concurrency);
        let (nar_tx, nar_rx) = std::sync::mpsc::sync_channel(DECODED_BUFFERS);
        let (params, max_entries) = (self.settings.chunking, self.settings.max_nar_entries);
        let limit = match content {
            Content::Nar(_) => self.settings.max_nar_bytes,
            Content::Blob(max) => max,
        };
        let expansion = Expansion {
            max: self.settings.max_expansion,
            floor: self.settings.expansion_floor,
        };
        let metrics = self.metrics.clone();
        let decoding = tokio::task::spawn_blocking({
            let turn = turn.clone();
            move || {
                let _turn = turn;
                let limits = (limit, expansion);
                decode(reader, content, memory, limits, (&metrics, &peer), nar_tx)
            }
        });
        let chunking = tokio::task::spawn_blocking({
            let turn = turn.clone();
            move || {
                let _turn = turn;
                chunk(ChannelReader::new(nar_rx), content, params, max_entries, tx)
            }
        });

        let stored = async {
            let mut prepared = futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
                .map(|batch| self.prepare(batch))
                .buffered(self.settings.concurrency);
            let mut packer = Packer::new(
                self.packs.clone(),
                self.index.clone(),
                self.metrics.clone(),
                self.space.clone(),
                self.settings.pack_bytes,
            );
            let mut parts = [Segments::new(), Segments::new()];
            while let Some(batch) = prepared.next().await {
                let batch = batch?;
                // What the batch adds to the cache, dedup or not: the frames of its
                // contents (a listing's are not counted: they are the server's own).
                if let Some(charge) = charge.as_deref_mut() {
                    let bytes = batch
                        .iter()
                        .filter(|p| p.part() == Part::Contents)
                        .map(Prepared::stored_len)
                        .sum();
                    charge.add(bytes).await.map_err(|e| match e {
                        ChargeError::Exceeded(e) => IngestError::Quota(e),
                        ChargeError::Index(e) => IngestError::Index(e),
                    })?;
                }
                for p in batch {
                    let (part, chunk) = match p {
                        Prepared::Known(part, c) => (part, c),
                        Prepared::New {
                            part,
                            id,
                            len,
                            frame,
                        } => (part, packer.add(id, len, &frame).await?),
                    };
                    let segments = &mut parts[part as usize];
                    segments.current.chunks.push(chunk);
                    // A full segment is recorded once the packs of its chunks are.
                    if segments.is_full() {
                        packer.finish().await?;
                        segments.write(self.index.as_ref()).await?;
                    }
                }
            }
            Ok::<_, IngestError>((parts, packer))
        };
        let (stored, decoded, chunked) = tokio::join!(stored, decoding, chunking);
        // A body that fails to decode also truncates the NAR the chunking stage sees,
        // and a failed store stops both stages: the decoding error, then the storing
        // error, then the chunking error is the cause.
        let decoded = joined("decoding", decoded)?;
        let ([mut contents, mut listing], mut packer) = stored?;
        joined("chunking", chunked)?;
        let decoded = decoded.ok_or_else(|| {
            IngestError::Internal("the decoding stage stopped before the end".into())
        })?;
        // Only content that checked out gets its last pack and segments written.
        packer.finish().await?;
        contents.write(self.index.as_ref()).await?;
        listing.write(self.index.as_ref()).await?;
        drop(turn);
        Ok(Ingested {
            decoded,
            contents: contents.stored,
            listing: listing.stored,
            new_chunks: packer.new_chunks,
            new_bytes: packer.new_bytes,
        })
    }

    /// Looks a batch of chunks up, and compresses the new ones with one blocking task.
    async fn prepare(&self, batch: Batch) -> Result<Vec<Prepared>, IngestError> {
        let ids: Vec<ChunkId> = batch.iter().map(|(_, id, _)| *id).collect();
        let known = self.index.chunks(&ids).await?;
        let level = self.settings.zstd_level;
        let compressed = tokio::task::spawn_blocking(move || {
            batch
                .into_iter()
                .zip(known)
                .map(|((part, id, data), known)| match known {
                    Some(c) => Ok(Prepared::Known(part, c)),
                    None => Ok(Prepared::New {
                        part,
                        id,
                        len: data.len() as u32,
                        frame: compress(&data, level)?,
                    }),
                })
                .collect::<Result<Vec<_>, IngestError>>()
        })
        .await;
        joined("compression", compressed)
    }
}

/// What the decoding stage found: the body's and the content's hash and size.
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
/// content (NarHash), holds it to `limit` bytes and sends it on in buffers, and stops
/// when the client has gone. `None` when the next stage stopped first: its error is
/// the one to report.
fn decode(
    body: impl Read,
    content: Content,
    memory: decoder::DecoderMemory,
    (limit, expansion): (u64, Expansion),
    (metrics, peer): (&Metrics, &Peer),
    tx: std::sync::mpsc::SyncSender<Vec<u8>>,
) -> Result<Option<Decoded>, IngestError> {
    let compression = match content {
        Content::Nar(c) => c,
        Content::Blob(_) => Compression::None,
    };
    let fail = |e| classify(e, content, limit);
    let body_bytes = std::rc::Rc::new(std::cell::Cell::new(0));
    let mut file = HashingReader::new(reader::Counted::new(body, body_bytes.clone()));
    let (nar_hash, nar_size) = {
        let raw = BufReader::with_capacity(STAGE_BUFFER, &mut file);
        let decoded = decoder::open(compression, raw, memory).map_err(fail)?;
        let mut nar = HashingReader::new(decoded);
        let mut total = 0u64;
        loop {
            let mut buf = vec![0u8; STAGE_BUFFER];
            let n = read_full(&mut nar, &mut buf).map_err(fail)?;
            if n == 0 {
                break;
            }
            total += n as u64;
            metrics.upload_bytes_decoded.inc_by(n as u64);
            if total > limit {
                return Err(fail(io::Error::other(OverLimit)));
            }
            if expansion.exceeded(total, body_bytes.get()) {
                return Err(IngestError::Expansion {
                    max_expansion: expansion.max,
                    floor_mib: expansion.floor >> 20,
                });
            }
            // One peek at the socket per 256 KiB decoded: nothing next to the work.
            if peer.gone() {
                return Err(IngestError::ClientGone);
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
    if file.read(&mut extra).map_err(fail)? != 0 {
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

/// Gathers chunks into batches for the storing side.
struct Batcher {
    batch: Batch,
    bytes: usize,
    tx: mpsc::Sender<Batch>,
}

impl Batcher {
    fn push(&mut self, part: Part, chunk: &[u8]) -> io::Result<()> {
        self.batch
            .push((part, ChunkId::of(chunk), Bytes::copy_from_slice(chunk)));
        self.bytes += chunk.len();
        if self.bytes >= BATCH_BYTES {
            self.send()?;
        }
        Ok(())
    }

    fn send(&mut self) -> io::Result<()> {
        self.bytes = 0;
        if self.batch.is_empty() {
            return Ok(());
        }
        self.tx
            .blocking_send(std::mem::take(&mut self.batch))
            .map_err(|_| io::Error::other(StorageGone))
    }
}

/// The second blocking stage: for a NAR, validates it and writes its listing; cuts the
/// content (and the listing) into chunks, names them (BLAKE3) and sends them on in
/// batches.
fn chunk(
    input: impl Read,
    content: Content,
    params: ChunkParams,
    max_entries: u64,
    tx: mpsc::Sender<Batch>,
) -> Result<(), IngestError> {
    // The only reading error here is the storing side having stopped (the decoding
    // stage ends the channel cleanly), and the storing side's own error is the one
    // reported; `Body` stands in for it.
    let gone = |e: io::Error| IngestError::Body(BodyError::Broken(e.to_string()));
    let batcher = RefCell::new(Batcher {
        batch: Vec::new(),
        bytes: 0,
        tx,
    });
    let contents = |c: &[u8]| batcher.borrow_mut().push(Part::Contents, c);
    let tee = ChunkingReader::new(input, Chunker::new(params), contents);
    let mut input = BufReader::with_capacity(STAGE_BUFFER, tee);
    match content {
        Content::Nar(_) => {
            let listing_chunks = |c: &[u8]| batcher.borrow_mut().push(Part::Listing, c);
            let mut listing = io::BufWriter::with_capacity(
                LISTING_BUFFER,
                ChunkingWriter::new(Chunker::new(params), listing_chunks),
            );
            nar::validate(&mut input, &mut listing, max_entries).map_err(|e| match e {
                NarError::Read(e) | NarError::Write(e) => gone(e),
                e => IngestError::Nar(e),
            })?;
            listing.flush().map_err(gone)?;
            let listing = listing.into_inner().map_err(|e| gone(e.into_error()))?;
            listing.finish().map_err(gone)?;
        }
        Content::Blob(_) => {
            io::copy(&mut input, &mut io::sink()).map_err(gone)?;
        }
    }
    input.into_inner().finish().map_err(gone)?;
    batcher.borrow_mut().send().map_err(gone)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_default_budget_fits_an_upload_and_a_tight_one_is_refused() {
        let d = crate::config::Config::default();
        let per_upload = IngestSettings::of(&d).unwrap().upload_memory();
        assert!(per_upload < 32 * 1024 * 1024, "{per_upload}");
        let tight: crate::config::Config = toml::from_str("[ingest]\nmemory_mib = 8").unwrap();
        let e = IngestSettings::of(&tight).unwrap_err().to_string();
        assert!(e.contains("memory_mib"), "{e}");
    }
    use crate::index::MemoryIndex;
    use crate::nix::nar::write::{nar, Entry};
    use crate::testing::Xorshift;

    /// The defaults, with small packs so that a few MiB fill several.
    fn settings() -> IngestSettings {
        IngestSettings {
            concurrency: 2,
            pack_bytes: 256 * 1024,
            max_uploads: 2,
            ..IngestSettings::of(&crate::config::Config::default()).unwrap()
        }
    }

    /// An ingestor over a local store in `dir`.
    fn ingestor_with(dir: &std::path::Path, settings: IngestSettings) -> Ingestor {
        std::fs::create_dir_all(dir.join("store")).unwrap();
        let packs = PackStore::local(dir.join("store"), Default::default()).unwrap();
        Ingestor::new(
            Arc::new(MemoryIndex::new()),
            packs,
            settings,
            Arc::new(Metrics::new()),
            Space::new(vec![dir.to_owned()], 0, None),
        )
    }

    fn ingestor(dir: &std::path::Path) -> Ingestor {
        ingestor_with(dir, settings())
    }

    /// A NAR of a few MiB of incompressible file contents.
    fn big_nar() -> Vec<u8> {
        let contents = Xorshift(3).bytes(3 * 1024 * 1024);
        nar(&Entry::File {
            executable: false,
            contents: &contents,
        })
    }

    type Piece = Result<Bytes, BodyError>;

    fn pieces(data: &[u8]) -> Vec<Piece> {
        data.chunks(64 * 1024)
            .map(|p| Ok(Bytes::copy_from_slice(p)))
            .collect()
    }

    /// Runs an ingest, failing the test rather than hanging if it never ends.
    async fn ingest(ingestor: &Ingestor, body: Vec<Piece>) -> Result<IngestedNar, IngestError> {
        ingest_as(ingestor, body, Compression::None).await
    }

    async fn ingest_as(
        ingestor: &Ingestor,
        body: Vec<Piece>,
        compression: Compression,
    ) -> Result<IngestedNar, IngestError> {
        let run = ingestor.ingest_nar(
            futures::stream::iter(body),
            compression,
            Peer::always(),
            None,
        );
        tokio::time::timeout(Duration::from_secs(60), run)
            .await
            .expect("an ingest ends")
    }

    /// Reassembles a stored content from the packs.
    async fn content(ingestor: &Ingestor, stored: &Stored) -> Vec<u8> {
        let source = crate::serve::Source {
            store: ingestor.packs.clone(),
            index: ingestor.index.clone(),
            plan: crate::serve::ReadPlan {
                read_bytes: 1 << 20,
                read_ahead: 2,
            },
            memory: Budget::new(1 << 22),
        };
        let whole = 0..stored.size();
        let body = crate::serve::body(&source, stored, crate::serve::Encoding::Plain, whole);
        let parts: Vec<Bytes> = body.map(|r| r.unwrap()).collect().await;
        parts.concat()
    }

    /// The chunks of a stored content, from its segments.
    async fn chunks(ingestor: &Ingestor, stored: &Stored) -> Vec<ChunkRef> {
        let mut all = Vec::new();
        for i in 0..stored.segments.len() as u32 {
            let segment = ingestor.index.segment(&stored.id, i).await.unwrap();
            all.extend(segment.unwrap().chunks);
        }
        all
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_whole_nar_is_stored_with_its_listing() {
        let dir = tempfile::tempdir().unwrap();
        let data = big_nar();
        let ingestor = ingestor(dir.path());
        let got = ingest(&ingestor, pieces(&data)).await.unwrap();
        assert_eq!(got.nar_size, data.len() as u64);
        assert_eq!(got.nar_hash, Sha256::digest(&data));
        assert_eq!(got.record.contents.size(), data.len() as u64);
        assert!(chunks(&ingestor, &got.record.contents).await.len() > 10);
        assert_eq!(content(&ingestor, &got.record.contents).await, data);
        let listing = content(&ingestor, &got.record.listing).await;
        let json: serde_json::Value = serde_json::from_slice(&listing).unwrap();
        assert_eq!(json["root"]["size"], 3 * 1024 * 1024);
        let m = &ingestor.metrics;
        // A NAR counts as ingested once it is recorded (its upload found right).
        assert_eq!(m.nars_ingested.get(), 0);
        let url = NarUrl {
            hash: got.file_hash,
            compression: Compression::None,
        };
        let main: CacheName = "main".parse().unwrap();
        let upload = ingestor.record(&main, &url, &got).await.unwrap();
        assert_eq!(
            ingestor.index.upload(&main, &url).await.unwrap(),
            Some(upload)
        );
        assert_eq!(m.nars_ingested.get(), 1);
        assert_eq!(m.nar_bytes_ingested.get(), data.len() as u64);
        assert_eq!(
            ingestor.index.nar(&got.nar_hash).await.unwrap(),
            Some(got.record.clone())
        );
        assert!(m.packs_written.get() > 1);
        assert_eq!(m.uploads_in_flight.get(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_listing_as_large_as_its_nar_is_chunked_too() {
        let dir = tempfile::tempdir().unwrap();
        let names: Vec<String> = (0..20_000).map(|i| format!("file-{i:06}")).collect();
        let tree = Entry::Dir(
            names
                .iter()
                .map(|n| {
                    (
                        n.as_str(),
                        Entry::File {
                            executable: false,
                            contents: b"",
                        },
                    )
                })
                .collect(),
        );
        let data = nar(&tree);
        let ingestor = ingestor(dir.path());
        let got = ingest(&ingestor, pieces(&data)).await.unwrap();
        assert!(
            chunks(&ingestor, &got.record.listing).await.len() > 5,
            "a large listing is several chunks"
        );
        let listing = content(&ingestor, &got.record.listing).await;
        let json: serde_json::Value = serde_json::from_slice(&listing).unwrap();
        assert_eq!(json["root"]["entries"].as_object().unwrap().len(), 20_000);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn limits_are_held_as_the_nar_streams_in() {
        let dir = tempfile::tempdir().unwrap();
        let data = big_nar();
        let small = ingestor_with(
            dir.path(),
            IngestSettings {
                max_nar_bytes: 1024 * 1024,
                max_nar_entries: 2,
                ..settings()
            },
        );
        let err = ingest(&small, pieces(&data)).await.unwrap_err();
        assert!(
            matches!(err, IngestError::TooLarge { what: "NAR", .. }),
            "{err}"
        );
        // Refused after about the limit, not after the whole body.
        assert!(small.metrics.upload_bytes_decoded.get() < 2 * 1024 * 1024);
        let three = nar(&Entry::Dir(vec![
            ("a", Entry::Symlink("b")),
            ("b", Entry::Symlink("a")),
        ]));
        let err = ingest(&small, pieces(&three)).await.unwrap_err();
        assert!(
            matches!(err, IngestError::Nar(NarError::TooManyEntries { max: 2 })),
            "{err}"
        );
        let text = small.metrics.render();
        assert!(text.contains("reason=\"too_large\"} 1"), "{text}");
        assert!(text.contains("reason=\"too_many_entries\"} 1"), "{text}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_decoder_larger_than_the_budget_is_refused_before_reading_on() {
        let dir = tempfile::tempdir().unwrap();
        let ingestor = ingestor_with(
            dir.path(),
            IngestSettings {
                memory_bytes: settings().upload_memory() + 32 * 1024 * 1024,
                ..settings()
            },
        );
        let mut e = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
        e.window_log(27).unwrap();
        e.write_all(&big_nar()).unwrap();
        let body = e.finish().unwrap();
        let err = ingest_as(&ingestor, pieces(&body), Compression::Zstd)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                IngestError::DecoderMemory {
                    needed_mib: 129,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(ingestor.metrics.upload_bytes_decoded.get(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_body_that_expands_past_the_bound_is_refused_early() {
        let dir = tempfile::tempdir().unwrap();
        let ingestor = ingestor_with(
            dir.path(),
            IngestSettings {
                max_expansion: 100,
                expansion_floor: 1 << 20,
                ..settings()
            },
        );
        // 64 MiB of zeros in a few KiB of zstd.
        let zeros = nar(&Entry::File {
            executable: false,
            contents: &vec![0u8; 64 << 20],
        });
        let body = zstd::encode_all(zeros.as_slice(), 3).unwrap();
        let err = ingest_as(&ingestor, pieces(&body), Compression::Zstd)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                IngestError::Expansion {
                    max_expansion: 100,
                    floor_mib: 1
                }
            ),
            "{err}"
        );
        // Stopped soon after the floor, not at the end of the NAR.
        let decoded = ingestor.metrics.upload_bytes_decoded.get();
        assert!(decoded < 8 << 20, "{decoded} bytes decoded");
        assert!(ingestor
            .metrics
            .render()
            .contains("reason=\"expansion\"} 1"));
        // A NAR that compresses as real ones do goes through.
        let real = zstd::encode_all(big_nar().as_slice(), 3).unwrap();
        ingest_as(&ingestor, pieces(&real), Compression::Zstd)
            .await
            .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn blobs_are_stored_as_chunks_up_to_their_limit() {
        let dir = tempfile::tempdir().unwrap();
        let ingestor = ingestor(dir.path());
        let log = b"building\n".repeat(100_000);
        let body = futures::stream::iter(pieces(&log));
        let m = ingestor
            .ingest_blob(body, 1 << 20, Peer::always(), None)
            .await
            .unwrap();
        assert_eq!(content(&ingestor, &m).await, log);
        let body = futures::stream::iter(pieces(&log));
        let err = ingestor
            .ingest_blob(body, 1000, Peer::always(), None)
            .await
            .unwrap_err();
        assert!(
            matches!(err, IngestError::TooLarge { what: "file", .. }),
            "{err}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_upload_whose_client_left_stops_though_its_body_is_whole() {
        let dir = tempfile::tempdir().unwrap();
        let ingestor = ingestor(dir.path());
        // The client is there for the first few buffers, then gone.
        let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let peer = {
            let asked = asked.clone();
            Peer::new(move || asked.fetch_add(1, std::sync::atomic::Ordering::Relaxed) >= 3)
        };
        let data = big_nar();
        let body = futures::stream::iter(pieces(&data));
        let err = ingestor
            .ingest_nar(body, Compression::None, peer, None)
            .await
            .unwrap_err();
        assert!(matches!(err, IngestError::ClientGone), "{err}");
        let decoded = ingestor.metrics.upload_bytes_decoded.get();
        assert!(
            decoded <= 4 * STAGE_BUFFER as u64,
            "{decoded} bytes decoded"
        );
        assert!(ingestor
            .metrics
            .render()
            .contains("reason=\"client_gone\"} 1"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_body_that_breaks_off_is_a_body_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut body = pieces(&big_nar());
        body.truncate(20);
        body.push(Err(BodyError::Broken("connection reset".into())));
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_upload_dropped_midway_stops_and_frees_its_turn() {
        let dir = tempfile::tempdir().unwrap();
        let ingestor = Arc::new(ingestor_with(
            dir.path(),
            IngestSettings {
                max_uploads: 1,
                ..settings()
            },
        ));
        // A body that sends a little, then nothing, until its connection closes (as
        // hyper's does when the client goes away and the handler is dropped).
        let data = big_nar();
        let (tx, rx) = mpsc::channel::<Piece>(1);
        let body = Box::pin(futures::stream::unfold(rx, |mut rx| async {
            rx.recv().await.map(|p| (p, rx))
        }));
        let running = {
            let ingestor = ingestor.clone();
            tokio::spawn(async move {
                ingestor
                    .ingest_nar(body, Compression::None, Peer::always(), None)
                    .await
                    .map(drop)
            })
        };
        tx.send(Ok(Bytes::copy_from_slice(&data[..1 << 20])))
            .await
            .unwrap();
        while ingestor.metrics.uploads_in_flight.get() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        running.abort();
        let _ = running.await;
        drop(tx);
        // The one slot is free again: another upload goes through.
        let got = ingest(&ingestor, pieces(&data)).await.unwrap();
        assert_eq!(got.nar_size, data.len() as u64);
        assert!(ingestor
            .metrics
            .render()
            .contains("reason=\"client_gone\"} 1"));
    }
}
