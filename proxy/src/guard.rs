//! The guards in front of the dialer of the local listeners (SOCKS5, HTTP).
//!
//! ```text
//! client on this host ───► LoopGuard ─► the mode's dialer (direct, or through exits)
//! client from elsewhere ─► LoopGuard ─► destination rules ─► the mode's dialer
//! ```
//!
//! - [`LoopGuard`]: a request for one of the proxy's own listeners is refused at once. Each
//!   such request would otherwise hold a connection slot and dial the proxy again, so one
//!   TCP write of pipelined `CONNECT`s nests as deep as the connection limit and starves
//!   every other client.
//! - [`Dialers::direct`] and [`Dialers::through_exits`] hold clients that connect from
//!   another host to the destination rules (no loopback, private, link-local, CGNAT or
//!   metadata addresses unless `--allow-private`): a listener open to the network must not
//!   become a door into this host and its LAN.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crate::dialer::{BoxFuture, BoxedStream, DialError, Dialer, DirectDialer, Target, UdpFlow};
use crate::exit_policy::{ExitPolicy, OwnNetworks, PolicyDialer};
use crate::status::Counters;

/// The dialers of the local listeners: one for clients on this host, one for clients that
/// connect from elsewhere.
#[derive(Debug, Clone)]
pub struct Dialers {
    /// For clients connecting over loopback.
    pub local: Arc<dyn Dialer>,
    /// For clients connecting from another host.
    pub lan: Arc<dyn Dialer>,
    /// Whether the dialers resolve names on this host (direct) or elsewhere (at an exit).
    resolve_here: bool,
}

impl Dialers {
    /// Direct mode: `local` as given (plain, or under the rules with `--direct-policy`), and
    /// the destination rules always for clients from elsewhere.
    pub fn direct(local: Arc<dyn Dialer>, direct: DirectDialer, policy: &ExitPolicy) -> Self {
        Self {
            local,
            lan: Arc::new(PolicyDialer::new(direct, policy.clone())),
            resolve_here: true,
        }
    }

    /// Through exits: names are resolved at the exit (resolving them here would leak DNS),
    /// so clients from elsewhere are held to the rules for addresses and ports they name,
    /// and `localhost` names are refused; the exit applies its own policy after that.
    pub fn through_exits(dialer: Arc<dyn Dialer>, policy: &ExitPolicy) -> Self {
        Self {
            lan: Arc::new(NamedRules {
                inner: dialer.clone(),
                policy: policy.clone(),
            }),
            local: dialer,
            resolve_here: false,
        }
    }

    /// Requests that name a peer (`NAME.tox`, overlay addresses) go to `mesh`'s peers ahead
    /// of either dialer: ahead of the destination rules too, which would refuse overlay
    /// addresses as private and, direct, ask DNS about `.tox` names.
    pub fn with_mesh(self, mesh: &crate::route::MeshDialer) -> Self {
        Self {
            local: Arc::new(mesh.in_front_of(self.local)),
            lan: Arc::new(mesh.in_front_of(self.lan)),
            resolve_here: self.resolve_here,
        }
    }

    /// Both dialers behind a [`LoopGuard`] for `own`.
    pub fn guarded(self, own: Arc<OwnListeners>, counters: Arc<Counters>) -> Self {
        let resolve = self.resolve_here;
        let guard = |inner| -> Arc<dyn Dialer> {
            Arc::new(LoopGuard {
                inner,
                own: own.clone(),
                counters: counters.clone(),
                resolve,
            })
        };
        Self {
            local: guard(self.local),
            lan: guard(self.lan),
            resolve_here: resolve,
        }
    }

    /// The dialer for a client connecting from `peer`.
    pub fn for_client(&self, peer: SocketAddr) -> &Arc<dyn Dialer> {
        if is_local_client(peer.ip()) {
            &self.local
        } else {
            &self.lan
        }
    }
}

/// Whether a client at `ip` is on this host for the purpose of the rules: loopback only (a
/// client that reaches a wildcard listener through a LAN address is treated as remote,
/// which errs on the safe side).
pub fn is_local_client(ip: IpAddr) -> bool {
    canonical(ip).is_loopback()
}

/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`, as a dual-stack listener sees IPv4
/// clients) as the IPv4 address they are.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Where this proxy's listeners are, to recognise a request for one of them under any of its
/// names: the bound address, `localhost`, this host's name, and for a wildcard bind every
/// address of this host.
#[derive(Debug, Clone, Default)]
pub struct OwnListeners {
    bound: Vec<SocketAddr>,
    host_name: Option<String>,
}

impl OwnListeners {
    /// The listeners bound at `bound` (their real addresses, after binding).
    pub fn new(bound: Vec<SocketAddr>) -> Self {
        Self {
            bound,
            host_name: host_name(),
        }
    }

    /// Whether `target` names one of the listeners. Names other than `localhost` and this
    /// host's name are resolved only when their port is a listener's port (rare), and only
    /// if `resolve` (never in exit mode: a name dialed at the exit cannot loop back here
    /// except through the exit's policy and a listener open to the network, which holds
    /// its clients to the rules).
    pub async fn is_own(&self, target: &Target, resolve: bool) -> bool {
        if !self.bound.iter().any(|l| l.port() == target.port()) {
            return false;
        }
        match target {
            Target::Ip(addr) => self.is_own_addr(*addr),
            Target::Domain(name, port) => {
                let name = name.trim_end_matches('.').to_ascii_lowercase();
                if is_localhost_name(&name)
                    || self
                        .host_name
                        .as_deref()
                        .is_some_and(|h| name == h || name.strip_suffix(".local") == Some(h))
                {
                    return true;
                }
                if !resolve {
                    return false;
                }
                match tokio::net::lookup_host((name.as_str(), *port)).await {
                    Ok(addrs) => addrs.into_iter().any(|a| self.is_own_addr(a)),
                    Err(_) => false,
                }
            }
        }
    }

    fn is_own_addr(&self, addr: SocketAddr) -> bool {
        let ip = canonical(addr.ip());
        self.bound
            .iter()
            .filter(|l| l.port() == addr.port())
            .any(|l| {
                let bound = canonical(l.ip());
                // Connecting to 0.0.0.0 or [::] reaches this host's own listeners.
                ip == bound
                    || ip.is_unspecified()
                    || (bound.is_unspecified() && (ip.is_loopback() || is_host_address(ip)))
            })
    }
}

/// Whether a request's `Host` header names this host: an IP literal, `localhost`, or this
/// host's name, with or without a port. Pages of other sites that a DNS-rebinding attack
/// points at this host's address carry their own name here, so answers that show this
/// node's keys check it.
pub fn is_own_host_header(host: &str) -> bool {
    let host = host.trim();
    let bare = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((ip, _)) => return ip.parse::<std::net::Ipv6Addr>().is_ok(),
            None => return false,
        }
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    let name = bare.trim_end_matches('.').to_ascii_lowercase();
    name.parse::<IpAddr>().is_ok()
        || is_localhost_name(&name)
        || host_name().is_some_and(|h| name == h || name.strip_suffix(".local") == Some(&h))
}

/// `localhost` and its subdomains (RFC 6761 §6.3: they always mean this host).
fn is_localhost_name(name: &str) -> bool {
    name == "localhost" || name.ends_with(".localhost")
}

/// Whether `ip` is an address of one of this host's interfaces, read now (addresses come and
/// go; this runs only for requests whose port is a listener's).
fn is_host_address(ip: IpAddr) -> bool {
    let Ok(interfaces) = getifaddrs::getifaddrs() else {
        return false;
    };
    interfaces
        .filter_map(|i| i.address.ip_addr())
        .any(|a| canonical(a) == ip)
}

/// This host's name, lowercase, if it has one.
fn host_name() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim().trim_end_matches('.').to_ascii_lowercase();
    (!name.is_empty()).then_some(name)
}

/// Refuses requests for the proxy's own listeners, then dials through `inner`.
#[derive(Debug)]
pub struct LoopGuard {
    inner: Arc<dyn Dialer>,
    own: Arc<OwnListeners>,
    counters: Arc<Counters>,
    /// A direct dialer resolves names here, so a name that resolves to a listener would
    /// loop; an exit resolves them itself.
    resolve: bool,
}

impl LoopGuard {
    async fn check(&self, target: &Target) -> Result<(), DialError> {
        if self.own.is_own(target, self.resolve).await {
            self.counters.loop_refused();
            return Err(DialError::PolicyDenied(format!(
                "{target} is this proxy's own listener"
            )));
        }
        Ok(())
    }
}

impl Dialer for LoopGuard {
    fn connect(&self, target: Target) -> BoxFuture<'_, Result<BoxedStream, DialError>> {
        Box::pin(async move {
            self.check(&target).await?;
            self.inner.connect(target).await
        })
    }

    fn udp_associate(&self) -> BoxFuture<'_, Result<Box<dyn UdpFlow>, DialError>> {
        // The listeners are TCP: no datagram can reach them.
        self.inner.udp_associate()
    }
}

/// The destination rules for a dialer that resolves names elsewhere (at an exit): addresses
/// and ports are checked here, `localhost` names refused, other names left to the exit.
#[derive(Debug)]
struct NamedRules {
    inner: Arc<dyn Dialer>,
    policy: ExitPolicy,
}

impl NamedRules {
    fn check(policy: &ExitPolicy, target: &Target) -> Result<(), DialError> {
        match target {
            // This host's own networks are not the exit's: the exit guards its own.
            Target::Ip(addr) => policy
                .check(*addr, &OwnNetworks::default())
                .map_err(DialError::PolicyDenied),
            Target::Domain(name, port) => {
                if !policy.allow_private
                    && is_localhost_name(&name.trim_end_matches('.').to_ascii_lowercase())
                {
                    return Err(DialError::PolicyDenied(format!("{name} is loopback")));
                }
                policy.check_port(*port).map_err(DialError::PolicyDenied)
            }
        }
    }
}

impl Dialer for NamedRules {
    fn connect(&self, target: Target) -> BoxFuture<'_, Result<BoxedStream, DialError>> {
        Box::pin(async move {
            Self::check(&self.policy, &target)?;
            self.inner.connect(target).await
        })
    }

    fn udp_associate(&self) -> BoxFuture<'_, Result<Box<dyn UdpFlow>, DialError>> {
        Box::pin(async move {
            let inner = self.inner.udp_associate().await?;
            Ok(Box::new(NamedRulesFlow {
                inner,
                policy: self.policy.clone(),
            }) as Box<dyn UdpFlow>)
        })
    }
}

/// A UDP flow whose datagrams pass [`NamedRules`] one by one.
#[derive(Debug)]
struct NamedRulesFlow {
    inner: Box<dyn UdpFlow>,
    policy: ExitPolicy,
}

impl UdpFlow for NamedRulesFlow {
    fn send_to<'a>(
        &'a self,
        payload: &'a [u8],
        target: &'a Target,
    ) -> BoxFuture<'a, Result<(), DialError>> {
        Box::pin(async move {
            NamedRules::check(&self.policy, target)?;
            self.inner.send_to(payload, target).await
        })
    }

    fn recv_from<'a>(
        &'a self,
        buf: &'a mut [u8],
    ) -> BoxFuture<'a, std::io::Result<(usize, SocketAddr)>> {
        self.inner.recv_from(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own(bound: &[&str]) -> OwnListeners {
        OwnListeners {
            bound: bound.iter().map(|a| a.parse().unwrap()).collect(),
            host_name: Some("proxybox".into()),
        }
    }

    fn t(s: &str) -> Target {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn own_listeners_under_every_name() {
        let o = own(&["127.0.0.1:8080", "[::1]:8080", "127.0.0.1:1080"]);
        for yes in [
            "127.0.0.1:8080",
            "[::1]:8080",
            "[::ffff:127.0.0.1]:1080",
            "0.0.0.0:8080",
            "[::]:1080",
            "localhost:8080",
            "LOCALHOST.:1080",
            "a.localhost:8080",
            "proxybox:8080",
            "proxybox.local:1080",
        ] {
            assert!(o.is_own(&t(yes), false).await, "{yes}");
        }
        for no in [
            "127.0.0.1:8081",
            "127.0.0.2:8080",
            "192.0.2.1:8080",
            "localhost:80",
            "example.com:8080",
            "proxybox.example:8080",
        ] {
            assert!(!o.is_own(&t(no), false).await, "{no}");
        }
        // A wildcard bind is reached through loopback too.
        let o = own(&["0.0.0.0:1080", "[::]:8080"]);
        assert!(o.is_own(&t("127.0.0.1:1080"), false).await);
        assert!(o.is_own(&t("127.9.9.9:1080"), false).await);
        assert!(o.is_own(&t("[::1]:8080"), false).await);
        assert!(!o.is_own(&t("192.0.2.1:8080"), false).await);
    }

    #[tokio::test]
    async fn names_resolve_only_when_asked() {
        // `localhost6`-style names are not special; resolving says where they go. Use a name
        // the hosts file is sure to map to loopback.
        let o = own(&["127.0.0.1:8080"]);
        let target = Target::Domain("localhost".into(), 8080);
        assert!(o.is_own(&target, false).await);
        let target = Target::Domain("ip6-localhost".into(), 8080);
        let resolved = tokio::net::lookup_host(("ip6-localhost", 8080)).await;
        if resolved.is_ok_and(|mut a| a.any(|a| a.ip().is_loopback())) {
            let o = own(&["[::1]:8080"]);
            assert!(!o.is_own(&target, false).await);
            assert!(o.is_own(&target, true).await);
        }
    }

    #[test]
    fn named_rules_check_addresses_ports_and_localhost() {
        let policy = ExitPolicy::default();
        let check = |s: &str| NamedRules::check(&policy, &t(s));
        assert!(check("127.0.0.1:22").is_err());
        assert!(check("192.168.1.1:80").is_err());
        assert!(check("169.254.169.254:80").is_err());
        assert!(check("[::ffff:10.0.0.1]:80").is_err());
        assert!(check("localhost:22").is_err());
        assert!(check("x.localhost:22").is_err());
        assert!(check("example.com:443").is_ok());
        let open = ExitPolicy {
            allow_private: true,
            ..ExitPolicy::default()
        };
        assert!(NamedRules::check(&open, &t("localhost:22")).is_ok());
        assert!(NamedRules::check(&open, &t("10.0.0.1:22")).is_ok());
    }

    #[test]
    fn host_headers_of_this_host_only() {
        for yes in [
            "127.0.0.1:8080",
            "127.0.0.1",
            "[::1]:8080",
            "192.168.1.5:8080",
            "localhost:8080",
            "LocalHost",
            "x.localhost:1",
        ] {
            assert!(is_own_host_header(yes), "{yes}");
        }
        for no in [
            "evil.example:8080",
            "evil.example",
            "127.0.0.1.evil.example",
            "localhost.evil.example:8080",
            "[::1",
            "",
        ] {
            assert!(!is_own_host_header(no), "{no}");
        }
        if let Some(name) = host_name() {
            assert!(is_own_host_header(&format!("{name}:8080")));
            assert!(is_own_host_header(&format!("{name}.local")));
        }
    }

    #[test]
    fn loopback_clients_are_local() {
        assert!(is_local_client("127.0.0.1".parse().unwrap()));
        assert!(is_local_client("::1".parse().unwrap()));
        assert!(is_local_client("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!is_local_client("192.168.1.5".parse().unwrap()));
        assert!(!is_local_client("::ffff:192.168.1.5".parse().unwrap()));
        assert!(!is_local_client("fe80::1".parse().unwrap()));
    }
}
