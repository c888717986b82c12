//! Packs the new chunks of one upload, in order, into pack objects of about a target
//! size, and records each chunk once its pack is stored.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use tokio::task::JoinHandle;

use super::IngestError;
use crate::index::Index;
use crate::metrics::Metrics;
use crate::store::space::Space;
use crate::store::{ChunkId, ChunkRef, PackId, PackStore};

/// Packs written at once per upload; more would only queue in the object store.
pub const WRITES_IN_FLIGHT: usize = 2;

/// What the records of one chunk may take on disk: the chunk record, its place in a
/// manifest segment, and the database's own overhead (a log of pages, written again
/// as they change). Reserved with the pack, generously: a 4 MiB pack of 32 KiB
/// chunks reserves 64 KiB for them.
const RECORD_BYTES_PER_CHUNK: u64 = 512;

/// The database writes what it was given within half a second (sled's default flush
/// interval); the room for the records of a pack stays promised until then.
const RECORDS_WRITTEN_WITHIN: std::time::Duration = std::time::Duration::from_secs(1);

/// A pack being written, and the chunks it holds.
struct Write {
    task: JoinHandle<Result<(), IngestError>>,
    chunks: Vec<ChunkId>,
}

pub struct Packer {
    store: PackStore,
    index: Arc<dyn Index>,
    metrics: Arc<Metrics>,
    space: Arc<Space>,
    target: usize,
    pack: PackId,
    buf: Vec<u8>,
    in_buf: Vec<ChunkRef>,
    /// Chunks packed by this upload whose records are not written yet: a chunk
    /// repeated within one NAR is stored once even before its pack is recorded. Once
    /// recorded, the index answers for them, so this stays as small as the packs in
    /// flight whatever the NAR's size.
    unrecorded: HashMap<ChunkId, ChunkRef>,
    writes: VecDeque<Write>,
    pub new_chunks: u64,
    pub new_bytes: u64,
}

impl Packer {
    pub fn new(
        store: PackStore,
        index: Arc<dyn Index>,
        metrics: Arc<Metrics>,
        space: Arc<Space>,
        target: usize,
    ) -> Self {
        Self {
            store,
            index,
            metrics,
            space,
            target,
            pack: PackId::random(),
            buf: Vec::new(),
            in_buf: Vec::new(),
            unrecorded: HashMap::new(),
            writes: VecDeque::new(),
            new_chunks: 0,
            new_bytes: 0,
        }
    }

    /// Adds a compressed chunk; returns where it will be.
    pub async fn add(
        &mut self,
        id: ChunkId,
        len: u32,
        frame: &[u8],
    ) -> Result<ChunkRef, IngestError> {
        if let Some(c) = self.unrecorded.get(&id) {
            return Ok(*c);
        }
        let chunk = ChunkRef {
            id,
            pack: self.pack,
            offset: self.buf.len() as u32,
            stored_len: frame.len() as u32,
            len,
        };
        self.buf.extend_from_slice(frame);
        self.in_buf.push(chunk);
        self.unrecorded.insert(id, chunk);
        self.new_chunks += 1;
        self.new_bytes += frame.len() as u64;
        if self.buf.len() >= self.target {
            self.seal().await?;
        }
        Ok(chunk)
    }

    /// Starts writing the current pack. Writes run as tasks of their own so they
    /// progress while the upload goes on; a pack outlives an aborted upload harmlessly
    /// (its chunks are recorded, and merely unreferenced). The room the pack and its
    /// records take on local disk is reserved first: an upload that cannot get it
    /// stops here, with nothing visible.
    async fn seal(&mut self) -> Result<(), IngestError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        while self.writes.len() >= WRITES_IN_FLIGHT {
            self.wait_one().await?;
        }
        let pack_bytes = if self.store.is_local() {
            self.buf.len() as u64
        } else {
            0
        };
        let records = self
            .space
            .reserve(self.in_buf.len() as u64 * RECORD_BYTES_PER_CHUNK)?;
        let pack_room = self.space.reserve(pack_bytes)?;
        let data = Bytes::from(std::mem::replace(
            &mut self.buf,
            Vec::with_capacity(self.target + 65536),
        ));
        let chunks = std::mem::take(&mut self.in_buf);
        let ids = chunks.iter().map(|c| c.id).collect();
        let pack = std::mem::replace(&mut self.pack, PackId::random());
        let (store, index, metrics) =
            (self.store.clone(), self.index.clone(), self.metrics.clone());
        let task = tokio::spawn(async move {
            let stored = store.put_uploaded(&pack, data).await;
            // Written or not, the pack takes no more room than it does now.
            drop(pack_room);
            stored?;
            metrics.packs_written.inc();
            metrics.chunks_written.inc_by(chunks.len() as u64);
            let recorded = index.put_chunks(&chunks);
            records.release_after(RECORDS_WRITTEN_WITHIN);
            recorded.await?;
            Ok(())
        });
        self.writes.push_back(Write { task, chunks: ids });
        Ok(())
    }

    async fn wait_one(&mut self) -> Result<(), IngestError> {
        let Some(write) = self.writes.pop_front() else {
            return Ok(());
        };
        write
            .task
            .await
            .map_err(|e| IngestError::Internal(format!("writing a pack: {e}")))??;
        for id in write.chunks {
            self.unrecorded.remove(&id);
        }
        Ok(())
    }

    /// Writes the last pack and waits until every pack is stored and recorded.
    pub async fn finish(&mut self) -> Result<(), IngestError> {
        self.seal().await?;
        while !self.writes.is_empty() {
            self.wait_one().await?;
        }
        Ok(())
    }
}
