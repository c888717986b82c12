//! How records are laid out as bytes in a key-value database. Every decoder checks
//! lengths and versions and returns `None` for anything else, never panics; the caller
//! turns that into `IndexError::Corrupt` with the key.

use bytes::Bytes;

use super::{CacheStats, NarInfoRecord, NarRecord, Upload};
use crate::nix::Sha256;
use crate::store::{ManifestId, Segment, Stored};

/// Reads `N` bytes at `at`.
fn array<const N: usize>(b: &[u8], at: usize) -> Option<[u8; N]> {
    b.get(at..at.checked_add(N)?)?.try_into().ok()
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    array(b, at).map(u64::from_le_bytes)
}

pub fn encode_upload(u: &Upload) -> Vec<u8> {
    let mut out = Vec::with_capacity(97);
    out.extend_from_slice(u.nar_hash.as_bytes());
    out.extend_from_slice(u.file_hash.as_bytes());
    out.extend_from_slice(&u.nar_size.to_le_bytes());
    out.extend_from_slice(&u.file_size.to_le_bytes());
    out.extend_from_slice(&u.created.to_le_bytes());
    out.extend_from_slice(&u.stored_size.to_le_bytes());
    out.push(u8::from(u.claimed));
    out
}

/// Reads an upload record; one of 80 bytes was written before uploads had a time, one
/// of 88 before they had a stored size and a claim.
pub fn decode_upload(b: &[u8]) -> Option<Upload> {
    let (created, stored_size, claimed) = match b.len() {
        80 => (0, 0, false),
        88 => (u64_at(b, 80)?, 0, false),
        97 => {
            let claimed = match b[96] {
                0 => false,
                1 => true,
                _ => return None,
            };
            (u64_at(b, 80)?, u64_at(b, 88)?, claimed)
        }
        _ => return None,
    };
    Some(Upload {
        nar_hash: Sha256::from_bytes(array(b, 0)?),
        file_hash: Sha256::from_bytes(array(b, 32)?),
        nar_size: u64_at(b, 64)?,
        file_size: u64_at(b, 72)?,
        created,
        stored_size,
        claimed,
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

/// A stored content: its manifest's id, its number of segments, each one's sizes.
pub fn encode_stored(s: &Stored, out: &mut Vec<u8>) {
    out.extend_from_slice(&s.id.0);
    out.extend_from_slice(&(s.segments.len() as u32).to_le_bytes());
    for seg in &s.segments {
        out.extend_from_slice(&seg.size.to_le_bytes());
        out.extend_from_slice(&seg.stored_size.to_le_bytes());
    }
}

/// Reads `encode_stored`'s bytes at `*at`, moving `*at` past them.
fn decode_stored_at(b: &[u8], at: &mut usize) -> Option<Stored> {
    let id = ManifestId(array(b, *at)?);
    let count = u32::from_le_bytes(array(b, *at + 16)?) as usize;
    *at += 20;
    let mut segments = Vec::with_capacity(count.min(b.len() / 16));
    for _ in 0..count {
        segments.push(Segment {
            size: u64_at(b, *at)?,
            stored_size: u64_at(b, *at + 8)?,
        });
        *at += 16;
    }
    Some(Stored { id, segments })
}

/// Reads a record that is one stored content and nothing else.
pub fn decode_stored(b: &[u8]) -> Option<Stored> {
    let mut at = 0;
    let s = decode_stored_at(b, &mut at)?;
    (at == b.len()).then_some(s)
}

pub fn encode_nar(r: &NarRecord) -> Vec<u8> {
    let mut out = vec![NAR_V1];
    encode_stored(&r.contents, &mut out);
    encode_stored(&r.listing, &mut out);
    out
}

pub fn decode_nar(b: &[u8]) -> Option<NarRecord> {
    let (&version, rest) = b.split_first()?;
    if version != NAR_V1 {
        return None;
    }
    let mut at = 0;
    let contents = decode_stored_at(rest, &mut at)?;
    let listing = decode_stored_at(rest, &mut at)?;
    (at == rest.len()).then_some(NarRecord { contents, listing })
}

/// A segment's key: its manifest's id, then its index (big-endian, so a manifest's
/// segments sort in order).
pub fn segment_key(id: &ManifestId, index: u32) -> [u8; 20] {
    let mut k = [0u8; 20];
    k[..16].copy_from_slice(&id.0);
    k[16..].copy_from_slice(&index.to_be_bytes());
    k
}

pub fn encode_stats(s: &CacheStats) -> [u8; 40] {
    let mut out = [0u8; 40];
    out[..8].copy_from_slice(&s.paths.to_le_bytes());
    out[8..16].copy_from_slice(&s.nar_bytes.to_le_bytes());
    out[16..24].copy_from_slice(&s.stored_bytes.to_le_bytes());
    out[24..32].copy_from_slice(&s.pending_bytes.to_le_bytes());
    out[32..].copy_from_slice(&s.blob_bytes.to_le_bytes());
    out
}

/// Reads a cache's counts; one of 24 bytes was written before uploads, logs and
/// realisations were counted (they count from the first write after).
pub fn decode_stats(b: &[u8]) -> Option<CacheStats> {
    let (pending_bytes, blob_bytes) = match b.len() {
        24 => (0, 0),
        40 => (u64_at(b, 24)?, u64_at(b, 32)?),
        _ => return None,
    };
    Some(CacheStats {
        paths: u64_at(b, 0)?,
        nar_bytes: u64_at(b, 8)?,
        stored_bytes: u64_at(b, 16)?,
        pending_bytes,
        blob_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_short_ones_are_refused() {
        let stored = |n: u8, count: u64| Stored {
            id: ManifestId([n; 16]),
            segments: (0..count)
                .map(|i| Segment {
                    size: 100 + i,
                    stored_size: 40 + i,
                })
                .collect(),
        };
        let nar = NarRecord {
            contents: stored(1, 3),
            listing: stored(2, 1),
        };
        let encoded = encode_nar(&nar);
        assert_eq!(decode_nar(&encoded), Some(nar));
        for cut in 0..encoded.len() {
            assert_eq!(decode_nar(&encoded[..cut]), None, "cut at {cut}");
        }
        assert_eq!(decode_nar(&[encoded.as_slice(), &[0]].concat()), None);
        let mut blob = Vec::new();
        encode_stored(&stored(3, 0), &mut blob);
        assert_eq!(decode_stored(&blob), Some(stored(3, 0)));
        assert_eq!(decode_stored(&blob[..19]), None);
        // A count far beyond the record is refused without reserving memory for it.
        let mut lying = blob.clone();
        lying[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode_stored(&lying), None);
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
            pending_bytes: 4,
            blob_bytes: 5,
        };
        assert_eq!(decode_stats(&encode_stats(&stats)), Some(stats));
        let old = decode_stats(&encode_stats(&stats)[..24]).unwrap();
        assert_eq!(
            (old.stored_bytes, old.pending_bytes, old.blob_bytes),
            (3, 0, 0)
        );
        assert_eq!(decode_stats(&[0; 23]), None);
        let upload = Upload {
            nar_hash: Sha256::digest(b"n"),
            file_hash: Sha256::digest(b"f"),
            nar_size: 1,
            file_size: 2,
            created: 3,
            stored_size: 4,
            claimed: true,
        };
        let encoded = encode_upload(&upload);
        assert_eq!(decode_upload(&encoded), Some(upload));
        let before = decode_upload(&encoded[..88]).unwrap();
        assert_eq!(
            (before.created, before.stored_size, before.claimed),
            (3, 0, false)
        );
        let mut bad = encoded.clone();
        bad[96] = 2;
        assert_eq!(decode_upload(&bad), None);
        assert_eq!(decode_upload(&[0; 79]), None);
    }
}
