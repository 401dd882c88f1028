//! Names and overlay addresses of peers (seeds 001 and 003): how a node names the peers it
//! knows, and the addresses by which its applications reach them.
//!
//! ```text
//!  "nas.tox" ──────────┐
//!  "<76 hex>.tox" ─────┼─► TargetName::parse ─► Peer(name) / Peer(key) ─┐
//!  fd74:6f78:7078:… ───┤                                                ├─► OverlayTable ─► peer
//!  100.64.0.0/10 ──────┘                                                │
//!  PublicKey ─► overlay_v6 (pure) / v4 choices (pure, collisions settled per table) ─┘
//! ```
//!
//! Overlay addresses are a pure function of the public key, so anyone can compute a peer's
//! address from its ID, as in Yggdrasil and cjdns:
//!
//! * **IPv6**: the project's ULA prefix `fd74:6f78:7078::/48` (`fd`, then "tox" and "px" in
//!   ASCII), followed by the first 80 bits of SHA-256(`"proxy overlay v6"` ‖ key). Collisions
//!   need about 2^40 peers: none are handled.
//! * **IPv4**: inside `100.64.0.0/10` (the CGNAT block, as Tailscale uses it). Choice `i` of a
//!   key is the first 22 bits of SHA-256(`"proxy overlay v4"` ‖ key ‖ `i` as one byte), skipped
//!   when its last octet is 0 or 255. With only 4 million addresses, two keys of one node's
//!   peer list may want the same one: [`OverlayTable`] gives it to the lower key and moves the
//!   other to its next choice, so every node that knows the same peers agrees.
//!
//! Sans-IO and pure: it builds for wasm like the rest of the protocol cores.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

use crate::id::{PublicKey, ToxId};

/// The project's overlay IPv6 prefix, `fd74:6f78:7078::/48`.
pub const OVERLAY_V6_PREFIX: [u8; 6] = [0xfd, 0x74, 0x6f, 0x78, 0x70, 0x78];
/// The overlay IPv4 block, `100.64.0.0/10`.
pub const OVERLAY_V4_NET: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 0);
/// The overlay IPv4 block's prefix length.
pub const OVERLAY_V4_PREFIX_LEN: u8 = 10;
/// The top-level name under which peers are reached.
pub const TLD: &str = "tox";
/// How many IPv4 choices a key has before the table gives up on it (far more than any
/// peer list of this size can exhaust: 64 keys colliding 64 times in 4 million addresses).
pub const V4_CHOICES: u8 = 64;

/// Why a peer name did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// Empty, or longer than a DNS label's 63 characters.
    #[error("a peer name has 1 to 63 characters, not {0}")]
    Length(usize),
    /// A character other than a letter, digit or hyphen.
    #[error("a peer name has only letters, digits and hyphens (found {0:?})")]
    Character(char),
    /// A hyphen at either end.
    #[error("a peer name neither starts nor ends with a hyphen")]
    Hyphen,
    /// All digits: it would read as a number in URLs and in addresses.
    #[error("a peer name is not all digits")]
    Numeric,
}

/// A peer's name as a node calls it: one DNS label (letters, digits, hyphens; 1–63
/// characters; no hyphen at either end; not all digits), compared without regard to case
/// and kept in lower case.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerName(String);

impl PeerName {
    /// The name, in lower case.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for PeerName {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, NameError> {
        let len = s.chars().count();
        if !(1..=63).contains(&len) {
            return Err(NameError::Length(len));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
        {
            return Err(NameError::Character(c));
        }
        if s.starts_with('-') || s.ends_with('-') {
            return Err(NameError::Hyphen);
        }
        if s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(NameError::Numeric);
        }
        Ok(Self(s.to_ascii_lowercase()))
    }
}

impl fmt::Display for PeerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for PeerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerName({})", self.0)
    }
}

/// A host name under `.tox`, as an application asks for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetName {
    /// `NAME.tox`: a peer by the name this node gave it.
    Name(PeerName),
    /// `<76 hex digits>.tox` (a Tox ID) or `<64 hex digits>.tox` (a key): a peer by key.
    Key(PublicKey),
}

impl TargetName {
    /// Reads `host` (any case, one trailing dot allowed): `None` when it is not under `.tox`
    /// at all (an ordinary name), `Some(Err)` when it is but names no possible peer (so the
    /// caller refuses it rather than asking DNS: `.tox` names never leave the node).
    pub fn parse(host: &str) -> Option<Result<Self, NameError>> {
        let host = host.strip_suffix('.').unwrap_or(host);
        let dot = host.len().checked_sub(TLD.len() + 1)?;
        if !host.is_char_boundary(dot)
            || !host[dot..].starts_with('.')
            || !host[dot + 1..].eq_ignore_ascii_case(TLD)
        {
            return None;
        }
        let label = &host[..dot];
        if let Ok(id) = ToxId::from_str(label) {
            return Some(Ok(Self::Key(id.public_key())));
        }
        if let Ok(pk) = PublicKey::from_str(label) {
            return Some(Ok(Self::Key(pk)));
        }
        Some(PeerName::from_str(label).map(Self::Name))
    }
}

/// A key's overlay IPv6 address (see the module docs).
pub fn overlay_v6(pk: &PublicKey) -> Ipv6Addr {
    let hash = Sha256::new()
        .chain_update(b"proxy overlay v6")
        .chain_update(pk.0)
        .finalize();
    let mut bytes = [0u8; 16];
    bytes[..6].copy_from_slice(&OVERLAY_V6_PREFIX);
    bytes[6..].copy_from_slice(&hash[..10]);
    Ipv6Addr::from(bytes)
}

/// Choice `i` of a key's overlay IPv4 address, `None` when that choice lands on an address
/// ending in 0 or 255 (skipped).
pub fn overlay_v4_choice(pk: &PublicKey, i: u8) -> Option<Ipv4Addr> {
    let hash = Sha256::new()
        .chain_update(b"proxy overlay v4")
        .chain_update(pk.0)
        .chain_update([i])
        .finalize();
    let bits = u32::from_be_bytes([hash[0], hash[1], hash[2], hash[3]]) >> 10;
    let addr = Ipv4Addr::from(u32::from(OVERLAY_V4_NET) | bits);
    let last = addr.octets()[3];
    (last != 0 && last != 255).then_some(addr)
}

/// Whether `ip` is inside one of the overlay prefixes.
pub fn is_overlay(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V6(v6) => v6.octets()[..6] == OVERLAY_V6_PREFIX,
        IpAddr::V4(v4) => u32::from(v4) >> 22 == u32::from(OVERLAY_V4_NET) >> 22,
    }
}

/// The overlay addresses of one node's peers (itself included), collisions settled.
#[derive(Debug, Clone, Default)]
pub struct OverlayTable {
    v4_of: BTreeMap<PublicKey, Ipv4Addr>,
    by_v4: HashMap<Ipv4Addr, PublicKey>,
    by_v6: HashMap<Ipv6Addr, PublicKey>,
}

/// One key's overlay addresses in a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverlayAddrs {
    /// Its IPv6 address (the same in every table).
    pub v6: Ipv6Addr,
    /// Its IPv4 address in this table (`None` only if every choice was taken).
    pub v4: Option<Ipv4Addr>,
    /// Which choice it got: above 0 when a lower key took an earlier one (shown, so users
    /// can see why two nodes name a peer differently).
    pub v4_choice: u8,
}

impl OverlayTable {
    /// The table of `keys`: lower keys pick first, each its first free choice.
    pub fn new(keys: impl IntoIterator<Item = PublicKey>) -> Self {
        let mut keys: Vec<PublicKey> = keys.into_iter().collect();
        keys.sort();
        keys.dedup();
        let mut table = Self::default();
        for pk in keys {
            table.by_v6.insert(overlay_v6(&pk), pk);
            let free = (0..V4_CHOICES)
                .filter_map(|i| overlay_v4_choice(&pk, i))
                .find(|a| !table.by_v4.contains_key(a));
            if let Some(addr) = free {
                table.by_v4.insert(addr, pk);
                table.v4_of.insert(pk, addr);
            }
        }
        table
    }

    /// The peer an overlay address belongs to.
    pub fn peer_of(&self, ip: IpAddr) -> Option<PublicKey> {
        match ip {
            IpAddr::V4(v4) => self.by_v4.get(&v4).copied(),
            IpAddr::V6(v6) => self.by_v6.get(&v6).copied(),
        }
    }

    /// A key's addresses in this table; `None` for a key not in it.
    pub fn addrs(&self, pk: &PublicKey) -> Option<OverlayAddrs> {
        let v6 = overlay_v6(pk);
        if self.by_v6.get(&v6) != Some(pk) {
            return None;
        }
        let v4 = self.v4_of.get(pk).copied();
        let v4_choice = v4
            .and_then(|a| (0..V4_CHOICES).position(|i| overlay_v4_choice(pk, i) == Some(a)))
            .map_or(0, |i| i as u8);
        Some(OverlayAddrs { v6, v4, v4_choice })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn names_follow_dns_label_rules_and_ignore_case() {
        assert_eq!("NAS".parse::<PeerName>().unwrap().as_str(), "nas");
        assert_eq!(
            "My-Laptop2".parse::<PeerName>().unwrap(),
            "my-laptop2".parse().unwrap()
        );
        assert_eq!("".parse::<PeerName>(), Err(NameError::Length(0)));
        assert_eq!(
            "a".repeat(64).parse::<PeerName>(),
            Err(NameError::Length(64))
        );
        assert!("a".repeat(63).parse::<PeerName>().is_ok());
        assert_eq!("-nas".parse::<PeerName>(), Err(NameError::Hyphen));
        assert_eq!("nas-".parse::<PeerName>(), Err(NameError::Hyphen));
        assert_eq!("n.as".parse::<PeerName>(), Err(NameError::Character('.')));
        assert_eq!("nås".parse::<PeerName>(), Err(NameError::Character('å')));
        assert_eq!("1234".parse::<PeerName>(), Err(NameError::Numeric));
    }

    #[test]
    fn tox_names_are_told_from_ordinary_ones() {
        let pk = PublicKey([0xab; 32]);
        assert_eq!(TargetName::parse("example.com"), None);
        assert_eq!(TargetName::parse("tox"), None);
        assert_eq!(TargetName::parse("notox"), None);
        assert_eq!(TargetName::parse("x.toxic"), None);
        assert_eq!(
            TargetName::parse("NAS.TOX."),
            Some(Ok(TargetName::Name("nas".parse().unwrap())))
        );
        let hex: String = pk.0.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            TargetName::parse(&format!("{hex}.tox")),
            Some(Ok(TargetName::Key(pk)))
        );
        // A Tox ID names its key; one with a typo is no peer at all (and not asked of DNS).
        let id = ToxId::new(pk, [1, 2, 3, 4]).to_string();
        assert_eq!(
            TargetName::parse(&format!("{id}.tox")),
            Some(Ok(TargetName::Key(pk)))
        );
        let mut typo = id.clone();
        typo.replace_range(0..1, if id.starts_with('A') { "B" } else { "A" });
        assert!(matches!(
            TargetName::parse(&format!("{typo}.tox")),
            Some(Err(_))
        ));
        assert!(matches!(TargetName::parse(".tox"), Some(Err(_))));
        assert!(matches!(TargetName::parse("a.b.tox"), Some(Err(_))));
    }

    #[test]
    fn overlay_addresses_are_in_their_prefixes_and_stable() {
        let pk = PublicKey([7; 32]);
        let v6 = overlay_v6(&pk);
        assert_eq!(v6.segments()[..3], [0xfd74, 0x6f78, 0x7078]);
        assert!(is_overlay(IpAddr::V6(v6)));
        assert_eq!(v6, overlay_v6(&pk), "a pure function of the key");
        for i in 0..V4_CHOICES {
            if let Some(a) = overlay_v4_choice(&pk, i) {
                assert!(is_overlay(IpAddr::V4(a)), "{a}");
            }
        }
        assert!(is_overlay("100.127.255.254".parse().unwrap()));
        assert!(!is_overlay("100.128.0.1".parse().unwrap()));
        assert!(!is_overlay("100.63.255.255".parse().unwrap()));
        assert!(!is_overlay("fd74:6f78:7079::1".parse().unwrap()));
    }

    #[test]
    fn colliding_keys_are_settled_the_same_way_in_any_order() {
        // Find two keys whose first IPv4 choices collide (22 bits: a few thousand tries).
        let first = |n: u32| {
            let mut k = [0u8; 32];
            k[..4].copy_from_slice(&n.to_be_bytes());
            let pk = PublicKey(k);
            (pk, overlay_v4_choice(&pk, 0))
        };
        let mut seen = HashMap::new();
        let (a, b) = (0u32..)
            .map(first)
            .filter_map(|(pk, a)| a.map(|a| (pk, a)))
            .find_map(|(pk, addr)| seen.insert(addr, pk).map(|other| (other, pk)))
            .unwrap();
        let (low, high) = if a < b { (a, b) } else { (b, a) };
        let t1 = OverlayTable::new([high, low]);
        let t2 = OverlayTable::new([low, high]);
        let (l, h) = (t1.addrs(&low).unwrap(), t1.addrs(&high).unwrap());
        assert_eq!(l.v4_choice, 0, "the lower key keeps its first choice");
        assert!(h.v4_choice > 0, "the higher key moves on");
        assert_ne!(l.v4, h.v4);
        assert_eq!(t2.addrs(&high), Some(h), "whatever the order given");
        assert_eq!(t1.peer_of(IpAddr::V4(h.v4.unwrap())), Some(high));
        assert_eq!(t1.peer_of(IpAddr::V6(l.v6)), Some(low));
        assert_eq!(t1.addrs(&PublicKey([9; 32])), None);
    }

    proptest! {
        #[test]
        fn parsing_any_host_never_panics(host in "\\PC{0,90}") {
            let _ = TargetName::parse(&host);
            let _ = host.parse::<PeerName>();
        }

        #[test]
        fn every_key_of_a_table_has_distinct_addresses(keys in proptest::collection::vec(any::<[u8; 32]>(), 0..40)) {
            let keys: Vec<PublicKey> = keys.into_iter().map(PublicKey).collect();
            let table = OverlayTable::new(keys.iter().copied());
            let mut v4s = std::collections::HashSet::new();
            for pk in &keys {
                let a = table.addrs(pk).unwrap();
                prop_assert_eq!(table.peer_of(IpAddr::V6(a.v6)), Some(*pk));
                let v4 = a.v4.unwrap();
                prop_assert_eq!(table.peer_of(IpAddr::V4(v4)), Some(*pk));
                v4s.insert(v4);
            }
            let distinct: std::collections::HashSet<_> = keys.iter().collect();
            prop_assert_eq!(v4s.len(), distinct.len());
        }
    }
}
