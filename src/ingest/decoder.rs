//! Decompressors for upload bodies, with their memory known before they start.
//!
//! A compressed stream names the memory its decoder needs in its first bytes: a zstd
//! frame its window, an xz block its LZMA2 dictionary, a bzip2 stream its block size.
//! The ingest reads those bytes first, reserves that much of the budget shared by all
//! uploads, and opens the decoder with that much as its limit, so a later frame or
//! block that asks for more is refused instead of growing the process.

use std::io::{self, BufRead, Read};

use crate::nix::Compression;

/// Bytes of a body read before its decoder is chosen: enough for a zstd frame header
/// and for an xz stream header with its first block header (filters included).
pub const PEEK_BYTES: usize = 128;

/// Memory a decoder takes besides its window or dictionary: zstd's two block buffers
/// (128 KiB each) and liblzma's and bzip2's state, with room to spare.
const DECODER_OVERHEAD: u64 = 512 * 1024;

/// What a decoder may use, from the stream's own header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecoderMemory {
    /// Bytes to reserve for the decoder.
    pub bytes: u64,
    /// For zstd, the largest window log a frame may have.
    zstd_window_log: u32,
}

impl DecoderMemory {
    const NONE: Self = Self {
        bytes: 0,
        zstd_window_log: 0,
    };
}

/// The memory the decoder of a body starting with `head` will need, at most `max`
/// (a stream naming more is refused: `Err` holds what it asked for).
pub fn memory(compression: Compression, head: &[u8], max: u64) -> Result<DecoderMemory, u64> {
    let need = match compression {
        Compression::None | Compression::Brotli | Compression::Lz4 => {
            return Ok(DecoderMemory::NONE)
        }
        Compression::Zstd => {
            // A stream that does not start with a plain frame (a skippable frame, or
            // not zstd at all) is held to 8 MiB, the window of zstd's level 19 and so
            // the largest Nix writes; its decoder finds out soon enough.
            let log = zstd_window_log(head).unwrap_or(23);
            return bounded((1u64 << log.min(40)) + DECODER_OVERHEAD, max, log);
        }
        // Unparsable headers are refused by the decoder at once; reserve little.
        Compression::Xz => xz_dictionary(head).unwrap_or(0) + DECODER_OVERHEAD,
        // Decoding a block of 100k × level takes about four bytes per block byte
        // plus 100 KB (bzip2's manual). Later streams may use a larger level, so the
        // largest is assumed.
        Compression::Bzip2 => 4 * 900_000 + 100_000 + DECODER_OVERHEAD,
    };
    bounded(need, max, 0)
}

fn bounded(bytes: u64, max: u64, zstd_window_log: u32) -> Result<DecoderMemory, u64> {
    if bytes > max {
        return Err(bytes);
    }
    Ok(DecoderMemory {
        bytes,
        zstd_window_log,
    })
}

/// The window log (rounded up) that the zstd frame starting `head` declares.
fn zstd_window_log(head: &[u8]) -> Option<u32> {
    if head.get(..4)? != [0x28, 0xb5, 0x2f, 0xfd] {
        return None;
    }
    let descriptor = *head.get(4)?;
    let single_segment = descriptor & 0x20 != 0;
    if !single_segment {
        // Window_Descriptor: exponent and an eighth-step mantissa.
        let wd = *head.get(5)?;
        let log = 10 + u32::from(wd >> 3);
        return Some(log + u32::from(wd & 7 != 0));
    }
    // A single-segment frame's window is its content size.
    let dict_len = [0, 1, 2, 4][usize::from(descriptor & 3)];
    let at = 5 + dict_len;
    let size = match descriptor >> 6 {
        0 => u64::from(*head.get(at)?),
        1 => u64::from(u16::from_le_bytes(head.get(at..at + 2)?.try_into().ok()?)) + 256,
        2 => u64::from(u32::from_le_bytes(head.get(at..at + 4)?.try_into().ok()?)),
        _ => u64::from_le_bytes(head.get(at..at + 8)?.try_into().ok()?),
    };
    Some((64 - size.max(1 << 10).saturating_sub(1).leading_zeros()).max(10))
}

/// Reads a multibyte integer of the xz format (7 bits per byte, low first).
fn xz_varint(b: &[u8], at: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for i in 0..9 {
        let byte = *b.get(*at)?;
        *at += 1;
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// The LZMA2 dictionary size of the first block of the xz stream starting `head`.
fn xz_dictionary(head: &[u8]) -> Option<u64> {
    if head.get(..6)? != [0xfd, b'7', b'z', b'X', b'Z', 0] {
        return None;
    }
    // Stream header (12 bytes), then the block header: its size, its flags.
    let mut at = 12;
    let header_size = *head.get(at)?;
    if header_size == 0 {
        return Some(0); // the index: a stream without blocks
    }
    let flags = *head.get(at + 1)?;
    at += 2;
    if flags & 0x40 != 0 {
        xz_varint(head, &mut at)?; // compressed size
    }
    if flags & 0x80 != 0 {
        xz_varint(head, &mut at)?; // uncompressed size
    }
    for _ in 0..=(flags & 3) {
        let id = xz_varint(head, &mut at)?;
        let props_len = usize::try_from(xz_varint(head, &mut at)?).ok()?;
        let props = head.get(at..at + props_len)?;
        at += props_len;
        if id == 0x21 {
            // LZMA2's one property byte encodes the dictionary size.
            let bits = u32::from(*props.first()?);
            return Some(match bits {
                40 => u64::from(u32::MAX),
                b if b < 40 => (2 | u64::from(b & 1)) << (b / 2 + 11),
                _ => return None,
            });
        }
    }
    None
}

/// The decoder of a body in `compression`, held to `memory`.
pub fn open<'a, R: BufRead + 'a>(
    compression: Compression,
    r: R,
    memory: DecoderMemory,
) -> io::Result<Box<dyn Read + 'a>> {
    Ok(match compression {
        Compression::None => Box::new(r),
        // Multi-stream decoders: a body may be several concatenated streams or frames.
        Compression::Xz => {
            let stream = xz2::stream::Stream::new_stream_decoder(
                memory.bytes.max(1),
                xz2::stream::CONCATENATED,
            )
            .map_err(io::Error::other)?;
            Box::new(xz2::bufread::XzDecoder::new_stream(r, stream))
        }
        Compression::Zstd => {
            let mut d = zstd::stream::read::Decoder::with_buffer(r)?;
            d.window_log_max(memory.zstd_window_log.clamp(10, 31))?;
            Box::new(d)
        }
        Compression::Bzip2 => Box::new(bzip2::bufread::MultiBzDecoder::new(r)),
        Compression::Brotli | Compression::Lz4 => {
            return Err(io::Error::other(format!("{compression} is not supported")))
        }
    })
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    const MIB: u64 = 1 << 20;

    fn zstd_stream(window_log: u32, data: &[u8]) -> Vec<u8> {
        let mut e = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        e.window_log(window_log).unwrap();
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn decode(compression: Compression, body: &[u8], memory: DecoderMemory) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        open(compression, body, memory)?.read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn zstd_frames_declare_their_window() {
        let data = vec![7u8; 100_000];
        let body = zstd_stream(23, &data);
        let m = memory(Compression::Zstd, &body, 64 * MIB).unwrap();
        assert_eq!(m.zstd_window_log, 23);
        assert_eq!(m.bytes, 8 * MIB + DECODER_OVERHEAD);
        assert_eq!(decode(Compression::Zstd, &body, m).unwrap(), data);
        // A 128 MiB window is more than a 64 MiB budget allows.
        let big = zstd_stream(27, &data);
        assert_eq!(
            memory(Compression::Zstd, &big, 64 * MIB),
            Err(128 * MIB + DECODER_OVERHEAD)
        );
        // A frame with a larger window than the first one's is refused by the decoder.
        let mut mixed = body.clone();
        mixed.extend(zstd_stream(26, &data));
        let err = decode(Compression::Zstd, &mixed, m).unwrap_err();
        assert!(err.to_string().contains("memory"), "{err}");
        // Single-segment frames (content size known) have their size as window.
        let small = zstd::bulk::compress(&data, 3).unwrap();
        let m = memory(Compression::Zstd, &small, 64 * MIB).unwrap();
        assert_eq!(m.zstd_window_log, 17);
        assert_eq!(decode(Compression::Zstd, &small, m).unwrap(), data);
    }

    #[test]
    fn xz_blocks_declare_their_dictionary() {
        let data = vec![7u8; 100_000];
        for (level, dict) in [(0, 256 * 1024), (6, 8 * MIB), (9, 64 * MIB)] {
            let mut e = xz2::write::XzEncoder::new(Vec::new(), level);
            e.write_all(&data).unwrap();
            let body = e.finish().unwrap();
            let m = memory(
                Compression::Xz,
                &body[..PEEK_BYTES.min(body.len())],
                80 * MIB,
            )
            .unwrap();
            assert_eq!(m.bytes, dict + DECODER_OVERHEAD, "level {level}");
            assert_eq!(decode(Compression::Xz, &body, m).unwrap(), data);
            // Held to less than it needs, the decoder refuses.
            let tight = DecoderMemory {
                bytes: dict / 2,
                zstd_window_log: 0,
            };
            assert!(decode(Compression::Xz, &body, tight).is_err());
        }
    }

    #[test]
    fn other_compressions_need_little_or_a_fixed_amount() {
        assert_eq!(memory(Compression::None, b"", 0).unwrap().bytes, 0);
        let bz = memory(Compression::Bzip2, b"BZh9", 64 * MIB).unwrap().bytes;
        assert!(bz > 3 * MIB && bz < 5 * MIB);
        assert!(memory(Compression::Bzip2, b"BZh9", MIB).is_err());
        // Garbage is cheap: its decoder fails on the first bytes.
        assert_eq!(
            memory(Compression::Xz, b"garbage", 64 * MIB).unwrap().bytes,
            DECODER_OVERHEAD
        );
    }
}
