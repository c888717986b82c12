//! Free space: telling a full disk from other storage failures, uploads held to a
//! budget of the free space so that the metadata database never meets a full disk in
//! the middle of a write, and a ballast that gives the database room when something
//! else fills the disk.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Whether an I/O error means the filesystem (ENOSPC) or the user's quota (EDQUOT) is
/// full.
pub fn is_disk_full(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}

/// Whether any error in the chain of `e` is a full disk (object stores wrap the I/O
/// error of their backend).
pub fn chain_is_disk_full(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(e) = next {
        if e.downcast_ref::<io::Error>().is_some_and(is_disk_full) {
            return true;
        }
        next = e.source();
    }
    false
}

/// Bytes available to unprivileged writers on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> io::Result<u64> {
    let s = rustix::fs::statvfs(path)?;
    Ok(s.f_bavail.saturating_mul(s.f_frsize))
}

/// A filesystem that has less free space than an upload needs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{} has {free_mib} MiB free, {promised_mib} MiB of it promised to uploads in progress: \
     not enough beyond the {min_mib} MiB kept free (storage.min_free_mib)",
    dir.display()
)]
pub struct LowSpace {
    /// The directory whose filesystem is short.
    pub dir: PathBuf,
    /// What it has.
    pub free_mib: u64,
    /// What uploads in progress have reserved of it and not written yet.
    pub promised_mib: u64,
    /// What the server keeps free.
    pub min_mib: u64,
}

/// The free space of the filesystems uploads write to, as a budget: every upload
/// reserves what it is about to write before it writes it (a pack and the records of
/// its chunks), so uploads at once can together never take the free space below the
/// minimum, however many pass the first check at once. What is below the minimum is
/// the reserve of the metadata and of the operations that free space (publishing,
/// deleting, collecting), which reserve nothing.
pub struct Space {
    dirs: Vec<PathBuf>,
    min_bytes: u64,
    /// Bytes reserved and not yet written.
    reserved: Mutex<u64>,
    /// The file that keeps room for the metadata when the disk fills anyway.
    ballast: Option<Ballast>,
}

/// Part of the free space, promised to a write under way until dropped.
pub struct Reservation {
    space: Arc<Space>,
    bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        *self.space.reserved.lock().expect("never poisoned") -= self.bytes;
    }
}

impl Reservation {
    /// Keeps the promise `after` more, then drops it: for writes the database makes
    /// on its own schedule.
    pub fn release_after(self, after: Duration) {
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            drop(self);
        });
    }
}

impl Space {
    /// The budget of `dirs` (the metadata's and the local packs' directories), each
    /// filesystem kept `min_bytes` free, with `ballast` on the metadata's.
    pub fn new(dirs: Vec<PathBuf>, min_bytes: u64, ballast: Option<Ballast>) -> Arc<Self> {
        Arc::new(Self {
            dirs,
            min_bytes,
            reserved: Mutex::new(0),
            ballast,
        })
    }

    /// The reserved bytes now.
    pub fn reserved(&self) -> u64 {
        *self.reserved.lock().expect("never poisoned")
    }

    /// The least free space among the directories' filesystems.
    pub fn free(&self) -> Option<u64> {
        self.dirs.iter().filter_map(|d| free_bytes(d).ok()).min()
    }

    /// Refuses when the free space, less what is promised, is below the minimum:
    /// the quick answer before an upload's body is read.
    pub fn ensure(&self) -> Result<(), LowSpace> {
        let reserved = self.reserved.lock().expect("never poisoned");
        self.check(*reserved, 0)
    }

    /// Promises `bytes` of every directory's filesystem to a write about to happen,
    /// if that leaves the minimum free beside every other promise.
    pub fn reserve(self: &Arc<Self>, bytes: u64) -> Result<Reservation, LowSpace> {
        let mut reserved = self.reserved.lock().expect("never poisoned");
        self.check(*reserved, bytes)?;
        *reserved += bytes;
        Ok(Reservation {
            space: self.clone(),
            bytes,
        })
    }

    /// A directory that cannot be examined passes: the write itself will report it.
    /// The room of a ballast that is not on disk (released, or not written yet) is
    /// the metadata's: it counts as promised.
    fn check(&self, reserved: u64, bytes: u64) -> Result<(), LowSpace> {
        if self.min_bytes == 0 {
            return Ok(());
        }
        let reserved = reserved + self.ballast.as_ref().map_or(0, Ballast::missing_bytes);
        for dir in &self.dirs {
            let Ok(free) = free_bytes(dir) else { continue };
            if free.saturating_sub(reserved) < self.min_bytes.saturating_add(bytes) {
                return Err(LowSpace {
                    dir: dir.clone(),
                    free_mib: free >> 20,
                    promised_mib: reserved.div_ceil(1 << 20),
                    min_mib: self.min_bytes >> 20,
                });
            }
        }
        Ok(())
    }

    /// Looks after the ballast: gives its room to the metadata when the disk is
    /// nearly full, and takes it back once there is plenty again. Called every
    /// second.
    pub fn tend(&self) {
        if let Some(b) = &self.ballast {
            b.release_if_short();
            b.restore_if_roomy(self.min_bytes + self.reserved());
        }
    }

    /// The promised bytes, the ballast's missing room included, as uploads see them.
    pub fn promised(&self) -> u64 {
        self.reserved() + self.ballast.as_ref().map_or(0, Ballast::missing_bytes)
    }
}

/// A file of a few MiB kept on the metadata's filesystem and deleted when that
/// filesystem is (nearly) full, so that the database can still write: something
/// else may fill the disk (another program, the operator), and the database both
/// writes when it opens and, once a write has failed, refuses all writes until it is
/// reopened. With its room back, the server starts, serves and collects, and the
/// operations that free space can run.
pub struct Ballast {
    path: PathBuf,
    bytes: u64,
}

impl Ballast {
    /// The ballast of `bytes` at `path` (0: none).
    pub fn new(path: PathBuf, bytes: u64) -> Option<Self> {
        (bytes > 0).then_some(Self { path, bytes })
    }

    fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }

    /// Whether the file is there, at its size (one of another size, from another
    /// setting, is replaced).
    pub fn present(&self) -> bool {
        std::fs::metadata(&self.path).is_ok_and(|m| m.len() == self.bytes)
    }

    /// Removes the file a setting of none leaves (and a partial one): its room is
    /// the disk's again.
    pub fn remove_at(path: &Path) {
        for p in [path.to_owned(), path.with_extension("partial")] {
            if std::fs::remove_file(&p).is_ok() {
                tracing::info!(file = %p.display(), "removed the space kept for the metadata");
            }
        }
    }

    /// The room the file would take, when it is not there.
    fn missing_bytes(&self) -> u64 {
        if self.present() {
            0
        } else {
            self.bytes
        }
    }

    /// Deletes the file when its filesystem has less free than half the file's size
    /// (uploads never take it that far; something else did); true if it did.
    pub fn release_if_short(&self) -> bool {
        let short = free_bytes(self.dir()).is_ok_and(|free| free < self.bytes / 2);
        if !short {
            return false;
        }
        // A write cut short (a crash) leaves a partial file: it goes first.
        let _ = std::fs::remove_file(self.path.with_extension("partial"));
        if !self.path.exists() {
            return false;
        }
        match std::fs::remove_file(&self.path) {
            Ok(()) => {
                tracing::warn!(
                    file = %self.path.display(),
                    mib = self.bytes >> 20,
                    "the disk is nearly full: released the space kept for the metadata; \
                     free space (cache-admin gc, or delete caches or paths) or give the \
                     filesystem more room"
                );
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, file = %self.path.display(), "could not release the space kept for the metadata");
                false
            }
        }
    }

    /// Writes the file when it is missing and its filesystem has room for it and
    /// `keep` more beyond (its room counts as promised meanwhile: writing it takes
    /// nothing from uploads); true if it did.
    pub fn restore_if_roomy(&self, keep: u64) -> bool {
        if self.present() {
            return false;
        }
        let roomy = free_bytes(self.dir()).is_ok_and(|free| free >= 2 * self.bytes + keep);
        if !roomy {
            return false;
        }
        match self.write() {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, file = %self.path.display(), "could not write the space kept for the metadata");
                let _ = std::fs::remove_file(&self.path);
                false
            }
        }
    }

    /// Allocates the file whole; where the filesystem cannot allocate (ZFS), writes it
    /// out with bytes that do not compress, so that a compressing filesystem keeps
    /// the room too.
    fn write(&self) -> io::Result<()> {
        use std::io::Write as _;
        let partial = self.path.with_extension("partial");
        let mut file = std::fs::File::create(&partial)?;
        let allocated =
            rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, self.bytes);
        if allocated.is_err() {
            let mut block = vec![0u8; 1 << 20];
            let mut state = 0x9e37_79b9_7f4a_7c15_u64;
            for word in block.chunks_exact_mut(8) {
                // xorshift64: not a secret, only not compressible.
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                word.copy_from_slice(&state.to_le_bytes());
            }
            let mut left = self.bytes;
            while left > 0 {
                let n = left.min(block.len() as u64) as usize;
                file.write_all(&block[..n])?;
                left -= n as u64;
            }
        }
        file.sync_all()?;
        std::fs::rename(&partial, &self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_disks_are_recognised_through_wrappers() {
        let full = io::Error::from_raw_os_error(rustix::io::Errno::NOSPC.raw_os_error());
        assert!(is_disk_full(&full));
        assert!(!is_disk_full(&io::Error::other("x")));
        let wrapped = object_store::Error::Generic {
            store: "local",
            source: Box::new(full),
        };
        assert!(chain_is_disk_full(&wrapped));
        let other = object_store::Error::Generic {
            store: "local",
            source: Box::new(io::Error::from(io::ErrorKind::PermissionDenied)),
        };
        assert!(!chain_is_disk_full(&other));
    }

    #[test]
    fn the_check_compares_with_the_free_space() {
        let dir = tempfile::tempdir().unwrap();
        let free = free_bytes(dir.path()).unwrap();
        assert!(free > 0);
        let roomy = Space::new(vec![dir.path().into()], 1, None);
        roomy.ensure().unwrap();
        let tight = Space::new(
            vec![dir.path().into()],
            free.saturating_mul(2).max(1 << 40),
            None,
        );
        let err = tight.ensure().unwrap_err();
        assert!(err.to_string().contains("storage.min_free_mib"), "{err}");
        Space::new(vec![dir.path().into()], 0, None)
            .ensure()
            .unwrap();
    }

    #[tokio::test]
    async fn reservations_together_never_pass_the_minimum() {
        let dir = tempfile::tempdir().unwrap();
        let free = free_bytes(dir.path()).unwrap();
        // Room for three writes of 1 GiB beyond the minimum, give or take what others
        // write meanwhile.
        let gib = 1u64 << 30;
        let min = free
            .checked_sub(3 * gib + gib / 2)
            .expect("the test needs 3.5 GiB free");
        let space = Space::new(vec![dir.path().into()], min, None);
        let held: Vec<_> = (0..3).map(|_| space.reserve(gib).unwrap()).collect();
        let err = space.reserve(gib).err().unwrap();
        assert_eq!(err.promised_mib, 3 * 1024);
        assert!(
            space.ensure().is_ok(),
            "half a GiB is left beyond the promises"
        );
        drop(held);
        assert_eq!(space.reserved(), 0);
        let r = space.reserve(gib).unwrap();
        r.release_after(Duration::from_millis(10));
        assert_eq!(space.reserved(), gib);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(space.reserved(), 0);
    }

    #[test]
    fn the_ballast_goes_when_the_disk_is_short_and_comes_back_with_room() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("space-reserve");
        let free = free_bytes(dir.path()).unwrap();
        let small = Ballast::new(path.clone(), 1 << 20).unwrap();
        assert!(!small.release_if_short(), "nothing to release");
        assert!(small.restore_if_roomy(0));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 20);
        assert!(!small.release_if_short(), "plenty of room");
        // A ballast of more than twice the free space stands for a full disk.
        let large = Ballast::new(path.clone(), 2 * free + (1 << 30)).unwrap();
        assert!(large.release_if_short());
        assert!(!path.exists());
        assert!(!large.restore_if_roomy(0), "no room for it");
        assert!(Ballast::new(path, 0).is_none());
    }
}
