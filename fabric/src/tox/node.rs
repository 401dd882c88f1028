//! The tox thread and the async handle that talks to it.
//!
//! Message flow:
//! - [`ToxHandle`] methods put a [`Command`] on a bounded tokio channel; those that need an
//!   answer carry a oneshot for it. Lossy sends need none, so they cost one channel slot.
//! - The thread (a current-thread tokio runtime, so it can wait on the channel with a
//!   timeout) alternates between `tox_iterate` and draining commands until the next iteration
//!   is due. It never sleeps while commands are queued.
//! - `tox_iterate` reports to [`Inbox`] (the callbacks' thread-local state), which forwards
//!   events to the [`ToxEvent`] channel in order. Lossy packets that find the channel full are
//!   dropped and counted; other events wait for room after the iteration.
//! - When every handle is gone, or on [`ToxHandle::shutdown`], the thread saves and kills the
//!   instance. The event channel then closes.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, trace, warn};

use super::ffi::{self, Callbacks, Connection, Instance};
use super::strangers::Strangers;
use super::{LOSSLESS_ID_RANGE, LOSSY_ID_RANGE, ToxConfig, ToxError, check_packet, save};
use crate::id::{BootstrapNode, PublicKey, ToxId, public_bootstrap_nodes};

/// After this long without a DHT connection the node bootstraps again.
const REBOOTSTRAP_AFTER: Duration = Duration::from_secs(5);
/// While packets are arriving, iterate at least this often: c-toxcore reads its UDP socket only
/// inside `tox_iterate`, and a default 208 KiB socket buffer holds only ~5 ms at 25 MB/s.
const BUSY_INTERVAL: Duration = Duration::from_millis(1);
/// How long after the last packet the node keeps the busy interval.
const BUSY_LINGER: Duration = Duration::from_millis(200);
/// An iteration that received at least this many packets found a backlog in the socket: the
/// next one runs right away (after queued commands) instead of after [`BUSY_INTERVAL`].
const BACKLOG_PACKETS: u32 = 16;
/// While a connection is being set up, iterate at least this often. c-toxcore handles a
/// packet only inside `tox_iterate`, and setting up a friend takes a dozen exchanges through
/// onion paths and TCP relays (friend request, DHT key, relay routing, cookie, handshake, then
/// our session's Open and Accept): at c-toxcore's own 50 ms interval each of our hops waited
/// 25 ms on average. The timers that pace Tox itself count whole seconds and do not care.
const HURRY_INTERVAL: Duration = Duration::from_millis(5);
/// How long the node hurries after it starts, sends a friend request or accepts one from an
/// allowed key (not from a stranger: see [`super::strangers`]), unless every friend it waits
/// for comes online first.
const HURRY_FOR: Duration = Duration::from_secs(20);
/// How long it keeps hurrying once they are online: the session's Open and Accept follow.
const HURRY_AFTER_ONLINE: Duration = Duration::from_secs(1);
/// The first iteration is due this long before the end of c-toxcore's second (see
/// [`first_iteration_delay`]), so that it still falls in that second when the thread wakes a
/// little late on a busy machine.
const SECOND_END_MARGIN: Duration = Duration::from_millis(50);
/// Commands handled in one go before checking whether an iteration is due.
const DRAIN_BUDGET: usize = 256;
/// Received lossy payloads are copied into blocks of this size and handed out as `Bytes`
/// slices, so receiving costs no allocation per packet.
const RX_BLOCK: usize = 64 * 1024;
/// Lossless packets waiting for room in c-toxcore's send queue, across all friends.
const MAX_BACKLOG: usize = 1024;
/// How long a lossless packet may wait for room before the caller gets `SendQueueFull`.
const BACKLOG_TIMEOUT: Duration = Duration::from_secs(30);
/// How often idle strangers, and friends to ask again, are looked for.
const STRANGER_CHECK: Duration = Duration::from_secs(10);
/// A friend we asked ourselves that stays offline this long while we are online is asked
/// again: a peer that accepts anyone forgets its strangers (idle, or on restart), and
/// c-toxcore never repeats a request the peer once accepted.
const REQUEST_AGAIN_AFTER: Duration = Duration::from_secs(20);

/// Pairing requests passed on to the application at most, per minute, over all senders: a
/// stranger can make a node check proofs, but not without bound.
pub const JOIN_REQUESTS_PER_MINUTE: usize = 32;

/// Something that happened on the Tox network.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ToxEvent {
    /// A friend request was accepted under the node's [`super::FriendPolicy`] (refused requests
    /// produce no event).
    FriendRequest {
        /// Who asked.
        pk: PublicKey,
    },
    /// A friend request the policy refused whose message is a pairing request
    /// ([`crate::pairing::REQUEST_PREFIX`]): the application decides (and adds the peer
    /// with [`ToxHandle::add_friend_norequest`] to accept it). At most
    /// [`JOIN_REQUESTS_PER_MINUTE`] a minute are passed on.
    JoinRequest {
        /// Who asked.
        pk: PublicKey,
        /// The request's message.
        message: Vec<u8>,
    },
    /// A friend came online, went offline or changed transport.
    FriendConnection {
        /// The friend.
        pk: PublicKey,
        /// How it is connected now.
        status: Connection,
    },
    /// Our own DHT connection changed.
    SelfConnection(Connection),
    /// A custom lossy packet (first byte included).
    Lossy {
        /// The sender.
        pk: PublicKey,
        /// The packet.
        data: Bytes,
    },
    /// A custom lossless packet (first byte included).
    Lossless {
        /// The sender.
        pk: PublicKey,
        /// The packet.
        data: Bytes,
    },
}

/// A friend as the node sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FriendStatus {
    /// The friend's key.
    pub pk: PublicKey,
    /// How it is connected.
    pub connection: Connection,
}

/// A snapshot of the node, with counters since start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToxStatus {
    /// Our Tox ID.
    pub id: ToxId,
    /// Our DHT connection.
    pub connection: Connection,
    /// The UDP port we are bound to.
    pub udp_port: Option<u16>,
    /// Every friend.
    pub friends: Vec<FriendStatus>,
    /// Lossy packets handed to c-toxcore.
    pub lossy_sent: u64,
    /// Lossy packets c-toxcore refused (friend offline, unknown friend).
    pub lossy_send_failed: u64,
    /// Lossy packets received.
    pub lossy_received: u64,
    /// Lossy packets dropped because the event channel was full.
    pub lossy_dropped: u64,
    /// Lossless packets handed to c-toxcore.
    pub lossless_sent: u64,
    /// Lossless packets received.
    pub lossless_received: u64,
}

enum Command {
    Lossy {
        pk: PublicKey,
        data: Bytes,
    },
    Lossless {
        pk: PublicKey,
        data: Bytes,
        reply: oneshot::Sender<Result<(), ToxError>>,
    },
    AddFriend {
        id: ToxId,
        message: Vec<u8>,
        reply: oneshot::Sender<Result<(), ToxError>>,
    },
    AddFriendNoRequest {
        pk: PublicKey,
        reply: oneshot::Sender<Result<(), ToxError>>,
    },
    RemoveFriend {
        pk: PublicKey,
        reply: oneshot::Sender<bool>,
    },
    Status {
        reply: oneshot::Sender<ToxStatus>,
    },
    Shutdown {
        done: oneshot::Sender<()>,
    },
}

/// Starts Tox nodes. See the module docs for the threading model.
#[derive(Debug)]
pub struct ToxNode;

impl ToxNode {
    /// Loads (or creates) the identity in `config.data_dir`, starts the tox thread, bootstraps
    /// and returns a handle plus the stream of events. The identity is saved before this
    /// returns, so a new ID is never lost. Blocks the caller for as long as `tox_new` takes to
    /// load the savedata and bind its socket (milliseconds), which is why it is not async.
    pub fn spawn(config: ToxConfig) -> Result<(ToxHandle, mpsc::Receiver<ToxEvent>), ToxError> {
        let (cmd_tx, cmd_rx) = mpsc::channel(config.command_capacity.max(1));
        let (ev_tx, ev_rx) = mpsc::channel(config.event_capacity.max(1));
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("tox".into())
            .spawn(move || thread_main(config, cmd_rx, ev_tx, ready_tx))
            .map_err(ToxError::Thread)?;
        let (id, secret) = ready_rx.recv().map_err(|_| ToxError::NodeGone)??;
        let handle = ToxHandle {
            tx: cmd_tx,
            id,
            secret: Arc::new(StaticKey(secret)),
        };
        Ok((handle, ev_rx))
    }

    /// Loads or creates the identity in `data_dir` and returns its Tox ID without going online
    /// (for `proxy id`). No socket is opened.
    pub fn identity(data_dir: impl Into<PathBuf>) -> Result<ToxId, ToxError> {
        let path = save::save_path(&data_dir.into());
        let (tox, _) = open_instance(
            &path,
            ffi::Options {
                udp_enabled: false,
                ..ffi::Options::default()
            },
        )?;
        Ok(tox.address())
    }
}

/// A cheap, cloneable handle to a running node. The node stops when every handle is dropped.
#[derive(Debug, Clone)]
pub struct ToxHandle {
    tx: mpsc::Sender<Command>,
    id: ToxId,
    secret: Arc<StaticKey>,
}

/// The node's long-term secret key, kept out of `Debug` output.
pub(crate) struct StaticKey(pub(crate) [u8; 32]);

impl std::fmt::Debug for StaticKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StaticKey(..)")
    }
}

impl ToxHandle {
    /// Our Tox ID (to give to peers).
    pub fn id(&self) -> ToxId {
        self.id
    }

    /// Our public key.
    pub fn public_key(&self) -> PublicKey {
        self.id.public_key()
    }

    /// Our long-term secret key, for the direct handshake (never logged, never sent).
    pub(crate) fn secret_key(&self) -> &StaticKey {
        &self.secret
    }

    /// Adds `id` as a friend and sends it a friend request carrying `message` (1..=1016 bytes).
    /// Adding an existing friend again is not an error.
    pub async fn add_friend(&self, id: ToxId, message: &[u8]) -> Result<(), ToxError> {
        let (reply, rx) = oneshot::channel();
        self.call(Command::AddFriend {
            id,
            message: message.to_vec(),
            reply,
        })
        .await?;
        rx.await.map_err(|_| ToxError::NodeGone)?
    }

    /// Adds `pk` as a friend without a request: the peer connects once it adds us too.
    pub async fn add_friend_norequest(&self, pk: PublicKey) -> Result<(), ToxError> {
        let (reply, rx) = oneshot::channel();
        self.call(Command::AddFriendNoRequest { pk, reply }).await?;
        rx.await.map_err(|_| ToxError::NodeGone)?
    }

    /// Removes a friend; returns whether it was one.
    pub async fn remove_friend(&self, pk: PublicKey) -> Result<bool, ToxError> {
        let (reply, rx) = oneshot::channel();
        self.call(Command::RemoveFriend { pk, reply }).await?;
        rx.await.map_err(|_| ToxError::NodeGone)
    }

    /// Queues a lossy packet to `friend`, waiting for room in the queue. The first byte must
    /// be in [`LOSSY_ID_RANGE`] and the packet at most [`super::MAX_CUSTOM_PACKET`] bytes;
    /// those checks fail here. Whether c-toxcore then sends it is not reported (it is lossy):
    /// packets to an offline friend are dropped and counted in [`ToxStatus`].
    pub async fn send_lossy(&self, friend: PublicKey, data: Bytes) -> Result<(), ToxError> {
        check_packet(&data, &LOSSY_ID_RANGE)?;
        self.call(Command::Lossy { pk: friend, data }).await
    }

    /// Like [`Self::send_lossy`] but never waits: a full queue is [`ToxError::QueueFull`].
    pub fn try_send_lossy(&self, friend: PublicKey, data: Bytes) -> Result<(), ToxError> {
        check_packet(&data, &LOSSY_ID_RANGE)?;
        self.tx
            .try_send(Command::Lossy { pk: friend, data })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => ToxError::QueueFull,
                mpsc::error::TrySendError::Closed(_) => ToxError::NodeGone,
            })
    }

    /// Sends a lossless packet (first byte in [`LOSSLESS_ID_RANGE`]) and waits until c-toxcore
    /// has queued it; c-toxcore then delivers it reliably and in order. While c-toxcore's queue
    /// to the friend is full (its congestion control), the packet waits in the node for room,
    /// in order, up to 30 s ([`ToxError::SendQueueFull`] after that). c-toxcore refuses custom
    /// packets while the friend is not online with us (both sides must see each other): that is
    /// [`ToxError::FriendNotConnected`], and the packet is not kept for later.
    pub async fn send_lossless(&self, friend: PublicKey, data: Bytes) -> Result<(), ToxError> {
        check_packet(&data, &LOSSLESS_ID_RANGE)?;
        let (reply, rx) = oneshot::channel();
        self.call(Command::Lossless {
            pk: friend,
            data,
            reply,
        })
        .await?;
        rx.await.map_err(|_| ToxError::NodeGone)?
    }

    /// A snapshot of the node.
    pub async fn status(&self) -> Result<ToxStatus, ToxError> {
        let (reply, rx) = oneshot::channel();
        self.call(Command::Status { reply }).await?;
        rx.await.map_err(|_| ToxError::NodeGone)
    }

    /// Stops the node now (even if other handles exist), saving its state, and waits until the
    /// instance is gone. Afterwards every handle reports [`ToxError::NodeGone`].
    pub async fn shutdown(&self) {
        let (done, rx) = oneshot::channel();
        if self.call(Command::Shutdown { done }).await.is_ok() {
            let _ = rx.await;
        }
    }

    async fn call(&self, cmd: Command) -> Result<(), ToxError> {
        self.tx.send(cmd).await.map_err(|_| ToxError::NodeGone)
    }
}

/// Loads the savedata at `path` (if any) into a new instance, and saves it when the identity is
/// new. Returns the instance and whether it was newly created.
fn open_instance(
    path: &std::path::Path,
    mut opts: ffi::Options,
) -> Result<(Instance, bool), ToxError> {
    let save_err = |source| ToxError::Save {
        path: path.to_owned(),
        source,
    };
    opts.savedata = save::load(path).map_err(save_err)?;
    let created = opts.savedata.is_none();
    let tox = match Instance::new(&opts) {
        Ok(tox) => tox,
        // A host without IPv6 cannot open the dual-stack socket: fall back to IPv4 only.
        Err(error) if opts.ipv6_enabled => {
            debug!(%error, "no dual-stack socket, trying IPv4 only");
            opts.ipv6_enabled = false;
            Instance::new(&opts)?
        }
        Err(error) => return Err(error.into()),
    };
    if created {
        save::store(path, &tox.savedata()).map_err(save_err)?;
        info!(path = %path.display(), "created a new tox identity");
    }
    Ok((tox, created))
}

fn thread_main(
    config: ToxConfig,
    cmd_rx: mpsc::Receiver<Command>,
    ev_tx: mpsc::Sender<ToxEvent>,
    ready: std::sync::mpsc::SyncSender<Result<(ToxId, [u8; 32]), ToxError>>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .enable_io()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(ToxError::Thread(e)));
            return;
        }
    };
    if !config.lock_memory {
        match ffi::refuse_memory_locks() {
            Ok(()) => debug!("c-toxcore's per-packet memory locks are refused on this thread"),
            Err(error) => debug!(%error, "c-toxcore will lock its buffers"),
        }
    }
    let node = match Node::start(config, ev_tx) {
        Ok(node) => node,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let span = tracing::info_span!("tox", pk = %node.id.public_key().short());
    let _enter = span.enter();
    info!(id = %node.id, port = ?node.tox.udp_port(), "tox node started");
    let _ = ready.send(Ok((node.id, node.tox.secret_key())));
    rt.block_on(node.run(cmd_rx));
}

/// The tox thread's state. Lives on that thread only (`Instance` is not `Send`).
struct Node {
    tox: Instance,
    inbox: Inbox,
    id: ToxId,
    config: ToxConfig,
    save_path: PathBuf,
    friends: HashMap<PublicKey, u32>,
    /// Last time we bootstrapped (to retry while offline).
    bootstrapped_at: Instant,
    /// Iterate every [`HURRY_INTERVAL`] until then.
    hurry_until: Instant,
    /// Friends we sent a request to or accepted one from, not yet online.
    awaited: HashSet<PublicKey>,
    /// When the pairing requests of the last minute were passed on.
    join_requests: Vec<Instant>,
    /// Savedata changed (friend list) and should be written.
    dirty: bool,
    /// Friends accepted under `allow_any` only: never saved, removed when idle.
    strangers: Strangers,
    /// When idle strangers are next looked for.
    next_stranger_check: Instant,
    /// Friends we sent a request to in this run: their ID and message, and when we last
    /// asked or saw them online.
    requested: HashMap<PublicKey, Requested>,
    lossy_sent: u64,
    lossy_send_failed: u64,
    lossless_sent: u64,
    /// Lossless packets c-toxcore had no room for yet, oldest first; retried after every
    /// iteration (acknowledgements, which free room, are processed there).
    backlog: VecDeque<Backlogged>,
}

struct Requested {
    id: ToxId,
    message: Vec<u8>,
    seen: Instant,
}

struct Backlogged {
    pk: PublicKey,
    data: Bytes,
    reply: oneshot::Sender<Result<(), ToxError>>,
    since: Instant,
}

impl Node {
    fn start(config: ToxConfig, ev_tx: mpsc::Sender<ToxEvent>) -> Result<Self, ToxError> {
        let save_path = save::save_path(&config.data_dir);
        let (mut tox, _) = open_instance(
            &save_path,
            ffi::Options {
                ipv6_enabled: config.ipv6_enabled,
                udp_enabled: config.udp_enabled,
                local_discovery_enabled: config.local_discovery,
                start_port: config.start_port,
                end_port: config.end_port,
                tcp_port: config.tcp_relay_port,
                savedata: None,
            },
        )?;
        if let Some(name) = &config.name {
            tox.set_name(name);
        }
        let id = tox.address();
        let mut node = Self {
            inbox: Inbox::new(ev_tx, id.public_key()),
            tox,
            id,
            config,
            save_path,
            friends: HashMap::new(),
            bootstrapped_at: Instant::now(),
            hurry_until: Instant::now() + HURRY_FOR,
            awaited: HashSet::new(),
            join_requests: Vec::new(),
            dirty: false,
            strangers: Strangers::new(Instant::now()),
            next_stranger_check: Instant::now() + STRANGER_CHECK,
            requested: HashMap::new(),
            lossy_sent: 0,
            lossy_send_failed: 0,
            lossless_sent: 0,
            backlog: VecDeque::new(),
        };
        for n in node.tox.friends() {
            if let Some(pk) = node.tox.friend_public_key(n) {
                node.remember_friend(pk, n);
            }
        }
        // Pre-authorise allowed peers so they connect even if their request was lost or sent
        // before we came up.
        let allowed: Vec<PublicKey> = node.config.allow.keys.iter().copied().collect();
        for pk in allowed {
            if !node.friends.contains_key(&pk) && pk != id.public_key() {
                match node.tox.friend_add_norequest(&pk) {
                    Ok(n) => {
                        node.remember_friend(pk, n);
                        node.dirty = true;
                    }
                    Err(e) => warn!(peer = %pk.short(), error = %e, "cannot pre-add allowed peer"),
                }
            }
        }
        for relay in &node.config.tcp_relays {
            if !node.tox.add_tcp_relay(&relay.host, relay.port, &relay.pk) {
                warn!(host = %relay.host, port = relay.port, "tcp relay address not usable");
            }
        }
        node.bootstrap();
        node.save_if_dirty();
        Ok(node)
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut next_iterate =
            Instant::now() + ffi::toxcore_subsec().map_or(Duration::ZERO, first_iteration_delay);
        if !self.tox.watch_udp() {
            debug!("c-toxcore's udp socket not watched: iterating on its interval only");
        }
        // Packets wake the thread only once the first iteration ran: answers to the bootstrap
        // requests must not pull it before the moment `first_iteration_delay` chose.
        let mut last_iterate: Option<Instant> = None;
        let shutdown_ack = loop {
            if Instant::now() >= next_iterate {
                self.iterate().await;
                let now = Instant::now();
                last_iterate = Some(now);
                next_iterate = now + self.interval();
            }
            // Between slow iterations a packet that arrives wakes the thread at once; at the
            // busy pace the timer comes soon enough and waking per packet would only cost
            // iterations.
            let quiet = last_iterate.is_some()
                && next_iterate.saturating_duration_since(Instant::now()) > BUSY_INTERVAL;
            let woke = tokio::select! {
                biased;
                cmd = rx.recv() => Wake::Command(cmd),
                arrived = self.tox.udp_readable(), if quiet => Wake::Packet(arrived),
                () = tokio::time::sleep_until(next_iterate.into()) => continue,
            };
            let cmd = match woke {
                Wake::Command(cmd) => cmd,
                Wake::Packet(Ok(())) => {
                    // At most one iteration per BUSY_INTERVAL however fast packets come (a
                    // flood of them costs no more than the busy pace does).
                    if let Some(last) = last_iterate {
                        next_iterate = next_iterate.min(last + BUSY_INTERVAL);
                    }
                    continue;
                }
                Wake::Packet(Err(error)) => {
                    debug!(%error, "c-toxcore's udp socket cannot be watched any more");
                    self.tox.unwatch_udp();
                    continue;
                }
            };
            let Some(cmd) = cmd else { break None };
            if let Some(done) = self.handle(cmd) {
                break Some(done);
            }
            // Drain what is already queued without yielding, but let iterations happen.
            let mut stop = None;
            for _ in 0..DRAIN_BUDGET {
                let Ok(cmd) = rx.try_recv() else { break };
                if let Some(done) = self.handle(cmd) {
                    stop = Some(done);
                    break;
                }
            }
            if stop.is_some() {
                break stop;
            }
        };
        // Strangers are not written to the savedata: they leave before the last save.
        let strangers: Vec<PublicKey> = self.strangers.all().collect();
        for pk in strangers {
            self.remove_stranger(pk);
        }
        self.dirty = true;
        self.save_if_dirty();
        info!("tox node stopped");
        // Kill the instance (closing its sockets) before acknowledging the shutdown.
        drop(self);
        if let Some(done) = shutdown_ack {
            let _ = done.send(());
        }
    }

    fn interval(&self) -> Duration {
        let tox = Duration::from_millis(u64::from(self.tox.iteration_interval().max(1)));
        if self.inbox.received_last_iteration >= BACKLOG_PACKETS {
            return Duration::ZERO;
        }
        let receiving = matches!(self.inbox.last_packet, Some(t) if t.elapsed() < BUSY_LINGER);
        if receiving || !self.backlog.is_empty() {
            tox.min(BUSY_INTERVAL)
        } else if Instant::now() < self.hurry_until {
            tox.min(HURRY_INTERVAL)
        } else {
            tox
        }
    }

    async fn iterate(&mut self) {
        self.inbox.received_last_iteration = 0;
        self.tox.iterate(&mut self.inbox);
        for (pk, message) in std::mem::take(&mut self.inbox.requests) {
            self.on_friend_request(pk, message);
        }
        self.check_strangers();
        self.retry_backlog();
        self.check_awaited();
        self.inbox.flush().await;
        if !self.inbox.connection.is_online() && self.bootstrapped_at.elapsed() >= REBOOTSTRAP_AFTER
        {
            debug!("still offline; bootstrapping again");
            self.bootstrap();
        }
        self.save_if_dirty();
    }

    /// Starts hurrying until `pk` comes online.
    fn await_friend(&mut self, pk: PublicKey) {
        self.awaited.insert(pk);
        self.hurry_until = self.hurry_until.max(Instant::now() + HURRY_FOR);
    }

    /// Stops hurrying soon once we are online and so is every friend we wait for.
    fn check_awaited(&mut self) {
        let (tox, friends) = (&self.tox, &self.friends);
        self.awaited.retain(|pk| {
            friends
                .get(pk)
                .is_some_and(|&n| !tox.friend_connection(n).is_online())
        });
        if self.awaited.is_empty() && self.inbox.connection.is_online() {
            self.hurry_until = self.hurry_until.min(Instant::now() + HURRY_AFTER_ONLINE);
        }
    }

    fn on_friend_request(&mut self, pk: PublicKey, message: Vec<u8>) {
        if !self.config.allow.allows(&pk) {
            if message.is_empty() {
                debug!(peer = %pk.short(), "friend request refused by policy");
                return;
            }
            let now = Instant::now();
            self.join_requests
                .retain(|t| now.saturating_duration_since(*t) < Duration::from_secs(60));
            if self.join_requests.len() >= JOIN_REQUESTS_PER_MINUTE {
                debug!(peer = %pk.short(), "pairing request dropped: too many this minute");
                return;
            }
            self.join_requests.push(now);
            debug!(peer = %pk.short(), "pairing request passed on");
            self.inbox.push(ToxEvent::JoinRequest { pk, message });
            return;
        }
        let message_len = message.len();
        let stranger = !self.config.allow.keys.contains(&pk);
        if stranger {
            if self.friends.contains_key(&pk) && !self.strangers.contains(&pk) {
                // A friend we keep anyway (saved, or dialled by us): nothing to do.
                return;
            }
            if let Err(why) = self.strangers.admit(pk, Instant::now()) {
                debug!(peer = %pk.short(), ?why, "friend request from a stranger refused");
                return;
            }
            self.inbox.strangers.insert(pk);
        }
        if self.friends.contains_key(&pk) {
            return;
        }
        match self.tox.friend_add_norequest(&pk) {
            Ok(n) => {
                info!(peer = %pk.short(), message_len, stranger, "friend request accepted");
                self.remember_friend(pk, n);
                if !stranger {
                    // Strangers neither hurry the node (each request would restart it) nor
                    // go to the savedata.
                    self.await_friend(pk);
                    self.dirty = true;
                }
                self.inbox.push(ToxEvent::FriendRequest { pk });
            }
            Err(e) => {
                debug!(peer = %pk.short(), error = %e, "cannot accept friend request");
                self.strangers.forget(&pk);
                self.inbox.strangers.remove(&pk);
            }
        }
    }

    /// Removes strangers nothing came from for a while.
    fn check_strangers(&mut self) {
        let now = Instant::now();
        for pk in self.inbox.heard_strangers.drain() {
            self.strangers.heard(&pk, now);
        }
        if now < self.next_stranger_check {
            return;
        }
        self.next_stranger_check = now + STRANGER_CHECK;
        for pk in self.strangers.expire(now) {
            info!(peer = %pk.short(), "idle stranger removed");
            self.remove_stranger(pk);
        }
        self.request_again(now);
    }

    /// Sends our request again to friends we asked that stay offline (see
    /// [`REQUEST_AGAIN_AFTER`]). c-toxcore sends a request only for a friend it just added,
    /// so the friend is deleted and added again.
    fn request_again(&mut self, now: Instant) {
        let online = self.inbox.connection.is_online();
        let mut again = Vec::new();
        for (pk, r) in &mut self.requested {
            let connected = self
                .friends
                .get(pk)
                .is_some_and(|&n| self.tox.friend_connection(n).is_online());
            if connected || !online {
                r.seen = now;
            } else if now.saturating_duration_since(r.seen) >= REQUEST_AGAIN_AFTER {
                r.seen = now;
                again.push((*pk, r.id, r.message.clone()));
            }
        }
        for (pk, id, message) in again {
            if let Some(n) = self.friends.remove(&pk) {
                self.inbox.by_number.remove(&n);
                self.tox.friend_delete(n);
            }
            match self.tox.friend_add(&id, &message) {
                Ok(n) => {
                    debug!(peer = %pk.short(), "friend offline: request sent again");
                    self.remember_friend(pk, n);
                }
                Err(e) => warn!(peer = %pk.short(), error = %e, "cannot ask a friend again"),
            }
        }
    }

    /// Deletes a stranger from Tox.
    fn remove_stranger(&mut self, pk: PublicKey) {
        self.strangers.forget(&pk);
        self.inbox.strangers.remove(&pk);
        if let Some(n) = self.friends.remove(&pk) {
            self.inbox.by_number.remove(&n);
            self.tox.friend_delete(n);
        }
    }

    /// Returns the shutdown acknowledgement if the command asks the node to stop.
    fn handle(&mut self, cmd: Command) -> Option<oneshot::Sender<()>> {
        match cmd {
            Command::Lossy { pk, data } => {
                let sent = match self.friends.get(&pk) {
                    Some(&n) => self.tox.send_lossy(n, &data).is_ok(),
                    None => false,
                };
                if sent {
                    self.lossy_sent += 1;
                    trace!(peer = %pk.short(), len = data.len(), "lossy packet sent");
                } else {
                    self.lossy_send_failed += 1;
                    trace!(peer = %pk.short(), "lossy packet not sent");
                }
            }
            Command::Lossless { pk, data, reply } => {
                if self.backlog.iter().any(|b| b.pk == pk) {
                    // Keep the order behind packets already waiting.
                    self.backlog_push(pk, data, reply);
                } else {
                    match self.send_lossless(pk, &data) {
                        Err(ToxError::SendQueueFull(_)) => self.backlog_push(pk, data, reply),
                        r => {
                            let _ = reply.send(r);
                        }
                    }
                }
            }
            Command::AddFriend { id, message, reply } => {
                let _ = reply.send(self.add_friend(id, &message));
            }
            Command::AddFriendNoRequest { pk, reply } => {
                // Befriended by the application: its friend requests are accepted from now on
                // (as a key allowed at start).
                self.config.allow.keys.insert(pk);
                let _ = reply.send(self.add_friend_norequest(pk));
            }
            Command::RemoveFriend { pk, reply } => {
                // Removed by the application: no longer accepted, even if allowed at start.
                self.config.allow.keys.remove(&pk);
                self.requested.remove(&pk);
                self.strangers.forget(&pk);
                self.inbox.strangers.remove(&pk);
                let removed = match self.friends.remove(&pk) {
                    Some(n) => {
                        self.inbox.by_number.remove(&n);
                        self.dirty = true;
                        self.tox.friend_delete(n)
                    }
                    None => false,
                };
                self.save_if_dirty();
                let _ = reply.send(removed);
            }
            Command::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Command::Shutdown { done } => return Some(done),
        }
        None
    }

    fn backlog_push(
        &mut self,
        pk: PublicKey,
        data: Bytes,
        reply: oneshot::Sender<Result<(), ToxError>>,
    ) {
        if self.backlog.len() >= MAX_BACKLOG {
            let _ = reply.send(Err(ToxError::SendQueueFull(pk.short())));
            return;
        }
        self.backlog.push_back(Backlogged {
            pk,
            data,
            reply,
            since: Instant::now(),
        });
    }

    /// Retries waiting lossless packets in order; a friend whose queue is still full keeps the
    /// rest of its packets waiting.
    fn retry_backlog(&mut self) {
        if self.backlog.is_empty() {
            return;
        }
        let mut blocked: Vec<PublicKey> = Vec::new();
        for b in std::mem::take(&mut self.backlog) {
            if blocked.contains(&b.pk) {
                self.backlog.push_back(b);
                continue;
            }
            match self.send_lossless(b.pk, &b.data) {
                Err(ToxError::SendQueueFull(_)) if b.since.elapsed() < BACKLOG_TIMEOUT => {
                    blocked.push(b.pk);
                    self.backlog.push_back(b);
                }
                r => {
                    if r.is_err() {
                        // Later packets to this friend must not overtake the failed one.
                        blocked.push(b.pk);
                    }
                    let _ = b.reply.send(r);
                }
            }
        }
    }

    fn send_lossless(&mut self, pk: PublicKey, data: &[u8]) -> Result<(), ToxError> {
        let Some(&n) = self.friends.get(&pk) else {
            return Err(ToxError::NotAFriend(pk.short()));
        };
        match self.tox.send_lossless(n, data) {
            Ok(()) => {
                self.lossless_sent += 1;
                Ok(())
            }
            Err(ffi::PacketError::FriendNotConnected) => {
                Err(ToxError::FriendNotConnected(pk.short()))
            }
            Err(ffi::PacketError::SendQueueFull) => Err(ToxError::SendQueueFull(pk.short())),
            Err(e) => Err(ToxError::Packet(e)),
        }
    }

    fn add_friend(&mut self, id: ToxId, message: &[u8]) -> Result<(), ToxError> {
        let pk = id.public_key();
        self.keep_stranger(pk);
        self.requested.insert(
            pk,
            Requested {
                id,
                message: message.to_vec(),
                seen: Instant::now(),
            },
        );
        if self.friends.contains_key(&pk) {
            // A saved friend: someone dials it again, so it is worth hurrying for too.
            self.await_friend(pk);
            return Ok(());
        }
        let n = self.tox.friend_add(&id, message)?;
        info!(peer = %pk.short(), "friend added, request sent");
        self.remember_friend(pk, n);
        self.await_friend(pk);
        self.dirty = true;
        self.save_if_dirty();
        Ok(())
    }

    fn add_friend_norequest(&mut self, pk: PublicKey) -> Result<(), ToxError> {
        self.keep_stranger(pk);
        if self.friends.contains_key(&pk) {
            return Ok(());
        }
        let n = self.tox.friend_add_norequest(&pk)?;
        info!(peer = %pk.short(), "friend added without request");
        self.remember_friend(pk, n);
        self.dirty = true;
        self.save_if_dirty();
        Ok(())
    }

    /// We add `pk` ourselves: if it was a stranger, it is a friend to keep from now on.
    fn keep_stranger(&mut self, pk: PublicKey) {
        if self.strangers.contains(&pk) {
            self.strangers.forget(&pk);
            self.inbox.strangers.remove(&pk);
            self.dirty = true;
        }
    }

    fn remember_friend(&mut self, pk: PublicKey, n: u32) {
        self.friends.insert(pk, n);
        self.inbox.by_number.insert(n, pk);
    }

    fn status(&self) -> ToxStatus {
        let mut friends: Vec<FriendStatus> = self
            .friends
            .iter()
            .map(|(pk, &n)| FriendStatus {
                pk: *pk,
                connection: self.tox.friend_connection(n),
            })
            .collect();
        friends.sort_by_key(|f| f.pk);
        ToxStatus {
            id: self.id,
            connection: self.inbox.connection,
            udp_port: self.tox.udp_port(),
            friends,
            lossy_sent: self.lossy_sent,
            lossy_send_failed: self.lossy_send_failed,
            lossy_received: self.inbox.lossy_received,
            lossy_dropped: self.inbox.lossy_dropped,
            lossless_sent: self.lossless_sent,
            lossless_received: self.inbox.lossless_received,
        }
    }

    fn bootstrap(&mut self) {
        self.bootstrapped_at = Instant::now();
        let public = if self.config.use_public_bootstrap {
            public_bootstrap_nodes()
        } else {
            Vec::new()
        };
        let nodes: Vec<BootstrapNode> = self
            .config
            .bootstrap
            .iter()
            .cloned()
            .chain(public)
            .collect();
        if nodes.is_empty() {
            debug!("no bootstrap nodes configured");
        }
        for node in &nodes {
            if !self.tox.bootstrap(&node.host, node.port, &node.pk) {
                debug!(host = %node.host, port = node.port, "bootstrap node not usable");
            }
        }
    }

    /// Writes the savedata if it changed, unless strangers are among the friends: the savedata
    /// would list them, so the write waits until they are gone (at the latest at shutdown, which
    /// removes them first). Allowed keys are added again at every start, and a client adds its
    /// exits on every connect, so a write that waits loses nothing they need.
    fn save_if_dirty(&mut self) {
        if !self.dirty || !self.strangers.is_empty() {
            return;
        }
        match save::store(&self.save_path, &self.tox.savedata()) {
            Ok(()) => self.dirty = false,
            // Keep running: the identity itself was saved at creation; only the friend list is
            // at risk, and the next change retries.
            Err(e) => warn!(path = %self.save_path.display(), error = %e, "saving tox state"),
        }
    }
}

/// What woke the tox thread between iterations.
enum Wake {
    /// A command, or `None` when every handle is gone.
    Command(Option<Command>),
    /// A packet in c-toxcore's socket, or the error that ends watching it.
    Packet(std::io::Result<()>),
}

/// How long to wait after bootstrapping before the first `tox_iterate`, given how far
/// c-toxcore's clock is into its current second (see [`ffi::toxcore_subsec`]).
///
/// c-toxcore's onion client sends its first announce round in its very first iteration only,
/// then none for three of its seconds (`ONION_CONNECTION_SECONDS`), counted from the second
/// that first iteration fell in. Iterating at once wastes that round: the bootstrap nodes
/// have not answered yet, so there is no DHT to build onion paths from, and the node comes
/// online a whole second later (measured on the private test network: onion ready after
/// 8 of c-toxcore's seconds instead of 7). So the first iteration waits for the answers until
/// just before that second ends. Waiting longer gains nothing: the round would work, but
/// every later timer would start a second later too. Answers that take longer than what is
/// left of the second cost nothing either: the round is wasted as it was without the wait.
fn first_iteration_delay(into_second: Duration) -> Duration {
    Duration::from_secs(1)
        .saturating_sub(into_second)
        .saturating_sub(SECOND_END_MARGIN)
}

/// The callbacks' state: turns c-toxcore events into [`ToxEvent`]s, in order.
struct Inbox {
    events: mpsc::Sender<ToxEvent>,
    /// Events that did not fit in the channel; flushed (waiting for room) after the iteration.
    /// While non-empty, new events queue behind them to keep the order.
    pending: VecDeque<ToxEvent>,
    /// Friend requests, handled after the iteration (the instance is busy during it): the
    /// sender and the message (kept only when it is a pairing request).
    requests: Vec<(PublicKey, Vec<u8>)>,
    by_number: HashMap<u32, PublicKey>,
    /// Strangers (see [`super::strangers`]), and those heard from since the last iteration.
    strangers: HashSet<PublicKey>,
    heard_strangers: HashSet<PublicKey>,
    rx_block: BytesMut,
    connection: Connection,
    last_packet: Option<Instant>,
    received_last_iteration: u32,
    own_pk: PublicKey,
    lossy_received: u64,
    lossy_dropped: u64,
    lossless_received: u64,
}

impl Inbox {
    fn new(events: mpsc::Sender<ToxEvent>, own_pk: PublicKey) -> Self {
        Self {
            events,
            pending: VecDeque::new(),
            requests: Vec::new(),
            by_number: HashMap::new(),
            strangers: HashSet::new(),
            heard_strangers: HashSet::new(),
            rx_block: BytesMut::new(),
            connection: Connection::None,
            last_packet: None,
            received_last_iteration: 0,
            own_pk,
            lossy_received: 0,
            lossy_dropped: 0,
            lossless_received: 0,
        }
    }

    /// Queues an event that must not be dropped.
    fn push(&mut self, ev: ToxEvent) {
        if !self.pending.is_empty() {
            self.pending.push_back(ev);
            return;
        }
        match self.events.try_send(ev) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(ev)) => self.pending.push_back(ev),
            // Nobody listens any more; the node keeps serving sends.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    /// Delivers the pending events, waiting for room (never for lossy packets).
    async fn flush(&mut self) {
        while let Some(ev) = self.pending.pop_front() {
            if matches!(ev, ToxEvent::Lossy { .. }) {
                if self.events.try_send(ev).is_err() {
                    self.lossy_dropped += 1;
                }
            } else if self.events.send(ev).await.is_err() {
                self.pending.clear();
            }
        }
    }

    fn copy(&mut self, data: &[u8]) -> Bytes {
        if self.rx_block.capacity() < data.len() {
            self.rx_block.reserve(RX_BLOCK.max(data.len()));
        }
        self.rx_block.extend_from_slice(data);
        self.rx_block.split().freeze()
    }

    fn peer(&self, friend: u32) -> Option<PublicKey> {
        let pk = self.by_number.get(&friend).copied();
        if pk.is_none() {
            trace!(friend, "event for an unknown friend number");
        }
        pk
    }

    /// A packet came from `pk`: note it if `pk` is a stranger.
    fn heard(&mut self, pk: PublicKey) {
        if !self.strangers.is_empty() && self.strangers.contains(&pk) {
            self.heard_strangers.insert(pk);
        }
    }
}

impl Callbacks for Inbox {
    fn self_connection(&mut self, status: Connection) {
        info!(?status, "dht connection");
        self.connection = status;
        self.push(ToxEvent::SelfConnection(status));
    }

    fn friend_connection(&mut self, friend: u32, status: Connection) {
        let Some(pk) = self.peer(friend) else { return };
        info!(peer = %pk.short(), ?status, "friend connection");
        self.push(ToxEvent::FriendConnection { pk, status });
    }

    fn friend_request(&mut self, pk: PublicKey, message: &[u8]) {
        if pk != self.own_pk {
            let kept = if message.starts_with(crate::pairing::REQUEST_PREFIX.as_bytes()) {
                message.to_vec()
            } else {
                Vec::new()
            };
            self.requests.push((pk, kept));
        }
    }

    fn lossy_packet(&mut self, friend: u32, data: &[u8]) {
        let Some(pk) = self.peer(friend) else { return };
        self.heard(pk);
        self.lossy_received += 1;
        self.received_last_iteration += 1;
        self.last_packet = Some(Instant::now());
        trace!(peer = %pk.short(), len = data.len(), "lossy packet received");
        let ev = ToxEvent::Lossy {
            pk,
            data: self.copy(data),
        };
        if !self.pending.is_empty() {
            self.pending.push_back(ev);
        } else if let Err(mpsc::error::TrySendError::Full(_)) = self.events.try_send(ev) {
            self.lossy_dropped += 1;
        }
    }

    fn lossless_packet(&mut self, friend: u32, data: &[u8]) {
        let Some(pk) = self.peer(friend) else { return };
        self.heard(pk);
        self.lossless_received += 1;
        self.received_last_iteration += 1;
        self.last_packet = Some(Instant::now());
        let ev = ToxEvent::Lossless {
            pk,
            data: Bytes::copy_from_slice(data),
        };
        self.push(ev);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("fabric-node-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    /// A node that contacts nobody: no bootstrap nodes, no LAN discovery.
    fn offline(dir: &std::path::Path) -> ToxConfig {
        let mut c = ToxConfig::new(dir);
        c.use_public_bootstrap = false;
        c.ipv6_enabled = false;
        c
    }

    #[test]
    fn first_iteration_waits_for_answers_within_the_second() {
        let ms = Duration::from_millis;
        assert_eq!(first_iteration_delay(ms(0)), ms(950));
        assert_eq!(first_iteration_delay(ms(400)), ms(550));
        // Too little of the second left: at once (not into the next second).
        assert_eq!(first_iteration_delay(ms(950)), ms(0));
        assert_eq!(first_iteration_delay(ms(999)), ms(0));
        for t in 0..950 {
            // The first iteration falls SECOND_END_MARGIN before the second ends.
            let due = ms(t) + first_iteration_delay(ms(t)) + SECOND_END_MARGIN;
            assert_eq!(due, ms(1000), "{t} ms");
        }
    }

    #[test]
    fn identity_is_created_once_and_private() {
        let d = scratch("identity");
        let id = ToxNode::identity(&d).unwrap();
        assert_eq!(ToxNode::identity(&d).unwrap(), id);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(d.join("tox.save"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(d.join("tox.save"), b"garbage").unwrap();
        let err = ToxNode::identity(&d).unwrap_err();
        assert!(err.to_string().contains("corrupt"), "{err}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[tokio::test]
    async fn offline_node_api() {
        let d = scratch("api");
        let id = ToxNode::identity(&d).unwrap();
        let (h, _events) = ToxNode::spawn(offline(&d)).unwrap();
        assert_eq!(h.id(), id, "spawn loads the saved identity");
        let stranger = PublicKey([9; 32]);

        let err = h
            .try_send_lossy(stranger, Bytes::from_static(&[100]))
            .unwrap_err();
        assert!(
            matches!(err, ToxError::InvalidPacketId { id: 100, .. }),
            "{err}"
        );
        let err = h
            .send_lossless(stranger, Bytes::from_static(&[200]))
            .await
            .unwrap_err();
        assert!(matches!(err, ToxError::InvalidPacketId { .. }), "{err}");
        let err = h
            .send_lossless(stranger, Bytes::from_static(&[170]))
            .await
            .unwrap_err();
        assert!(matches!(err, ToxError::NotAFriend(_)), "{err}");

        // A lossy packet to a non-friend is accepted by the queue and counted as not sent.
        h.send_lossy(stranger, Bytes::from_static(&[200, 1]))
            .await
            .unwrap();
        h.add_friend_norequest(stranger).await.unwrap();
        let err = h
            .send_lossless(stranger, Bytes::from_static(&[170]))
            .await
            .unwrap_err();
        assert!(matches!(err, ToxError::FriendNotConnected(_)), "{err}");
        let st = h.status().await.unwrap();
        assert_eq!(st.id, id);
        assert_eq!(st.lossy_send_failed, 1);
        assert_eq!(
            st.friends,
            vec![FriendStatus {
                pk: stranger,
                connection: Connection::None
            }]
        );

        // The friend list survives a restart.
        h.shutdown().await;
        assert!(matches!(h.status().await, Err(ToxError::NodeGone)));
        let (h, _events) = ToxNode::spawn(offline(&d)).unwrap();
        let st = h.status().await.unwrap();
        assert_eq!(st.friends.len(), 1);
        assert!(h.remove_friend(stranger).await.unwrap());
        assert!(!h.remove_friend(stranger).await.unwrap());
        // Dropping the handle would stop the node too, but without waiting for its last save.
        h.shutdown().await;
        std::fs::remove_dir_all(&d).unwrap();
    }
}
