//! UDP bypasses smoltcp: datagrams from the application are grouped by their source address
//! (one flow per application socket, talking to any number of destinations, as a full-cone
//! NAT would) in a table that forgets flows idle for too long.
//!
//! The table is sans-IO: it maps addresses to flow ids and tells when flows expire; the driver
//! owns the channels behind the ids.
//!
//! The driver asks for expired flows and the next deadline on every wake, so neither may scan
//! the table: deadlines sit in a heap, earliest first, one per flow as it was when last pushed.
//! Activity only updates the flow's `last` (no heap work per datagram); when a deadline comes
//! due and the flow turns out to have been used since, it goes back with its new deadline.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use smoltcp::time::Instant;

/// A flow's number in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UdpFlowId(u64);

#[derive(Debug)]
struct Entry {
    id: UdpFlowId,
    last: Instant,
}

/// What [`FlowTable::lookup`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// A flow already carries this source.
    Existing(UdpFlowId),
    /// A new flow was created for it.
    New(UdpFlowId),
}

/// The UDP flows by application source address.
#[derive(Debug)]
pub struct FlowTable {
    entries: HashMap<SocketAddr, Entry>,
    /// `(deadline, src, id)`: at most one per live flow, never later than its real expiry
    /// (`last + idle`). Entries of removed flows stay until they come due and are skipped then
    /// (their id no longer matches), so the heap holds at most the flows created within one
    /// idle period.
    deadlines: BinaryHeap<Reverse<(Instant, SocketAddr, UdpFlowId)>>,
    idle: smoltcp::time::Duration,
    next: u64,
}

impl FlowTable {
    /// A table whose flows expire after `idle` without a datagram either way.
    pub fn new(idle: Duration) -> Self {
        Self {
            entries: HashMap::new(),
            deadlines: BinaryHeap::new(),
            idle: idle.into(),
            next: 0,
        }
    }

    /// The flow for datagrams from `src`, created if needed; counts as activity.
    pub fn lookup(&mut self, now: Instant, src: SocketAddr) -> Lookup {
        if let Some(e) = self.entries.get_mut(&src) {
            e.last = now;
            return Lookup::Existing(e.id);
        }
        let id = UdpFlowId(self.next);
        self.next += 1;
        self.entries.insert(src, Entry { id, last: now });
        self.deadlines.push(Reverse((now + self.idle, src, id)));
        Lookup::New(id)
    }

    /// A reply went to `src`: counts as activity.
    pub fn touch(&mut self, now: Instant, src: SocketAddr) {
        if let Some(e) = self.entries.get_mut(&src) {
            e.last = now;
        }
    }

    /// Forgets a flow (its application side went away).
    pub fn remove(&mut self, src: SocketAddr) -> Option<UdpFlowId> {
        self.entries.remove(&src).map(|e| e.id)
    }

    /// Removes the flows idle since `now - idle` and returns them. Costs O(log n) per deadline
    /// come due, nothing for the flows that are not.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<(SocketAddr, UdpFlowId)> {
        let mut gone = Vec::new();
        while let Some(&Reverse((deadline, src, id))) = self.deadlines.peek() {
            if deadline > now {
                break;
            }
            self.deadlines.pop();
            let Some(e) = self.entries.get(&src).filter(|e| e.id == id) else {
                // Removed, and maybe a new flow from the same source since: not this one's.
                continue;
            };
            let expiry = e.last + self.idle;
            if expiry <= now {
                self.entries.remove(&src);
                gone.push((src, id));
            } else {
                // Used since the deadline was pushed.
                self.deadlines.push(Reverse((expiry, src, id)));
            }
        }
        gone
    }

    /// When [`FlowTable::handle_timeout`] must run next: the earliest deadline pushed, which
    /// may come before the flow really expires (it was used since), never after.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadlines.peek().map(|Reverse((at, ..))| *at)
    }

    /// Flows in the table.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flows_are_per_source_and_expire_when_idle() {
        let mut t = FlowTable::new(Duration::from_secs(30));
        let a: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        let b: SocketAddr = "10.0.0.1:5001".parse().unwrap();
        let t0 = Instant::from_secs(100);
        let Lookup::New(ida) = t.lookup(t0, a) else {
            panic!()
        };
        assert_eq!(t.lookup(t0, a), Lookup::Existing(ida));
        assert!(matches!(
            t.lookup(t0 + Duration::from_secs(20).into(), b),
            Lookup::New(_)
        ));
        assert_eq!(t.poll_timeout(), Some(t0 + Duration::from_secs(30).into()));
        // A reply keeps `a` alive.
        t.touch(t0 + Duration::from_secs(25).into(), a);
        assert!(
            t.handle_timeout(t0 + Duration::from_secs(31).into())
                .is_empty()
        );
        let gone = t.handle_timeout(t0 + Duration::from_secs(51).into());
        assert_eq!(gone.len(), 1);
        assert_eq!(t.len(), 1);
        let gone = t.handle_timeout(t0 + Duration::from_secs(56).into());
        assert_eq!(gone, vec![(a, ida)]);
        assert!(t.is_empty());
        // The same source later is a new flow.
        assert!(
            matches!(t.lookup(t0 + Duration::from_secs(60).into(), a), Lookup::New(id) if id != ida)
        );
    }

    #[test]
    fn deadlines_follow_activity_without_growing() {
        let secs = |n: u64| smoltcp::time::Duration::from_secs(n);
        let mut t = FlowTable::new(Duration::from_secs(30));
        let a: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        let t0 = Instant::from_secs(100);
        let Lookup::New(first) = t.lookup(t0, a) else {
            panic!()
        };
        // Many datagrams push nothing: one deadline for the flow.
        for s in 1..1000 {
            t.lookup(t0 + smoltcp::time::Duration::from_millis(s * 10), a);
        }
        assert_eq!(t.deadlines.len(), 1);
        // The first deadline is early (the flow was used since): a wake then finds it alive
        // and the next deadline is its real expiry.
        assert_eq!(t.poll_timeout(), Some(t0 + secs(30)));
        assert!(t.handle_timeout(t0 + secs(30)).is_empty());
        let last = t0 + smoltcp::time::Duration::from_millis(9990);
        assert_eq!(t.poll_timeout(), Some(last + secs(30)));
        assert_eq!(t.deadlines.len(), 1);
        // Removed and back as a new flow: the old flow's deadline does not expire the new one.
        assert_eq!(t.remove(a), Some(first));
        let Lookup::New(second) = t.lookup(t0 + secs(35), a) else {
            panic!()
        };
        assert!(t.handle_timeout(t0 + secs(40)).is_empty());
        assert_eq!(t.lookup(t0 + secs(40), a), Lookup::Existing(second));
        assert_eq!(t.handle_timeout(t0 + secs(70)), vec![(a, second)]);
        assert!(t.is_empty());
        assert_eq!(t.poll_timeout(), None);
    }
}
