//! Receive memory shared by many muxes: the node-wide part of the mux's byte budget.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A count of receive bytes that every mux holding a clone draws from: the credit its peers
/// may use, summed over all sessions of a node. Clones share one counter.
///
/// A mux takes from it when it lets a stream's window grow and gives back when the stream
/// ends or the mux is dropped; a mux that finds it spent keeps its streams at the credit
/// they have (the peers' writes wait), it never drops data.
#[derive(Clone)]
pub struct SharedBudget(Arc<Inner>);

struct Inner {
    limit: usize,
    used: AtomicUsize,
}

impl SharedBudget {
    /// A budget of `limit` bytes, none used.
    pub fn new(limit: usize) -> Self {
        Self(Arc::new(Inner {
            limit,
            used: AtomicUsize::new(0),
        }))
    }

    /// The limit it was made with.
    pub fn limit(&self) -> usize {
        self.0.limit
    }

    /// Bytes currently taken, by all its holders. May exceed the limit by the initial credit
    /// of streams our own applications opened (those are never refused).
    pub fn used(&self) -> usize {
        self.0.used.load(Ordering::Relaxed)
    }

    /// Takes up to `want` bytes and returns how many it took (0 when spent).
    pub(crate) fn take_up_to(&self, want: usize) -> usize {
        let mut used = self.0.used.load(Ordering::Relaxed);
        loop {
            let take = want.min(self.0.limit.saturating_sub(used));
            if take == 0 {
                return 0;
            }
            match self.0.used.compare_exchange_weak(
                used,
                used + take,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return take,
                Err(now) => used = now,
            }
        }
    }

    /// Takes `n` bytes even beyond the limit.
    pub(crate) fn force(&self, n: usize) {
        self.0.used.fetch_add(n, Ordering::Relaxed);
    }

    /// Returns `n` bytes taken earlier.
    pub(crate) fn give(&self, n: usize) {
        self.0.used.fetch_sub(n, Ordering::Relaxed);
    }
}

impl PartialEq for SharedBudget {
    /// The same counter, not merely the same figures.
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for SharedBudget {}

impl fmt::Debug for SharedBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedBudget")
            .field("limit", &self.limit())
            .field("used", &self.used())
            .finish()
    }
}
