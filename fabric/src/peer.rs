//! Peers over Tox: a client dials an exit by its Tox ID, an exit accepts the clients it
//! allows, and each pair runs one KCP session carrying the mux.
//!
//! ```text
//!  Tox events ─► router task ─┬─ lossy 200 ──► session driver (one per peer) ─► mux streams
//!                             └─ lossless 170 (control: open / accept / reject / close)
//!  session driver ─► Session::poll_transmit ─► lossy packet 200 ─► Tox thread
//! ```
//!
//! Session packets travel in Tox lossy custom packets (id byte 200, then the session packet,
//! at most 1,373 bytes in all); control messages in lossless ones (id byte 170, then the
//! message). The client asks for a session, the exit assigns its conv (seed 000).
//!
//! Beside the streams, each session carries unreliable datagrams
//! ([`Fabric::send_datagram`], [`Fabric::recv_datagram`]): what UDP flows ride on.
//!
//! Paths: right after a session starts, the client's path agent ([`paths`]) offers its
//! candidates over Tox (lossless id 171); both sides punch UDP and TCP links and the session's
//! packets move onto a punched link while it lives, and back to Tox when it dies (see
//! [`crate::path`]). The session takes its packets from any path, so streams never notice.
//!
//! Reconnection: a session survives its peer going offline for less than the idle timeout
//! (KCP retransmits once packets flow again). When the exit comes back, the client asks to
//! resume its conv; an exit that still has the session keeps it, an exit that restarted
//! assigns a fresh one and the client starts over. An exit that receives packets for a
//! session it does not know says so at once, so a client notices a restarted exit in a
//! round trip rather than after the idle timeout.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use bytes::{BufMut, Bytes, BytesMut};
use thiserror::Error;
use tokio::sync::{mpsc, watch};
use tracing::{Instrument as _, debug, info, warn};

use self::paths::{Agent, Carrier, LinkWatch, Role, Via};
use crate::connection::{feed, mux_config_for};
use crate::id::{PublicKey, ToxId};
use crate::link::signal::Signal;
use crate::mux::io::{Handle, Stream};
use crate::mux::{self, SharedBudget};
use crate::path::{PathChoice, PathConfig, PathStatus};
use crate::session::control::{Acceptor, OpenOutcome, Opener};
use crate::session::{self, CloseReason, Control, ConvId, Event, Session};
use crate::time::{Duration, Instant};
use crate::tox::{Connection, FriendPolicy, ToxConfig, ToxError, ToxEvent, ToxHandle, ToxNode};

/// First byte of a lossy Tox packet carrying a session packet.
pub const SESSION_PACKET_ID: u8 = 200;
/// First byte of a lossless Tox packet carrying a control message.
pub const CONTROL_PACKET_ID: u8 = 170;
/// First byte of a lossless Tox packet carrying a punched-link signal.
pub const SIGNAL_PACKET_ID: u8 = 171;

mod paths;

/// How a [`Fabric`] runs.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct FabricConfig {
    /// The Tox node; its `allow` policy also decides which clients may open sessions here.
    pub tox: ToxConfig,
    /// Session settings (the MTU must fit a Tox custom packet: 1,372 is the default).
    pub session: session::Config,
    /// How long [`Fabric::connect`] waits for the exit to come online and answer.
    pub connect_timeout: Duration,
    /// Punched paths: which to use and how to make them.
    pub path: PathConfig,
    /// Receive credit granted to peers over all sessions together (default
    /// [`NODE_BUDGET`](crate::connection::NODE_BUDGET)).
    pub mux_budget: usize,
}

impl FabricConfig {
    /// Defaults around a Tox configuration.
    pub fn new(tox: ToxConfig) -> Self {
        Self {
            tox,
            session: session::Config::default(),
            connect_timeout: Duration::from_secs(60),
            path: PathConfig::default(),
            mux_budget: crate::connection::NODE_BUDGET,
        }
    }
}

/// Why a connection to an exit failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The Tox node failed.
    #[error("tox: {0}")]
    Tox(#[from] ToxError),
    /// The exit did not come online, or did not answer, in time.
    #[error("the exit did not answer within {0:?}")]
    TimedOut(Duration),
    /// The exit refused.
    #[error("the exit refused the session: {0}")]
    Rejected(CloseReason),
    /// The fabric is shutting down.
    #[error("the fabric is shutting down")]
    Shutdown,
}

/// A stream opened by a peer, as the exit sees it.
#[derive(Debug)]
pub struct Incoming {
    /// Who opened it.
    pub peer: PublicKey,
    /// The stream.
    pub stream: Stream,
}

/// Counters of one peer's session, for status output.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct PeerStatus {
    /// The conv of the running session, if any.
    pub conv: Option<ConvId>,
    /// Whether Tox sees the peer online.
    pub online: bool,
    /// How Tox reaches the peer: direct UDP, a TCP relay, or not at all.
    pub path: Connection,
    /// Which path carries the session (Tox or a punched link), and why.
    pub link: PathStatus,
    /// The session's counters.
    pub session: session::Stats,
    /// The streams' counters.
    pub mux: mux::Stats,
    /// Lossy packets the Tox node's queue refused.
    pub dropped_packets: u64,
    /// Why the last session to this peer ended, and whether the peer ended it.
    pub last_end: Option<(CloseReason, bool)>,
}

/// The fabric: a Tox node and the sessions to its peers.
#[derive(Debug)]
pub struct Fabric {
    shared: Arc<Shared>,
    incoming: tokio::sync::Mutex<mpsc::Receiver<Incoming>>,
    datagrams: tokio::sync::Mutex<mpsc::Receiver<(PublicKey, Vec<u8>)>>,
}

#[derive(Debug)]
struct Shared {
    tox: ToxHandle,
    config: FabricConfig,
    allow: FriendPolicy,
    routes: Mutex<HashMap<PublicKey, Slot>>,
    incoming: mpsc::Sender<Incoming>,
    epoch: Instant,
    requests: Mutex<u32>,
    datagrams: mpsc::Sender<(PublicKey, Vec<u8>)>,
    /// Counts every session that came up or ended, so waiters learn of both without polling.
    sessions: watch::Sender<u64>,
    /// What every session's mux draws its receive credit from.
    mux_budget: SharedBudget,
}

/// Everything known about one peer.
#[derive(Debug)]
struct Slot {
    online: watch::Sender<bool>,
    session: Option<Running>,
    /// A client's open in progress waits for the answer here.
    opener: Option<mpsc::Sender<Control>>,
    /// The exit's conv assignment for this client.
    acceptor: Option<Acceptor>,
    /// When an "unknown session" close was last sent, to answer a stream of stale packets once
    /// a second, not once a packet.
    last_unknown: Option<Instant>,
    status: Arc<Mutex<PeerStatus>>,
    /// What the session sends on; the path agent changes it.
    carrier: watch::Sender<Carrier>,
    /// The path agent's signal inbox, once it runs.
    paths: Option<mpsc::Sender<Signal>>,
}

#[derive(Debug)]
struct Running {
    conv: ConvId,
    input: mpsc::Sender<Input>,
    handle: Handle,
    ended: watch::Receiver<bool>,
}

#[derive(Debug)]
enum Input {
    /// A session packet, and the kind of path it came by.
    Packet(Bytes, Via),
    PeerClose(CloseReason),
    /// A datagram to send.
    Datagram(Vec<u8>),
}

impl Slot {
    fn new(choice: PathChoice) -> Self {
        Self {
            carrier: watch::channel(paths::initial_carrier(choice)).0,
            paths: None,
            online: watch::channel(false).0,
            session: None,
            opener: None,
            acceptor: None,
            last_unknown: None,
            status: Arc::default(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Fabric {
    /// Starts the Tox node and the router. Must be called inside a tokio runtime.
    pub fn start(config: FabricConfig) -> Result<Self, ToxError> {
        let allow = config.tox.allow.clone();
        let (tox, events) = ToxNode::spawn(config.tox.clone())?;
        let (incoming_tx, incoming_rx) = mpsc::channel(1024);
        let (datagrams_tx, datagrams_rx) = mpsc::channel(DATAGRAM_QUEUE);
        let mux_budget = SharedBudget::new(config.mux_budget);
        let shared = Arc::new(Shared {
            tox,
            config,
            mux_budget,
            allow,
            routes: Mutex::new(HashMap::new()),
            incoming: incoming_tx,
            epoch: Instant::now(),
            requests: Mutex::new(0),
            datagrams: datagrams_tx,
            sessions: watch::channel(0).0,
        });
        tokio::spawn(route(Arc::downgrade(&shared), events));
        Ok(Self {
            shared,
            incoming: tokio::sync::Mutex::new(incoming_rx),
            datagrams: tokio::sync::Mutex::new(datagrams_rx),
        })
    }

    /// Changes whenever a session to any peer comes up or ends: subscribe, then check
    /// [`Peer::is_connected`], then wait for a change (no change can be missed in between).
    pub fn session_changes(&self) -> watch::Receiver<u64> {
        self.shared.sessions.subscribe()
    }

    /// This node's Tox ID.
    pub fn id(&self) -> ToxId {
        self.shared.tox.id()
    }

    /// The Tox node, for status and tests.
    pub fn tox(&self) -> &ToxHandle {
        &self.shared.tox
    }

    /// Dials the exit `exit`: befriends it, waits for it to come online, asks for a session.
    /// The returned [`Peer`] keeps the session up (reconnecting by itself) until dropped.
    pub async fn connect(&self, exit: ToxId) -> Result<Peer, ConnectError> {
        let pk = exit.public_key();
        if let Err(error) = self.shared.tox.add_friend(exit, b"proxy session").await {
            // Already a friend (saved from an earlier run) is the common case.
            debug!(%error, "friend request not sent");
        }
        let status = self.shared.slot_status(pk);
        let conv = establish(&self.shared, pk, None).await?;
        info!(exit = %pk, %conv, "session to exit established");
        let (stop_tx, stop_rx) = watch::channel(false);
        self.shared
            .start_paths(pk, Role::Client, Some(stop_tx.subscribe()));
        tokio::spawn(supervise(Arc::downgrade(&self.shared), pk, stop_rx));
        Ok(Peer {
            shared: self.shared.clone(),
            pk,
            status,
            _stop: stop_tx,
        })
    }

    /// The next stream a client opened to this node (exit role). `None` once the fabric is
    /// shutting down.
    pub async fn accept(&self) -> Option<Incoming> {
        self.incoming.lock().await.recv().await
    }

    /// The next datagram a peer sent: who sent it and its payload. `None` once the fabric is
    /// shutting down.
    pub async fn recv_datagram(&self) -> Option<(PublicKey, Vec<u8>)> {
        self.datagrams.lock().await.recv().await
    }

    /// Sends an unreliable datagram to `peer` on its session. Like UDP, it may be lost; it is
    /// dropped (and counted) when the session's queue is full.
    pub fn send_datagram(&self, peer: PublicKey, payload: Vec<u8>) -> Result<(), DatagramError> {
        self.shared.send_datagram(peer, payload)
    }

    /// The largest payload [`Fabric::send_datagram`] takes.
    pub fn max_datagram(&self) -> usize {
        self.shared.config.session.max_datagram()
    }

    /// Status of every peer with a session or a slot.
    pub fn peers(&self) -> Vec<(PublicKey, PeerStatus)> {
        let routes = lock(&self.shared.routes);
        routes
            .iter()
            .map(|(pk, slot)| (*pk, lock(&slot.status).clone()))
            .collect()
    }

    /// Closes every session (telling the peers) and stops the Tox node.
    pub async fn shutdown(&self) {
        let running: Vec<(PublicKey, ConvId, mpsc::Sender<Input>)> = lock(&self.shared.routes)
            .iter_mut()
            .filter_map(|(pk, slot)| slot.session.take().map(|r| (*pk, r.conv, r.input)))
            .collect();
        for (pk, conv, input) in running {
            // Told before the node stops (the Tox thread sends a lossless packet as it takes
            // it), so the peer ends its side at once instead of at its answer timeout.
            let close = Control::Close {
                conv,
                reason: CloseReason::Shutdown,
            };
            let told = tokio::time::timeout(
                Duration::from_secs(1),
                self.shared.send_control_now(pk, close),
            )
            .await;
            if !matches!(told, Ok(Ok(()))) {
                debug!(peer = %pk, %conv, "could not tell the peer of the shutdown");
            }
            let _ = input.try_send(Input::PeerClose(CloseReason::Shutdown));
        }
        self.shared.tox.shutdown().await;
    }
}

/// A client's link to one exit: open streams on it.
#[derive(Debug)]
pub struct Peer {
    shared: Arc<Shared>,
    pk: PublicKey,
    status: Arc<Mutex<PeerStatus>>,
    /// Dropping the peer stops its supervisor.
    _stop: watch::Sender<bool>,
}

impl Peer {
    /// The exit's public key.
    pub fn public_key(&self) -> PublicKey {
        self.pk
    }

    /// Opens a stream to the exit. Fails while the session is down (the supervisor is
    /// reconnecting); the first bytes written travel with the stream's SYN.
    pub fn open(&self) -> io::Result<Stream> {
        let handle = lock(&self.shared.routes)
            .get(&self.pk)
            .and_then(|slot| slot.session.as_ref().map(|r| r.handle.clone()));
        match handle {
            Some(h) => Ok(h.open()?),
            None => Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "no session to the exit (reconnecting)",
            )),
        }
    }

    /// Whether a session to the exit is up.
    pub fn is_connected(&self) -> bool {
        lock(&self.shared.routes)
            .get(&self.pk)
            .is_some_and(|slot| slot.session.is_some())
    }

    /// The session's state and counters.
    pub fn status(&self) -> PeerStatus {
        lock(&self.status).clone()
    }

    /// Sends an unreliable datagram to the exit (see [`Fabric::send_datagram`]); what the
    /// exit sends back arrives through [`Fabric::recv_datagram`].
    pub fn send_datagram(&self, payload: Vec<u8>) -> Result<(), DatagramError> {
        self.shared.send_datagram(self.pk, payload)
    }

    /// The largest payload [`Peer::send_datagram`] takes.
    pub fn max_datagram(&self) -> usize {
        self.shared.config.session.max_datagram()
    }
}

/// Why a datagram was not sent.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum DatagramError {
    /// No session to the peer (not connected yet, or reconnecting).
    #[error("no session to the peer")]
    NoSession,
    /// Larger than a session datagram can be.
    #[error("datagram of {len} bytes (at most {max})")]
    TooLarge {
        /// Its length.
        len: usize,
        /// The largest that fits.
        max: usize,
    },
}

/// Received datagrams waiting for the application; more are dropped, as UDP would.
const DATAGRAM_QUEUE: usize = 4096;

impl Shared {
    fn send_datagram(&self, pk: PublicKey, payload: Vec<u8>) -> Result<(), DatagramError> {
        let max = self.config.session.max_datagram();
        if payload.len() > max {
            return Err(DatagramError::TooLarge {
                len: payload.len(),
                max,
            });
        }
        let input = lock(&self.routes)
            .get(&pk)
            .and_then(|slot| slot.session.as_ref().map(|r| r.input.clone()))
            .ok_or(DatagramError::NoSession)?;
        // A full queue drops the datagram, as a full socket buffer would.
        let _ = input.try_send(Input::Datagram(payload));
        Ok(())
    }

    fn with_slot<R>(&self, pk: PublicKey, f: impl FnOnce(&mut Slot) -> R) -> R {
        let mut routes = lock(&self.routes);
        let choice = self.config.path.choice;
        f(routes.entry(pk).or_insert_with(|| Slot::new(choice)))
    }

    fn slot_status(&self, pk: PublicKey) -> Arc<Mutex<PeerStatus>> {
        self.with_slot(pk, |slot| slot.status.clone())
    }

    fn next_request(&self) -> u32 {
        let mut r = lock(&self.requests);
        *r = r.wrapping_add(1);
        // Mixed with the clock so that a restarted client does not reuse its requests.
        *r ^ (self.epoch.elapsed().as_nanos() as u32).rotate_left(16)
    }

    /// Sends a control message without blocking the caller.
    fn send_control(self: &Arc<Self>, pk: PublicKey, msg: Control) {
        let shared = self.clone();
        tokio::spawn(async move {
            if let Err(error) = shared.send_control_now(pk, msg).await {
                debug!(peer = %pk, %error, ?msg, "control message not sent");
            }
        });
    }

    /// Sends a control message to `pk` and waits until the Tox node has taken it.
    async fn send_control_now(&self, pk: PublicKey, msg: Control) -> Result<(), ToxError> {
        let mut packet = BytesMut::with_capacity(1 + session::control::MAX_CONTROL_LEN);
        packet.put_u8(CONTROL_PACKET_ID);
        let mut body = Vec::new();
        msg.emit(&mut body);
        packet.extend_from_slice(&body);
        self.tox.send_lossless(pk, packet.freeze()).await
    }

    /// Starts a session with `pk` on `conv`, replacing any other.
    fn start_session(self: &Arc<Self>, pk: PublicKey, conv: ConvId, exit_role: bool) -> Handle {
        // Only the exit role accepts the peer's streams; a client refuses them at once rather
        // than let them wait, holding credit, in a queue nobody reads.
        let handle = Handle::new(mux::Config {
            shared_budget: Some(self.mux_budget.clone()),
            ..mux_config_for(exit_role)
        });
        let (input_tx, input_rx) = mpsc::channel(4096);
        let (ended_tx, ended_rx) = watch::channel(false);
        let (status, carrier) = self.with_slot(pk, |slot| {
            // Dropping the old session's input ends its driver.
            slot.session = Some(Running {
                conv,
                input: input_tx,
                handle: handle.clone(),
                ended: ended_rx,
            });
            (slot.status.clone(), slot.carrier.subscribe())
        });
        self.sessions.send_modify(|n| *n += 1);
        let session = Session::new(conv, self.config.session.clone(), Instant::now());
        let span = tracing::info_span!("session", peer = %pk, %conv);
        tokio::spawn(
            drive(
                Arc::downgrade(self),
                pk,
                session,
                handle.clone(),
                Wiring {
                    input: input_rx,
                    carrier,
                    ended: ended_tx,
                    status,
                },
            )
            .instrument(span),
        );
        if exit_role {
            let handle = handle.clone();
            let incoming = self.incoming.clone();
            tokio::spawn(async move {
                while let Some(stream) = handle.accept().await {
                    if incoming.send(Incoming { peer: pk, stream }).await.is_err() {
                        break;
                    }
                }
            });
        }
        handle
    }

    fn handle_control(self: &Arc<Self>, pk: PublicKey, msg: Control) {
        match msg {
            Control::Open { request, resume } => {
                if !self.allow.allows(&pk) {
                    debug!(peer = %pk, "session refused: not allowed");
                    self.send_control(
                        pk,
                        Control::Reject {
                            request,
                            reason: CloseReason::NotAllowed,
                        },
                    );
                    return;
                }
                let now = Instant::now();
                let epoch = self.epoch;
                let (answer, running_conv) = self.with_slot(pk, |slot| {
                    let acceptor = slot
                        .acceptor
                        .get_or_insert_with(|| Acceptor::new(epoch, &pk.0));
                    let (answer, _) = acceptor.handle_open(now, request, resume);
                    (answer, slot.session.as_ref().map(|r| r.conv))
                });
                if let Control::Accept { conv, .. } = answer
                    && running_conv != Some(conv)
                {
                    info!(peer = %pk, %conv, "session accepted");
                    self.start_session(pk, conv, true);
                }
                self.send_control(pk, answer);
            }
            Control::Accept { .. } | Control::Reject { .. } => {
                let opener = self.with_slot(pk, |slot| slot.opener.clone());
                if let Some(tx) = opener {
                    let _ = tx.try_send(msg);
                }
            }
            Control::Close { conv, reason } => {
                let input = self.with_slot(pk, |slot| {
                    slot.session
                        .as_ref()
                        .filter(|r| r.conv == conv)
                        .map(|r| r.input.clone())
                });
                if let Some(input) = input {
                    let _ = input.try_send(Input::PeerClose(reason));
                }
            }
        }
    }

    /// Starts the path agent of `pk` unless it runs or `--path tox` says never to punch.
    fn start_paths(
        self: &Arc<Self>,
        pk: PublicKey,
        role: Role,
        stop: Option<watch::Receiver<bool>>,
    ) -> Option<mpsc::Sender<Signal>> {
        self.with_slot(pk, |slot| {
            if slot.paths.is_none()
                && (role == Role::Exit || self.config.path.choice != PathChoice::Tox)
            {
                let (tx, rx) = mpsc::channel(16);
                let agent = Agent {
                    shared: Arc::downgrade(self),
                    pk,
                    config: self.config.path.clone(),
                    signals: rx,
                    carrier: slot.carrier.clone(),
                    status: slot.status.clone(),
                };
                let span = tracing::info_span!("paths", peer = %pk);
                tokio::spawn(agent.run(role, stop).instrument(span));
                slot.paths = Some(tx);
            }
            slot.paths.clone()
        })
    }

    /// A punched-link signal from `pk`: for its path agent, which an exit starts on the first
    /// signal of a client that has a session (signals from anyone else are dropped).
    fn handle_signal(self: &Arc<Self>, pk: PublicKey, signal: Signal) {
        let (has_session, exit_side) =
            self.with_slot(pk, |slot| (slot.session.is_some(), slot.acceptor.is_some()));
        if !has_session {
            debug!(peer = %pk, "link signal without a session dropped");
            return;
        }
        let inbox = if exit_side {
            self.start_paths(pk, Role::Exit, None)
        } else {
            self.with_slot(pk, |slot| slot.paths.clone())
        };
        if let Some(inbox) = inbox {
            let _ = inbox.try_send(signal);
        }
    }

    /// A session packet (without any path's framing) from `pk`, from Tox or a punched link.
    fn handle_session_packet(self: &Arc<Self>, pk: PublicKey, data: Bytes, via: Via) {
        let now = Instant::now();
        let conv = session::conv_of(&data);
        let (input, answer_unknown) = self.with_slot(pk, |slot| {
            if let Some(r) = &slot.session
                && conv == Some(r.conv)
            {
                return (Some(r.input.clone()), false);
            }
            // Only an exit (which holds an acceptor for this client, or allows it) tells a
            // client its session is gone; a client ignores strays. A packet of another conv
            // than the running one is answered too: a client that took an answer the exit
            // has since replaced learns in a round trip, not after the idle timeout.
            let due = slot
                .last_unknown
                .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1));
            let exit_side = slot.acceptor.is_some() || self.allow.allows(&pk);
            if due && exit_side {
                slot.last_unknown = Some(now);
                return (None, true);
            }
            (None, false)
        });
        if let Some(input) = input {
            // A full queue drops the packet: it is lossy, KCP retransmits.
            let _ = input.try_send(Input::Packet(data, via));
        } else if answer_unknown && let Some(conv) = conv {
            debug!(peer = %pk, %conv, "packets for an unknown session");
            self.send_control(
                pk,
                Control::Close {
                    conv,
                    reason: CloseReason::UnknownSession,
                },
            );
        }
    }
}

/// Routes Tox events to sessions and control handlers until the node or the fabric is gone.
async fn route(shared: Weak<Shared>, mut events: mpsc::Receiver<ToxEvent>) {
    while let Some(event) = events.recv().await {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        match event {
            ToxEvent::Lossy { pk, data } if data.first() == Some(&SESSION_PACKET_ID) => {
                shared.handle_session_packet(pk, data.slice(1..), Via::Tox);
            }
            ToxEvent::Lossless { pk, data } if data.first() == Some(&SIGNAL_PACKET_ID) => {
                match Signal::parse(&data[1..]) {
                    Ok(signal) => shared.handle_signal(pk, signal),
                    Err(error) => debug!(peer = %pk, %error, "bad link signal"),
                }
            }
            ToxEvent::Lossless { pk, data } if data.first() == Some(&CONTROL_PACKET_ID) => {
                match Control::parse(&data[1..]) {
                    Ok(msg) => shared.handle_control(pk, msg),
                    Err(error) => debug!(peer = %pk, %error, "bad control message"),
                }
            }
            ToxEvent::FriendConnection { pk, status } => {
                debug!(peer = %pk, ?status, "friend connection");
                shared.with_slot(pk, |slot| {
                    slot.online.send_replace(status.is_online());
                    let mut st = lock(&slot.status);
                    st.online = status.is_online();
                    st.path = status;
                });
            }
            _ => {}
        }
    }
}

/// Client side: asks `pk` for a session until it answers, and starts it.
async fn establish(
    shared: &Arc<Shared>,
    pk: PublicKey,
    resume: Option<ConvId>,
) -> Result<ConvId, ConnectError> {
    let timeout = shared.config.connect_timeout;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut online = shared.with_slot(pk, |slot| slot.online.subscribe());
    tokio::time::timeout_at(deadline, online.wait_for(|o| *o))
        .await
        .map_err(|_| ConnectError::TimedOut(timeout))?
        .map_err(|_| ConnectError::Shutdown)?;
    let (tx, mut rx) = mpsc::channel(8);
    shared.with_slot(pk, |slot| slot.opener = Some(tx));
    let now = Instant::now();
    let remaining = deadline.into_std().saturating_duration_since(now);
    let mut opener = Opener::new(
        now,
        shared.next_request(),
        resume,
        Duration::from_secs(1),
        remaining,
    );
    let outcome = loop {
        let now = Instant::now();
        opener.handle_timeout(now);
        while let Some(msg) = opener.poll_transmit(now) {
            shared.send_control(pk, msg);
        }
        if let Some(outcome) = opener.outcome() {
            break outcome;
        }
        let wake = opener.poll_timeout().unwrap_or(now);
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(msg) => opener.handle_control(msg),
                None => return Err(ConnectError::Shutdown),
            },
            () = tokio::time::sleep_until(tokio::time::Instant::from_std(wake)) => {}
        }
    };
    shared.with_slot(pk, |slot| slot.opener = None);
    match outcome {
        OpenOutcome::Accepted(conv) => {
            let running = shared.with_slot(pk, |slot| slot.session.as_ref().map(|r| r.conv));
            if running != Some(conv) {
                shared.start_session(pk, conv, false);
            }
            Ok(conv)
        }
        OpenOutcome::Rejected(reason) => Err(ConnectError::Rejected(reason)),
        OpenOutcome::TimedOut => Err(ConnectError::TimedOut(timeout)),
    }
}

/// Client side: keeps a session to `pk` up until the [`Peer`] is dropped.
///
/// It re-establishes when the session ends, and asks to resume whenever the exit comes back
/// online, which keeps the conv (and the streams) when the exit still has the session and
/// starts afresh when it restarted.
async fn supervise(shared: Weak<Shared>, pk: PublicKey, mut stop: watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(500);
    loop {
        let Some(s) = shared.upgrade() else { return };
        let (mut online, ended, conv) = s.with_slot(pk, |slot| {
            (
                slot.online.subscribe(),
                slot.session.as_ref().map(|r| r.ended.clone()),
                slot.session.as_ref().map(|r| r.conv),
            )
        });
        drop(s);
        // Only a session that still runs may be resumed: one that ended here may live on at
        // the exit, and a fresh KCP on its conv would be taken for duplicates there (B4).
        let mut resume = None;
        if let Some(mut ended) = ended {
            // Wait for the session to end, or for any change in how Tox sees the exit: a
            // `watch` keeps only the latest value, so offline-then-online may read as one
            // change to "online", and that must count as the exit coming back.
            online.mark_unchanged();
            let back_online = async {
                loop {
                    if online.changed().await.is_err() {
                        return;
                    }
                    if *online.borrow_and_update() {
                        return;
                    }
                }
            };
            tokio::select! {
                _ = stop.changed() => return,
                _ = ended.wait_for(|e| *e) => {}
                () = back_online => resume = conv,
            }
        }
        let Some(s) = shared.upgrade() else { return };
        let result = tokio::select! {
            _ = stop.changed() => return,
            r = establish(&s, pk, resume) => r,
        };
        match result {
            Ok(new) if Some(new) == resume => debug!(exit = %pk, conv = %new, "session resumed"),
            Ok(new) => {
                info!(exit = %pk, conv = %new, "session to exit re-established");
                backoff = Duration::from_millis(500);
            }
            Err(error) => {
                warn!(exit = %pk, %error, "reconnecting to exit failed");
                drop(s);
                tokio::select! {
                    _ = stop.changed() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// How often a busy session driver refreshes its [`PeerStatus`].
const STATUS_EVERY: Duration = Duration::from_millis(20);

/// What connects a session driver to the rest of the fabric.
struct Wiring {
    /// Packets (from any path), peer closes and datagrams to send.
    input: mpsc::Receiver<Input>,
    /// The path to send on, set by the path agent.
    carrier: watch::Receiver<Carrier>,
    /// Set when the session has ended.
    ended: watch::Sender<bool>,
    /// Where the driver publishes its counters.
    status: Arc<Mutex<PeerStatus>>,
}

/// Runs one session: packets from any path in, mux frames through, packets out on the path
/// the agent chose.
async fn drive(
    shared: Weak<Shared>,
    pk: PublicKey,
    mut session: Session,
    mut handle: Handle,
    wiring: Wiring,
) {
    let Wiring {
        mut input,
        mut carrier,
        ended,
        status,
    } = wiring;
    let Some((tox, datagrams)) = shared
        .upgrade()
        .map(|s| (s.tox.clone(), s.datagrams.clone()))
    else {
        return;
    };
    let conv = session.conv();
    let mut scratch = Vec::new();
    let mut buf = Vec::new();
    let mut dropped = 0u64;
    let mut last_status = Instant::now() - Duration::from_secs(1);
    let mut path = carrier.borrow_and_update().clone();
    let mut watch = LinkWatch::new(Instant::now());
    let mut was_suspect = false;
    let (reason, by_peer) = 'run: loop {
        let now = Instant::now();
        // Mux frames into the session, as much as its pacer and window admit.
        let blocked = feed(&mut session, &mut handle, now, &mut scratch);
        if carrier.has_changed().unwrap_or(false) {
            path = carrier.borrow_and_update().clone();
            watch.on_carrier(now, path.is_punched());
            session.on_path_change(now);
        }
        // A punched link that went silent while we wait for acknowledgements (or while the
        // peer already turned to Tox) gets Tox beside it until it speaks again: a stall of
        // about a second instead of the link's dead timeout.
        let also_tox =
            path.is_punched() && watch.suspect(now, || session.stats().waiting_segments > 0);
        if also_tox && !was_suspect && session.stats().waiting_segments > 0 {
            // What went out on the silent link is presumed lost: send it again on Tox now.
            // Only data: an idle link turns suspect whenever the peer's keepalive came by
            // Tox, and restarting the pacer then would only slow the next transfer.
            session.on_path_change(now);
        }
        was_suspect = also_tox;
        while session.poll_transmit(now, &mut buf).is_some() {
            if also_tox {
                let mut packet = BytesMut::with_capacity(buf.len() + 1);
                packet.put_u8(SESSION_PACKET_ID);
                packet.extend_from_slice(&buf);
                // A duplicate: dropped when the Tox queue is full.
                let _ = tox.try_send_lossy(pk, packet.freeze());
            }
            if path.send(&buf, also_tox).await {
                continue;
            }
            // Tox, or a punched link that just closed (the agent moves us back to Tox).
            let mut packet = BytesMut::with_capacity(buf.len() + 1);
            packet.put_u8(SESSION_PACKET_ID);
            packet.extend_from_slice(&buf);
            let packet = packet.freeze();
            if let Err(ToxError::QueueFull) = tox.try_send_lossy(pk, packet.clone()) {
                // The Tox thread is behind: wait for it rather than drop what KCP paced.
                if tox.send_lossy(pk, packet).await.is_err() {
                    dropped += 1;
                }
            }
        }
        if let Some(Event::Closed { reason, by_peer }) = session.poll_event() {
            if !by_peer && let Some(s) = shared.upgrade() {
                s.send_control(pk, Control::Close { conv, reason });
            }
            break 'run (reason, by_peer);
        }
        let deadline = session
            .poll_timeout()
            .unwrap_or(now + Duration::from_secs(1));
        // Status at most every 20 ms while busy, and whenever the session goes quiet, so
        // what it shows is never more than 20 ms old.
        let quiet = deadline.saturating_duration_since(now) >= STATUS_EVERY;
        if quiet || now.saturating_duration_since(last_status) >= STATUS_EVERY {
            last_status = now;
            let mut st = lock(&status);
            st.conv = Some(conv);
            st.session = session.stats();
            st.mux = handle.stats();
            st.dropped_packets = dropped;
        }
        tokio::select! {
            msg = input.recv() => match msg {
                Some(Input::Packet(p, via)) => {
                    let now = Instant::now();
                    watch.on_input(now, via);
                    let _ = session.handle_input(now, &p);
                    // Take whatever else has arrived before answering: one flush of
                    // acknowledgements for the lot.
                    let mut more = 0;
                    while more < 256 {
                        match input.try_recv() {
                            Ok(Input::Packet(p, via)) => {
                                watch.on_input(now, via);
                                let _ = session.handle_input(now, &p);
                            }
                            Ok(Input::PeerClose(reason)) => session.handle_peer_close(reason),
                            Ok(Input::Datagram(d)) => { session.send_datagram(&d); }
                            Err(_) => break,
                        }
                        more += 1;
                    }
                    while let Some(d) = session.recv_datagram() {
                        // Full means the application is behind: drop, as UDP would.
                        let _ = datagrams.try_send((pk, d));
                    }
                    scratch.clear();
                    if session.recv(&mut scratch) > 0
                        && let Err(error) = handle.handle_input(&scratch)
                    {
                        warn!(peer = %pk, %conv, %error, "mux protocol error");
                        session.close(CloseReason::ProtocolError);
                    }
                }
                Some(Input::PeerClose(reason)) => session.handle_peer_close(reason),
                Some(Input::Datagram(d)) => { session.send_datagram(&d); }
                // Replaced by a newer session, or the fabric is gone.
                None => break 'run (CloseReason::Normal, false),
            },
            r = handle.transmit_ready(), if !blocked => {
                if r.is_err() {
                    session.close(CloseReason::ProtocolError);
                }
            }
            () = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)) => {
                session.handle_timeout(Instant::now());
            }
        }
    };
    info!(peer = %pk, %conv, %reason, by_peer, "session ended");
    handle.fail(format!("session ended: {reason}"));
    if let Some(s) = shared.upgrade() {
        s.with_slot(pk, |slot| {
            if slot.session.as_ref().is_some_and(|r| r.conv == conv) {
                slot.session = None;
            }
            if let Some(a) = slot.acceptor.as_mut() {
                a.forget(conv);
            }
            let mut st = lock(&slot.status);
            st.conv = None;
            st.last_end = Some((reason, by_peer));
        });
        s.sessions.send_modify(|n| *n += 1);
    }
    ended.send_replace(true);
}
