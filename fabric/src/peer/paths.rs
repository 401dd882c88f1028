//! The path agent of one peer: it punches direct links and tells the session driver which
//! path to send on.
//!
//! ```text
//!  client agent                                   exit agent (spawned by the first signal)
//!  gather ─► Offer{id, x25519, tls fp, cands} ──► gather ─► derive keys
//!  derive keys ◄── Offer{same id, ...} (answer) ◄─┘
//!  UdpLink + punch_tcp ◄══ probes / simultaneous open ══► UdpLink + punch_tcp
//!  Connected ─► carrier = udp (or tcp)             Connected ─► carrier = udp (or tcp)
//!  Dead/Failed ─► carrier = tox, retry later       Dead/Failed ─► carrier = tox, wait for offer
//! ```
//!
//! The client drives every attempt, so the two sides never race to replace each other's
//! offers: the exit only answers, and a new offer from the client replaces whatever the exit
//! was doing. Signals travel in Tox lossless packets (id [`super::SIGNAL_PACKET_ID`]), which
//! the peers' Tox keys authenticate; the link keys derived from them authenticate every
//! punched packet.
//!
//! Each side picks its own carrier from the links it has up and its own `--path` choice:
//! punched UDP, then punched TCP, then Tox ([`pick`]). KCP takes packets from any path, so the
//! two sides need not switch at the same instant. A UDP link that loses half its keepalives
//! yields to a TCP link, or, with none, keeps carrying packets with Tox copies beside them.
//!
//! A round lasts while any of its links is up. Within it, a TCP link that dies, or a UDP link
//! that turns lossy with no TCP link, makes both sides punch TCP again from the round's ports
//! to the same candidates (each side sees the link die, or the loss, by itself, and a punch
//! dials for seconds, so the two attempts meet); only when every link is gone does the client
//! offer anew.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_rustls::TlsStream;
use tracing::{debug, info};

use super::direct::DirectLink;
use super::{PeerStatus, SIGNAL_PACKET_ID, Shared, lock};
use crate::id::PublicKey;
use crate::link::LinkSecret;
use crate::link::signal::{LinkOffer, Protocol, Signal};
use crate::path::tcp::{TcpLink, TcpLinkSender};
use crate::path::{ActivePath, Gathered, PathChoice, PathConfig, PathStatus, gather};
use crate::punch::driver::{LinkEvent, LinkSendError, UdpLink, UdpLinkSender, canonical};
use crate::punch::filter::AddressFilter;
use crate::punch::tcp::{TcpPunchError, TlsIdentity, punch_tcp};
use crate::punch::udp::UdpPunch;
use crate::time::{Duration, Instant};

/// The least time between two answers of an exit to one client.
const MIN_ANSWER_GAP: Duration = Duration::from_secs(1);

/// What the session driver sends its packets on.
#[derive(Debug, Clone, Default)]
pub(super) enum Carrier {
    /// Tox lossy packets.
    #[default]
    Tox,
    /// Nothing: a forced punched path is not up yet (KCP retransmits once it is).
    Held,
    /// A punched UDP link.
    Udp(Punched<UdpLinkSender>),
    /// A punched TCP link.
    Tcp(Punched<TcpLinkSender>),
}

impl Carrier {
    /// Whether this is a punched link.
    pub(super) fn is_punched(&self) -> bool {
        matches!(self, Self::Udp(_) | Self::Tcp(_))
    }

    /// Sends a session packet on a punched link; `false` means "send it by Tox" (the carrier
    /// is Tox, the link has closed and the agent is about to say so, its queue is full, or
    /// the link is lossy and Tox carries copies). `also_tox` says the caller already sent a
    /// copy by Tox. Never waits: the session driver stops reading, acknowledging and timing
    /// while it waits, and it used to wait up to 250 ms for each packet on a full link
    /// (review B10). A packet that finds the queue full goes by Tox alone: copying the
    /// following ones to Tox as well would double a busy link's traffic into Tox, whose full
    /// queue the driver does wait for; a link that stops delivering is `LinkWatch`'s to catch.
    pub(super) async fn send(&self, packet: &[u8], also_tox: bool) -> bool {
        match self {
            Self::Tox => false,
            // A forced punched path is not up: KCP sends it again later.
            Self::Held => true,
            Self::Udp(link) => link.settle(link.sender.try_send(packet), also_tox),
            Self::Tcp(link) => link.settle(link.sender.try_send(packet), also_tox),
        }
    }
}

/// A punched link as the session driver sends on it.
#[derive(Debug, Clone)]
pub(super) struct Punched<S> {
    sender: S,
    /// Every packet also by Tox: the link loses too much and there is nothing better.
    tox_copies: bool,
    /// Whether the session may send by Tox at all (`--path udp|tcp` forbid it).
    allows_tox: bool,
}

impl<S> Punched<S> {
    fn new(sender: S, tox_copies: bool, allows_tox: bool) -> Self {
        Self {
            sender,
            tox_copies,
            allows_tox,
        }
    }

    /// What became of a packet offered to the link (`sent`, tried without waiting): `true`
    /// when Tox needs no copy of it.
    fn settle(&self, sent: Result<(), LinkSendError>, also_tox: bool) -> bool {
        match sent {
            // The agent moves the session off a closed link at once.
            Err(LinkSendError::Closed) => false,
            // Tox has a copy already, or must not get one (KCP resends what was lost).
            _ if also_tox || !self.allows_tox => true,
            Err(LinkSendError::Full) => {
                tracing::trace!("punched link full: packet sent by tox");
                false
            }
            Ok(()) => !self.tox_copies,
        }
    }
}

/// The kind of path a session packet arrived by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Via {
    /// A Tox lossy packet.
    Tox,
    /// A punched link.
    Link,
}

/// How long a punched link may say nothing, while we wait for acknowledgements, before the
/// session also sends on Tox: four round trips of the session, within
/// [`MIN_SUSPECT_AFTER`]..=[`MAX_SUSPECT_AFTER`]. A healthy link under load carries
/// acknowledgements every few milliseconds, so four round trips of silence is a dead link far
/// more often than a slow one; and a false alarm costs only duplicates on Tox.
pub(super) fn suspect_after(srtt: Option<Duration>) -> Duration {
    srtt.map_or(MAX_SUSPECT_AFTER, |s| s * 4)
        .clamp(MIN_SUSPECT_AFTER, MAX_SUSPECT_AFTER)
}
/// Shortest silence taken for a dead link: a loaded machine's scheduling hiccups stay below it.
const MIN_SUSPECT_AFTER: Duration = Duration::from_millis(200);
/// Longest: the punched link's own keepalive interval is longer and would be too slow to matter.
const MAX_SUSPECT_AFTER: Duration = Duration::from_millis(1000);
/// How long after a packet came by Tox (the peer suspects the link) we answer on Tox too.
const ECHO_TOX_FOR: Duration = Duration::from_secs(2);

/// The session driver's view of whether its punched link still carries the peer's packets.
///
/// The agent learns that a link is dead only after its dead timeout (8 s of silence), which
/// would freeze every stream that long. The driver knows sooner: it is waiting for
/// acknowledgements that do not come. It then sends on Tox as well (duplicates are harmless
/// to KCP), and so does the peer once it sees packets arrive by Tox, until the link speaks
/// again or the agent gives up on it.
#[derive(Debug)]
pub(super) struct LinkWatch {
    last_link: Instant,
    last_tox: Option<Instant>,
}

impl LinkWatch {
    pub(super) fn new(now: Instant) -> Self {
        Self {
            last_link: now,
            last_tox: None,
        }
    }

    /// The carrier changed: a new punched link gets a fresh grace period.
    pub(super) fn on_carrier(&mut self, now: Instant, punched: bool) {
        if punched {
            self.last_link = now;
        }
    }

    /// A packet arrived.
    pub(super) fn on_input(&mut self, now: Instant, via: Via) {
        match via {
            Via::Link => self.last_link = now,
            Via::Tox => self.last_tox = Some(now),
        }
    }

    /// Whether to send on Tox beside the punched link now. `waiting` says whether the
    /// session has segments the peer has not acknowledged (asked only when the link is
    /// silent).
    pub(super) fn suspect(
        &self,
        now: Instant,
        silent_after: Duration,
        waiting: impl FnOnce() -> bool,
    ) -> bool {
        if now.saturating_duration_since(self.last_link) < silent_after {
            return false;
        }
        let peer_on_tox = self
            .last_tox
            .is_some_and(|t| now.saturating_duration_since(t) < ECHO_TOX_FOR);
        peer_on_tox || waiting()
    }
}

/// A round made of one direct link (already connected: the handshake proved the path).
fn direct_round(direct: DirectLink) -> Round {
    info!(remote = %direct.remote, "session carried by a direct link");
    Round {
        udp: Some(direct.link),
        udp_up: None,
        udp_lossy: false,
        tcp_punch: None,
        tcp: None,
        tcp_up: None,
        tcp_plan: None,
        tcp_was_up: false,
        tcp_up_at: None,
        tcp_repunch_at: None,
        tcp_gap: Duration::ZERO,
        offer_id: DIRECT_ROUND,
        connected: false,
    }
}

/// The offer id of a round made by a direct handshake (offers draw theirs at random: a
/// clash only mislabels the status line).
const DIRECT_ROUND: u64 = 0;

/// The carrier a session starts on under `choice`.
pub(super) fn initial_carrier(choice: PathChoice) -> Carrier {
    if choice.allows_tox() {
        Carrier::Tox
    } else {
        Carrier::Held
    }
}

/// What reaches a path agent.
#[derive(Debug)]
pub(super) enum AgentInput {
    /// A signal from the peer, over Tox.
    Signal(Signal),
    /// A direct link a handshake just made: the session moves onto it.
    Direct(DirectLink),
}

/// Which side of the exchange an agent plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    /// Makes offers.
    Client,
    /// Answers them.
    Exit,
}

/// One peer's agent.
#[derive(Debug)]
pub(super) struct Agent {
    pub(super) shared: Weak<Shared>,
    pub(super) pk: PublicKey,
    pub(super) config: PathConfig,
    /// Signals from the peer and direct links, routed here by the fabric.
    pub(super) signals: mpsc::Receiver<AgentInput>,
    /// A direct link that came while the agent was busy, to run next.
    pub(super) pending_direct: Option<DirectLink>,
    /// What the session driver sends on.
    pub(super) carrier: watch::Sender<Carrier>,
    pub(super) status: Arc<Mutex<PeerStatus>>,
}

/// Share of lost keepalive round trips at which a punched UDP link gives way to a punched
/// TCP link, and at which it takes over again (apart, so a link near one figure does not
/// flap).
const UDP_LOSS_FOR_TCP: f64 = 0.5;
const UDP_LOSS_BACK: f64 = 0.25;
/// How often a round looks at its UDP link's figures when no packet brings them.
const FIGURES_EVERY: Duration = Duration::from_millis(500);

/// How a round of links ended.
enum RoundEnd {
    /// Every link is gone; `connected` says whether one was ever up.
    Ended { connected: bool, why: String },
    /// The client sent a new offer (exit side).
    Replaced(LinkOffer),
    /// The fabric or the peer is gone.
    Stopped,
    /// A direct handshake made a link: run it instead.
    Direct(DirectLink),
}

/// The links of one offer exchange.
struct Round {
    udp: Option<UdpLink>,
    udp_up: Option<SocketAddr>,
    /// The UDP link lost at least [`UDP_LOSS_FOR_TCP`] of its keepalives (and not yet as
    /// few as [`UDP_LOSS_BACK`] since).
    udp_lossy: bool,
    tcp_punch: Option<JoinHandle<Result<TlsStream<tokio::net::TcpStream>, TcpPunchError>>>,
    tcp: Option<TcpLink>,
    tcp_up: Option<SocketAddr>,
    /// What punching TCP again within this round needs (none when TCP is not punched).
    tcp_plan: Option<Arc<TcpPlan>>,
    /// A TCP link came up in this round (so the peer can make one again).
    tcp_was_up: bool,
    /// When the current TCP link came up.
    tcp_up_at: Option<tokio::time::Instant>,
    /// When to punch TCP again, if scheduled.
    tcp_repunch_at: Option<tokio::time::Instant>,
    /// The pause before the next TCP punch (see [`next_tcp_gap`]).
    tcp_gap: Duration,
    offer_id: u64,
    connected: bool,
}

/// Everything a TCP punch towards the peer needs; kept for the round so that a TCP link
/// that dies is punched again at once, from the same port to the same candidates, without a
/// new offer exchange (the peer, seeing the link die too, does the same).
struct TcpPlan {
    local: SocketAddr,
    remotes: Vec<SocketAddr>,
    controlling: bool,
    identity: TlsIdentity,
    fingerprint: [u8; 32],
    config: crate::punch::tcp::TcpPunchConfig,
    /// Holds the TCP port (and the UDP socket) for the round.
    _gathered: Gathered,
}

impl TcpPlan {
    fn punch(
        self: &Arc<Self>,
    ) -> JoinHandle<Result<TlsStream<tokio::net::TcpStream>, TcpPunchError>> {
        let plan = self.clone();
        tokio::spawn(async move {
            punch_tcp(
                plan.local,
                &plan.remotes,
                plan.controlling,
                &plan.identity,
                plan.fingerprint,
                plan.config,
            )
            .await
        })
    }
}

/// The first pause before punching TCP again after a failed punch within a round.
const TCP_REPUNCH_MIN: Duration = Duration::from_secs(1);
/// A TCP link that lived this long was healthy: when it dies, punch again at once.
const TCP_STABLE_AFTER: Duration = Duration::from_secs(10);

/// The pause before the next TCP punch of a round, after the last one failed (`lived` is
/// `None`) or its link died after `lived`. None after a healthy link died: the peer saw it
/// die too and punches now. Otherwise from [`TCP_REPUNCH_MIN`], doubling up to `max`, so that
/// a path that kills every connection soon after it is made costs a punch now and then, not
/// a loop of handshakes.
fn next_tcp_gap(gap: Duration, lived: Option<Duration>, max: Duration) -> Duration {
    if lived.is_some_and(|l| l >= TCP_STABLE_AFTER) {
        return Duration::ZERO;
    }
    (gap * 2).max(TCP_REPUNCH_MIN).min(max)
}

impl Round {
    /// Whether the round should have a TCP punch going: it has none, and either a TCP link
    /// was up before (it died: the peer punches again too) or the UDP link is lossy and a
    /// TCP link would take over. A round whose UDP link is gone as well ends instead, and the
    /// client offers anew.
    fn wants_tcp_punch(&self) -> bool {
        self.tcp_plan.is_some()
            && self.tcp.is_none()
            && self.tcp_punch.is_none()
            && self.udp_up.is_some()
            && (self.tcp_was_up || self.udp_lossy)
    }

    /// Schedules a TCP punch if the round wants one and none is scheduled.
    fn schedule_tcp_punch(&mut self) {
        if self.wants_tcp_punch() && self.tcp_repunch_at.is_none() {
            self.tcp_repunch_at = Some(tokio::time::Instant::now() + self.tcp_gap);
        }
    }
}

impl Drop for Round {
    fn drop(&mut self) {
        if let Some(t) = &self.tcp_punch {
            t.abort();
        }
    }
}

impl Agent {
    /// Runs the agent until the fabric is gone, the peer is dropped (`stop`) or, for an exit,
    /// the slot goes away.
    pub(super) async fn run(mut self, role: Role, stop: Option<watch::Receiver<bool>>) {
        let work = async {
            match role {
                Role::Client => self.run_client().await,
                Role::Exit => self.run_exit().await,
            }
        };
        let stopped = async {
            match stop {
                // Ends when the peer sends `true` or is dropped.
                Some(mut stop) => drop(stop.wait_for(|s| *s).await),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = work => {}
            () = stopped => {}
        }
        self.carrier.send_replace(Carrier::Tox);
    }

    async fn run_client(&mut self) {
        let choice = self.config.choice;
        let mut backoff = self.config.retry_min;
        loop {
            if !self.wait_for_session().await {
                return;
            }
            let end = if let Some(direct) = self.pending_direct.take() {
                self.run_round(direct_round(direct)).await
            } else {
                match self.offer().await {
                    Ok(round) => self.run_round(round).await,
                    Err(why) => RoundEnd::Ended {
                        connected: false,
                        why,
                    },
                }
            };
            match end {
                RoundEnd::Stopped => return,
                RoundEnd::Replaced(_) => {}
                RoundEnd::Direct(direct) => self.pending_direct = Some(direct),
                RoundEnd::Ended { connected, why } => {
                    if connected {
                        backoff = self.config.retry_min;
                    }
                    self.fall_back(format!("{why}; punching again in {backoff:?}"));
                    debug!(peer = %self.pk, %why, ?backoff, %choice, "no punched path");
                }
            }
            if self.pending_direct.is_some() {
                continue;
            }
            if !self.sleep(backoff).await {
                return;
            }
            backoff = (backoff * 2).min(self.config.retry_max);
        }
    }

    async fn run_exit(&mut self) {
        let mut next: Option<LinkOffer> = None;
        let mut last_answer: Option<tokio::time::Instant> = None;
        'next: loop {
            if let Some(direct) = self.pending_direct.take() {
                match self.run_round(direct_round(direct)).await {
                    RoundEnd::Stopped => return,
                    RoundEnd::Replaced(offer) => next = Some(offer),
                    RoundEnd::Direct(direct) => self.pending_direct = Some(direct),
                    RoundEnd::Ended { why, .. } => {
                        self.fall_back(format!("{why}; waiting for the client's next offer"));
                    }
                }
                continue;
            }
            let mut offer = match next.take() {
                Some(offer) => offer,
                None => loop {
                    match self.signals.recv().await {
                        Some(AgentInput::Signal(Signal::Offer(offer))) => break offer,
                        Some(AgentInput::Signal(_)) => {}
                        Some(AgentInput::Direct(direct)) => {
                            self.pending_direct = Some(direct);
                            continue 'next;
                        }
                        None => return,
                    }
                },
            };
            // Each answer binds sockets and starts punching: at most one a second, so a
            // client (allowed, but buggy or hostile) cannot make us churn. Offers arriving
            // meanwhile replace the one waiting.
            if let Some(last) = last_answer {
                let until = last + MIN_ANSWER_GAP;
                loop {
                    tokio::select! {
                        () = tokio::time::sleep_until(until) => break,
                        s = self.signals.recv() => match s {
                            Some(AgentInput::Signal(Signal::Offer(newer))) => offer = newer,
                            Some(AgentInput::Signal(_)) => {}
                            Some(AgentInput::Direct(direct)) => {
                                self.pending_direct = Some(direct);
                                continue 'next;
                            }
                            None => return,
                        },
                    }
                }
            }
            last_answer = Some(tokio::time::Instant::now());
            let round = match self.answer(&offer).await {
                Ok(Some(round)) => round,
                Ok(None) => continue,
                Err(why) => {
                    self.fall_back(why);
                    continue;
                }
            };
            match self.run_round(round).await {
                RoundEnd::Stopped => return,
                RoundEnd::Replaced(offer) => next = Some(offer),
                RoundEnd::Direct(direct) => self.pending_direct = Some(direct),
                RoundEnd::Ended { why, .. } => {
                    self.fall_back(format!("{why}; waiting for the client's next offer"));
                }
            }
        }
    }

    /// Waits until the peer has a running session (there is no point punching before).
    async fn wait_for_session(&mut self) -> bool {
        loop {
            let Some(shared) = self.shared.upgrade() else {
                return false;
            };
            let running = lock(&shared.routes)
                .get(&self.pk)
                .is_some_and(|slot| slot.session.is_some());
            drop(shared);
            if running {
                return true;
            }
            if !self.sleep(Duration::from_millis(250)).await {
                return false;
            }
        }
    }

    /// Sleeps, draining signals (a client ignores stray ones); `false` once the fabric is gone.
    async fn sleep(&mut self, pause: Duration) -> bool {
        let until = tokio::time::Instant::now() + pause;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(until) => return true,
                s = self.signals.recv() => match s {
                    None => return false,
                    // A direct link does not wait for the pause to end.
                    Some(AgentInput::Direct(direct)) => {
                        self.pending_direct = Some(direct);
                        return true;
                    }
                    Some(AgentInput::Signal(_)) => {}
                },
            }
        }
    }

    /// Client: gathers, offers, waits for the answer, starts punching.
    async fn offer(&mut self) -> Result<Round, String> {
        let choice = self.config.choice;
        let gathered = gather(&self.config, choice.wants_udp(), choice.wants_tcp())
            .await
            .map_err(|e| format!("gathering candidates failed: {e}"))?;
        let secret = LinkSecret::from_random(rand::random());
        let identity = self.identity(&gathered)?;
        let offer = LinkOffer {
            offer_id: rand::random(),
            x25519_public: secret.public(),
            tls_fingerprint: identity.as_ref().map(TlsIdentity::fingerprint),
            candidates: gathered.candidates.clone(),
        };
        self.fall_back("offered candidates, waiting for the exit".into());
        debug!(peer = %self.pk, candidates = offer.candidates.len(), "link offer sent");
        self.send_direct_candidates(&gathered);
        let deadline = tokio::time::Instant::now() + self.config.answer_timeout;
        let answer = loop {
            self.send(&Signal::Offer(offer.clone()));
            let resend = (tokio::time::Instant::now() + Duration::from_secs(5)).min(deadline);
            let got = loop {
                tokio::select! {
                    s = self.signals.recv() => match s {
                        Some(AgentInput::Signal(Signal::Offer(answer)))
                            if answer.offer_id == offer.offer_id =>
                        {
                            break Some(answer);
                        }
                        Some(AgentInput::Direct(direct)) => {
                            self.pending_direct = Some(direct);
                            return Err("a direct link came up".into());
                        }
                        Some(AgentInput::Signal(_)) => {}
                        None => return Err("fabric stopped".into()),
                    },
                    () = tokio::time::sleep_until(resend) => break None,
                }
            };
            if let Some(answer) = got {
                break answer;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "the exit did not answer the link offer within {:?}",
                    self.config.answer_timeout
                ));
            }
        };
        if answer.candidates.is_empty() {
            return Err("the exit offers no punched path".into());
        }
        self.start(secret, identity, gathered, &answer, offer.offer_id)
    }

    /// Exit: gathers for `offer` and answers it; `None` for a repeated offer already answered.
    async fn answer(&mut self, offer: &LinkOffer) -> Result<Option<Round>, String> {
        let choice = self.config.choice;
        let udp =
            choice.wants_udp() && offer.candidates.iter().any(|c| c.protocol == Protocol::Udp);
        let tcp = choice.wants_tcp()
            && offer.tls_fingerprint.is_some()
            && offer.candidates.iter().any(|c| c.protocol == Protocol::Tcp);
        let secret = LinkSecret::from_random(rand::random());
        let (gathered, identity) = if udp || tcp {
            let gathered = gather(&self.config, udp, tcp)
                .await
                .map_err(|e| format!("gathering candidates failed: {e}"))?;
            let identity = if tcp { self.identity(&gathered)? } else { None };
            (Some(gathered), identity)
        } else {
            (None, None)
        };
        let answer = LinkOffer {
            offer_id: offer.offer_id,
            x25519_public: secret.public(),
            tls_fingerprint: identity.as_ref().map(TlsIdentity::fingerprint),
            candidates: gathered
                .as_ref()
                .map(|g| g.candidates.clone())
                .unwrap_or_default(),
        };
        self.send(&Signal::Offer(answer));
        if let Some(gathered) = &gathered {
            self.send_direct_candidates(gathered);
        }
        let Some(gathered) = gathered else {
            debug!(peer = %self.pk, %choice, "link offer answered without candidates");
            return Ok(None);
        };
        debug!(peer = %self.pk, "link offer answered");
        self.start(secret, identity, gathered, offer, offer.offer_id)
            .map(Some)
    }

    /// A TLS identity when TCP is wanted and a TCP port was gathered.
    fn identity(&self, gathered: &Gathered) -> Result<Option<TlsIdentity>, String> {
        if gathered.tcp.is_none() {
            return Ok(None);
        }
        TlsIdentity::generate()
            .map(Some)
            .map_err(|e| format!("making the tls identity failed: {e}"))
    }

    /// Derives the keys and starts punching towards the peer's candidates.
    fn start(
        &self,
        secret: LinkSecret,
        identity: Option<TlsIdentity>,
        gathered: Gathered,
        peer: &LinkOffer,
        offer_id: u64,
    ) -> Result<Round, String> {
        let keys = secret
            .derive(peer.x25519_public)
            .map_err(|e| format!("link key exchange failed: {e}"))?;
        let controlling = keys.controlling();
        // IPv6 candidates only for sockets that have IPv6 (both families on `[::]`).
        let udp_v6 = gathered
            .udp
            .as_ref()
            .and_then(|s| s.local_addr().ok())
            .is_some_and(|a| a.is_ipv6());
        let tcp_v6 = gathered.tcp.is_some_and(|a| a.is_ipv6());
        // Only addresses a peer elsewhere can have (B12): never our loopback, nor hosts of a
        // private network we are neither on nor have a route to.
        let filter = AddressFilter::new(gathered.networks.clone())
            .with_own(gathered.candidates.iter().map(|c| c.addr.ip()))
            .with_routes(gathered.routes.iter().copied());
        let remotes = |protocol, v6: bool| -> Vec<SocketAddr> {
            peer.candidates
                .iter()
                .filter(|c| c.protocol == protocol && (v6 || c.addr.is_ipv4()))
                .map(|c| c.addr)
                .filter(|&addr| match filter.check(addr) {
                    Ok(()) => true,
                    Err(why) => {
                        debug!(%addr, %why, "peer candidate refused");
                        false
                    }
                })
                .collect()
        };
        let udp_remotes = remotes(Protocol::Udp, udp_v6);
        let tcp_remotes = remotes(Protocol::Tcp, tcp_v6);
        let udp = match gathered.udp.clone() {
            Some(socket) if !udp_remotes.is_empty() => {
                let punch = UdpPunch::new(Instant::now(), keys, &udp_remotes, self.config.punch)
                    .with_filter(filter.clone());
                Some(UdpLink::spawn(socket, punch))
            }
            _ => None,
        };
        let tcp_plan = match (gathered.tcp, identity, peer.tls_fingerprint) {
            (Some(local), Some(identity), Some(fingerprint)) if !tcp_remotes.is_empty() => {
                Some(Arc::new(TcpPlan {
                    local,
                    remotes: tcp_remotes,
                    controlling,
                    identity,
                    fingerprint,
                    config: self.config.tcp,
                    _gathered: gathered,
                }))
            }
            _ => None,
        };
        let tcp_punch = tcp_plan.as_ref().map(TcpPlan::punch);
        if udp.is_none() && tcp_punch.is_none() {
            return Err("no candidate pair to punch".into());
        }
        Ok(Round {
            udp,
            udp_up: None,
            udp_lossy: false,
            tcp_punch,
            tcp: None,
            tcp_up: None,
            tcp_plan,
            tcp_was_up: false,
            tcp_up_at: None,
            tcp_repunch_at: None,
            tcp_gap: Duration::ZERO,
            offer_id,
            connected: false,
        })
    }

    /// Carries packets and events of one round's links until they are all gone.
    async fn run_round(&mut self, mut round: Round) -> RoundEnd {
        let mut why = String::from("punching");
        let mut batch = Vec::with_capacity(256);
        let mut figures = tokio::time::interval(FIGURES_EVERY);
        figures.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.fall_back("punching".into());
        loop {
            if round.udp.is_none() && round.tcp.is_none() && round.tcp_punch.is_none() {
                return RoundEnd::Ended {
                    connected: round.connected,
                    why,
                };
            }
            tokio::select! {
                n = next_batch(&mut round.udp, &mut batch) => {
                    // Zero events: the link task has ended.
                    let ended = (n == 0).then_some(None);
                    let events = batch.drain(..).map(Some).chain(ended);
                    for event in events {
                        if !self.on_udp_event(&mut round, &mut why, event) {
                            return RoundEnd::Stopped;
                        }
                    }
                    self.refresh_udp_figures(&mut round, &why);
                }
                // Keepalives move the figures while no data comes by UDP (the peer may
                // have moved its sending to TCP already).
                _ = figures.tick() => self.refresh_udp_figures(&mut round, &why),
                () = sleep_until_some(round.tcp_repunch_at) => {
                    round.tcp_repunch_at = None;
                    if round.wants_tcp_punch()
                        && let Some(plan) = &round.tcp_plan
                    {
                        debug!(peer = %self.pk, "punching tcp again");
                        round.tcp_punch = Some(plan.punch());
                    }
                }
                r = join(&mut round.tcp_punch) => {
                    round.tcp_punch = None;
                    match r {
                        Ok(stream) => {
                            let remote = stream.get_ref().0.peer_addr().ok().map(canonical);
                            info!(peer = %self.pk, ?remote, "punched tcp path up");
                            let punch = self.config.punch;
                            round.tcp = Some(TcpLink::spawn(
                                stream,
                                punch.keepalive_interval,
                                punch.dead_after,
                            ));
                            round.tcp_up = remote;
                            round.tcp_was_up = true;
                            round.tcp_up_at = Some(tokio::time::Instant::now());
                            round.connected = true;
                            self.choose(&round, &why);
                        }
                        Err(e) => {
                            debug!(peer = %self.pk, error = %e, "tcp punching failed");
                            if round.udp_up.is_none() {
                                why = format!("tcp punching failed: {e}");
                            }
                            round.tcp_gap =
                                next_tcp_gap(round.tcp_gap, None, self.config.retry_max);
                            round.schedule_tcp_punch();
                            self.choose(&round, &why);
                        }
                    }
                }
                e = next_tcp(&mut round.tcp) => match e {
                    Some(LinkEvent::Data(data)) => {
                        if !self.deliver(data) {
                            return RoundEnd::Stopped;
                        }
                    }
                    _ => {
                        info!(peer = %self.pk, "punched tcp path died");
                        round.tcp = None;
                        round.tcp_up = None;
                        let lived = round.tcp_up_at.take().map(|t| t.elapsed());
                        round.tcp_gap = next_tcp_gap(round.tcp_gap, lived, self.config.retry_max);
                        why = "the tcp link died".into();
                        // Within the round: waiting for it to end could take for ever while
                        // a UDP link answers some keepalives (review B3).
                        round.schedule_tcp_punch();
                        self.choose(&round, &why);
                    }
                },
                s = self.signals.recv() => match s {
                    None => return RoundEnd::Stopped,
                    Some(AgentInput::Direct(direct)) => return RoundEnd::Direct(direct),
                    Some(AgentInput::Signal(Signal::Offer(offer))) if offer.offer_id != round.offer_id => {
                        return RoundEnd::Replaced(offer);
                    }
                    Some(AgentInput::Signal(Signal::Candidates { offer_id, candidates }))
                        if offer_id == round.offer_id =>
                    {
                        if let Some(udp) = &round.udp {
                            for c in candidates.iter().filter(|c| c.protocol == Protocol::Udp) {
                                let _ = udp.add_remote(c.addr).await;
                            }
                        }
                    }
                    Some(_) => {}
                },
            }
        }
    }

    /// Puts the UDP link's round trip and loss in the status and lets a link that became
    /// lossy (or recovered) give way to (or take over from) the TCP link.
    fn refresh_udp_figures(&self, round: &mut Round, why: &str) {
        let (Some(link), Some(_)) = (&round.udp, round.udp_up) else {
            return;
        };
        // The link's figures first: never hold the status while taking the link's lock.
        let (rtt, loss) = (link.rtt(), link.loss());
        {
            let mut status = lock(&self.status);
            status.link.rtt = rtt;
            status.link.loss = loss;
        }
        let lossy = match loss {
            Some(l) if l >= UDP_LOSS_FOR_TCP => true,
            Some(l) if l <= UDP_LOSS_BACK => false,
            _ => round.udp_lossy,
        };
        if lossy != round.udp_lossy {
            round.udp_lossy = lossy;
            round.schedule_tcp_punch();
            self.choose(round, why);
        }
    }

    /// Handles one event of the round's UDP link (`None`: its task ended); `false` once the
    /// fabric is gone.
    fn on_udp_event(&self, round: &mut Round, why: &mut String, event: Option<LinkEvent>) -> bool {
        match event {
            Some(LinkEvent::Data(data)) => return self.deliver(data),
            Some(LinkEvent::Connected { remote }) => {
                info!(peer = %self.pk, %remote, "punched udp path up");
                round.udp_up = Some(remote);
                round.connected = true;
            }
            Some(LinkEvent::Failed) | None if round.udp_up.is_none() => {
                round.udp = None;
                *why = "udp punching found no pair".into();
            }
            Some(LinkEvent::Failed | LinkEvent::Dead) | None => {
                info!(peer = %self.pk, "punched udp path died");
                round.udp = None;
                round.udp_up = None;
                *why = "the udp link died".into();
            }
        }
        self.choose(round, why);
        true
    }

    /// Points the session at the best path this round has up.
    /// `why` is the latest thing that went wrong (or "punching"); the status says why the
    /// chosen path is the one in use.
    fn choose(&self, round: &Round, why: &str) {
        let choice = self.config.choice;
        let udp = round.udp.as_ref().zip(round.udp_up);
        let tcp = round.tcp.as_ref();
        let picked = pick(choice, udp.is_some(), round.udp_lossy, tcp.is_some());
        let (carrier, active, remote, why) = match (picked, udp, tcp) {
            (Pick::Udp { tox_copies }, Some((link, remote)), _) => (
                Carrier::Udp(Punched::new(link.sender(), tox_copies, choice.allows_tox())),
                ActivePath::Udp,
                Some(remote),
                match (tox_copies, round.offer_id == DIRECT_ROUND) {
                    (true, _) => {
                        "direct udp link up (it loses half its keepalives: tox carries copies)"
                            .to_owned()
                    }
                    (false, true) => "direct udp link up (resumed at a cached endpoint)".to_owned(),
                    (false, false) => "direct udp link up".to_owned(),
                },
            ),
            (Pick::Tcp { udp_yields }, _, Some(link)) => {
                let udp = match &round.udp {
                    Some(_) if udp_yields => "the udp link loses half its keepalives",
                    Some(_) => "udp still punching",
                    None if choice.wants_udp() => why,
                    None => "udp not wanted",
                };
                (
                    Carrier::Tcp(Punched::new(link.sender(), false, choice.allows_tox())),
                    ActivePath::Tcp,
                    round.tcp_up,
                    format!("direct tcp link up ({udp})"),
                )
            }
            _ => {
                self.fall_back(why.to_owned());
                return;
            }
        };
        self.carrier.send_replace(carrier);
        self.set_status(active, remote, why);
    }

    /// Tells the peer where our direct socket may be reached, with the addresses just
    /// gathered: it probes them, and both sides remember what answers for the next start.
    fn send_direct_candidates(&self, gathered: &Gathered) {
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        let Some(direct) = shared.direct.clone() else {
            return;
        };
        let candidates = direct.candidates(&gathered.candidates);
        if !candidates.is_empty() {
            self.send(&Signal::Direct { candidates });
        }
        // What the peer sent before we knew our own addresses may pass the filter now.
        shared.reprobe(self.pk);
    }

    /// Falls back to Tox (or holds, when Tox is not allowed).
    fn fall_back(&self, why: String) {
        let carrier = initial_carrier(self.config.choice);
        let active = match carrier {
            Carrier::Held => ActivePath::Held,
            _ => ActivePath::Tox,
        };
        self.carrier.send_replace(carrier);
        self.set_status(active, None, why);
    }

    fn set_status(&self, active: ActivePath, remote: Option<SocketAddr>, why: String) {
        lock(&self.status).link = PathStatus {
            active,
            remote,
            rtt: None,
            loss: None,
            why,
        };
    }

    /// Hands a packet from a punched link to the peer's session; `false` once the fabric is
    /// gone.
    fn deliver(&self, data: Vec<u8>) -> bool {
        let Some(shared) = self.shared.upgrade() else {
            return false;
        };
        shared.handle_session_packet(self.pk, Bytes::from(data), Via::Link);
        true
    }

    /// Sends a signal over Tox without blocking the agent.
    fn send(&self, signal: &Signal) {
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        let mut body = Vec::new();
        if let Err(error) = signal.emit(&mut body) {
            debug!(%error, "signal not sent");
            return;
        }
        let mut packet = BytesMut::with_capacity(1 + body.len());
        packet.put_u8(SIGNAL_PACKET_ID);
        packet.extend_from_slice(&body);
        let tox = shared.tox.clone();
        let pk = self.pk;
        tokio::spawn(async move {
            if let Err(error) = tox.send_lossless(pk, packet.freeze()).await {
                debug!(peer = %pk, %error, "link signal not sent");
            }
        });
    }
}

/// What a round's links make the session send on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pick {
    /// The punched UDP link; with `tox_copies`, Tox carries every packet too.
    Udp { tox_copies: bool },
    /// The punched TCP link; `udp_yields` when a lossy UDP link is up beside it.
    Tcp { udp_yields: bool },
    /// Tox (or hold, under a forced punched path).
    Fallback,
}

/// The path for a round's state: punched UDP, then punched TCP, then Tox. A UDP link that
/// loses half its keepalive round trips (UDP throttled on the way; KCP copes with random loss
/// far below that) yields to a TCP link; with none, it keeps carrying packets but Tox carries
/// copies of them (review B3: a lossy link alone used to be kept for ever), unless the choice
/// forbids Tox.
fn pick(choice: PathChoice, udp_up: bool, udp_lossy: bool, tcp_up: bool) -> Pick {
    let udp = udp_up && choice.wants_udp();
    let tcp = tcp_up && choice.wants_tcp();
    match (udp, tcp) {
        (true, true) if udp_lossy => Pick::Tcp { udp_yields: true },
        (true, _) => Pick::Udp {
            tox_copies: udp_lossy && choice.allows_tox(),
        },
        (false, true) => Pick::Tcp { udp_yields: false },
        (false, false) => Pick::Fallback,
    }
}

/// Events of the round's UDP link, a burst at a time (pending while there is no link).
async fn next_batch(link: &mut Option<UdpLink>, out: &mut Vec<LinkEvent>) -> usize {
    match link {
        Some(l) => l.next_events(out, 256).await,
        None => std::future::pending().await,
    }
}

/// Resolves at `at`; never without one.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn next_tcp(link: &mut Option<TcpLink>) -> Option<LinkEvent> {
    match link {
        Some(l) => l.next_event().await,
        None => std::future::pending().await,
    }
}

async fn join(
    task: &mut Option<JoinHandle<Result<TlsStream<tokio::net::TcpStream>, TcpPunchError>>>,
) -> Result<TlsStream<tokio::net::TcpStream>, String> {
    match task {
        Some(t) => match t.await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(format!("tcp punch task: {e}")),
        },
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lossy_udp_link_yields_to_tcp_or_gets_tox_copies_never_kept_alone() {
        use PathChoice::{Auto, Tcp, Udp};
        let copies = |tox_copies| Pick::Udp { tox_copies };
        // Healthy UDP first; a lossy one yields to TCP.
        assert_eq!(pick(Auto, true, false, true), copies(false));
        assert_eq!(pick(Auto, true, true, true), Pick::Tcp { udp_yields: true });
        // Review B3: lossy UDP and no TCP link used to stay the only path.
        assert_eq!(pick(Auto, true, true, false), copies(true));
        // `--path udp` forbids Tox: the lossy link is all there is.
        assert_eq!(pick(Udp, true, true, false), copies(false));
        assert_eq!(pick(Udp, true, true, true), copies(false));
        assert_eq!(
            pick(Auto, false, false, true),
            Pick::Tcp { udp_yields: false }
        );
        assert_eq!(
            pick(Tcp, true, false, true),
            Pick::Tcp { udp_yields: false }
        );
        assert_eq!(pick(Tcp, true, false, false), Pick::Fallback);
        assert_eq!(pick(Auto, false, false, false), Pick::Fallback);
    }

    #[test]
    fn tcp_is_punched_again_at_once_after_a_healthy_link_and_backs_off_otherwise() {
        let max = Duration::from_secs(120);
        let secs = Duration::from_secs;
        assert_eq!(next_tcp_gap(secs(8), Some(secs(60)), max), Duration::ZERO);
        // Failed punches and links that die young: 1 s, 2 s, 4 s ... up to the maximum.
        assert_eq!(next_tcp_gap(Duration::ZERO, None, max), secs(1));
        assert_eq!(next_tcp_gap(secs(1), Some(secs(2)), max), secs(2));
        assert_eq!(next_tcp_gap(secs(2), None, max), secs(4));
        assert_eq!(next_tcp_gap(secs(100), None, max), max);
    }

    #[test]
    fn a_full_link_hands_its_packet_to_tox_and_a_lossy_one_gets_copies() {
        let link = Punched::new((), false, true);
        assert!(link.settle(Ok(()), false), "healthy: the link alone");
        assert!(
            !link.settle(Err(LinkSendError::Full), false),
            "full: by Tox"
        );
        assert!(
            !link.settle(Err(LinkSendError::Closed), false),
            "closed: by Tox"
        );
        // The caller already sent a Tox copy: never a second one.
        assert!(link.settle(Err(LinkSendError::Full), true));
        assert!(link.settle(Ok(()), true));
        // Tox copies of everything (lossy UDP, nothing better).
        let lossy = Punched::new((), true, true);
        assert!(!lossy.settle(Ok(()), false));
        assert!(lossy.settle(Ok(()), true));
        // No Tox allowed: a full link drops the packet (KCP resends), Tox gets nothing.
        let forced = Punched::new((), true, false);
        assert!(forced.settle(Err(LinkSendError::Full), false));
        assert!(forced.settle(Ok(()), false));
    }

    /// Review B10: the session driver awaited up to 250 ms per packet on a full link.
    #[tokio::test(start_paused = true)]
    async fn sending_on_a_full_tcp_link_never_waits() {
        // Nobody reads the other end: the link's queue fills and stays full.
        let (ours, _theirs) = tokio::io::duplex(1024);
        let link = TcpLink::spawn(ours, Duration::from_secs(1), Duration::from_secs(60));
        let sender = link.sender();
        while sender.try_send([7u8; 100]).is_ok() {}
        let carrier = Carrier::Tcp(Punched::new(sender, false, true));
        let mut send = Box::pin(carrier.send(&[7u8; 100], false));
        let sent = std::future::poll_fn(|cx| std::task::Poll::Ready(send.as_mut().poll(cx))).await;
        assert_eq!(sent, std::task::Poll::Ready(false), "by Tox, at once");
    }

    #[test]
    fn a_silent_link_is_suspected_only_while_acknowledgements_are_owed_or_the_peer_left() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut w = LinkWatch::new(t0);
        let silent = suspect_after(None);
        // Fresh: never suspect, whatever is owed.
        assert!(!w.suspect(ms(500), silent, || true));
        // Silent for over a second: suspect only while segments wait.
        assert!(w.suspect(ms(1200), silent, || true));
        assert!(!w.suspect(ms(1200), silent, || false));
        // The link speaks: trusted again.
        w.on_input(ms(1300), Via::Link);
        assert!(!w.suspect(ms(1400), silent, || true));
        // The peer sends by Tox while our link is silent: answer on Tox too, even with
        // nothing owed (our acknowledgements must reach it), for two seconds.
        w.on_input(ms(2500), Via::Tox);
        assert!(w.suspect(ms(2600), silent, || false));
        assert!(!w.suspect(ms(4600), silent, || false));
        // A new punched carrier starts with a grace period.
        w.on_carrier(ms(5000), true);
        assert!(!w.suspect(ms(5500), silent, || true));
    }

    #[test]
    fn a_link_is_suspected_after_four_round_trips_of_silence_within_bounds() {
        let ms = Duration::from_millis;
        assert_eq!(suspect_after(None), ms(1000));
        assert_eq!(suspect_after(Some(ms(1))), ms(200));
        assert_eq!(suspect_after(Some(ms(80))), ms(320));
        assert_eq!(suspect_after(Some(ms(600))), ms(1000));
    }
}
