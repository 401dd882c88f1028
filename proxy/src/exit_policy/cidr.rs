//! Networks and port ranges as the policy rules name them, and the IPv6 forms that stand for
//! an IPv4 address.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::Deserialize;

/// An IP network in CIDR notation (`10.0.0.0/8`, `2001:db8::/32`; a bare address is a /32
/// or /128).
///
/// An IPv4 network also contains the IPv6 forms of its addresses that a packet would really
/// deliver to them: IPv4-mapped, NAT64 and 6to4 (see `embedded_v4`). An exit behind DNS64
/// only ever sees synthesised AAAA records, so a rule about an IPv4 network must hold for
/// those too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

/// Error parsing a [`Cidr`] or a [`PortRange`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ParseRuleError {
    /// Not `ADDR/PREFIX`.
    #[error("invalid network {0:?} (expected e.g. 10.0.0.0/8 or fd00::/8)")]
    Cidr(String),
    /// Not `PORT` or `LOW-HIGH`.
    #[error("invalid port range {0:?} (expected e.g. 25 or 8000-8999)")]
    Ports(String),
}

impl Cidr {
    /// The network of `addr` with `prefix` bits; `None` if `prefix` is longer than the
    /// address.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Self> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (prefix <= max).then_some(Self { addr, prefix })
    }

    /// The number of leading bits that name the network.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` lies inside this network. For an IPv4 network, an IPv6 address that
    /// embeds an IPv4 address (mapped, NAT64, 6to4) is judged by the embedded address; an
    /// IPv6 network compares the IPv6 address as written.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => self.contains_v4(net, ip),
            (IpAddr::V4(net), IpAddr::V6(ip)) => {
                embedded_v4(ip).is_some_and(|ip| self.contains_v4(net, ip))
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_eq(net.to_bits(), ip.to_bits(), self.prefix)
            }
            (IpAddr::V6(_), IpAddr::V4(_)) => false,
        }
    }

    fn contains_v4(&self, net: Ipv4Addr, ip: Ipv4Addr) -> bool {
        prefix_eq(
            u128::from(net.to_bits()) << 96,
            u128::from(ip.to_bits()) << 96,
            self.prefix,
        )
    }
}

fn prefix_eq(a: u128, b: u128, prefix: u8) -> bool {
    if prefix == 0 {
        return true;
    }
    let mask = u128::MAX << (128 - u32::from(prefix));
    a & mask == b & mask
}

/// The IPv4 address an IPv6 address stands for, if it is one of the forms that reach an
/// IPv4 host:
///
/// - IPv4-mapped `::ffff:0:0/96` (a dual-stack socket sends it as IPv4);
/// - NAT64 well-known prefix `64:ff9b::/96` (RFC 6052);
/// - NAT64 local-use prefix `64:ff9b:1::/48` (RFC 8215), IPv4 address in the last 32 bits:
///   translators (Jool, Tayga) are set up with a /96 inside it, which puts it there; other
///   prefix lengths and network-specific prefixes cannot be recognised from the address;
/// - 6to4 `2002::/16` (RFC 3056), IPv4 address in bits 16 to 48.
pub(crate) fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let o = ip.octets();
    let last_32 = || Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    if let Some(v4) = ip.to_ipv4_mapped() {
        Some(v4)
    } else if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] || s[..3] == [0x64, 0xff9b, 1] {
        Some(last_32())
    } else if s[0] == 0x2002 {
        Some(Ipv4Addr::new(o[2], o[3], o[4], o[5]))
    } else {
        None
    }
}

impl FromStr for Cidr {
    type Err = ParseRuleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseRuleError::Cidr(s.to_owned());
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| err())?;
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().map_err(|_| err())?,
            None if addr.is_ipv4() => 32,
            None => 128,
        };
        Self::new(addr, prefix).ok_or_else(err)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A port or an inclusive range of ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    low: u16,
    high: u16,
}

impl PortRange {
    /// Whether `port` is in the range.
    pub fn contains(&self, port: u16) -> bool {
        (self.low..=self.high).contains(&port)
    }
}

impl FromStr for PortRange {
    type Err = ParseRuleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseRuleError::Ports(s.to_owned());
        let (low, high) = match s.split_once('-') {
            Some((l, h)) => (l.trim(), h.trim()),
            None => (s.trim(), s.trim()),
        };
        let low: u16 = low.parse().map_err(|_| err())?;
        let high: u16 = high.parse().map_err(|_| err())?;
        if low > high {
            return Err(err());
        }
        Ok(Self { low, high })
    }
}

macro_rules! deserialize_from_str {
    ($ty:ty) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
deserialize_from_str!(Cidr);
deserialize_from_str!(PortRange);

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidr_and_port_parsing() {
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(c.contains(ip("10.255.1.1")));
        assert!(!c.contains(ip("11.0.0.0")));
        assert!(!c.contains(ip("::1")));
        let c: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(c.contains(ip("2001:db8:1::1")));
        assert!(!c.contains(ip("2001:db9::1")));
        assert!(!c.contains(ip("10.0.0.1")));
        let c: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(c.contains(ip("8.8.8.8")));
        let c: Cidr = "8.8.8.8".parse().unwrap();
        assert!(c.contains(ip("8.8.8.8")) && !c.contains(ip("8.8.8.9")));
        assert_eq!(c.to_string(), "8.8.8.8/32");
        assert_eq!(c.prefix(), 32);
        for bad in [
            "10.0.0.0/33",
            "::/129",
            "x/8",
            "10.0.0.0/",
            "",
            "10.0.0.0/-1",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        assert!(Cidr::new(ip("10.0.0.0"), 33).is_none());
        assert!("8000-9000".parse::<PortRange>().unwrap().contains(8500));
        for bad in ["9000-8000", "x", "70000", "1-", ""] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad}");
        }
    }

    #[test]
    fn ipv4_networks_contain_the_ipv6_forms_of_their_addresses() {
        let net: Cidr = "203.0.113.0/24".parse().unwrap();
        for inside in [
            "203.0.113.5",
            "::ffff:203.0.113.5",
            // NAT64 well-known prefix.
            "64:ff9b::cb00:7105",
            // NAT64 local-use prefix, a /96 translator inside it.
            "64:ff9b:1::cb00:7105",
            "64:ff9b:1:abcd::cb00:71ff",
            // 6to4, any subnet and host behind it.
            "2002:cb00:7105::1",
            "2002:cb00:71ff:1234::99",
        ] {
            assert!(net.contains(ip(inside)), "{inside}");
        }
        for outside in [
            "203.0.114.5",
            "64:ff9b::cb00:7205",
            "64:ff9b:1::cb00:7205",
            "64:ff9b:2::cb00:7105",
            "2002:cb00:7205::1",
            // The embedded address sits elsewhere in ordinary global addresses.
            "2606:4700::cb00:7105",
            // IPv4-compatible ::a.b.c.d is deprecated and never delivered to IPv4.
            "::cb00:7105",
        ] {
            assert!(!net.contains(ip(outside)), "{outside}");
        }
        // An IPv6 network is compared as written.
        let nat64: Cidr = "64:ff9b::/96".parse().unwrap();
        assert!(nat64.contains(ip("64:ff9b::cb00:7105")));
        assert!(!nat64.contains(ip("203.0.113.5")));
    }
}
