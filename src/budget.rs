//! Memory shared by many requests, counted in bytes.
//!
//! Uploads reserve, before they read their body past the first bytes, the most they
//! can use: stage buffers, packs and batches (fixed by the settings) and their decoder
//! (named by the stream itself). An upload that does not fit waits; one that never
//! could is refused. Reserving everything at once, in one step, is what keeps waiting
//! uploads from holding parts of the budget each other needs. Downloads take their
//! reads ahead from a budget of their own without waiting (`try_reserve`).

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Reservations are counted in KiB so that budgets of terabytes fit the semaphore.
const UNIT: u64 = 1024;

/// A shared byte budget.
#[derive(Clone)]
pub struct Budget {
    units: Arc<Semaphore>,
    total: u64,
}

/// Part of the budget, returned when dropped.
pub struct Reservation {
    _permit: OwnedSemaphorePermit,
}

impl Budget {
    /// A budget of `bytes`.
    pub fn new(bytes: u64) -> Self {
        let units = (bytes / UNIT).min(Semaphore::MAX_PERMITS as u64) as usize;
        Self {
            units: Arc::new(Semaphore::new(units)),
            total: units as u64 * UNIT,
        }
    }

    /// The whole budget in bytes.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Takes `bytes` if they are free now.
    pub fn try_reserve(&self, bytes: u64) -> Option<Reservation> {
        let units = u32::try_from(bytes.div_ceil(UNIT).max(1)).ok()?;
        let permit = self.units.clone().try_acquire_many_owned(units).ok()?;
        Some(Reservation { _permit: permit })
    }

    /// Waits until `bytes` are free and takes them; `None` when they never could be.
    pub async fn reserve(&self, bytes: u64) -> Option<Reservation> {
        let units = bytes.div_ceil(UNIT).max(1);
        if units * UNIT > self.total {
            return None;
        }
        let permit = self
            .units
            .clone()
            .acquire_many_owned(u32::try_from(units).ok()?)
            .await
            .expect("the budget's semaphore is never closed");
        Some(Reservation { _permit: permit })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn reservations_wait_for_room_and_the_impossible_is_refused() {
        let budget = Budget::new(10 * 1024 * 1024);
        assert!(budget.reserve(11 * 1024 * 1024).await.is_none());
        let a = budget.reserve(6 * 1024 * 1024).await.unwrap();
        let waiting = {
            let budget = budget.clone();
            tokio::spawn(async move { budget.reserve(6 * 1024 * 1024).await.is_some() })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !waiting.is_finished(),
            "no room until the first is returned"
        );
        // Room is given in turn: a waiter is not overtaken by a smaller request.
        assert!(budget.try_reserve(4 * 1024 * 1024).is_none());
        drop(a);
        assert!(waiting.await.unwrap());
    }
}
