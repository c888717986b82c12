//! Raw zstd frames: zstd's frame format with stored (uncompressed) blocks, which any
//! zstd decoder reads. With `ingest.zstd_level = 0` chunks are stored this way, so a
//! served `.nar.zst` stays a valid zstd stream while no time goes into compression.

/// zstd's frame magic number, little-endian on disk.
const MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
/// Frame header descriptor: a 4-byte content size, single segment (so no window
/// descriptor: the window is the content size), no checksum, no dictionary.
const DESCRIPTOR: u8 = 0b1010_0000;
/// The largest block zstd accepts.
const MAX_BLOCK: usize = 128 * 1024;
const HEADER_LEN: usize = MAGIC.len() + 1 + 4;
const BLOCK_HEADER_LEN: usize = 3;

/// Bytes a raw frame of `len` content bytes takes.
pub fn raw_frame_len(len: usize) -> usize {
    HEADER_LEN + BLOCK_HEADER_LEN * len.div_ceil(MAX_BLOCK).max(1) + len
}

/// Appends `data` to `out` as one raw zstd frame. `data` must be under 4 GiB (chunks
/// are at most `chunking.max_size`, a few MiB at most).
pub fn write_raw(data: &[u8], out: &mut Vec<u8>) {
    let len = u32::try_from(data.len()).expect("a chunk is under 4 GiB");
    out.reserve(raw_frame_len(data.len()));
    out.extend_from_slice(&MAGIC);
    out.push(DESCRIPTOR);
    out.extend_from_slice(&len.to_le_bytes());
    let mut blocks = data.chunks(MAX_BLOCK).peekable();
    if blocks.peek().is_none() {
        // An empty frame is one empty last block.
        out.extend_from_slice(&block_header(0, true));
    }
    while let Some(block) = blocks.next() {
        out.extend_from_slice(&block_header(block.len(), blocks.peek().is_none()));
        out.extend_from_slice(block);
    }
}

/// Block header: bit 0 last block, bits 1-2 block type (0: raw), bits 3-23 size.
fn block_header(size: usize, last: bool) -> [u8; 3] {
    let v = ((size as u32) << 3) | u32::from(last);
    let b = v.to_le_bytes();
    [b[0], b[1], b[2]]
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use super::*;
    use crate::testing::Xorshift;

    #[test]
    fn raw_frames_decode_with_zstd() {
        let mut rng = Xorshift(7);
        let mut stream = Vec::new();
        let mut expected = Vec::new();
        for len in [
            0,
            1,
            1000,
            MAX_BLOCK - 1,
            MAX_BLOCK,
            MAX_BLOCK + 1,
            3 * MAX_BLOCK + 5,
        ] {
            let data = rng.bytes(len);
            let mut frame = Vec::new();
            write_raw(&data, &mut frame);
            assert_eq!(frame.len(), raw_frame_len(len), "length of {len}");
            assert_eq!(zstd::bulk::decompress(&frame, len).unwrap(), data);
            stream.extend_from_slice(&frame);
            expected.extend_from_slice(&data);
        }
        // Concatenated, they are one zstd stream of the data concatenated.
        let mut decoded = Vec::new();
        zstd::stream::read::Decoder::new(&stream[..])
            .unwrap()
            .read_to_end(&mut decoded)
            .unwrap();
        assert_eq!(decoded, expected);
    }
}
