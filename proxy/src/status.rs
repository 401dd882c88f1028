//! Status and metrics: what `proxy status` prints and what Prometheus scrapes.
//!
//! ```text
//! front-ends ─► Counters ─┐
//! fabric peers ───────────┴─► Status::snapshot ─► text (GET /status)
//!                                              └─► Prometheus text format (GET /metrics)
//! ```
//!
//! The client's HTTP listener answers `GET /status` addressed to itself (as it does
//! `/proxy.pac`); `--metrics ADDR` opens a listener of its own with `/metrics` and `/status`,
//! for either role. `proxy status` fetches `/status` and prints it.

use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use fabric::path::ActivePath;
use fabric::peer::{Fabric, PeerStatus};
use fabric::tox::Connection;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::relay::Transferred;

pub mod peers;

use self::peers::{MeshStatus, PeerLine};

/// Counters of the local front-ends (SOCKS5, HTTP), updated as connections come and go.
#[derive(Debug, Default)]
pub struct Counters {
    accepted: AtomicU64,
    finished: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    dial_failures: AtomicU64,
    loops_refused: AtomicU64,
    auth_failures: AtomicU64,
    tun_flows_refused: AtomicU64,
}

impl Counters {
    /// A TUN flow was refused: too many at once.
    pub fn tun_flow_refused(&self) {
        self.tun_flows_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// A request for one of the proxy's own listeners was refused.
    pub fn loop_refused(&self) {
        self.loops_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// A client's credentials were missing or wrong.
    pub fn auth_failed(&self) {
        self.auth_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// A client connection was accepted.
    pub fn accepted(&self) {
        self.accepted.fetch_add(1, Ordering::Relaxed);
    }

    /// A client connection ended.
    pub fn finished(&self) {
        self.finished.fetch_add(1, Ordering::Relaxed);
    }

    /// A relay ended having moved `t`.
    pub fn relayed(&self, t: Transferred) {
        self.bytes_up.fetch_add(t.up, Ordering::Relaxed);
        self.bytes_down.fetch_add(t.down, Ordering::Relaxed);
    }

    /// A dial failed (refused, unreachable, denied, timed out).
    pub fn dial_failed(&self) {
        self.dial_failures.fetch_add(1, Ordering::Relaxed);
    }
}

/// What this process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A local proxy dialing directly.
    Direct,
    /// A local proxy dialing through exits.
    Client,
    /// An exit.
    Exit,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Client => "client",
            Self::Exit => "exit",
        }
    }
}

/// Everything status output reads from.
#[derive(Debug)]
pub struct Status {
    role: Role,
    started: Instant,
    fabric: Option<Arc<Fabric>>,
    counters: Arc<Counters>,
    /// Requests waiting for a session to an exit, when there are exits.
    held: Option<Arc<std::sync::atomic::AtomicUsize>>,
    /// What the TUN captures, once TUN mode has set up its routes.
    tun: Option<Arc<OnceLock<TunCapture>>>,
    /// The peers by name, their rights and what was served them.
    mesh: Option<MeshStatus>,
}

/// What TUN mode sends into the TUN and what it leaves alone, as set up at start (networks
/// in CIDR notation, addresses bare).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TunCapture {
    /// The TUN device.
    pub device: String,
    /// Networks routed into the TUN (`0.0.0.0/0` and `::/0` unless `--tun-route`).
    pub captured: Vec<String>,
    /// The host's directly connected networks.
    pub lan: Vec<String>,
    /// Whether the LAN is captured (`--tun-lan`) rather than kept local.
    pub lan_captured: bool,
    /// `--tun-exclude` networks.
    pub excluded: Vec<String>,
    /// This host's own addresses (the kernel's `local` table serves them before any rule).
    pub own_addresses: Vec<String>,
    /// The TUN's own prefixes (flows to them are refused).
    pub tun_prefixes: Vec<String>,
    /// How captured DNS queries are answered.
    pub dns: String,
    /// Whether port-53 packets escaping the TUN (sockets bound to an interface, link-local
    /// resolvers) are rejected (with an exit).
    pub strict_route: bool,
}

impl TunCapture {
    fn text(&self, out: &mut String) {
        let list = |v: &[String]| {
            if v.is_empty() {
                "none".to_owned()
            } else {
                v.join(", ")
            }
        };
        let _ = writeln!(out, "tun {}", self.device);
        let _ = writeln!(out, "  captured: {}", list(&self.captured));
        if self.lan_captured {
            let _ = writeln!(out, "  LAN, captured (--tun-lan): {}", list(&self.lan));
        } else {
            let _ = writeln!(
                out,
                "  LAN, kept local (--tun-lan captures it): {}",
                list(&self.lan)
            );
        }
        let _ = writeln!(out, "  excluded (--tun-exclude): {}", list(&self.excluded));
        let _ = writeln!(
            out,
            "  this host's own addresses, never captured: {}",
            list(&self.own_addresses)
        );
        let _ = writeln!(
            out,
            "  the tun's own prefixes, flows to them refused: {}",
            list(&self.tun_prefixes)
        );
        let _ = writeln!(
            out,
            "  dns: UDP and TCP port 53 to any address, whatever the routes: {}",
            self.dns
        );
        if self.strict_route {
            let _ = writeln!(
                out,
                "  strict route: port-53 packets leaving by another interface without the \
                 proxy's mark are rejected"
            );
        } else {
            let _ = writeln!(
                out,
                "  strict route: off (direct: a query bound to another interface leaves by it, \
                 as the proxy would send it)"
            );
        }
    }
}

/// One moment's figures.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// What this process is.
    pub role: Role,
    /// How long it has run.
    pub uptime: Duration,
    /// Its Tox ID, when it runs a Tox node.
    pub tox_id: Option<String>,
    /// Front-end connections accepted.
    pub accepted: u64,
    /// Front-end connections open now.
    pub active: u64,
    /// Bytes relayed from clients to targets (counted when a relay ends).
    pub bytes_up: u64,
    /// Bytes relayed from targets to clients (counted when a relay ends).
    pub bytes_down: u64,
    /// Dials that failed.
    pub dial_failures: u64,
    /// Requests for the proxy's own listeners, refused.
    pub loops_refused: u64,
    /// Requests refused for missing or wrong credentials.
    pub auth_failures: u64,
    /// Requests waiting for a session to an exit now.
    pub waiting: u64,
    /// TUN flows refused for being over the limits.
    pub tun_flows_refused: u64,
    /// The peers (exits for a client, clients for an exit), by public key in hex.
    pub peers: Vec<(String, PeerStatus)>,
    /// What the TUN captures, in TUN mode once it is up.
    pub tun: Option<TunCapture>,
    /// Every peer by name, rights and what was served it (when the node runs one).
    pub mesh: Vec<PeerLine>,
}

impl Status {
    /// Status of a process in `role`, with its fabric if it has one.
    pub fn new(role: Role, fabric: Option<Arc<Fabric>>, counters: Arc<Counters>) -> Self {
        Self {
            role,
            started: Instant::now(),
            fabric,
            counters,
            held: None,
            tun: None,
            mesh: None,
        }
    }

    /// Whether it reports a fabric (a node with an identity).
    pub fn has_fabric(&self) -> bool {
        self.fabric.is_some()
    }

    /// Shows the peers by name, their rights and what was served them.
    pub fn with_mesh(mut self, mesh: MeshStatus) -> Self {
        self.mesh = Some(mesh);
        self
    }

    /// Shows what the TUN captures once `tun` is set.
    pub fn with_tun(mut self, tun: Arc<OnceLock<TunCapture>>) -> Self {
        self.tun = Some(tun);
        self
    }

    /// Shows `held` as the requests waiting for a session to an exit.
    pub fn with_held(mut self, held: Arc<std::sync::atomic::AtomicUsize>) -> Self {
        self.held = Some(held);
        self
    }

    /// The figures now.
    pub fn snapshot(&self) -> Snapshot {
        let c = &self.counters;
        let accepted = c.accepted.load(Ordering::Relaxed);
        let finished = c.finished.load(Ordering::Relaxed);
        let sessions: Vec<_> = self.fabric.iter().flat_map(|f| f.peers()).collect();
        let mesh = self
            .mesh
            .as_ref()
            .map(|m| m.lines(&sessions))
            .unwrap_or_default();
        let mut peers: Vec<_> = sessions
            .into_iter()
            .map(|(pk, st)| (pk.to_string(), st))
            .collect();
        peers.sort_by(|a, b| a.0.cmp(&b.0));
        Snapshot {
            role: self.role,
            uptime: self.started.elapsed(),
            tox_id: self.fabric.as_ref().map(|f| f.id().to_string()),
            accepted,
            active: accepted.saturating_sub(finished),
            bytes_up: c.bytes_up.load(Ordering::Relaxed),
            bytes_down: c.bytes_down.load(Ordering::Relaxed),
            dial_failures: c.dial_failures.load(Ordering::Relaxed),
            loops_refused: c.loops_refused.load(Ordering::Relaxed),
            auth_failures: c.auth_failures.load(Ordering::Relaxed),
            tun_flows_refused: c.tun_flows_refused.load(Ordering::Relaxed),
            waiting: self
                .held
                .as_ref()
                .map_or(0, |h| h.load(Ordering::Relaxed) as u64),
            peers,
            tun: self.tun.as_ref().and_then(|t| t.get().cloned()),
            mesh,
        }
    }
}

/// The path the session's packets take: a punched link, or how Tox reaches the peer.
fn path_name(status: &PeerStatus) -> &'static str {
    match (status.link.active, status.path) {
        (ActivePath::Udp, _) => "udp-punched",
        (ActivePath::Tcp, _) => "tcp-punched",
        (ActivePath::Held, _) => "held",
        (_, Connection::Udp) => "tox-udp",
        (_, Connection::Tcp) => "tox-tcp-relay",
        (_, Connection::None) => "offline",
    }
}

/// Retransmitted segments as a share of all data segments sent: the loss the session saw
/// (or thought it saw).
fn loss_ratio(st: &PeerStatus) -> f64 {
    let s = &st.session;
    let total = s.segments_sent + s.retransmits;
    if total == 0 {
        0.0
    } else {
        s.retransmits as f64 / total as f64
    }
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn millis(d: Option<Duration>) -> String {
    d.map_or_else(
        || "-".into(),
        |d| format!("{:.1} ms", d.as_secs_f64() * 1e3),
    )
}

impl Snapshot {
    /// The human-readable form `proxy status` prints.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let up = self.uptime.as_secs();
        let _ = writeln!(
            out,
            "proxy {} (up {}h{:02}m{:02}s)",
            self.role.name(),
            up / 3600,
            up / 60 % 60,
            up % 60
        );
        if let Some(id) = &self.tox_id {
            let _ = writeln!(out, "tox id: {id}");
        }
        if self.role != Role::Exit {
            let _ = writeln!(
                out,
                "front-ends: {} open, {} accepted, {} dial failures, relayed {} up / {} down",
                self.active,
                self.accepted,
                self.dial_failures,
                bytes(self.bytes_up),
                bytes(self.bytes_down)
            );
            if self.waiting > 0 {
                let _ = writeln!(
                    out,
                    "  {} requests waiting for a session to an exit",
                    self.waiting
                );
            }
            if self.tun_flows_refused > 0 {
                let _ = writeln!(
                    out,
                    "  {} TUN flows refused over the limits",
                    self.tun_flows_refused
                );
            }
            if self.loops_refused + self.auth_failures > 0 {
                let _ = writeln!(
                    out,
                    "  refused: {} requests for this proxy's own listeners, {} without valid credentials",
                    self.loops_refused, self.auth_failures
                );
            }
        }
        if let Some(tun) = &self.tun {
            tun.text(&mut out);
        }
        let kind = if self.role == Role::Exit {
            "client"
        } else {
            "exit"
        };
        if self.peers.is_empty() && self.role != Role::Direct {
            let _ = writeln!(out, "no {kind} yet");
        }
        for (pk, st) in &self.peers {
            let s = &st.session;
            // With peers by name, a session is an exit's only when this node uses it so.
            let kind = match self.mesh.iter().find(|l| &l.key == pk) {
                Some(line) if self.role != Role::Exit && !line.our_exit => "peer",
                _ => kind,
            };
            let _ = writeln!(
                out,
                "{kind} {pk}\n  path {}  session {}  rtt {} (min {})  delivery {:.1} Mbit/s",
                path_name(st),
                st.conv
                    .map_or_else(|| "down".into(), |c| format!("conv {c}")),
                millis(s.srtt),
                millis(s.min_rtt),
                s.delivery_rate * 8.0 / 1e6,
            );
            let _ = writeln!(
                out,
                "  streams {}  sent {} in {} packets  received {} in {} packets",
                st.mux.streams,
                bytes(s.bytes_sent),
                s.packets_sent,
                bytes(s.bytes_received),
                s.packets_received,
            );
            let _ = writeln!(
                out,
                "  retransmits {} of {} segments ({:.2} % loss)  dropped {} packets, {} datagrams",
                s.retransmits,
                s.segments_sent + s.retransmits,
                loss_ratio(st) * 100.0,
                st.dropped_packets,
                s.datagrams_dropped,
            );
            if !st.link.why.is_empty() {
                let remote = st
                    .link
                    .remote
                    .map_or_else(String::new, |r| format!(" to {r}"));
                let rtt = match (st.link.rtt, st.link.loss) {
                    (Some(r), Some(l)) => {
                        format!(" (link rtt {}, loss {:.0} %)", millis(Some(r)), l * 100.0)
                    }
                    (Some(r), None) => format!(" (link rtt {})", millis(Some(r))),
                    _ => String::new(),
                };
                let _ = writeln!(out, "  punching: {}{remote}{rtt}", st.link.why);
            }
        }
        if !self.mesh.is_empty() {
            out.push_str(&peers::text(&self.mesh));
        }
        out
    }

    /// What `proxy peers` prints: the peers part alone.
    pub fn peers_text(&self) -> String {
        peers::text(&self.mesh)
    }

    /// The Prometheus text exposition format (version 0.0.4).
    pub fn prometheus(&self) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
            let _ = writeln!(
                out,
                "# HELP proxy_{name} {help}\n# TYPE proxy_{name} {kind}"
            );
            for (labels, value) in samples {
                let _ = writeln!(out, "proxy_{name}{labels} {value}");
            }
        };
        let role = format!("{{role=\"{}\"}}", self.role.name());
        metric(
            "uptime_seconds",
            "gauge",
            "Seconds since the process started.",
            &[(role, self.uptime.as_secs_f64())],
        );
        let plain = |v: u64| vec![(String::new(), v as f64)];
        metric(
            "frontend_connections_total",
            "counter",
            "Client connections accepted by the SOCKS5 and HTTP listeners.",
            &plain(self.accepted),
        );
        metric(
            "frontend_connections_open",
            "gauge",
            "Client connections open now.",
            &plain(self.active),
        );
        metric(
            "frontend_dial_failures_total",
            "counter",
            "Dials that failed (refused, unreachable, denied by policy, timed out).",
            &plain(self.dial_failures),
        );
        metric(
            "tun_flows_refused_total",
            "counter",
            "TUN flows refused over the limits (--max-connections TCP, 4,096 UDP).",
            &plain(self.tun_flows_refused),
        );
        metric(
            "frontend_waiting",
            "gauge",
            "Requests waiting for a session to an exit.",
            &plain(self.waiting),
        );
        metric(
            "frontend_loops_refused_total",
            "counter",
            "Requests for the proxy's own listeners, refused.",
            &plain(self.loops_refused),
        );
        metric(
            "frontend_auth_failures_total",
            "counter",
            "Requests refused for missing or wrong credentials.",
            &plain(self.auth_failures),
        );
        metric(
            "frontend_bytes_total",
            "counter",
            "Bytes relayed, counted when a relay ends.",
            &[
                ("{direction=\"up\"}".into(), self.bytes_up as f64),
                ("{direction=\"down\"}".into(), self.bytes_down as f64),
            ],
        );
        let per_peer = |f: &dyn Fn(&PeerStatus) -> f64| -> Vec<(String, f64)> {
            self.peers
                .iter()
                .map(|(pk, st)| (format!("{{peer=\"{pk}\"}}"), f(st)))
                .collect()
        };
        let online: Vec<_> = self
            .peers
            .iter()
            .map(|(pk, st)| {
                (
                    format!("{{peer=\"{pk}\",path=\"{}\"}}", path_name(st)),
                    f64::from(u8::from(st.online)),
                )
            })
            .collect();
        metric(
            "peer_online",
            "gauge",
            "1 when Tox sees the peer online, by path.",
            &online,
        );
        metric(
            "peer_session_up",
            "gauge",
            "1 when a KCP session to the peer runs.",
            &per_peer(&|st| f64::from(u8::from(st.conv.is_some()))),
        );
        metric(
            "peer_rtt_seconds",
            "gauge",
            "Smoothed round-trip time of the session.",
            &per_peer(&|st| st.session.srtt.map_or(f64::NAN, |d| d.as_secs_f64())),
        );
        metric(
            "peer_link_rtt_seconds",
            "gauge",
            "Latest keepalive round trip of the punched UDP link (NaN: none).",
            &per_peer(&|st| st.link.rtt.map_or(f64::NAN, |d| d.as_secs_f64())),
        );
        metric(
            "peer_link_loss_ratio",
            "gauge",
            "Share of the punched UDP link's latest keepalive round trips lost (NaN: none).",
            &per_peer(&|st| st.link.loss.unwrap_or(f64::NAN)),
        );
        metric(
            "peer_delivery_rate_bytes",
            "gauge",
            "The session's delivery-rate estimate, bytes per second.",
            &per_peer(&|st| st.session.delivery_rate),
        );
        metric(
            "peer_streams",
            "gauge",
            "Streams open on the session.",
            &per_peer(&|st| st.mux.streams as f64),
        );
        metric(
            "peer_segments_sent_total",
            "counter",
            "Data segments sent the first time.",
            &per_peer(&|st| st.session.segments_sent as f64),
        );
        metric(
            "peer_retransmits_total",
            "counter",
            "Data segments sent again.",
            &per_peer(&|st| st.session.retransmits as f64),
        );
        let by_direction = |f: &dyn Fn(&PeerStatus) -> (u64, u64)| -> Vec<(String, f64)> {
            self.peers
                .iter()
                .flat_map(|(pk, st)| {
                    let (sent, received) = f(st);
                    [("sent", sent), ("received", received)].map(|(direction, v)| {
                        (
                            format!("{{peer=\"{pk}\",direction=\"{direction}\"}}"),
                            v as f64,
                        )
                    })
                })
                .collect()
        };
        metric(
            "peer_packets_total",
            "counter",
            "Session packets, by direction.",
            &by_direction(&|st| (st.session.packets_sent, st.session.packets_received)),
        );
        metric(
            "peer_bytes_total",
            "counter",
            "Session bytes on the path, by direction.",
            &by_direction(&|st| (st.session.bytes_sent, st.session.bytes_received)),
        );
        metric(
            "peer_dropped_packets_total",
            "counter",
            "Session packets the Tox node's queue refused.",
            &per_peer(&|st| st.dropped_packets as f64),
        );
        peers::prometheus(&self.mesh, &mut out);
        out
    }
}

/// Who asks for status: keys (this node's Tox ID, its peers' public keys) are shown only to
/// clients on this host or with the proxy's credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audience {
    /// On loopback, or authenticated: everything.
    Trusted,
    /// Anyone else: keys cut to a short fingerprint.
    Anyone,
}

impl Snapshot {
    /// This snapshot as `audience` may see it.
    pub fn for_audience(mut self, audience: Audience) -> Self {
        if audience == Audience::Anyone {
            self.tox_id = None;
            // Enough to tell peers apart in a dashboard, not enough to reach them.
            let cut = |pk: &mut String| {
                pk.truncate(8);
                pk.push('…');
            };
            for (pk, _) in &mut self.peers {
                cut(pk);
            }
            for line in &mut self.mesh {
                cut(&mut line.key);
                // Derived from the key: shown, as keys are, only to trusted clients.
                line.overlay = None;
            }
        }
        self
    }
}

/// Serves `GET /metrics` and `GET /status` on `listener` until `shutdown` is cancelled.
///
/// A deliberately tiny HTTP/1.1 responder (one request per connection): scrapers and
/// `proxy status` need nothing more, and it keeps the metrics port free of the proxy's
/// request handling. As on the HTTP listener, the `Host` header must name this host, and
/// clients from elsewhere see no keys.
pub async fn serve(listener: TcpListener, status: Arc<Status>, shutdown: CancellationToken) {
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(accepted) => accepted,
                Err(error) => {
                    debug!(%error, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let status = status.clone();
        let audience = if crate::guard::is_local_client(peer.ip()) {
            Audience::Trusted
        } else {
            Audience::Anyone
        };
        tokio::spawn(async move {
            let answer = answer(stream, &status, audience);
            let answer = tokio::time::timeout(Duration::from_secs(10), answer);
            if let Ok(Err(error)) = answer.await {
                debug!(%peer, %error, "metrics request failed");
            }
        });
    }
}

/// The response to a request for `path` from `audience`: status code, content type, body.
pub fn respond(path: &str, status: &Status, audience: Audience) -> (u16, &'static str, String) {
    let snapshot = || status.snapshot().for_audience(audience);
    match path {
        "/metrics" => (
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            snapshot().prometheus(),
        ),
        "/status" => (200, "text/plain; charset=utf-8", snapshot().text()),
        "/peers" => (200, "text/plain; charset=utf-8", snapshot().peers_text()),
        _ => (
            404,
            "text/plain; charset=utf-8",
            "proxy: try /status, /peers or /metrics\n".into(),
        ),
    }
}

/// The largest request head the responder reads.
const MAX_HEAD: usize = 8192;

/// A request head, as much of it as the responder needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead<'a> {
    /// The method.
    pub method: &'a str,
    /// The request target.
    pub path: &'a str,
    /// The `Host` header, if there is one.
    pub host: Option<&'a str>,
}

/// Why a request head cannot be answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HeadError {
    /// The head has not ended yet (read more).
    #[error("request head incomplete")]
    Incomplete,
    /// Longer than `MAX_HEAD` bytes.
    #[error("request head too long")]
    TooLong,
    /// Not an HTTP/1 request line, or not text.
    #[error("malformed request head")]
    Malformed,
}

/// Parses the head at the start of `buf` (sans-IO: the caller reads).
pub fn parse_head(buf: &[u8]) -> Result<RequestHead<'_>, HeadError> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Err(if buf.len() > MAX_HEAD {
            HeadError::TooLong
        } else {
            HeadError::Incomplete
        });
    };
    if end > MAX_HEAD {
        return Err(HeadError::TooLong);
    }
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| HeadError::Malformed)?;
    let mut lines = head.split("\r\n");
    let mut request = lines.next().unwrap_or_default().split(' ');
    let (Some(method), Some(path), Some(version), None) = (
        request.next(),
        request.next(),
        request.next(),
        request.next(),
    ) else {
        return Err(HeadError::Malformed);
    };
    if method.is_empty() || path.is_empty() || !version.starts_with("HTTP/1.") {
        return Err(HeadError::Malformed);
    }
    let mut host = None;
    for line in lines {
        let (name, value) = line.split_once(':').ok_or(HeadError::Malformed)?;
        if name.eq_ignore_ascii_case("host") {
            if host.is_some() {
                // Two Host headers: which one the client meant is anyone's guess.
                return Err(HeadError::Malformed);
            }
            host = Some(value.trim());
        }
    }
    Ok(RequestHead { method, path, host })
}

async fn answer(mut stream: TcpStream, status: &Status, audience: Audience) -> io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    let parsed = loop {
        match parse_head(&head) {
            Err(HeadError::Incomplete) => {}
            other => break other,
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&chunk[..n]);
    };
    let text = "text/plain; charset=utf-8";
    let (code, kind, body) = match parsed {
        Err(_) => (400, text, "proxy: bad request\n".into()),
        Ok(RequestHead {
            host: Some(host), ..
        }) if !crate::guard::is_own_host_header(host) => (
            403,
            text,
            "proxy: this host name is not this proxy's (ask for it by address or localhost)\n"
                .into(),
        ),
        Ok(RequestHead {
            method: "GET",
            path,
            ..
        }) => respond(path, status, audience),
        Ok(_) => (405, text, "proxy: only GET here\n".into()),
    };
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        _ => "Method Not Allowed",
    };
    let response = format!(
        "HTTP/1.1 {code} {reason}\r\ncontent-type: {kind}\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// Fetches `/status` from a running proxy at `addr` (its HTTP listener or `--metrics`
/// address) for `proxy status`.
pub async fn fetch(addr: SocketAddr) -> io::Result<String> {
    fetch_path(addr, "/status").await
}

/// Fetches `path` (`/status`, `/peers`) from the proxy at `addr`.
pub async fn fetch_path(addr: SocketAddr, path: &str) -> io::Result<String> {
    let mut stream = TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not an HTTP response"))?;
    if !head.starts_with("HTTP/1.1 200") {
        let first = head.lines().next().unwrap_or_default();
        return Err(io::Error::other(format!(
            "{addr} answered {first:?} (is it a proxy's HTTP listener or --metrics address?)"
        )));
    }
    Ok(body.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> Snapshot {
        let mut st = PeerStatus::default();
        st.online = true;
        st.path = Connection::Udp;
        st.session.srtt = Some(Duration::from_millis(42));
        st.session.segments_sent = 99;
        st.session.retransmits = 1;
        st.mux.streams = 3;
        Snapshot {
            role: Role::Client,
            uptime: Duration::from_secs(3725),
            tox_id: Some("AB".repeat(38)),
            accepted: 10,
            active: 2,
            bytes_up: 2048,
            bytes_down: 5 << 20,
            dial_failures: 1,
            loops_refused: 0,
            auth_failures: 0,
            waiting: 3,
            tun_flows_refused: 0,
            peers: vec![("CD".repeat(32), st)],
            tun: None,
            mesh: Vec::new(),
        }
    }

    #[test]
    fn peers_by_name_with_rights_and_what_was_served_and_keys_only_for_trusted_clients() {
        let nas = fabric::id::PublicKey([0xCD; 32]);
        let id = fabric::id::ToxId::new(nas, [0; 4]).to_string();
        let table = crate::peers::PeerTable::new([("nas", id.as_str())]).unwrap();
        let mut rights = crate::rights::RightsTable::default();
        rights.grant_share(nas, &"8080".parse().unwrap());
        let accounts = Arc::new(crate::accounts::PeerAccounts::default());
        accounts.refused(nas);
        let stranger = fabric::id::PublicKey([0x01; 32]);
        accounts.refused(stranger);
        let mesh = MeshStatus {
            mesh: Arc::new(crate::mesh::Mesh::new(
                table,
                rights,
                fabric::id::PublicKey([0xEE; 32]),
                None,
            )),
            accounts,
            exits: Vec::new(),
            granted: Arc::default(),
        };
        let mut snap = snapshot();
        snap.mesh = mesh.lines(&[(nas, snap.peers[0].1.clone())]);
        let text = snap.text();
        let v6 = fabric::overlay::overlay_v6(&nas);
        assert!(
            text.contains(&format!("peer {}\n", "CD".repeat(32))),
            "{text}"
        );
        assert!(
            text.contains(&format!("peer nas {}\n", "CD".repeat(32))),
            "{text}"
        );
        assert!(text.contains(&format!("  overlay {v6}")), "{text}");
        assert!(
            text.contains("may here: reach shared ports 8080/tcp"),
            "{text}"
        );
        assert!(text.contains("refused 1"), "{text}");
        // Named peers first, then the rest by key.
        let at_nas = text.find("peer nas").unwrap();
        let at_stranger = text.find("peer (no name) 0101").unwrap();
        assert!(at_nas < at_stranger, "{text}");
        assert!(snap.prometheus().contains(&format!(
            "proxy_peer_refused_total{{peer=\"{}\",name=\"nas\"}} 1",
            "CD".repeat(32)
        )));
        let seen = snap.for_audience(Audience::Anyone).text();
        assert!(
            !seen.contains(&"CD".repeat(32)) && !seen.contains("fd74:"),
            "{seen}"
        );
    }

    #[test]
    fn text_shows_what_the_tun_captures_and_what_stays_local() {
        let mut snap = snapshot();
        assert!(
            !snap.text().contains("tun "),
            "no tun section without a tun"
        );
        snap.tun = Some(TunCapture {
            device: "tun0".into(),
            captured: vec!["0.0.0.0/0".into(), "::/0".into()],
            lan: vec!["192.168.1.0/24".into(), "2001:db8:1::/64".into()],
            lan_captured: false,
            excluded: vec![],
            own_addresses: vec!["192.168.1.23".into()],
            tun_prefixes: vec!["172.19.0.0/30".into()],
            dns: "answered by the exit's resolver".into(),
            strict_route: true,
        });
        let t = snap.text();
        for line in [
            "tun tun0\n",
            "  captured: 0.0.0.0/0, ::/0\n",
            "  LAN, kept local (--tun-lan captures it): 192.168.1.0/24, 2001:db8:1::/64\n",
            "  excluded (--tun-exclude): none\n",
            "  this host's own addresses, never captured: 192.168.1.23\n",
            "  the tun's own prefixes, flows to them refused: 172.19.0.0/30\n",
            "  dns: UDP and TCP port 53 to any address, whatever the routes: answered by the \
             exit's resolver\n",
            "  strict route: port-53 packets leaving by another interface",
        ] {
            assert!(t.contains(line), "{line:?} missing in:\n{t}");
        }
        if let Some(tun) = snap.tun.as_mut() {
            tun.lan_captured = true;
            tun.strict_route = false;
        }
        let t = snap.text();
        assert!(
            t.contains("  LAN, captured (--tun-lan): 192.168.1.0/24"),
            "{t}"
        );
        assert!(t.contains("  strict route: off (direct"), "{t}");
    }

    #[test]
    fn text_names_the_path_rtt_loss_and_streams() {
        let t = snapshot().text();
        assert!(t.starts_with("proxy client (up 1h02m05s)"), "{t}");
        assert!(t.contains("2 open, 10 accepted, 1 dial failures"), "{t}");
        assert!(t.contains("relayed 2.0 KiB up / 5.0 MiB down"), "{t}");
        assert!(
            t.contains("3 requests waiting for a session to an exit"),
            "{t}"
        );
        assert!(t.contains("path tox-udp"), "{t}");
        assert!(t.contains("rtt 42.0 ms"), "{t}");
        assert!(t.contains("streams 3"), "{t}");
        assert!(
            t.contains("retransmits 1 of 100 segments (1.00 % loss)"),
            "{t}"
        );
    }

    #[test]
    fn text_shows_the_punched_link_its_rtt_and_loss() {
        let mut snap = snapshot();
        let link = &mut snap.peers[0].1.link;
        link.active = ActivePath::Udp;
        link.remote = Some("203.0.113.7:4000".parse().unwrap());
        link.rtt = Some(Duration::from_millis(12));
        link.loss = Some(0.25);
        link.why = "direct udp link up".into();
        let t = snap.text();
        assert!(t.contains("path udp-punched"), "{t}");
        assert!(
            t.contains(
                "punching: direct udp link up to 203.0.113.7:4000 (link rtt 12.0 ms, loss 25 %)"
            ),
            "{t}"
        );
    }

    #[test]
    fn prometheus_lines_are_well_formed() {
        let p = snapshot().prometheus();
        let pk = "CD".repeat(32);
        assert!(p.contains(&format!("proxy_peer_rtt_seconds{{peer=\"{pk}\"}} 0.042")));
        assert!(p.contains(&format!(
            "proxy_peer_online{{peer=\"{pk}\",path=\"tox-udp\"}} 1"
        )));
        assert!(p.contains("proxy_frontend_connections_total 10"));
        // Every sample line is `name{labels} value` with a TYPE line before its family.
        let mut typed = std::collections::HashSet::new();
        for line in p.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                typed.insert(rest.split(' ').next().unwrap().to_owned());
            } else if !line.starts_with('#') {
                let (name, value) = line.rsplit_once(' ').unwrap();
                let family = name.split('{').next().unwrap();
                assert!(typed.contains(family), "{line}");
                assert!(value.parse::<f64>().is_ok(), "{line}");
            }
        }
    }

    #[test]
    fn keys_only_for_trusted_clients() {
        let pk = "CD".repeat(32);
        let full = snapshot().for_audience(Audience::Trusted);
        assert!(full.text().contains(&pk));
        assert!(full.text().contains(&"AB".repeat(38)));
        let cut = snapshot().for_audience(Audience::Anyone);
        for out in [cut.text(), cut.prometheus()] {
            assert!(!out.contains(&pk), "{out}");
            assert!(!out.contains(&"AB".repeat(38)), "{out}");
            assert!(out.contains("CDCDCDCD…"), "{out}");
        }
    }

    #[test]
    fn request_heads() {
        let h = parse_head(b"GET /status HTTP/1.1\r\nHost: 127.0.0.1:9\r\nx: y\r\n\r\n").unwrap();
        assert_eq!(
            h,
            RequestHead {
                method: "GET",
                path: "/status",
                host: Some("127.0.0.1:9")
            }
        );
        let h = parse_head(b"GET / HTTP/1.0\r\n\r\nbody").unwrap();
        assert_eq!(h.host, None);
        assert_eq!(
            parse_head(b"GET / HTTP/1.1\r\n"),
            Err(HeadError::Incomplete)
        );
        assert_eq!(parse_head(&[b'a'; 9000]), Err(HeadError::TooLong));
        for bad in [
            &b"GET /\r\n\r\n"[..],
            b"GET / HTTP/1.1 x\r\n\r\n",
            b"GET / SPDY\r\n\r\n",
            b"GET / HTTP/1.1\r\nno colon\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n",
            b"GET \xff HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(parse_head(bad), Err(HeadError::Malformed), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn a_foreign_host_header_is_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let status = Arc::new(Status::new(Role::Direct, None, Arc::default()));
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(listener, status, stop.clone()));
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /status HTTP/1.1\r\nHost: evil.example:9\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 403"), "{out}");
        assert!(!out.contains("proxy direct"), "{out}");
        stop.cancel();
        server.await.unwrap();
    }

    #[tokio::test]
    async fn serves_status_and_metrics_over_http() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let counters = Arc::new(Counters::default());
        counters.accepted();
        let status = Arc::new(Status::new(Role::Direct, None, counters));
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(listener, status, stop.clone()));
        let text = fetch(addr).await.unwrap();
        assert!(text.starts_with("proxy direct"), "{text}");
        assert!(text.contains("1 open, 1 accepted"), "{text}");
        stop.cancel();
        server.await.unwrap();
    }
}
