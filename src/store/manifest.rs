//! A NAR as stored: the ordered list of its chunks.

use std::fmt;

/// A chunk's identity: the BLAKE3 of its uncompressed bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    pub fn of(data: &[u8]) -> Self {
        Self(*blake3::hash(data).as_bytes())
    }

    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// One chunk of a NAR: which, and its sizes stored (one zstd frame) and uncompressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRef {
    pub id: ChunkId,
    pub stored_len: u32,
    pub len: u32,
}

impl ChunkRef {
    const ENCODED_LEN: usize = 40;

    fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.id.0);
        out.extend_from_slice(&self.stored_len.to_le_bytes());
        out.extend_from_slice(&self.len.to_le_bytes());
    }

    fn decode(b: &[u8]) -> Self {
        let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"));
        Self {
            id: ChunkId(b[..32].try_into().expect("32 bytes")),
            stored_len: u32_at(32),
            len: u32_at(36),
        }
    }

    /// The (stored length, length) pair a chunk record holds.
    pub fn encode_sizes(&self) -> [u8; 8] {
        let mut out = [0u8; 8];
        out[..4].copy_from_slice(&self.stored_len.to_le_bytes());
        out[4..].copy_from_slice(&self.len.to_le_bytes());
        out
    }

    pub fn decode_sizes(id: ChunkId, b: &[u8]) -> Option<Self> {
        let b: &[u8; 8] = b.try_into().ok()?;
        Some(Self {
            id,
            stored_len: u32::from_le_bytes(b[..4].try_into().ok()?),
            len: u32::from_le_bytes(b[4..].try_into().ok()?),
        })
    }
}

/// The chunks of one NAR in order. Concatenating their stored frames gives a valid
/// zstd stream of the whole NAR.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Manifest {
    pub chunks: Vec<ChunkRef>,
}

/// The on-disk format of manifests carries a version byte from day one.
const MANIFEST_V1: u8 = 1;

impl Manifest {
    /// Size of the served `.nar.zst`: the sum of the frames.
    pub fn stored_size(&self) -> u64 {
        self.chunks.iter().map(|c| u64::from(c.stored_len)).sum()
    }

    pub fn nar_size(&self) -> u64 {
        self.chunks.iter().map(|c| u64::from(c.len)).sum()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + self.chunks.len() * ChunkRef::ENCODED_LEN);
        out.push(MANIFEST_V1);
        for c in &self.chunks {
            c.encode_into(&mut out);
        }
        out
    }

    pub fn decode(b: &[u8]) -> Option<Self> {
        let (&version, rest) = b.split_first()?;
        if version != MANIFEST_V1 || rest.len() % ChunkRef::ENCODED_LEN != 0 {
            return None;
        }
        Some(Self {
            chunks: rest
                .chunks(ChunkRef::ENCODED_LEN)
                .map(ChunkRef::decode)
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let m = Manifest {
            chunks: vec![
                ChunkRef {
                    id: ChunkId::of(b"a"),
                    stored_len: 10,
                    len: 100,
                },
                ChunkRef {
                    id: ChunkId::of(b"b"),
                    stored_len: 7,
                    len: 9,
                },
            ],
        };
        assert_eq!(Manifest::decode(&m.encode()), Some(m.clone()));
        assert_eq!(m.stored_size(), 17);
        assert_eq!(m.nar_size(), 109);
        assert_eq!(Manifest::decode(&[2]), None);
        assert_eq!(Manifest::decode(&[1, 0]), None);
    }
}
