//! Coordination of replicas through their PostgreSQL database. Each process keeps one
//! session of its own with the database (not one of the index's pool, so that a busy
//! pool never delays a heartbeat or a lock), and through it:
//!
//! - **Leases** are this process's epochs (as in one process), and the process says in
//!   `coord_servers`, every `TICK`, that it is alive and which barrier it has drained.
//!   A barrier takes the next generation of `coord_barrier`, wakes every process with a
//!   notice, and waits until every live process has drained it: each runs a barrier
//!   of its own epochs and reports. A process not seen for the lease time is dead, and
//!   no barrier waits for it.
//! - **Cache locks** are this process's locks (which order its own tasks) and advisory
//!   locks of the session (which order the processes), shared or exclusive, taken by
//!   polling `pg_try_advisory_lock*` so that waiting never blocks the session.
//! - **The one job** is the row of `coord_jobs` not done; a unique index allows one.
//!   Its process reports progress into it; a row not reported for the lease time was
//!   left by a dead process, and is closed by whoever finds it. A job that finds its row
//!   closed by another stops.
//! - **Notices** are `NOTIFY`s that every session listens to. A session that was lost
//!   may have missed some: when it is back, the process reads everything again.
//! - **Lookups** (`index::lookups`): the notices of changed narinfos and NAR records
//!   drop this process's copies; a heartbeat says for how long the session hears them,
//!   a lost session stops their use, and a barrier (and every `RESYNC_BEATS`) empties
//!   them.
//!
//! A session lost releases its advisory locks; the holders are not told. The window
//! is a database restart during a change of a cache's keys racing a publication.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use tokio::sync::{watch, Notify};
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, Client, NoTls};

use super::{
    Change, Coordination, Exclusive, FirstStart, JobRefused, JobWork, KeyChange, Lease,
    LocalCoordination, Result, Shared,
};
use crate::index::lookups::Lookups;
use crate::index::postgres::{connection_config, db, int, PgSettings};
use crate::index::IndexError;
use crate::jobs::{Busy, JobStatus, Progress};
use crate::nix::CacheName;
use crate::store::PackId;

/// The channel of change notices.
const CHANGES: &str = "cachet_changes";
/// The channel that wakes every process to drain a barrier.
const BARRIERS: &str = "cachet_barriers";
/// The channel of the notices of changed narinfos and NAR records (`index::lookups`).
use crate::index::postgres::LOOKUPS_CHANNEL as LOOKUPS;

/// How often a process says it is alive, and a job reports its progress.
const TICK: Duration = Duration::from_millis(500);
/// How often a waiting barrier or lock asks again.
const POLL: Duration = Duration::from_millis(20);
/// How long after its last word a process, or the job it ran, is taken for dead.
pub const LEASE_TIME: Duration = Duration::from_secs(10);

/// The namespaces of the advisory locks (the first key of the two-key form; the
/// second is the cache name's hash). Names that collide only share a lock.
const CHANGES_LOCK: i32 = 0x6361_0001;
const KEYS_LOCK: i32 = 0x6361_0002;
const FIRST_START_LOCK: i32 = 0x6361_0003;

/// How long a cache lock is waited for before the request gets 503 (a publication
/// holds one for milliseconds; a change of a cache, for a batch of records).
const LOCK_WAIT: Duration = Duration::from_secs(60);
/// How long a coordination query may take: past it, the session is taken for broken.
const QUERY_WAIT: Duration = Duration::from_secs(5);
/// How often every copy of tokens and caches is read again, and the copies of lookups
/// dropped, even without a notice: the net under a notice that was lost.
const RESYNC_BEATS: u64 = 60;

/// Packs named in one notice: a notice carries at most 8,000 bytes.
const PACKS_PER_NOTICE: usize = 200;

/// What a job left by a dead process says.
const ABANDONED: &str = "the server running the job stopped before it finished";

/// Coordination of the processes sharing one PostgreSQL database.
pub struct PgCoordination {
    shared: Arc<Inner>,
}

struct Inner {
    /// This process's own leases, locks and subscribers.
    local: LocalCoordination,
    session: watch::Receiver<Option<Arc<Client>>>,
    /// How long a call waits for the session to be up.
    wait: Duration,
    lease_time: Duration,
    /// Wakes the heartbeat: a barrier was asked for, or drained here.
    wake: Notify,
    /// This process's name in `coord_servers` and `coord_jobs`.
    name: String,
    /// Its tasks (the session, the heartbeat, drains, jobs): stopped with the handle,
    /// as a killed process's are.
    tasks: std::sync::Mutex<Vec<tokio::task::AbortHandle>>,
    /// When the last heartbeat that reached the database began.
    last_beat: std::sync::Mutex<std::time::Instant>,
    /// The index's copies of hot lookups, kept current by this session.
    lookups: Arc<Lookups>,
}

/// An advisory lock of a session, released when dropped.
struct Advisory {
    client: Arc<Client>,
    unlock: &'static str,
    keys: (i32, i32),
}

impl Drop for Advisory {
    fn drop(&mut self) {
        let (client, unlock, keys) = (self.client.clone(), self.unlock, self.keys);
        // A session that ended has released it already.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = client.execute(unlock, &[&keys.0, &keys.1]).await;
            });
        }
    }
}

/// What a session does with a notice it hears: its channel and payload.
type Heard = Arc<dyn Fn(&str, &str) + Send + Sync>;

/// A cache name's key among the advisory locks.
fn lock_key(cache: &CacheName) -> i32 {
    let hash = blake3::hash(cache.as_str().as_bytes());
    i32::from_le_bytes(hash.as_bytes()[..4].try_into().expect("4 bytes"))
}

/// A change as a notice's payload, in as many notices as it needs.
fn encode(change: &Change) -> Vec<String> {
    match change {
        Change::Tokens => vec!["tokens".into()],
        Change::Caches => vec!["caches".into()],
        Change::PacksDeleted(packs) => packs
            .chunks(PACKS_PER_NOTICE)
            .map(|some| {
                let hex: Vec<String> = some.iter().map(PackId::to_hex).collect();
                format!("packs {}", hex.join(" "))
            })
            .collect(),
    }
}

fn decode(payload: &str) -> Option<Change> {
    match payload {
        "tokens" => Some(Change::Tokens),
        "caches" => Some(Change::Caches),
        _ => {
            let packs = payload.strip_prefix("packs ")?;
            let ids: Option<Vec<PackId>> = packs.split(' ').map(PackId::from_hex).collect();
            Some(Change::PacksDeleted(ids?))
        }
    }
}

/// Opens a session: its client, and the task driving its connection, which hands the
/// notices to `heard` and ends with the session.
async fn connect(
    settings: &PgSettings,
    heard: Heard,
) -> anyhow::Result<(Arc<Client>, tokio::task::JoinHandle<()>)> {
    let (client, mut connection) = connection_config(settings, "cachet (coordination)")?
        .connect(NoTls)
        .await?;
    let driver = tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => heard(n.channel(), n.payload()),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "the coordination session ended");
                    break;
                }
            }
        }
    });
    client
        .batch_execute(&format!(
            "LISTEN {CHANGES}; LISTEN {BARRIERS}; LISTEN {LOOKUPS}"
        ))
        .await?;
    Ok((Arc::new(client), driver))
}

impl PgCoordination {
    /// Opens this process's session and says it is alive. `lease_time` is
    /// `LEASE_TIME` but in tests. The schema is the index's (`PgIndex::open` made it),
    /// and so are the `lookups` the session keeps current.
    pub async fn open(
        settings: &PgSettings,
        lease_time: Duration,
        lookups: Arc<Lookups>,
    ) -> anyhow::Result<Self> {
        let (sender, session) = watch::channel(None);
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let name = format!("{}:{}", host.trim(), std::process::id());
        let shared = Arc::new(Inner {
            local: LocalCoordination::default(),
            session,
            wait: settings.connect_timeout,
            lease_time,
            wake: Notify::new(),
            name,
            tasks: std::sync::Mutex::default(),
            last_beat: std::sync::Mutex::new(std::time::Instant::now()),
            lookups,
        });
        let heard: Heard = {
            let weak = Arc::downgrade(&shared);
            Arc::new(move |channel: &str, payload: &str| {
                let Some(inner) = weak.upgrade() else { return };
                if channel == BARRIERS {
                    inner.wake.notify_one();
                } else if channel == LOOKUPS {
                    inner.lookups.heard(payload);
                } else if let Some(change) = decode(payload) {
                    inner.local.tell(change);
                } else {
                    tracing::warn!(payload, "a change notice that does not parse");
                }
            })
        };
        let (client, driver) = connect(settings, heard.clone())
            .await
            .map_err(|e| anyhow::anyhow!("the coordination session: {e}"))?;
        let registered = register(&client, &shared.name).await?;
        sender.send_replace(Some(client));
        shared.track(&driver);
        shared.spawn(keep_session(
            settings.clone(),
            sender,
            driver,
            heard,
            Arc::downgrade(&shared),
        ));
        shared.spawn(heartbeat(shared.clone(), registered));
        Ok(Self { shared })
    }
}

impl Drop for PgCoordination {
    fn drop(&mut self) {
        let tasks = std::mem::take(&mut *self.shared.tasks.lock().expect("never poisoned"));
        tasks.iter().for_each(tokio::task::AbortHandle::abort);
    }
}

/// Says this process is alive, from the generation of barriers now: nothing of it
/// runs from before. Its row id, and that generation.
async fn register(client: &Client, name: &str) -> anyhow::Result<(i64, i64)> {
    let row = client
        .query_one(
            "INSERT INTO coord_servers (name, drained) \
             SELECT $1, generation FROM coord_barrier RETURNING id, drained",
            &[&name],
        )
        .await
        .map_err(|e| anyhow::anyhow!("registering with the metadata database: {e}"))?;
    Ok((row.get(0), row.get(1)))
}

/// Keeps the session up: when it ends, opens another (every second until it can), and
/// then has every copy read again, since notices may have been missed meanwhile.
async fn keep_session(
    settings: PgSettings,
    sender: watch::Sender<Option<Arc<Client>>>,
    mut driver: tokio::task::JoinHandle<()>,
    heard: Heard,
    inner: std::sync::Weak<Inner>,
) {
    loop {
        let _ = (&mut driver).await;
        sender.send_replace(None);
        // Its notices are not heard until another session listens.
        if let Some(inner) = inner.upgrade() {
            inner.lookups.deaf();
        }
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            match connect(&settings, heard.clone()).await {
                Ok((client, again)) => {
                    // Listening again: what was kept while not is dropped.
                    if let Some(inner) = inner.upgrade() {
                        inner.lookups.clear();
                    }
                    sender.send_replace(Some(client));
                    if let Some(inner) = inner.upgrade() {
                        inner.track(&again);
                    }
                    driver = again;
                    break;
                }
                Err(e) => tracing::debug!(error = %e, "the coordination session is still down"),
            }
        }
        tracing::info!("the coordination session is back");
        let Some(inner) = inner.upgrade() else { return };
        inner.local.tell(Change::Tokens);
        inner.local.tell(Change::Caches);
        inner.wake.notify_one();
    }
}

/// Why a heartbeat failed.
#[derive(Debug, thiserror::Error)]
enum BeatError {
    #[error(transparent)]
    Database(#[from] tokio_postgres::Error),
    #[error("no answer within {} s", QUERY_WAIT.as_secs())]
    TimedOut,
}

/// Says every `TICK` (and when woken) that this process is alive and which barrier it
/// has drained. Each barrier it learns of is drained from then on, at once: a barrier
/// waits for this process's leases from before it was heard of, not for later ones.
async fn heartbeat(inner: Arc<Inner>, (mut id, generation): (i64, i64)) {
    let drained = Arc::new(AtomicI64::new(generation));
    let mut heard = generation;
    let mut beats = 0u64;
    loop {
        let woken = inner.wake.notified();
        if let Ok(client) = inner.client().await {
            let reported = drained.load(Ordering::SeqCst);
            let (began, session) = (std::time::Instant::now(), inner.lookups.session());
            let beaten =
                tokio::time::timeout(QUERY_WAIT, beat(&client, &inner, &mut id, reported, beats));
            let beaten = beaten.await.unwrap_or_else(|_| Err(BeatError::TimedOut));
            if let Ok(generation) = beaten {
                if generation > heard {
                    // Nothing read before the barrier is answered after it.
                    inner.lookups.clear();
                }
                *inner.last_beat.lock().expect("never poisoned") = began;
                // Taken for alive until a lease after `began` at the earliest: the
                // copies are used for half of that, never past a barrier that went on
                // without this process.
                inner
                    .lookups
                    .hearing_until(session, began + inner.lease_time / 2);
            }
            match beaten {
                Ok(generation) if generation > heard => {
                    heard = generation;
                    let (here, drained) = (inner.clone(), drained.clone());
                    inner.spawn(async move {
                        while !here.local.barrier(Duration::from_secs(3600)).await {}
                        drained.fetch_max(generation, Ordering::SeqCst);
                        here.wake.notify_one();
                    });
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "the heartbeat to the metadata database failed")
                }
            }
        }
        beats += 1;
        if beats % RESYNC_BEATS == 0 {
            inner.local.tell(Change::Tokens);
            inner.local.tell(Change::Caches);
            // The net under a notice whose sender died before sending it.
            inner.lookups.clear();
        }
        tokio::select! {
            () = tokio::time::sleep(TICK) => {}
            () = woken => {}
        }
    }
}

/// One heartbeat: this process's row brought up to date (made again if another took
/// it for dead and removed it), now and then the rows of dead processes removed. The
/// barriers' generation.
async fn beat(
    client: &Client,
    inner: &Inner,
    id: &mut i64,
    drained: i64,
    beats: u64,
) -> std::result::Result<i64, BeatError> {
    let row = client
        .query_opt(
            "UPDATE coord_servers SET seen = now(), drained = $2 WHERE id = $1 \
             RETURNING (SELECT generation FROM coord_barrier)",
            &[&*id, &drained],
        )
        .await?;
    let generation = match row {
        Some(row) => row.get(0),
        None => {
            let row = client
                .query_one(
                    "INSERT INTO coord_servers (name, drained) VALUES ($1, $2) \
                     RETURNING id, (SELECT generation FROM coord_barrier)",
                    &[&inner.name, &drained],
                )
                .await?;
            tracing::warn!("this server had been taken for dead; it is registered again");
            *id = row.get(0);
            row.get(1)
        }
    };
    if beats % 120 == 0 {
        client
            .execute(
                "DELETE FROM coord_servers WHERE seen < now() - make_interval(secs => $1)",
                &[&(10.0 * inner.lease_time.as_secs_f64())],
            )
            .await?;
    }
    Ok(generation)
}

impl Inner {
    /// Runs `task` as one of this handle's.
    fn spawn<F>(&self, task: F)
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.track(&tokio::spawn(task));
    }

    /// Counts `task` among this handle's, forgetting those that ended.
    fn track<T>(&self, task: &tokio::task::JoinHandle<T>) {
        let mut tasks = self.tasks.lock().expect("never poisoned");
        tasks.retain(|t| !t.is_finished());
        tasks.push(task.abort_handle());
    }

    /// The session, once it is up; unavailable if it is not within `wait`.
    async fn client(&self) -> Result<Arc<Client>> {
        let mut session = self.session.clone();
        let up = tokio::time::timeout(self.wait, session.wait_for(Option::is_some)).await;
        match up {
            Ok(Ok(client)) => Ok(client.clone().expect("waited for")),
            _ => Err(IndexError::Unavailable(
                "the coordination session with the metadata database is down".into(),
            )),
        }
    }

    /// Takes an advisory lock, asking again until it is free, at most `LOCK_WAIT`.
    /// The asking runs as a task of its own: a caller that goes away meanwhile (a
    /// client that disconnected) leaves the lock it may have been granted to the
    /// task's result, which unlocks it when dropped, instead of held by the session
    /// for good.
    async fn advisory(self: &Arc<Self>, shared: bool, keys: (i32, i32)) -> Result<Advisory> {
        let inner = self.clone();
        let asking = tokio::spawn(async move { inner.ask_advisory(shared, keys).await });
        asking
            .await
            .map_err(|e| IndexError::Failed(format!("taking a lock: {e}")))?
    }

    async fn ask_advisory(&self, shared: bool, keys: (i32, i32)) -> Result<Advisory> {
        let deadline = tokio::time::Instant::now() + LOCK_WAIT;
        let (take, unlock) = if shared {
            (
                "SELECT pg_try_advisory_lock_shared($1, $2)",
                "SELECT pg_advisory_unlock_shared($1, $2)",
            )
        } else {
            (
                "SELECT pg_try_advisory_lock($1, $2)",
                "SELECT pg_advisory_unlock($1, $2)",
            )
        };
        loop {
            let client = self.client().await?;
            // Not cut short by a timeout: an answer granting the lock would be lost with
            // the lock held. A session that stopped answering breaks on its own
            // (`connection_config`'s TCP timeouts), and its locks go with it.
            let row = client
                .query_one(take, &[&keys.0, &keys.1])
                .await
                .map_err(db)?;
            if row.get::<_, bool>(0) {
                return Ok(Advisory {
                    client,
                    unlock,
                    keys,
                });
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(IndexError::Unavailable(format!(
                    "a lock of the servers' coordination was not free within {} s",
                    LOCK_WAIT.as_secs()
                )));
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

#[async_trait::async_trait]
impl Coordination for PgCoordination {
    fn lease(&self) -> Lease {
        self.shared.local.lease()
    }

    async fn barrier(&self, limit: Duration) -> bool {
        let inner = &self.shared;
        let deadline = tokio::time::Instant::now() + limit;
        let wait = async {
            let client = inner.client().await?;
            let generation: i64 = client
                .query_one(
                    "UPDATE coord_barrier SET generation = generation + 1 RETURNING generation",
                    &[],
                )
                .await
                .map_err(db)?
                .get(0);
            client
                .execute("SELECT pg_notify($1, '')", &[&BARRIERS])
                .await
                .map_err(db)?;
            loop {
                let pending: i64 = client
                    .query_one(
                        "SELECT count(*) FROM coord_servers WHERE drained < $1 \
                         AND seen > now() - make_interval(secs => $2)",
                        &[&generation, &inner.lease_time.as_secs_f64()],
                    )
                    .await
                    .map_err(db)?
                    .get(0);
                if pending == 0 {
                    return Ok::<_, IndexError>(true);
                }
                if tokio::time::Instant::now() >= deadline {
                    return Ok(false);
                }
                tokio::time::sleep(POLL).await;
            }
        };
        // Past the limit, or without the database, the barrier did not pass: the
        // collector keeps what it would have deleted.
        match tokio::time::timeout_at(deadline + inner.wait, wait).await {
            Ok(Ok(passed)) => passed,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "the barrier could not be asked of every server");
                false
            }
            Err(_) => false,
        }
    }

    fn running(&self) -> usize {
        self.shared.local.running()
    }

    fn replicated(&self) -> bool {
        true
    }

    async fn shared(&self, cache: &CacheName) -> Result<Shared> {
        let here = self.shared.local.shared(cache).await?;
        let there = self
            .shared
            .advisory(true, (CHANGES_LOCK, lock_key(cache)))
            .await?;
        Ok(Shared::new((here, there)))
    }

    async fn exclusive(&self, cache: &CacheName) -> Result<Exclusive> {
        let here = self.shared.local.exclusive(cache).await?;
        let there = self
            .shared
            .advisory(false, (CHANGES_LOCK, lock_key(cache)))
            .await?;
        Ok(Exclusive::new(cache.clone(), (here, there)))
    }

    async fn key_change(&self, cache: &CacheName) -> Result<KeyChange> {
        let here = self.shared.local.key_change(cache).await?;
        let there = self
            .shared
            .advisory(false, (KEYS_LOCK, lock_key(cache)))
            .await?;
        Ok(KeyChange::new((here, there)))
    }

    async fn first_start(&self) -> Result<FirstStart> {
        let there = self.shared.advisory(false, (FIRST_START_LOCK, 0)).await?;
        Ok(FirstStart::new(there))
    }

    async fn start_job(
        &self,
        kind: &'static str,
        work: JobWork,
    ) -> std::result::Result<u64, JobRefused> {
        let inner = &self.shared;
        let client = inner.client().await?;
        client
            .execute(
                "UPDATE coord_jobs SET done = true, error = $2 \
                 WHERE NOT done AND seen < now() - make_interval(secs => $1)",
                &[&inner.lease_time.as_secs_f64(), &ABANDONED],
            )
            .await
            .map_err(db)?;
        let started = crate::clock::now();
        let inserted = client
            .query_one(
                "INSERT INTO coord_jobs (kind, started, server) VALUES ($1, $2, $3) RETURNING id",
                &[
                    &kind,
                    &i64::try_from(started).unwrap_or(i64::MAX),
                    &inner.name,
                ],
            )
            .await;
        let id: i64 = match inserted {
            Ok(row) => row.get(0),
            Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                let running = client
                    .query_opt("SELECT kind, started FROM coord_jobs WHERE NOT done", &[])
                    .await
                    .map_err(db)?;
                // One that ended since the insert failed still was running then.
                let (kind, started) = running
                    .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)))
                    .unwrap_or_else(|| ("job".into(), i64::try_from(started).unwrap_or(0)));
                return Err(JobRefused::Busy(Busy {
                    kind,
                    started: u64::try_from(started).unwrap_or(0),
                }));
            }
            Err(e) => return Err(db(e).into()),
        };
        let progress = Arc::new(Progress::default());
        let run = tokio::spawn(work(progress.clone()));
        inner.track(&run);
        inner.spawn(report(inner.clone(), id, progress, run));
        // The oldest rows go; if this fails, a later start removes them.
        let pruned = client
            .execute("DELETE FROM coord_jobs WHERE id < $1::bigint - 100", &[&id])
            .await;
        if let Err(e) = pruned {
            tracing::debug!(error = %e, "old jobs were not removed");
        }
        Ok(u64::try_from(id).expect("ids are positive"))
    }

    async fn job(&self, id: u64) -> Result<Option<JobStatus>> {
        let inner = &self.shared;
        let Ok(id) = i64::try_from(id) else {
            return Ok(None);
        };
        let client = inner.client().await?;
        let row = client
            .query_opt(
                "SELECT kind, started, phase, items, bytes, done, result, error, \
                 seen < now() - make_interval(secs => $2) FROM coord_jobs WHERE id = $1",
                &[&id, &inner.lease_time.as_secs_f64()],
            )
            .await
            .map_err(db)?;
        let Some(row) = row else { return Ok(None) };
        let result: Option<String> = row.get(6);
        let mut status = JobStatus {
            id: id as u64,
            kind: row.get(0),
            started: u64::try_from(row.get::<_, i64>(1)).unwrap_or(0),
            phase: row.get(2),
            items: u64::try_from(row.get::<_, i64>(3)).unwrap_or(0),
            bytes: u64::try_from(row.get::<_, i64>(4)).unwrap_or(0),
            done: row.get(5),
            result: result.and_then(|r| serde_json::from_str(&r).ok()),
            error: row.get(7),
        };
        if !status.done && row.get::<_, bool>(8) {
            status.done = true;
            status.error = Some(ABANDONED.into());
        }
        Ok(Some(status))
    }

    async fn announce(&self, change: Change) {
        let send = || async {
            let client = self.shared.client().await?;
            for payload in encode(&change) {
                let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&CHANGES, &payload];
                let notify = client.execute("SELECT pg_notify($1, $2)", &params);
                tokio::time::timeout(QUERY_WAIT, notify)
                    .await
                    .map_err(|_| IndexError::Unavailable("the notice was not sent in time".into()))?
                    .map_err(db)?;
            }
            Ok::<_, IndexError>(())
        };
        let mut sent = send().await;
        for _ in 0..3 {
            if sent.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            sent = send().await;
        }
        // This process hears its own notices through the session; without it, it is
        // told directly, and the others read everything again within `RESYNC_BEATS`.
        if let Err(e) = sent {
            tracing::warn!(error = %e, ?change, "a change could not be announced to the other servers");
            self.shared.local.tell(change);
        }
    }

    fn changes(&self) -> tokio::sync::broadcast::Receiver<Change> {
        self.shared.local.changes()
    }
}

/// Reports a job's progress into its row while it runs, and its outcome when it ends.
/// A job whose row another process closed (it took this one for dead) is stopped.
async fn report(
    inner: Arc<Inner>,
    id: i64,
    progress: Arc<Progress>,
    mut run: tokio::task::JoinHandle<std::result::Result<serde_json::Value, String>>,
) {
    let outcome = loop {
        tokio::select! {
            ended = &mut run => break match ended {
                Ok(outcome) => outcome,
                Err(e) if e.is_cancelled() => Err(ABANDONED.into()),
                Err(e) => Err(format!("the job failed: {e}")),
            },
            () = tokio::time::sleep(TICK) => {
                let (phase, items, bytes) = progress.snapshot();
                let reported = match inner.client().await {
                    Ok(client) => {
                        let (items, bytes) = (int(items), int(bytes));
                        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
                            [&id, &phase, &items, &bytes];
                        let update = client.execute(
                            "UPDATE coord_jobs SET seen = now(), phase = $2, items = $3, \
                             bytes = $4 WHERE id = $1 AND NOT done",
                            &params,
                        );
                        tokio::time::timeout(QUERY_WAIT, update).await.ok().and_then(|r| r.ok())
                    }
                    Err(_) => None,
                };
                match reported {
                    Some(0) => {
                        tracing::error!(job = id, "another server took this job for abandoned; it stops");
                        run.abort();
                    }
                    Some(_) => {}
                    // Cut off from the database for half the lease time: the others
                    // will take it for abandoned and may start another; it stops first.
                    None => {
                        let silent = inner.last_beat.lock().expect("never poisoned").elapsed();
                        if silent > inner.lease_time / 2 {
                            tracing::error!(job = id, "cut off from the metadata database; the job stops");
                            run.abort();
                        }
                    }
                }
            }
        }
    };
    if let Err(e) = &outcome {
        tracing::error!(job = id, error = %e, "maintenance job failed");
    }
    let (phase, items, bytes) = progress.snapshot();
    let (result, error) = match outcome {
        Ok(v) => (Some(v.to_string()), None),
        Err(e) => (None, Some(e)),
    };
    // Written as soon as the database takes it; a process that cannot write it within
    // the lease time has its job closed as abandoned by whoever asks.
    let deadline = tokio::time::Instant::now() + inner.lease_time;
    while tokio::time::Instant::now() < deadline {
        if let Ok(client) = inner.client().await {
            let written = client
                .execute(
                    "UPDATE coord_jobs SET done = true, seen = now(), phase = $2, items = $3, \
                     bytes = $4, result = $5, error = $6 WHERE id = $1 AND NOT done",
                    &[&id, &phase, &int(items), &int(bytes), &result, &error],
                )
                .await;
            if written.is_ok() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::postgres::PgServer;

    /// A database with the schema, and `n` handles over it (n processes' views).
    async fn handles<const N: usize>(lease_time: Duration) -> (PgServer, [PgCoordination; N]) {
        let server = PgServer::start();
        let settings = crate::testing::postgres::settings(server.database("coord"), 2);
        crate::index::PgIndex::open(&settings).await.unwrap();
        let mut all = Vec::new();
        for _ in 0..N {
            let lookups = Arc::new(Lookups::new(1 << 20));
            all.push(
                PgCoordination::open(&settings, lease_time, lookups)
                    .await
                    .unwrap(),
            );
        }
        (server, all.try_into().ok().expect("N handles"))
    }

    async fn open() -> (PgServer, [Arc<dyn Coordination>; 2]) {
        let (server, [a, b]) = handles(LEASE_TIME).await;
        (server, [Arc::new(a), Arc::new(b)])
    }

    crate::coord::contract::tests!(open);

    #[test]
    fn notices_round_trip() {
        let many: Vec<PackId> = (0..450u32)
            .map(|i| {
                let mut id = [0u8; 16];
                id[..4].copy_from_slice(&i.to_le_bytes());
                PackId(id)
            })
            .collect();
        let payloads = encode(&Change::PacksDeleted(many.clone()));
        assert_eq!(payloads.len(), 3);
        assert!(payloads.iter().all(|p| p.len() < 8000));
        let back: Vec<PackId> = payloads
            .iter()
            .flat_map(|p| match decode(p) {
                Some(Change::PacksDeleted(ids)) => ids,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(back, many);
        for c in [Change::Tokens, Change::Caches] {
            assert_eq!(decode(&encode(&c)[0]), Some(c));
        }
        assert_eq!(decode("packs zz"), None);
        assert_eq!(decode("other"), None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_process_holds_no_barrier_and_its_job_is_closed() {
        let (_server, [a, b]) = handles::<2>(Duration::from_secs(1)).await;
        let lease = a.lease();
        let (_finish, finished) = tokio::sync::oneshot::channel::<()>();
        let job = a
            .start_job(
                "gc",
                Box::new(move |_| {
                    Box::pin(async move {
                        let _ = finished.await;
                        Ok(serde_json::Value::Null)
                    })
                }),
            )
            .await
            .unwrap();
        assert!(!b.barrier(Duration::from_millis(300)).await);
        // Killed: its session and heartbeat end, its lease and its job stay behind.
        drop(a);
        let started = std::time::Instant::now();
        assert!(b.barrier(Duration::from_secs(10)).await);
        assert!(started.elapsed() < Duration::from_secs(8));
        let status = b.job(job).await.unwrap().unwrap();
        assert!(status.done);
        assert_eq!(status.error.as_deref(), Some(ABANDONED));
        let next = b
            .start_job(
                "verify",
                Box::new(|_| Box::pin(async { Ok(serde_json::Value::Null) })),
            )
            .await
            .unwrap();
        assert!(next > job);
        drop(lease);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_session_comes_back_after_a_database_restart() {
        let (server, [a, b]) = handles::<2>(LEASE_TIME).await;
        let mut heard = b.changes();
        server.restart();
        // A restart may have lost notices: everything is read again.
        let first = tokio::time::timeout(Duration::from_secs(15), heard.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(first, Change::Tokens | Change::Caches));
        let _ = tokio::time::timeout(Duration::from_secs(15), heard.recv()).await;
        a.announce(Change::PacksDeleted(vec![PackId([1; 16])]))
            .await;
        let heard_after = loop {
            let c = tokio::time::timeout(Duration::from_secs(15), heard.recv())
                .await
                .unwrap()
                .unwrap();
            if matches!(c, Change::PacksDeleted(_)) {
                break c;
            }
        };
        assert_eq!(heard_after, Change::PacksDeleted(vec![PackId([1; 16])]));
        let _locked = b.exclusive(&"main".parse().unwrap()).await.unwrap();
        assert!(b.barrier(Duration::from_secs(5)).await);
    }

    /// Polls `check` until it holds, at most `within`.
    async fn eventually<F: std::future::Future<Output = bool>>(
        within: Duration,
        mut check: impl FnMut() -> F,
    ) -> bool {
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            if check().await {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lookups_follow_every_change_and_outlive_no_barrier_and_no_session() {
        use crate::index::contract::{nar_record, narinfo, path};
        use crate::index::{Index, PgIndex};
        let server = PgServer::start();
        let settings = crate::testing::postgres::settings(server.database("lookups"), 2);
        let mut replicas = Vec::new();
        for _ in 0..2 {
            let index = PgIndex::open(&settings).await.unwrap();
            let lookups = index.lookups();
            let coord = PgCoordination::open(&settings, LEASE_TIME, lookups)
                .await
                .unwrap();
            replicas.push((index.with_copies(), coord));
        }
        let [(a, _a), (b, b_coord)]: [(PgIndex, PgCoordination); 2] =
            replicas.try_into().ok().unwrap();
        // Changes made in plain SQL, which no notice announces: what a copy would
        // answer stays visible.
        let (raw, connection) = connection_config(&settings, "test")
            .unwrap()
            .connect(tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        let cache: CacheName = "main".parse().unwrap();
        let (p, record) = (path(1), narinfo(b"nar", "v0"));
        b.commit_narinfo(&cache, &p, &record, &[], None)
            .await
            .unwrap();
        let text = |r: Option<crate::index::NarInfoRecord>| r.map(|r| r.text);
        // Once A hears the changes, it answers from its copy.
        let mut version = 0;
        let copied = eventually(Duration::from_secs(10), || {
            version += 1;
            let (a, raw, cache) = (&a, &raw, &cache);
            async move {
                let before = text(a.narinfo(cache, &p).await.unwrap()).unwrap();
                raw.execute(
                    "UPDATE narinfos SET text = $1",
                    &[&format!("v{version}").into_bytes()],
                )
                .await
                .unwrap();
                text(a.narinfo(cache, &p).await.unwrap()) == Some(before)
            }
        })
        .await;
        assert!(copied, "A never answered from a copy");
        // Whether A answers that the path is there, within a second.
        let a_holds = |held: bool| {
            let (a, cache, p) = (&a, &cache, &p);
            eventually(Duration::from_secs(1), move || async move {
                a.narinfo(cache, p).await.unwrap().is_some() == held
            })
        };
        // A change through B is heard by A within a second: a deletion, a new commit
        // over a copied miss, a NAR record.
        assert!(b.delete_narinfo(&cache, &p, &[]).await.unwrap());
        assert!(a_holds(false).await);
        b.commit_narinfo(&cache, &p, &record, &[], None)
            .await
            .unwrap();
        assert!(a_holds(true).await);
        assert_eq!(a.served_nar(&cache, &record.nar_hash).await.unwrap(), None);
        b.put_nar(&record.nar_hash, &nar_record(1)).await.unwrap();
        let served = eventually(Duration::from_secs(1), || async {
            a.served_nar(&cache, &record.nar_hash).await.unwrap() == Some(nar_record(1))
        });
        assert!(served.await);
        // A deletion A never hears of is not answered past a barrier.
        raw.execute("DELETE FROM narinfos", &[]).await.unwrap();
        raw.execute("DELETE FROM nars", &[]).await.unwrap();
        assert!(a.narinfo(&cache, &p).await.unwrap().is_some(), "copied");
        assert!(a
            .served_nar(&cache, &record.nar_hash)
            .await
            .unwrap()
            .is_some());
        assert!(b_coord.barrier(Duration::from_secs(10)).await);
        assert_eq!(a.narinfo(&cache, &p).await.unwrap(), None);
        assert_eq!(a.served_nar(&cache, &record.nar_hash).await.unwrap(), None);
        // A cache purged: one notice drops every copy.
        b.commit_narinfo(&cache, &p, &record, &[], None)
            .await
            .unwrap();
        assert!(a_holds(true).await);
        b.delete_cache(&cache).await.unwrap();
        assert!(a_holds(false).await);
        // A session lost may have missed notices: its copies go with it.
        b.commit_narinfo(&cache, &p, &record, &[], None)
            .await
            .unwrap();
        assert!(a_holds(true).await);
        // Only the coordination sessions end (the pools stay up and answer); once
        // both are back, the copy made before is not answered, though nothing said
        // the path was deleted meanwhile.
        let sessions = "SELECT count(*) FROM pg_stat_activity \
                        WHERE application_name = 'cachet (coordination)' AND backend_start > $1";
        let cut: std::time::SystemTime = raw.query_one("SELECT now()", &[]).await.unwrap().get(0);
        raw.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = 'cachet (coordination)'",
            &[],
        )
        .await
        .unwrap();
        let back = eventually(Duration::from_secs(10), || async {
            let n: i64 = raw.query_one(sessions, &[&cut]).await.unwrap().get(0);
            n == 2
        });
        assert!(back.await);
        raw.execute("DELETE FROM narinfos", &[]).await.unwrap();
        // Past the next session's first heartbeat too, when copies are used again.
        let stale = eventually(Duration::from_secs(4), || async {
            a.narinfo(&cache, &p).await.unwrap().is_some()
        });
        assert!(!stale.await, "a copy from before the restart was answered");
    }
}
