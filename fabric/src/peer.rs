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
//! Paths: right after a session starts, the client's path agent (`paths`) offers its
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
//!
//! The code, by concern:
//!
//! * this module: the public API ([`Fabric`], [`Peer`], [`PeerStatus`], the configuration and
//!   errors) and what the tasks share: `Shared`, one `Slot` per peer, control sending and the
//!   start of a path agent;
//! * `router`: the router task, which hands Tox events to sessions and control handlers;
//! * `supervisor`: the client side's session opening (`establish`) and reconnection
//!   (`supervise`);
//! * `driver`: the per-session task, from packets in to packets out, and its status;
//! * `paths`: the path agent, which punches links and picks the carrier.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{BufMut, Bytes, BytesMut};
use thiserror::Error;
use tokio::sync::{mpsc, watch};
use tracing::{Instrument as _, debug, info};

use self::paths::{Agent, AgentInput, Carrier, Role, Via};
use self::router::route;
use self::supervisor::{establish, supervise};
use crate::id::{PublicKey, ToxId};
use crate::mux::io::{Handle, Stream};
use crate::mux::{self, SharedBudget};
use crate::pairing::JoinRequest;
use crate::path::{PathChoice, PathConfig, PathStatus};
use crate::session::control::Acceptor;
use crate::session::{self, CloseReason, Control, ConvId};
use crate::time::{Duration, Instant};
use crate::tox::{Connection, FriendPolicy, ToxConfig, ToxError, ToxHandle, ToxNode};

/// First byte of a lossy Tox packet carrying a session packet.
pub const SESSION_PACKET_ID: u8 = 200;
/// First byte of a lossless Tox packet carrying a control message.
pub const CONTROL_PACKET_ID: u8 = 170;
/// First byte of a lossless Tox packet carrying a punched-link signal.
pub const SIGNAL_PACKET_ID: u8 = 171;

mod direct;
mod driver;
mod paths;
mod router;
mod supervisor;

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
    /// The peer was removed ([`Fabric::forget`]) and not allowed again since.
    #[error("the peer was removed")]
    Forgotten,
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
    /// Where the running session was opened by a direct handshake (a resume, or a join at a
    /// ticket's endpoint), without Tox; `None` when it was opened over Tox.
    pub opened_direct: Option<std::net::SocketAddr>,
}

/// The fabric: a Tox node and the sessions to its peers.
#[derive(Debug)]
pub struct Fabric {
    shared: Arc<Shared>,
    incoming: tokio::sync::Mutex<mpsc::Receiver<Incoming>>,
    datagrams: tokio::sync::Mutex<mpsc::Receiver<(PublicKey, Vec<u8>)>>,
    joins: tokio::sync::Mutex<mpsc::Receiver<(PublicKey, JoinRequest)>>,
}

#[derive(Debug)]
struct Shared {
    tox: ToxHandle,
    config: FabricConfig,
    /// Who may open sessions here; grows at run time ([`Fabric::allow`]).
    allow: Mutex<FriendPolicy>,
    /// Pairing requests for the application (see [`Fabric::next_join_request`]).
    joins: mpsc::Sender<(PublicKey, JoinRequest)>,
    routes: Mutex<HashMap<PublicKey, Slot>>,
    incoming: mpsc::Sender<Incoming>,
    epoch: Instant,
    requests: Mutex<u32>,
    datagrams: mpsc::Sender<(PublicKey, Vec<u8>)>,
    /// Counts every session that came up or ended, so waiters learn of both without polling.
    sessions: watch::Sender<u64>,
    /// What every session's mux draws its receive credit from.
    mux_budget: SharedBudget,
    /// The direct socket, for resuming sessions without Tox (none with `--path tox`).
    direct: Option<Arc<direct::Direct>>,
    /// Our own key: the tie-break of crossed Opens compares it with the peer's.
    own_key: PublicKey,
    /// Peers removed at run time ([`Fabric::forget`]): nothing dials them until they are
    /// allowed again.
    forgotten: Mutex<std::collections::HashSet<PublicKey>>,
    /// Until when a stranger's direct HELLO may be a pairing request worth opening
    /// ([`Fabric::expect_joins_until`]).
    joins_until: Mutex<Option<Instant>>,
}

/// Everything known about one peer.
#[derive(Debug)]
struct Slot {
    online: watch::Sender<bool>,
    session: Option<Running>,
    /// Our open in progress waits for the answer here.
    opener: Option<mpsc::Sender<OpenerInput>>,
    /// The exit's conv assignment for this client.
    acceptor: Option<Acceptor>,
    /// When an "unknown session" close was last sent, to answer a stream of stale packets once
    /// a second, not once a packet.
    last_unknown: Option<Instant>,
    status: Arc<Mutex<PeerStatus>>,
    /// What the session sends on; the path agent changes it.
    carrier: watch::Sender<Carrier>,
    /// The path agent's inbox, once it runs.
    paths: Option<mpsc::Sender<AgentInput>>,
    /// The running agent's role, and what stops it when it is replaced.
    paths_role: Option<(Role, watch::Sender<bool>)>,
    /// A direct link made before the path agent ran, for it to take at start.
    pending_direct: Option<direct::DirectLink>,
    /// We dial this peer (it is our exit): its direct handshakes are answered.
    dialed: bool,
}

/// What reaches an open in progress.
#[derive(Debug, Clone, Copy)]
enum OpenerInput {
    /// The peer's answer to an Open (ours, or one it ignores).
    Answer(Control),
    /// The peer's Open crossed ours and we answered it: its session is ours too.
    OpenedByPeer(ConvId),
}

#[derive(Debug)]
struct Running {
    conv: ConvId,
    /// Whether this end opened the session (it takes odd stream ids, offers links and asks to
    /// resume) or answered the peer's Open.
    opened_here: bool,
    /// When it started here.
    started: Instant,
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
            paths_role: None,
            pending_direct: None,
            dialed: false,
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
        let (joins_tx, joins_rx) = mpsc::channel(JOIN_QUEUE);
        let mux_budget = SharedBudget::new(config.mux_budget);
        let direct = direct::bind(&config, tox.secret_key().0);
        let shared = Arc::new(Shared {
            own_key: tox.public_key(),
            direct: direct.clone(),
            tox,
            config,
            mux_budget,
            allow: Mutex::new(allow),
            joins: joins_tx,
            routes: Mutex::new(HashMap::new()),
            incoming: incoming_tx,
            epoch: Instant::now(),
            requests: Mutex::new(0),
            datagrams: datagrams_tx,
            sessions: watch::channel(0).0,
            forgotten: Mutex::default(),
            joins_until: Mutex::default(),
        });
        tokio::spawn(route(Arc::downgrade(&shared), events));
        if let Some(direct) = &direct {
            direct::run(&shared, direct);
        }
        Ok(Self {
            shared,
            incoming: tokio::sync::Mutex::new(incoming_rx),
            datagrams: tokio::sync::Mutex::new(datagrams_rx),
            joins: tokio::sync::Mutex::new(joins_rx),
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

    /// Dials the peer `peer`: befriends it, waits for it to come online, asks for a session
    /// (unless one it opened runs already: a pair holds one session, whoever opened it).
    /// The returned [`Peer`] keeps the session up (reconnecting by itself) until dropped.
    pub async fn connect(&self, peer: ToxId) -> Result<Peer, ConnectError> {
        let pk = peer.public_key();
        if self.shared.is_forgotten(&pk) {
            return Err(ConnectError::Forgotten);
        }
        if let Err(error) = self.shared.tox.add_friend(peer, b"proxy session").await {
            // Already a friend (saved from an earlier run) is the common case.
            debug!(%error, "friend request not sent");
        }
        let (status, running) = self.shared.with_slot(pk, |slot| {
            slot.dialed = true;
            (slot.status.clone(), slot.session.as_ref().map(|r| r.conv))
        });
        let conv = match running {
            Some(conv) => conv,
            None => establish(&self.shared, pk, None).await?,
        };
        if let Some(direct) = &self.shared.direct {
            direct.joined(&pk);
        }
        info!(peer = %pk, %conv, "session to peer established");
        let (stop_tx, stop_rx) = watch::channel(false);
        tokio::spawn(supervise(Arc::downgrade(&self.shared), pk, stop_rx));
        Ok(Peer {
            shared: self.shared.clone(),
            pk,
            status,
            _stop: stop_tx,
        })
    }

    /// The next stream a peer opened to this node, on any session. Every session takes its
    /// peer's streams, so a node must read them (and refuse what it does not serve); those
    /// not read wait in a bounded queue, holding their credit. `None` once the fabric is
    /// shutting down.
    pub async fn accept(&self) -> Option<Incoming> {
        self.incoming.lock().await.recv().await
    }

    /// The next pairing request (a friend request whose message is a
    /// [`JoinRequest`], from a peer this node does not allow): who asked, and the request,
    /// for the application to check against its invitations and accept with
    /// [`Fabric::allow`]. `None` once the fabric is shutting down.
    pub async fn next_join_request(&self) -> Option<(PublicKey, JoinRequest)> {
        self.joins.lock().await.recv().await
    }

    /// Lets `pk` hold sessions with this node from now on, and makes it a Tox friend (which
    /// accepts its pending friend request, if any): what accepting a pairing request does.
    pub async fn allow(&self, pk: PublicKey) -> Result<(), ToxError> {
        self.allow_sessions(pk);
        self.shared.tox.add_friend_norequest(pk).await
    }

    /// This node's direct endpoints (its direct socket's port on its interfaces' addresses,
    /// at most `max`), for a ticket: a joiner that can reach one pairs without Tox. Empty
    /// without a direct socket (`--path tox`, `--path tcp`).
    pub fn direct_endpoints(&self, max: usize) -> Vec<std::net::SocketAddr> {
        self.shared
            .direct
            .as_ref()
            .map(|d| d.endpoints(max))
            .unwrap_or_default()
    }

    /// The direct endpoints a node on `data_dir` will have once it runs (its last run's port
    /// on this host's addresses), for a ticket made while no node runs there.
    pub fn direct_endpoints_of(
        data_dir: &std::path::Path,
        max: usize,
    ) -> Vec<std::net::SocketAddr> {
        direct::endpoints_of(data_dir, max)
    }

    /// An invitation is open until `until`: strangers' direct HELLOs are opened (within their
    /// budget) until then, as they may carry pairing requests. Outside that window a
    /// stranger's HELLO costs a table lookup and nothing more.
    pub fn expect_joins_until(&self, until: Instant) {
        let mut at = lock(&self.shared.joins_until);
        if at.is_none_or(|t| t < until) {
            *at = Some(until);
        }
    }

    /// Pairs with `inviter` beside Tox: the next [`Fabric::connect`] to it also sends its
    /// Opens to `endpoints` (the ticket's), in HELLOs carrying `request`, every quarter
    /// second until the inviter lets this node in and answers. Without a direct socket it
    /// does nothing (Tox carries the request alone).
    pub fn join_directly(
        &self,
        inviter: PublicKey,
        endpoints: Vec<std::net::SocketAddr>,
        request: &JoinRequest,
    ) {
        if let Some(direct) = &self.shared.direct
            && !endpoints.is_empty()
        {
            direct.join(inviter, endpoints, request.encode().into_bytes());
        }
    }

    /// Lets `pk` hold sessions with this node, without touching Tox: for a peer this node
    /// asks to befriend itself (a join), whose request the other side accepts.
    pub fn allow_sessions(&self, pk: PublicKey) {
        lock(&self.shared.forgotten).remove(&pk);
        lock(&self.shared.allow).keys.insert(pk);
    }

    /// Undoes [`Fabric::allow_sessions`] (a join that came to nothing), and
    /// [`Fabric::join_directly`].
    pub fn disallow_sessions(&self, pk: &PublicKey) {
        if let Some(direct) = &self.shared.direct {
            direct.joined(pk);
        }
        lock(&self.shared.allow).keys.remove(pk);
    }

    /// Ends everything this node has with `pk`, at once: what removing a peer does. Its
    /// session ends here (its streams fail now) and the peer is told (its end of them fails
    /// too); nothing dials it again (supervisors stop, [`Fabric::connect`] is refused); it may
    /// no longer hold sessions here; it stops being a Tox friend. [`Fabric::allow`] undoes
    /// it.
    pub async fn forget(&self, pk: PublicKey) {
        lock(&self.shared.forgotten).insert(pk);
        lock(&self.shared.allow).keys.remove(&pk);
        let running = self
            .shared
            .with_slot_if(pk, |slot| slot.session.take())
            .flatten();
        if let Some(running) = running {
            let close = Control::Close {
                conv: running.conv,
                reason: CloseReason::NotAllowed,
            };
            let told = tokio::time::timeout(
                Duration::from_secs(1),
                self.shared.send_control_now(pk, close),
            )
            .await;
            if !matches!(told, Ok(Ok(()))) {
                debug!(peer = %pk, conv = %running.conv, "could not tell the removed peer");
            }
            let _ = running
                .input
                .try_send(Input::PeerClose(CloseReason::NotAllowed));
            let mut ended = running.ended;
            // The driver ends at its next turn; its last look at the slot comes before this.
            let _ = tokio::time::timeout(Duration::from_secs(2), ended.wait_for(|e| *e)).await;
        }
        // Its path agent and any open in progress end with the slot.
        lock(&self.shared.routes).remove(&pk);
        if let Err(error) = self.shared.tox.remove_friend(pk).await {
            debug!(peer = %pk, %error, "removed peer was no Tox friend");
        }
        self.shared.sessions.send_modify(|n| *n += 1);
        info!(peer = %pk, "peer forgotten");
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
        if let Some(direct) = &self.shared.direct {
            direct.close();
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
/// Pairing requests waiting for the application; more are dropped (their senders ask again).
const JOIN_QUEUE: usize = 16;

impl Shared {
    /// Whether an invitation is open at `now` (see [`Fabric::expect_joins_until`]).
    fn expects_joins(&self, now: Instant) -> bool {
        lock(&self.joins_until).is_some_and(|until| now < until)
    }

    fn is_forgotten(&self, pk: &PublicKey) -> bool {
        lock(&self.forgotten).contains(pk)
    }

    /// Whether `pk` may open sessions here.
    fn allows(&self, pk: &PublicKey) -> bool {
        lock(&self.allow).allows(pk)
    }

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

    /// Like [`Shared::with_slot`] for a peer that may have none, without making one.
    fn with_slot_if<R>(&self, pk: PublicKey, f: impl FnOnce(&mut Slot) -> R) -> Option<R> {
        lock(&self.routes).get_mut(&pk).map(f)
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

    /// Starts the path agent of `pk` in `role` (the end that opened the session offers,
    /// the other answers) unless one runs in that role already, replacing one in the other
    /// role; none for an offerer when `--path tox` says never to punch.
    fn start_paths(self: &Arc<Self>, pk: PublicKey, role: Role) {
        self.with_slot(pk, |slot| {
            if slot.paths_role.as_ref().is_some_and(|(r, _)| *r != role) {
                // Dropping the stop sender and the inbox ends the old agent.
                slot.paths_role = None;
                slot.paths = None;
            }
            if slot.paths.is_none()
                && (role == Role::Exit || self.config.path.choice != PathChoice::Tox)
            {
                let (stop_tx, stop) = watch::channel(false);
                let (tx, rx) = mpsc::channel(16);
                if let Some(link) = slot.pending_direct.take() {
                    let _ = tx.try_send(AgentInput::Direct(link));
                }
                let agent = Agent {
                    shared: Arc::downgrade(self),
                    pk,
                    config: self.config.path.clone(),
                    signals: rx,
                    pending_direct: None,
                    carrier: slot.carrier.clone(),
                    status: slot.status.clone(),
                };
                let span = tracing::info_span!("paths", peer = %pk, ?role);
                tokio::spawn(agent.run(role, Some(stop)).instrument(span));
                slot.paths = Some(tx);
                slot.paths_role = Some((role, stop_tx));
            }
        });
    }
}
