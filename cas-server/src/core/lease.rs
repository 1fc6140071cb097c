//! Leases: what garbage collection must not condemn or delete while the
//! server runs, because a client or a request builds on it.
//!
//! - a dedup answer leases the xorbs it names (the client will reference
//!   them in a shard without uploading them);
//! - a xorb upload holds its xorb while it is stored and leases it after
//!   (its shard is not committed yet);
//! - a shard commit holds the xorbs and files it names and leases them
//!   after (the files are not rooted until a root or a commit names them);
//! - a root or a repository commit holds the files it names while it
//!   checks them, and leases them after (a run planned before it saw them
//!   dead).
//!
//! A hold is a guard ([`LeaseGuard`]); [`LeaseGuard::keep`] turns it into a
//! lease for the term (the grace period) when the request succeeded, hand
//! over hand, so the target is never unprotected in between. A failed
//! request leaves nothing behind.
//!
//! The fence makes "leased?" and garbage collection's act one step: gc
//! checks a xorb and withdraws it from dedup, or checks it and takes it
//! out of the index, under the write side; a dedup query reads the index
//! and leases what it found under the read side. A hold on a xorb being
//! deleted waits until the deletion is over, then finds it gone (an upload
//! stores it again; a shard naming it is refused as naming an unknown
//! xorb). So a xorb is either leased before gc looks at it (and kept), or
//! gone before anyone builds on it: never "committed but deleted".
//!
//! Leases live in one process. Across nodes sharing a bucket, and across a
//! restart, only the grace period protects (docs/OPERATIONS.md).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard};
use std::time::Duration;

use cas_protocol::{FileHash, XorbHash};
use tokio::sync::Notify;

/// The time leases and garbage collection go by: the system clock, or (for
/// simulations) one that moves only when told.
#[derive(Debug, Clone, Default)]
pub struct Clock(Option<Arc<AtomicU64>>);

impl Clock {
    /// A clock at `start_ms` that moves only by [`Clock::advance`].
    pub fn manual(start_ms: u64) -> Self {
        Self(Some(Arc::new(AtomicU64::new(start_ms))))
    }

    /// Milliseconds since the epoch.
    pub fn now_ms(&self) -> u64 {
        match &self.0 {
            Some(ms) => ms.load(Ordering::SeqCst),
            None => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        }
    }

    /// Moves a manual clock on (the system clock moves by itself).
    pub fn advance(&self, by: Duration) {
        if let Some(ms) = &self.0 {
            ms.fetch_add(by.as_millis() as u64, Ordering::SeqCst);
        }
    }
}

/// What a lease protects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Leased {
    Xorb(XorbHash),
    File(FileHash),
}

#[derive(Default)]
struct Entry {
    /// Guards holding it now.
    held: u32,
    /// Leased until then (ms since the epoch).
    until_ms: u64,
}

#[derive(Default)]
struct State {
    entries: HashMap<Leased, Entry>,
    /// Xorbs gc is deleting: holds on them wait.
    deleting: HashSet<XorbHash>,
    /// Expired entries are dropped when the map grows past this.
    prune_at: usize,
}

/// Entries kept before the first prune of expired ones.
const MIN_PRUNE_AT: usize = 4096;

/// The leases of one server process.
pub(crate) struct Leases {
    clock: Clock,
    term: Duration,
    fence: RwLock<()>,
    state: Mutex<State>,
    /// Woken when a deletion ends.
    deleted: Notify,
}

impl Leases {
    pub(crate) fn new(clock: Clock, term: Duration) -> Self {
        Self {
            clock,
            term,
            fence: RwLock::default(),
            state: Mutex::new(State {
                prune_at: MIN_PRUNE_AT,
                ..State::default()
            }),
            deleted: Notify::new(),
        }
    }

    pub(crate) fn clock(&self) -> &Clock {
        &self.clock
    }

    pub(crate) fn term(&self) -> Duration {
        self.term
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn until(&self) -> u64 {
        self.clock
            .now_ms()
            .saturating_add(self.term.as_millis() as u64)
    }

    /// The read side of the fence: held while an index read and the leases
    /// it leads to are taken together (a dedup answer).
    pub(crate) fn read_fence(&self) -> RwLockReadGuard<'_, ()> {
        self.fence.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Leases `targets` for the term (a dedup answer's xorbs); call with
    /// the read fence held since they were read.
    pub(crate) fn lease(&self, targets: impl IntoIterator<Item = Leased>) {
        let until = self.until();
        let mut s = self.state();
        for t in targets {
            let e = s.entries.entry(t).or_default();
            e.until_ms = e.until_ms.max(until);
        }
        let now = self.clock.now_ms();
        if s.entries.len() > s.prune_at {
            s.entries.retain(|_, e| e.held > 0 || e.until_ms > now);
            s.prune_at = (2 * s.entries.len()).max(MIN_PRUNE_AT);
        }
    }

    /// Holds `targets` until the guard drops; waits while gc deletes one
    /// of them.
    pub(crate) async fn hold(
        self: &Arc<Self>,
        targets: impl IntoIterator<Item = Leased>,
    ) -> LeaseGuard {
        let mut targets: Vec<Leased> = targets.into_iter().collect();
        targets.sort_unstable();
        targets.dedup();
        loop {
            let deleted = self.deleted.notified();
            {
                let mut s = self.state();
                let busy = targets
                    .iter()
                    .any(|t| matches!(t, Leased::Xorb(x) if s.deleting.contains(x)));
                if !busy {
                    for t in &targets {
                        s.entries.entry(*t).or_default().held += 1;
                    }
                    return LeaseGuard {
                        leases: self.clone(),
                        targets,
                        keep: false,
                    };
                }
            }
            // Created before the check, so a deletion ending in between
            // still wakes it.
            deleted.await;
        }
    }

    fn leased(&self, s: &State, t: &Leased, now: u64) -> bool {
        s.entries
            .get(t)
            .is_some_and(|e| e.held > 0 || e.until_ms > now)
    }

    /// Whether any of `targets` is leased or held now.
    pub(crate) fn any_leased(&self, targets: &[Leased]) -> bool {
        let now = self.clock.now_ms();
        let s = self.state();
        targets.iter().any(|t| self.leased(&s, t, now))
    }

    /// Runs gc's step `act` on `targets` unless one is leased (`None`),
    /// with the fence's write side held: no dedup answer, upload or commit
    /// can lease them meanwhile.
    pub(crate) fn unless_leased<T>(
        &self,
        targets: &[Leased],
        act: impl FnOnce() -> T,
    ) -> Option<T> {
        let _fence = self.fence.write().unwrap_or_else(PoisonError::into_inner);
        if self.any_leased(targets) {
            return None;
        }
        Some(act())
    }

    /// Splits `files` into those leased now (kept) and the others, which
    /// `remove` takes out of the index under the fence.
    pub(crate) fn remove_unleased<E>(
        &self,
        files: &[FileHash],
        remove: impl FnOnce(&[FileHash]) -> Result<(), E>,
    ) -> Result<Vec<FileHash>, E> {
        let _fence = self.fence.write().unwrap_or_else(PoisonError::into_inner);
        let now = self.clock.now_ms();
        let (kept, gone): (Vec<FileHash>, Vec<FileHash>) = {
            let s = self.state();
            files
                .iter()
                .partition(|f| self.leased(&s, &Leased::File(**f), now))
        };
        remove(&gone)?;
        Ok(kept)
    }

    /// Starts deleting `xorb` unless it is leased: until the returned guard
    /// drops, holds on it wait. `remove` (taking it out of the index) runs
    /// under the fence.
    pub(crate) fn start_delete<E>(
        self: &Arc<Self>,
        xorb: XorbHash,
        remove: impl FnOnce() -> Result<(), E>,
    ) -> Result<Option<Deleting>, E> {
        let _fence = self.fence.write().unwrap_or_else(PoisonError::into_inner);
        {
            let mut s = self.state();
            if self.leased(&s, &Leased::Xorb(xorb), self.clock.now_ms()) {
                return Ok(None);
            }
            s.deleting.insert(xorb);
        }
        let deleting = Deleting {
            leases: self.clone(),
            xorb,
        };
        remove()?;
        Ok(Some(deleting))
    }
}

/// Holds targets (see [`Leases::hold`]).
#[must_use = "a lease protects only while its guard lives"]
pub(crate) struct LeaseGuard {
    leases: Arc<Leases>,
    targets: Vec<Leased>,
    keep: bool,
}

impl LeaseGuard {
    /// Hands the hold over to a lease for the term (the request
    /// succeeded; what it made must survive until something roots it).
    pub(crate) fn keep(mut self) {
        self.keep = true;
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        let until = self.leases.until();
        let mut s = self.leases.state();
        for t in &self.targets {
            if let Some(e) = s.entries.get_mut(t) {
                e.held = e.held.saturating_sub(1);
                if self.keep {
                    e.until_ms = e.until_ms.max(until);
                }
                if e.held == 0 && e.until_ms == 0 {
                    s.entries.remove(t);
                }
            }
        }
    }
}

/// A xorb gc is deleting; holds on it wait until this drops.
pub(crate) struct Deleting {
    leases: Arc<Leases>,
    xorb: XorbHash,
}

impl Drop for Deleting {
    fn drop(&mut self) {
        self.leases.state().deleting.remove(&self.xorb);
        self.leases.deleted.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn x(n: u8) -> XorbHash {
        XorbHash::from_bytes([n; 32])
    }

    /// A hold protects while it lives; kept, it protects for the term and
    /// then expires; dropped unkept, it leaves nothing.
    #[tokio::test]
    async fn holds_become_leases_for_the_term() {
        let clock = Clock::manual(1_000);
        let leases = Arc::new(Leases::new(clock.clone(), Duration::from_secs(10)));
        let a = [Leased::Xorb(x(1))];
        let g = leases.hold(a).await;
        assert!(leases.any_leased(&a));
        drop(g);
        assert!(!leases.any_leased(&a), "a failed request leaves no lease");
        leases.hold(a).await.keep();
        clock.advance(Duration::from_secs(9));
        assert!(leases.any_leased(&a));
        assert!(leases.unless_leased(&a, || ()).is_none());
        clock.advance(Duration::from_secs(1));
        assert!(!leases.any_leased(&a));
        assert!(leases.unless_leased(&a, || ()).is_some());
        leases.lease([Leased::File(FileHash::from_bytes([2; 32]))]);
        let kept = leases
            .remove_unleased::<()>(
                &[FileHash::from_bytes([2; 32]), FileHash::from_bytes([3; 32])],
                |gone| {
                    assert_eq!(gone, [FileHash::from_bytes([3; 32])]);
                    Ok(())
                },
            )
            .unwrap();
        assert_eq!(kept, [FileHash::from_bytes([2; 32])]);
    }

    /// A hold on a xorb being deleted waits for the deletion to end; a
    /// xorb held is not deleted.
    #[tokio::test]
    async fn a_hold_waits_for_a_deletion() {
        let leases = Arc::new(Leases::new(Clock::default(), Duration::from_secs(10)));
        let deleting = leases
            .start_delete::<()>(x(1), || Ok(()))
            .unwrap()
            .expect("not leased");
        let l = leases.clone();
        let waiter = tokio::spawn(async move { l.hold([Leased::Xorb(x(1))]).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "waits while the xorb is deleted");
        drop(deleting);
        let g = waiter.await.unwrap();
        assert!(leases
            .start_delete::<()>(x(1), || Ok(()))
            .unwrap()
            .is_none());
        drop(g);
    }
}
