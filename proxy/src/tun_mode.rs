//! `proxy --tun`: capture the host's traffic with a TUN device and send every flow through the
//! same [`Dialer`] as the SOCKS5 and HTTP listeners.
//!
//! ```text
//!  apps ─► kernel ── policy routing: unmarked ─► table TABLE ─► tun ─► netstack
//!                                                                              │
//!   TCP flow ─► Dialer::connect(original destination) ─► accept + relay ◄──────┤
//!   UDP flow ─► Dialer::udp_associate ─► datagrams both ways ◄─────────────────┘
//!  proxy's own sockets carry MARK (SO_MARK) and follow the main table: no loop.
//! ```
//!
//! With `--exit` the Tox node's sockets are created inside c-toxcore, out of reach of
//! `SO_MARK`: [`OwnSockets`] marks the whole process's packets through its cgroup instead.
//!
//! Routing (Linux, through `ip`): a table of our own holds the TUN routes (everything, or only
//! `--tun-route` networks, minus `--tun-exclude` and the host's connected networks as `throw`
//! routes, unless `--tun-lan`); a first rule sends this process's marked sockets to `main`, a
//! last one everything else to that table; DNS (UDP and TCP port 53) has its own rule and
//! table so it reaches the TUN whatever the routes say. [`Routing`] undoes all of it on drop,
//! which runs on Ctrl-C and SIGTERM as on errors.
//!
//! Strict route: a socket bound to an interface (`SO_BINDTODEVICE`, `IP_UNICAST_IF`, a
//! link-local IPv6 resolver's scope) only matches routes through that interface, so no rule can
//! send its packets into the TUN. With an exit, [`StrictRoute`] rejects the port-53 packets
//! that leave by any interface but the TUN without the proxy's mark: such a query never
//! leaves, and the resolver moves on to a server it reaches through the TUN. Direct, such a
//! query leaves by the uplink as the proxy would send it, and is left alone: rejecting it
//! would only break resolvers that ask nothing else (systemd-resolved's per-link servers).

mod lan;
mod own_sockets;

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use netstack::dns::{Query, TYPE_A, TYPE_AAAA};
use netstack::fake_ip::{self, FakeIpTable, Instant as SmolInstant};
use netstack::{
    Incoming, NetStack, StackConfig, TcpRequest, TunConfig, TunDevice, UdpFlow, UdpReply,
};
use tracing::{debug, info, warn};

use crate::config::{RunSettings, TunOptions};
use crate::dialer::{Dialer, Target};
use crate::exit::dns;
use crate::exit_policy::Cidr;
use crate::route::MeshDialer;
use crate::status::{Counters, TunCapture};

pub use own_sockets::OwnSockets;

mod mesh;

/// The `SO_MARK` of this process's own sockets, and the firewall mark the routing rule skips.
pub const MARK: u32 = 0x7478;
/// The routing table holding the TUN routes.
pub const TABLE: u32 = 0x7478;
/// The routing table DNS goes to (always the TUN).
pub const DNS_TABLE: u32 = 0x7479;
/// Priority of the rule sending unmarked traffic to [`TABLE`] (before `main` at 32766).
pub const PRIORITY: u32 = 0x7478;
/// Priority of the DNS rules (just before [`PRIORITY`]).
pub const DNS_PRIORITY: u32 = PRIORITY - 1;
/// Priority of the rule sending this process's marked sockets to `main` (before the others).
/// (`not fwmark M …` would not do for DNS: `not` inverts the whole selector, not the mark.)
pub const MARK_PRIORITY: u32 = PRIORITY - 2;
/// The kernel side's addresses on the TUN (the netstack itself answers for every address).
pub const TUN_V4: (Ipv4Addr, u8) = (Ipv4Addr::new(172, 19, 0, 1), 30);
/// The kernel side's IPv6 address on the TUN.
pub const TUN_V6: (Ipv6Addr, u8) = (Ipv6Addr::new(0xfd00, 0x7478, 0, 0, 0, 0, 0, 1), 126);
/// UDP flows (application sockets) served at once; each holds a task, a 64 KiB buffer and,
/// direct, a socket. DNS lookups take none (they are answered per datagram).
pub const MAX_UDP_FLOWS: usize = 4096;
/// How long a UDP flow lives without a datagram either way.
pub const UDP_IDLE: Duration = Duration::from_secs(60);
/// Fake-IP mode: names held at most: every address of 198.18.0.0/15 (a name costs a few
/// hundred bytes).
pub const FAKE_CAPACITY: u32 = fake_ip::MAX_CAPACITY;
/// Fake-IP mode: a name unused (not looked up, none of its addresses dialed) this long is
/// forgotten. Much longer than [`FAKE_TTL`], so caches that stretch TTLs still find it.
pub const FAKE_IDLE: Duration = Duration::from_secs(3600);
/// Fake-IP mode: the TTL of the answers, in seconds.
pub const FAKE_TTL: u32 = 60;
/// Fake-IP mode: an address goes to another name only this long after its name was last
/// used: ten TTLs, so caches that keep answers past their TTL have let it go.
pub const FAKE_QUARANTINE: Duration = Duration::from_secs(10 * FAKE_TTL as u64);

/// TUN mode could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TunError {
    /// The device could not be created (not root, no `/dev/net/tun`).
    #[error("cannot create the tun device: {0}")]
    Device(io::Error),
    /// A routing command failed.
    #[error("routing setup failed: `{command}`: {message}")]
    Routing {
        /// The command.
        command: String,
        /// What it said.
        message: String,
    },
    /// TUN mode exists on Linux only for now.
    #[error("tun mode is only available on Linux")]
    Unsupported,
    /// The device could not get IPv6 on a host that has it: with an exit, IPv6 would leak.
    #[error(
        "the tun device cannot get IPv6 ({0}) while this host has IPv6: all IPv6, DNS included, \
         would leave around the exit; allow IPv6 on new interfaces \
         (sysctl net.ipv6.conf.default.disable_ipv6=0) or turn IPv6 off on this host"
    )]
    NoIpv6(io::Error),
}

/// Creates the device and the routes, then serves flows until `shutdown` completes; the routes
/// and the device are gone when this returns. What the TUN captures goes into `capture` once
/// the routes are up (for `proxy status`).
/// `peers`: the known peers, whose overlay addresses the TUN routes, whose names its DNS
/// answers and whose pings it answers when they answer.
pub async fn run(
    settings: &RunSettings,
    dialer: Arc<dyn Dialer>,
    counters: Arc<Counters>,
    capture: Arc<std::sync::OnceLock<TunCapture>>,
    peers: Option<MeshDialer>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), TunError> {
    if !cfg!(target_os = "linux") {
        return Err(TunError::Unsupported);
    }
    let opts = &settings.tun_options;
    let mut tun = TunConfig {
        name: opts.name.clone(),
        ipv4: Some(TUN_V4),
        ipv6: Some(TUN_V6),
        ..TunConfig::default()
    };
    let device = match TunDevice::create(&tun) {
        Ok(d) => d,
        Err(err) if !settings.exits.is_empty() && host_has_ipv6() => {
            // Without IPv6 on the TUN no -6 rule is installed, and all IPv6 (DNS to an IPv6
            // resolver included) would leave around the exit.
            return Err(TunError::NoIpv6(err));
        }
        Err(err) => {
            // A host without IPv6 refuses the IPv6 address: go on with IPv4 only, which
            // loses nothing there.
            warn!(%err, "the tun has no IPv6 (neither has this host): IPv4 only");
            tun.ipv6 = None;
            TunDevice::create(&tun).map_err(TunError::Device)?
        }
    };
    let name = device.name().to_owned();
    let addrs = lan::interface_addresses().map_err(|e| TunError::Routing {
        command: "reading this host's interface addresses".into(),
        message: e.to_string(),
    })?;
    let lan = lan::connected_networks(addrs.iter().cloned(), &name);
    let kept_local = if opts.lan { &[][..] } else { &lan[..] };
    let overlay = peers
        .as_ref()
        .map(|p| mesh::overlay_routes(&p.mesh().now().routes, tun.ipv6.is_some()))
        .unwrap_or_default();
    let routing = Routing::install(&name, opts, kept_local, tun.ipv6.is_some(), &overlay)?;
    if let Some(p) = &peers {
        // Peers paired, added, introduced or removed while the TUN runs: their IPv4
        // addresses are routed (or not) at once. The table goes with the TUN at the end.
        tokio::spawn(follow_overlay(
            p.mesh().clone(),
            name.clone(),
            tun.ipv6.is_some(),
            overlay.clone(),
            opts.route.iter().map(ToString::to_string).collect(),
        ));
    }
    let strict_route = !settings.exits.is_empty();
    let strict = if strict_route {
        Some(StrictRoute::install(&name)?)
    } else {
        None
    };
    let mut summary = capture_summary(
        &name,
        opts,
        &lan,
        &addrs,
        tun.ipv6.is_some(),
        dialer.resolver().is_some(),
        strict_route,
    );
    summary
        .captured
        .extend(overlay.iter().map(|r| format!("{r} (peer)")));
    let _ = capture.set(summary);
    let peer_dns = peers.as_ref().map(|p| PeerDns {
        mesh: p.mesh().clone(),
        ipv6: tun.ipv6.is_some(),
    });
    let pings = Arc::new(tokio::sync::Semaphore::new(MAX_PINGS));
    let peer_dns = peer_dns.map(Arc::new);
    info!(device = %name, lan = ?lan.iter().map(ToString::to_string).collect::<Vec<_>>(), lan_captured = opts.lan, "tun routes up");
    let fake = opts
        .fake_ip
        .then(|| Arc::new(FakeDns::new(tun.ipv6.is_some())));
    info!(device = %name, offload = device.offload(), "tun mode up");
    let mut stack = NetStack::spawn(device, StackConfig::default(), UDP_IDLE);
    let idle = settings.common.idle_timeout;
    let tcp_flows = Arc::new(tokio::sync::Semaphore::new(settings.common.max_connections));
    let udp_flows = Arc::new(tokio::sync::Semaphore::new(MAX_UDP_FLOWS));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            incoming = stack.accept() => match incoming {
                Some(Incoming::Tcp(req)) => {
                    // At most --max-connections TCP flows at once: a refused one gets a reset,
                    // which the application sees at once.
                    let Ok(permit) = tcp_flows.clone().try_acquire_owned() else {
                        counters.tun_flow_refused();
                        debug!(dst = %req.dst(), "tun tcp flows at their limit, refusing");
                        req.reject();
                        continue;
                    };
                    let serve = serve_tcp(req, dialer.clone(), fake.clone(), idle);
                    tokio::spawn(async move {
                        serve.await;
                        drop(permit);
                    });
                }
                Some(Incoming::Udp(flow)) => {
                    // A refused UDP flow's datagrams are dropped until the stack forgets it.
                    let Ok(permit) = udp_flows.clone().try_acquire_owned() else {
                        counters.tun_flow_refused();
                        debug!(src = %flow.src(), "tun udp flows at their limit, dropped");
                        continue;
                    };
                    let serve = serve_udp(flow, dialer.clone(), fake.clone(), peer_dns.clone());
                    tokio::spawn(async move {
                        serve.await;
                        drop(permit);
                    });
                }
                Some(Incoming::Echo(echo)) => {
                    // A peer's overlay address answers when the peer does; nothing else does.
                    let (Some(mesh), Ok(permit)) = (&peers, pings.clone().try_acquire_owned())
                    else {
                        continue;
                    };
                    let mesh = mesh.clone();
                    tokio::spawn(async move {
                        let _permit = permit;
                        let answer = tokio::time::timeout(PING_WAIT, mesh.ping(echo.dst())).await;
                        match answer {
                            Ok(Some(Ok(()))) => echo.reply(),
                            Ok(Some(Err(err))) => debug!(dst = %echo.dst(), %err, "ping unanswered"),
                            Ok(None) | Err(_) => {}
                        }
                    });
                }
                Some(_) => {}
                None => {
                    warn!("the tun driver stopped");
                    break;
                }
            },
            () = &mut shutdown => break,
        }
    }
    info!("tun mode shutting down");
    drop(stack);
    drop(strict);
    drop(routing);
    Ok(())
}

/// What [`Routing::install`] set up, for `proxy status`.
fn capture_summary(
    dev: &str,
    opts: &TunOptions,
    lan: &[Cidr],
    addrs: &[(String, IpAddr, u8)],
    ipv6: bool,
    exit_resolver: bool,
    strict_route: bool,
) -> TunCapture {
    let strings = |v: &[Cidr]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
    let mut captured = if opts.route.is_empty() {
        let mut all = vec!["0.0.0.0/0".to_owned()];
        if ipv6 {
            all.push("::/0".into());
        }
        all
    } else {
        strings(&opts.route)
    };
    if opts.fake_ip && !opts.route.is_empty() {
        captured.push(format!("{}/{}", fake_ip::V4_NET.0, fake_ip::V4_NET.1));
        if ipv6 {
            captured.push(format!("{}/{}", fake_ip::V6_NET.0, fake_ip::V6_NET.1));
        }
    }
    let mut own_addresses: Vec<String> = Vec::new();
    for (name, ip, _) in addrs {
        let ip = ip.to_string();
        if name != dev && name != "lo" && !own_addresses.contains(&ip) {
            own_addresses.push(ip);
        }
    }
    let v4 = Ipv4Addr::from_bits(TUN_V4.0.to_bits() & (u32::MAX << (32 - TUN_V4.1)));
    let mut tun_prefixes = vec![format!("{v4}/{}", TUN_V4.1)];
    if ipv6 {
        let net = Ipv6Addr::from_bits(TUN_V6.0.to_bits() & (u128::MAX << (128 - TUN_V6.1)));
        tun_prefixes.push(format!("{net}/{}", TUN_V6.1));
    }
    let dns = match (opts.fake_ip, exit_resolver) {
        (true, true) => {
            "A and AAAA answered with fake addresses, other types by the exit's resolver"
        }
        (true, false) => {
            "A and AAAA answered with fake addresses, other types sent on to the address asked"
        }
        (false, true) => "answered by the exit's resolver, whatever address was asked",
        (false, false) => "sent on to the address asked, from this host (marked)",
    };
    TunCapture {
        device: dev.to_owned(),
        captured,
        lan: strings(lan),
        lan_captured: opts.lan,
        excluded: strings(&opts.exclude),
        own_addresses,
        tun_prefixes,
        dns: dns.into(),
        strict_route,
    }
}

/// Whether this host has IPv6 beyond loopback (an address on any other interface).
fn host_has_ipv6() -> bool {
    std::fs::read_to_string("/proc/net/if_inet6").is_ok_and(|text| {
        text.lines()
            .any(|l| l.split_whitespace().last().is_some_and(|dev| dev != "lo"))
    })
}

/// Whether `ip` is in the TUN's own prefixes: dialed (with the mark, by `main`'s connected
/// route) it would come back into the TUN as a new flow, again and again.
fn is_tun_prefix(ip: IpAddr) -> bool {
    let in_net = |net: u128, len: u8, bits: u32, ip: u128| {
        let shift = bits - u32::from(len);
        (ip >> shift) == (net >> shift)
    };
    match ip.to_canonical() {
        IpAddr::V4(v4) => in_net(
            u32::from(TUN_V4.0).into(),
            TUN_V4.1,
            32,
            u32::from(v4).into(),
        ),
        IpAddr::V6(v6) => in_net(u128::from(TUN_V6.0), TUN_V6.1, 128, u128::from(v6)),
    }
}

async fn serve_tcp(
    req: TcpRequest,
    dialer: Arc<dyn Dialer>,
    fake: Option<Arc<FakeDns>>,
    idle: Option<Duration>,
) {
    let dst = req.dst();
    if is_tun_prefix(dst.ip()) {
        debug!(%dst, "flow to the tun's own prefix, refusing");
        req.reject();
        return;
    }
    let Some(target) = target(dst, fake.as_deref()) else {
        debug!(%dst, "fake address with no name (forgotten), refusing");
        req.reject();
        return;
    };
    // DNS over TCP goes to the exit's resolver as it is: the stream carries the same framing.
    let dial = match dialer.resolver() {
        Some(resolver) if dst.port() == 53 => resolver,
        _ => dialer.connect(target),
    };
    let mut upstream = match dial.await {
        Ok(s) => s,
        Err(err) => {
            debug!(%dst, %err, "tun dial failed");
            req.reject();
            return;
        }
    };
    let mut stream = match req.accept() {
        Ok(s) => s,
        Err(err) => {
            debug!(%dst, %err, "tun accept failed");
            return;
        }
    };
    match crate::relay::relay(&mut stream, &mut upstream, idle).await {
        Ok(t) => debug!(%dst, up = t.up, down = t.down, "tun flow done"),
        Err(err) => debug!(%dst, %err, "tun flow ended"),
    }
}

/// Pings of peers' overlay addresses in flight at once (more are dropped).
const MAX_PINGS: usize = 256;
/// How long a ping of a peer waits for its round trip (a ping tool gives up about then).
const PING_WAIT: Duration = Duration::from_secs(5);

/// Queries on their way to the exit's resolver at once, over all TUN flows: beyond this
/// many, new ones are dropped (the application's resolver asks again).
const DNS_IN_FLIGHT: usize = 512;

/// Sends one captured UDP query to the exit's resolver and delivers its answer as if from
/// `dst`, the server the application asked, in a task of its own.
fn resolve_at_exit(dialer: &Arc<dyn Dialer>, reply: &UdpReply, dst: SocketAddr, query: Vec<u8>) {
    static IN_FLIGHT: std::sync::LazyLock<Arc<tokio::sync::Semaphore>> =
        std::sync::LazyLock::new(|| Arc::new(tokio::sync::Semaphore::new(DNS_IN_FLIGHT)));
    let Ok(permit) = IN_FLIGHT.clone().try_acquire_owned() else {
        debug!(%dst, "too many DNS queries in flight, dropped");
        return;
    };
    let (dialer, reply) = (dialer.clone(), reply.clone());
    tokio::spawn(async move {
        let _permit = permit;
        let exchange = async {
            // The query travels with the request for the stream: one round trip, not two.
            let resolver = dialer
                .resolver_with(dns::framed(&query)?)
                .ok_or_else(|| io::Error::other("no resolver"))?;
            let mut stream = resolver.await?;
            dns::read_framed(&mut stream).await
        };
        match tokio::time::timeout(DNS_TIMEOUT, exchange).await {
            Ok(Ok(Some(answer))) => reply.send(dst, &answer),
            Ok(Ok(None)) => debug!(%dst, "the exit's resolver closed without an answer"),
            Ok(Err(err)) => debug!(%dst, %err, "dns through the exit failed"),
            Err(_) => debug!(%dst, "dns through the exit timed out"),
        }
    });
}

/// How long a UDP flow that only carried DNS queries (answered by the exit's resolver or the
/// fake-IP table) lives after its last query.
const DNS_FLOW_IDLE: Duration = Duration::from_secs(1);

/// How long a query through the exit may take before it is given up (the application's
/// resolver has retried by then).
const DNS_TIMEOUT: Duration = Duration::from_secs(10);

/// Where to dial for a destination the application used: the name behind a fake address,
/// or the address itself. `None` for a fake address whose name was forgotten.
fn target(dst: SocketAddr, fake: Option<&FakeDns>) -> Option<Target> {
    match fake {
        Some(fake) if FakeIpTable::is_fake(dst.ip()) => fake
            .name_of(dst.ip())
            .map(|name| Target::Domain(name, dst.port())),
        _ => Some(Target::Ip(dst)),
    }
}

/// What the TUN's DNS answers of the peers' names.
#[derive(Debug)]
struct PeerDns {
    mesh: Arc<crate::mesh::Mesh>,
    /// Whether the TUN has IPv6 (AAAA records are answered only then).
    ipv6: bool,
}

async fn serve_udp(
    mut flow: UdpFlow,
    dialer: Arc<dyn Dialer>,
    fake: Option<Arc<FakeDns>>,
    peers: Option<Arc<PeerDns>>,
) {
    let src = flow.src();
    let reply = flow.reply();
    // Opened with the first datagram that must leave (fake-IP DNS answers never do).
    let mut upstream: Option<Box<dyn crate::dialer::UdpFlow>> = None;
    // Fake destinations by port: replies come from the real address the name resolved to,
    // and the application must see them come from the address it sent to.
    let mut fake_peers: HashMap<u16, SocketAddr> = HashMap::new();
    let mut buf = vec![0u8; 65535];
    loop {
        let received = async {
            match &upstream {
                Some(u) => u.recv_from(&mut buf).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            dgram = flow.recv() => {
                // None: the flow expired (idle) or the stack stopped.
                let Some((dst, payload)) = dgram else { return };
                // Peers' names never leave this host, fake-IP or not.
                if dst.port() == 53
                    && let Some(answer) = peers
                        .as_deref()
                        .and_then(|p| mesh::answer(&p.mesh.now().routes, &payload, p.ipv6))
                {
                    reply.send(dst, &answer);
                    continue;
                }
                if dst.port() == 53
                    && let Some(answer) = fake.as_deref().and_then(|f| f.answer(&payload))
                {
                    reply.send(dst, &answer);
                    continue;
                }
                if dst.port() == 53 && dialer.resolver().is_some() {
                    // Asked of the exit's resolver, whatever address the application used
                    // (a home router's means nothing at the exit): no UDP flow there at all.
                    resolve_at_exit(&dialer, &reply, dst, payload);
                    continue;
                }
                if is_tun_prefix(dst.ip()) {
                    debug!(%src, %dst, "datagram to the tun's own prefix, dropped");
                    continue;
                }
                let Some(target) = target(dst, fake.as_deref()) else {
                    debug!(%src, %dst, "fake address with no name (forgotten), dropped");
                    continue;
                };
                if matches!(target, Target::Domain(..)) {
                    fake_peers.insert(dst.port(), dst);
                }
                if upstream.is_none() {
                    match dialer.udp_associate().await {
                        Ok(u) => upstream = Some(u),
                        Err(err) => {
                            debug!(%src, %err, "udp associate failed");
                            return;
                        }
                    }
                }
                let Some(up) = &upstream else { return };
                if let Err(err) = up.send_to(&payload, &target).await {
                    debug!(%src, %dst, %err, "udp send failed");
                }
            }
            // A flow that only carried DNS answered here or at the exit (a resolver's socket,
            // new for every lookup) holds no upstream: end it soon, or a burst of lookups
            // would fill the table of UDP flows for a minute. Answers still reach the socket,
            // and a later query from it starts a new flow.
            () = tokio::time::sleep(DNS_FLOW_IDLE), if upstream.is_none() => return,
            got = received => match got {
                Ok((n, from)) => {
                    let from = match fake_peers.get(&from.port()) {
                        Some(fake) if !FakeIpTable::is_fake(from.ip()) => *fake,
                        _ => from,
                    };
                    reply.send(from, &buf[..n]);
                }
                Err(err) => {
                    debug!(%src, %err, "udp receive failed");
                    return;
                }
            }
        }
    }
}

/// Fake-IP mode: A and AAAA queries answered from the table, names found again by address.
#[derive(Debug)]
struct FakeDns {
    table: Mutex<FakeIpTable>,
    epoch: std::time::Instant,
    /// Whether AAAA queries get an address (only when IPv6 reaches the TUN).
    ipv6: bool,
}

impl FakeDns {
    fn new(ipv6: bool) -> Self {
        Self {
            table: Mutex::new(FakeIpTable::new(FAKE_CAPACITY, FAKE_IDLE, FAKE_QUARANTINE)),
            epoch: std::time::Instant::now(),
            ipv6,
        }
    }

    fn now(&self) -> SmolInstant {
        SmolInstant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    fn table(&self) -> std::sync::MutexGuard<'_, FakeIpTable> {
        // The table stays consistent whatever panicked while holding it.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The answer to an A or AAAA query; `None` for anything else (sent on to a real
    /// resolver through the dialer).
    fn answer(&self, msg: &[u8]) -> Option<Vec<u8>> {
        let query = Query::parse(msg).ok()?;
        if !(query.qtype == TYPE_A || query.qtype == TYPE_AAAA) || query.name.is_empty() {
            return None;
        }
        let now = self.now();
        let assigned = {
            let mut table = self.table();
            table.handle_timeout(now);
            table.assign(now, &query.name)
        };
        let Some(addrs) = assigned else {
            warn!(name = %query.name, "fake-ip table full of names used in the last {} s: server failure", FAKE_QUARANTINE.as_secs());
            return Some(query.server_failure(msg));
        };
        let mut records = vec![IpAddr::V4(addrs.v4)];
        if self.ipv6 {
            records.push(IpAddr::V6(addrs.v6));
        }
        debug!(name = %query.name, v4 = %addrs.v4, "fake address");
        Some(query.answer(msg, &records, FAKE_TTL))
    }

    fn name_of(&self, ip: IpAddr) -> Option<String> {
        let now = self.now();
        let mut table = self.table();
        table.handle_timeout(now);
        table.name_of(now, ip)
    }
}

/// The routes and rules TUN mode added; dropping removes them.
#[derive(Debug)]
pub struct Routing {
    undo: Vec<Vec<String>>,
}

impl Routing {
    /// Adds the tables and rules for device `dev`; `kept_local` (the host's connected
    /// networks, unless `--tun-lan`) stays out of the TUN as `--tun-exclude` does.
    /// `overlay`: the peers' overlay prefixes, routed into the TUN whatever `opts` says.
    pub fn install(
        dev: &str,
        opts: &TunOptions,
        kept_local: &[Cidr],
        ipv6: bool,
        overlay: &[String],
    ) -> Result<Self, TunError> {
        let mut families = vec!["-4"];
        if ipv6 {
            families.push("-6");
        }
        // Leftovers of a run that was killed hard would shadow ours: clear them first.
        for fam in &families {
            remove_ours(fam);
        }
        let mut routing = Self { undo: Vec::new() };
        let table = TABLE.to_string();
        let dns_table = DNS_TABLE.to_string();
        let mark = MARK.to_string();
        for fam in &families {
            let v6 = *fam == "-6";
            routing
                .undo
                .push(args(&["ip", fam, "route", "flush", "table", &table]));
            routing
                .undo
                .push(args(&["ip", fam, "route", "flush", "table", &dns_table]));
            routing.undo.push(args(&[
                "ip",
                fam,
                "rule",
                "del",
                "priority",
                &PRIORITY.to_string(),
            ]));
            routing.undo.push(args(&[
                "ip",
                fam,
                "rule",
                "del",
                "priority",
                &MARK_PRIORITY.to_string(),
            ]));
            for _ in 0..2 {
                routing.undo.push(args(&[
                    "ip",
                    fam,
                    "rule",
                    "del",
                    "priority",
                    &DNS_PRIORITY.to_string(),
                ]));
            }
            let mut routes: Vec<String> = if opts.route.is_empty() {
                vec!["default".into()]
            } else {
                opts.route
                    .iter()
                    .filter(|c| c.to_string().contains(':') == v6)
                    .map(ToString::to_string)
                    .collect()
            };
            if opts.fake_ip && !opts.route.is_empty() {
                // Fake addresses mean nothing anywhere else.
                routes.push(if v6 {
                    format!("{}/{}", fake_ip::V6_NET.0, fake_ip::V6_NET.1)
                } else {
                    format!("{}/{}", fake_ip::V4_NET.0, fake_ip::V4_NET.1)
                });
            }
            for route in &routes {
                ip(&[
                    "ip", fam, "route", "add", route, "dev", dev, "table", &table,
                ])?;
            }
            for cidr in throw_routes(opts, kept_local)
                .iter()
                .filter(|c| c.to_string().contains(':') == v6)
            {
                ip(&[
                    "ip",
                    fam,
                    "route",
                    "add",
                    "throw",
                    &cidr.to_string(),
                    "table",
                    &table,
                ])?;
            }
            for route in overlay.iter().filter(|r| r.contains(':') == v6) {
                // Replace: --tun-route may name the same prefix.
                ip(&[
                    "ip", fam, "route", "replace", route, "dev", dev, "table", &table,
                ])?;
            }
            ip(&[
                "ip", fam, "route", "add", "default", "dev", dev, "table", &dns_table,
            ])?;
            // This process's own sockets: the main table, never the TUN.
            ip(&[
                "ip",
                fam,
                "rule",
                "add",
                "fwmark",
                &mark,
                "table",
                "main",
                "priority",
                &MARK_PRIORITY.to_string(),
            ])?;
            for proto in ["udp", "tcp"] {
                ip(&[
                    "ip",
                    fam,
                    "rule",
                    "add",
                    "ipproto",
                    proto,
                    "dport",
                    "53",
                    "table",
                    &dns_table,
                    "priority",
                    &DNS_PRIORITY.to_string(),
                ])?;
            }
            ip(&[
                "ip",
                fam,
                "rule",
                "add",
                "table",
                &table,
                "priority",
                &PRIORITY.to_string(),
            ])?;
        }
        Ok(routing)
    }
}

impl Drop for Routing {
    fn drop(&mut self) {
        for cmd in self.undo.drain(..) {
            // Removing what is already gone fails harmlessly.
            let _ = exec(&cmd);
        }
        debug!("tun routes removed");
    }
}

/// The networks to leave out of the TUN's table: `--tun-exclude`, then the kept-local
/// networks that are neither excluded already nor named by `--tun-route` (routing a network
/// explicitly is asking for it, LAN or not).
fn throw_routes(opts: &TunOptions, kept_local: &[Cidr]) -> Vec<Cidr> {
    let mut throws = opts.exclude.clone();
    for net in kept_local {
        if !throws.contains(net) && !opts.route.contains(net) {
            throws.push(*net);
        }
    }
    throws
}

/// The nftables table of [`StrictRoute`].
const STRICT_TABLE: &str = "proxy_tun_strict";

/// Rejects port-53 packets that leave by an interface other than the TUN (and loopback)
/// without the proxy's mark: queries of resolvers bound to an interface, which routing cannot
/// capture. Dropping removes the rules.
#[derive(Debug)]
pub struct StrictRoute(());

impl StrictRoute {
    /// Installs the rules for TUN device `dev`.
    pub fn install(dev: &str) -> Result<Self, TunError> {
        // A table left by a run killed hard is replaced.
        let _ = exec(&args(&["nft", "delete", "table", "inet", STRICT_TABLE]));
        // Priority filter: after the `type route` chain that marks this process's sockets
        // through their cgroup (priority mangle), so those count as the proxy's own.
        let rules = format!(
            "table inet {STRICT_TABLE} {{
                chain out {{
                    type filter hook output priority filter; policy accept;
                    meta mark {MARK:#x} accept
                    oifname {{ \"{dev}\", \"lo\" }} accept
                    meta l4proto tcp th dport 53 counter reject with tcp reset
                    meta l4proto udp th dport 53 counter reject
                }}
            }}"
        );
        let path =
            std::env::temp_dir().join(format!("proxy-tun-strict-{}.nft", std::process::id()));
        std::fs::write(&path, rules).map_err(|e| TunError::Routing {
            command: format!("writing {}", path.display()),
            message: e.to_string(),
        })?;
        let loaded = ip(&["nft", "-f", &path.to_string_lossy()]);
        let _ = std::fs::remove_file(&path);
        loaded?;
        Ok(Self(()))
    }
}

impl Drop for StrictRoute {
    fn drop(&mut self) {
        let _ = exec(&args(&["nft", "delete", "table", "inet", STRICT_TABLE]));
        debug!("strict route removed");
    }
}

/// Deletes rules at our priorities and flushes our tables, ignoring failures.
fn remove_ours(fam: &str) {
    for prio in [PRIORITY, DNS_PRIORITY, DNS_PRIORITY, MARK_PRIORITY] {
        let _ = exec(&args(&[
            "ip",
            fam,
            "rule",
            "del",
            "priority",
            &prio.to_string(),
        ]));
    }
    for table in [TABLE, DNS_TABLE] {
        let _ = exec(&args(&[
            "ip",
            fam,
            "route",
            "flush",
            "table",
            &table.to_string(),
        ]));
    }
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| (*s).to_owned()).collect()
}

/// Keeps the TUN's routes to the peers' overlay addresses in step with `mesh` (see
/// [`mesh::route_changes`]): `routed` is what [`Routing::install`] put there.
async fn follow_overlay(
    mesh: Arc<crate::mesh::Mesh>,
    dev: String,
    ipv6: bool,
    mut routed: Vec<String>,
    kept: Vec<String>,
) {
    let mut changes = mesh.changes();
    let table = TABLE.to_string();
    while changes.changed().await.is_ok() {
        let now = mesh::overlay_routes(&mesh.now().routes, ipv6);
        let (add, remove) = mesh::route_changes(&routed, &now, &kept);
        let (dev, table) = (dev.clone(), table.clone());
        // `ip` runs as a child process: off the runtime's threads.
        let changed = tokio::task::spawn_blocking(move || {
            for (verb, list) in [("replace", &add), ("del", &remove)] {
                for route in list {
                    let fam = if route.contains(':') { "-6" } else { "-4" };
                    let result = if verb == "del" {
                        ip(&["ip", fam, "route", "del", route, "table", &table])
                    } else {
                        ip(&[
                            "ip", fam, "route", "replace", route, "dev", &dev, "table", &table,
                        ])
                    };
                    match result {
                        Ok(()) => info!(%route, verb, "peer route changed"),
                        Err(e) => warn!(%route, %e, "peer route not changed"),
                    }
                }
            }
        });
        let _ = changed.await;
        routed = now;
    }
}

fn ip(a: &[&str]) -> Result<(), TunError> {
    exec(&args(a)).map_err(|message| TunError::Routing {
        command: a.join(" "),
        message,
    })
}

fn exec(cmd: &[String]) -> Result<(), String> {
    let out = Command::new(&cmd[0])
        .args(&cmd[1..])
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str, qtype: u16) -> Vec<u8> {
        netstack::dns::query(0x1234, name, qtype)
    }

    #[test]
    fn fake_answers_map_back_to_names() {
        let fake = FakeDns::new(true);
        let answer = fake.answer(&query("web.test", TYPE_A)).expect("an answer");
        assert_eq!(&answer[answer.len() - 4..], &[198, 18, 0, 16]);
        let dst: SocketAddr = "198.18.0.16:443".parse().unwrap();
        assert_eq!(
            target(dst, Some(&fake)),
            Some(Target::Domain("web.test".into(), 443))
        );
        let v6: SocketAddr = "[fc00::10]:80".parse().unwrap();
        assert_eq!(
            target(v6, Some(&fake)),
            Some(Target::Domain("web.test".into(), 80))
        );
        // A fake address nobody was given, and real addresses.
        let unknown: SocketAddr = "198.18.9.9:80".parse().unwrap();
        assert_eq!(target(unknown, Some(&fake)), None);
        let real: SocketAddr = "192.0.2.1:80".parse().unwrap();
        assert_eq!(target(real, Some(&fake)), Some(Target::Ip(real)));
        assert_eq!(target(unknown, None), Some(Target::Ip(unknown)));
    }

    fn cidrs(v: &[&str]) -> Vec<Cidr> {
        v.iter().map(|c| c.parse().unwrap()).collect()
    }

    #[test]
    fn the_lan_is_thrown_out_of_the_table_unless_routed_explicitly() {
        let lan = cidrs(&["192.168.1.0/24", "10.0.0.0/16", "2001:db8:1::/64"]);
        let opts = TunOptions {
            exclude: cidrs(&["203.0.113.0/24", "10.0.0.0/16"]),
            ..TunOptions::default()
        };
        // Excluded once, whether named by --tun-exclude, the LAN or both.
        assert_eq!(
            throw_routes(&opts, &lan),
            cidrs(&[
                "203.0.113.0/24",
                "10.0.0.0/16",
                "192.168.1.0/24",
                "2001:db8:1::/64"
            ])
        );
        // A LAN network given to --tun-route is captured; --tun-lan passes no LAN at all.
        let opts = TunOptions {
            route: cidrs(&["192.168.1.0/24"]),
            ..TunOptions::default()
        };
        assert_eq!(
            throw_routes(&opts, &lan),
            cidrs(&["10.0.0.0/16", "2001:db8:1::/64"])
        );
        assert!(throw_routes(&opts, &[]).is_empty());
    }

    #[test]
    fn the_capture_summary_names_what_stays_out() {
        let addrs = vec![
            ("eth0".to_owned(), "192.168.1.23".parse().unwrap(), 24),
            ("tun3".to_owned(), "172.19.0.1".parse().unwrap(), 30),
        ];
        let lan = cidrs(&["192.168.1.0/24"]);
        let opts = TunOptions {
            exclude: cidrs(&["203.0.113.0/24"]),
            ..TunOptions::default()
        };
        let c = capture_summary("tun3", &opts, &lan, &addrs, true, true, true);
        assert_eq!(c.captured, ["0.0.0.0/0", "::/0"]);
        assert_eq!(c.lan, ["192.168.1.0/24"]);
        assert!(!c.lan_captured && c.strict_route);
        assert_eq!(c.excluded, ["203.0.113.0/24"]);
        assert_eq!(c.own_addresses, ["192.168.1.23"]);
        assert_eq!(c.tun_prefixes, ["172.19.0.0/30", "fd00:7478::/126"]);
        assert!(c.dns.contains("exit's resolver"), "{}", c.dns);
        let opts = TunOptions {
            route: cidrs(&["10.0.0.0/8"]),
            fake_ip: true,
            lan: true,
            ..TunOptions::default()
        };
        let c = capture_summary("tun3", &opts, &lan, &addrs, false, false, false);
        assert_eq!(c.captured, ["10.0.0.0/8", "198.18.0.0/15"]);
        assert!(c.lan_captured && !c.strict_route);
        assert_eq!(c.tun_prefixes, ["172.19.0.0/30"]);
    }

    #[test]
    fn the_tun_prefixes_are_its_own() {
        for own in [
            "172.19.0.0",
            "172.19.0.1",
            "172.19.0.2",
            "172.19.0.3",
            "fd00:7478::2",
        ] {
            assert!(is_tun_prefix(own.parse().unwrap()), "{own}");
        }
        assert!(is_tun_prefix("::ffff:172.19.0.2".parse().unwrap()));
        for other in [
            "172.19.0.4",
            "172.18.255.255",
            "10.0.0.1",
            "fd00:7478::4",
            "::1",
        ] {
            assert!(!is_tun_prefix(other.parse().unwrap()), "{other}");
        }
    }

    #[test]
    fn only_address_queries_are_faked() {
        let fake = FakeDns::new(false);
        // MX and friends go to a real resolver.
        assert!(fake.answer(&query("web.test", 15)).is_none());
        assert!(fake.answer(b"not dns").is_none());
        // Without IPv6 on the TUN, AAAA gets an empty answer (apps fall back to A).
        let answer = fake
            .answer(&query("web.test", TYPE_AAAA))
            .expect("an answer");
        assert_eq!(u16::from_be_bytes([answer[6], answer[7]]), 0);
    }
}
