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
//! punched UDP, then punched TCP, then Tox. KCP takes packets from any path, so the two sides
//! need not switch at the same instant.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_rustls::TlsStream;
use tracing::{debug, info};

use super::{PeerStatus, SIGNAL_PACKET_ID, Shared, lock};
use crate::id::PublicKey;
use crate::link::LinkSecret;
use crate::link::signal::{LinkOffer, Protocol, Signal};
use crate::path::tcp::{TcpLink, TcpLinkSender};
use crate::path::{ActivePath, Gathered, PathChoice, PathConfig, PathStatus, gather};
use crate::punch::driver::{LinkEvent, UdpLink, UdpLinkSender};
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
    Udp(UdpLinkSender),
    /// A punched TCP link.
    Tcp(TcpLinkSender),
}

/// The carrier a session starts on under `choice`.
pub(super) fn initial_carrier(choice: PathChoice) -> Carrier {
    if choice.allows_tox() {
        Carrier::Tox
    } else {
        Carrier::Held
    }
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
    shared: Weak<Shared>,
    pk: PublicKey,
    config: PathConfig,
    signals: mpsc::Receiver<Signal>,
    carrier: watch::Sender<Carrier>,
    status: Arc<Mutex<PeerStatus>>,
}

/// How a round of links ended.
enum RoundEnd {
    /// Every link is gone; `connected` says whether one was ever up.
    Ended { connected: bool, why: String },
    /// The client sent a new offer (exit side).
    Replaced(LinkOffer),
    /// The fabric or the peer is gone.
    Stopped,
}

/// The links of one offer exchange.
struct Round {
    udp: Option<UdpLink>,
    udp_up: Option<SocketAddr>,
    tcp_punch: Option<JoinHandle<Result<TlsStream<tokio::net::TcpStream>, TcpPunchError>>>,
    tcp: Option<TcpLink>,
    tcp_up: Option<SocketAddr>,
    offer_id: u64,
    connected: bool,
}

impl Drop for Round {
    fn drop(&mut self) {
        if let Some(t) = &self.tcp_punch {
            t.abort();
        }
    }
}

impl Agent {
    pub(super) fn new(
        shared: Weak<Shared>,
        pk: PublicKey,
        config: PathConfig,
        signals: mpsc::Receiver<Signal>,
        carrier: watch::Sender<Carrier>,
        status: Arc<Mutex<PeerStatus>>,
    ) -> Self {
        Self {
            shared,
            pk,
            config,
            signals,
            carrier,
            status,
        }
    }

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
            let end = match self.offer().await {
                Ok(round) => self.run_round(round).await,
                Err(why) => RoundEnd::Ended {
                    connected: false,
                    why,
                },
            };
            match end {
                RoundEnd::Stopped => return,
                RoundEnd::Replaced(_) => {}
                RoundEnd::Ended { connected, why } => {
                    if connected {
                        backoff = self.config.retry_min;
                    }
                    self.fall_back(format!("{why}; punching again in {backoff:?}"));
                    debug!(peer = %self.pk, %why, ?backoff, %choice, "no punched path");
                }
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
        loop {
            let mut offer = match next.take() {
                Some(offer) => offer,
                None => loop {
                    match self.signals.recv().await {
                        Some(Signal::Offer(offer)) => break offer,
                        Some(Signal::Candidates { .. }) => {}
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
                            Some(Signal::Offer(newer)) => offer = newer,
                            Some(Signal::Candidates { .. }) => {}
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
                s = self.signals.recv() => if s.is_none() { return false },
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
        let deadline = tokio::time::Instant::now() + self.config.answer_timeout;
        let answer = loop {
            self.send(&Signal::Offer(offer.clone()));
            let resend = (tokio::time::Instant::now() + Duration::from_secs(5)).min(deadline);
            let got = loop {
                tokio::select! {
                    s = self.signals.recv() => match s {
                        Some(Signal::Offer(answer)) if answer.offer_id == offer.offer_id => {
                            break Some(answer);
                        }
                        Some(_) => {}
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
        let remotes = |protocol| -> Vec<SocketAddr> {
            peer.candidates
                .iter()
                .filter(|c| c.protocol == protocol)
                .map(|c| c.addr)
                .collect()
        };
        let udp_remotes = remotes(Protocol::Udp);
        let tcp_remotes = remotes(Protocol::Tcp);
        let udp = match gathered.udp.clone() {
            Some(socket) if !udp_remotes.is_empty() => {
                let punch = UdpPunch::new(Instant::now(), keys, &udp_remotes, self.config.punch);
                Some(UdpLink::spawn(socket, punch))
            }
            _ => None,
        };
        let tcp_punch = match (gathered.tcp, identity, peer.tls_fingerprint) {
            (Some(local), Some(identity), Some(fingerprint)) if !tcp_remotes.is_empty() => {
                let config = self.config.tcp;
                Some(tokio::spawn(async move {
                    // `gathered` holds the port until this binds it again.
                    let _hold = gathered;
                    punch_tcp(
                        local,
                        &tcp_remotes,
                        controlling,
                        &identity,
                        fingerprint,
                        config,
                    )
                    .await
                }))
            }
            _ => None,
        };
        if udp.is_none() && tcp_punch.is_none() {
            return Err("no candidate pair to punch".into());
        }
        Ok(Round {
            udp,
            udp_up: None,
            tcp_punch,
            tcp: None,
            tcp_up: None,
            offer_id,
            connected: false,
        })
    }

    /// Carries packets and events of one round's links until they are all gone.
    async fn run_round(&mut self, mut round: Round) -> RoundEnd {
        let mut why = String::from("punching");
        self.fall_back("punching".into());
        loop {
            if round.udp.is_none() && round.tcp.is_none() && round.tcp_punch.is_none() {
                return RoundEnd::Ended {
                    connected: round.connected,
                    why,
                };
            }
            tokio::select! {
                e = next(&mut round.udp) => match e {
                    Some(LinkEvent::Data(data)) => {
                        if !self.deliver(data) {
                            return RoundEnd::Stopped;
                        }
                    }
                    Some(LinkEvent::Connected { remote }) => {
                        info!(peer = %self.pk, %remote, "punched udp path up");
                        round.udp_up = Some(remote);
                        round.connected = true;
                        self.choose(&round, &why);
                    }
                    Some(LinkEvent::Failed) | None if round.udp_up.is_none() => {
                        round.udp = None;
                        why = "udp punching found no pair".into();
                        self.choose(&round, &why);
                    }
                    Some(LinkEvent::Failed | LinkEvent::Dead) | None => {
                        info!(peer = %self.pk, "punched udp path died");
                        round.udp = None;
                        round.udp_up = None;
                        why = "the udp link died".into();
                        self.choose(&round, &why);
                    }
                },
                r = join(&mut round.tcp_punch) => {
                    round.tcp_punch = None;
                    match r {
                        Ok(stream) => {
                            let remote = stream.get_ref().0.peer_addr().ok();
                            info!(peer = %self.pk, ?remote, "punched tcp path up");
                            let punch = self.config.punch;
                            round.tcp = Some(TcpLink::spawn(
                                stream,
                                punch.keepalive_interval,
                                punch.dead_after,
                            ));
                            round.tcp_up = remote;
                            round.connected = true;
                            self.choose(&round, &why);
                        }
                        Err(e) => {
                            debug!(peer = %self.pk, error = %e, "tcp punching failed");
                            if round.udp_up.is_none() {
                                why = format!("tcp punching failed: {e}");
                            }
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
                        why = "the tcp link died".into();
                        self.choose(&round, &why);
                    }
                },
                s = self.signals.recv() => match s {
                    None => return RoundEnd::Stopped,
                    Some(Signal::Offer(offer)) if offer.offer_id != round.offer_id => {
                        return RoundEnd::Replaced(offer);
                    }
                    Some(Signal::Candidates { offer_id, candidates }) if offer_id == round.offer_id => {
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

    /// Points the session at the best path this round has up.
    /// `why` is the latest thing that went wrong (or "punching"); the status says why the
    /// chosen path is the one in use.
    fn choose(&self, round: &Round, why: &str) {
        let choice = self.config.choice;
        let (carrier, active, remote, why) = match (&round.udp, round.udp_up, &round.tcp) {
            (Some(link), Some(remote), _) if choice.wants_udp() => (
                Carrier::Udp(link.sender()),
                ActivePath::Udp,
                Some(remote),
                "direct udp link up".to_owned(),
            ),
            (udp, _, Some(link)) if choice.wants_tcp() => {
                let udp = match udp {
                    Some(_) => "udp still punching",
                    None if choice.wants_udp() => why,
                    None => "udp not wanted",
                };
                (
                    Carrier::Tcp(link.sender()),
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
            why,
        };
    }

    /// Hands a packet from a punched link to the peer's session; `false` once the fabric is
    /// gone.
    fn deliver(&self, data: Vec<u8>) -> bool {
        let Some(shared) = self.shared.upgrade() else {
            return false;
        };
        shared.handle_session_packet(self.pk, Bytes::from(data));
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

async fn next(link: &mut Option<UdpLink>) -> Option<LinkEvent> {
    match link {
        Some(l) => l.next_event().await,
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
