//! The receive budgets a mux draws on: its own, and the node's [`SharedBudget`] that many
//! muxes share (see the mux docs, "Memory").

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

    /// Takes up to `want` bytes, leaving `reserve` of the limit untouched, and returns how
    /// many it took (0 when spent).
    pub(crate) fn take_up_to(&self, want: usize, reserve: usize) -> usize {
        let mut used = self.0.used.load(Ordering::Relaxed);
        loop {
            let take = want.min(self.0.limit.saturating_sub(reserve).saturating_sub(used));
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

/// The receive budgets a mux draws on: its own and the node's.
#[derive(Debug)]
pub(super) struct Budgets {
    pub(super) limit: usize,
    pub(super) used: usize,
    pub(super) shared: Option<SharedBudget>,
    /// What `used` holds of `shared`; given back at once when the mux fails or drops.
    pub(super) shared_held: usize,
}

impl Budgets {
    /// Takes up to `want` bytes from both budgets for a new stream's initial window; returns
    /// what it took.
    pub(super) fn take_up_to(&mut self, want: u32) -> u32 {
        self.take(want, false)
    }

    /// Takes up to `want` bytes from both budgets to grow a window, leaving a quarter of each
    /// for new streams' initial windows (so that streams holding grown windows never make the
    /// peer's next streams be refused); returns what it took.
    pub(super) fn take_for_growth(&mut self, want: u32) -> u32 {
        self.take(want, true)
    }

    fn take(&mut self, want: u32, growth: bool) -> u32 {
        let reserve = |limit: usize| if growth { limit / 4 } else { 0 };
        let room = self
            .limit
            .saturating_sub(reserve(self.limit))
            .saturating_sub(self.used);
        let want = (want as usize).min(room);
        let got = match &self.shared {
            Some(shared) if want > 0 => shared.take_up_to(want, reserve(shared.limit())),
            Some(_) => 0,
            None => want,
        };
        self.used += got;
        if self.shared.is_some() {
            self.shared_held += got;
        }
        // `got <= want <= u32::MAX`.
        got as u32
    }

    /// Takes `n` bytes even beyond the limits.
    pub(super) fn force(&mut self, n: u32) {
        let n = n as usize;
        self.used += n;
        if let Some(shared) = &self.shared {
            shared.force(n);
            self.shared_held += n;
        }
    }

    /// Gives back `n` bytes taken earlier.
    pub(super) fn give(&mut self, n: u32) {
        let n = n as usize;
        self.used -= n;
        let back = n.min(self.shared_held);
        if let Some(shared) = &self.shared {
            shared.give(back);
        }
        self.shared_held -= back;
    }

    /// Returns everything held of the shared budget: the mux is dead.
    pub(super) fn release_shared(&mut self) {
        if let Some(shared) = &self.shared {
            shared.give(self.shared_held);
        }
        self.shared_held = 0;
    }
}

impl Drop for Budgets {
    fn drop(&mut self) {
        self.release_shared();
    }
}
