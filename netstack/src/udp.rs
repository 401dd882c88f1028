//! UDP bypasses smoltcp: datagrams from the application are grouped by their source address
//! (one flow per application socket, talking to any number of destinations, as a full-cone
//! NAT would) in a table that forgets flows idle for too long.
//!
//! The table is sans-IO: it maps addresses to flow ids and tells when flows expire; the driver
//! owns the channels behind the ids.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use smoltcp::time::Instant;

/// A flow's number in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
    idle: Duration,
    next: u64,
}

impl FlowTable {
    /// A table whose flows expire after `idle` without a datagram either way.
    pub fn new(idle: Duration) -> Self {
        Self {
            entries: HashMap::new(),
            idle,
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

    /// Removes the flows idle since `now - idle` and returns them.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<(SocketAddr, UdpFlowId)> {
        let idle = self.idle.into();
        let mut gone = Vec::new();
        self.entries.retain(|src, e| {
            let keep = now - e.last < idle;
            if !keep {
                gone.push((*src, e.id));
            }
            keep
        });
        gone
    }

    /// When the oldest flow expires.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let idle: smoltcp::time::Duration = self.idle.into();
        self.entries.values().map(|e| e.last + idle).min()
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
}
