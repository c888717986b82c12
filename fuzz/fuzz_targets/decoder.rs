//! The decoders of upload bodies: the memory a stream's header asks for is read from
//! its first bytes (the first input byte picks the compression), and a decoder held
//! to that memory reads any bytes without a panic.
#![no_main]

use std::io::{BufReader, Read as _};

use cachet::ingest::decoder;
use cachet::nix::Compression;
use libfuzzer_sys::fuzz_target;

/// As the server allows at most (ingest.memory_mib's default, less an upload).
const LIMIT: u64 = 64 << 20;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let compression = match pick % 4 {
        0 => Compression::None,
        1 => Compression::Xz,
        2 => Compression::Zstd,
        _ => Compression::Bzip2,
    };
    let head = &body[..body.len().min(decoder::PEEK_BYTES)];
    let Ok(memory) = decoder::memory(compression, head, LIMIT) else {
        return;
    };
    assert!(memory.bytes <= LIMIT);
    let Ok(mut decoded) = decoder::open(compression, BufReader::new(body), memory) else {
        return;
    };
    // A few MiB at most: the server holds a body to its NAR limit the same way.
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0usize;
    while total < 4 << 20 {
        match decoded.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => total += n,
        }
    }
});
