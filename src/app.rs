//! Everything a request handler can reach, opened once at start.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;

use crate::access::Accesses;
use crate::auth::{Authorizer, Token};
use crate::budget::Budget;
use crate::caches::Caches;
use crate::config::Config;
use crate::config::IndexBackend;
use crate::coord::{Coordination, LocalCoordination, PgCoordination};
use crate::index::{Index, PgIndex, PgSettings, SledIndex};
use crate::ingest::Ingestor;
use crate::metrics::Metrics;
use crate::serve;
use crate::store::space::{free_bytes, Ballast, Space};
use crate::store::{PackCache, PackStore};

/// The server's state, shared by every request.
pub struct App {
    /// The configuration it was opened with.
    pub config: Config,
    /// The metadata.
    pub index: Arc<dyn Index>,
    /// The chunk storage.
    pub packs: PackStore,
    /// The upload pipeline.
    pub ingestor: Ingestor,
    /// Where downloads read from, and the memory they share.
    pub serve: serve::Source,
    /// The caches and their keys.
    pub caches: Caches,
    /// Who may do what.
    pub auth: Authorizer,
    /// What the server counts.
    pub metrics: Arc<Metrics>,
    /// What the server's processes agree on: leases, cache locks, the one job, change
    /// notices.
    pub coord: Arc<dyn Coordination>,
    /// Fetches noted, not yet written.
    pub accesses: Accesses,
    /// The free space uploads may take.
    pub space: Arc<Space>,
    /// What uploads in progress have stored, per cache, for the quotas.
    pub in_flight: Arc<crate::quota::InFlight>,
    /// The last readiness check, reused for a second.
    ready: tokio::sync::Mutex<Option<(std::time::Instant, Readiness)>>,
}

/// Whether the parts the server needs are usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Readiness {
    /// The metadata can be read and written.
    pub index: bool,
    /// The storage can be written, read and deleted from.
    pub storage: bool,
}

/// How long a readiness check stands: probes are writes, and anyone may ask.
const READINESS_TTL: std::time::Duration = std::time::Duration::from_secs(1);

/// How long the readiness probe waits for the storage to write, read and delete.
const READINESS_STORAGE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// What the first start created, to tell the operator.
pub struct Opened {
    /// The server's state.
    pub app: Arc<App>,
    /// The admin token, when this start made it (the first).
    pub admin_token: Option<Token>,
}

/// Creates a directory only its owner can enter: it holds keys and the admin token.
fn create_private_dir(path: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|e| anyhow::anyhow!("creating {}: {e}", path.display()))
}

/// The packs in the S3 store of `config`, read through the cache of packs unless it
/// is off.
fn remote_packs(config: &Config, errors: Counter, metrics: &Metrics) -> anyhow::Result<PackStore> {
    let packs = PackStore::new(crate::store::s3::open(&config.storage)?, errors);
    let Some(dir) = config.pack_cache_dir() else {
        return Ok(packs);
    };
    // Twice the uploads' minimum free: filling the cache never brings uploads to
    // their 507.
    let cache = PackCache::open(
        dir.clone(),
        config.storage.cache_mib * 1024 * 1024,
        2 * config.storage.min_free_mib * 1024 * 1024,
        config.ingest.pack_bytes as u64,
        metrics.pack_cache.clone(),
    )
    .map_err(|e| anyhow::anyhow!("the pack cache in {}: {e}", dir.display()))?;
    Ok(packs.with_cache(cache))
}

/// What the metadata lives in, and what the server's processes agree through.
struct Metadata {
    index: Arc<dyn Index>,
    /// The same, for the reads of downloads: from copies where the index keeps them
    /// (`index::lookups`).
    reads: Arc<dyn Index>,
    coord: Arc<dyn Coordination>,
    /// The index's directory, when it is local.
    dir: Option<PathBuf>,
}

/// The metadata database the config names: sled for one process (which coordinates
/// with itself), or PostgreSQL for replicas (which coordinate through it).
async fn open_index(config: &Config) -> anyhow::Result<Metadata> {
    match config.index.backend {
        IndexBackend::Sled => {
            let dir = config.data_dir.join("index");
            let index: Arc<dyn Index> =
                Arc::new(SledIndex::open(&dir, config.index.cache_mib * 1024 * 1024)?);
            Ok(Metadata {
                reads: index.clone(),
                index,
                coord: Arc::new(LocalCoordination::default()),
                dir: Some(dir),
            })
        }
        IndexBackend::Postgres => {
            let password = match &config.index.password_file {
                Some(f) => Some(crate::secret_file::read(f)?.trim().to_owned()),
                None => None,
            };
            let settings = PgSettings {
                url: config.index.url.clone().unwrap_or_default(),
                password,
                pool_size: config.index.pool_size,
                connect_timeout: Duration::from_secs(config.index.connect_timeout_secs),
                cache_bytes: config.index.cache_mib * 1024 * 1024,
            };
            let index = PgIndex::open(&settings).await?;
            let coord =
                PgCoordination::open(&settings, crate::coord::LEASE_TIME, index.lookups()).await?;
            Ok(Metadata {
                reads: Arc::new(index.with_copies()),
                index: Arc::new(index),
                coord: Arc::new(coord),
                dir: None,
            })
        }
    }
}

impl App {
    /// Opens the data directory, the index and the storage; creates what a first start
    /// needs (the configured caches, their keys, the admin token).
    pub async fn open(config: Config) -> anyhow::Result<Opened> {
        config.validate()?;
        create_private_dir(&config.data_dir)?;
        let explain = |e: anyhow::Error| explain_full_disk(e, &config.data_dir);
        // On a disk with too little room for the database to open, the room kept for
        // it is given back first.
        let ballast_path = config.data_dir.join("space-reserve");
        let ballast = Ballast::new(
            ballast_path.clone(),
            config.storage.reserve_mib * 1024 * 1024,
        );
        match &ballast {
            Some(b) => {
                b.release_if_short();
            }
            None => Ballast::remove_at(&ballast_path),
        }
        let Metadata {
            index,
            reads,
            coord,
            dir: index_dir,
        } = open_index(&config).await.map_err(explain)?;
        let metrics = Arc::new(Metrics::new());
        let errors = metrics.storage_errors.clone();
        let mut local_dirs: Vec<PathBuf> = index_dir.into_iter().collect();
        let packs = match config.storage_path() {
            Some(path) => {
                std::fs::create_dir_all(&path)
                    .map_err(|e| anyhow::anyhow!("creating {}: {e}", path.display()))?;
                local_dirs.push(path.clone());
                PackStore::local(path, errors)?
            }
            None => remote_packs(&config, errors, &metrics)?,
        };
        let space = Space::new(
            local_dirs,
            config.storage.min_free_mib * 1024 * 1024,
            ballast,
        );
        let ingestor = Ingestor::new(
            index.clone(),
            packs.clone(),
            crate::ingest::IngestSettings::of(&config)?,
            metrics.clone(),
            space.clone(),
        );
        // Of processes starting at once on an empty database, one makes the caches and
        // the admin token; the others find them.
        let first_start = coord.first_start().await?;
        let caches = Caches::open(index.clone(), coord.clone(), &config)
            .await
            .map_err(explain)?;
        let (auth, admin_token) = Authorizer::open(index.clone(), coord.clone(), &config.data_dir)
            .await
            .map_err(explain)?;
        drop(first_start);
        let serve = serve::Source {
            store: packs.clone(),
            index: reads,
            plan: serve::ReadPlan::of(&config.serve, config.storage.backend),
            memory: Budget::new(config.serve.memory_mib * 1024 * 1024),
        };
        let accesses = Accesses::new(metrics.access_notes_dropped.clone());
        let app = Arc::new(App {
            auth,
            config,
            index,
            packs,
            ingestor,
            serve,
            caches,
            metrics,
            coord,
            accesses,
            space,
            in_flight: Arc::default(),
            ready: tokio::sync::Mutex::new(None),
        });
        Ok(Opened { app, admin_token })
    }
}

impl App {
    /// Counts an upload to `cache` against its quota (none without one); refused when
    /// the cache is at its quota already.
    pub async fn charge(
        &self,
        cache: &crate::caches::Cache,
    ) -> crate::error::Result<Option<crate::quota::Charge>> {
        let quota = self.config.quota.of(cache.record.quota_bytes);
        Ok(self
            .in_flight
            .admit(&self.index, &cache.name, quota)
            .await?)
    }

    /// Checks the index and the storage, at most once a second: callers at once share
    /// one check, and one a moment later its result.
    pub async fn readiness(&self) -> Readiness {
        let mut last = self.ready.lock().await;
        if let Some((at, r)) = *last {
            if at.elapsed() < READINESS_TTL {
                return r;
            }
        }
        let index = match self.index.check().await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "the index is not ready");
                false
            }
        };
        // A store that is silent would hold the probe for its whole retry time.
        let probe = tokio::time::timeout(READINESS_STORAGE_WAIT, self.packs.check());
        let storage = match probe.await {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "the storage is not ready");
                false
            }
            Err(_) => {
                tracing::warn!(
                    secs = READINESS_STORAGE_WAIT.as_secs(),
                    "the storage did not answer the readiness probe in time"
                );
                false
            }
        };
        let r = Readiness { index, storage };
        *last = Some((std::time::Instant::now(), r));
        r
    }
}

/// Says so when a start failed because the data directory's filesystem is full.
fn explain_full_disk(e: anyhow::Error, data_dir: &std::path::Path) -> anyhow::Error {
    match free_bytes(data_dir) {
        Ok(free) if free < 1024 * 1024 => e.context(format!(
            "the filesystem of {} is full ({free} bytes free): free some space and start again",
            data_dir.display()
        )),
        _ => e,
    }
}
