//! The paths a peer's session travels on, and the choice between them.
//!
//! ```text
//!                       ┌─ tox   Tox lossy packets (always there: any NAT, relays as last resort)
//!  session packets ──►──┼─ udp   hole-punched UDP, sealed per packet (punch::udp, link)
//!                       └─ tcp   hole-punched TCP, TLS 1.3 pinned over Tox (punch::tcp, path::tcp)
//! ```
//!
//! A session starts on Tox. Right after, the client gathers its candidates ([`gather`]: the
//! interface addresses of one UDP socket and one TCP port, and what STUN servers see of them)
//! and offers them over Tox; the exit answers with its own; both punch. The session moves to a
//! punched path the moment it is usable, and back to Tox when it dies. KCP does not care which
//! path a packet took, so the conv and every stream survive each move.
//!
//! [`PathChoice`] (`--path`) restricts this: `tox` never punches, `udp` or `tcp` use only
//! that kind of punched link (and hold the session's packets until it is up), `auto` prefers
//! punched UDP, then punched TCP, then Tox.

pub mod tcp;

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

use tokio::net::UdpSocket;
use tracing::debug;

use crate::link::signal::{Candidate, CandidateKind, MAX_CANDIDATES, Protocol};
use crate::punch::driver::{bind_punch_tcp, bind_punch_udp, stun_tcp, stun_udp};
use crate::punch::filter::LocalNetwork;
use crate::punch::stun::TransactionConfig;
use crate::punch::tcp::TcpPunchConfig;
use crate::punch::udp::PunchConfig;
use crate::time::Duration;

/// Which paths a session may use (`--path`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PathChoice {
    /// Punched UDP when it works, else punched TCP, else Tox.
    #[default]
    Auto,
    /// Tox only; never punch.
    Tox,
    /// Punched UDP only.
    Udp,
    /// Punched TCP only.
    Tcp,
}

impl PathChoice {
    /// Whether this choice punches UDP links.
    pub fn wants_udp(self) -> bool {
        matches!(self, Self::Auto | Self::Udp)
    }

    /// Whether this choice punches TCP links.
    pub fn wants_tcp(self) -> bool {
        matches!(self, Self::Auto | Self::Tcp)
    }

    /// Whether the session may fall back to Tox while no punched path is up.
    pub fn allows_tox(self) -> bool {
        matches!(self, Self::Auto | Self::Tox)
    }
}

impl fmt::Display for PathChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Tox => "tox",
            Self::Udp => "udp",
            Self::Tcp => "tcp",
        })
    }
}

/// A `--path` value that is not one of the choices.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown path {0:?}: expected auto, tox, udp or tcp")]
pub struct PathChoiceError(String);

impl FromStr for PathChoice {
    type Err = PathChoiceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "tox" => Ok(Self::Tox),
            "udp" => Ok(Self::Udp),
            "tcp" => Ok(Self::Tcp),
            other => Err(PathChoiceError(other.to_owned())),
        }
    }
}

/// How punched paths are made.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PathConfig {
    /// Which paths to use.
    pub choice: PathChoice,
    /// STUN servers (`host:port`) that tell us our public addresses. None: only interface
    /// addresses are offered, which is enough when the exit has a public address.
    pub stun_servers: Vec<String>,
    /// Timings of one STUN query (kept short: gathering holds up the offer).
    pub stun: TransactionConfig,
    /// Timings of UDP punching and of the keepalives that hold the mapping and detect death.
    pub punch: PunchConfig,
    /// Timings of TCP punching.
    pub tcp: TcpPunchConfig,
    /// How long a client waits for the exit to answer an offer.
    pub answer_timeout: Duration,
    /// The first pause before punching again after a failure (doubles up to `retry_max`).
    pub retry_min: Duration,
    /// The longest pause between punching attempts.
    pub retry_max: Duration,
}

impl Default for PathConfig {
    fn default() -> Self {
        Self {
            choice: PathChoice::Auto,
            stun_servers: Vec::new(),
            stun: TransactionConfig {
                rto: Duration::from_millis(250),
                max_sends: 4,
                rm: 4,
                reliable_timeout: Duration::from_secs(3),
            },
            punch: PunchConfig {
                // Fast keepalives: they are also how a dead direct path is noticed, and the
                // session stalls until it is.
                keepalive_interval: Duration::from_secs(2),
                dead_after: Duration::from_secs(8),
                ..PunchConfig::default()
            },
            tcp: TcpPunchConfig::default(),
            answer_timeout: Duration::from_secs(15),
            retry_min: Duration::from_secs(5),
            retry_max: Duration::from_secs(120),
        }
    }
}

/// Public STUN servers used by `proxy` unless told otherwise (none in tests).
pub const PUBLIC_STUN_SERVERS: &[&str] = &["stun.l.google.com:19302", "stun.cloudflare.com:3478"];

/// Which path carries a session now, and why.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct PathStatus {
    /// The path in use.
    pub active: ActivePath,
    /// The remote address of the punched path in use.
    pub remote: Option<SocketAddr>,
    /// The punched UDP link's latest keepalive round trip (the session's own RTT figures
    /// cover whichever path it is on).
    pub rtt: Option<Duration>,
    /// The share of the punched UDP link's latest keepalive round trips that went
    /// unanswered (the path's own loss, whatever the session sends).
    pub loss: Option<f64>,
    /// Why this path: the outcome of the latest punching attempt, in words.
    pub why: String,
}

/// The path a session's packets are sent on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ActivePath {
    /// Tox lossy packets.
    #[default]
    Tox,
    /// A hole-punched UDP link.
    Udp,
    /// A hole-punched TCP link.
    Tcp,
    /// None: a forced punched path is not up yet, packets wait.
    Held,
}

impl fmt::Display for ActivePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tox => "tox",
            Self::Udp => "udp-punched",
            Self::Tcp => "tcp-punched",
            Self::Held => "held",
        })
    }
}

/// What [`gather`] found: the sockets to punch from and our candidates on them.
#[derive(Debug)]
pub struct Gathered {
    /// The UDP socket the candidates name (already used for STUN, nothing else).
    pub udp: Option<Arc<UdpSocket>>,
    /// The local address of the TCP port the candidates name. The port stays reserved while
    /// this value lives.
    pub tcp: Option<SocketAddr>,
    /// Keeps the TCP port bound until punching binds it again (with port reuse).
    _tcp_hold: Option<tokio::net::TcpSocket>,
    /// Our candidates, host addresses first.
    pub candidates: Vec<Candidate>,
    /// The networks our host candidates are on: what a peer's private candidates must be
    /// inside (see [`crate::punch::filter`]).
    pub networks: Vec<LocalNetwork>,
    /// The destinations of this host's specific routes (main table, default route excluded):
    /// private networks there are reachable too (see [`crate::punch::filter`]).
    pub routes: Vec<LocalNetwork>,
}

/// Binds what punching needs and learns our candidates: the addresses of our interfaces, and
/// what each STUN server sees (for UDP and TCP). A STUN server that does not answer is
/// skipped: gathering never fails because of the network, only when no socket can be bound.
pub async fn gather(config: &PathConfig, udp: bool, tcp: bool) -> io::Result<Gathered> {
    let networks = interface_networks();
    let hosts: Vec<IpAddr> = networks.iter().map(|n| n.addr).collect();
    let servers = resolve(&config.stun_servers).await;
    let mut candidates = Vec::new();
    let udp_socket = if udp {
        let socket = bind_punch_udp()?;
        let local = socket.local_addr()?;
        hosts_of(&mut candidates, &hosts, Protocol::Udp, local);
        Some(Arc::new(socket))
    } else {
        None
    };
    let (tcp_local, tcp_hold) = if tcp {
        let hold = bind_punch_tcp()?;
        let local = hold.local_addr()?;
        hosts_of(&mut candidates, &hosts, Protocol::Tcp, local);
        (Some(local), Some(hold))
    } else {
        (None, None)
    };
    // Both protocols at once, and the TCP servers in parallel (each query is its own
    // connection): unreachable servers used to cost their timeouts one after the other
    // (review B14). The UDP servers go in turn: their queries share one socket, and each
    // query takes whatever arrives on it.
    let udp_queries = async {
        let mut found = Vec::new();
        let Some(socket) = &udp_socket else {
            return found;
        };
        for &server in &servers {
            match stun_udp(socket, server, config.stun).await {
                Ok(addr) => found.push(reflexive(Protocol::Udp, addr)),
                Err(error) => debug!(%server, %error, "stun over udp failed"),
            }
        }
        found
    };
    let tcp_queries = async {
        let Some(local) = tcp_local else {
            return Vec::new();
        };
        let stun = config.stun;
        let queries: Vec<_> = servers
            .iter()
            .map(|&server| (server, tokio::spawn(stun_tcp(local, server, stun))))
            .collect();
        let mut found = Vec::new();
        for (server, query) in queries {
            match query.await {
                Ok(Ok((_, addr))) => found.push(reflexive(Protocol::Tcp, addr)),
                Ok(Err(error)) => debug!(%server, %error, "stun over tcp failed"),
                Err(error) => debug!(%server, %error, "stun over tcp task"),
            }
        }
        found
    };
    let (udp_found, tcp_found) = tokio::join!(udp_queries, tcp_queries);
    let candidates = offered(candidates, udp_found.into_iter().chain(tcp_found));
    Ok(Gathered {
        udp: udp_socket,
        tcp: tcp_local,
        _tcp_hold: tcp_hold,
        candidates,
        networks,
        routes: routed_networks(),
    })
}

/// Adds the host candidates of the socket bound at `local`: every interface address in
/// `hosts` it can use (IPv6 ones only on a socket of both families), at its port.
fn hosts_of(
    candidates: &mut Vec<Candidate>,
    hosts: &[IpAddr],
    protocol: Protocol,
    local: SocketAddr,
) {
    let v6 = local.is_ipv6();
    candidates.extend(
        hosts
            .iter()
            .copied()
            .filter(|ip| v6 || ip.is_ipv4())
            .map(|ip| Candidate {
                kind: CandidateKind::Host,
                protocol,
                addr: SocketAddr::new(ip, local.port()),
            }),
    );
}

fn reflexive(protocol: Protocol, addr: SocketAddr) -> Candidate {
    Candidate {
        kind: CandidateKind::ServerReflexive,
        protocol,
        addr,
    }
}

/// The candidates we offer, at most [`MAX_CANDIDATES`]: the first host address of each
/// protocol, then the server-reflexive ones (what a peer behind another NAT can reach), then
/// the other host addresses; cut at the end, so a host with many interfaces never crowds the
/// reflexive ones out (review B14). A reflexive address that is already there (a public host
/// address, or a second STUN server seeing the same mapping) is offered once.
fn offered(
    hosts: Vec<Candidate>,
    reflexive: impl IntoIterator<Item = Candidate>,
) -> Vec<Candidate> {
    let mut out: Vec<Candidate> = Vec::new();
    let mut rest = Vec::new();
    for host in &hosts {
        if out.iter().any(|c| c.protocol == host.protocol) {
            rest.push(*host);
        } else {
            out.push(*host);
        }
    }
    for candidate in reflexive {
        let known = |c: &Candidate| c.protocol == candidate.protocol && c.addr == candidate.addr;
        if !hosts.iter().any(known) && !out.iter().any(known) {
            out.push(candidate);
        }
    }
    out.extend(rest);
    out.truncate(MAX_CANDIDATES);
    out
}

/// The addresses of the interfaces that are up: IPv4 first, then global IPv6. IPv4 loopback
/// only when there is nothing else (a namespace with only `lo`): offering 127.0.0.1 to a
/// peer elsewhere would have it probe its own machine. IPv6 loopback, link-local (which needs
/// a scope) and v4-mapped addresses never.
///
/// Each comes with its prefix length (from the interface's netmask; a full-length prefix when
/// the system gives none).
pub(crate) fn interface_networks() -> Vec<LocalNetwork> {
    let mut outside = Vec::new();
    let mut loopback = Vec::new();
    let mut v6 = Vec::new();
    let Ok(interfaces) = getifaddrs::getifaddrs() else {
        return vec![LocalNetwork {
            addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
            prefix: 8,
        }];
    };
    for interface in interfaces {
        if !interface.flags.contains(getifaddrs::InterfaceFlags::UP) {
            continue;
        }
        let Some(ip) = interface.address.ip_addr() else {
            continue;
        };
        let list = match ip {
            IpAddr::V4(v4) if v4.is_loopback() => &mut loopback,
            IpAddr::V4(v4) if !v4.is_link_local() && !v4.is_unspecified() => &mut outside,
            IpAddr::V6(v6addr) if usable_v6(v6addr) => &mut v6,
            _ => continue,
        };
        let prefix = match interface.address.netmask() {
            Some(IpAddr::V4(mask)) => mask.to_bits().leading_ones() as u8,
            Some(IpAddr::V6(mask)) => mask.to_bits().leading_ones() as u8,
            None if ip.is_ipv4() => 32,
            None => 128,
        };
        if !list.iter().any(|n: &LocalNetwork| n.addr == ip) {
            list.push(LocalNetwork { addr: ip, prefix });
        }
    }
    let mut out = if outside.is_empty() {
        loopback
    } else {
        outside
    };
    out.extend(v6);
    out
}

/// The destinations of the specific routes of the main routing table: `/proc/net/route` and
/// `/proc/net/ipv6_route` on Linux, nothing elsewhere (or when they cannot be read).
pub(crate) fn routed_networks() -> Vec<LocalNetwork> {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let mut out = proc_routes_v4(&read("/proc/net/route"));
    out.extend(proc_routes_v6(&read("/proc/net/ipv6_route")));
    out
}

/// Linux's `RTF_UP`: the route is usable.
const RTF_UP: u32 = 0x0001;
/// Linux's `RTF_REJECT`: the route rejects (unreachable, prohibit, blackhole).
const RTF_REJECT: u32 = 0x0200;

/// The usable, specific routes of `/proc/net/route` text (`Iface Destination Gateway Flags
/// RefCnt Use Metric Mask ...`; an address is its network-order bytes printed as a
/// native-endian `u32` in hex): prefix 0 (a default route), loopback and rejecting routes
/// left out.
fn proc_routes_v4(text: &str) -> Vec<LocalNetwork> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (iface, dest, flags, mask) = (f.first()?, f.get(1)?, f.get(3)?, f.get(7)?);
            let flags = u32::from_str_radix(flags, 16).ok()?;
            let dest = Ipv4Addr::from(u32::from_str_radix(dest, 16).ok()?.to_ne_bytes());
            let mask = Ipv4Addr::from(u32::from_str_radix(mask, 16).ok()?.to_ne_bytes());
            let prefix = mask.to_bits().leading_ones() as u8;
            let usable = flags & RTF_UP != 0 && flags & RTF_REJECT == 0 && *iface != "lo";
            (usable && prefix > 0).then_some(LocalNetwork {
                addr: IpAddr::V4(dest),
                prefix,
            })
        })
        .collect()
}

/// The usable, specific routes of `/proc/net/ipv6_route` text (`dest prefix src prefix
/// next-hop metric refcnt use flags iface`, addresses in hex): prefix 0, loopback and
/// rejecting routes left out.
fn proc_routes_v6(text: &str) -> Vec<LocalNetwork> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (dest, prefix, flags, iface) = (f.first()?, f.get(1)?, f.get(8)?, f.get(9)?);
            let dest = u128::from_str_radix(dest, 16).ok()?;
            let prefix = u8::from_str_radix(prefix, 16).ok()?;
            let flags = u32::from_str_radix(flags, 16).ok()?;
            let usable = flags & RTF_UP != 0 && flags & RTF_REJECT == 0 && *iface != "lo";
            (usable && prefix > 0 && prefix <= 128).then_some(LocalNetwork {
                addr: IpAddr::V6(std::net::Ipv6Addr::from_bits(dest)),
                prefix,
            })
        })
        .collect()
}

/// Whether an interface's IPv6 address can be offered to a peer elsewhere.
fn usable_v6(ip: std::net::Ipv6Addr) -> bool {
    let link_local = ip.segments()[0] & 0xffc0 == 0xfe80;
    !ip.is_loopback()
        && !ip.is_unspecified()
        && !ip.is_multicast()
        && !link_local
        && ip.to_ipv4_mapped().is_none()
}

/// Resolves `host:port` names, all at once, skipping (and logging) those that do not
/// resolve.
async fn resolve(servers: &[String]) -> Vec<SocketAddr> {
    let lookups: Vec<_> = servers
        .iter()
        .map(|server| {
            let name = server.clone();
            (
                server,
                tokio::spawn(async move { tokio::net::lookup_host(name).await }),
            )
        })
        .collect();
    let mut out = Vec::new();
    for (server, lookup) in lookups {
        match lookup.await.map_err(io::Error::other).and_then(|r| r) {
            Ok(addrs) => {
                if let Some(addr) = addrs.into_iter().find(SocketAddr::is_ipv4) {
                    out.push(addr);
                }
            }
            Err(error) => debug!(%server, %error, "stun server does not resolve"),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_endian = "little")]
    #[test]
    fn specific_routes_are_read_from_the_proc_tables() {
        // An office host: its LAN, a route to the site's 10.20.0.0/16, a default route, an
        // unreachable route and a loopback one.
        let v4 =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t0100010A\t0003\t0\t0\t0\t00000000\t0\t0\t0
eth0\t0000010A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
eth0\t0000140A\t0100010A\t0003\t0\t0\t0\t0000FFFF\t0\t0\t0
eth0\t0000150A\t00000000\t0201\t0\t0\t0\t0000FFFF\t0\t0\t0
lo\t0000007F\t00000000\t0001\t0\t0\t0\t000000FF\t0\t0\t0
";
        let net = |a: &str, prefix| LocalNetwork {
            addr: a.parse().unwrap(),
            prefix,
        };
        assert_eq!(
            proc_routes_v4(v4),
            vec![net("10.1.0.0", 24), net("10.20.0.0", 16)]
        );
        let v6 = "\
fd123456789a00000000000000000000 30 00000000000000000000000000000000 00 fd000000000000000000000000000001 00000400 00000001 00000000 00000003     eth0
fe800000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000002 00000000 00000001     eth0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd000000000000000000000000000001 00000400 00000003 00000000 00000003     eth0
00000000000000000000000000000001 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000002 00000000 80200001       lo
fd990000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 00200201     eth0
";
        assert_eq!(
            proc_routes_v6(v6),
            vec![net("fd12:3456:789a::", 48), net("fe80::", 64)]
        );
        assert!(proc_routes_v4("").is_empty() && proc_routes_v6("garbage\n").is_empty());
    }

    #[test]
    fn only_global_ipv6_addresses_are_offered() {
        for (ip, offered) in [
            ("2001:db8::7", true),
            ("fd00:1::2", true),
            ("::1", false),
            ("::", false),
            ("fe80::1", false),
            ("febf::1", false),
            ("ff02::1", false),
            ("::ffff:192.0.2.1", false),
        ] {
            assert_eq!(usable_v6(ip.parse().unwrap()), offered, "{ip}");
        }
    }

    #[test]
    fn path_choices_parse_and_print() {
        for choice in [
            PathChoice::Auto,
            PathChoice::Tox,
            PathChoice::Udp,
            PathChoice::Tcp,
        ] {
            assert_eq!(choice.to_string().parse::<PathChoice>(), Ok(choice));
        }
        let err = "quic".parse::<PathChoice>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown path \"quic\": expected auto, tox, udp or tcp"
        );
        assert!(!PathChoice::Tox.wants_udp() && !PathChoice::Tox.wants_tcp());
        assert!(!PathChoice::Udp.allows_tox() && !PathChoice::Tcp.wants_udp());
    }

    #[tokio::test]
    async fn gathering_without_stun_offers_interface_addresses_of_both_sockets() {
        let g = gather(&PathConfig::default(), true, true).await.unwrap();
        let udp_port = g.udp.as_ref().unwrap().local_addr().unwrap().port();
        let tcp_port = g.tcp.unwrap().port();
        assert!(!g.candidates.is_empty());
        for c in &g.candidates {
            assert_eq!(c.kind, CandidateKind::Host);
            let port = match c.protocol {
                Protocol::Udp => udp_port,
                Protocol::Tcp => tcp_port,
            };
            assert_eq!(c.addr.port(), port, "{c:?}");
        }
        assert!(g.candidates.iter().any(|c| c.protocol == Protocol::Udp));
        assert!(g.candidates.iter().any(|c| c.protocol == Protocol::Tcp));
    }

    #[test]
    fn reflexive_candidates_come_before_extra_host_addresses_and_survive_the_cut() {
        let host = |protocol, i: u8| Candidate {
            kind: CandidateKind::Host,
            protocol,
            addr: SocketAddr::from(([10, 0, 0, i], 4000)),
        };
        // A host with many interfaces: more host candidates than an offer carries.
        let hosts: Vec<_> = (1..=30)
            .map(|i| host(Protocol::Udp, i))
            .chain((1..=30).map(|i| host(Protocol::Tcp, i)))
            .collect();
        let public = SocketAddr::from(([203, 0, 113, 7], 5000));
        let also_host = SocketAddr::from(([10, 0, 0, 3], 4000));
        let found = [
            reflexive(Protocol::Udp, public),
            // A second server sees the same mapping; a public host address is its own.
            reflexive(Protocol::Udp, public),
            reflexive(Protocol::Udp, also_host),
            reflexive(Protocol::Tcp, public),
        ];
        let got = offered(hosts.clone(), found);
        assert_eq!(got.len(), MAX_CANDIDATES);
        assert_eq!(
            &got[..2],
            &[hosts[0], hosts[30]],
            "one host address of each first"
        );
        assert_eq!(
            &got[2..4],
            &[
                reflexive(Protocol::Udp, public),
                reflexive(Protocol::Tcp, public)
            ],
            "then the reflexive ones, once each"
        );
        assert_eq!(got[4], hosts[1], "then the other host addresses");
        assert!(!got.contains(&reflexive(Protocol::Udp, also_host)));
    }

    #[tokio::test]
    async fn a_dead_stun_server_is_skipped_not_fatal() {
        let config = PathConfig {
            stun_servers: vec!["127.0.0.1:9".to_owned()],
            stun: TransactionConfig {
                rto: Duration::from_millis(20),
                max_sends: 2,
                rm: 2,
                reliable_timeout: Duration::from_millis(200),
            },
            ..PathConfig::default()
        };
        let g = gather(&config, true, true).await.unwrap();
        assert!(g.candidates.iter().all(|c| c.kind == CandidateKind::Host));
    }
}
