//! Which destinations an exit dials for its peers.
//!
//! An exit dials on behalf of someone else, from inside the exit's own network: without a
//! policy a peer could reach the exit's router admin page, its LAN printers, services bound
//! to loopback, or services on the exit host itself. So by default every special-purpose
//! address (loopback, private, link-local, CGNAT, multicast, unspecified, broadcast,
//! documentation and reserved ranges) and every network of the host's own interfaces is
//! refused, in any of the IPv6 forms that reach them (IPv4-mapped, NAT64, 6to4), for IP
//! targets and for every address a name resolves to. Names are resolved here and the checked
//! addresses are what gets dialed, so a name cannot re-resolve to something else between the
//! check and the dial.
//!
//! Rules, in order:
//! 1. `deny_ports` refuse; a non-empty `allow_ports` refuses every port not in it.
//! 2. `deny_cidrs` refuse.
//! 3. A non-empty `allow_cidrs` refuses every address not in it, and an address inside it is
//!    allowed even if special or the host's own (so `allow-cidr = ["192.168.1.0/24"]` opens
//!    exactly one LAN): an allow list is the operator naming destinations on purpose.
//! 4. Public addresses inside the networks of this host's interfaces are refused
//!    ([`OwnAddrs`]): `203.0.113.5/24` on `eth0` refuses `203.0.113.0/24`. `allow_private`
//!    does not open them: it is about the LAN behind the exit, and saying yes to it must not
//!    also open the exit's own services to the Internet side.
//! 5. Special addresses are refused unless `allow_private` (this includes the host's own
//!    private and loopback addresses, which rule 4 leaves to this rule).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tracing::debug;

use crate::dialer::{
    BoxFuture, BoxedStream, DialError, Dialer, DirectDialer, Target, UdpFlow, resolve,
};

mod cidr;
mod own_addrs;

use self::cidr::embedded_v4;
pub use self::cidr::{Cidr, ParseRuleError, PortRange};
pub use self::own_addrs::{MAX_AGE, OwnAddrs, OwnAddrsError, OwnNetworks};

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

/// Classifies an address; IPv6 forms that embed an IPv4 address (mapped, NAT64 well-known
/// and local-use, 6to4) get the class of the embedded address, because that is where a
/// packet would really go.
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
    /// Checks one resolved destination against the rules, `own` being this host's networks;
    /// the error says why it is refused.
    pub fn check(&self, addr: SocketAddr, own: &OwnNetworks) -> Result<(), String> {
        self.check_port(addr.port())?;
        self.check_ip(addr.ip(), own)
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

    /// The address rules alone (rules 2 to 5).
    pub fn check_ip(&self, ip: IpAddr, own: &OwnNetworks) -> Result<(), String> {
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
            AddrClass::Public => match own.find(ip) {
                Some(net) => Err(format!("{ip} is in this host's own network {net}")),
                None => Ok(()),
            },
            _ if self.allow_private => Ok(()),
            class => Err(format!("{ip} is {}", class.describe())),
        }
    }
}

/// The rules and the host's own networks, shared by a dialer and its UDP flows.
#[derive(Debug)]
struct Guard {
    policy: ExitPolicy,
    own: OwnAddrs,
}

impl Guard {
    fn own_now(&self) -> Result<Arc<OwnNetworks>, DialError> {
        self.own
            .current(Instant::now())
            .map_err(|err| DialError::PolicyDenied(err.to_string()))
    }

    fn check(&self, addr: SocketAddr) -> Result<(), DialError> {
        self.policy
            .check(addr, &*self.own_now()?)
            .map_err(DialError::PolicyDenied)
    }

    /// The addresses `target` resolved to that the policy allows, in dialing order; fails
    /// with the reason for the first address if none is allowed.
    fn allowed(
        &self,
        target: &Target,
        resolved: Vec<SocketAddr>,
    ) -> Result<Vec<SocketAddr>, DialError> {
        let own = self.own_now()?;
        let mut first_denial = None;
        let allowed: Vec<SocketAddr> = resolved
            .into_iter()
            .filter(|a| match self.policy.check(*a, &own) {
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

/// A [`Dialer`] that applies an [`ExitPolicy`] and refuses this host's own networks, then
/// races the allowed addresses with a [`DirectDialer`]. Resolution and connecting share the
/// direct dialer's one connect timeout.
///
/// It wraps a `DirectDialer` rather than any dialer because it must hand over the very
/// addresses it checked, which only a dialer of this host can take.
#[derive(Debug, Clone)]
pub struct PolicyDialer {
    inner: DirectDialer,
    guard: Arc<Guard>,
}

impl PolicyDialer {
    /// Wraps `inner`; the host's own networks are read from its interfaces.
    pub fn new(inner: DirectDialer, policy: ExitPolicy) -> Self {
        Self::with_own_addrs(inner, policy, OwnAddrs::system())
    }

    /// Wraps `inner`, taking the host's own networks from `own`.
    pub fn with_own_addrs(inner: DirectDialer, policy: ExitPolicy, own: OwnAddrs) -> Self {
        Self {
            inner,
            guard: Arc::new(Guard { policy, own }),
        }
    }

    /// Connects to `target`, whose addresses `resolution` yields: the port is checked before
    /// resolving, every resolved address before dialing, and one deadline covers both.
    async fn connect_resolved(
        &self,
        target: &Target,
        resolution: impl Future<Output = Result<Vec<SocketAddr>, DialError>>,
    ) -> Result<TcpStream, DialError> {
        // A denied port needs no DNS query.
        self.guard
            .policy
            .check_port(target.port())
            .map_err(DialError::PolicyDenied)?;
        let deadline = tokio::time::Instant::now() + self.inner.connect_timeout();
        let resolved = tokio::time::timeout_at(deadline, resolution)
            .await
            .map_err(|_| DialError::TimedOut)??;
        let addrs = self.guard.allowed(target, resolved)?;
        self.inner.connect_addrs_until(&addrs, deadline).await
    }
}

impl Dialer for PolicyDialer {
    fn connect(&self, target: Target) -> BoxFuture<'_, Result<BoxedStream, DialError>> {
        Box::pin(async move {
            let stream = self
                .connect_resolved(&target, resolve(&target))
                .await
                .inspect_err(|err| {
                    if let DialError::PolicyDenied(_) = err {
                        debug!(%target, %err, "dial refused");
                    }
                })?;
            Ok(Box::new(stream) as BoxedStream)
        })
    }

    fn udp_associate(&self) -> BoxFuture<'_, Result<Box<dyn UdpFlow>, DialError>> {
        Box::pin(async move {
            let inner = self.inner.udp_associate().await?;
            Ok(Box::new(PolicyUdpFlow {
                inner,
                guard: self.guard.clone(),
                resolve_timeout: self.inner.connect_timeout(),
                pinned: std::sync::Mutex::default(),
            }) as Box<dyn UdpFlow>)
        })
    }
}

/// A UDP flow whose every destination passes the policy.
#[derive(Debug)]
struct PolicyUdpFlow {
    inner: Box<dyn UdpFlow>,
    guard: Arc<Guard>,
    /// How long a name in a datagram's destination may take to resolve.
    resolve_timeout: Duration,
    /// The address each name resolved to, kept for the flow's life: the datagrams of one
    /// QUIC connection to a fake-IP name must all reach the same server, not whichever
    /// address a CDN's rotating answer gives next, and a lookup per datagram is waste.
    pinned: std::sync::Mutex<HashMap<Target, SocketAddr>>,
}

/// Names one flow keeps resolved (a flow usually talks to one; a SOCKS association may talk
/// to more, and those beyond are resolved per datagram).
const PINNED_NAMES: usize = 64;

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
                    self.guard.check(*addr)?;
                    *addr
                }
                Target::Domain(..) => {
                    let pinned = self
                        .pinned
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get(target)
                        .copied();
                    match pinned {
                        Some(addr) => addr,
                        None => {
                            self.guard
                                .policy
                                .check_port(target.port())
                                .map_err(DialError::PolicyDenied)?;
                            let resolved =
                                tokio::time::timeout(self.resolve_timeout, resolve(target))
                                    .await
                                    .map_err(|_| DialError::TimedOut)??;
                            let addr = self.guard.allowed(target, resolved)?[0];
                            let mut pinned = self.pinned.lock().unwrap_or_else(|e| e.into_inner());
                            if pinned.len() < PINNED_NAMES {
                                pinned.insert(target.clone(), addr);
                            }
                            addr
                        }
                    }
                }
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

    use tokio::io::AsyncWriteExt as _;

    use crate::dialer::DirectDialer;

    const SECS_5: Duration = Duration::from_secs(5);

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn none() -> OwnNetworks {
        OwnNetworks::default()
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
        assert!(p.check(sa("1.1.1.1:443"), &none()).is_ok());
        assert!(p.check(sa("[2606:4700::1111]:443"), &none()).is_ok());
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
            let why = p.check(sa(bad), &none()).unwrap_err();
            assert!(why.contains("address"), "{bad}: {why}");
        }
        let why = p.check(sa("127.0.0.1:80"), &none()).unwrap_err();
        assert_eq!(why, "127.0.0.1 is a loopback address");
        let why = p.check(sa("[::ffff:127.0.0.1]:80"), &none()).unwrap_err();
        assert_eq!(why, "127.0.0.1 is a loopback address");
    }

    #[test]
    fn allow_private_opens_special_addresses() {
        let p = ExitPolicy {
            allow_private: true,
            ..ExitPolicy::default()
        };
        assert!(p.check(sa("127.0.0.1:80"), &none()).is_ok());
        assert!(p.check(sa("[fd00::1]:80"), &none()).is_ok());
    }

    #[test]
    fn port_rules() {
        let p = ExitPolicy {
            deny_ports: vec!["25".parse().unwrap()],
            ..ExitPolicy::default()
        };
        assert_eq!(
            p.check(sa("1.1.1.1:25"), &none()).unwrap_err(),
            "port 25 is denied"
        );
        assert!(p.check(sa("1.1.1.1:26"), &none()).is_ok());

        let p = ExitPolicy {
            allow_ports: vec!["80".parse().unwrap(), "443-444".parse().unwrap()],
            ..ExitPolicy::default()
        };
        assert!(p.check(sa("1.1.1.1:80"), &none()).is_ok());
        assert!(p.check(sa("1.1.1.1:444"), &none()).is_ok());
        assert_eq!(
            p.check(sa("1.1.1.1:22"), &none()).unwrap_err(),
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
            p.check(sa("1.2.3.4:80"), &none()).unwrap_err(),
            "1.2.3.4 is in the denied network 1.2.3.0/24"
        );
        assert!(p.check(sa("1.2.4.4:80"), &none()).is_ok());

        // An allow list is a whitelist, and opens special addresses inside it.
        let p = ExitPolicy {
            allow_cidrs: vec!["192.168.1.0/24".parse().unwrap()],
            ..ExitPolicy::default()
        };
        assert!(p.check(sa("192.168.1.20:80"), &none()).is_ok());
        assert!(p.check(sa("[::ffff:192.168.1.20]:80"), &none()).is_ok());
        assert!(p.check(sa("192.168.2.20:80"), &none()).is_err());
        assert!(p.check(sa("1.1.1.1:80"), &none()).is_err());
    }

    #[test]
    fn deny_and_allow_cidrs_match_nat64_and_6to4_forms() {
        let p = ExitPolicy {
            deny_cidrs: vec!["93.184.216.0/24".parse().unwrap()],
            ..ExitPolicy::default()
        };
        for form in [
            "[::ffff:93.184.216.34]:80",
            "[64:ff9b::5db8:d822]:80",
            "[64:ff9b:1::5db8:d822]:80",
            "[2002:5db8:d822::1]:80",
        ] {
            assert!(
                p.check(sa(form), &none()).is_err(),
                "{form} passed deny-cidr"
            );
        }
        assert_eq!(
            p.check(sa("[64:ff9b::5db8:d822]:80"), &none()).unwrap_err(),
            "64:ff9b::5db8:d822 is in the denied network 93.184.216.0/24"
        );
        assert!(p.check(sa("[64:ff9b::5db9:d822]:80"), &none()).is_ok());

        // An allow list admits the same forms, and nothing else.
        let p = ExitPolicy {
            allow_cidrs: vec!["93.184.216.0/24".parse().unwrap()],
            ..ExitPolicy::default()
        };
        for form in [
            "93.184.216.34:80",
            "[64:ff9b::5db8:d822]:80",
            "[64:ff9b:1::5db8:d822]:80",
            "[2002:5db8:d822::1]:80",
        ] {
            assert!(p.check(sa(form), &none()).is_ok(), "{form} not allowed");
        }
        assert!(p.check(sa("[64:ff9b::5db9:d822]:80"), &none()).is_err());
    }

    #[test]
    fn special_ranges_decode_the_nat64_local_use_prefix() {
        assert_eq!(classify(ip("64:ff9b:1::7f00:1")), AddrClass::Loopback);
        assert_eq!(classify(ip("64:ff9b:1:2:3::a00:1")), AddrClass::Private);
        assert_eq!(classify(ip("64:ff9b:1::808:808")), AddrClass::Public);
        let why = ExitPolicy::default()
            .check(sa("[64:ff9b:1::a9fe:a9fe]:80"), &none())
            .unwrap_err();
        assert_eq!(why, "64:ff9b:1::a9fe:a9fe is a link-local address");
    }

    /// The networks of an imaginary exit host: a public IPv4 /24, a public IPv6 /64, a LAN
    /// and loopback.
    fn exit_host() -> OwnNetworks {
        OwnNetworks::new([
            (ip("93.184.216.34"), 24),
            (ip("2a01:4f8:1:2::5"), 64),
            (ip("192.168.1.5"), 24),
            (ip("127.0.0.1"), 8),
            (ip("::1"), 128),
        ])
    }

    #[test]
    fn the_hosts_own_public_networks_are_refused() {
        let own = exit_host();
        let p = ExitPolicy::default();
        for bad in [
            "93.184.216.34:22",
            // A neighbour in the connected prefix.
            "93.184.216.1:80",
            "[::ffff:93.184.216.34]:22",
            "[64:ff9b::5db8:d822]:22",
            "[2002:5db8:d822::1]:22",
            "[2a01:4f8:1:2::5]:22",
            "[2a01:4f8:1:2:abcd::1]:22",
        ] {
            let why = p.check(sa(bad), &own).unwrap_err();
            assert!(why.contains("this host's own network"), "{bad}: {why}");
        }
        assert_eq!(
            p.check(sa("93.184.216.1:80"), &own).unwrap_err(),
            "93.184.216.1 is in this host's own network 93.184.216.34/24"
        );
        assert!(p.check(sa("93.184.217.1:80"), &own).is_ok());
        assert!(p.check(sa("[2a01:4f8:1:3::1]:80"), &own).is_ok());

        // allow-private opens the LAN and loopback, not the host's public networks.
        let p = ExitPolicy {
            allow_private: true,
            ..ExitPolicy::default()
        };
        assert!(p.check(sa("192.168.1.7:80"), &own).is_ok());
        assert!(p.check(sa("127.0.0.1:80"), &own).is_ok());
        assert!(p.check(sa("93.184.216.34:22"), &own).is_err());
        assert!(p.check(sa("[2a01:4f8:1:2::5]:22"), &own).is_err());

        // Only an allow list that names them opens them.
        let p = ExitPolicy {
            allow_cidrs: vec!["93.184.216.34/32".parse().unwrap()],
            ..ExitPolicy::default()
        };
        assert!(p.check(sa("93.184.216.34:22"), &own).is_ok());
        assert!(p.check(sa("93.184.216.35:22"), &own).is_err());
    }

    #[tokio::test]
    async fn policy_dialer_refuses_own_networks_for_streams_and_datagrams() {
        // Refused before any packet is sent: nothing here leaves the machine.
        let dialer = PolicyDialer::with_own_addrs(
            DirectDialer::new(SECS_5),
            ExitPolicy::default(),
            OwnAddrs::fixed(exit_host()),
        );
        for target in ["93.184.216.34:22", "[2a01:4f8:1:2::5]:22"] {
            let err = dialer.connect(target.parse().unwrap()).await.unwrap_err();
            assert!(
                matches!(&err, DialError::PolicyDenied(why) if why.contains("own network")),
                "{target}: {err}"
            );
        }
        let flow = dialer.udp_associate().await.unwrap();
        let err = flow
            .send_to(b"x", &"93.184.216.9:53".parse().unwrap())
            .await
            .unwrap_err();
        assert!(
            matches!(&err, DialError::PolicyDenied(why) if why.contains("own network")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_name_in_a_flow_is_resolved_once_and_kept() {
        let server = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let port = server.local_addr().unwrap().port();
        let open = ExitPolicy {
            allow_private: true,
            ..ExitPolicy::default()
        };
        let dialer = PolicyDialer::with_own_addrs(
            DirectDialer::new(SECS_5),
            open,
            OwnAddrs::fixed(OwnNetworks::default()),
        );
        let inner = dialer.inner.udp_associate().await.unwrap();
        let flow = PolicyUdpFlow {
            inner,
            guard: dialer.guard.clone(),
            resolve_timeout: SECS_5,
            pinned: std::sync::Mutex::default(),
        };
        // `localhost` may answer ::1 first; the name is pinned to what it resolved to, and a
        // name that resolves elsewhere later would not move the flow.
        let name = Target::Domain("localhost".into(), port);
        flow.send_to(b"0", &name).await.unwrap();
        let first = flow.pinned.lock().unwrap()[&name];
        assert!(first.ip().is_loopback() && first.port() == port);
        // Re-point the pinned entry to another server, as a later, different answer might
        // be: every datagram follows the pin (a lookup per datagram would send them to the
        // first server's port).
        let second = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        flow.pinned
            .lock()
            .unwrap()
            .insert(name.clone(), second.local_addr().unwrap());
        for i in 0..100u8 {
            flow.send_to(&[i], &name).await.unwrap();
        }
        let mut got = Vec::new();
        let mut buf = [0u8; 8];
        while got.len() < 100 {
            let (n, _) = second.recv_from(&mut buf).await.unwrap();
            assert_eq!(n, 1);
            got.push(buf[0]);
        }
        assert_eq!(got, (0..100).collect::<Vec<u8>>());
        assert_eq!(flow.pinned.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn the_system_policy_dialer_refuses_this_hosts_public_addresses() {
        // Whatever public addresses this machine has (none in many sandboxes), the system
        // reading refuses each of them, before dialing.
        let own = OwnNetworks::read().unwrap();
        let dialer = PolicyDialer::new(DirectDialer::new(SECS_5), ExitPolicy::default());
        let flow = dialer.udp_associate().await.unwrap();
        for interface in getifaddrs::getifaddrs().unwrap() {
            let Some(addr) = interface.address.ip_addr() else {
                continue;
            };
            if classify(addr) != AddrClass::Public {
                continue;
            }
            assert!(own.find(addr).is_some(), "{addr}");
            let target = Target::Ip(SocketAddr::new(addr, 9));
            let err = dialer.connect(target.clone()).await.unwrap_err();
            assert!(matches!(err, DialError::PolicyDenied(_)), "{addr}: {err}");
            let err = flow.send_to(b"x", &target).await.unwrap_err();
            assert!(matches!(err, DialError::PolicyDenied(_)), "{addr}: {err}");
        }
    }

    fn open_dialer(timeout: Duration) -> PolicyDialer {
        PolicyDialer::with_own_addrs(
            DirectDialer::new(timeout),
            ExitPolicy {
                allow_private: true,
                ..ExitPolicy::default()
            },
            OwnAddrs::fixed(OwnNetworks::default()),
        )
    }

    #[tokio::test]
    async fn resolved_addresses_are_raced_not_dialed_one_by_one() {
        let (stalled, _keep) = crate::dialer::stalled_listener();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let good = listener.local_addr().unwrap();
        // A connect timeout far beyond the hang guard: waiting for the stalled address
        // before trying the next one would never finish in time.
        let dialer = open_dialer(Duration::from_secs(3600));
        let target = Target::Domain("dual.test".into(), good.port());
        let resolved = async { Ok(vec![stalled, good]) };
        let stream = tokio::time::timeout(
            Duration::from_secs(60),
            dialer.connect_resolved(&target, resolved),
        )
        .await
        .expect("hang guard: the second address was not raced")
        .unwrap();
        assert_eq!(stream.peer_addr().unwrap(), good);
    }

    #[tokio::test]
    async fn only_checked_addresses_are_dialed() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // The name resolves to a refused address first and to the listener second: only the
        // second one is dialed, and the refusal of the first costs nothing.
        let dialer = PolicyDialer::with_own_addrs(
            DirectDialer::new(SECS_5),
            ExitPolicy {
                deny_cidrs: vec!["127.0.0.2/32".parse().unwrap()],
                allow_private: true,
                ..ExitPolicy::default()
            },
            OwnAddrs::fixed(OwnNetworks::default()),
        );
        let refused = SocketAddr::new(ip("127.0.0.2"), addr.port());
        let target = Target::Domain("mixed.test".into(), addr.port());
        let stream = dialer
            .connect_resolved(&target, async { Ok(vec![refused, addr]) })
            .await
            .unwrap();
        assert_eq!(stream.peer_addr().unwrap(), addr);
        let (mut accepted, from) = listener.accept().await.unwrap();
        assert_eq!(from, stream.local_addr().unwrap());
        accepted.shutdown().await.unwrap();
        let err = dialer
            .connect_resolved(&target, async { Ok(vec![refused]) })
            .await
            .unwrap_err();
        assert!(
            matches!(&err, DialError::PolicyDenied(why) if why == "mixed.test: 127.0.0.2 is in the denied network 127.0.0.2/32"),
            "{err}"
        );
    }

    /// Virtual time jumps to the deadline (to within the timer's millisecond).
    fn assert_in_deadline(elapsed: Duration, deadline: Duration) {
        assert!(
            (deadline..deadline + Duration::from_millis(10)).contains(&elapsed),
            "gave up after {elapsed:?}, the deadline was {deadline:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn resolution_and_connecting_share_one_deadline() {
        let (stalled, _keep) = crate::dialer::stalled_listener();
        let timeout = Duration::from_secs(10);
        let dialer = open_dialer(timeout);
        let target = Target::Domain("slow.test".into(), stalled.port());
        // Resolution takes 7 of the 10 s; the stalled connect gets the 3 s left, not 10 more.
        let resolution = async {
            tokio::time::sleep(Duration::from_secs(7)).await;
            Ok(vec![stalled])
        };
        let started = tokio::time::Instant::now();
        let err = dialer
            .connect_resolved(&target, resolution)
            .await
            .unwrap_err();
        assert!(matches!(err, DialError::TimedOut), "{err:?}");
        assert_in_deadline(started.elapsed(), timeout);

        // A resolution slower than the whole timeout is cut at the deadline too.
        let started = tokio::time::Instant::now();
        let never = std::future::pending::<Result<Vec<SocketAddr>, DialError>>();
        let err = dialer.connect_resolved(&target, never).await.unwrap_err();
        assert!(matches!(err, DialError::TimedOut), "{err:?}");
        assert_in_deadline(started.elapsed(), timeout);
    }

    #[tokio::test]
    async fn policy_dialer_refuses_loopback_targets_and_names() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let dialer = PolicyDialer::new(DirectDialer::new(SECS_5), ExitPolicy::default());
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
            DirectDialer::new(SECS_5),
            ExitPolicy {
                allow_private: true,
                ..ExitPolicy::default()
            },
        );
        open.connect(Target::Ip(addr)).await.unwrap();
    }
}
