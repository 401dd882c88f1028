//! The node's direct socket: where peers that met us before find us again without Tox.
//!
//! ```text
//!  client start / session lost ─► HELLO{Open} to cached endpoints ─┐   (beside Open over Tox)
//!                                                                  ▼
//!  exit: acceptor answers ─► WELCOME{Accept conv} ─► direct link ─► session carried at once
//!  exit start ─► HELLO{Knock} to cached endpoints: "I restarted" ─► client re-opens now
//!  session up over Tox ─► Signal::Direct (our endpoints) ─► HELLO{Probe} both ways
//!                          ─► WELCOME{Probe}: both caches learn where the other answers
//! ```
//!
//! One UDP socket per node, on the port of the last run when it is free (so a restarted node
//! is where its peers remember it, NAT mappings included). One reader task takes everything:
//! handshake messages (see [`crate::resume::handshake`]) it answers itself, link packets go
//! to the link of their source address ([`UdpLink::spawn_demuxed`]).
//!
//! Only peers we allow (exit role) or dial (client role) are answered; anyone else costs a
//! table lookup, and, only while an invitation is open, a Diffie-Hellman within a budget for
//! all strangers together ([`STRANGER_HELLOS_PER_SECOND`]): its HELLO may be a pairing
//! request.
//!
//! Pairing without Tox: a ticket names the inviter's direct endpoints, and the joiner's Open
//! goes there in a HELLO of kind JOIN that also carries its pairing request (the proof of the
//! ticket's secret). The inviter hands the request to the application (as one that came by
//! Tox) and does not answer; once the application lets the joiner in, the joiner's next HELLO
//! (sent every [`JOIN_RETRY`]) is answered like any Open, and the session starts on the direct
//! link: first contact in about a round trip and the application's check.
//!
//! ```text
//!  joiner ─ HELLO{JOIN: Open, request} ─► inviter: not allowed ─► request to the application
//!  joiner ─ HELLO{JOIN: Open, request} ─► inviter: allowed now ─► WELCOME{Accept} ─► session
//! ```

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tracing::{debug, info};

use super::{FabricConfig, Input, Shared, lock};
use crate::id::PublicKey;
use crate::link::LinkKeys;
use crate::link::signal::{Candidate, CandidateKind, Protocol};
use crate::punch::driver::{UdpLink, bind_udp_port, canonical, wire_addr};
use crate::punch::filter::AddressFilter;
use crate::punch::udp::{PunchConfig, UdpPunch};
use crate::resume::cache::PeerCache;
use crate::resume::handshake::{
    self, HELLO, Identity, PendingHello, Responder, WELCOME, hello_sender,
};
use crate::session::{CloseReason, Control};
use crate::time::{Duration, Instant};

/// The first byte of a handshake body: what the message is about.
mod kind {
    /// A session control message (Open in a HELLO, Accept or Reject in a WELCOME).
    pub(super) const CONTROL: u8 = 1;
    /// "Can you hear me here?": answered with an empty WELCOME of the same kind.
    pub(super) const PROBE: u8 = 2;
    /// "I (re)started": not answered; a client whose exit this is opens a session now.
    pub(super) const KNOCK: u8 = 3;
    /// A pairing request with an Open: length of the Open u8, the Open, then the request
    /// (text). Answered like CONTROL once the sender is allowed.
    pub(super) const JOIN: u8 = 4;
}

/// HELLOs from peers we neither allow nor dial opened per second, all of them together:
/// each costs a Diffie-Hellman, and only a pairing request makes it worth one.
pub(super) const STRANGER_HELLOS_PER_SECOND: u32 = 8;
/// How often a joiner's Open goes to the inviter's direct endpoints: the first is answered
/// only after the application checked the request it carries.
pub(super) const JOIN_RETRY: Duration = Duration::from_millis(250);
/// Strangers whose HELLO times are kept for the replay check; more start the table afresh
/// (a replayed pairing request is refused by the application anyway).
const MAX_STRANGERS: usize = 1024;

/// The cache file in the data dir.
pub(super) const CACHE_FILE: &str = "peers.cache";
/// HELLOs we remember while waiting for their WELCOME.
const MAX_PENDING: usize = 64;
/// How long a HELLO waits for its WELCOME.
const PENDING_FOR: Duration = Duration::from_secs(10);
/// Link packets queued for one direct link before its task takes them; more are dropped.
const LINK_QUEUE: usize = 1024;
/// Peers knocked at start (the most recently seen).
const KNOCK_PEERS: usize = 64;
/// How often a peer with a session is probed at its cached endpoint: NATs drop an idle UDP
/// mapping after 30 s or more, and the next start resumes only through a live one.
const KEEPALIVE_EVERY: Duration = Duration::from_secs(25);
/// HELLOs opened per peer and second (see `State::hello_budget`).
const HELLOS_PER_SECOND: u32 = 16;

/// A direct link made by a handshake, for the peer's path agent to carry the session on.
#[derive(Debug)]
pub(super) struct DirectLink {
    pub(super) link: UdpLink,
    pub(super) remote: SocketAddr,
}

/// The node's direct socket and what it knows.
#[derive(Debug)]
pub(super) struct Direct {
    socket: Arc<UdpSocket>,
    local: SocketAddr,
    identity: Identity,
    /// Drawn at each start: a peer that sees it change knows we restarted.
    boot: u64,
    cache_path: PathBuf,
    punch: PunchConfig,
    state: Mutex<State>,
    /// Set by [`Direct::close`]: the reader stops.
    closed: tokio::sync::watch::Sender<bool>,
}

#[derive(Debug, Default)]
struct State {
    responder: Responder,
    pending: VecDeque<Pending>,
    cache: PeerCache,
    /// The last time we put in a HELLO: each is later than the one before.
    last_timestamp: u64,
    /// Each peer's boot number, as its last handshake said.
    boots: HashMap<PublicKey, u64>,
    /// The links on this socket, by remote address.
    links: HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>,
    /// Peers whose probe was answered in this run.
    confirmed: HashSet<PublicKey>,
    /// Our own addresses as last gathered (interfaces and what STUN saw): a peer's
    /// candidate in a reserved block is probed only when one of these is in it, as for
    /// punching.
    own: Vec<std::net::IpAddr>,
    /// Peers whose NAT mappings a keepalive loop holds open.
    kept_alive: HashSet<PublicKey>,
    /// HELLOs opened per peer in the current second: a flood of forged ones claiming a
    /// peer we know costs at most this many Diffie-Hellmans a second.
    hello_budget: HashMap<PublicKey, (Instant, u32)>,
    /// The direct candidates each peer sent last: probed again once we know our own
    /// addresses (a peer's candidates may come before we gathered ours).
    heard: HashMap<PublicKey, Vec<Candidate>>,
    /// Peers we are joining: the pairing request our Opens carry, and the endpoints the
    /// ticket named.
    joining: HashMap<PublicKey, (Vec<u8>, Vec<SocketAddr>)>,
    /// The replay check of strangers' HELLOs, apart from our peers' (bounded).
    strangers: Responder,
    strangers_seen: usize,
    /// Strangers' HELLOs opened in the current second.
    stranger_budget: Option<(Instant, u32)>,
}

#[derive(Debug)]
struct Pending {
    hello: PendingHello,
    sent: Instant,
}

impl Direct {
    /// Binds the direct socket, on the port of the last run when it is free.
    pub(super) fn bind(secret: [u8; 32], data_dir: &Path, punch: PunchConfig) -> io::Result<Self> {
        let cache_path = data_dir.join(CACHE_FILE);
        let cache = match std::fs::read_to_string(&cache_path) {
            Ok(text) => {
                let (cache, skipped) = PeerCache::parse(&text);
                if skipped > 0 {
                    debug!(skipped, "damaged lines in the peer cache skipped");
                }
                cache
            }
            Err(_) => PeerCache::default(),
        };
        let socket = match cache.port.map(bind_udp_port) {
            Some(Ok(socket)) => socket,
            Some(Err(error)) => {
                debug!(port = ?cache.port, %error, "last run's direct port is taken");
                bind_udp_port(0)?
            }
            None => bind_udp_port(0)?,
        };
        let local = socket.local_addr()?;
        let direct = Self {
            socket: Arc::new(socket),
            local,
            identity: Identity::from_secret(secret),
            boot: rand::random(),
            cache_path,
            punch,
            state: Mutex::new(State {
                cache,
                ..State::default()
            }),
            closed: tokio::sync::watch::channel(false).0,
        };
        let mut st = lock(&direct.state);
        if st.cache.port != Some(local.port()) {
            st.cache.port = Some(local.port());
            direct.save(&st.cache);
        }
        drop(st);
        info!(port = local.port(), "direct socket bound");
        Ok(direct)
    }

    /// Stops the reader and ends every direct link (the fabric is shutting down).
    pub(super) fn close(&self) {
        self.closed.send_replace(true);
        lock(&self.state).links.clear();
    }

    /// The direct socket's port.
    pub(super) fn port(&self) -> u16 {
        self.local.port()
    }

    /// The endpoints where `pk` answered last, newest first, then those a ticket named.
    pub(super) fn cached(&self, pk: &PublicKey) -> Vec<SocketAddr> {
        let st = lock(&self.state);
        let mut out = st.cache.endpoints(pk).to_vec();
        if let Some((_, hinted)) = st.joining.get(pk) {
            for e in hinted {
                if !out.contains(e) {
                    out.push(*e);
                }
            }
        }
        out
    }

    /// Our Opens to `pk` carry `request` to `endpoints` too, until [`Direct::joined`].
    pub(super) fn join(&self, pk: PublicKey, endpoints: Vec<SocketAddr>, request: Vec<u8>) {
        lock(&self.state).joining.insert(pk, (request, endpoints));
    }

    /// Whether we are joining `pk`.
    pub(super) fn is_joining(&self, pk: &PublicKey) -> bool {
        lock(&self.state).joining.contains_key(pk)
    }

    /// The join with `pk` is over (its session came up, or it failed).
    pub(super) fn joined(&self, pk: &PublicKey) {
        lock(&self.state).joining.remove(pk);
    }

    /// Our addresses on the direct socket's port, for a ticket (see [`endpoints_on`]).
    pub(super) fn endpoints(&self, max: usize) -> Vec<SocketAddr> {
        endpoints_on(self.port(), self.local.is_ipv6(), max)
    }

    /// Our direct candidates for a peer: the addresses of `gathered` (interfaces and what
    /// STUN saw, UDP) on the direct socket's port. A NAT that keeps ports (most do, Linux's
    /// among them) maps our direct port to the same public port as it maps any other.
    pub(super) fn candidates(&self, gathered: &[Candidate]) -> Vec<Candidate> {
        lock(&self.state).own = gathered.iter().map(|c| c.addr.ip()).collect();
        let mut out: Vec<Candidate> = Vec::new();
        for c in gathered.iter().filter(|c| c.protocol == Protocol::Udp) {
            let addr = SocketAddr::new(c.addr.ip(), self.port());
            if !out.iter().any(|o| o.addr == addr) {
                out.push(Candidate {
                    kind: c.kind,
                    protocol: Protocol::Udp,
                    addr,
                });
            }
        }
        out.truncate(crate::link::signal::MAX_CANDIDATES);
        out
    }

    /// Sends a session control message (an Open) to one cached endpoint of `pk`: the newest
    /// on the first `attempt`, the next on the next. One at a time, because each WELCOME
    /// makes a link with keys of its own, and the two sides must end on the same one: the
    /// exit keeps the link of the latest Open, the client takes the first answer, and with
    /// one Open a second in flight those are the same.
    pub(super) fn send_control(&self, pk: PublicKey, msg: Control, attempt: usize) -> bool {
        let endpoints = self.cached(&pk);
        let Some(&to) = endpoints.get(attempt % endpoints.len().max(1)) else {
            return false;
        };
        let mut control = Vec::new();
        msg.emit(&mut control);
        let joining = lock(&self.state).joining.get(&pk).map(|(r, _)| r.clone());
        let body = joining
            .and_then(|request| join_body(&control, &request))
            .unwrap_or_else(|| [&[kind::CONTROL][..], &control].concat());
        self.send_hello(pk, to, &body);
        true
    }

    fn send_hello(&self, pk: PublicKey, to: SocketAddr, body: &[u8]) {
        let mut packet = Vec::with_capacity(128 + body.len());
        let mut st = lock(&self.state);
        let timestamp = wall_ms().max(st.last_timestamp + 1);
        st.last_timestamp = timestamp;
        let pending = match handshake::hello(
            &self.identity,
            pk,
            rand::random(),
            timestamp,
            self.boot,
            body,
            &mut packet,
        ) {
            Ok(p) => p,
            Err(error) => {
                debug!(peer = %pk, %error, "no hello");
                return;
            }
        };
        let now = Instant::now();
        st.pending
            .retain(|p| now.saturating_duration_since(p.sent) < PENDING_FOR);
        if st.pending.len() >= MAX_PENDING {
            st.pending.pop_front();
        }
        st.pending.push_back(Pending {
            hello: pending,
            sent: now,
        });
        drop(st);
        self.send_to(&packet, to);
    }

    fn send_to(&self, packet: &[u8], to: SocketAddr) {
        if let Err(error) = self.socket.try_send_to(packet, wire_addr(self.local, to)) {
            debug!(%to, %error, "direct send failed");
        }
    }

    /// Notes that `pk` answered at `from`, writing the cache when that is news.
    fn record(&self, pk: PublicKey, from: SocketAddr) {
        let mut st = lock(&self.state);
        if st.cache.record(pk, from, wall_ms() / 1000) {
            self.save(&st.cache);
        }
    }

    /// Writes the cache atomically (a new file renamed over the old), readable only by us.
    fn save(&self, cache: &PeerCache) {
        if let Err(error) = crate::tox::write_private(&self.cache_path, cache.emit().as_bytes()) {
            debug!(path = %self.cache_path.display(), %error, "peer cache not written");
        }
    }

    /// Starts a link to `remote` with `keys` on this socket, replacing any link there.
    fn start_link(&self, keys: LinkKeys, remote: SocketAddr) -> DirectLink {
        let (tx, rx) = mpsc::channel(LINK_QUEUE);
        // Replacing the sender ends the old link's task: its peer restarted.
        lock(&self.state).links.insert(remote, tx);
        let punch = UdpPunch::established(Instant::now(), keys, remote, self.punch);
        DirectLink {
            link: UdpLink::spawn_demuxed(self.socket.clone(), punch, remote, rx),
            remote,
        }
    }

    /// Probes `pk` at `candidates` a few times, until one answers: both sides do it at once
    /// when they learn each other's candidates, which opens NAT mappings both ways.
    pub(super) fn probe(self: &Arc<Self>, pk: PublicKey, candidates: Vec<SocketAddr>) {
        let direct = Arc::downgrade(self);
        tokio::spawn(async move {
            for round in 0..8u32 {
                let Some(d) = direct.upgrade() else { return };
                if lock(&d.state).confirmed.contains(&pk) {
                    return;
                }
                for &to in &candidates {
                    d.send_hello(pk, to, &[kind::PROBE]);
                }
                drop(d);
                tokio::time::sleep(Duration::from_millis(250) * (round + 1).min(4)).await;
            }
        });
    }

    /// Tells every recently seen peer that we (re)started, three times over a second.
    fn knock(self: &Arc<Self>) {
        let mut peers: Vec<(PublicKey, u64, Vec<SocketAddr>)> = lock(&self.state)
            .cache
            .peers
            .iter()
            .map(|(pk, e)| (*pk, e.seen, e.endpoints.clone()))
            .collect();
        peers.sort_by_key(|(_, seen, _)| std::cmp::Reverse(*seen));
        peers.truncate(KNOCK_PEERS);
        if peers.is_empty() {
            return;
        }
        let direct = Arc::downgrade(self);
        tokio::spawn(async move {
            for pause in [0, 300, 700] {
                tokio::time::sleep(Duration::from_millis(pause)).await;
                let Some(d) = direct.upgrade() else { return };
                for (pk, _, endpoints) in &peers {
                    for &to in endpoints {
                        d.send_hello(*pk, to, &[kind::KNOCK]);
                    }
                }
            }
        });
    }
}

/// Binds the direct socket; `None` (sessions start over Tox alone) when the path choice
/// rules UDP out (`--path tox`, `--path tcp`) or no socket can be bound.
pub(super) fn bind(config: &FabricConfig, secret: [u8; 32]) -> Option<Arc<Direct>> {
    if !config.path.choice.wants_udp() {
        return None;
    }
    match Direct::bind(secret, &config.tox.data_dir, config.path.punch) {
        Ok(d) => Some(Arc::new(d)),
        Err(error) => {
            info!(%error, "no direct socket: sessions start over tox only");
            None
        }
    }
}

/// Starts the reader of the direct socket and tells the peers we remember that we started.
pub(super) fn run(shared: &Arc<Shared>, direct: &Arc<Direct>) {
    tokio::spawn(read(Arc::downgrade(shared), direct.clone()));
    direct.knock();
}

/// The reader: every packet of the direct socket.
async fn read(shared: Weak<Shared>, direct: Arc<Direct>) {
    let mut buf = vec![0u8; 65536];
    let mut closed = direct.closed.subscribe();
    loop {
        tokio::select! {
            r = direct.socket.readable() => if let Err(error) = r {
                debug!(%error, "direct socket failed");
                return;
            },
            _ = closed.wait_for(|c| *c) => return,
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        for _ in 0..256 {
            let (n, from) = match direct.socket.try_recv_from(&mut buf) {
                Ok((n, from)) => (n, canonical(from)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => continue,
            };
            let packet = &buf[..n];
            match packet.first() {
                Some(&HELLO) => on_hello(&shared, &direct, from, packet),
                Some(&WELCOME) => on_welcome(&shared, &direct, from, packet),
                Some(_) => {
                    let mut st = lock(&direct.state);
                    if let Some(tx) = st.links.get(&from)
                        && let Err(mpsc::error::TrySendError::Closed(_)) =
                            tx.try_send(packet.to_vec())
                    {
                        st.links.remove(&from);
                    }
                }
                None => {}
            }
        }
    }
}

fn on_hello(shared: &Arc<Shared>, direct: &Arc<Direct>, from: SocketAddr, packet: &[u8]) {
    let Some(pk) = hello_sender(packet) else {
        return;
    };
    let exit_side = shared.allows(&pk);
    let dialed = shared.with_slot_if(pk, |slot| slot.dialed).unwrap_or(false);
    if !exit_side && !dialed {
        on_stranger_hello(shared, direct, pk, from, packet);
        return;
    }
    debug!(peer = %pk, %from, "hello");
    let mut st = lock(&direct.state);
    let now = Instant::now();
    if st.hello_budget.len() >= MAX_PENDING {
        st.hello_budget
            .retain(|_, (since, _)| now.saturating_duration_since(*since) < Duration::from_secs(1));
    }
    let (since, count) = st.hello_budget.entry(pk).or_insert((now, 0));
    if now.saturating_duration_since(*since) >= Duration::from_secs(1) {
        (*since, *count) = (now, 0);
    }
    *count += 1;
    if *count > HELLOS_PER_SECOND {
        debug!(peer = %pk, %from, "too many hellos: dropped");
        return;
    }
    let received = match st.responder.open_hello(&direct.identity, packet, wall_ms()) {
        Ok(r) => r,
        Err(error) => {
            debug!(peer = %pk, %from, %error, "hello refused");
            return;
        }
    };
    let before = st.boots.insert(pk, received.hello.boot);
    drop(st);
    let body = &received.hello.body;
    let control = match body.first() {
        Some(&kind::CONTROL) => body.get(1..),
        // A pairing request whose sender was let in since: its Open, answered as any other.
        Some(&kind::JOIN) => split_join(body).map(|(control, _)| control),
        _ => None,
    };
    match body.first() {
        Some(&kind::CONTROL | &kind::JOIN) if exit_side => {
            let Some(Ok(Control::Open { request, resume })) = control.map(Control::parse) else {
                return;
            };
            // Crossed with our own Open, which wins: left unanswered, as over Tox.
            let Some(answer) = shared.answer_open(pk, request, resume) else {
                return;
            };
            let mut reply = vec![kind::CONTROL];
            answer.emit(&mut reply);
            let mut packet = Vec::new();
            let keys = match received.welcome(
                &direct.identity,
                rand::random(),
                direct.boot,
                &reply,
                &mut packet,
            ) {
                Ok(k) => k,
                Err(error) => {
                    debug!(peer = %pk, %error, "no welcome");
                    return;
                }
            };
            if matches!(answer, Control::Accept { .. }) {
                info!(peer = %pk, %from, "session opened directly");
                shared.opened_direct(pk, from);
                let link = direct.start_link(keys, from);
                shared.hand_direct_link(pk, link);
            }
            direct.send_to(&packet, from);
            direct.record(pk, from);
        }
        Some(&kind::PROBE) => {
            let mut packet = Vec::new();
            if received
                .welcome(
                    &direct.identity,
                    rand::random(),
                    direct.boot,
                    &[kind::PROBE],
                    &mut packet,
                )
                .is_ok()
            {
                direct.send_to(&packet, from);
                direct.record(pk, from);
            }
        }
        Some(&kind::KNOCK) => {
            direct.record(pk, from);
            if before != Some(received.hello.boot) && dialed {
                info!(peer = %pk, %from, "the exit restarted: opening a session directly");
                shared.peer_restarted(pk);
            }
        }
        _ => debug!(peer = %pk, "hello with an unknown body"),
    }
}

/// A HELLO body of kind JOIN: the kind, the Open's length (one byte), the Open, the pairing
/// request; `None` for an Open too long for its length byte.
fn join_body(control: &[u8], request: &[u8]) -> Option<Vec<u8>> {
    let len = u8::try_from(control.len()).ok()?;
    Some([&[kind::JOIN, len][..], control, request].concat())
}

/// The Open and the pairing request of a JOIN body; `None` for any other body, or one cut
/// short.
fn split_join(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let (&kind::JOIN, rest) = body.split_first()? else {
        return None;
    };
    let (&len, rest) = rest.split_first()?;
    let len = usize::from(len);
    (rest.len() >= len).then(|| rest.split_at(len))
}

/// A HELLO from a peer we neither allow nor dial: only a pairing request is worth opening it
/// (within the strangers' budget); its request goes to the application, unanswered.
fn on_stranger_hello(
    shared: &Arc<Shared>,
    direct: &Arc<Direct>,
    pk: PublicKey,
    from: SocketAddr,
    packet: &[u8],
) {
    let now = Instant::now();
    if !shared.expects_joins(now) {
        debug!(%from, "hello from a peer we neither allow nor dial");
        return;
    }
    let mut st = lock(&direct.state);
    let (since, count) = st.stranger_budget.get_or_insert((now, 0));
    if now.saturating_duration_since(*since) >= Duration::from_secs(1) {
        (*since, *count) = (now, 0);
    }
    *count += 1;
    if *count > STRANGER_HELLOS_PER_SECOND {
        debug!(%from, "hello from a stranger: over the budget, dropped");
        return;
    }
    if st.strangers_seen >= MAX_STRANGERS {
        st.strangers = Responder::default();
        st.strangers_seen = 0;
    }
    st.strangers_seen += 1;
    let received = match st.strangers.open_hello(&direct.identity, packet, wall_ms()) {
        Ok(r) => r,
        Err(error) => {
            debug!(%from, %error, "hello from a stranger refused");
            return;
        }
    };
    drop(st);
    let body = &received.hello.body;
    let request = split_join(body)
        .and_then(|(_, request)| crate::pairing::JoinRequest::from_message(request));
    match request {
        Some(request) => {
            debug!(peer = %pk, %from, "pairing request by a direct hello");
            // Full: dropped; the joiner's next hello asks again.
            let _ = shared.joins.try_send((pk, request));
        }
        None => debug!(peer = %pk, %from, "hello from a peer we neither allow nor dial"),
    }
}

fn on_welcome(shared: &Arc<Shared>, direct: &Arc<Direct>, from: SocketAddr, packet: &[u8]) {
    let mut st = lock(&direct.state);
    let Some(at) = st.pending.iter().position(|p| p.hello.matches(packet)) else {
        return;
    };
    let (welcome, keys) = match st.pending[at].hello.open_welcome(&direct.identity, packet) {
        Ok(w) => w,
        Err(error) => {
            debug!(%from, %error, "welcome refused");
            return;
        }
    };
    let pk = st.pending[at].hello.peer();
    // One answer per hello: a copy of this welcome finds nothing.
    st.pending.remove(at);
    st.boots.insert(pk, welcome.boot);
    let body = welcome.body;
    match body.first() {
        Some(&kind::CONTROL) => {
            st.pending.retain(|p| p.hello.peer() != pk);
            drop(st);
            let Ok(msg) = Control::parse(&body[1..]) else {
                return;
            };
            if matches!(msg, Control::Accept { .. }) {
                info!(peer = %pk, %from, "session opened at a direct endpoint");
                shared.opened_direct(pk, from);
                let link = direct.start_link(keys, from);
                shared.hand_direct_link(pk, link);
            }
            direct.record(pk, from);
            shared.deliver_answer(pk, msg);
        }
        Some(&kind::PROBE) => {
            st.confirmed.insert(pk);
            drop(st);
            debug!(peer = %pk, %from, "direct endpoint confirmed");
            direct.record(pk, from);
            shared.keep_direct_alive(pk);
        }
        _ => {}
    }
}

impl Shared {
    /// Notes that `pk`'s session was opened at `from` by a direct handshake.
    fn opened_direct(&self, pk: PublicKey, from: SocketAddr) {
        self.with_slot(pk, |slot| lock(&slot.status).opened_direct = Some(from));
    }

    /// Probes `pk`'s direct candidates again, now that we gathered our own addresses.
    pub(super) fn reprobe(self: &Arc<Self>, pk: PublicKey) {
        let heard = self
            .direct
            .as_ref()
            .and_then(|d| lock(&d.state).heard.get(&pk).cloned());
        if let Some(candidates) = heard {
            self.on_direct_candidates(pk, &candidates);
        }
    }

    /// A direct link to `pk` is up: its path agent carries the session on it (the agent,
    /// which starts with the session, takes it at start when it does not run yet).
    fn hand_direct_link(self: &Arc<Self>, pk: PublicKey, link: DirectLink) {
        let inbox = self.with_slot(pk, |slot| match slot.paths.clone() {
            Some(tx) => Some((tx, link)),
            None => {
                slot.pending_direct = Some(link);
                None
            }
        });
        if let Some((tx, link)) = inbox {
            let _ = tx.try_send(super::paths::AgentInput::Direct(link));
        }
    }

    /// Probes `pk` at its newest cached endpoint every [`KEEPALIVE_EVERY`] while a session
    /// to it runs (one loop per peer), so that the NAT mappings on both sides stay open for
    /// the next start; the answers also keep the cache fresh.
    pub(super) fn keep_direct_alive(self: &Arc<Self>, pk: PublicKey) {
        let Some(direct) = self.direct.clone() else {
            return;
        };
        if !lock(&direct.state).kept_alive.insert(pk) {
            return;
        }
        let shared = Arc::downgrade(self);
        // Weak: a node shutting down must not keep its socket open for a keepalive's sake.
        let direct = Arc::downgrade(&direct);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(KEEPALIVE_EVERY).await;
                let Some(d) = direct.upgrade() else { return };
                let alive = shared
                    .upgrade()
                    .and_then(|s| s.with_slot_if(pk, |slot| slot.session.is_some()))
                    .unwrap_or(false);
                match d.cached(&pk).first().copied() {
                    Some(to) if alive && !*d.closed.borrow() => {
                        d.send_hello(pk, to, &[kind::PROBE]);
                    }
                    _ => {
                        // The next session probes again (and keeps alive again) afresh.
                        let mut st = lock(&d.state);
                        st.kept_alive.remove(&pk);
                        st.confirmed.remove(&pk);
                        return;
                    }
                }
            }
        });
    }

    /// Our exit said it restarted: the session we hold is gone there, so end it now and let
    /// the supervisor open another instead of waiting for the answer timeout.
    fn peer_restarted(self: &Arc<Self>, pk: PublicKey) {
        let input = self.with_slot(pk, |slot| {
            // Those it opened, it opens again; ours it lost.
            slot.session
                .as_ref()
                .filter(|r| r.opened_here)
                .map(|r| r.input.clone())
        });
        if let Some(input) = input {
            let _ = input.try_send(Input::PeerClose(CloseReason::UnknownSession));
        }
    }

    /// Probes the direct candidates `pk` sent us (they come over Tox while a session runs).
    pub(super) fn on_direct_candidates(self: &Arc<Self>, pk: PublicKey, candidates: &[Candidate]) {
        let Some(direct) = self.direct.clone() else {
            return;
        };
        let own = {
            let mut st = lock(&direct.state);
            if st.heard.len() >= MAX_PENDING && !st.heard.contains_key(&pk) {
                st.heard.clear();
            }
            st.heard.insert(pk, candidates.to_vec());
            st.own.clone()
        };
        // The same rule as for punching (B12): no loopback, nothing reserved, private hosts
        // only on our networks or those we route to.
        let filter = AddressFilter::new(crate::path::interface_networks())
            .with_own(own)
            .with_routes(crate::path::routed_networks());
        let addrs: Vec<SocketAddr> = candidates
            .iter()
            .filter(|c| c.protocol == Protocol::Udp && c.kind != CandidateKind::PeerReflexive)
            .map(|c| c.addr)
            .filter(|&addr| match filter.check(addr) {
                Ok(()) => true,
                Err(why) => {
                    debug!(peer = %pk, %addr, %why, "direct candidate refused");
                    false
                }
            })
            .collect();
        debug!(peer = %pk, ?addrs, "probing the peer's direct candidates");
        if !addrs.is_empty() {
            direct.probe(pk, addrs);
        }
    }
}

/// This host's addresses on `port`: the interfaces' (not loopback, unless that is all there
/// is; not link-local), IPv4 first, IPv6 only when `v6`, at most `max`.
pub(super) fn endpoints_on(port: u16, v6: bool, max: usize) -> Vec<SocketAddr> {
    let mut hosts: Vec<std::net::IpAddr> = crate::path::interface_networks()
        .into_iter()
        .map(|n| n.addr)
        .collect();
    hosts.sort_by_key(|ip| ip.is_ipv6());
    hosts
        .into_iter()
        .filter(|ip| v6 || ip.is_ipv4())
        .map(|ip| SocketAddr::new(ip, port))
        .take(max)
        .collect()
}

/// The direct endpoints a node on `data_dir` will have when it starts: its last run's port
/// (which it takes again when free) on this host's addresses; none when it never ran.
pub(super) fn endpoints_of(data_dir: &Path, max: usize) -> Vec<SocketAddr> {
    let port = std::fs::read_to_string(data_dir.join(CACHE_FILE))
        .ok()
        .and_then(|text| PeerCache::parse(&text).0.port);
    match port {
        // The socket is dual-stack where the host has IPv6.
        Some(port) => endpoints_on(port, true, max),
        None => Vec::new(),
    }
}

/// The wall clock in milliseconds since the Unix epoch (0 before it: a broken clock only
/// makes our hellos look stale to the peer).
fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_join_body_splits_into_its_open_and_its_request() {
        let body = join_body(b"open", b"proxy-join-x").unwrap();
        assert_eq!(
            split_join(&body),
            Some((&b"open"[..], &b"proxy-join-x"[..]))
        );
        assert_eq!(split_join(&body[..4]), None, "cut inside the Open");
        assert_eq!(split_join(&[kind::CONTROL, 0]), None);
        assert_eq!(split_join(&[]), None);
        assert_eq!(join_body(&[0; 256], b"r"), None);
    }
}
