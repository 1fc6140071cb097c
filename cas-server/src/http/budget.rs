//! One memory budget for every request body buffered at once (xorbs,
//! shards, dedup queries): bytes are reserved before they are buffered and
//! returned when the reservation drops, so a dozen held-open bodies cannot
//! take the server past the budget. A request that cannot get its bytes
//! waits, for a bounded time, instead of allocating.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Why a reservation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no memory for request bodies within {0:?}")]
pub struct BudgetTimeout(pub Duration);

/// The budget: one permit per byte.
#[derive(Debug)]
pub struct Budget {
    bytes: Arc<Semaphore>,
    total: usize,
    wait: Duration,
}

/// Bytes held from the budget until dropped.
#[derive(Debug)]
pub struct Reservation {
    permit: Option<OwnedSemaphorePermit>,
    wait: Duration,
    bytes: Arc<Semaphore>,
}

impl Budget {
    /// `total` bytes; a reservation waits at most `wait` for room.
    pub fn new(total: usize, wait: Duration) -> Self {
        Self {
            bytes: Arc::new(Semaphore::new(total.min(Semaphore::MAX_PERMITS))),
            total,
            wait,
        }
    }

    /// Bytes reserved right now (a gauge for /metrics).
    pub fn reserved(&self) -> usize {
        self.total.saturating_sub(self.bytes.available_permits())
    }

    /// An empty reservation, to grow as bytes arrive.
    pub fn empty(&self) -> Reservation {
        Reservation {
            permit: None,
            wait: self.wait,
            bytes: self.bytes.clone(),
        }
    }
}

impl Reservation {
    /// Bytes held.
    pub fn len(&self) -> usize {
        self.permit.as_ref().map_or(0, |p| p.num_permits())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Holds `n` more bytes, waiting for them at most the budget's wait.
    pub async fn grow(&mut self, n: usize) -> Result<(), BudgetTimeout> {
        let mut left = n;
        while left > 0 {
            // A semaphore hands out at most u32::MAX permits per call.
            let step = left.min(u32::MAX as usize);
            let more = tokio::time::timeout(
                self.wait,
                self.bytes.clone().acquire_many_owned(step as u32),
            )
            .await
            .map_err(|_| BudgetTimeout(self.wait))?
            .expect("the budget's semaphore is never closed");
            match &mut self.permit {
                Some(p) => p.merge(more),
                None => self.permit = Some(more),
            }
            left -= step;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reservations add up to at most the budget; a request that cannot
    /// get room waits and then fails; dropping a reservation returns its
    /// bytes.
    #[tokio::test(start_paused = true)]
    async fn reservations_share_one_budget() {
        let budget = Budget::new(100, Duration::from_secs(5));
        let mut a = budget.empty();
        a.grow(60).await.unwrap();
        a.grow(10).await.unwrap();
        assert_eq!((a.len(), budget.reserved()), (70, 70));
        let mut b = budget.empty();
        assert_eq!(b.grow(40).await, Err(BudgetTimeout(Duration::from_secs(5))));
        assert!(b.is_empty());
        b.grow(30).await.unwrap();
        assert_eq!(budget.reserved(), 100);
        // A waiting request gets its bytes as soon as another lets go.
        let mut c = budget.empty();
        {
            let waiting = c.grow(50);
            tokio::pin!(waiting);
            assert!(futures_util::FutureExt::now_or_never(&mut waiting).is_none());
            drop(a);
            waiting.await.unwrap();
        }
        assert_eq!(budget.reserved(), 80);
        drop((b, c));
        assert_eq!(budget.reserved(), 0);
    }
}
