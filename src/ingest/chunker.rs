//! Content-defined chunking (FastCDC 2020) over data pushed in pieces of any size.
//!
//! A cut point depends only on the bytes since the previous cut, so chunking a
//! buffer holding at least `max_size` bytes yields exactly the chunk a whole-stream
//! chunker would: we buffer up to a few `max_size` and cut what is certain.

use fastcdc::v2020::{self, Normalization};

pub use crate::config::ChunkParams;

/// A FastCDC chunker fed in pieces.
pub struct Chunker {
    min: usize,
    avg: usize,
    max: usize,
    mask_s: u64,
    mask_l: u64,
    buf: Vec<u8>,
}

impl Chunker {
    /// A chunker with the sizes `p`.
    pub fn new(p: ChunkParams) -> Self {
        // Level 1 keeps most chunks near the average without forcing cuts that
        // would stop identical content from lining up again after a change.
        let (mask_s, mask_l) = v2020::select_masks(p.avg_size as usize, Normalization::Level1);
        Self {
            min: p.min_size as usize,
            avg: p.avg_size as usize,
            max: p.max_size as usize,
            mask_s,
            mask_l,
            buf: Vec::with_capacity(4 * p.max_size as usize),
        }
    }

    fn cut(&self, data: &[u8]) -> usize {
        let (_, len) = v2020::cut(
            data,
            self.min,
            self.avg,
            self.max,
            self.mask_s,
            self.mask_l,
            self.mask_s << 1,
            self.mask_l << 1,
        );
        len
    }

    /// Adds bytes; calls `emit` for every chunk that is now certain.
    pub fn push<E>(
        &mut self,
        data: &[u8],
        emit: &mut impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        self.buf.extend_from_slice(data);
        // Cut only once several maximal chunks are buffered, so the leftover moved
        // to the front is small next to what was cut.
        if self.buf.len() < 4 * self.max {
            return Ok(());
        }
        let mut start = 0;
        while self.buf.len() - start >= self.max {
            let len = self.cut(&self.buf[start..]);
            emit(&self.buf[start..start + len])?;
            start += len;
        }
        self.buf.drain(..start);
        Ok(())
    }

    /// Emits the rest: the chunks of the final bytes.
    pub fn finish<E>(mut self, emit: &mut impl FnMut(&[u8]) -> Result<(), E>) -> Result<(), E> {
        let mut start = 0;
        while start < self.buf.len() {
            let len = self.cut(&self.buf[start..]);
            emit(&self.buf[start..start + len])?;
            start += len;
        }
        self.buf.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: ChunkParams = ChunkParams {
        min_size: 1024,
        avg_size: 4096,
        max_size: 16384,
    };

    fn data(n: usize, seed: u64) -> Vec<u8> {
        crate::testing::Xorshift(seed).bytes(n)
    }

    fn chunks_of(bytes: &[u8], piece: usize) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut c = Chunker::new(P);
        let mut emit = |b: &[u8]| -> Result<(), ()> {
            out.push(b.to_vec());
            Ok(())
        };
        for p in bytes.chunks(piece.max(1)) {
            c.push(p, &mut emit).unwrap();
        }
        c.finish(&mut emit).unwrap();
        out
    }

    #[test]
    fn same_cuts_whatever_the_piece_size() {
        let bytes = data(300_000, 7);
        let whole: Vec<usize> =
            v2020::FastCDC::with_level(&bytes, 1024, 4096, 16384, Normalization::Level1)
                .map(|c| c.length)
                .collect();
        for piece in [1, 1000, 4096, 65536, 300_000] {
            let got: Vec<usize> = chunks_of(&bytes, piece).iter().map(Vec::len).collect();
            assert_eq!(got, whole, "piece size {piece}");
        }
        assert_eq!(chunks_of(&bytes, 999).concat(), bytes);
    }

    #[test]
    fn a_local_change_changes_few_chunks() {
        let a = data(500_000, 3);
        let mut b = a.clone();
        b[250_000..250_032].copy_from_slice(&[0xAA; 32]);
        let ca = chunks_of(&a, 8192);
        let cb = chunks_of(&b, 8192);
        let new = cb.iter().filter(|c| !ca.contains(c)).count();
        assert!(new <= 3, "{new} new chunks of {}", cb.len());
    }

    #[test]
    fn validates_params() {
        assert!(P.validate().is_ok());
        assert!(ChunkParams { min_size: 8, ..P }.validate().is_err());
        assert!(ChunkParams {
            avg_size: 99_999,
            ..P
        }
        .validate()
        .is_err());
    }
}
