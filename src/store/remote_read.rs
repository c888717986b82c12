//! Ranged reads of pack objects from a remote store (S3), for serving: what the cache
//! of packs does not hold, and everything when it is off.

use std::io;
use std::ops::Range;

use bytes::Bytes;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt as _};

/// Bytes `range` of the object at `path`; fewer bytes than asked is an error.
pub async fn read_range(
    objects: &dyn ObjectStore,
    path: &Path,
    range: Range<u64>,
) -> io::Result<Bytes> {
    let want = range.end.saturating_sub(range.start);
    match objects.get_range(path, range).await {
        Ok(data) if data.len() as u64 == want => Ok(data),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "pack is shorter than its records",
        )),
        // A recorded pack that is missing is damage, not an outage.
        Err(e @ object_store::Error::NotFound { .. }) => {
            Err(io::Error::new(io::ErrorKind::NotFound, e))
        }
        Err(e) => Err(io::Error::other(e)),
    }
}
