//! The `Index` on PostgreSQL, for several servers over one database: a pool of
//! connections (`deadpool-postgres` over `tokio-postgres`), the schema in migrations
//! embedded in the binary and applied at start under an advisory lock (servers starting
//! at once migrate once), every commit point one transaction, and each query prepared
//! once per connection, so that a lookup is one round trip.
//!
//! Records that the embedded index keeps in its own binary layout (NARs, uploads,
//! manifests' segments, where logs are stored) keep that layout here too (`codec`), in
//! `BYTEA` columns; what is searched or summed is in columns of its own.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{NoTls, Row};

use super::codec;
use super::lookups::{self, Lookups};
use super::{
    BlobKey, BlobKind, CacheRecord, CacheStats, Commit, Index, IndexError, NarInfoRecord,
    NarRecord, PinRecord, Result, TokenRecord, Upload,
};
use crate::nix::{CacheName, NarUrl, Sha256, StorePathHash};
use crate::store::{ChunkId, ChunkRef, Manifest, ManifestId, Stored};

/// The migrations, in order; the schema's version is how many have been applied.
const MIGRATIONS: &[&str] = &[
    include_str!("postgres/0001_init.sql"),
    include_str!("postgres/0002_coordination.sql"),
];

/// The advisory lock held while migrating (any fixed number, the same in every build).
const MIGRATION_LOCK: i64 = 0x6361_6368_6574_0001;

/// How to reach the database.
#[derive(Debug, Clone)]
pub struct PgSettings {
    /// `postgres://user@host:port/database` (a password in it, or in `password`).
    pub url: String,
    /// The password, read from a file the way a secrets manager delivers it.
    pub password: Option<String>,
    /// Connections kept at most.
    pub pool_size: usize,
    /// How long to wait for a connection to be made, or for a free one.
    pub connect_timeout: Duration,
    /// The most bytes kept of hot lookups (`Lookups`), used once a coordination session
    /// hears the changes, and by a view `with_copies` only.
    pub cache_bytes: u64,
}

/// Metadata in PostgreSQL.
#[derive(Clone)]
pub struct PgIndex {
    pool: Pool,
    lookups: Arc<Lookups>,
    notices: Arc<Notices>,
    /// Whether reads are answered from `lookups` (`with_copies`).
    copies: bool,
}

/// The channel of the notices of changed narinfos and NAR records
/// (`index::lookups`), which every coordination session listens to.
pub(crate) const LOOKUPS_CHANNEL: &str = "cachet_lookups";

/// A notice carries at most 8,000 bytes.
const NOTICE_BYTES: usize = 7_900;
/// How long the changes after a first one are gathered into its notice.
const GATHER: Duration = Duration::from_millis(5);

/// The notices of this process's changes, sent after their commits by a task of their
/// own, as many to a `NOTIFY` as fit: a request does not wait for them, and a commit is
/// not one with a `NOTIFY` (those take turns at one lock for the whole database).
struct Notices {
    queue: Arc<Outbox>,
    /// The sending task, stopped with the index.
    sender: tokio::task::AbortHandle,
}

#[derive(Default)]
struct Outbox {
    notices: std::sync::Mutex<Vec<String>>,
    wake: tokio::sync::Notify,
}

impl Notices {
    fn start(pool: Pool, origin: String) -> Arc<Self> {
        let queue = Arc::new(Outbox::default());
        let sender = tokio::spawn(send_notices(pool, queue.clone(), origin)).abort_handle();
        Arc::new(Self { queue, sender })
    }

    fn send(&self, notice: String) {
        self.queue
            .notices
            .lock()
            .expect("never poisoned")
            .push(notice);
        // Remembered if the task is busy sending: it looks again when done.
        self.queue.wake.notify_one();
    }
}

impl Drop for Notices {
    fn drop(&mut self) {
        self.sender.abort();
    }
}

/// Sends what is in the outbox whenever there is some. A notice that cannot be sent
/// (three tries, a second apart) is dropped: every session that was cut off with this
/// one drops its copies anyway, and the others drop theirs at the next barrier or
/// periodic clear.
async fn send_notices(pool: Pool, outbox: Arc<Outbox>, origin: String) {
    loop {
        outbox.wake.notified().await;
        // The changes of the next few milliseconds go in the same notice: a push
        // makes two a path.
        tokio::time::sleep(GATHER).await;
        let taken = std::mem::take(&mut *outbox.notices.lock().expect("never poisoned"));
        for payload in packed(&origin, taken) {
            for attempt in 0..3 {
                let sent = async {
                    let c = pool.get().await.map_err(pool_error)?;
                    c.execute("SELECT pg_notify($1, $2)", &[&LOOKUPS_CHANNEL, &payload])
                        .await
                        .map_err(db)
                };
                match sent.await {
                    Ok(_) => break,
                    Err(e) if attempt == 2 => {
                        tracing::warn!(error = %e, "a notice of changed lookups was not sent")
                    }
                    Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
                }
            }
        }
    }
}

/// Notices joined a line each into as few payloads as fit, each after the line of
/// their `origin`.
fn packed(origin: &str, notices: Vec<String>) -> Vec<String> {
    let mut payloads: Vec<String> = Vec::new();
    for n in notices {
        match payloads.last_mut() {
            Some(p) if p.len() + 1 + n.len() <= NOTICE_BYTES => {}
            _ => payloads.push(origin.to_owned()),
        }
        let p = payloads.last_mut().expect("pushed above");
        p.push('\n');
        p.push_str(&n);
    }
    payloads
}

/// An error of the database or of reaching it, named by what it means to a client.
pub(crate) fn db(e: tokio_postgres::Error) -> IndexError {
    if let Some(state) = e.code() {
        // The server's own words ("db error" alone says nothing).
        let said = e
            .as_db_error()
            .map_or_else(|| e.to_string(), |d| d.to_string());
        if *state == SqlState::DISK_FULL {
            return IndexError::DiskFull(said);
        }
        let class = &state.code()[..2];
        // Connection exceptions, insufficient resources, operator intervention (a
        // shutdown or a restart), a transaction that lost a deadlock or a
        // serialisation, and a read-only server (a connection to a primary demoted by
        // a failover): a retry may succeed.
        if matches!(class, "08" | "53" | "57" | "40")
            || *state == SqlState::READ_ONLY_SQL_TRANSACTION
        {
            return IndexError::Unavailable(said);
        }
        return IndexError::Failed(said);
    }
    // No SQL state: the connection failed or closed (unavailable), or this side
    // could not encode or decode a value (a bug).
    let io = std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>());
    let text = e.to_string();
    let connection = [
        "error connecting",
        "connection closed",
        "error communicating",
        "timeout",
    ];
    if e.is_closed() || io || connection.iter().any(|c| text.starts_with(c)) {
        IndexError::Unavailable(text)
    } else {
        IndexError::Failed(text)
    }
}

/// The NAR record in the first column of `row`, the record of `nar_hash`.
fn nar_of(b: &[u8], nar_hash: &Sha256) -> Result<NarRecord> {
    codec::decode_nar(b).ok_or_else(|| IndexError::Corrupt {
        record: "NAR",
        key: nar_hash.to_string(),
    })
}

fn pool_error(e: deadpool_postgres::PoolError) -> IndexError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => db(e),
        e => IndexError::Unavailable(format!("metadata database connections: {e}")),
    }
}

/// A count or a size as the database's BIGINT (saturating: none comes near).
pub(crate) fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn uint(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn kind_number(kind: BlobKind) -> i16 {
    match kind {
        BlobKind::Log => 0,
        BlobKind::Realisation => 1,
    }
}

fn kind_of(n: i16) -> Option<BlobKind> {
    match n {
        0 => Some(BlobKind::Log),
        1 => Some(BlobKind::Realisation),
        _ => None,
    }
}

fn stats_of(row: &Row) -> CacheStats {
    CacheStats {
        paths: uint(row.get(0)),
        nar_bytes: uint(row.get(1)),
        stored_bytes: uint(row.get(2)),
        pending_bytes: uint(row.get(3)),
        blob_bytes: uint(row.get(4)),
    }
}

fn path_of(bytes: &[u8], record: &'static str) -> Result<StorePathHash> {
    let raw: [u8; 20] = bytes
        .try_into()
        .map_err(|_| IndexError::corrupt(record, bytes))?;
    Ok(StorePathHash::from_bytes(raw))
}

fn sha_of(bytes: &[u8], record: &'static str) -> Result<Sha256> {
    let raw: [u8; 32] = bytes
        .try_into()
        .map_err(|_| IndexError::corrupt(record, bytes))?;
    Ok(Sha256::from_bytes(raw))
}

/// A chunk's record from a row of its id and location.
fn chunk_of(row: &Row) -> Result<ChunkRef> {
    let (id, location): (&[u8], &[u8]) = (row.get(0), row.get(1));
    let raw: [u8; 32] = id
        .try_into()
        .map_err(|_| IndexError::corrupt("chunk", id))?;
    ChunkRef::decode_location(ChunkId(raw), location)
        .ok_or_else(|| IndexError::corrupt("chunk", id))
}

fn narinfo_of(row: &Row, cache: &CacheName, path: &StorePathHash) -> Result<NarInfoRecord> {
    let hash: &[u8] = row.get("nar_hash");
    let text: Vec<u8> = row.get("text");
    Ok(NarInfoRecord {
        nar_hash: sha_of(hash, "narinfo").map_err(|_| IndexError::corrupt_narinfo(cache, path))?,
        nar_size: uint(row.get("nar_size")),
        file_size: uint(row.get("file_size")),
        text: Bytes::from(text),
    })
}

/// Adds `delta` to a cache's counts, inside `tx`.
async fn add_stats(
    tx: &deadpool_postgres::Transaction<'_>,
    cache: &CacheName,
    delta: [i64; 5],
) -> Result<()> {
    let stmt = tx
        .prepare_cached(
            "INSERT INTO cache_stats AS s \
                 (cache, paths, nar_bytes, stored_bytes, pending_bytes, blob_bytes) \
             VALUES ($1, GREATEST($2::bigint, 0), GREATEST($3::bigint, 0), \
                     GREATEST($4::bigint, 0), GREATEST($5::bigint, 0), GREATEST($6::bigint, 0)) \
             ON CONFLICT (cache) DO UPDATE SET \
                 paths = GREATEST(s.paths + $2, 0), \
                 nar_bytes = GREATEST(s.nar_bytes + $3, 0), \
                 stored_bytes = GREATEST(s.stored_bytes + $4, 0), \
                 pending_bytes = GREATEST(s.pending_bytes + $5, 0), \
                 blob_bytes = GREATEST(s.blob_bytes + $6, 0)",
        )
        .await
        .map_err(db)?;
    let [paths, nar, stored, pending, blobs] = delta;
    tx.execute(
        &stmt,
        &[&cache.as_str(), &paths, &nar, &stored, &pending, &blobs],
    )
    .await
    .map_err(db)?;
    Ok(())
}

/// Serialises, until `tx` ends, the transactions that read and replace the record
/// under `key` (an upload, a log): `SELECT … FOR UPDATE` locks no row that does not
/// exist yet, so two first writes of one key would both count it.
async fn lock_record(tx: &deadpool_postgres::Transaction<'_>, key: &[&[u8]]) -> Result<()> {
    let mut hasher = blake3::Hasher::new();
    for part in key {
        hasher.update(&(part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    let digest = hasher.finalize();
    let n = i64::from_le_bytes(digest.as_bytes()[..8].try_into().expect("8 bytes"));
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&n])
        .await
        .map_err(db)?;
    Ok(())
}

/// What an unclaimed upload counts as pending.
fn pending_of(u: &Upload) -> i64 {
    if u.claimed {
        0
    } else {
        int(u.stored_size)
    }
}

/// How to connect to the database of `settings`, naming the connection `application`
/// (as `pg_stat_activity` shows it).
pub(crate) fn connection_config(
    settings: &PgSettings,
    application: &str,
) -> anyhow::Result<tokio_postgres::Config> {
    let mut config: tokio_postgres::Config = settings
        .url
        .parse()
        .map_err(|e| anyhow::anyhow!("index.url: {e}"))?;
    if let Some(p) = &settings.password {
        config.password(p.as_str());
    }
    config.connect_timeout(settings.connect_timeout);
    // A connection whose peer went away without a word (a host that died, a network
    // cut) breaks within seconds instead of the system's minutes: the coordination's
    // session must notice, so that its locks and lease go with it.
    config.keepalives(true);
    config.keepalives_idle(Duration::from_secs(5));
    config.keepalives_interval(Duration::from_secs(2));
    config.keepalives_retries(3);
    config.tcp_user_timeout(Duration::from_secs(10));
    config.application_name(application);
    Ok(config)
}

impl PgIndex {
    /// Connects, and brings the schema to this build's version.
    pub async fn open(settings: &PgSettings) -> anyhow::Result<Self> {
        let manager = Manager::from_config(
            connection_config(settings, "cachet")?,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(settings.pool_size)
            .wait_timeout(Some(settings.connect_timeout))
            .create_timeout(Some(settings.connect_timeout))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| anyhow::anyhow!("the metadata database's pool: {e}"))?;
        let lookups = Arc::new(Lookups::new(settings.cache_bytes));
        let index = Self {
            notices: Notices::start(pool.clone(), lookups.origin().to_owned()),
            pool,
            lookups,
            copies: false,
        };
        index
            .migrate()
            .await
            .map_err(|e| anyhow::anyhow!("preparing the metadata database: {e}"))?;
        Ok(index)
    }

    /// The copies of hot lookups, for the coordination session to keep current: unused
    /// until it does.
    pub fn lookups(&self) -> Arc<Lookups> {
        self.lookups.clone()
    }

    /// The same index, its reads of narinfos, NAR records and segments answered from
    /// the copies when they are usable: for downloads, not for what checks or changes
    /// the metadata (a copy may lag a change through another process by a notice).
    pub fn with_copies(&self) -> Self {
        Self {
            copies: true,
            ..self.clone()
        }
    }

    fn narinfo_changed(&self, cache: &CacheName, path: &StorePathHash, nar_hash: &Sha256) {
        self.lookups.narinfo_changed(cache, path, nar_hash);
        self.notices
            .send(lookups::narinfo_notice(cache, path, nar_hash));
    }

    fn nar_changed(&self, nar_hash: &Sha256) {
        self.lookups.nar_changed(nar_hash);
        self.notices.send(lookups::nar_notice(nar_hash));
    }

    /// Applies the migrations not applied yet, under an advisory lock: servers that
    /// start at once wait for the first, then find nothing to do.
    async fn migrate(&self) -> Result<()> {
        let mut c = self.client().await?;
        c.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(db)?;
        let done = async {
            c.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
                .await
                .map_err(db)?;
            let applied: i64 = c
                .query_one("SELECT count(*) FROM schema_version", &[])
                .await
                .map_err(db)?
                .get(0);
            let applied = usize::try_from(applied).unwrap_or(0);
            if applied > MIGRATIONS.len() {
                return Err(IndexError::Failed(format!(
                    "the database's schema is version {applied}; this build knows {} \
                     (use the build that wrote it)",
                    MIGRATIONS.len()
                )));
            }
            for (n, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
                let tx = c.transaction().await.map_err(db)?;
                tx.batch_execute(sql).await.map_err(db)?;
                let version = i32::try_from(n + 1).expect("few migrations");
                tx.execute("INSERT INTO schema_version VALUES ($1)", &[&version])
                    .await
                    .map_err(db)?;
                tx.commit().await.map_err(db)?;
                tracing::info!(version, "migrated the metadata database");
            }
            Ok(())
        }
        .await;
        c.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(db)?;
        done
    }

    async fn client(&self) -> Result<deadpool_postgres::Client> {
        self.pool.get().await.map_err(pool_error)
    }

    /// The rows of `sql` (prepared once per connection).
    async fn rows(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
        let c = self.client().await?;
        let stmt = c.prepare_cached(sql).await.map_err(db)?;
        c.query(&stmt, params).await.map_err(db)
    }

    /// The row of `sql`, if any.
    async fn row(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Option<Row>> {
        let c = self.client().await?;
        let stmt = c.prepare_cached(sql).await.map_err(db)?;
        c.query_opt(&stmt, params).await.map_err(db)
    }

    /// Runs `sql`; how many rows it changed.
    async fn exec(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64> {
        let c = self.client().await?;
        let stmt = c.prepare_cached(sql).await.map_err(db)?;
        c.execute(&stmt, params).await.map_err(db)
    }
}

#[async_trait::async_trait]
impl Index for PgIndex {
    async fn caches(&self) -> Result<Vec<CacheRecord>> {
        let rows = self
            .rows("SELECT name, record FROM caches ORDER BY name", &[])
            .await?;
        rows.iter()
            .map(|r| {
                let (name, text): (&str, &str) = (r.get(0), r.get(1));
                serde_json::from_str(text)
                    .map_err(|_| IndexError::corrupt("cache", name.as_bytes()))
            })
            .collect()
    }

    async fn put_cache(&self, record: &CacheRecord) -> Result<()> {
        let text = serde_json::to_string(record).expect("a cache record always serialises");
        self.exec(
            "INSERT INTO caches (name, record) VALUES ($1, $2) \
             ON CONFLICT (name) DO UPDATE SET record = EXCLUDED.record",
            &[&record.name.as_str(), &text],
        )
        .await?;
        Ok(())
    }

    async fn delete_cache(&self, cache: &CacheName) -> Result<()> {
        // The record goes first: from then on the cache is not served, and what is
        // left of it if this is interrupted is purged before the name is used again.
        self.exec("DELETE FROM caches WHERE name = $1", &[&cache.as_str()])
            .await?;
        self.purge_cache(cache).await
    }

    async fn purge_cache(&self, cache: &CacheName) -> Result<()> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(db)?;
        for table in [
            "narinfos",
            "refs",
            "uploads",
            "blobs",
            "accesses",
            "pins",
            "cache_stats",
        ] {
            tx.execute(
                &format!("DELETE FROM {table} WHERE cache = $1"),
                &[&cache.as_str()],
            )
            .await
            .map_err(db)?;
        }
        let committed = tx.commit().await.map_err(db);
        self.lookups.clear();
        self.notices.send(lookups::ALL_CHANGED.into());
        committed
    }

    async fn tokens(&self) -> Result<Vec<TokenRecord>> {
        let rows = self.rows("SELECT hash, record FROM tokens", &[]).await?;
        rows.iter()
            .map(|r| {
                let (hash, text): (&[u8], &str) = (r.get(0), r.get(1));
                serde_json::from_str(text).map_err(|_| IndexError::corrupt("token", hash))
            })
            .collect()
    }

    async fn put_token(&self, token: &TokenRecord) -> Result<()> {
        let text = serde_json::to_string(token).expect("a token record always serialises");
        self.exec(
            "INSERT INTO tokens (hash, record) VALUES ($1, $2) \
             ON CONFLICT (hash) DO UPDATE SET record = EXCLUDED.record",
            &[&token.hash.as_bytes().as_slice(), &text],
        )
        .await?;
        Ok(())
    }

    async fn cache_stats(&self, cache: &CacheName) -> Result<CacheStats> {
        let row = self
            .row(
                "SELECT paths, nar_bytes, stored_bytes, pending_bytes, blob_bytes \
                 FROM cache_stats WHERE cache = $1",
                &[&cache.as_str()],
            )
            .await?;
        Ok(row.as_ref().map(stats_of).unwrap_or_default())
    }

    async fn chunks(&self, ids: &[ChunkId]) -> Result<Vec<Option<ChunkRef>>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<&[u8]> = ids.iter().map(|id| id.0.as_slice()).collect();
        // Planned for each batch, not prepared: a prepared statement's generic plan,
        // made while the table was small, scans it whole for good (measured: 0.67 ms a
        // batch of 8 over 8,000 chunks, against microseconds through the key).
        let c = self.client().await?;
        let rows = c
            .query_typed(
                "SELECT id, location FROM chunks WHERE id = ANY($1)",
                &[(&keys, Type::BYTEA_ARRAY)],
            )
            .await
            .map_err(db)?;
        let mut found = std::collections::HashMap::with_capacity(rows.len());
        for r in &rows {
            let c = chunk_of(r)?;
            found.insert(c.id, c);
        }
        Ok(ids.iter().map(|id| found.get(id).copied()).collect())
    }

    async fn put_chunks(&self, chunks: &[ChunkRef]) -> Result<()> {
        if chunks.is_empty() {
            return Ok(());
        }
        // In id order, as every writer of chunks goes (no two lock rows in opposite
        // orders), and one record per id, the last (as the embedded index keeps it):
        // an upsert cannot change one row twice.
        let mut by_id: std::collections::BTreeMap<ChunkId, ChunkRef> = Default::default();
        by_id.extend(chunks.iter().map(|c| (c.id, *c)));
        let chunks: Vec<ChunkRef> = by_id.into_values().collect();
        let ids: Vec<&[u8]> = chunks.iter().map(|c| c.id.0.as_slice()).collect();
        let locations: Vec<Vec<u8>> = chunks
            .iter()
            .map(|c| c.encode_location().to_vec())
            .collect();
        self.exec(
            "INSERT INTO chunks (id, location) \
             SELECT * FROM unnest($1::bytea[], $2::bytea[]) \
             ON CONFLICT (id) DO UPDATE SET location = EXCLUDED.location",
            &[&ids, &locations],
        )
        .await?;
        Ok(())
    }

    async fn segment(&self, id: &ManifestId, index: u32) -> Result<Option<Manifest>> {
        let read = async {
            let idx = i32::try_from(index).unwrap_or(i32::MAX);
            let row = self
                .row(
                    "SELECT chunks FROM segments WHERE manifest = $1 AND idx = $2",
                    &[&id.0.as_slice(), &idx],
                )
                .await?;
            row.map(|r| {
                let b: &[u8] = r.get(0);
                Manifest::decode(b).ok_or_else(|| IndexError::corrupt("segment", &id.0))
            })
            .transpose()
        };
        if !self.copies {
            return read.await;
        }
        self.lookups.segment(id, index, read).await
    }

    async fn put_segment(&self, id: &ManifestId, index: u32, chunks: &Manifest) -> Result<()> {
        let index = i32::try_from(index).unwrap_or(i32::MAX);
        self.exec(
            "INSERT INTO segments (manifest, idx, chunks) VALUES ($1, $2, $3) \
             ON CONFLICT (manifest, idx) DO UPDATE SET chunks = EXCLUDED.chunks",
            &[&id.0.as_slice(), &index, &chunks.encode()],
        )
        .await?;
        Ok(())
    }

    async fn nar(&self, nar_hash: &Sha256) -> Result<Option<NarRecord>> {
        let read = async {
            let row = self
                .row(
                    "SELECT record FROM nars WHERE hash = $1",
                    &[&nar_hash.as_bytes().as_slice()],
                )
                .await?;
            row.map(|r| nar_of(r.get(0), nar_hash)).transpose()
        };
        if !self.copies {
            return read.await;
        }
        self.lookups.nar(nar_hash, read).await
    }

    async fn put_nar(&self, nar_hash: &Sha256, nar: &NarRecord) -> Result<()> {
        let written = self
            .exec(
                "INSERT INTO nars (hash, record) VALUES ($1, $2) \
                 ON CONFLICT (hash) DO UPDATE SET record = EXCLUDED.record",
                &[&nar_hash.as_bytes().as_slice(), &codec::encode_nar(nar)],
            )
            .await;
        self.nar_changed(nar_hash);
        written.map(drop)
    }

    async fn upload(&self, cache: &CacheName, url: &NarUrl) -> Result<Option<Upload>> {
        let url = url.to_string();
        let row = self
            .row(
                "SELECT record FROM uploads WHERE cache = $1 AND url = $2",
                &[&cache.as_str(), &url],
            )
            .await?;
        row.map(|r| {
            let b: &[u8] = r.get(0);
            codec::decode_upload(b).ok_or_else(|| IndexError::corrupt("upload", url.as_bytes()))
        })
        .transpose()
    }

    async fn put_upload(
        &self,
        cache: &CacheName,
        url: &NarUrl,
        upload: &Upload,
        nar: &NarRecord,
    ) -> Result<()> {
        let url = url.to_string();
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(db)?;
        let put_nar = tx
            .prepare_cached(
                "INSERT INTO nars (hash, record) VALUES ($1, $2) \
                 ON CONFLICT (hash) DO UPDATE SET record = EXCLUDED.record",
            )
            .await
            .map_err(db)?;
        tx.execute(
            &put_nar,
            &[
                &upload.nar_hash.as_bytes().as_slice(),
                &codec::encode_nar(nar),
            ],
        )
        .await
        .map_err(db)?;
        // The record it replaces, locked until the commit.
        lock_record(&tx, &[b"upload", cache.as_str().as_bytes(), url.as_bytes()]).await?;
        let old = tx
            .query_opt(
                "SELECT record FROM uploads WHERE cache = $1 AND url = $2 FOR UPDATE",
                &[&cache.as_str(), &url],
            )
            .await
            .map_err(db)?;
        let old = match old {
            Some(r) => Some(
                codec::decode_upload(r.get(0))
                    .ok_or_else(|| IndexError::corrupt("upload", url.as_bytes()))?,
            ),
            None => None,
        };
        tx.execute(
            "INSERT INTO uploads (cache, url, record) VALUES ($1, $2, $3) \
             ON CONFLICT (cache, url) DO UPDATE SET record = EXCLUDED.record",
            &[&cache.as_str(), &url, &codec::encode_upload(upload)],
        )
        .await
        .map_err(db)?;
        let pending = pending_of(upload) - old.as_ref().map_or(0, pending_of);
        add_stats(&tx, cache, [0, 0, 0, pending, 0]).await?;
        let committed = tx.commit().await.map_err(db);
        self.nar_changed(&upload.nar_hash);
        committed
    }

    async fn narinfo(
        &self,
        cache: &CacheName,
        path: &StorePathHash,
    ) -> Result<Option<NarInfoRecord>> {
        let read = async {
            let row = self
                .row(
                    "SELECT nar_hash, nar_size, file_size, text FROM narinfos \
                     WHERE cache = $1 AND path = $2",
                    &[&cache.as_str(), &path.as_bytes().as_slice()],
                )
                .await?;
            row.map(|r| narinfo_of(&r, cache, path)).transpose()
        };
        if !self.copies {
            return read.await;
        }
        self.lookups.narinfo(cache, path, read).await
    }

    async fn commit_narinfo(
        &self,
        cache: &CacheName,
        path: &StorePathHash,
        record: &NarInfoRecord,
        references: &[StorePathHash],
        upload: Option<&NarUrl>,
    ) -> Result<Commit> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(db)?;
        let insert = tx
            .prepare_cached(
                "INSERT INTO narinfos (cache, path, nar_hash, nar_size, file_size, text) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (cache, path) DO NOTHING",
            )
            .await
            .map_err(db)?;
        let path_key = path.as_bytes().as_slice();
        // The first commit of the path writes it; a later one finds it. One deleted
        // between the two steps (retention, a path deletion) is written again.
        let (written, kept) = loop {
            let inserted = tx
                .execute(
                    &insert,
                    &[
                        &cache.as_str(),
                        &path_key,
                        &record.nar_hash.as_bytes().as_slice(),
                        &int(record.nar_size),
                        &int(record.file_size),
                        &record.text.as_ref(),
                    ],
                )
                .await
                .map_err(db)?;
            if inserted == 1 {
                break (true, record.nar_hash);
            }
            let row = tx
                .query_opt(
                    "SELECT nar_hash FROM narinfos WHERE cache = $1 AND path = $2",
                    &[&cache.as_str(), &path_key],
                )
                .await
                .map_err(db)?;
            if let Some(row) = row {
                let kept = sha_of(row.get(0), "narinfo")
                    .map_err(|_| IndexError::corrupt_narinfo(cache, path))?;
                break (false, kept);
            }
        };
        let mut delta = [0i64; 5];
        // The upload the narinfo takes up stops counting as pending.
        if let Some(url) = upload {
            let url = url.to_string();
            let row = tx
                .query_opt(
                    "SELECT record FROM uploads WHERE cache = $1 AND url = $2 FOR UPDATE",
                    &[&cache.as_str(), &url],
                )
                .await
                .map_err(db)?;
            if let Some(row) = row {
                let mut u = codec::decode_upload(row.get(0))
                    .ok_or_else(|| IndexError::corrupt("upload", url.as_bytes()))?;
                if !u.claimed && u.nar_hash == kept {
                    u.claimed = true;
                    delta[3] -= int(u.stored_size);
                    tx.execute(
                        "UPDATE uploads SET record = $3 WHERE cache = $1 AND url = $2",
                        &[&cache.as_str(), &url, &codec::encode_upload(&u)],
                    )
                    .await
                    .map_err(db)?;
                }
            }
        }
        if written {
            delta[0] = 1;
            delta[1] = int(record.nar_size);
            delta[2] = int(record.file_size);
            let referenced: Vec<&[u8]> = references
                .iter()
                .filter(|r| *r != path)
                .map(|r| r.as_bytes().as_slice())
                .collect();
            if !referenced.is_empty() {
                let refs = tx
                    .prepare_cached(
                        "INSERT INTO refs (cache, referenced, referrer) \
                         SELECT $1, r, $3 FROM unnest($2::bytea[]) AS r ON CONFLICT DO NOTHING",
                    )
                    .await
                    .map_err(db)?;
                tx.execute(&refs, &[&cache.as_str(), &referenced, &path_key])
                    .await
                    .map_err(db)?;
            }
        }
        if delta != [0; 5] {
            add_stats(&tx, cache, delta).await?;
        }
        let committed = tx.commit().await.map_err(db);
        // Also when the path was there: a copy of it as a miss is stale.
        self.narinfo_changed(cache, path, &kept);
        committed?;
        Ok(if written {
            Commit::Written
        } else {
            Commit::Exists { nar_hash: kept }
        })
    }

    async fn referrers(
        &self,
        cache: &CacheName,
        path: &StorePathHash,
    ) -> Result<Vec<StorePathHash>> {
        let rows = self
            .rows(
                "SELECT referrer FROM refs WHERE cache = $1 AND referenced = $2 \
                 ORDER BY referrer",
                &[&cache.as_str(), &path.as_bytes().as_slice()],
            )
            .await?;
        rows.iter()
            .map(|r| path_of(r.get(0), "reference"))
            .collect()
    }

    async fn narinfos(
        &self,
        cache: &CacheName,
        after: Option<&StorePathHash>,
        limit: usize,
    ) -> Result<Vec<(StorePathHash, NarInfoRecord)>> {
        let after: &[u8] = after.map_or(&[], |a| a.as_bytes().as_slice());
        let rows = self
            .rows(
                "SELECT path, nar_hash, nar_size, file_size, text FROM narinfos \
                 WHERE cache = $1 AND path > $2 ORDER BY path LIMIT $3",
                &[&cache.as_str(), &after, &int(limit as u64)],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let path = path_of(r.get(0), "narinfo")?;
                Ok((path, narinfo_of(r, cache, &path)?))
            })
            .collect()
    }

    async fn replace_narinfo(
        &self,
        cache: &CacheName,
        path: &StorePathHash,
        expected: &[u8],
        text: &[u8],
        file_size: Option<u64>,
    ) -> Result<bool> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(db)?;
        let path_key = path.as_bytes().as_slice();
        let row = tx
            .query_opt(
                "SELECT file_size, nar_hash FROM narinfos \
                 WHERE cache = $1 AND path = $2 AND text = $3 FOR UPDATE",
                &[&cache.as_str(), &path_key, &expected],
            )
            .await
            .map_err(db)?;
        let Some(row) = row else {
            return Ok(false);
        };
        let old_size = uint(row.get(0));
        let nar_hash = sha_of(row.get(1), "narinfo")?;
        let size = file_size.unwrap_or(old_size);
        tx.execute(
            "UPDATE narinfos SET text = $3, file_size = $4 WHERE cache = $1 AND path = $2",
            &[&cache.as_str(), &path_key, &text, &int(size)],
        )
        .await
        .map_err(db)?;
        if size != old_size {
            add_stats(&tx, cache, [0, 0, int(size) - int(old_size), 0, 0]).await?;
        }
        let committed = tx.commit().await.map_err(db);
        self.narinfo_changed(cache, path, &nar_hash);
        committed.map(|()| true)
    }

    async fn delete_narinfo(
        &self,
        cache: &CacheName,
        path: &StorePathHash,
        references: &[StorePathHash],
    ) -> Result<bool> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(db)?;
        let path_key = path.as_bytes().as_slice();
        let row = tx
            .query_opt(
                "DELETE FROM narinfos WHERE cache = $1 AND path = $2 \
                 RETURNING nar_size, file_size, nar_hash",
                &[&cache.as_str(), &path_key],
            )
            .await
            .map_err(db)?;
        let Some(row) = row else {
            return Ok(false);
        };
        let referenced: Vec<&[u8]> = references.iter().map(|r| r.as_bytes().as_slice()).collect();
        tx.execute(
            "DELETE FROM refs WHERE cache = $1 AND referrer = $2 AND referenced = ANY($3)",
            &[&cache.as_str(), &path_key, &referenced],
        )
        .await
        .map_err(db)?;
        tx.execute(
            "DELETE FROM accesses WHERE cache = $1 AND path = $2",
            &[&cache.as_str(), &path_key],
        )
        .await
        .map_err(db)?;
        let (nar_size, file_size): (i64, i64) = (row.get(0), row.get(1));
        let nar_hash = sha_of(row.get(2), "narinfo")?;
        add_stats(&tx, cache, [-1, -nar_size, -file_size, 0, 0]).await?;
        let committed = tx.commit().await.map_err(db);
        self.narinfo_changed(cache, path, &nar_hash);
        committed.map(|()| true)
    }

    async fn holds_paths(&self, cache: &CacheName, paths: &[StorePathHash]) -> Result<Vec<bool>> {
        if paths.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<&[u8]> = paths.iter().map(|p| p.as_bytes().as_slice()).collect();
        let c = self.client().await?;
        // Planned for each call, as `chunks` is.
        let rows = c
            .query_typed(
                "SELECT path FROM narinfos WHERE cache = $1 AND path = ANY($2)",
                &[(&cache.as_str(), Type::TEXT), (&keys, Type::BYTEA_ARRAY)],
            )
            .await
            .map_err(db)?;
        let held: std::collections::HashSet<&[u8]> = rows.iter().map(|r| r.get(0)).collect();
        Ok(keys.iter().map(|k| held.contains(k)).collect())
    }

    async fn cache_has_nar(&self, cache: &CacheName, nar_hash: &Sha256) -> Result<bool> {
        let row = self
            .row(
                "SELECT 1 FROM narinfos WHERE cache = $1 AND nar_hash = $2 LIMIT 1",
                &[&cache.as_str(), &nar_hash.as_bytes().as_slice()],
            )
            .await?;
        Ok(row.is_some())
    }

    async fn served_nar(&self, cache: &CacheName, nar_hash: &Sha256) -> Result<Option<NarRecord>> {
        // Both halves, so that each is kept for the lookups that need one of them.
        let read = async {
            let row = self
                .row(
                    "SELECT EXISTS (SELECT 1 FROM narinfos WHERE cache = $1 AND nar_hash = $2), \
                     (SELECT record FROM nars WHERE hash = $2)",
                    &[&cache.as_str(), &nar_hash.as_bytes().as_slice()],
                )
                .await?
                .ok_or_else(|| IndexError::Failed("a SELECT without FROM gave no row".into()))?;
            let claimed: bool = row.get(0);
            let record: Option<&[u8]> = row.get(1);
            Ok((claimed, record.map(|b| nar_of(b, nar_hash)).transpose()?))
        };
        if !self.copies {
            return read
                .await
                .map(|(claimed, record)| record.filter(|_| claimed));
        }
        self.lookups.served_nar(cache, nar_hash, read).await
    }

    async fn blob(&self, kind: BlobKind, cache: &CacheName, key: &str) -> Result<Option<Stored>> {
        let row = self
            .row(
                "SELECT stored FROM blobs WHERE kind = $1 AND cache = $2 AND key = $3",
                &[&kind_number(kind), &cache.as_str(), &key],
            )
            .await?;
        row.map(|r| {
            codec::decode_stored(r.get(0))
                .ok_or_else(|| IndexError::corrupt("blob", key.as_bytes()))
        })
        .transpose()
    }

    async fn put_blob(
        &self,
        kind: BlobKind,
        cache: &CacheName,
        key: &str,
        stored: &Stored,
    ) -> Result<()> {
        let mut value = Vec::new();
        codec::encode_stored(stored, &mut value);
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(db)?;
        let kind_byte = [kind_number(kind) as u8];
        lock_record(
            &tx,
            &[
                b"blob",
                &kind_byte,
                cache.as_str().as_bytes(),
                key.as_bytes(),
            ],
        )
        .await?;
        let old = tx
            .query_opt(
                "SELECT stored FROM blobs WHERE kind = $1 AND cache = $2 AND key = $3 FOR UPDATE",
                &[&kind_number(kind), &cache.as_str(), &key],
            )
            .await
            .map_err(db)?;
        let old_size = match old {
            Some(r) => codec::decode_stored(r.get(0))
                .ok_or_else(|| IndexError::corrupt("blob", key.as_bytes()))?
                .stored_size(),
            None => 0,
        };
        tx.execute(
            "INSERT INTO blobs (kind, cache, key, stored) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (kind, cache, key) DO UPDATE SET stored = EXCLUDED.stored",
            &[&kind_number(kind), &cache.as_str(), &key, &value],
        )
        .await
        .map_err(db)?;
        let delta = int(stored.stored_size()) - int(old_size);
        add_stats(&tx, cache, [0, 0, 0, 0, delta]).await?;
        tx.commit().await.map_err(db)
    }

    async fn accesses(&self, cache: &CacheName) -> Result<Vec<(StorePathHash, u64)>> {
        let rows = self
            .rows(
                "SELECT path, at FROM accesses WHERE cache = $1",
                &[&cache.as_str()],
            )
            .await?;
        rows.iter()
            .map(|r| Ok((path_of(r.get(0), "access")?, uint(r.get(1)))))
            .collect()
    }

    async fn put_accesses(
        &self,
        cache: &CacheName,
        accesses: &[(StorePathHash, u64)],
    ) -> Result<()> {
        if accesses.is_empty() {
            return Ok(());
        }
        let paths: Vec<&[u8]> = accesses
            .iter()
            .map(|(p, _)| p.as_bytes().as_slice())
            .collect();
        let ats: Vec<i64> = accesses.iter().map(|(_, at)| int(*at)).collect();
        self.exec(
            "INSERT INTO accesses (cache, path, at) \
             SELECT $1, p, a FROM unnest($2::bytea[], $3::bigint[]) AS t(p, a) \
             ON CONFLICT (cache, path) DO UPDATE SET at = EXCLUDED.at",
            &[&cache.as_str(), &paths, &ats],
        )
        .await?;
        Ok(())
    }

    async fn paths_of_nar(
        &self,
        cache: &CacheName,
        nar_hash: &Sha256,
    ) -> Result<Vec<StorePathHash>> {
        let rows = self
            .rows(
                "SELECT path FROM narinfos WHERE cache = $1 AND nar_hash = $2 ORDER BY path",
                &[&cache.as_str(), &nar_hash.as_bytes().as_slice()],
            )
            .await?;
        rows.iter().map(|r| path_of(r.get(0), "claim")).collect()
    }

    async fn pins(&self, cache: &CacheName) -> Result<Vec<PinRecord>> {
        let rows = self
            .rows(
                "SELECT name, record FROM pins WHERE cache = $1 ORDER BY name",
                &[&cache.as_str()],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let (name, text): (&str, &str) = (r.get(0), r.get(1));
                serde_json::from_str(text).map_err(|_| IndexError::corrupt("pin", name.as_bytes()))
            })
            .collect()
    }

    async fn put_pin(&self, cache: &CacheName, pin: &PinRecord) -> Result<()> {
        let text = serde_json::to_string(pin).expect("a pin always serialises");
        self.exec(
            "INSERT INTO pins (cache, name, record) VALUES ($1, $2, $3) \
             ON CONFLICT (cache, name) DO UPDATE SET record = EXCLUDED.record",
            &[&cache.as_str(), &pin.name, &text],
        )
        .await?;
        Ok(())
    }

    async fn delete_pin(&self, cache: &CacheName, name: &str) -> Result<bool> {
        let n = self
            .exec(
                "DELETE FROM pins WHERE cache = $1 AND name = $2",
                &[&cache.as_str(), &name],
            )
            .await?;
        Ok(n > 0)
    }

    async fn nars_after(
        &self,
        after: Option<&Sha256>,
        limit: usize,
    ) -> Result<Vec<(Sha256, NarRecord)>> {
        let after: &[u8] = after.map_or(&[], |a| a.as_bytes().as_slice());
        let rows = self
            .rows(
                "SELECT hash, record FROM nars WHERE hash > $1 ORDER BY hash LIMIT $2",
                &[&after, &int(limit as u64)],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let (hash, record): (&[u8], &[u8]) = (r.get(0), r.get(1));
                let nar =
                    codec::decode_nar(record).ok_or_else(|| IndexError::corrupt("NAR", hash))?;
                Ok((sha_of(hash, "NAR")?, nar))
            })
            .collect()
    }

    async fn replace_nar(
        &self,
        nar_hash: &Sha256,
        expected: &NarRecord,
        new: &NarRecord,
    ) -> Result<bool> {
        let n = self
            .exec(
                "UPDATE nars SET record = $3 WHERE hash = $1 AND record = $2",
                &[
                    &nar_hash.as_bytes().as_slice(),
                    &codec::encode_nar(expected),
                    &codec::encode_nar(new),
                ],
            )
            .await;
        self.nar_changed(nar_hash);
        Ok(n? == 1)
    }

    async fn replace_blob(&self, key: &BlobKey, expected: &Stored, new: &Stored) -> Result<bool> {
        let (mut old, mut value) = (Vec::new(), Vec::new());
        codec::encode_stored(expected, &mut old);
        codec::encode_stored(new, &mut value);
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(db)?;
        let n = tx
            .execute(
                "UPDATE blobs SET stored = $5 \
                 WHERE kind = $1 AND cache = $2 AND key = $3 AND stored = $4",
                &[
                    &kind_number(key.kind),
                    &key.cache.as_str(),
                    &key.key,
                    &old,
                    &value,
                ],
            )
            .await
            .map_err(db)?;
        if n == 1 {
            let delta = int(new.stored_size()) - int(expected.stored_size());
            add_stats(&tx, &key.cache, [0, 0, 0, 0, delta]).await?;
        }
        tx.commit().await.map_err(db)?;
        Ok(n == 1)
    }

    async fn delete_nar_if(&self, nar_hash: &Sha256, expected: &NarRecord) -> Result<bool> {
        let n = self
            .exec(
                "DELETE FROM nars WHERE hash = $1 AND record = $2",
                &[
                    &nar_hash.as_bytes().as_slice(),
                    &codec::encode_nar(expected),
                ],
            )
            .await;
        self.nar_changed(nar_hash);
        Ok(n? == 1)
    }

    async fn uploads_after(
        &self,
        after: Option<&(CacheName, NarUrl)>,
        limit: usize,
    ) -> Result<Vec<(CacheName, NarUrl, Upload)>> {
        let (cache, url) = match after {
            Some((c, u)) => (c.as_str().to_owned(), u.to_string()),
            None => (String::new(), String::new()),
        };
        let rows = self
            .rows(
                "SELECT cache, url, record FROM uploads WHERE (cache, url) > ($1, $2) \
                 ORDER BY cache, url LIMIT $3",
                &[&cache, &url, &int(limit as u64)],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let (cache, url, record): (&str, &str, &[u8]) = (r.get(0), r.get(1), r.get(2));
                let corrupt = || IndexError::corrupt("upload", url.as_bytes());
                Ok((
                    cache.parse().map_err(|_| corrupt())?,
                    url.parse().map_err(|_| corrupt())?,
                    codec::decode_upload(record).ok_or_else(corrupt)?,
                ))
            })
            .collect()
    }

    async fn delete_upload_if(
        &self,
        cache: &CacheName,
        url: &NarUrl,
        expected: &Upload,
    ) -> Result<bool> {
        let url = url.to_string();
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(db)?;
        let row = tx
            .query_opt(
                "SELECT record FROM uploads WHERE cache = $1 AND url = $2 FOR UPDATE",
                &[&cache.as_str(), &url],
            )
            .await
            .map_err(db)?;
        // Compared as records, not bytes, as the embedded index does.
        let current = row.map(|r| codec::decode_upload(r.get(0)));
        if current != Some(Some(*expected)) {
            return Ok(false);
        }
        tx.execute(
            "DELETE FROM uploads WHERE cache = $1 AND url = $2",
            &[&cache.as_str(), &url],
        )
        .await
        .map_err(db)?;
        add_stats(&tx, cache, [0, 0, 0, -pending_of(expected), 0]).await?;
        tx.commit().await.map_err(db)?;
        Ok(true)
    }

    async fn blobs_after(
        &self,
        after: Option<&BlobKey>,
        limit: usize,
    ) -> Result<Vec<(BlobKey, Stored)>> {
        let (kind, cache, key) = match after {
            Some(a) => (
                kind_number(a.kind),
                a.cache.as_str().to_owned(),
                a.key.clone(),
            ),
            None => (-1, String::new(), String::new()),
        };
        let rows = self
            .rows(
                "SELECT kind, cache, key, stored FROM blobs \
                 WHERE (kind, cache, key) > ($1, $2, $3) ORDER BY kind, cache, key LIMIT $4",
                &[&kind, &cache, &key, &int(limit as u64)],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let (kind, cache, key, stored): (i16, &str, &str, &[u8]) =
                    (r.get(0), r.get(1), r.get(2), r.get(3));
                let corrupt = || IndexError::corrupt("blob", key.as_bytes());
                Ok((
                    BlobKey {
                        kind: kind_of(kind).ok_or_else(corrupt)?,
                        cache: cache.parse().map_err(|_| corrupt())?,
                        key: key.to_owned(),
                    },
                    codec::decode_stored(stored).ok_or_else(corrupt)?,
                ))
            })
            .collect()
    }

    async fn chunks_after(&self, after: Option<&ChunkId>, limit: usize) -> Result<Vec<ChunkRef>> {
        let after: &[u8] = after.map_or(&[], |a| a.0.as_slice());
        let rows = self
            .rows(
                "SELECT id, location FROM chunks WHERE id > $1 ORDER BY id LIMIT $2",
                &[&after, &int(limit as u64)],
            )
            .await?;
        rows.iter().map(chunk_of).collect()
    }

    async fn delete_chunks(&self, ids: &[ChunkId]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut sorted = ids.to_vec();
        sorted.sort();
        let keys: Vec<&[u8]> = sorted.iter().map(|id| id.0.as_slice()).collect();
        self.exec("DELETE FROM chunks WHERE id = ANY($1)", &[&keys])
            .await?;
        Ok(())
    }

    async fn manifests_after(
        &self,
        after: Option<&ManifestId>,
        limit: usize,
    ) -> Result<Vec<ManifestId>> {
        let after: &[u8] = after.map_or(&[], |a| a.0.as_slice());
        let rows = self
            .rows(
                "SELECT DISTINCT manifest FROM segments WHERE manifest > $1 \
                 ORDER BY manifest LIMIT $2",
                &[&after, &int(limit as u64)],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let id: &[u8] = r.get(0);
                let raw: [u8; 16] = id
                    .try_into()
                    .map_err(|_| IndexError::corrupt("segment", id))?;
                Ok(ManifestId(raw))
            })
            .collect()
    }

    async fn delete_manifest(&self, id: &ManifestId) -> Result<()> {
        self.exec(
            "DELETE FROM segments WHERE manifest = $1",
            &[&id.0.as_slice()],
        )
        .await?;
        Ok(())
    }

    async fn meta(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let row = self
            .row("SELECT value FROM meta WHERE key = $1", &[&key])
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    async fn put_meta(&self, key: &str, value: &[u8]) -> Result<()> {
        self.exec(
            "INSERT INTO meta (key, value) VALUES ($1, $2) \
             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            &[&key, &value],
        )
        .await?;
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        // Every write is committed, and a commit is durable when it returns.
        Ok(())
    }

    async fn check(&self) -> Result<()> {
        // A write proves more than a read: a read-only standby answers reads.
        self.put_meta("ready_probe", &[]).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::postgres::{settings, PgServer};

    /// A server of its own and an index over a fresh database of it.
    async fn open() -> (PgServer, Box<dyn Index>) {
        let server = PgServer::start();
        let url = server.database("contract");
        let index = PgIndex::open(&settings(url, 4)).await.unwrap();
        (server, Box::new(index))
    }

    /// Two indexes (two pools, as two servers have) over one database, opened at once:
    /// the schema is migrated once.
    async fn pair() -> (PgServer, [std::sync::Arc<dyn Index>; 2]) {
        let server = PgServer::start();
        let url = server.database("contract");
        let (one, other) = (settings(url.clone(), 4), settings(url, 4));
        let (a, b) = tokio::join!(PgIndex::open(&one), PgIndex::open(&other));
        (
            server,
            [
                std::sync::Arc::new(a.unwrap()),
                std::sync::Arc::new(b.unwrap()),
            ],
        )
    }

    crate::index::contract::tests!(open, pair);

    /// An index whose reads come from copies, used as though every change were heard
    /// (there is no other process): the contract holds through them, so every write
    /// drops what it changes from its own copies.
    mod with_copies {
        use super::*;

        fn hearing(index: &PgIndex) -> PgIndex {
            let lookups = index.lookups();
            let until = std::time::Instant::now() + Duration::from_secs(3600);
            lookups.hearing_until(lookups.session(), until);
            index.with_copies()
        }

        async fn open() -> (PgServer, Box<dyn Index>) {
            let server = PgServer::start();
            let url = server.database("contract");
            let index = PgIndex::open(&settings(url, 4)).await.unwrap();
            (server, Box::new(hearing(&index)))
        }

        crate::index::contract::tests!(one open);

        #[tokio::test]
        async fn a_commit_that_finds_the_path_there_drops_a_copied_miss() {
            use crate::index::contract::{narinfo, path};
            let server = PgServer::start();
            let url = server.database("copies");
            let here = PgIndex::open(&settings(url.clone(), 2)).await.unwrap();
            let elsewhere = PgIndex::open(&settings(url, 2)).await.unwrap();
            let view = hearing(&here);
            let (cache, p, record) = ("main".parse().unwrap(), path(1), narinfo(b"n", "t"));
            assert_eq!(view.narinfo(&cache, &p).await.unwrap(), None);
            // Committed by another process whose notice this one does not hear.
            elsewhere
                .commit_narinfo(&cache, &p, &record, &[], None)
                .await
                .unwrap();
            assert_eq!(view.narinfo(&cache, &p).await.unwrap(), None, "copied");
            let commit = here.commit_narinfo(&cache, &p, &record, &[], None);
            assert!(matches!(commit.await.unwrap(), Commit::Exists { .. }));
            assert_eq!(view.narinfo(&cache, &p).await.unwrap(), Some(record));
        }
    }
}
