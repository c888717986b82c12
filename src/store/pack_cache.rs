//! A read-through cache of packs on local disk, for a server in front of a remote
//! store (S3). The first read of a pack fetches the whole object with one GET into a
//! file; later reads of it are local reads, as from a local store.
//!
//! Why whole packs: a pack holds the frames of many NARs, and a closure's NARs are
//! fetched together, so one GET serves many downloads. Ranged GETs of small NARs cost
//! the store a whole block each (Garage reads and hashes 1 MiB blocks), and each is a
//! round trip (BENCHMARKS.md).
//!
//! - Bounded: the files, and the fetches under way, never hold more than the capacity,
//!   and leave the disk its minimum free; the least recently read packs make room.
//!   What cannot be cached (no room, every fetch slot taken, a local write failing) is
//!   read from the store, never refused, and the store's failures reach the reader
//!   in the same bounded time as without the cache.
//! - One fetch per pack at a time: reads of a pack being fetched wait for that fetch,
//!   which goes on when its first reader leaves (a task of its own).
//! - Emptied at start: a file renamed into place but not yet written out before a
//!   crash could read back as zeros, and packs carry no checksum the server checks
//!   while serving. A cache is cheap to refill; a wrong NAR is not. The directory is
//!   locked, so two servers never share (and empty) one.
//! - Written through by uploads: a pack an upload just stored is kept too (`keep`),
//!   since what CI pushes is what the hosts pull next, and the first of them would
//!   otherwise fetch it back. The garbage collector's rewritten packs are not: a
//!   pass over the whole store would push out what is being read.
//! - Packs are never rewritten (a pack's id is new for every pack), so a cached file
//!   never goes stale; one deleted from the store is dropped from the cache too.

use crate::metrics::CacheMetrics;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{self, Write as _};
use std::ops::Range;
use std::panic::AssertUnwindSafe;
use std::path::{Path as FsPath, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use futures::future::{BoxFuture, Shared};
use futures::{FutureExt as _, StreamExt as _};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt as _};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::manifest::PackId;
use super::{local_read, remote_read, space};

/// Fetches under way at once, each holding up to `WRITE_BYTES` in memory: reads of
/// many connections ahead of their clients each want one, and neither the memory
/// nor the store's connections may grow with them. A read that finds every slot
/// taken reads its range from the store instead of waiting.
const FETCHES_AT_ONCE: usize = 16;

/// What a fetch gathers before it writes.
const WRITE_BYTES: usize = 1 << 20;

/// The cache of packs in one directory.
pub struct PackCache {
    dir: PathBuf,
    capacity: u64,
    /// Free space the cache leaves on its filesystem.
    min_free: u64,
    /// The size most packs have: there must be room for one before a fetch starts.
    usual_pack: u64,
    state: Mutex<State>,
    slots: Arc<Semaphore>,
    metrics: CacheMetrics,
    /// Held locked while the cache is open.
    _lock: std::fs::File,
}

#[derive(Default)]
struct State {
    /// Bumped on every read: the recency of a pack.
    clock: u64,
    /// Bytes of the cached files.
    cached: u64,
    /// Bytes reserved by the fetches under way.
    reserved: u64,
    files: HashMap<PackId, File>,
    /// The files by their last read, oldest first.
    by_use: BTreeMap<u64, PackId>,
    fetches: HashMap<PackId, Fetch>,
    /// Packs deleted from the store while being fetched: not to be kept.
    forgotten: HashSet<PackId>,
}

struct File {
    size: u64,
    used: u64,
}

type Fetch = Shared<BoxFuture<'static, Fetched>>;

/// How a fetch ended, for every read that waited on it.
#[derive(Clone)]
enum Fetched {
    Cached,
    /// Not kept (no room, the local disk failed): read from the store.
    NotCached,
    Failed(Failure),
}

/// A fetch's failure, shared by its readers; each gets its own `io::Error`, which
/// says (as the store's own errors do) whether the store is unavailable or the pack
/// is gone.
#[derive(Clone)]
enum Failure {
    Missing(Arc<str>),
    Unavailable(Arc<str>),
    /// A bug (the fetch panicked): 500, like any other.
    Bug(Arc<str>),
}

impl Failure {
    fn of(e: &object_store::Error) -> Self {
        match e {
            object_store::Error::NotFound { .. } => Self::Missing(e.to_string().into()),
            _ => Self::Unavailable(e.to_string().into()),
        }
    }

    fn to_io(&self) -> io::Error {
        match self {
            Self::Missing(text) => io::Error::new(io::ErrorKind::NotFound, text.to_string()),
            Self::Unavailable(text) => io::Error::other(object_store::Error::Generic {
                store: "S3",
                source: text.to_string().into(),
            }),
            Self::Bug(text) => io::Error::other(text.to_string()),
        }
    }
}

impl PackCache {
    /// The cache in `dir` (created if missing), emptied of any earlier run's packs
    /// and partial files; nothing else in the directory is touched. `usual_pack` is
    /// the size packs are cut at.
    pub fn open(
        dir: PathBuf,
        capacity: u64,
        min_free: u64,
        usual_pack: u64,
        metrics: CacheMetrics,
    ) -> io::Result<Arc<Self>> {
        std::fs::create_dir_all(&dir)?;
        let lock = std::fs::File::create(dir.join(".lock"))?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(
            |_| {
                io::Error::new(
                    io::ErrorKind::ResourceBusy,
                    "another server is using this pack cache directory",
                )
            },
        )?;
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let ours = PackId::from_hex(&name).is_some() || name.starts_with(".partial-");
            if ours && entry.file_type()?.is_file() {
                std::fs::remove_file(entry.path())?;
            }
        }
        metrics.bytes.set(0);
        Ok(Arc::new(Self {
            dir,
            capacity,
            min_free,
            usual_pack,
            state: Mutex::default(),
            slots: Arc::new(Semaphore::new(FETCHES_AT_ONCE)),
            metrics,
            _lock: lock,
        }))
    }

    /// The state; one poisoned by a panic elsewhere is still consistent (every
    /// change to it is made whole under one lock).
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn file_path(&self, id: &PackId) -> PathBuf {
        self.dir.join(id.to_hex())
    }

    /// Bytes `range` of the pack `id` stored at `path` in `objects`; fewer bytes than
    /// asked is an error.
    pub async fn read(
        self: &Arc<Self>,
        objects: &Arc<dyn ObjectStore>,
        id: &PackId,
        path: &Path,
        range: Range<u64>,
    ) -> io::Result<Bytes> {
        if let Some(size) = self.touch(id) {
            if let Some(read) = self.read_file(id, size, range.clone()).await {
                self.metrics.hits.inc();
                return read;
            }
        }
        self.metrics.misses.inc();
        if let Some(fetch) = self.fetch(objects, id, path) {
            match fetch.await {
                Fetched::Cached => {
                    let size = self.touch(id);
                    if let Some(read) = self.read_file(id, size.unwrap_or(0), range.clone()).await {
                        return read;
                    }
                }
                Fetched::NotCached => {}
                Fetched::Failed(failure) => return Err(failure.to_io()),
            }
        }
        remote_read::read_range(objects.as_ref(), path, range).await
    }

    /// `range` of the cached file of `id`, of `size` bytes; `None` when the file is
    /// gone (evicted since) or cannot be read, which leaves the read to the store.
    async fn read_file(
        &self,
        id: &PackId,
        size: u64,
        range: Range<u64>,
    ) -> Option<io::Result<Bytes>> {
        if range.end > size {
            // Past the pack's end: damage, as the store would say.
            return (size > 0).then(|| {
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "pack is shorter than its records",
                ))
            });
        }
        match local_read::read_range(self.file_path(id), range).await {
            Ok(data) => Some(Ok(data)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e,
                    "a cached pack could not be read; reading it from the store");
                self.forget(id);
                None
            }
        }
    }

    /// Marks a cached pack read now; its size, or `None` when it is not cached.
    fn touch(&self, id: &PackId) -> Option<u64> {
        let mut state = self.state();
        let State {
            clock,
            files,
            by_use,
            ..
        } = &mut *state;
        let file = files.get_mut(id)?;
        *clock += 1;
        by_use.remove(&file.used);
        file.used = *clock;
        by_use.insert(*clock, *id);
        Some(file.size)
    }

    /// The fetch of `id` under way, or a new one; `None` when there is no room for
    /// a pack or no free slot, and the read goes to the store.
    fn fetch(
        self: &Arc<Self>,
        objects: &Arc<dyn ObjectStore>,
        id: &PackId,
        path: &Path,
    ) -> Option<Fetch> {
        let free = space::free_bytes(&self.dir).unwrap_or(0);
        let mut state = self.state();
        if let Some(fetch) = state.fetches.get(id) {
            return Some(fetch.clone());
        }
        // Fetched since the caller looked.
        if state.files.contains_key(id) {
            return Some(futures::future::ready(Fetched::Cached).boxed().shared());
        }
        if !self.could_hold(&state, free, self.usual_pack) {
            return None;
        }
        let slot = self.slots.clone().try_acquire_owned().ok()?;
        let id = *id;
        let (this, objects, path) = (self.clone(), objects.clone(), path.clone());
        let task = tokio::spawn(async move {
            let filled = AssertUnwindSafe(this.fill(objects.as_ref(), &id, &path, slot))
                .catch_unwind()
                .await
                .unwrap_or_else(|_| Err(Failure::Bug("the fetch of a pack panicked".into())));
            let mut state = this.state();
            state.fetches.remove(&id);
            let forgotten = state.forgotten.remove(&id);
            let fetched = match filled {
                Ok(Some(reservation)) if !forgotten => {
                    reservation.into_file(&mut state, id);
                    this.metrics.fetches.inc();
                    Fetched::Cached
                }
                Ok(Some(reservation)) => {
                    reservation.release(&mut state);
                    let _ = std::fs::remove_file(this.file_path(&id));
                    Fetched::NotCached
                }
                Ok(None) => Fetched::NotCached,
                Err(failure) => Fetched::Failed(failure),
            };
            this.show(&state);
            fetched
        });
        let fetch = async move {
            task.await.unwrap_or_else(|e| {
                // Cancelled: the runtime is shutting down.
                Fetched::Failed(Failure::Bug(format!("the fetch of a pack: {e}").into()))
            })
        }
        .boxed()
        .shared();
        state.fetches.insert(id, fetch.clone());
        Some(fetch)
    }

    /// Fetches the pack into its file; its reservation when kept, `None` when not.
    async fn fill(
        &self,
        objects: &dyn ObjectStore,
        id: &PackId,
        path: &Path,
        _slot: OwnedSemaphorePermit,
    ) -> Result<Option<Reservation<'_>>, Failure> {
        let got = objects.get(path).await.map_err(|e| Failure::of(&e))?;
        let size = got.meta.size;
        let Some(reservation) = self.reserve(size) else {
            return Ok(None);
        };
        let partial = self.partial();
        let written = match write_file(partial.path(), got.into_stream(), size).await {
            // A rename is a metadata update, quick enough for the async thread.
            Ok(()) => std::fs::rename(partial.path(), self.file_path(id)).map_err(Written::Local),
            Err(e) => Err(e),
        };
        match written {
            Ok(()) => {
                partial.keep();
                Ok(Some(reservation))
            }
            Err(Written::Store(failure)) => Err(failure),
            Err(Written::Local(e)) => {
                tracing::warn!(dir = %self.dir.display(), error = %e,
                    "the pack cache could not write a pack; reading it from the store");
                Ok(None)
            }
        }
    }

    /// Whether the files and fetches could make room for `size` more bytes, in the
    /// capacity and on a disk with `free` bytes free, by evicting files.
    fn could_hold(&self, state: &State, free: u64, size: u64) -> bool {
        let wanted = state.reserved + size;
        wanted <= self.capacity && free + state.cached >= self.min_free + wanted
    }

    /// Makes room for `size` more bytes, evicting the least recently read files, and
    /// reserves it; `None`, evicting nothing, when there cannot be room.
    fn reserve(&self, size: u64) -> Option<Reservation<'_>> {
        let free = space::free_bytes(&self.dir).unwrap_or(0);
        let mut state = self.state();
        if !self.could_hold(&state, free, size) {
            return None;
        }
        // What the fetches under way will still write is counted as not yet free.
        let mut freed = 0;
        while state.cached + state.reserved + size > self.capacity
            || free + freed < self.min_free + state.reserved + size
        {
            let (_, id) = state.by_use.pop_first()?;
            if let Some(file) = state.files.remove(&id) {
                state.cached -= file.size;
                freed += file.size;
                // A read that opened the file keeps reading it; one that comes
                // after finds it gone and fetches again.
                let _ = std::fs::remove_file(self.file_path(&id));
            }
        }
        state.reserved += size;
        self.show(&state);
        Some(Reservation { cache: self, size })
    }

    /// Keeps a copy of a pack just written to the store, in the background: the
    /// upload does not wait for it, and it is skipped when every slot is taken or
    /// there is no room.
    pub fn keep(self: &Arc<Self>, id: PackId, data: Bytes) {
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            return;
        };
        let this = self.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let Some(reservation) = this.reserve(data.len() as u64) else {
                return;
            };
            let partial = this.partial();
            let path = partial.path().to_owned();
            let written = tokio::task::spawn_blocking(move || std::fs::write(path, &data))
                .await
                .map_err(io::Error::other)
                .and_then(|r| r)
                .and_then(|()| std::fs::rename(partial.path(), this.file_path(&id)));
            if let Err(e) = written {
                tracing::warn!(dir = %this.dir.display(), error = %e,
                    "the pack cache could not keep an uploaded pack");
                return;
            }
            partial.keep();
            let mut state = this.state();
            reservation.into_file(&mut state, id);
            this.show(&state);
        });
    }

    /// Shows the bytes held in the metrics.
    fn show(&self, state: &State) {
        self.metrics
            .bytes
            .set((state.cached + state.reserved) as i64);
    }

    /// A new partial file in the cache's directory.
    fn partial(&self) -> Partial {
        let name = format!(".partial-{}", PackId::random().to_hex());
        Partial(Some(self.dir.join(name)))
    }

    /// Drops a pack deleted from the store.
    pub fn forget(&self, id: &PackId) {
        let mut state = self.state();
        if let Some(file) = state.files.remove(id) {
            state.by_use.remove(&file.used);
            state.cached -= file.size;
            self.show(&state);
            let _ = std::fs::remove_file(self.file_path(id));
        } else if state.fetches.contains_key(id) {
            state.forgotten.insert(*id);
        }
    }
}

/// Bytes reserved for a fetch, given back when dropped (a failed or panicked fetch)
/// unless they became a cached file.
struct Reservation<'a> {
    cache: &'a PackCache,
    size: u64,
}

impl Reservation<'_> {
    /// Gives the bytes back, under the lock the caller holds (dropping the
    /// reservation there would take it again).
    fn release(mut self, state: &mut State) {
        state.reserved -= std::mem::take(&mut self.size);
    }

    /// The pack's file, fetched or kept, becomes part of the cache. A pack read
    /// while an upload's copy of it was being written may have been fetched too:
    /// the two files were the same bytes under one name, counted once.
    fn into_file(mut self, state: &mut State, id: PackId) {
        let size = std::mem::take(&mut self.size);
        state.reserved -= size;
        if state.files.contains_key(&id) {
            return;
        }
        state.cached += size;
        state.clock += 1;
        let used = state.clock;
        state.by_use.insert(used, id);
        state.files.insert(id, File { size, used });
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if self.size > 0 {
            let mut state = self.cache.state();
            state.reserved -= self.size;
            self.cache.show(&state);
        }
    }
}

/// A partial file, deleted when dropped unless kept (renamed into place).
struct Partial(Option<PathBuf>);

impl Partial {
    fn path(&self) -> &FsPath {
        self.0.as_deref().expect("not kept yet")
    }

    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if let Some(path) = &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

enum Written {
    Store(Failure),
    Local(io::Error),
}

/// Writes the object's body to `path`, which must come to `size` bytes. The parts
/// the store sends (a few KiB each) are written in runs of `WRITE_BYTES` on the
/// blocking pool: one hand-off per part cost more CPU than the copies.
async fn write_file(
    path: &FsPath,
    mut body: futures::stream::BoxStream<'static, object_store::Result<Bytes>>,
    size: u64,
) -> Result<(), Written> {
    let mut file = std::fs::File::create(path).map_err(Written::Local)?;
    let (mut parts, mut pending, mut written) = (Vec::new(), 0usize, 0u64);
    loop {
        let part = body.next().await;
        let end = part.is_none();
        if let Some(part) = part {
            let part = part.map_err(|e| Written::Store(Failure::of(&e)))?;
            pending += part.len();
            written += part.len() as u64;
            parts.push(part);
        }
        if written > size {
            break;
        }
        if pending >= WRITE_BYTES || (end && pending > 0) {
            let run = std::mem::take(&mut parts);
            pending = 0;
            file = tokio::task::spawn_blocking(move || {
                run.iter()
                    .try_for_each(|p| file.write_all(p))
                    .map(|()| file)
            })
            .await
            .map_err(|e| Written::Local(io::Error::other(e)))?
            .map_err(Written::Local)?;
        }
        if end {
            break;
        }
    }
    if written != size {
        return Err(Written::Store(Failure::Unavailable(
            format!("the store sent {written} bytes of a {size}-byte pack").into(),
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::local::LocalFileSystem;
    use object_store::PutPayload;

    struct Fixture {
        _dirs: tempfile::TempDir,
        objects: Arc<dyn ObjectStore>,
        cache_dir: PathBuf,
        metrics: CacheMetrics,
    }

    fn fixture() -> Fixture {
        let dirs = tempfile::tempdir().unwrap();
        std::fs::create_dir(dirs.path().join("store")).unwrap();
        let objects =
            Arc::new(LocalFileSystem::new_with_prefix(dirs.path().join("store")).unwrap());
        Fixture {
            cache_dir: dirs.path().join("cache"),
            _dirs: dirs,
            objects,
            metrics: CacheMetrics::default(),
        }
    }

    impl Fixture {
        fn cache(&self, capacity: u64) -> Arc<PackCache> {
            let usual_pack = 100_000;
            PackCache::open(
                self.cache_dir.clone(),
                capacity,
                0,
                usual_pack,
                self.metrics.clone(),
            )
            .unwrap()
        }

        /// A pack of `len` bytes in the store, its bytes all derived from `seed`.
        async fn pack(&self, seed: u8, len: usize) -> (PackId, Path, Vec<u8>) {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8 ^ seed).collect();
            let id = PackId::random();
            let path = Path::from(id.to_hex());
            self.objects
                .put(&path, PutPayload::from(data.clone()))
                .await
                .unwrap();
            (id, path, data)
        }

        fn cached(&self) -> Vec<(String, u64)> {
            let mut files: Vec<_> = std::fs::read_dir(&self.cache_dir)
                .unwrap()
                .map(|e| {
                    let e = e.unwrap();
                    let name = e.file_name().to_string_lossy().into_owned();
                    (name, e.metadata().unwrap().len())
                })
                .filter(|(name, _)| name != ".lock")
                .collect();
            files.sort();
            files
        }
    }

    #[tokio::test]
    async fn a_pack_is_fetched_whole_once_then_read_from_local_disk() {
        let f = fixture();
        let cache = f.cache(1 << 20);
        let (id, path, data) = f.pack(1, 100_000).await;
        let got = cache.read(&f.objects, &id, &path, 10..5000).await.unwrap();
        assert_eq!(&got[..], &data[10..5000]);
        assert_eq!(f.cached(), vec![(id.to_hex(), 100_000)]);
        assert_eq!((f.metrics.hits.get(), f.metrics.misses.get()), (0, 1));
        assert_eq!(f.metrics.bytes.get(), 100_000);
        // Gone from the store behind the cache's back, it is still served: the
        // reads are the cache's.
        f.objects.delete(&path).await.unwrap();
        for range in [0..100_000, 99_999..100_000, 5000..5000] {
            let got = cache
                .read(&f.objects, &id, &path, range.clone())
                .await
                .unwrap();
            assert_eq!(&got[..], &data[range.start as usize..range.end as usize]);
        }
        assert_eq!((f.metrics.hits.get(), f.metrics.misses.get()), (3, 1));
        // Past the pack's end is the error a short pack is.
        let err = cache
            .read(&f.objects, &id, &path, 99_000..100_001)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn the_cache_holds_at_most_its_capacity_and_evicts_the_least_recently_read() {
        let f = fixture();
        let cache = f.cache(250_000);
        let (a, a_path, _) = f.pack(1, 100_000).await;
        let (b, b_path, _) = f.pack(2, 100_000).await;
        let (c, c_path, c_data) = f.pack(3, 100_000).await;
        cache.read(&f.objects, &a, &a_path, 0..10).await.unwrap();
        cache.read(&f.objects, &b, &b_path, 0..10).await.unwrap();
        cache.read(&f.objects, &a, &a_path, 0..10).await.unwrap();
        let got = cache
            .read(&f.objects, &c, &c_path, 0..100_000)
            .await
            .unwrap();
        assert_eq!(&got[..], &c_data[..]);
        let mut left = vec![(a.to_hex(), 100_000), (c.to_hex(), 100_000)];
        left.sort();
        assert_eq!(f.cached(), left, "b was read least recently");
        assert_eq!(f.metrics.bytes.get(), 200_000);
        // A pack larger than the whole cache is read from the store, evicting nothing.
        let (big, big_path, big_data) = f.pack(4, 300_000).await;
        let got = cache
            .read(&f.objects, &big, &big_path, 1000..300_000)
            .await
            .unwrap();
        assert_eq!(&got[..], &big_data[1000..]);
        assert_eq!(f.cached(), left);
        // b comes back, evicting a (read before c).
        cache.read(&f.objects, &b, &b_path, 0..10).await.unwrap();
        let mut left = vec![(b.to_hex(), 100_000), (c.to_hex(), 100_000)];
        left.sort();
        assert_eq!(f.cached(), left);
        // A pack deleted from the store leaves the cache.
        cache.forget(&c);
        assert_eq!(f.cached(), vec![(b.to_hex(), 100_000)]);
        assert_eq!(f.metrics.bytes.get(), 100_000);
    }

    #[tokio::test]
    async fn reads_of_a_pack_at_once_share_one_fetch() {
        let f = fixture();
        let cache = f.cache(1 << 20);
        let (id, path, data) = f.pack(5, 200_000).await;
        let reads = (0..8u64).map(|i| {
            let (cache, objects, path) = (cache.clone(), f.objects.clone(), path.clone());
            tokio::spawn(async move {
                let range = i * 20_000..(i + 1) * 20_000;
                (
                    range.clone(),
                    cache.read(&objects, &id, &path, range).await.unwrap(),
                )
            })
        });
        for read in futures::future::join_all(reads).await {
            let (range, got) = read.unwrap();
            assert_eq!(&got[..], &data[range.start as usize..range.end as usize]);
        }
        // One fetch, one file, no partial one.
        assert_eq!(f.metrics.fetches.get(), 1);
        assert_eq!(f.cached(), vec![(id.to_hex(), 200_000)]);
        assert_eq!(f.metrics.bytes.get(), 200_000);
    }

    #[tokio::test]
    async fn an_uploaded_pack_kept_is_read_without_a_fetch() {
        let f = fixture();
        let cache = f.cache(1 << 20);
        let (id, path, data) = f.pack(10, 50_000).await;
        cache.keep(id, Bytes::from(data.clone()));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !cache.state().files.contains_key(&id) {
            assert!(std::time::Instant::now() < deadline);
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        f.objects.delete(&path).await.unwrap();
        let got = cache
            .read(&f.objects, &id, &path, 100..50_000)
            .await
            .unwrap();
        assert_eq!(&got[..], &data[100..]);
        assert_eq!((f.metrics.hits.get(), f.metrics.fetches.get()), (1, 0));
        assert_eq!(f.cached(), vec![(id.to_hex(), 50_000)]);
    }

    #[tokio::test]
    async fn without_room_for_a_pack_reads_go_to_the_store() {
        let f = fixture();
        // Less than the usual pack: no fetch starts.
        let cache = f.cache(50_000);
        let (id, path, data) = f.pack(8, 40_000).await;
        let got = cache.read(&f.objects, &id, &path, 5..40_000).await.unwrap();
        assert_eq!(&got[..], &data[5..]);
        assert_eq!(f.metrics.fetches.get(), 0);
        assert_eq!(f.cached(), Vec::<(String, u64)>::new());
    }

    #[tokio::test]
    async fn a_cached_file_that_cannot_be_read_leaves_the_read_to_the_store() {
        let f = fixture();
        let cache = f.cache(1 << 20);
        let (id, path, data) = f.pack(9, 10_000).await;
        cache.read(&f.objects, &id, &path, 0..1).await.unwrap();
        // The file turned into something that cannot be read as one.
        let file = f.cache_dir.join(id.to_hex());
        std::fs::remove_file(&file).unwrap();
        std::fs::create_dir(&file).unwrap();
        let got = cache.read(&f.objects, &id, &path, 0..10_000).await.unwrap();
        assert_eq!(&got[..], &data[..]);
        assert_eq!(f.metrics.bytes.get(), 0, "forgotten");
    }

    #[tokio::test]
    async fn a_start_empties_what_an_earlier_run_left_and_nothing_else() {
        let f = fixture();
        std::fs::create_dir_all(&f.cache_dir).unwrap();
        let stale = PackId::random().to_hex();
        for name in [stale.as_str(), ".partial-0123", "README"] {
            std::fs::write(f.cache_dir.join(name), b"x").unwrap();
        }
        let cache = f.cache(1 << 20);
        assert_eq!(f.cached(), vec![("README".to_owned(), 1)]);
        // A second server cannot take the directory while the first has it.
        let err = PackCache::open(f.cache_dir.clone(), 1, 0, 1, Default::default())
            .err()
            .unwrap();
        assert_eq!(err.kind(), io::ErrorKind::ResourceBusy);
        drop(cache);
        f.cache(1 << 20);
    }

    #[tokio::test]
    async fn a_missing_pack_is_damage_and_an_unreachable_store_is_an_outage() {
        let f = fixture();
        let cache = f.cache(1 << 20);
        let id = PackId::random();
        let path = Path::from(id.to_hex());
        let status = |e: io::Error| crate::http::error::status(&crate::error::Error::Read(e));
        let err = cache.read(&f.objects, &id, &path, 0..1).await.unwrap_err();
        assert_eq!(status(err), 500);
        assert_eq!(f.cached(), Vec::<(String, u64)>::new());
        // Nothing listens on port 9 of loopback.
        let unreachable = crate::store::s3::open(&crate::config::StorageConfig {
            backend: crate::config::StorageBackend::S3,
            bucket: Some("b".into()),
            endpoint: Some("http://127.0.0.1:9".into()),
            region: Some("r".into()),
            allow_http: true,
            access_key_id: Some("k".into()),
            secret_access_key: Some(crate::config::Secret("s".into())),
            request_timeout_secs: 1,
            retry_timeout_secs: 0,
            ..Default::default()
        })
        .unwrap();
        let err = cache
            .read(&unreachable, &id, &path, 0..1)
            .await
            .unwrap_err();
        assert_eq!(status(err), 503);
        // Neither failure is remembered: the pack, once there, is read.
        let (id, path, data) = f.pack(7, 10).await;
        let _ = cache
            .read(&unreachable, &id, &path, 0..1)
            .await
            .unwrap_err();
        let got = cache.read(&f.objects, &id, &path, 0..10).await.unwrap();
        assert_eq!(&got[..], &data[..]);
        assert_eq!(f.metrics.bytes.get(), 10);
    }
}
