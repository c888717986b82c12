//! NAR bodies built from manifests: the stored zstd frames concatenated as they are
//! (`.nar.zst`), or decompressed on the fly (`.nar`), with byte ranges and a bounded
//! read-ahead of chunks.

pub mod range;

use std::io;
use std::ops::Range;

use bytes::Bytes;
use futures::{Stream, StreamExt as _};

use crate::store::{ChunkRef, ChunkStore, Manifest};

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

    pub fn body_size(self, m: &Manifest) -> u64 {
        m.chunks.iter().map(|c| self.size_of(c)).sum()
    }
}

/// The part of each chunk a byte range of the body covers, in order.
fn segments(m: &Manifest, encoding: Encoding, range: Range<u64>) -> Vec<(ChunkRef, Range<u64>)> {
    let mut out = Vec::new();
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
        out.push((
            *c,
            range.start.max(start) - start..range.end.min(end) - start,
        ));
    }
    out
}

fn storage_error(e: object_store::Error) -> io::Error {
    tracing::error!(error = %e, "reading a chunk failed while serving");
    io::Error::other(e)
}

async fn fetch(
    store: ChunkStore,
    encoding: Encoding,
    chunk: ChunkRef,
    part: Range<u64>,
) -> io::Result<Bytes> {
    let bytes = match encoding {
        Encoding::Zstd if part.start == 0 && part.end == u64::from(chunk.stored_len) => {
            store.get(&chunk.id).await.map_err(storage_error)?
        }
        Encoding::Zstd => store
            .get_range(&chunk.id, part.clone())
            .await
            .map_err(storage_error)?,
        Encoding::Plain => {
            let frame = store.get(&chunk.id).await.map_err(storage_error)?;
            let len = chunk.len as usize;
            let plain = tokio::task::spawn_blocking(move || zstd::bulk::decompress(&frame, len))
                .await
                .map_err(io::Error::other)??;
            Bytes::from(plain).slice(part.start as usize..part.end as usize)
        }
    };
    // A short object would make the response disagree with its Content-Length; fail
    // the body instead, so the client sees a broken transfer and retries.
    let expected = part.end - part.start;
    if bytes.len() as u64 != expected {
        tracing::error!(chunk = ?chunk.id, got = bytes.len(), expected, "stored chunk has the wrong size");
        return Err(io::Error::other("stored chunk has the wrong size"));
    }
    Ok(bytes)
}

/// The body bytes in `range`, fetching up to `read_ahead` chunks ahead.
pub fn body(
    store: ChunkStore,
    manifest: &Manifest,
    encoding: Encoding,
    range: Range<u64>,
    read_ahead: usize,
) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
    futures::stream::iter(segments(manifest, encoding, range))
        .map(move |(chunk, part)| fetch(store.clone(), encoding, chunk, part))
        .buffered(read_ahead)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ChunkId;

    fn manifest() -> Manifest {
        let c = |n: u8, s: u32, l: u32| ChunkRef {
            id: ChunkId([n; 32]),
            stored_len: s,
            len: l,
        };
        Manifest {
            chunks: vec![c(1, 10, 100), c(2, 5, 50), c(3, 20, 200)],
        }
    }

    #[test]
    fn segments_cover_exactly_the_range() {
        let m = manifest();
        let whole = segments(&m, Encoding::Zstd, 0..35);
        assert_eq!(
            whole.iter().map(|(_, r)| r.clone()).collect::<Vec<_>>(),
            vec![0..10, 0..5, 0..20]
        );
        let mid = segments(&m, Encoding::Zstd, 12..16);
        assert_eq!(mid.len(), 2);
        assert_eq!((mid[0].0.id.0[0], mid[0].1.clone()), (2, 2..5));
        assert_eq!((mid[1].0.id.0[0], mid[1].1.clone()), (3, 0..1));
        let plain = segments(&m, Encoding::Plain, 100..150);
        assert_eq!(plain.len(), 1);
        assert_eq!(plain[0].1, 0..50);
        assert_eq!(Encoding::Plain.body_size(&m), 350);
    }
}
