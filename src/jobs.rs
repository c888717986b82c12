//! Maintenance that takes longer than a request: the garbage collection and the
//! verification run one at a time, in the background, and report their progress to
//! whoever polls (`cache-admin` draws it). Only the last job is remembered.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// How far a job has come: its phase, and the items and bytes of that phase so far.
#[derive(Default)]
pub struct Progress {
    phase: Mutex<&'static str>,
    items: AtomicU64,
    bytes: AtomicU64,
}

impl Progress {
    /// Starts a phase, its counts at zero.
    pub fn phase(&self, name: &'static str) {
        *self.phase.lock().expect("never poisoned") = name;
        self.items.store(0, Ordering::Relaxed);
        self.bytes.store(0, Ordering::Relaxed);
    }

    /// Counts items and bytes done in the phase.
    pub fn add(&self, items: u64, bytes: u64) {
        self.items.fetch_add(items, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// The phase, and its items and bytes so far.
    pub fn snapshot(&self) -> (&'static str, u64, u64) {
        (
            *self.phase.lock().expect("never poisoned"),
            self.items.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }
}

/// What a job is, as the admin API shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct JobStatus {
    /// Its number: counted from the server's start by one process, or the
    /// database's over replicas.
    pub id: u64,
    /// `gc` or `verify`.
    pub kind: String,
    /// When it started, in seconds since the epoch.
    pub started: u64,
    /// Its current phase.
    pub phase: String,
    /// Items done in the phase.
    pub items: u64,
    /// Bytes done in the phase.
    pub bytes: u64,
    /// Whether it has finished.
    pub done: bool,
    /// What it reports, once finished well.
    pub result: Option<serde_json::Value>,
    /// Why it failed, if it did.
    pub error: Option<String>,
}

struct Job {
    id: u64,
    kind: &'static str,
    started: u64,
    progress: Arc<Progress>,
    outcome: Option<Result<serde_json::Value, String>>,
}

/// The server's one job slot.
#[derive(Default)]
pub struct Jobs {
    last: Arc<Mutex<Option<Job>>>,
    next_id: AtomicU64,
}

/// A job was asked for while another runs.
#[derive(Debug)]
pub struct Busy {
    /// What runs.
    pub kind: String,
    /// Since when.
    pub started: u64,
}

impl Jobs {
    /// Starts `work` as a job of `kind` unless one is running; returns its id.
    pub fn start<W, F>(&self, kind: &'static str, work: W) -> Result<u64, Busy>
    where
        W: FnOnce(Arc<Progress>) -> F,
        F: Future<Output = Result<serde_json::Value, String>> + Send + 'static,
    {
        let mut last = self.last.lock().expect("never poisoned");
        if let Some(job) = last.as_ref().filter(|j| j.outcome.is_none()) {
            return Err(Busy {
                kind: job.kind.to_owned(),
                started: job.started,
            });
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let progress = Arc::new(Progress::default());
        let run = work(progress.clone());
        *last = Some(Job {
            id,
            kind,
            started: crate::clock::now(),
            progress,
            outcome: None,
        });
        let slot = self.last.clone();
        tokio::spawn(async move {
            // A panic is a failure of the job, not of the slot, which must come free.
            let outcome = match tokio::spawn(run).await {
                Ok(outcome) => outcome,
                Err(e) => Err(format!("the job failed: {e}")),
            };
            if let Err(e) = &outcome {
                tracing::error!(kind, error = %e, "maintenance job failed");
            }
            if let Some(job) = slot.lock().expect("never poisoned").as_mut() {
                if job.id == id {
                    job.outcome = Some(outcome);
                }
            }
        });
        Ok(id)
    }

    /// The job `id`, if it is the last one.
    pub fn status(&self, id: u64) -> Option<JobStatus> {
        let last = self.last.lock().expect("never poisoned");
        let job = last.as_ref().filter(|j| j.id == id)?;
        let (phase, items, bytes) = job.progress.snapshot();
        let (result, error) = match &job.outcome {
            None => (None, None),
            Some(Ok(v)) => (Some(v.clone()), None),
            Some(Err(e)) => (None, Some(e.clone())),
        };
        Some(JobStatus {
            id: job.id,
            kind: job.kind.to_owned(),
            started: job.started,
            phase: phase.to_owned(),
            items,
            bytes,
            done: job.outcome.is_some(),
            result,
            error,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_job_at_a_time_and_the_last_is_remembered() {
        let jobs = Jobs::default();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let id = jobs
            .start("gc", |p| async move {
                p.phase("marking");
                p.add(3, 10);
                rx.await.ok();
                Ok(serde_json::json!({"packs": 1}))
            })
            .unwrap();
        tokio::task::yield_now().await;
        let busy = jobs.start("verify", |_| async { Ok(serde_json::Value::Null) });
        assert_eq!(busy.unwrap_err().kind, "gc");
        tx.send(()).unwrap();
        let status = loop {
            let s = jobs.status(id).unwrap();
            if s.done {
                break s;
            }
            tokio::task::yield_now().await;
        };
        assert_eq!((status.phase.as_str(), status.items), ("marking", 3));
        assert_eq!(status.result, Some(serde_json::json!({"packs": 1})));
        let next = jobs
            .start("verify", |_| async { Err("broken".to_owned()) })
            .unwrap();
        assert!(jobs.status(id).is_none());
        let failed = loop {
            let s = jobs.status(next).unwrap();
            if s.done {
                break s;
            }
            tokio::task::yield_now().await;
        };
        assert_eq!(failed.error.as_deref(), Some("broken"));
    }
}
