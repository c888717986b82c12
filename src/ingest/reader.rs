//! `Read` adapters that look at bytes as they pass: hashing and counting, and feeding
//! the chunker.

use std::io::{self, Read};

use sha2::Digest as _;

use super::chunker::Chunker;
use crate::nix::Sha256;

/// Hashes (SHA-256) and counts everything read through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: sha2::Sha256,
    len: u64,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            hasher: sha2::Sha256::new(),
            len: 0,
        }
    }

    pub fn finish(self) -> (Sha256, u64) {
        (Sha256::from_bytes(self.hasher.finalize().into()), self.len)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
}

/// Hashes, counts and chunks everything read through it; `emit` receives each chunk.
pub struct ChunkingReader<R, F> {
    inner: HashingReader<R>,
    chunker: Chunker,
    emit: F,
}

impl<R: Read, F: FnMut(&[u8]) -> io::Result<()>> ChunkingReader<R, F> {
    pub fn new(inner: R, chunker: Chunker, emit: F) -> Self {
        Self {
            inner: HashingReader::new(inner),
            chunker,
            emit,
        }
    }

    /// Emits the last chunks; returns the hash and size of all bytes read.
    pub fn finish(mut self) -> io::Result<(Sha256, u64)> {
        self.chunker.finish(&mut self.emit)?;
        Ok(self.inner.finish())
    }
}

impl<R: Read, F: FnMut(&[u8]) -> io::Result<()>> Read for ChunkingReader<R, F> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.chunker.push(&buf[..n], &mut self.emit)?;
        Ok(n)
    }
}
