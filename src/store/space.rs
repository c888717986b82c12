//! Free space: telling a full disk from other storage failures, and refusing uploads
//! before a filesystem runs out, so that the metadata database never meets a full disk
//! in the middle of a write.

use std::io;
use std::path::{Path, PathBuf};

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
#[error("{} has {free_mib} MiB free, less than the {min_mib} MiB kept free (storage.min_free_mib)", dir.display())]
pub struct LowSpace {
    /// The directory whose filesystem is short.
    pub dir: PathBuf,
    /// What it has.
    pub free_mib: u64,
    /// What the server keeps free.
    pub min_mib: u64,
}

/// The directories uploads write to, and the space to leave free on each.
#[derive(Debug, Clone)]
pub struct SpaceCheck {
    dirs: Vec<PathBuf>,
    min_bytes: u64,
}

impl SpaceCheck {
    /// Checks `dirs` (the metadata's and the packs' directories) against `min_bytes`.
    pub fn new(dirs: Vec<PathBuf>, min_bytes: u64) -> Self {
        Self { dirs, min_bytes }
    }

    /// Refuses when a directory's filesystem has less than the minimum free. A
    /// directory that cannot be examined passes: the write itself will report it.
    pub fn ensure(&self) -> Result<(), LowSpace> {
        if self.min_bytes == 0 {
            return Ok(());
        }
        for dir in &self.dirs {
            if let Ok(free) = free_bytes(dir) {
                if free < self.min_bytes {
                    return Err(LowSpace {
                        dir: dir.clone(),
                        free_mib: free >> 20,
                        min_mib: self.min_bytes >> 20,
                    });
                }
            }
        }
        Ok(())
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
        let roomy = SpaceCheck::new(vec![dir.path().into()], 1);
        roomy.ensure().unwrap();
        let tight = SpaceCheck::new(vec![dir.path().into()], free.saturating_mul(2).max(1 << 40));
        let err = tight.ensure().unwrap_err();
        assert!(err.to_string().contains("storage.min_free_mib"), "{err}");
        SpaceCheck::new(vec![dir.path().into()], 0)
            .ensure()
            .unwrap();
    }
}
