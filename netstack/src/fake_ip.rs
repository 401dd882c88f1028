//! Fake-IP mode's table: every name an application looks up gets a made-up address pair
//! (IPv4 from 198.18.0.0/15, IPv6 from fc00::/18, the same slot number in both), and a
//! connection to such an address is dialed by *name*, so the exit resolves it and the client
//! side never does.
//!
//! The table is bounded: at most `capacity` names, by default the whole range (131,055). A
//! name keeps its addresses while it is used (looked up again, or an address of it dialed);
//! one idle for `idle` is forgotten. An address goes to a new name only after a quarantine
//! since its old name was last used (several DNS TTLs: programs that cached the old answer
//! have let it go), never-used addresses first, then freed ones oldest first. When every
//! address is taken by a name used within the quarantine, a new name gets none (the DNS
//! answer is a server failure) rather than silently re-pointing another program's cached
//! address to a name of someone else's choosing. Sans-IO: `now` is an argument.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

pub use smoltcp::time::Instant;

/// The IPv4 range fake addresses come from (RFC 2544's benchmarking range, never routed).
pub const V4_NET: (Ipv4Addr, u8) = (Ipv4Addr::new(198, 18, 0, 0), 15);
/// The IPv6 range fake addresses come from (unique-local).
pub const V6_NET: (Ipv6Addr, u8) = (Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 18);
/// Slot numbers below this are never handed out: the network address and the stack's own
/// addresses (198.18.0.1, fc00::1) live there.
const FIRST: u32 = 16;
/// Slots in the IPv4 range (the smaller one) after the reserved ones, minus the broadcast.
pub const MAX_CAPACITY: u32 = (1 << (32 - V4_NET.1)) - FIRST - 1;

/// The addresses of one name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FakeAddrs {
    /// The IPv4 address (answers A queries).
    pub v4: Ipv4Addr,
    /// The IPv6 address (answers AAAA queries).
    pub v6: Ipv6Addr,
}

#[derive(Debug)]
struct Slot {
    name: String,
    last: Instant,
}

/// Names and their fake addresses, both ways.
#[derive(Debug)]
pub struct FakeIpTable {
    by_name: HashMap<String, u32>,
    slots: Vec<Option<Slot>>,
    /// Slots by last use, oldest first.
    lru: BTreeSet<(Instant, u32)>,
    /// Slots freed by expiry, oldest first (all past their quarantine: `idle` is at least
    /// the quarantine).
    free: VecDeque<u32>,
    capacity: u32,
    idle: Duration,
    quarantine: Duration,
}

impl FakeIpTable {
    /// A table of at most `capacity` names (clamped to `1..=`[`MAX_CAPACITY`]) that forgets
    /// names idle for `idle`, and gives an address to a new name only `quarantine` after its
    /// old name was last used (at most `idle`).
    pub fn new(capacity: u32, idle: Duration, quarantine: Duration) -> Self {
        Self {
            by_name: HashMap::new(),
            slots: Vec::new(),
            lru: BTreeSet::new(),
            free: VecDeque::new(),
            capacity: capacity.clamp(1, MAX_CAPACITY),
            idle,
            quarantine: quarantine.min(idle),
        }
    }

    /// Whether `ip` lies in one of the fake ranges (assigned or not).
    pub fn is_fake(ip: IpAddr) -> bool {
        match ip.to_canonical() {
            IpAddr::V4(a) => {
                u32::from(a) >> (32 - V4_NET.1) == u32::from(V4_NET.0) >> (32 - V4_NET.1)
            }
            IpAddr::V6(a) => {
                u128::from(a) >> (128 - V6_NET.1) == u128::from(V6_NET.0) >> (128 - V6_NET.1)
            }
        }
    }

    /// The addresses of `name` (lowercase, no final dot), assigning them if it has none; a
    /// name that has them is marked used. `None` when every address is held by a name used
    /// within the quarantine.
    pub fn assign(&mut self, now: Instant, name: &str) -> Option<FakeAddrs> {
        if let Some(&slot) = self.by_name.get(name) {
            self.touch(now, slot);
            return Some(addrs(slot));
        }
        let slot = if (self.slots.len() as u32) < self.capacity {
            self.slots.push(None);
            self.slots.len() as u32 - 1
        } else if let Some(slot) = self.free.pop_front() {
            slot
        } else {
            // Full: the least recently used name gives its slot up, if its quarantine is over.
            let &(last, oldest) = self.lru.first()?;
            if now < last + self.quarantine.into() {
                return None;
            }
            self.lru.pop_first();
            self.forget(oldest);
            oldest
        };
        self.slots[slot as usize] = Some(Slot {
            name: name.to_owned(),
            last: now,
        });
        self.lru.insert((now, slot));
        self.by_name.insert(name.to_owned(), slot);
        Some(addrs(slot))
    }

    /// The name behind a fake address, marking it used; `None` for an address that is not
    /// fake or whose name was forgotten.
    pub fn name_of(&mut self, now: Instant, ip: IpAddr) -> Option<String> {
        let slot = slot_of(ip)?;
        let name = self.slots.get(slot as usize)?.as_ref()?.name.clone();
        self.touch(now, slot);
        Some(name)
    }

    /// Forgets names idle for longer than the idle time.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(&(last, slot)) = self.lru.first() {
            if now < last + self.idle.into() {
                break;
            }
            self.lru.pop_first();
            self.forget(slot);
            self.free.push_back(slot);
        }
    }

    /// When the next name expires.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.lru.first().map(|&(last, _)| last + self.idle.into())
    }

    /// Names held.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Whether no name is held.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    fn touch(&mut self, now: Instant, slot: u32) {
        if let Some(Some(s)) = self.slots.get_mut(slot as usize) {
            self.lru.remove(&(s.last, slot));
            s.last = s.last.max(now);
            self.lru.insert((s.last, slot));
        }
    }

    /// Drops a slot's name (its `lru` entry is the caller's business).
    fn forget(&mut self, slot: u32) {
        if let Some(old) = self.slots.get_mut(slot as usize).and_then(Option::take) {
            self.by_name.remove(&old.name);
        }
    }
}

fn addrs(slot: u32) -> FakeAddrs {
    let n = FIRST + slot;
    FakeAddrs {
        v4: Ipv4Addr::from(u32::from(V4_NET.0) + n),
        v6: Ipv6Addr::from(u128::from(V6_NET.0) + u128::from(n)),
    }
}

fn slot_of(ip: IpAddr) -> Option<u32> {
    if !FakeIpTable::is_fake(ip) {
        return None;
    }
    let n: u128 = match ip.to_canonical() {
        IpAddr::V4(a) => u128::from(u32::from(a) - u32::from(V4_NET.0)),
        IpAddr::V6(a) => u128::from(a) - u128::from(V6_NET.0),
    };
    let n = u32::try_from(n).ok()?;
    n.checked_sub(FIRST)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> Instant {
        Instant::from_secs(secs as i64)
    }

    fn table(capacity: u32, idle: u64, quarantine: u64) -> FakeIpTable {
        FakeIpTable::new(
            capacity,
            Duration::from_secs(idle),
            Duration::from_secs(quarantine),
        )
    }

    #[test]
    fn same_name_same_addresses_both_ways() {
        let mut t = table(100, 60, 60);
        let a = t.assign(at(0), "a.test").unwrap();
        let b = t.assign(at(0), "b.test").unwrap();
        assert_ne!(a, b);
        assert_eq!(t.assign(at(1), "a.test"), Some(a));
        assert_eq!(a.v4, Ipv4Addr::new(198, 18, 0, 16));
        assert_eq!(a.v6, "fc00::10".parse::<Ipv6Addr>().unwrap());
        assert_eq!(t.name_of(at(1), a.v4.into()).as_deref(), Some("a.test"));
        assert_eq!(t.name_of(at(1), b.v6.into()).as_deref(), Some("b.test"));
        // IPv4-mapped IPv6 is the IPv4 address.
        assert_eq!(
            t.name_of(at(1), a.v4.to_ipv6_mapped().into()).as_deref(),
            Some("a.test")
        );
        assert_eq!(t.name_of(at(1), Ipv4Addr::new(198, 19, 0, 9).into()), None);
        assert_eq!(t.name_of(at(1), Ipv4Addr::new(10, 0, 0, 1).into()), None);
        assert_eq!(t.name_of(at(1), Ipv4Addr::new(198, 18, 0, 1).into()), None);
    }

    #[test]
    fn ranges() {
        assert!(FakeIpTable::is_fake(
            Ipv4Addr::new(198, 19, 255, 255).into()
        ));
        assert!(!FakeIpTable::is_fake(Ipv4Addr::new(198, 20, 0, 0).into()));
        assert!(!FakeIpTable::is_fake(
            Ipv4Addr::new(198, 17, 255, 255).into()
        ));
        assert!(FakeIpTable::is_fake(
            "fc00:3fff::1".parse::<Ipv6Addr>().unwrap().into()
        ));
        assert!(!FakeIpTable::is_fake(
            "fc00:4000::1".parse::<Ipv6Addr>().unwrap().into()
        ));
        // The last slot of the largest table is still inside the IPv4 range, not broadcast.
        let last = addrs(MAX_CAPACITY - 1);
        assert_eq!(last.v4, Ipv4Addr::new(198, 19, 255, 254));
    }

    #[test]
    fn idle_names_expire_and_their_slots_are_reused_oldest_first() {
        let mut t = table(2, 60, 60);
        let a = t.assign(at(0), "a.test").unwrap();
        let b = t.assign(at(10), "b.test").unwrap();
        assert_eq!(t.poll_timeout(), Some(at(60)));
        // Dialing a's address keeps it alive.
        assert!(t.name_of(at(50), a.v4.into()).is_some());
        t.handle_timeout(at(70));
        assert_eq!(t.len(), 1, "b expired, a did not");
        assert_eq!(t.name_of(at(70), b.v4.into()), None);
        let c = t.assign(at(71), "c.test").unwrap();
        assert_eq!(c, b, "the freed slot is reused");
        assert_eq!(t.name_of(at(71), c.v4.into()).as_deref(), Some("c.test"));
        t.handle_timeout(at(200));
        assert!(t.is_empty());
        assert_eq!(t.poll_timeout(), None);
        // Freed in the order a, c: reused in that order (a LIFO would hand out c's, the
        // address a program saw most recently).
        assert_eq!(t.assign(at(201), "d.test"), Some(a));
        assert_eq!(t.assign(at(201), "e.test"), Some(c));
    }

    #[test]
    fn never_used_addresses_go_first() {
        let mut t = table(3, 60, 60);
        let a = t.assign(at(0), "a.test").unwrap();
        t.handle_timeout(at(100));
        let b = t.assign(at(100), "b.test").unwrap();
        assert_ne!(a, b, "a fresh address before a's old one");
    }

    #[test]
    fn a_full_table_refuses_rather_than_repoint_a_recent_name() {
        let mut t = table(3, 3600, 600);
        let a = t.assign(at(0), "a.test").unwrap();
        let b = t.assign(at(1), "b.test").unwrap();
        let c = t.assign(at(2), "c.test").unwrap();
        t.assign(at(3), "a.test");
        // Within the quarantine of b (the least recently used), a new name gets nothing, and
        // every address keeps its name.
        assert_eq!(t.assign(at(100), "attacker.test"), None);
        for (addrs, name) in [(a, "a.test"), (b, "b.test"), (c, "c.test")] {
            assert_eq!(t.name_of(at(100), addrs.v4.into()).as_deref(), Some(name));
        }
        // Those lookups used all three at 100; their quarantine ends at 700, then the least
        // recently used (by slot order among equals) gives way, and only it.
        assert_eq!(t.assign(at(699), "d.test"), None);
        let d = t.assign(at(700), "d.test").unwrap();
        assert_eq!(d, a);
        assert_eq!(t.len(), 3, "bounded");
        assert_eq!(t.name_of(at(700), d.v4.into()).as_deref(), Some("d.test"));
        assert_eq!(t.name_of(at(700), b.v4.into()).as_deref(), Some("b.test"));
        assert_eq!(t.name_of(at(700), c.v4.into()).as_deref(), Some("c.test"));
        // Many more names than slots, spread over time: never more than the capacity, every
        // answer consistent, and no address changes name within 600 s of its last use.
        let mut given: HashMap<Ipv4Addr, u64> = HashMap::new();
        for i in 0..1000 {
            let now = 1000 + i * 300;
            let name = format!("n{i}.test");
            if let Some(addrs) = t.assign(at(now), &name) {
                assert_eq!(t.name_of(at(now), addrs.v6.into()), Some(name));
                if let Some(&before) = given.get(&addrs.v4) {
                    assert!(
                        now >= before + 600,
                        "{} re-pointed after {} s",
                        addrs.v4,
                        now - before
                    );
                }
                given.insert(addrs.v4, now);
            }
            assert!(t.len() <= 3);
        }
    }

    #[test]
    fn the_whole_range_is_used() {
        let mut t = table(MAX_CAPACITY, 3600, 600);
        let mut seen = std::collections::HashSet::new();
        for i in 0..MAX_CAPACITY {
            let addrs = t.assign(at(0), &format!("n{i}")).unwrap();
            assert!(seen.insert(addrs.v4));
        }
        assert!(seen.contains(&Ipv4Addr::new(198, 19, 255, 254)));
        assert!(seen.contains(&Ipv4Addr::new(198, 18, 0, 16)));
        assert_eq!(t.assign(at(1), "one.more"), None);
    }

    #[test]
    fn capacity_is_clamped() {
        let t = table(u32::MAX, 1, 1);
        assert_eq!(t.capacity, MAX_CAPACITY);
        let t = table(0, 1, 5);
        assert_eq!(t.capacity, 1);
        assert_eq!(
            t.quarantine,
            Duration::from_secs(1),
            "never longer than idle"
        );
    }
}
