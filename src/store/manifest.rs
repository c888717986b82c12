//! Where chunks live, and a content as stored (a NAR, a listing, a log): the ordered
//! list of its chunks, kept in segments.
//!
//! Chunks are packed: each is one independent zstd frame, appended to a pack object
//! with the other new chunks of the same upload. A NAR's chunks then mostly sit next
//! to each other in few packs, so serving it is a few large reads instead of one read
//! per chunk, and storing it is a few PUTs.

use std::fmt;

/// A chunk's identity: the BLAKE3 of its uncompressed bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// The id of the chunk `data`.
    pub fn of(data: &[u8]) -> Self {
        Self(*blake3::hash(data).as_bytes())
    }

    /// In lower-case hex.
    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// A pack object's name: random, as two uploads may pack the same chunk concurrently.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PackId(pub [u8; 16]);

impl PackId {
    /// A new random pack name.
    pub fn random() -> Self {
        let mut id = [0u8; 16];
        getrandom::fill(&mut id).expect("the operating system's random source failed");
        Self(id)
    }

    /// In lower-case hex.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Reads `to_hex`'s form.
    pub fn from_hex(hex: &str) -> Option<Self> {
        if hex.len() != 32 || !hex.is_ascii() {
            return None;
        }
        let mut id = [0u8; 16];
        for (i, b) in id.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Self(id))
    }
}

impl fmt::Debug for PackId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// One chunk: which, where its frame is, and its sizes stored and uncompressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRef {
    /// Which chunk.
    pub id: ChunkId,
    /// The pack holding its frame.
    pub pack: PackId,
    /// Where the frame starts in the pack.
    pub offset: u32,
    /// The frame's size.
    pub stored_len: u32,
    /// The chunk's size uncompressed.
    pub len: u32,
}

/// A chunk record without its id: where it is and its sizes.
pub const LOCATION_LEN: usize = 28;
const ENCODED_LEN: usize = 32 + LOCATION_LEN;

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

impl ChunkRef {
    /// The record of where the chunk is, without its id.
    pub fn encode_location(&self) -> [u8; LOCATION_LEN] {
        let mut out = [0u8; LOCATION_LEN];
        out[..16].copy_from_slice(&self.pack.0);
        out[16..20].copy_from_slice(&self.offset.to_le_bytes());
        out[20..24].copy_from_slice(&self.stored_len.to_le_bytes());
        out[24..].copy_from_slice(&self.len.to_le_bytes());
        out
    }

    /// Reads `encode_location`'s record of the chunk `id`.
    pub fn decode_location(id: ChunkId, b: &[u8]) -> Option<Self> {
        if b.len() != LOCATION_LEN {
            return None;
        }
        Some(Self {
            id,
            pack: PackId(b[..16].try_into().ok()?),
            offset: u32_at(b, 16),
            stored_len: u32_at(b, 20),
            len: u32_at(b, 24),
        })
    }

    /// Where the frame ends in its pack.
    pub fn end(&self) -> u64 {
        u64::from(self.offset) + u64::from(self.stored_len)
    }
}

/// The chunks of one NAR (or listing, or log) in order. Concatenating their frames
/// gives a valid zstd stream of the whole content.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Manifest {
    /// The chunks, in order.
    pub chunks: Vec<ChunkRef>,
}

/// The on-disk format of manifests carries a version byte from day one.
const MANIFEST_V1: u8 = 1;

impl Manifest {
    /// Size of the served `.nar.zst`: the sum of the frames.
    pub fn stored_size(&self) -> u64 {
        self.chunks.iter().map(|c| u64::from(c.stored_len)).sum()
    }

    /// Size of the content the chunks make up (a NAR's NarSize).
    pub fn size(&self) -> u64 {
        self.chunks.iter().map(|c| u64::from(c.len)).sum()
    }

    /// The versioned record of the manifest.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + self.chunks.len() * ENCODED_LEN);
        out.push(MANIFEST_V1);
        for c in &self.chunks {
            out.extend_from_slice(&c.id.0);
            out.extend_from_slice(&c.encode_location());
        }
        out
    }

    /// Reads `encode`'s record; `None` if it is damaged.
    pub fn decode(b: &[u8]) -> Option<Self> {
        let (&version, rest) = b.split_first()?;
        if version != MANIFEST_V1 || rest.len() % ENCODED_LEN != 0 {
            return None;
        }
        rest.chunks(ENCODED_LEN)
            .map(|e| ChunkRef::decode_location(ChunkId(e[..32].try_into().ok()?), &e[32..]))
            .collect::<Option<Vec<_>>>()
            .map(|chunks| Self { chunks })
    }
}

/// Chunks per segment of a stored content's manifest: 4,096 chunks of 60 bytes, a
/// record of 240 KiB, cover about 128 MiB of content at the default chunk size. No
/// manifest record is larger, however large the NAR, and serving holds one at a time.
pub const SEGMENT_CHUNKS: usize = 4096;

/// Names the segments of one stored content. Random, as two uploads of the same NAR
/// write their segments at once, each its own.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ManifestId(pub [u8; 16]);

impl ManifestId {
    /// A new random id.
    pub fn random() -> Self {
        Self(PackId::random().0)
    }
}

impl fmt::Debug for ManifestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&PackId(self.0).to_hex())
    }
}

/// The sizes of one segment of a manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Segment {
    /// Its chunks' bytes, uncompressed.
    pub size: u64,
    /// Its chunks' frames.
    pub stored_size: u64,
}

impl Segment {
    /// The sizes of the chunks of `m`.
    pub fn of(m: &Manifest) -> Self {
        Self {
            size: m.size(),
            stored_size: m.stored_size(),
        }
    }
}

/// A content as stored: where its manifest's segments are, and their sizes (enough to
/// answer `HEAD`, a `Content-Length` and a range without reading a segment).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// Where the segments are.
    pub id: ManifestId,
    /// The sizes of each segment, in order.
    pub segments: Vec<Segment>,
}

impl Stored {
    /// Size of the content uncompressed (a NAR's NarSize).
    pub fn size(&self) -> u64 {
        self.segments.iter().map(|s| s.size).sum()
    }

    /// Size of its frames: the served `.nar.zst`.
    pub fn stored_size(&self) -> u64 {
        self.segments.iter().map(|s| s.stored_size).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let pack = PackId::random();
        let m = Manifest {
            chunks: vec![
                ChunkRef {
                    id: ChunkId::of(b"a"),
                    pack,
                    offset: 0,
                    stored_len: 10,
                    len: 100,
                },
                ChunkRef {
                    id: ChunkId::of(b"b"),
                    pack,
                    offset: 10,
                    stored_len: 7,
                    len: 9,
                },
            ],
        };
        assert_eq!(Manifest::decode(&m.encode()), Some(m.clone()));
        assert_eq!(m.stored_size(), 17);
        assert_eq!(m.size(), 109);
        assert_eq!(m.chunks[1].end(), 17);
        assert_eq!(Manifest::decode(&[2]), None);
        assert_eq!(Manifest::decode(&[1, 0]), None);
        let c = m.chunks[0];
        assert_eq!(
            ChunkRef::decode_location(c.id, &c.encode_location()),
            Some(c)
        );
    }
}
