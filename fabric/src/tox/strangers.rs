//! Friends accepted only because the policy allows anyone (`--allow-any`): strangers.
//!
//! Anyone who knows a public exit's ID can mint keys and send friend requests. Each accepted
//! friend costs c-toxcore onion lookups and a place in the friend list, so strangers are kept
//! on a short leash: acceptances are rate-limited by a token bucket and capped in number, a
//! stranger from whom no packet came for [`STRANGER_IDLE`] is removed again (a session pings
//! every 10 s, so a stranger with a session never goes idle), and the node never writes them
//! to `tox.save`. This is plain bookkeeping, with time passed in, so it is tested without Tox.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::id::PublicKey;

/// A stranger from whom nothing came for this long is removed.
pub(crate) const STRANGER_IDLE: Duration = Duration::from_secs(5 * 60);
/// Strangers accepted in a burst.
pub(crate) const STRANGER_BURST: u32 = 8;
/// After a burst, one more stranger every this long.
pub(crate) const STRANGER_REFILL: Duration = Duration::from_secs(10);
/// Strangers that may be friends at once.
pub(crate) const MAX_STRANGERS: usize = 64;

/// A token bucket: up to `capacity` tokens, one more every `period`.
#[derive(Debug)]
pub(crate) struct TokenBucket {
    capacity: u32,
    period: Duration,
    tokens: u32,
    /// When the next token is due, if the bucket is not full.
    refilled_at: Instant,
}

impl TokenBucket {
    /// A full bucket at `now`.
    pub(crate) fn new(capacity: u32, period: Duration, now: Instant) -> Self {
        Self {
            capacity,
            period,
            tokens: capacity,
            refilled_at: now,
        }
    }

    /// Takes a token if there is one at `now`.
    pub(crate) fn take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }

    fn refill(&mut self, now: Instant) {
        if self.tokens >= self.capacity {
            self.refilled_at = now;
            return;
        }
        let elapsed = now.saturating_duration_since(self.refilled_at);
        let periods = elapsed.as_nanos() / self.period.as_nanos().max(1);
        let add = u32::try_from(periods).unwrap_or(u32::MAX);
        if add == 0 {
            return;
        }
        self.tokens = self.tokens.saturating_add(add).min(self.capacity);
        // Keep the part of a period already elapsed, unless the bucket filled up.
        self.refilled_at = if self.tokens == self.capacity {
            now
        } else {
            self.refilled_at + self.period * add
        };
    }
}

/// Why a stranger's request was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Too many requests lately.
    RateLimited,
    /// Too many strangers already.
    Full,
}

/// The strangers among a node's friends, and when each was last heard from.
#[derive(Debug)]
pub(crate) struct Strangers {
    bucket: TokenBucket,
    last_heard: HashMap<PublicKey, Instant>,
}

impl Strangers {
    pub(crate) fn new(now: Instant) -> Self {
        Self {
            bucket: TokenBucket::new(STRANGER_BURST, STRANGER_REFILL, now),
            last_heard: HashMap::new(),
        }
    }

    /// Whether a request from `pk` may be accepted now; if so `pk` counts as a stranger from
    /// now on.
    pub(crate) fn admit(&mut self, pk: PublicKey, now: Instant) -> Result<(), Refusal> {
        if let Some(at) = self.last_heard.get_mut(&pk) {
            *at = now;
            return Ok(());
        }
        if self.last_heard.len() >= MAX_STRANGERS {
            return Err(Refusal::Full);
        }
        if !self.bucket.take(now) {
            return Err(Refusal::RateLimited);
        }
        self.last_heard.insert(pk, now);
        Ok(())
    }

    /// Something came from `pk`, if it is a stranger.
    pub(crate) fn heard(&mut self, pk: &PublicKey, now: Instant) {
        if let Some(at) = self.last_heard.get_mut(pk) {
            *at = now;
        }
    }

    pub(crate) fn contains(&self, pk: &PublicKey) -> bool {
        self.last_heard.contains_key(pk)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.last_heard.is_empty()
    }

    /// Every stranger.
    pub(crate) fn all(&self) -> impl Iterator<Item = PublicKey> + '_ {
        self.last_heard.keys().copied()
    }

    /// Forgets `pk` (removed by other means).
    pub(crate) fn forget(&mut self, pk: &PublicKey) {
        self.last_heard.remove(pk);
    }

    /// Takes out the strangers idle for [`STRANGER_IDLE`] at `now`: the caller removes them
    /// from Tox.
    pub(crate) fn expire(&mut self, now: Instant) -> Vec<PublicKey> {
        let idle: Vec<PublicKey> = self
            .last_heard
            .iter()
            .filter(|(_, at)| now.saturating_duration_since(**at) >= STRANGER_IDLE)
            .map(|(pk, _)| *pk)
            .collect();
        for pk in &idle {
            self.last_heard.remove(pk);
        }
        idle
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pk(n: u8) -> PublicKey {
        PublicKey([n; 32])
    }

    #[test]
    fn the_bucket_allows_a_burst_then_one_per_period() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut b = TokenBucket::new(3, s(10), t0);
        assert!(b.take(t0) && b.take(t0) && b.take(t0));
        assert!(!b.take(t0));
        assert!(!b.take(t0 + s(9)));
        assert!(b.take(t0 + s(10)));
        assert!(!b.take(t0 + s(15)));
        // The half period already elapsed counts towards the next token.
        assert!(b.take(t0 + s(20)));
        // A long pause refills to the capacity, no further.
        let later = t0 + s(1000);
        assert!(b.take(later) && b.take(later) && b.take(later));
        assert!(!b.take(later));
    }

    #[test]
    fn strangers_are_rate_limited_capped_and_expire_when_idle() {
        let t0 = Instant::now();
        let mut s = Strangers::new(t0);
        for n in 0..STRANGER_BURST as u8 {
            assert_eq!(s.admit(pk(n), t0), Ok(()));
        }
        assert_eq!(s.admit(pk(100), t0), Err(Refusal::RateLimited));
        // A known stranger asking again costs nothing.
        assert_eq!(s.admit(pk(0), t0), Ok(()));
        let t1 = t0 + STRANGER_REFILL;
        assert_eq!(s.admit(pk(100), t1), Ok(()));
        assert!(s.contains(&pk(100)));

        // Stranger 1 keeps talking; the others go quiet.
        let half = t0 + STRANGER_IDLE / 2;
        s.heard(&pk(1), half);
        s.heard(&pk(200), half);
        assert!(
            !s.contains(&pk(200)),
            "hearing from a non-stranger adds nothing"
        );
        let mut gone = s.expire(t0 + STRANGER_IDLE);
        gone.sort();
        let want: Vec<PublicKey> = (0..STRANGER_BURST as u8)
            .filter(|&n| n != 1)
            .map(pk)
            .collect();
        assert_eq!(gone, want);
        assert_eq!(s.all().collect::<Vec<_>>().len(), 2);
        assert_eq!(s.expire(t1 + STRANGER_IDLE), vec![pk(100)]);
        assert_eq!(s.expire(half + STRANGER_IDLE), vec![pk(1)]);
        assert!(s.is_empty());
    }

    #[test]
    fn at_most_max_strangers_at_once() {
        let mut now = Instant::now();
        let mut s = Strangers::new(now);
        for n in 0..MAX_STRANGERS {
            now += STRANGER_REFILL;
            let key = PublicKey(
                [(n % 256) as u8, (n / 256) as u8, 1, 1]
                    .repeat(8)
                    .try_into()
                    .unwrap(),
            );
            assert_eq!(s.admit(key, now), Ok(()), "{n}");
        }
        now += STRANGER_REFILL * 100;
        assert_eq!(s.admit(pk(255), now), Err(Refusal::Full));
        let first = s.all().next().unwrap();
        s.forget(&first);
        assert_eq!(s.admit(pk(255), now), Ok(()));
    }
}
