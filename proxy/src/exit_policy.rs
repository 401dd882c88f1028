//! Which destinations an exit dials for its peers.
//!
//! An exit dials on behalf of someone else, from inside the exit's own network: without a
//! policy a peer could reach the exit's router admin page, its LAN printers or services bound
//! to loopback. So by default every special-purpose address (loopback, private, link-local,
//! CGNAT, multicast, unspecified, broadcast, documentation and reserved ranges, and their
//! IPv4-mapped, NAT64 and 6to4 forms) is refused, for IP targets and for every address a
//! name resolves to; names are resolved here and the checked address is what gets dialed,
//! so a name cannot re-resolve to something else between the check and the dial.
//!
//! Rules, in order:
//! 1. `deny_ports` refuse; a non-empty `allow_ports` refuses every port not in it.
//! 2. `deny_cidrs` refuse.
//! 3. A non-empty `allow_cidrs` refuses every address not in it, and an address inside it is
//!    allowed even if special (so `allow-cidr = ["192.168.1.0/24"]` opens exactly one LAN).
//! 4. Special addresses are refused unless `allow_private`.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

use serde::Deserialize;
use tracing::debug;

use crate::dialer::{BoxFuture, BoxedStream, DialError, Dialer, Target, UdpFlow, resolve};

/// What kind of address an IP is, as far as the policy cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AddrClass {
    /// An ordinary global address.
    Public,
    /// `0.0.0.0/8`, `::`.
    Unspecified,
    /// `127.0.0.0/8`, `::1`.
    Loopback,
    /// RFC 1918, `fc00::/7` unique local, `fec0::/10` site-local.
    Private,
    /// `169.254.0.0/16`, `fe80::/10`.
    LinkLocal,
    /// `100.64.0.0/10` carrier-grade NAT (RFC 6598).
    SharedCgnat,
    /// `224.0.0.0/4`, `ff00::/8`.
    Multicast,
    /// `255.255.255.255`.
    Broadcast,
    /// RFC 5737 / RFC 3849 documentation ranges.
    Documentation,
    /// `198.18.0.0/15` benchmarking (RFC 2544).
    Benchmarking,
    /// `240.0.0.0/4`, `192.0.0.0/24` IETF protocol assignments.
    Reserved,
}

impl AddrClass {
    fn describe(self) -> &'static str {
        match self {
            Self::Public => "a public address",
            Self::Unspecified => "an unspecified address",
            Self::Loopback => "a loopback address",
            Self::Private => "a private address",
            Self::LinkLocal => "a link-local address",
            Self::SharedCgnat => "a carrier-grade NAT address",
            Self::Multicast => "a multicast address",
            Self::Broadcast => "the broadcast address",
            Self::Documentation => "a documentation address",
            Self::Benchmarking => "a benchmarking address",
            Self::Reserved => "a reserved address",
        }
    }
}

/// Classifies an address; IPv6 forms that embed an IPv4 address (mapped, NAT64, 6to4) get
/// the class of the embedded address, because that is where a packet would really go.
pub fn classify(ip: IpAddr) -> AddrClass {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> AddrClass {
    let o = ip.octets();
    match o {
        [0, ..] => AddrClass::Unspecified,
        [127, ..] => AddrClass::Loopback,
        [10, ..] | [172, 16..=31, ..] | [192, 168, ..] => AddrClass::Private,
        [169, 254, ..] => AddrClass::LinkLocal,
        [100, 64..=127, ..] => AddrClass::SharedCgnat,
        [255, 255, 255, 255] => AddrClass::Broadcast,
        [224..=239, ..] => AddrClass::Multicast,
        [240..=255, ..] | [192, 0, 0, _] => AddrClass::Reserved,
        [192, 0, 2, _] | [198, 51, 100, _] | [203, 0, 113, _] => AddrClass::Documentation,
        [198, 18..=19, ..] => AddrClass::Benchmarking,
        _ => AddrClass::Public,
    }
}

fn classify_v6(ip: Ipv6Addr) -> AddrClass {
    if let Some(v4) = embedded_v4(ip) {
        return classify_v4(v4);
    }
    let s = ip.segments();
    if ip.is_unspecified() {
        AddrClass::Unspecified
    } else if ip.is_loopback() {
        AddrClass::Loopback
    } else if s[0] & 0xfe00 == 0xfc00 || s[0] & 0xffc0 == 0xfec0 {
        AddrClass::Private
    } else if s[0] & 0xffc0 == 0xfe80 {
        AddrClass::LinkLocal
    } else if s[0] & 0xff00 == 0xff00 {
        AddrClass::Multicast
    } else if s[0] == 0x2001 && s[1] == 0x0db8 {
        AddrClass::Documentation
    } else if s[..6] == [0; 6] {
        // The deprecated IPv4-compatible ::a.b.c.d range (and the rest of ::/96): never a
        // legitimate destination today.
        AddrClass::Reserved
    } else {
        AddrClass::Public
    }
}

/// The IPv4 address an IPv6 address stands for, if it is IPv4-mapped (`::ffff:0:0/96`),
/// NAT64 well-known (`64:ff9b::/96`) or 6to4 (`2002::/16`).
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let o = ip.octets();
    if let Some(v4) = ip.to_ipv4_mapped() {
        Some(v4)
    } else if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        Some(Ipv4Addr::new(o[12], o[13], o[14], o[15]))
    } else if s[0] == 0x2002 {
        Some(Ipv4Addr::new(o[2], o[3], o[4], o[5]))
    } else {
        None
    }
}

/// An IP network in CIDR notation (`10.0.0.0/8`, `2001:db8::/32`; a bare address is a /32
/// or /128).
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
    /// Whether `ip` lies inside this network (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => prefix_eq(
                u128::from(net.to_bits()) << 96,
                u128::from(ip.to_bits()) << 96,
                self.prefix,
            ),
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_eq(net.to_bits(), ip.to_bits(), self.prefix)
            }
            _ => false,
        }
    }
}

fn prefix_eq(a: u128, b: u128, prefix: u8) -> bool {
    if prefix == 0 {
        return true;
    }
    let mask = u128::MAX << (128 - u32::from(prefix));
    a & mask == b & mask
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
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().map_err(|_| err())?,
            None => max,
        };
        if prefix > max {
            return Err(err());
        }
        Ok(Self { addr, prefix })
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

/// The destination rules of an exit (see the module docs for their order).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExitPolicy {
    /// Allow special-purpose addresses (loopback, private, link-local, ...).
    pub allow_private: bool,
    /// If not empty, only these ports may be dialed.
    pub allow_ports: Vec<PortRange>,
    /// These ports are never dialed.
    pub deny_ports: Vec<PortRange>,
    /// If not empty, only these networks may be dialed (special addresses inside included).
    pub allow_cidrs: Vec<Cidr>,
    /// These networks are never dialed.
    pub deny_cidrs: Vec<Cidr>,
}

impl ExitPolicy {
    /// Checks one resolved destination; the error says why it is refused.
    pub fn check(&self, addr: SocketAddr) -> Result<(), String> {
        self.check_port(addr.port())?;
        self.check_ip(addr.ip())
    }

    /// The port rules alone (rule 1).
    pub fn check_port(&self, port: u16) -> Result<(), String> {
        if self.deny_ports.iter().any(|r| r.contains(port)) {
            return Err(format!("port {port} is denied"));
        }
        if !self.allow_ports.is_empty() && !self.allow_ports.iter().any(|r| r.contains(port)) {
            return Err(format!("port {port} is not in the allowed ports"));
        }
        Ok(())
    }

    /// The address rules alone (rules 2 to 4).
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), String> {
        let ip = ip.to_canonical();
        if let Some(net) = self.deny_cidrs.iter().find(|n| n.contains(ip)) {
            return Err(format!("{ip} is in the denied network {net}"));
        }
        if !self.allow_cidrs.is_empty() {
            if self.allow_cidrs.iter().any(|n| n.contains(ip)) {
                return Ok(());
            }
            return Err(format!("{ip} is not in the allowed networks"));
        }
        match classify(ip) {
            AddrClass::Public => Ok(()),
            _ if self.allow_private => Ok(()),
            class => Err(format!("{ip} is {}", class.describe())),
        }
    }

    /// Resolves `target` (names on this host) and keeps the addresses the policy allows, in
    /// dialing order; fails with the reason for the first address if none is allowed.
    pub async fn allowed_addrs(&self, target: &Target) -> Result<Vec<SocketAddr>, DialError> {
        // Refuse by port before any resolution: a denied port needs no DNS query.
        self.check_port(target.port())
            .map_err(DialError::PolicyDenied)?;
        let addrs = resolve(target).await?;
        let mut first_denial = None;
        let allowed: Vec<SocketAddr> = addrs
            .into_iter()
            .filter(|a| match self.check_ip(a.ip()) {
                Ok(()) => true,
                Err(why) => {
                    first_denial.get_or_insert(why);
                    false
                }
            })
            .collect();
        if allowed.is_empty() {
            let why = first_denial.unwrap_or_else(|| "no address".into());
            let why = match target {
                Target::Domain(name, _) => format!("{name}: {why}"),
                Target::Ip(_) => why,
            };
            return Err(DialError::PolicyDenied(why));
        }
        Ok(allowed)
    }
}

/// A [`Dialer`] that applies an [`ExitPolicy`] before handing resolved, allowed addresses to
/// the dialer it wraps.
#[derive(Debug, Clone)]
pub struct PolicyDialer<D> {
    inner: D,
    policy: Arc<ExitPolicy>,
}

impl<D: Dialer> PolicyDialer<D> {
    /// Wraps `inner`.
    pub fn new(inner: D, policy: ExitPolicy) -> Self {
        Self {
            inner,
            policy: Arc::new(policy),
        }
    }
}

impl<D: Dialer> Dialer for PolicyDialer<D> {
    fn connect(&self, target: Target) -> BoxFuture<'_, Result<BoxedStream, DialError>> {
        Box::pin(async move {
            let addrs = self
                .policy
                .allowed_addrs(&target)
                .await
                .inspect_err(|err| {
                    debug!(%target, %err, "dial refused");
                })?;
            let mut last_err = DialError::HostUnreachable;
            for addr in addrs {
                match self.inner.connect(Target::Ip(addr)).await {
                    Ok(stream) => return Ok(stream),
                    Err(err) => last_err = err,
                }
            }
            Err(last_err)
        })
    }

    fn udp_associate(&self) -> BoxFuture<'_, Result<Box<dyn UdpFlow>, DialError>> {
        Box::pin(async move {
            let inner = self.inner.udp_associate().await?;
            Ok(Box::new(PolicyUdpFlow {
                inner,
                policy: self.policy.clone(),
            }) as Box<dyn UdpFlow>)
        })
    }
}

/// A UDP flow whose every destination passes the policy.
#[derive(Debug)]
struct PolicyUdpFlow {
    inner: Box<dyn UdpFlow>,
    policy: Arc<ExitPolicy>,
}

impl UdpFlow for PolicyUdpFlow {
    fn send_to<'a>(
        &'a self,
        payload: &'a [u8],
        target: &'a Target,
    ) -> BoxFuture<'a, Result<(), DialError>> {
        Box::pin(async move {
            let addr = match target {
                // The fast path for the usual case: no allocation beyond the box.
                Target::Ip(addr) => {
                    self.policy.check(*addr).map_err(DialError::PolicyDenied)?;
                    *addr
                }
                Target::Domain(..) => self.policy.allowed_addrs(target).await?[0],
            };
            self.inner.send_to(payload, &Target::Ip(addr)).await
        })
    }

    fn recv_from<'a>(
        &'a self,
        buf: &'a mut [u8],
    ) -> BoxFuture<'a, io::Result<(usize, SocketAddr)>> {
        self.inner.recv_from(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use crate::dialer::DirectDialer;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn classes_v4() {
        for (addr, class) in [
            ("0.0.0.0", AddrClass::Unspecified),
            ("0.1.2.3", AddrClass::Unspecified),
            ("127.0.0.1", AddrClass::Loopback),
            ("127.255.0.9", AddrClass::Loopback),
            ("10.1.2.3", AddrClass::Private),
            ("172.16.0.1", AddrClass::Private),
            ("172.31.255.255", AddrClass::Private),
            ("192.168.1.1", AddrClass::Private),
            ("169.254.169.254", AddrClass::LinkLocal),
            ("100.64.0.1", AddrClass::SharedCgnat),
            ("100.127.255.255", AddrClass::SharedCgnat),
            ("224.0.0.251", AddrClass::Multicast),
            ("239.255.255.250", AddrClass::Multicast),
            ("255.255.255.255", AddrClass::Broadcast),
            ("240.0.0.1", AddrClass::Reserved),
            ("192.0.0.8", AddrClass::Reserved),
            ("192.0.2.1", AddrClass::Documentation),
            ("198.51.100.7", AddrClass::Documentation),
            ("203.0.113.9", AddrClass::Documentation),
            ("198.18.0.1", AddrClass::Benchmarking),
            ("1.1.1.1", AddrClass::Public),
            ("172.32.0.1", AddrClass::Public),
            ("172.15.255.255", AddrClass::Public),
            ("100.128.0.1", AddrClass::Public),
            ("100.63.255.255", AddrClass::Public),
            ("93.184.216.34", AddrClass::Public),
        ] {
            assert_eq!(classify(ip(addr)), class, "{addr}");
        }
    }

    #[test]
    fn classes_v6() {
        for (addr, class) in [
            ("::", AddrClass::Unspecified),
            ("::1", AddrClass::Loopback),
            ("fc00::1", AddrClass::Private),
            ("fd12:3456::1", AddrClass::Private),
            ("fec0::1", AddrClass::Private),
            ("fe80::1", AddrClass::LinkLocal),
            ("ff02::1", AddrClass::Multicast),
            ("2001:db8::1", AddrClass::Documentation),
            ("::7f00:1", AddrClass::Reserved),
            ("2606:4700::1111", AddrClass::Public),
            // IPv4 hidden in IPv6 gets the class of the IPv4 address.
            ("::ffff:127.0.0.1", AddrClass::Loopback),
            ("::ffff:10.0.0.1", AddrClass::Private),
            ("::ffff:169.254.1.1", AddrClass::LinkLocal),
            ("::ffff:100.64.1.1", AddrClass::SharedCgnat),
            ("::ffff:1.1.1.1", AddrClass::Public),
            ("64:ff9b::192.168.0.1", AddrClass::Private),
            ("64:ff9b::8.8.8.8", AddrClass::Public),
            ("2002:7f00:0001::1", AddrClass::Loopback),
            ("2002:0808:0808::1", AddrClass::Public),
        ] {
            assert_eq!(classify(ip(addr)), class, "{addr}");
        }
    }

    #[test]
    fn default_policy_refuses_special_and_allows_public() {
        let p = ExitPolicy::default();
        assert!(p.check(sa("1.1.1.1:443")).is_ok());
        assert!(p.check(sa("[2606:4700::1111]:443")).is_ok());
        for bad in [
            "127.0.0.1:80",
            "[::1]:80",
            "10.0.0.1:80",
            "192.168.0.1:80",
            "172.20.0.1:80",
            "[fd00::1]:80",
            "169.254.169.254:80",
            "[fe80::1]:80",
            "100.100.100.100:80",
            "224.0.0.1:80",
            "0.0.0.0:80",
            "[::]:80",
            "255.255.255.255:80",
            "[::ffff:127.0.0.1]:80",
            "[::ffff:192.168.1.1]:80",
        ] {
            let why = p.check(sa(bad)).unwrap_err();
            assert!(why.contains("address"), "{bad}: {why}");
        }
        let why = p.check(sa("127.0.0.1:80")).unwrap_err();
        assert_eq!(why, "127.0.0.1 is a loopback address");
        let why = p.check(sa("[::ffff:127.0.0.1]:80")).unwrap_err();
        assert_eq!(why, "127.0.0.1 is a loopback address");
    }

    #[test]
    fn allow_private_opens_special_addresses() {
        let p = ExitPolicy {
            allow_private: true,
            ..ExitPolicy::default()
        };
        assert!(p.check(sa("127.0.0.1:80")).is_ok());
        assert!(p.check(sa("[fd00::1]:80")).is_ok());
    }

    #[test]
    fn port_rules() {
        let p = ExitPolicy {
            deny_ports: vec!["25".parse().unwrap()],
            ..ExitPolicy::default()
        };
        assert_eq!(p.check(sa("1.1.1.1:25")).unwrap_err(), "port 25 is denied");
        assert!(p.check(sa("1.1.1.1:26")).is_ok());

        let p = ExitPolicy {
            allow_ports: vec!["80".parse().unwrap(), "443-444".parse().unwrap()],
            ..ExitPolicy::default()
        };
        assert!(p.check(sa("1.1.1.1:80")).is_ok());
        assert!(p.check(sa("1.1.1.1:444")).is_ok());
        assert_eq!(
            p.check(sa("1.1.1.1:22")).unwrap_err(),
            "port 22 is not in the allowed ports"
        );
    }

    #[test]
    fn cidr_rules() {
        let p = ExitPolicy {
            deny_cidrs: vec!["1.2.3.0/24".parse().unwrap()],
            ..ExitPolicy::default()
        };
        assert_eq!(
            p.check(sa("1.2.3.4:80")).unwrap_err(),
            "1.2.3.4 is in the denied network 1.2.3.0/24"
        );
        assert!(p.check(sa("1.2.4.4:80")).is_ok());

        // An allow list is a whitelist, and opens special addresses inside it.
        let p = ExitPolicy {
            allow_cidrs: vec!["192.168.1.0/24".parse().unwrap()],
            ..ExitPolicy::default()
        };
        assert!(p.check(sa("192.168.1.20:80")).is_ok());
        assert!(p.check(sa("[::ffff:192.168.1.20]:80")).is_ok());
        assert!(p.check(sa("192.168.2.20:80")).is_err());
        assert!(p.check(sa("1.1.1.1:80")).is_err());
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
        let c: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(c.contains(ip("8.8.8.8")));
        let c: Cidr = "8.8.8.8".parse().unwrap();
        assert!(c.contains(ip("8.8.8.8")) && !c.contains(ip("8.8.8.9")));
        assert_eq!(c.to_string(), "8.8.8.8/32");
        for bad in ["10.0.0.0/33", "::/129", "x/8", "10.0.0.0/", ""] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        assert!("8000-9000".parse::<PortRange>().unwrap().contains(8500));
        for bad in ["9000-8000", "x", "70000", "1-", ""] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn policy_dialer_refuses_loopback_targets_and_names() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let dialer = PolicyDialer::new(
            DirectDialer::new(Duration::from_secs(5)),
            ExitPolicy::default(),
        );
        let err = dialer.connect(Target::Ip(addr)).await.unwrap_err();
        assert!(
            matches!(&err, DialError::PolicyDenied(why) if why.contains("loopback")),
            "{err}"
        );
        let err = dialer
            .connect(Target::Domain("localhost".into(), addr.port()))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, DialError::PolicyDenied(why) if why.starts_with("localhost: ") && why.contains("loopback")),
            "{err}"
        );
        let flow = dialer.udp_associate().await.unwrap();
        let err = flow.send_to(b"x", &Target::Ip(addr)).await.unwrap_err();
        assert!(matches!(err, DialError::PolicyDenied(_)), "{err}");

        let open = PolicyDialer::new(
            DirectDialer::new(Duration::from_secs(5)),
            ExitPolicy {
                allow_private: true,
                ..ExitPolicy::default()
            },
        );
        open.connect(Target::Ip(addr)).await.unwrap();
    }
}
