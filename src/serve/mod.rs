//! Bodies built from manifests (NARs, listings, logs): the stored zstd frames
//! concatenated as they are (`.nar.zst`), or decompressed on the fly (`.nar`, `.ls`,
//! logs), with byte ranges and a bounded read-ahead. Frames that lie next to each
//! other in a pack are fetched with one read.

pub mod range;

use std::io;
use std::ops::Range;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;
use futures::{Stream, StreamExt as _};

use crate::budget::{Budget, Reservation};
use crate::store::{ChunkRef, Manifest, PackId, PackStore};

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

    /// The bytes of `m` sent in this encoding.
    pub fn body_size(self, m: &Manifest) -> u64 {
        m.chunks.iter().map(|c| self.size_of(c)).sum()
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

/// Where a download's bytes come from, and how much it may read ahead.
#[derive(Clone)]
pub struct Source {
    /// The packs.
    pub store: PackStore,
    /// Read sizes and depth.
    pub plan: ReadPlan,
    /// Memory for reads ahead, shared by all downloads.
    pub read_ahead: Budget,
}

/// The body bytes in `range`. One read is always in flight; up to `read_ahead` more
/// run ahead of it while the shared budget has room for them, so many slow readers
/// hold one read each, not `read_ahead`.
pub fn body(
    source: &Source,
    manifest: &Manifest,
    encoding: Encoding,
    range: Range<u64>,
) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
    let reads = plan(manifest, encoding, range, source.plan.read_bytes);
    Reads {
        pending: reads.into_iter(),
        in_flight: FuturesOrdered::new(),
        store: source.store.clone(),
        budget: source.read_ahead.clone(),
        depth: 1 + source.plan.read_ahead,
        encoding,
    }
}

type Fetch = BoxFuture<'static, (io::Result<Bytes>, Option<Reservation>)>;

/// The reads of one body, started in order as room allows.
struct Reads {
    pending: std::vec::IntoIter<Read>,
    in_flight: FuturesOrdered<Fetch>,
    store: PackStore,
    budget: Budget,
    depth: usize,
    encoding: Encoding,
}

impl Stream for Reads {
    type Item = io::Result<Bytes>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let this = &mut *self;
        while this.in_flight.len() < this.depth {
            let Some(next) = this.pending.as_slice().first() else {
                break;
            };
            let held = if this.in_flight.is_empty() {
                None
            } else {
                match this.budget.try_reserve(next.cost) {
                    Some(r) => Some(r),
                    None => break,
                }
            };
            let read = this.pending.next().expect("just looked at it");
            let (store, encoding) = (this.store.clone(), this.encoding);
            this.in_flight.push_back(Box::pin(async move {
                (fetch(store, encoding, read).await, held)
            }));
        }
        // The reservation is returned as the bytes leave for the connection.
        this.in_flight
            .poll_next_unpin(cx)
            .map(|done| done.map(|(bytes, _held)| bytes))
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

    #[test]
    fn adjacent_frames_are_read_together() {
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

    #[test]
    fn ranges_cut_the_first_and_last_pieces() {
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
        assert_eq!(Encoding::Plain.body_size(&m), 355);
    }
}
