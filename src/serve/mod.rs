//! Bodies of stored contents (NARs, listings, logs): the stored zstd frames
//! concatenated as they are (`.nar.zst`), or decompressed on the fly (`.nar`, `.ls`,
//! logs), with byte ranges and a bounded read-ahead. Frames that lie next to each
//! other in a pack are fetched with one read. A body loads its manifest a segment at a
//! time, and every byte it has read and not yet sent (in its own queue or in the
//! connection's) holds part of a budget all downloads share: memory stays bounded
//! however large the NARs and however slow the readers.

pub mod range;

use std::collections::VecDeque;
use std::io;
use std::ops::Range;
use std::sync::Arc;
use std::task::Poll;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;
use futures::{Stream, StreamExt as _};

use crate::budget::{Budget, Reservation};
use crate::index::Index;
use crate::store::{ChunkRef, Manifest, PackId, PackStore, Segment, Stored};

/// How a stored content is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// The stored frames, which together are one valid zstd stream.
    Zstd,
    /// The NAR itself.
    Plain,
}

impl Encoding {
    fn size_of(self, c: &ChunkRef) -> u64 {
        u64::from(match self {
            Encoding::Zstd => c.stored_len,
            Encoding::Plain => c.len,
        })
    }

    fn segment_size(self, s: &Segment) -> u64 {
        match self {
            Encoding::Zstd => s.stored_size,
            Encoding::Plain => s.size,
        }
    }

    /// The bytes of `stored` sent in this encoding.
    pub fn body_size(self, stored: &Stored) -> u64 {
        stored.segments.iter().map(|s| self.segment_size(s)).sum()
    }
}

/// How reads are sized and how many run ahead of the one being sent.
#[derive(Debug, Clone, Copy)]
pub struct ReadPlan {
    /// Largest single read from a pack.
    pub read_bytes: u64,
    /// Reads ahead of the one being sent.
    pub read_ahead: usize,
}

impl ReadPlan {
    /// The read sizes of a download from `backend`.
    pub fn of(serve: &crate::config::ServeConfig, backend: crate::config::StorageBackend) -> Self {
        use crate::config::StorageBackend::{Local, S3};
        Self {
            read_bytes: match backend {
                Local => serve.read_bytes,
                S3 => serve.remote_read_bytes,
            },
            read_ahead: serve.read_ahead,
        }
    }
}

/// The part of one chunk the body needs, in the body's encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Piece {
    chunk: ChunkRef,
    part: Range<u64>,
}

/// One read of a contiguous byte range of a pack, covering one or more pieces.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Read {
    pack: PackId,
    range: Range<u64>,
    pieces: Vec<Piece>,
    /// Memory the read takes: the bytes read, or decompressed when serving `.nar`.
    cost: u64,
}

/// The reads that produce bytes `range` of the body, in order.
fn plan(m: &Manifest, encoding: Encoding, range: Range<u64>, read_bytes: u64) -> Vec<Read> {
    let mut reads: Vec<Read> = Vec::new();
    let mut pos = 0u64;
    for c in &m.chunks {
        let size = encoding.size_of(c);
        let (start, end) = (pos, pos + size);
        pos = end;
        if end <= range.start || size == 0 {
            continue;
        }
        if start >= range.end {
            break;
        }
        let part = range.start.max(start) - start..range.end.min(end) - start;
        // A decompressed piece needs its whole frame; a compressed one only its bytes.
        let bytes = match encoding {
            Encoding::Zstd => u64::from(c.offset) + part.start..u64::from(c.offset) + part.end,
            Encoding::Plain => u64::from(c.offset)..c.end(),
        };
        // A decompressed read is bounded by what it decompresses: frames of
        // well-compressed chunks are small on disk but not in memory.
        let cost = match encoding {
            Encoding::Zstd => bytes.end - bytes.start,
            Encoding::Plain => u64::from(c.len),
        };
        let piece = Piece { chunk: *c, part };
        match reads.last_mut() {
            Some(r)
                if r.pack == c.pack
                    && r.range.end == bytes.start
                    && r.cost + cost <= read_bytes =>
            {
                r.range.end = bytes.end;
                r.cost += cost;
                r.pieces.push(piece);
            }
            _ => reads.push(Read {
                pack: c.pack,
                range: bytes,
                pieces: vec![piece],
                cost,
            }),
        }
    }
    reads
}

/// Decompresses the frames a read fetched and keeps the parts the body needs.
fn decompress(read: &Read, data: &[u8]) -> io::Result<Bytes> {
    let mut out = Vec::with_capacity(
        read.pieces
            .iter()
            .map(|p| (p.part.end - p.part.start) as usize)
            .sum(),
    );
    for p in &read.pieces {
        let at = (u64::from(p.chunk.offset) - read.range.start) as usize;
        let frame = &data[at..at + p.chunk.stored_len as usize];
        let plain = zstd::bulk::decompress(frame, p.chunk.len as usize)?;
        if plain.len() != p.chunk.len as usize {
            return Err(io::Error::other("a stored frame has the wrong length"));
        }
        out.extend_from_slice(&plain[p.part.start as usize..p.part.end as usize]);
    }
    Ok(Bytes::from(out))
}

async fn fetch(store: PackStore, encoding: Encoding, read: Read) -> io::Result<Bytes> {
    // A missing or short pack would make the response disagree with its
    // Content-Length; failing the body instead shows the client a broken transfer.
    let data = store
        .get_range(&read.pack, read.range.clone())
        .await
        .inspect_err(|e| {
            tracing::error!(pack = ?read.pack, error = %e, "reading a pack failed while serving");
        })?;
    match encoding {
        Encoding::Zstd => Ok(data),
        Encoding::Plain => tokio::task::spawn_blocking(move || decompress(&read, &data))
            .await
            .map_err(io::Error::other)?,
    }
}

/// Where a download's bytes come from, and the memory all downloads share.
#[derive(Clone)]
pub struct Source {
    /// The packs.
    pub store: PackStore,
    /// The index as downloads read it (narinfos, NAR records, segments): from copies
    /// where it keeps them (`index::lookups`); nothing that checks or changes the
    /// metadata reads through it.
    pub index: Arc<dyn Index>,
    /// Read sizes and depth.
    pub plan: ReadPlan,
    /// Memory for bytes read and not yet sent, shared by all downloads.
    pub memory: Budget,
}

/// The body bytes in `range` of `stored`. One read is always under way, waiting for
/// its share of the memory if need be; up to `read_ahead` more run ahead of it while
/// the budget has room for them without waiting.
pub fn body(
    source: &Source,
    stored: &Stored,
    encoding: Encoding,
    range: Range<u64>,
) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
    Reads {
        source: source.clone(),
        stored: stored.clone(),
        encoding,
        range,
        next_segment: 0,
        segment_start: 0,
        pending: VecDeque::new(),
        planning: None,
        in_flight: FuturesOrdered::new(),
        failed: false,
    }
}

type Fetch = BoxFuture<'static, io::Result<Bytes>>;

/// A segment being read from the index, with the part of it the range covers.
type Planning = BoxFuture<'static, io::Result<(Manifest, Range<u64>)>>;

/// The reads of one body, planned a segment at a time, started in order as room allows.
struct Reads {
    source: Source,
    stored: Stored,
    encoding: Encoding,
    range: Range<u64>,
    /// The next segment to plan, and where it starts in the body.
    next_segment: usize,
    segment_start: u64,
    pending: VecDeque<Read>,
    planning: Option<Planning>,
    in_flight: FuturesOrdered<Fetch>,
    failed: bool,
}

impl Reads {
    /// Plans the reads of the next segment that overlaps the range, reading it from
    /// the index; false when none is left.
    fn poll_plan(&mut self, cx: &mut std::task::Context<'_>) -> Poll<io::Result<bool>> {
        if self.planning.is_none() {
            let Some((index, part)) = self.next_segment_in_range() else {
                return Poll::Ready(Ok(false));
            };
            let (source, id) = (self.source.index.clone(), self.stored.id);
            self.planning = Some(Box::pin(async move {
                let chunks = source
                    .segment(&id, index)
                    .await
                    .map_err(io::Error::other)?
                    .ok_or_else(|| io::Error::other("a recorded segment is missing"))?;
                Ok((chunks, part))
            }));
        }
        let planning = self.planning.as_mut().expect("set above");
        let got = std::task::ready!(planning.as_mut().poll(cx));
        self.planning = None;
        let (chunks, part) = got?;
        let reads = plan(&chunks, self.encoding, part, self.source.plan.read_bytes);
        self.pending.extend(reads);
        Poll::Ready(Ok(true))
    }

    /// The next segment that overlaps the range, and the part of it that does.
    fn next_segment_in_range(&mut self) -> Option<(u32, Range<u64>)> {
        while let Some(seg) = self.stored.segments.get(self.next_segment) {
            let index = self.next_segment;
            let start = self.segment_start;
            let end = start + self.encoding.segment_size(seg);
            self.next_segment += 1;
            self.segment_start = end;
            if end <= self.range.start || start == end {
                continue;
            }
            if start >= self.range.end {
                break;
            }
            let part = self.range.start.max(start) - start..self.range.end.min(end) - start;
            return Some((index as u32, part));
        }
        None
    }

    fn start(&mut self, read: Read, held: Option<Reservation>) {
        let (store, budget, encoding) = (
            self.source.store.clone(),
            self.source.memory.clone(),
            self.encoding,
        );
        self.in_flight.push_back(Box::pin(async move {
            let held = match held {
                Some(r) => r,
                None => budget
                    .reserve(read.cost)
                    .await
                    .ok_or_else(|| io::Error::other("a read is larger than serve.memory_mib"))?,
            };
            let data = fetch(store, encoding, read).await?;
            // The share is returned when the connection has sent the bytes.
            Ok(Bytes::from_owner(Held { data, _held: held }))
        }));
    }
}

/// Bytes with the share of the budget they hold.
struct Held {
    data: Bytes,
    _held: Reservation,
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl Stream for Reads {
    type Item = io::Result<Bytes>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.failed {
            return Poll::Ready(None);
        }
        while this.in_flight.len() < 1 + this.source.plan.read_ahead {
            if this.pending.is_empty() {
                match this.poll_plan(cx) {
                    Poll::Ready(Ok(true)) => continue,
                    Poll::Ready(Ok(false)) | Poll::Pending => break,
                    Poll::Ready(Err(e)) => {
                        tracing::error!(error = %e, "reading a manifest failed while serving");
                        this.failed = true;
                        return Poll::Ready(Some(Err(e)));
                    }
                }
            }
            let cost = this.pending.front().expect("not empty").cost;
            // Reads take what is free; the next one waits for its share when none is
            // under way, and nothing runs ahead of it meanwhile: reads complete in
            // order, so one started ahead would hold memory the waiting one needs.
            let held = match this.source.memory.try_reserve(cost) {
                Some(r) => Some(r),
                None if this.in_flight.is_empty() => None,
                None => break,
            };
            let waits = held.is_none();
            let read = this.pending.pop_front().expect("not empty");
            this.start(read, held);
            if waits {
                break;
            }
        }
        match this.in_flight.poll_next_unpin(cx) {
            // Nothing read yet while the next segment is read from the index (which
            // wakes this stream): the body is not over.
            Poll::Ready(None) if this.planning.is_some() => Poll::Pending,
            polled => polled,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ChunkId;

    fn manifest() -> (PackId, PackId, Manifest) {
        let (a, b) = (PackId([1; 16]), PackId([2; 16]));
        let c = |n: u8, pack, offset, s, l| ChunkRef {
            id: ChunkId([n; 32]),
            pack,
            offset,
            stored_len: s,
            len: l,
        };
        (
            a,
            b,
            Manifest {
                chunks: vec![
                    c(1, a, 0, 10, 100),
                    c(2, a, 10, 5, 50),
                    c(3, b, 0, 20, 200),
                    c(4, a, 15, 5, 5),
                ],
            },
        )
    }

    #[tokio::test]
    async fn adjacent_frames_are_read_together() {
        let (a, b, m) = manifest();
        let reads = plan(&m, Encoding::Zstd, 0..40, 1 << 20);
        let shape: Vec<_> = reads
            .iter()
            .map(|r| (r.pack, r.range.clone(), r.pieces.len()))
            .collect();
        assert_eq!(shape, vec![(a, 0..15, 2), (b, 0..20, 1), (a, 15..20, 1)]);
        // A read never grows past the read size.
        assert_eq!(plan(&m, Encoding::Zstd, 0..40, 12).len(), 4);
    }

    #[tokio::test]
    async fn ranges_cut_the_first_and_last_pieces() {
        let (a, _, m) = manifest();
        let reads = plan(&m, Encoding::Zstd, 12..16, 1 << 20);
        assert_eq!(reads[0].range, 12..15);
        assert_eq!(reads[0].pieces[0].part, 2..5);
        assert_eq!(reads[1].range, 0..1);
        // Decompressed, the whole frame is read and the part cut after decompression,
        // and a read is bounded by the bytes it decompresses.
        assert_eq!(plan(&m, Encoding::Plain, 0..150, 120).len(), 2);
        assert_eq!(plan(&m, Encoding::Plain, 0..150, 150).len(), 1);
        let plain = plan(&m, Encoding::Plain, 120..130, 1 << 20);
        assert_eq!(plain.len(), 1);
        assert_eq!((plain[0].pack, plain[0].range.clone()), (a, 10..15));
        assert_eq!(plain[0].pieces[0].part, 20..30);
        let total: u64 = m.chunks.iter().map(|c| u64::from(c.len)).sum();
        assert_eq!(total, 355);
    }
}

/// A body read through the index and real packs, a segment at a time.
#[cfg(test)]
mod segmented {
    use super::*;
    use crate::index::MemoryIndex;
    use crate::store::{ChunkId, ManifestId};
    use crate::testing::Xorshift;

    /// Seven chunks of random bytes, as zstd frames in one pack, listed in segments
    /// of three, three and one chunks.
    async fn stored(dir: &std::path::Path, memory: u64) -> (Source, Stored, Vec<u8>) {
        let store = PackStore::local(dir.to_owned(), Default::default()).unwrap();
        let index: Arc<dyn Index> = Arc::new(MemoryIndex::new());
        let (pack, mut frames, mut plain, mut chunks) =
            (PackId::random(), Vec::new(), Vec::new(), Vec::new());
        let mut rng = Xorshift(21);
        for n in 0..7u32 {
            let data = rng.bytes(1000 + 500 * n as usize);
            let frame = zstd::bulk::compress(&data, 1).unwrap();
            chunks.push(ChunkRef {
                id: ChunkId::of(&data),
                pack,
                offset: frames.len() as u32,
                stored_len: frame.len() as u32,
                len: data.len() as u32,
            });
            frames.extend_from_slice(&frame);
            plain.extend_from_slice(&data);
        }
        store.put(&pack, Bytes::from(frames)).await.unwrap();
        let id = ManifestId::random();
        let mut segments = Vec::new();
        for (i, part) in chunks.chunks(3).enumerate() {
            let m = Manifest {
                chunks: part.to_vec(),
            };
            index.put_segment(&id, i as u32, &m).await.unwrap();
            segments.push(Segment::of(&m));
        }
        let source = Source {
            store,
            index,
            plan: ReadPlan {
                read_bytes: 2048,
                read_ahead: 3,
            },
            memory: Budget::new(memory),
        };
        (source, Stored { id, segments }, plain)
    }

    /// The body, each piece dropped as it is read (as a connection does once it sent it).
    async fn read(
        source: &Source,
        s: &Stored,
        e: Encoding,
        range: Range<u64>,
    ) -> io::Result<Vec<u8>> {
        let mut body = Box::pin(body(source, s, e, range));
        let mut out = Vec::new();
        while let Some(piece) = body.next().await {
            out.extend_from_slice(&piece?);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn every_range_of_every_encoding_crosses_segments_right() {
        let dir = tempfile::tempdir().unwrap();
        let (source, stored, plain) = stored(dir.path(), 1 << 20).await;
        assert_eq!(stored.segments.len(), 3);
        assert_eq!(Encoding::Plain.body_size(&stored), plain.len() as u64);
        let whole = read(&source, &stored, Encoding::Plain, 0..stored.size())
            .await
            .unwrap();
        assert_eq!(whole, plain);
        let frames = read(&source, &stored, Encoding::Zstd, 0..stored.stored_size())
            .await
            .unwrap();
        assert_eq!(zstd::decode_all(&frames[..]).unwrap(), plain);
        let n = plain.len() as u64;
        for range in [0..1, 5..4000, 2999..3001, 4000..n, n - 1..n, 100..n - 100] {
            let got = read(&source, &stored, Encoding::Plain, range.clone())
                .await
                .unwrap();
            assert_eq!(
                got,
                plain[range.start as usize..range.end as usize],
                "{range:?}"
            );
            let end = range.end.min(stored.stored_size());
            let part = read(&source, &stored, Encoding::Zstd, range.start..end)
                .await
                .unwrap();
            assert_eq!(
                part,
                frames[range.start as usize..end as usize],
                "{range:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_budget_of_one_read_still_serves_everything_in_turn() {
        let dir = tempfile::tempdir().unwrap();
        // Room for one 2 KiB read at a time, shared by two downloads.
        let (source, stored, plain) = stored(dir.path(), 4096).await;
        let alone = read(&source, &stored, Encoding::Plain, 0..stored.size());
        assert_eq!(alone.await.unwrap(), plain);
        let (a, b) = tokio::join!(
            read(&source, &stored, Encoding::Plain, 0..stored.size()),
            read(&source, &stored, Encoding::Plain, 0..stored.size()),
        );
        assert_eq!(a.unwrap(), plain);
        assert_eq!(b.unwrap(), plain);
    }

    #[tokio::test]
    async fn a_missing_segment_fails_the_body() {
        let dir = tempfile::tempdir().unwrap();
        let (source, mut stored, _) = stored(dir.path(), 1 << 20).await;
        stored.id = ManifestId::random();
        let err = read(&source, &stored, Encoding::Plain, 0..stored.size())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }
}
