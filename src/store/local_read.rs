//! Reads of pack files on local disk for serving, without leaving the async thread
//! when the bytes are in the page cache.
//!
//! Handing every read to the blocking pool (what `object_store` does for local files)
//! cost a third of the server's CPU when serving with four connections: task switches
//! and wake-ups, more than the copies themselves (BENCHMARKS.md). Most reads of a
//! serving cache hit the page cache, where a read is a memory copy of a few tens of
//! microseconds. So a read first asks the kernel for the cached bytes only
//! (`preadv2` with `RWF_NOWAIT`), and goes to the blocking pool just for what would
//! wait on the disk.

use std::fs::File;
use std::io::{self, IoSliceMut};
use std::ops::Range;
use std::os::unix::fs::FileExt as _;
use std::path::PathBuf;

use bytes::Bytes;
use rustix::io::{Errno, ReadWriteFlags};

/// Bytes `range` of the file at `path`. A file shorter than the range is an error.
pub async fn read_range(path: PathBuf, range: Range<u64>) -> io::Result<Bytes> {
    let len = range
        .end
        .checked_sub(range.start)
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| io::Error::other("an inverted or oversized range"))?;
    // Opening stays on the async thread: a pack's directory entry and inode are
    // cached whenever its pages are, and opening per read keeps no file handles.
    let file = File::open(&path)?;
    let mut buf = vec![0u8; len];
    let cached = read_cached(&file, &mut buf, range.start);
    if cached < len {
        buf = tokio::task::spawn_blocking(move || read_rest(&file, buf, cached, range.start))
            .await
            .map_err(io::Error::other)??;
    }
    Ok(Bytes::from(buf))
}

/// Reads what `read_cached` left of `buf`, which holds the file's bytes from `offset`
/// and has its first `done` filled; this may wait on the disk.
fn read_rest(file: &File, mut buf: Vec<u8>, done: usize, offset: u64) -> io::Result<Vec<u8>> {
    file.read_exact_at(&mut buf[done..], offset + done as u64)?;
    Ok(buf)
}

/// Fills `buf` from `offset` with what the page cache holds, stopping at the first
/// byte that would need the disk; returns how many bytes it read. It never fails:
/// whatever it could not read (not cached, the end of the file, a filesystem or a
/// seccomp filter that refuses the call) is left to the blocking read, which reports
/// real errors.
fn read_cached(file: &File, buf: &mut [u8], offset: u64) -> usize {
    let mut done = 0;
    while done < buf.len() {
        let mut slice = [IoSliceMut::new(&mut buf[done..])];
        match rustix::io::preadv2(
            file,
            &mut slice,
            offset + done as u64,
            ReadWriteFlags::NOWAIT,
        ) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(Errno::INTR) => {}
            Err(_) => break,
        }
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_ranges_and_refuses_short_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pack");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        for range in [0..1, 5..70_000, 0..300_000, 299_999..300_000, 10..10] {
            let got = read_range(path.clone(), range.clone()).await.unwrap();
            assert_eq!(&got[..], &data[range.start as usize..range.end as usize]);
        }
        // Whatever part the page cache had, the blocking read finishes the rest.
        for done in [0, 1, 4096, 100_000, 249_000] {
            let mut buf = vec![0u8; 249_000];
            buf[..done].copy_from_slice(&data[1000..1000 + done]);
            let file = File::open(&path).unwrap();
            let got = read_rest(&file, buf, done, 1000).unwrap();
            assert_eq!(&got[..], &data[1000..250_000], "{done} bytes cached");
        }
        // Out of the page cache (where the filesystem honours the advice), a read
        // still returns the right bytes.
        let file = File::open(&path).unwrap();
        file.sync_all().unwrap();
        rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed).unwrap();
        let got = read_range(path.clone(), 1000..250_000).await.unwrap();
        assert_eq!(&got[..], &data[1000..250_000]);
        let err = read_range(path.clone(), 299_000..300_001)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        let err = read_range(dir.path().join("missing"), 0..1)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
