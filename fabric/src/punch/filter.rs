//! Which remote candidates we send anything to.
//!
//! A peer names the addresses we probe (UDP) and dial (TCP) for up to the punch timeout, and
//! the source of its authenticated probes becomes a candidate too. Without a filter an
//! allowed peer (anyone, under `--allow-any`) could aim that traffic at our own loopback
//! services or at hosts of our local networks, outside the exit policy that guards streams.
//! So a remote candidate must be an address a peer elsewhere can really have:
//!
//! | class | verdict |
//! |---|---|
//! | port 0 | refused |
//! | unspecified (`0.0.0.0/8`, `::`) | refused |
//! | multicast (`224.0.0.0/4`, `ff00::/8`), limited broadcast, the broadcast address of one of our networks | refused |
//! | link-local (`169.254.0.0/16`, `fe80::/10`) | refused: a peer on our link also has a routable address, and we never offer link-local ones ourselves |
//! | documentation, benchmarking, reserved (`192.0.0.0/24`, `192.0.2.0/24`, `198.18.0.0/15`, `198.51.100.0/24`, `203.0.113.0/24`, `240.0.0.0/4`, `2001:db8::/32`, `100::/64`, `64:ff9b::/96`, `fec0::/10`, v4-mapped and v4-compatible IPv6) | refused |
//! | loopback, private (`10/8`, `172.16/12`, `192.168/16`), CGNAT (`100.64/10`), ULA (`fc00::/7`) | only inside a network one of our own host candidates is on (same prefix as that interface), or (not loopback, not one of our own addresses) inside a private network this host has a route to |
//! | anything else (global unicast) | allowed |
//!
//! A route to a private network (a specific route of the main table, say `10.20.0.0/16 via
//! 10.1.0.1` in an office, or a VPN's) says that hosts there are reachable from here without
//! the default route: homes, offices and VPNs have such routed private networks, and a peer
//! on one has only its private address to offer. Only routes that lie inside one private,
//! CGNAT or ULA block count: the default route, and wide routes such as a VPN's `0.0.0.0/1`
//! halves, say nothing about where private hosts are.
//!
//! A reserved block is allowed after all when one of our own candidates (host or
//! server-reflexive) is inside it: then we live in a lab whose "Internet" is that block, as in
//! the network-namespace NAT tests, which use the documentation ranges for it. On the real
//! Internet our own addresses never are.
//!
//! Loopback follows the private rule: we offer loopback only when we have no other address
//! (a network namespace with only `lo`), and then a peer on the same machine is the only peer
//! there can be.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// A network one of our host candidates is on: an interface address and its prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalNetwork {
    /// The interface's address.
    pub addr: IpAddr,
    /// Leading bits that name the network (from the interface's netmask).
    pub prefix: u8,
}

impl LocalNetwork {
    /// Whether `ip` is inside this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                same_prefix(net.to_bits().into(), ip.to_bits().into(), self.prefix, 32)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                same_prefix(net.to_bits(), ip.to_bits(), self.prefix, 128)
            }
            _ => false,
        }
    }

    /// Whether `ip` is this IPv4 network's broadcast address (all host bits set).
    fn is_broadcast(&self, ip: IpAddr) -> bool {
        let IpAddr::V4(v4) = ip else {
            return false;
        };
        let host_bits = 32 - u32::from(self.prefix.min(32));
        // /31 and /32 have no broadcast address.
        let host_mask = ((1u64 << host_bits) - 1) as u32;
        host_bits >= 2 && self.contains(ip) && v4.to_bits() & host_mask == host_mask
    }
}

/// Whether the first `prefix` of `bits` bits of `a` and `b` agree.
fn same_prefix(a: u128, b: u128, prefix: u8, bits: u32) -> bool {
    let prefix = u32::from(prefix).min(bits);
    if prefix == 0 {
        return true;
    }
    (a ^ b) >> (bits - prefix) == 0
}

/// Why a remote candidate was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// Port 0.
    PortZero,
    /// An unspecified address.
    Unspecified,
    /// Multicast or broadcast.
    Multicast,
    /// Link-local.
    LinkLocal,
    /// Documentation, benchmarking or otherwise reserved.
    Reserved,
    /// Loopback, private, CGNAT or ULA, on none of our networks.
    NotOurNetwork,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::PortZero => "port 0",
            Self::Unspecified => "unspecified address",
            Self::Multicast => "multicast or broadcast address",
            Self::LinkLocal => "link-local address",
            Self::Reserved => "reserved or documentation address",
            Self::NotOurNetwork => "local-scope address on none of our networks",
        })
    }
}

/// The filter applied to a peer's candidates, built from our own host candidates' networks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddressFilter {
    networks: Vec<LocalNetwork>,
    /// Private networks this host routes to (not by its default route).
    routed: Vec<LocalNetwork>,
    /// All our own candidate addresses, server-reflexive ones included.
    own: Vec<IpAddr>,
    /// No filtering at all: for tests and benches that punch on loopback with cores built
    /// by hand. Never set on the paths a peer's candidates take in production.
    any: bool,
}

impl AddressFilter {
    /// A filter for a host whose candidates are on `networks`.
    pub fn new(networks: Vec<LocalNetwork>) -> Self {
        let own = networks.iter().map(|n| n.addr).collect();
        Self {
            networks,
            routed: Vec::new(),
            own,
            any: false,
        }
    }

    /// Adds the destinations of this host's specific routes (the main table's, default route
    /// excluded): a candidate inside one of them that lies within one private, CGNAT or ULA
    /// block is allowed, unless it is loopback or one of our own addresses. Other routes are
    /// ignored.
    pub fn with_routes(mut self, routes: impl IntoIterator<Item = LocalNetwork>) -> Self {
        self.routed
            .extend(routes.into_iter().filter(|r| is_private_network(*r)));
        self
    }

    /// Adds our server-reflexive addresses: a reserved block one of them is in is allowed.
    pub fn with_own(mut self, addrs: impl IntoIterator<Item = IpAddr>) -> Self {
        self.own.extend(addrs);
        self
    }

    /// A filter that lets everything through.
    pub fn any() -> Self {
        Self {
            networks: Vec::new(),
            routed: Vec::new(),
            own: Vec::new(),
            any: true,
        }
    }

    /// `Ok` if we may send to `addr`; otherwise why not.
    pub fn check(&self, addr: SocketAddr) -> Result<(), Refusal> {
        if self.any {
            return Ok(());
        }
        if addr.port() == 0 {
            return Err(Refusal::PortZero);
        }
        let ip = addr.ip();
        let scope = match ip {
            IpAddr::V4(v4) => v4_scope(v4),
            IpAddr::V6(v6) => v6_scope(v6),
        };
        let scope = match scope {
            Err(Refusal::Reserved)
                if reserved_block(ip).is_some_and(|b| self.own.iter().any(|&o| b.contains(o))) =>
            {
                Scope::Global
            }
            other => other?,
        };
        if self.networks.iter().any(|n| n.is_broadcast(ip)) {
            return Err(Refusal::Multicast);
        }
        match scope {
            Scope::Global => Ok(()),
            Scope::Local if self.networks.iter().any(|n| n.contains(ip)) => Ok(()),
            Scope::Local if self.is_routed(ip) => Ok(()),
            Scope::Local => Err(Refusal::NotOurNetwork),
        }
    }

    /// Whether `ip` is a host of a private network we route to (never loopback, never one of
    /// our own addresses: a peer must not aim our punching at our own services).
    fn is_routed(&self, ip: IpAddr) -> bool {
        !ip.is_loopback() && !self.own.contains(&ip) && self.routed.iter().any(|r| r.contains(ip))
    }
}

/// Whether `net` lies within one private (`10/8`, `172.16/12`, `192.168/16`), CGNAT
/// (`100.64/10`) or ULA (`fc00::/7`) block: its prefix is at least as long as the block's.
fn is_private_network(net: LocalNetwork) -> bool {
    let block = match net.addr {
        IpAddr::V4(v4) => match v4.octets() {
            [10, ..] => 8,
            [172, 16..=31, ..] => 12,
            [192, 168, ..] => 16,
            [100, 64..=127, ..] => 10,
            _ => return false,
        },
        IpAddr::V6(v6) if v6.segments()[0] & 0xfe00 == 0xfc00 => 7,
        IpAddr::V6(_) => return false,
    };
    net.prefix >= block
}

/// Where an address that is not refused outright may be reached.
enum Scope {
    /// Anywhere.
    Global,
    /// Only from its own network.
    Local,
}

/// The documentation, benchmarking or reserved block `ip` is in, if it is one a lab may use
/// as its Internet.
fn reserved_block(ip: IpAddr) -> Option<LocalNetwork> {
    let (addr, prefix): (IpAddr, u8) = match ip {
        IpAddr::V4(v4) => match v4.octets() {
            [192, 0, 2, _] | [198, 51, 100, _] | [203, 0, 113, _] => (ip, 24),
            [198, 18 | 19, ..] => (ip, 15),
            [240..=254, ..] => (ip, 4),
            _ => return None,
        },
        IpAddr::V6(v6) if v6.segments()[..2] == [0x2001, 0x0db8] => (ip, 32),
        IpAddr::V6(_) => return None,
    };
    Some(LocalNetwork { addr, prefix })
}

fn v4_scope(ip: Ipv4Addr) -> Result<Scope, Refusal> {
    let [a, b, c, _] = ip.octets();
    match (a, b, c) {
        (0, ..) => Err(Refusal::Unspecified),
        _ if ip.is_broadcast() || ip.is_multicast() => Err(Refusal::Multicast),
        (169, 254, _) => Err(Refusal::LinkLocal),
        (192, 0, 0 | 2) | (198, 18 | 19, _) | (198, 51, 100) | (203, 0, 113) => {
            Err(Refusal::Reserved)
        }
        (240..=255, ..) => Err(Refusal::Reserved),
        (127 | 10, ..) | (172, 16..=31, _) | (192, 168, _) | (100, 64..=127, _) => Ok(Scope::Local),
        _ => Ok(Scope::Global),
    }
}

fn v6_scope(ip: Ipv6Addr) -> Result<Scope, Refusal> {
    let s = ip.segments();
    if ip.is_unspecified() {
        return Err(Refusal::Unspecified);
    }
    if ip.is_loopback() {
        return Ok(Scope::Local);
    }
    if s[0] & 0xff00 == 0xff00 {
        return Err(Refusal::Multicast);
    }
    if s[0] & 0xffc0 == 0xfe80 {
        return Err(Refusal::LinkLocal);
    }
    let v4_embedded = s[..5] == [0; 5] && (s[5] == 0xffff || s[5] == 0);
    let reserved = (s[0] == 0x2001 && s[1] == 0x0db8)
        || s[..4] == [0x100, 0, 0, 0]
        || s[..6] == [0x64, 0xff9b, 0, 0, 0, 0]
        || s[0] & 0xffc0 == 0xfec0
        || v4_embedded;
    if reserved {
        return Err(Refusal::Reserved);
    }
    if s[0] & 0xfe00 == 0xfc00 {
        return Ok(Scope::Local);
    }
    Ok(Scope::Global)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(addr: &str, prefix: u8) -> LocalNetwork {
        LocalNetwork {
            addr: addr.parse().unwrap(),
            prefix,
        }
    }

    #[test]
    fn candidates_are_judged_by_address_class_and_our_networks() {
        // We sit on a home LAN, behind CGNAT on a second interface, and on a ULA network.
        let filter = AddressFilter::new(vec![
            net("192.168.1.20", 24),
            net("100.72.3.4", 16),
            net("fd00:1:2:3::5", 64),
            net("2a01:4f8::1", 64),
        ]);
        let cases: &[(&str, Result<(), Refusal>)] = &[
            // Public addresses: anyone may have them.
            ("203.1.113.7:4000", Ok(())),
            ("8.8.8.8:53", Ok(())),
            ("[2a02:1234::1]:4000", Ok(())),
            // Port 0 never.
            ("8.8.8.8:0", Err(Refusal::PortZero)),
            // Never anywhere.
            ("0.0.0.0:4000", Err(Refusal::Unspecified)),
            ("0.1.2.3:4000", Err(Refusal::Unspecified)),
            ("[::]:4000", Err(Refusal::Unspecified)),
            ("224.0.0.1:4000", Err(Refusal::Multicast)),
            ("239.255.255.250:1900", Err(Refusal::Multicast)),
            ("255.255.255.255:4000", Err(Refusal::Multicast)),
            ("192.168.1.255:4000", Err(Refusal::Multicast)),
            ("[ff02::1]:4000", Err(Refusal::Multicast)),
            ("169.254.1.1:4000", Err(Refusal::LinkLocal)),
            ("[fe80::1]:4000", Err(Refusal::LinkLocal)),
            ("192.0.2.1:4000", Err(Refusal::Reserved)),
            ("198.51.100.1:4000", Err(Refusal::Reserved)),
            ("203.0.113.9:4000", Err(Refusal::Reserved)),
            ("198.18.0.1:4000", Err(Refusal::Reserved)),
            ("192.0.0.8:4000", Err(Refusal::Reserved)),
            ("240.0.0.1:4000", Err(Refusal::Reserved)),
            ("[2001:db8::1]:4000", Err(Refusal::Reserved)),
            ("[64:ff9b::a00:1]:4000", Err(Refusal::Reserved)),
            ("[::ffff:127.0.0.1]:22", Err(Refusal::Reserved)),
            ("[::ffff:10.0.0.1]:22", Err(Refusal::Reserved)),
            ("[::127.0.0.1]:22", Err(Refusal::Reserved)),
            ("[fec0::1]:4000", Err(Refusal::Reserved)),
            // Local scope: only on a network of ours.
            ("192.168.1.33:4000", Ok(())),
            ("192.168.2.33:4000", Err(Refusal::NotOurNetwork)),
            ("10.0.0.1:22", Err(Refusal::NotOurNetwork)),
            ("172.16.5.5:4000", Err(Refusal::NotOurNetwork)),
            ("172.32.5.5:4000", Ok(())),
            ("100.72.200.1:4000", Ok(())),
            ("100.73.0.1:4000", Err(Refusal::NotOurNetwork)),
            ("100.128.0.1:4000", Ok(())),
            ("127.0.0.1:22", Err(Refusal::NotOurNetwork)),
            ("[::1]:22", Err(Refusal::NotOurNetwork)),
            ("[fd00:1:2:3::99]:4000", Ok(())),
            ("[fd00:1:2:4::99]:4000", Err(Refusal::NotOurNetwork)),
        ];
        for &(addr, expected) in cases {
            let addr: SocketAddr = addr.parse().unwrap();
            assert_eq!(filter.check(addr), expected, "{addr}");
        }
    }

    #[test]
    fn a_reserved_block_we_have_an_address_in_is_our_internet() {
        // The NAT tests: hosts on private LANs, their routers' public side in 203.0.113.0/24.
        let lab = AddressFilter::new(vec![net("10.0.1.2", 24)])
            .with_own(["203.0.113.2".parse().unwrap()]);
        assert_eq!(lab.check("203.0.113.6:4000".parse().unwrap()), Ok(()));
        assert_eq!(
            lab.check("198.51.100.1:4000".parse().unwrap()),
            Err(Refusal::Reserved)
        );
        assert_eq!(
            lab.check("10.0.2.2:4000".parse().unwrap()),
            Err(Refusal::NotOurNetwork)
        );
        // Never for the classes that are refused whatever we have.
        let odd = AddressFilter::new(Vec::new()).with_own(["127.0.0.1".parse().unwrap()]);
        assert_eq!(
            odd.check("127.0.0.1:22".parse().unwrap()),
            Err(Refusal::NotOurNetwork)
        );
    }

    #[test]
    fn loopback_is_allowed_only_to_a_host_that_offers_loopback_itself() {
        // A namespace with only `lo`: gathering offers 127.0.0.1, so a peer there is on this
        // machine.
        let filter = AddressFilter::new(vec![net("127.0.0.1", 8)]);
        assert_eq!(filter.check("127.0.0.1:5000".parse().unwrap()), Ok(()));
        assert_eq!(
            filter.check("192.168.1.1:5000".parse().unwrap()),
            Err(Refusal::NotOurNetwork)
        );
        assert_eq!(
            AddressFilter::new(Vec::new()).check("127.0.0.1:5000".parse().unwrap()),
            Err(Refusal::NotOurNetwork)
        );
        assert_eq!(
            AddressFilter::any().check("127.0.0.1:0".parse().unwrap()),
            Ok(())
        );
    }

    #[test]
    fn private_hosts_we_route_to_are_allowed_and_nothing_else_is() {
        // An office host on 10.1.0.0/24 with a route to the site's 10.20.0.0/16, a VPN's ULA
        // /48 and its 100.64/10 overlay; the default route and a VPN's 0.0.0.0/1 halves come
        // along with them, as a routing table lists them.
        let filter = AddressFilter::new(vec![net("10.1.0.7", 24)])
            .with_own(["10.20.0.5".parse().unwrap()])
            .with_routes([
                net("10.20.0.0", 16),
                net("fd12:3456:789a::", 48),
                net("100.64.0.0", 10),
                net("0.0.0.0", 0),
                net("0.0.0.0", 1),
                net("128.0.0.0", 1),
                net("::", 0),
                net("fc00::", 6),
                net("8.8.8.0", 24),
                net("127.0.0.0", 8),
                net("192.168.0.0", 15),
                net("172.16.0.0", 12),
            ]);
        let cases: &[(&str, Result<(), Refusal>)] = &[
            // On a network we are on, as before.
            ("10.1.0.9:4000", Ok(())),
            // Routed private networks.
            ("10.20.3.4:4000", Ok(())),
            ("[fd12:3456:789a:1::2]:4000", Ok(())),
            ("100.100.1.1:4000", Ok(())),
            ("172.20.1.1:4000", Ok(())),
            // Private, but no route of ours leads there other than a wide or default one.
            ("10.21.0.1:4000", Err(Refusal::NotOurNetwork)),
            ("192.168.1.1:4000", Err(Refusal::NotOurNetwork)),
            ("[fd99::1]:4000", Err(Refusal::NotOurNetwork)),
            // Our own address inside a routed network: never through a route.
            ("10.20.0.5:22", Err(Refusal::NotOurNetwork)),
            // Loopback and link-local stay refused whatever the routes say.
            ("127.0.0.1:22", Err(Refusal::NotOurNetwork)),
            ("[::1]:22", Err(Refusal::NotOurNetwork)),
            ("169.254.1.1:4000", Err(Refusal::LinkLocal)),
            ("[fe80::1]:4000", Err(Refusal::LinkLocal)),
            // Reserved ones too.
            ("192.0.2.1:4000", Err(Refusal::Reserved)),
            // Public addresses need no route.
            ("8.8.4.4:53", Ok(())),
        ];
        for &(addr, expected) in cases {
            let addr: SocketAddr = addr.parse().unwrap();
            assert_eq!(filter.check(addr), expected, "{addr}");
        }
        // Without routes, the routed hosts are refused as before.
        let plain = AddressFilter::new(vec![net("10.1.0.7", 24)]);
        assert_eq!(
            plain.check("10.20.3.4:4000".parse().unwrap()),
            Err(Refusal::NotOurNetwork)
        );
    }

    #[test]
    fn prefixes_of_any_length_match_only_their_network() {
        assert!(net("10.1.2.3", 8).contains("10.200.0.1".parse().unwrap()));
        assert!(!net("10.1.2.3", 8).contains("11.0.0.1".parse().unwrap()));
        assert!(net("10.1.2.3", 32).contains("10.1.2.3".parse().unwrap()));
        assert!(!net("10.1.2.3", 32).contains("10.1.2.4".parse().unwrap()));
        assert!(net("10.1.2.3", 0).contains("1.2.3.4".parse().unwrap()));
        assert!(!net("10.1.2.3", 8).contains("::1".parse().unwrap()));
        assert!(net("fd00::1", 128).contains("fd00::1".parse().unwrap()));
        assert!(!net("fd00::1", 127).contains("fd00::2".parse().unwrap()));
        // A /31 has no broadcast address: both ends are hosts.
        let filter = AddressFilter::new(vec![net("10.9.9.0", 31)]);
        assert_eq!(filter.check("10.9.9.1:4000".parse().unwrap()), Ok(()));
    }
}
