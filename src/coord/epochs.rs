//! Who may still be using what the garbage collector unlinks. Every download and every
//! upload enters the current epoch for as long as it runs; the collector, after it has
//! removed records (so that nothing new can find them), starts a new epoch and waits
//! until nothing that entered an earlier one is still running. Only then does it
//! delete the objects those records named: a download never loses the pack it reads,
//! and an upload never commits a chunk it found just before its record went.
//!
//! Epochs live in memory only: after a restart nothing from before it is running.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The epochs of one server.
#[derive(Default)]
pub struct Epochs {
    state: Mutex<State>,
    left: tokio::sync::Notify,
}

#[derive(Default)]
struct State {
    current: u64,
    /// How many are running in each epoch that still has any.
    running: BTreeMap<u64, usize>,
}

/// Held by a download or an upload for as long as it runs.
pub struct Guard {
    epochs: Arc<Epochs>,
    epoch: u64,
}

impl Epochs {
    /// Enters the current epoch.
    pub fn enter(self: &Arc<Self>) -> Guard {
        let mut s = self.state.lock().expect("never poisoned");
        let epoch = s.current;
        *s.running.entry(epoch).or_default() += 1;
        Guard {
            epochs: self.clone(),
            epoch,
        }
    }

    /// How many downloads and uploads are running, in all epochs.
    pub fn running(&self) -> usize {
        self.state
            .lock()
            .expect("never poisoned")
            .running
            .values()
            .sum()
    }

    /// Starts a new epoch and waits, at most `limit`, until nothing that entered an
    /// earlier one is still running. False if something still is.
    pub async fn barrier(&self, limit: Duration) -> bool {
        let before = {
            let mut s = self.state.lock().expect("never poisoned");
            s.current += 1;
            s.current
        };
        let drained = || {
            let s = self.state.lock().expect("never poisoned");
            s.running.range(..before).next().is_none()
        };
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            // Registered before the check, so a departure in between is not missed.
            let left = self.left.notified();
            if drained() {
                return true;
            }
            if tokio::time::timeout_at(deadline, left).await.is_err() {
                return drained();
            }
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let mut s = self.epochs.state.lock().expect("never poisoned");
        if let Some(n) = s.running.get_mut(&self.epoch) {
            *n -= 1;
            if *n == 0 {
                s.running.remove(&self.epoch);
                drop(s);
                self.epochs.left.notify_waiters();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_barrier_waits_for_what_entered_before_it_only() {
        let epochs = Arc::new(Epochs::default());
        assert!(epochs.barrier(Duration::ZERO).await);
        let old = epochs.enter();
        let waiting = {
            let epochs = epochs.clone();
            tokio::spawn(async move { epochs.barrier(Duration::from_secs(30)).await })
        };
        tokio::task::yield_now().await;
        // Entered after the barrier began: not waited for.
        let new = epochs.enter();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        assert_eq!(epochs.running(), 2);
        drop(old);
        assert!(waiting.await.unwrap());
        assert!(!epochs.barrier(Duration::from_millis(10)).await);
        drop(new);
        assert!(epochs.barrier(Duration::ZERO).await);
        assert_eq!(epochs.running(), 0);
    }
}
