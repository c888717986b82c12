//! `Read` and `Write` adapters that look at bytes as they pass (hashing and counting,
//! feeding a chunker), and one that reads what another thread sends.

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
    /// Wraps `inner`.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            hasher: sha2::Sha256::new(),
            len: 0,
        }
    }

    /// The SHA-256 and the count of what was read.
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

/// Counts everything read through it into a counter another reader of the same
/// thread can look at (the decoding stage compares the body's bytes with the NAR's).
pub struct Counted<R> {
    inner: R,
    count: std::rc::Rc<std::cell::Cell<u64>>,
}

impl<R: Read> Counted<R> {
    /// Counts what is read from `inner` into `count`.
    pub fn new(inner: R, count: std::rc::Rc<std::cell::Cell<u64>>) -> Self {
        Self { inner, count }
    }
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.set(self.count.get() + n as u64);
        Ok(n)
    }
}

/// Chunks everything read through it; `emit` receives each chunk.
pub struct ChunkingReader<R, F> {
    inner: R,
    chunker: Chunker,
    emit: F,
}

impl<R: Read, F: FnMut(&[u8]) -> io::Result<()>> ChunkingReader<R, F> {
    /// Chunks what is read from `inner`.
    pub fn new(inner: R, chunker: Chunker, emit: F) -> Self {
        Self {
            inner,
            chunker,
            emit,
        }
    }

    /// Emits the last chunks.
    pub fn finish(mut self) -> io::Result<()> {
        self.chunker.finish(&mut self.emit)
    }
}

impl<R: Read, F: FnMut(&[u8]) -> io::Result<()>> Read for ChunkingReader<R, F> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.chunker.push(&buf[..n], &mut self.emit)?;
        Ok(n)
    }
}

/// Chunks everything written to it; `emit` receives each chunk.
pub struct ChunkingWriter<F> {
    chunker: Chunker,
    emit: F,
}

impl<F: FnMut(&[u8]) -> io::Result<()>> ChunkingWriter<F> {
    /// Chunks what is written.
    pub fn new(chunker: Chunker, emit: F) -> Self {
        Self { chunker, emit }
    }

    /// Emits the last chunks.
    pub fn finish(mut self) -> io::Result<()> {
        self.chunker.finish(&mut self.emit)
    }
}

impl<F: FnMut(&[u8]) -> io::Result<()>> io::Write for ChunkingWriter<F> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.chunker.push(buf, &mut self.emit)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads the buffers another thread sends, in order; the end of the channel is the
/// end of the data.
pub struct ChannelReader {
    rx: std::sync::mpsc::Receiver<Vec<u8>>,
    current: Vec<u8>,
    pos: usize,
}

impl ChannelReader {
    /// Reads what `rx` receives.
    pub fn new(rx: std::sync::mpsc::Receiver<Vec<u8>>) -> Self {
        Self {
            rx,
            current: Vec::new(),
            pos: 0,
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.current.len() {
            match self.rx.recv() {
                Ok(next) => (self.current, self.pos) = (next, 0),
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len() - self.pos);
        buf[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}
