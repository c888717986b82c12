//! Telling a slow peer from a busy server: the time spent waiting on a peer, and the
//! bytes it moved meanwhile. A peer that makes the server wait `limit` in all while it
//! moves fewer than `min_bytes` has stalled, whether it sends (or reads) nothing or a
//! byte a second. Time the server spends elsewhere, not waiting on the peer, does not
//! count. Used for request bodies (`crate::body`) and for responses
//! (`crate::server`).

use std::future::Future as _;
use std::pin::Pin;
use std::task::Context;
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// Polls a lazily made timer set to `deadline`; true once the deadline has passed
/// (otherwise the task is woken then).
pub fn expired(
    timer: &mut Option<Pin<Box<Sleep>>>,
    deadline: Instant,
    cx: &mut Context<'_>,
) -> bool {
    let timer = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
    if timer.deadline() != deadline {
        timer.as_mut().reset(deadline);
    }
    timer.as_mut().poll(cx).is_ready()
}

/// The progress of one direction of a transfer.
pub struct Stall {
    limit: Duration,
    min_bytes: u64,
    /// Time spent waiting since the peer last moved `min_bytes`.
    waited: Duration,
    /// Bytes since then.
    bytes: u64,
    /// When the current wait began.
    pending_since: Option<Instant>,
    timer: Option<Pin<Box<Sleep>>>,
}

impl Stall {
    /// A peer must move `min_bytes` per `limit` of waiting (0: any progress will do).
    pub fn new(limit: Duration, min_bytes: u64) -> Self {
        Self {
            limit,
            min_bytes,
            waited: Duration::ZERO,
            bytes: 0,
            pending_since: None,
            timer: None,
        }
    }

    /// The peer moved `n` bytes; a wait, if any, is over.
    pub fn progressed(&mut self, n: u64) {
        if let Some(since) = self.pending_since.take() {
            self.waited += since.elapsed();
        }
        self.bytes += n;
        if self.bytes >= self.min_bytes {
            (self.waited, self.bytes) = (Duration::ZERO, 0);
        }
    }

    /// The peer makes the server wait now: true when that makes it stalled, otherwise
    /// the task is woken when it would.
    pub fn waiting(&mut self, cx: &mut Context<'_>) -> bool {
        let since = *self.pending_since.get_or_insert_with(Instant::now);
        let deadline = since + self.limit.saturating_sub(self.waited);
        expired(&mut self.timer, deadline, cx)
    }
}
