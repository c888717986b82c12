//! How records are laid out as bytes in a key-value database. Every decoder checks
//! lengths and versions and returns `None` for anything else, never panics; the caller
//! turns that into `IndexError::Corrupt` with the key.

use bytes::Bytes;

use super::{CacheStats, NarInfoRecord, NarRecord, Upload};
use crate::nix::Sha256;
use crate::store::Manifest;

/// Reads `N` bytes at `at`.
fn array<const N: usize>(b: &[u8], at: usize) -> Option<[u8; N]> {
    b.get(at..at.checked_add(N)?)?.try_into().ok()
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    array(b, at).map(u64::from_le_bytes)
}

pub fn encode_upload(u: &Upload) -> Vec<u8> {
    let mut out = Vec::with_capacity(80);
    out.extend_from_slice(u.nar_hash.as_bytes());
    out.extend_from_slice(u.file_hash.as_bytes());
    out.extend_from_slice(&u.nar_size.to_le_bytes());
    out.extend_from_slice(&u.file_size.to_le_bytes());
    out
}

pub fn decode_upload(b: &[u8]) -> Option<Upload> {
    if b.len() != 80 {
        return None;
    }
    Some(Upload {
        nar_hash: Sha256::from_bytes(array(b, 0)?),
        file_hash: Sha256::from_bytes(array(b, 32)?),
        nar_size: u64_at(b, 64)?,
        file_size: u64_at(b, 72)?,
    })
}

/// The fixed part of a narinfo record, before the served text.
const NARINFO_HEAD: usize = 48;

pub fn encode_narinfo(r: &NarInfoRecord) -> Vec<u8> {
    let mut out = Vec::with_capacity(NARINFO_HEAD + r.text.len());
    out.extend_from_slice(r.nar_hash.as_bytes());
    out.extend_from_slice(&r.nar_size.to_le_bytes());
    out.extend_from_slice(&r.file_size.to_le_bytes());
    out.extend_from_slice(&r.text);
    out
}

/// The NarHash of a narinfo record, without copying its text.
pub fn narinfo_nar_hash(b: &[u8]) -> Option<Sha256> {
    array(b, 0).map(Sha256::from_bytes)
}

pub fn decode_narinfo(b: Bytes) -> Option<NarInfoRecord> {
    if b.len() < NARINFO_HEAD {
        return None;
    }
    Some(NarInfoRecord {
        nar_hash: narinfo_nar_hash(&b)?,
        nar_size: u64_at(&b, 32)?,
        file_size: u64_at(&b, 40)?,
        text: b.slice(NARINFO_HEAD..),
    })
}

/// Version of the NAR record layout.
const NAR_V1: u8 = 1;

pub fn encode_nar(r: &NarRecord) -> Vec<u8> {
    let contents = r.contents.encode();
    let listing = r.listing.encode();
    let mut out = Vec::with_capacity(17 + contents.len() + listing.len());
    out.push(NAR_V1);
    for part in [contents, listing] {
        out.extend_from_slice(&(part.len() as u64).to_le_bytes());
        out.extend_from_slice(&part);
    }
    out
}

pub fn decode_nar(b: &[u8]) -> Option<NarRecord> {
    let (&version, rest) = b.split_first()?;
    if version != NAR_V1 {
        return None;
    }
    // Each part is its length, then a manifest; nothing may follow the second.
    let part = |at: usize| -> Option<(&[u8], usize)> {
        let len = usize::try_from(u64_at(rest, at)?).ok()?;
        let end = (at + 8).checked_add(len)?;
        Some((rest.get(at + 8..end)?, end))
    };
    let (contents, end) = part(0)?;
    let (listing, end) = part(end)?;
    if end != rest.len() {
        return None;
    }
    Some(NarRecord {
        contents: Manifest::decode(contents)?,
        listing: Manifest::decode(listing)?,
    })
}

pub fn encode_stats(s: &CacheStats) -> [u8; 24] {
    let mut out = [0u8; 24];
    out[..8].copy_from_slice(&s.paths.to_le_bytes());
    out[8..16].copy_from_slice(&s.nar_bytes.to_le_bytes());
    out[16..].copy_from_slice(&s.stored_bytes.to_le_bytes());
    out
}

pub fn decode_stats(b: &[u8]) -> Option<CacheStats> {
    if b.len() != 24 {
        return None;
    }
    Some(CacheStats {
        paths: u64_at(b, 0)?,
        nar_bytes: u64_at(b, 8)?,
        stored_bytes: u64_at(b, 16)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{ChunkId, ChunkRef, PackId};

    #[test]
    fn records_round_trip_and_short_ones_are_refused() {
        let chunk = |n| ChunkRef {
            id: ChunkId([n; 32]),
            pack: PackId([n; 16]),
            offset: 1,
            stored_len: 2,
            len: 3,
        };
        let nar = NarRecord {
            contents: Manifest {
                chunks: vec![chunk(1), chunk(2)],
            },
            listing: Manifest {
                chunks: vec![chunk(3)],
            },
        };
        let encoded = encode_nar(&nar);
        assert_eq!(decode_nar(&encoded), Some(nar));
        for cut in 0..encoded.len() {
            assert_eq!(decode_nar(&encoded[..cut]), None, "cut at {cut}");
        }
        let info = NarInfoRecord {
            nar_hash: Sha256::digest(b"n"),
            nar_size: 7,
            file_size: 5,
            text: Bytes::from_static(b"StorePath: x\n"),
        };
        let encoded = Bytes::from(encode_narinfo(&info));
        assert_eq!(decode_narinfo(encoded.clone()), Some(info));
        assert_eq!(decode_narinfo(encoded.slice(..47)), None);
        let stats = CacheStats {
            paths: 1,
            nar_bytes: 2,
            stored_bytes: 3,
        };
        assert_eq!(decode_stats(&encode_stats(&stats)), Some(stats));
        assert_eq!(decode_stats(&[0; 23]), None);
        assert_eq!(decode_upload(&[0; 79]), None);
    }
}
