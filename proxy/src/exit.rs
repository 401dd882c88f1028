//! Exits: the client's dialer that reaches targets through exit peers, and the exit role that
//! serves them.
//!
//! ```text
//! client: front-end ─► FabricDialer ─► Peer::open ─► [exit-request header] ─► … Tox …
//! exit:   Fabric::accept ─► header ─► PolicyDialer ─► target ─► reply byte ─► relay
//! ```
//!
//! A stream starts with the exit-request header (`fabric::target`): the target, names
//! unresolved. The exit answers one byte (connected, or why not, in SOCKS5's codes) and then
//! relays bytes both ways. UDP flows travel as session datagrams (see `exit::udp`). A stream to
//! `Target::Resolver` carries the client's DNS queries to the exit's own resolvers
//! ([`dns`]).

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use fabric::id::PublicKey;
use fabric::peer::{DatagramError, Fabric, Incoming, Peer};
use fabric::target::{Grants, MAX_GRANTS, Reply, Target as WireTarget};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{Instrument as _, debug, debug_span, info, warn};

use crate::accounts::{Counted, PeerAccounts, Right, Side};
use crate::dialer::{BoxFuture, BoxedStream, DialError, Dialer, Target, UdpFlow};
use crate::mesh::Mesh;
use crate::rights::Rights;
use crate::share::Transport;

pub mod dns;
mod udp;

use self::dns::Upstreams;
use self::udp::UdpFlows;
pub use self::udp::{UdpOptions, serve_udp};

/// What the client waits for beyond the exit's own connect timeout before it counts the exit
/// as not answering: the path's round trips (a Tox TCP relay can take seconds) and a stream
/// open queued behind others.
const PATH_MARGIN: Duration = Duration::from_secs(10);

/// What the client side needs of an exit's session; [`Peer`] in the program, a stand-in in
/// tests.
pub(crate) trait ExitLink: Send + Sync + fmt::Debug {
    /// The exit's key.
    fn public_key(&self) -> PublicKey;
    /// Whether its session is up now.
    fn is_connected(&self) -> bool;
    /// Opens a stream to the exit.
    fn open(&self) -> io::Result<BoxedStream>;
    /// Sends one session datagram to the exit.
    fn send_datagram(&self, payload: Vec<u8>) -> Result<(), DatagramError>;
}

impl ExitLink for Peer {
    fn public_key(&self) -> PublicKey {
        Self::public_key(self)
    }

    fn is_connected(&self) -> bool {
        Self::is_connected(self)
    }

    fn open(&self) -> io::Result<BoxedStream> {
        Ok(Box::new(Self::open(self)?))
    }

    fn send_datagram(&self, payload: Vec<u8>) -> Result<(), DatagramError> {
        Self::send_datagram(self, payload)
    }
}

/// One configured exit: its key from the start, its session once it first came up (the
/// session then reconnects by itself, so a slot is filled once).
#[derive(Debug)]
struct ExitSlot {
    key: PublicKey,
    link: OnceLock<Arc<dyn ExitLink>>,
}

/// The configured exits, in the order given, whether or not their sessions are up yet: the
/// order is the failover order, not the order in which sessions happen to come up. Shared by
/// the dialer and its UDP flows, so a flow can move to an exit that came up after it began.
#[derive(Debug, Default)]
pub(crate) struct Exits {
    slots: Vec<ExitSlot>,
}

/// [`FabricDialer::add_exit`] was given a peer that is not one of the configured exits.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
#[error("{0} is not one of the configured exits")]
pub struct UnknownExit(PublicKey);

impl Exits {
    fn new(keys: impl IntoIterator<Item = PublicKey>) -> Self {
        let mut slots: Vec<ExitSlot> = Vec::new();
        for key in keys {
            // The same exit given twice keeps its first place.
            if slots.iter().all(|s| s.key != key) {
                slots.push(ExitSlot {
                    key,
                    link: OnceLock::new(),
                });
            }
        }
        Self { slots }
    }

    fn fill(&self, link: Arc<dyn ExitLink>) -> Result<(), UnknownExit> {
        let key = link.public_key();
        let slot = self
            .slots
            .iter()
            .find(|s| s.key == key)
            .ok_or(UnknownExit(key))?;
        // Filled already: the session it holds reconnects by itself; keep it.
        let _ = slot.link.set(link);
        Ok(())
    }

    fn links(&self) -> impl Iterator<Item = &Arc<dyn ExitLink>> {
        self.slots.iter().filter_map(|s| s.link.get())
    }

    /// Exits with a live session in the configured order, then those whose session is down
    /// (it may be back by the time the stream is opened).
    fn failover_order(&self) -> Vec<Arc<dyn ExitLink>> {
        let (up, down): (Vec<_>, Vec<_>) = self.links().cloned().partition(|l| l.is_connected());
        up.into_iter().chain(down).collect()
    }

    /// The first exit, in the configured order, with a live session.
    pub(crate) fn first_connected(&self) -> Option<Arc<dyn ExitLink>> {
        self.links().find(|l| l.is_connected()).cloned()
    }
}

/// Requests held at once while no session to any exit is up; more are refused at once (each
/// held one is a task and, for a front-end, a connection slot already).
pub const MAX_HELD: usize = 4096;

/// Reaches targets through exit peers. With several exits, new flows go to the first one in
/// the order given that has a live session (failover in the order given). A request made
/// while no session is up (the tunnel is still coming up, or an exit is reconnecting) waits
/// for one, up to the connect timeout, instead of being refused.
#[derive(Debug, Clone)]
pub struct FabricDialer {
    exits: Arc<Exits>,
    /// How long a request waits for a session to any exit.
    connect_timeout: Duration,
    /// How long to wait for the exit's answer (its own connect timeout plus the path).
    reply_timeout: Duration,
    udp: Arc<UdpFlows>,
    /// Bumped when an exit's slot fills or any session comes up or ends: what held requests
    /// wait on.
    changes: Arc<tokio::sync::watch::Sender<u64>>,
    /// Requests waiting for a session now.
    held: Arc<AtomicUsize>,
    /// Where streams opened through the peers are counted, if anywhere.
    books: Option<Arc<PeerAccounts>>,
}

/// How one exit's attempt ended, when it did not connect.
#[derive(Debug)]
enum ViaError {
    /// The destination's own answer, which another exit would only repeat (after as long a
    /// wait, for a timeout).
    Final(DialError),
    /// This exit failed (no answer, its stream broke, it is busy): the next one may do.
    TryNext(DialError),
}

impl FabricDialer {
    /// A dialer over `exits` (their keys in failover order), none of them connected yet: hand
    /// each session over with [`FabricDialer::add_exit`] when it comes up.
    pub fn new(connect_timeout: Duration, exits: impl IntoIterator<Item = PublicKey>) -> Self {
        Self {
            exits: Arc::new(Exits::new(exits)),
            connect_timeout,
            reply_timeout: connect_timeout.saturating_add(PATH_MARGIN),
            udp: Arc::default(),
            changes: Arc::new(tokio::sync::watch::channel(0).0),
            held: Arc::default(),
            books: None,
        }
    }

    /// Counts the streams opened through the peers in `books`, as used.
    pub fn with_accounts(mut self, books: Arc<PeerAccounts>) -> Self {
        self.books = Some(books);
        self
    }

    /// Wakes held requests whenever one of `fabric`'s sessions comes up or ends, until it
    /// shuts down. Run it as a task beside the dialer.
    pub fn follow_sessions(&self, fabric: &Fabric) -> impl Future<Output = ()> + Send + 'static {
        let mut sessions = fabric.session_changes();
        let changes = self.changes.clone();
        async move {
            while sessions.changed().await.is_ok() {
                changes.send_modify(|n| *n += 1);
            }
        }
    }

    /// Whether `pk` is one of this dialer's peers (exits).
    pub fn dials(&self, pk: &PublicKey) -> bool {
        self.exits.slots.iter().any(|s| &s.key == pk)
    }

    /// How many requests wait for a session now (for `proxy status`).
    pub fn held(&self) -> Arc<AtomicUsize> {
        self.held.clone()
    }

    /// Waits until some exit's session is up, at most until `deadline`; false when none came
    /// (or too many requests wait already).
    async fn ready(&self, deadline: tokio::time::Instant) -> bool {
        let mut counted = false;
        let up = loop {
            // Subscribed before looking: a change between the look and the wait is not lost.
            let mut changes = self.changes.subscribe();
            if self.exits.first_connected().is_some() {
                break true;
            }
            if !counted {
                if self.held.fetch_add(1, Ordering::Relaxed) >= MAX_HELD {
                    self.held.fetch_sub(1, Ordering::Relaxed);
                    return false;
                }
                counted = true;
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { break false },
                () = tokio::time::sleep_until(deadline) => break false,
            }
        };
        if counted {
            self.held.fetch_sub(1, Ordering::Relaxed);
        }
        up
    }

    /// Hands the datagrams the exits send to this dialer's UDP flows, until `fabric` shuts
    /// down. Run it as a task beside the dialer.
    pub fn deliver_datagrams(
        &self,
        fabric: Arc<Fabric>,
    ) -> impl Future<Output = ()> + Send + 'static {
        self.udp.clone().run(fabric)
    }

    /// Makes the session to `peer`, one of the configured exits, available in that exit's
    /// place of the failover order.
    pub fn add_exit(&self, peer: Peer) -> Result<(), UnknownExit> {
        self.add_link(Arc::new(peer))
    }

    /// [`FabricDialer::add_exit`] for a session shared with other dialers (a peer that is
    /// both an exit and reachable by name has one session). A peer that is not one of this
    /// dialer's is ignored.
    pub fn add_peer(&self, peer: Arc<Peer>) {
        let _ = self.add_link(peer);
    }

    /// A round trip to the peer itself over its session (nothing is dialed there), once the
    /// session is up: what answers a ping of its overlay address.
    pub async fn ping(&self) -> Result<(), DialError> {
        let mut stream = self.open(WireTarget::Ping, &[]).await?;
        let _ = stream.shutdown().await;
        Ok(())
    }

    /// What the peer lets this node do there, once its session is up.
    pub async fn grants(&self) -> Result<Grants, DialError> {
        let stream = self.open(WireTarget::Grants, &[]).await?;
        let mut answer = Vec::new();
        let mut limited = stream.take(MAX_GRANTS as u64);
        tokio::time::timeout(self.reply_timeout, limited.read_to_end(&mut answer))
            .await
            .map_err(|_| DialError::TimedOut)?
            .map_err(DialError::Other)?;
        Grants::parse(&answer).ok_or_else(|| {
            DialError::Other(io::Error::new(
                io::ErrorKind::InvalidData,
                "a malformed grants answer",
            ))
        })
    }

    /// Introduces `entries` to the peer (see [`crate::introduce`]), once its session is up;
    /// an error unless it took them.
    pub async fn introduce(
        &self,
        entries: &[fabric::introduction::Introduced],
    ) -> Result<(), DialError> {
        let body = fabric::introduction::emit(entries)
            .map_err(|e| DialError::Other(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
        let mut stream = self.open(WireTarget::Introduce, &body).await?;
        let _ = stream.shutdown().await;
        Ok(())
    }

    /// Tells the peer that what this node grants it changed, once its session is up (it asks
    /// again).
    pub async fn grants_changed(&self) -> Result<(), DialError> {
        let mut stream = self.open(WireTarget::GrantsChanged, &[]).await?;
        let _ = stream.shutdown().await;
        Ok(())
    }

    /// A stream to port `port` that the peer shares on its loopback (`NAME.tox:PORT`), once
    /// its session is up.
    pub async fn open_share(&self, port: u16) -> Result<BoxedStream, DialError> {
        self.open(WireTarget::Share(port), &[]).await
    }

    fn add_link(&self, link: Arc<dyn ExitLink>) -> Result<(), UnknownExit> {
        self.exits.fill(link)?;
        self.changes.send_modify(|n| *n += 1);
        Ok(())
    }

    /// A stream to `target` through `link`, `first` sent right behind the request header in
    /// the same write (the exit hands those bytes on once it accepted the stream).
    async fn connect_via(
        &self,
        link: &dyn ExitLink,
        target: &WireTarget,
        first: &[u8],
    ) -> Result<BoxedStream, ViaError> {
        let mut header = Vec::with_capacity(64 + first.len());
        target.emit(&mut header).map_err(|e| {
            ViaError::Final(DialError::Other(io::Error::new(
                io::ErrorKind::InvalidInput,
                e,
            )))
        })?;
        header.extend_from_slice(first);
        let exchange = async {
            let mut stream = link.open()?;
            stream.write_all(&header).await?;
            let mut code = [0u8; 1];
            stream.read_exact(&mut code).await?;
            Ok::<_, io::Error>((stream, code[0]))
        };
        // Only a missing answer is the exit's failure; the exit answers TimedOut itself when
        // the destination does not answer within its connect timeout.
        let (stream, code) = match tokio::time::timeout(self.reply_timeout, exchange).await {
            Err(_) => {
                let e = io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the exit did not answer within {:?}", self.reply_timeout),
                );
                return Err(ViaError::TryNext(DialError::Other(e)));
            }
            Ok(Err(e)) => return Err(ViaError::TryNext(DialError::Other(e))),
            Ok(Ok(answer)) => answer,
        };
        match Reply::from_byte(code) {
            Reply::Connected => {
                let right = match target {
                    WireTarget::Ping
                    | WireTarget::Grants
                    | WireTarget::Introduce
                    | WireTarget::GrantsChanged => None,
                    WireTarget::Share(_) => Some(Right::Share),
                    _ => Some(Right::Exit),
                };
                Ok(match (&self.books, right) {
                    (Some(books), Some(right)) => Box::new(Counted::new(
                        stream,
                        books.clone(),
                        link.public_key(),
                        right,
                    )),
                    _ => stream,
                })
            }
            Reply::NotAllowed => Err(ViaError::Final(DialError::PolicyDenied(format!(
                "the exit does not allow {target}"
            )))),
            // Routes are the exit's own (one may lack IPv6): another exit may have one.
            Reply::NetworkUnreachable => Err(ViaError::TryNext(DialError::NetworkUnreachable)),
            Reply::HostUnreachable => Err(ViaError::Final(DialError::HostUnreachable)),
            Reply::Refused => Err(ViaError::Final(DialError::Refused)),
            Reply::TimedOut => Err(ViaError::Final(DialError::TimedOut)),
            _ => Err(ViaError::TryNext(DialError::Other(io::Error::other(
                "the exit refused the stream (over its limits) or failed",
            )))),
        }
    }
}

impl FabricDialer {
    /// A stream to `target` through the first exit that answers, in failover order, once a
    /// session to one is up (waiting for one up to the connect timeout).
    ///
    /// When every exit failed and a session changed meanwhile (the one the request went on
    /// ended under it: the peer restarted, or a crossing Open replaced it), the request is
    /// made once more on the next session, within the same connect timeout: a request made
    /// in the moment a peer comes back waits for it, as one made while the tunnel comes up
    /// does.
    async fn open(&self, target: WireTarget, first: &[u8]) -> Result<BoxedStream, DialError> {
        let deadline = tokio::time::Instant::now() + self.connect_timeout;
        let mut retried = false;
        loop {
            if !self.ready(deadline).await {
                return Err(no_session(self.connect_timeout));
            }
            // Subscribed before trying: a session that ends under the request is seen.
            let mut changes = self.changes.subscribe();
            let mut last = None;
            for link in self.exits.failover_order() {
                match self.connect_via(link.as_ref(), &target, first).await {
                    Ok(stream) => return Ok(stream),
                    Err(ViaError::Final(e)) => return Err(e),
                    Err(ViaError::TryNext(e)) => {
                        debug!(exit = %link.public_key(), error = %e, "exit failed, trying the next");
                        last = Some(e);
                    }
                }
            }
            let error = last.unwrap_or_else(|| no_session(self.connect_timeout));
            let session_changed = changes.has_changed().unwrap_or(false)
                || tokio::time::timeout(Duration::from_millis(500), changes.changed())
                    .await
                    .is_ok_and(|r| r.is_ok());
            if retried || !session_changed || tokio::time::Instant::now() >= deadline {
                return Err(error);
            }
            debug!(error = %error, "the session ended under the request: once more on the next");
            retried = true;
        }
    }
}

/// Why a request found no exit: none came up within the connect timeout.
fn no_session(waited: Duration) -> DialError {
    DialError::Other(io::Error::new(
        io::ErrorKind::NotConnected,
        format!(
            "no session to any exit within {} s (still connecting over Tox?)",
            waited.as_secs()
        ),
    ))
}

impl Dialer for FabricDialer {
    fn connect(&self, target: Target) -> BoxFuture<'_, Result<BoxedStream, DialError>> {
        Box::pin(self.open(to_wire(&target), &[]))
    }

    fn resolver(&self) -> Option<BoxFuture<'_, Result<BoxedStream, DialError>>> {
        Some(Box::pin(self.open(WireTarget::Resolver, &[])))
    }

    fn resolver_with(
        &self,
        first: Vec<u8>,
    ) -> Option<BoxFuture<'_, Result<BoxedStream, DialError>>> {
        Some(Box::pin(async move {
            self.open(WireTarget::Resolver, &first).await
        }))
    }

    fn udp_associate(&self) -> BoxFuture<'_, Result<Box<dyn UdpFlow>, DialError>> {
        Box::pin(async {
            let deadline = tokio::time::Instant::now() + self.connect_timeout;
            if !self.ready(deadline).await {
                return Err(no_session(self.connect_timeout));
            }
            self.udp.associate(self.exits.clone())
        })
    }
}

/// How the exit serves its clients.
#[derive(Debug, Clone)]
pub struct ExitOptions {
    /// Idle timeout of relayed connections.
    pub idle_timeout: Option<Duration>,
    /// Streams open at once over all clients (`--max-connections`); more are refused at
    /// once.
    pub max_streams: usize,
    /// Streams one client may have open at once (at most `max_streams`); more are refused at
    /// once. Each open stream may hold up to one mux window of unread data, so this also
    /// bounds what one client can make the exit buffer (256 × 4 MiB).
    pub streams_per_client: usize,
    /// How long a client has to send its request header.
    pub header_timeout: Duration,
    /// Where the clients' DNS queries go (`--dns`, else the system's resolvers).
    pub resolvers: Arc<Upstreams>,
    /// The peers and what each may ask for (none by default: every stream is refused).
    pub mesh: Arc<Mesh>,
    /// What was served for each peer, and refused.
    pub accounts: Arc<PeerAccounts>,
    /// Dials shared ports (on loopback, no policy).
    pub loopback: crate::dialer::DirectDialer,
    /// What peers told this node, for its live side to act on.
    pub news: Option<tokio::sync::mpsc::Sender<PeerNews>>,
}

/// What a peer told this node that its live side acts on ([`crate::node::introductions`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerNews {
    /// A peer an introduction made known: to befriend and dial.
    Introduced(fabric::id::ToxId),
    /// What this peer grants this node changed: ask it again.
    GrantsChanged(PublicKey),
}

impl Default for ExitOptions {
    fn default() -> Self {
        Self {
            idle_timeout: Some(Duration::from_secs(300)),
            max_streams: 1024,
            streams_per_client: 256,
            header_timeout: Duration::from_secs(30),
            resolvers: Arc::new(Upstreams::new(Vec::new())),
            mesh: Arc::default(),
            accounts: Arc::default(),
            loopback: crate::dialer::DirectDialer::new(Duration::from_secs(10)),
            news: None,
        }
    }
}

/// Which streams the exit takes: at most `total` at once over all clients, and at most
/// `per_client` for any one client.
#[derive(Debug)]
struct StreamLimits {
    total: Arc<Semaphore>,
    per_client: usize,
    clients: HashMap<PublicKey, Arc<Semaphore>>,
}

/// A stream the limits let in; dropping it gives its places back.
#[derive(Debug)]
struct Admitted {
    _total: OwnedSemaphorePermit,
    _client: OwnedSemaphorePermit,
}

/// Why a stream was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// The exit has `max_streams` open.
    ExitFull,
    /// This client has `streams_per_client` open.
    ClientFull,
}

impl StreamLimits {
    fn new(options: &ExitOptions) -> Self {
        // A semaphore cannot count beyond MAX_PERMITS (and would panic): more is unlimited
        // in practice anyway.
        let total = options.max_streams.min(Semaphore::MAX_PERMITS);
        Self {
            total: Arc::new(Semaphore::new(total)),
            per_client: options.streams_per_client.min(total),
            clients: HashMap::new(),
        }
    }

    fn admit(&mut self, peer: PublicKey) -> Result<Admitted, Refusal> {
        let per_client = self.per_client;
        let client = self
            .clients
            .entry(peer)
            .or_insert_with(|| Arc::new(Semaphore::new(per_client)))
            .clone();
        // The client's own limit first: a client at its limit must not take the exit's
        // places from the others.
        let client = client
            .try_acquire_owned()
            .map_err(|_| Refusal::ClientFull)?;
        let total = self
            .total
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::ExitFull)?;
        Ok(Admitted {
            _total: total,
            _client: client,
        })
    }
}

/// Refused streams, logged at debug one by one and at warn at most once a minute: a client
/// hammering a full exit must not flood the log.
#[derive(Debug, Default)]
struct Refusals {
    count: u64,
    last_warning: Option<Instant>,
}

const REFUSAL_WARNING_EVERY: Duration = Duration::from_secs(60);

impl Refusals {
    fn note(&mut self, peer: PublicKey, why: Refusal, now: Instant) {
        self.count += 1;
        let limit = match why {
            Refusal::ExitFull => "the exit's stream limit (--max-connections)",
            Refusal::ClientFull => "the client's stream limit",
        };
        debug!(%peer, refused = self.count, "stream refused: {limit} reached");
        if self
            .last_warning
            .is_none_or(|at| now.duration_since(at) >= REFUSAL_WARNING_EVERY)
        {
            self.last_warning = Some(now);
            warn!(refused = self.count, "refusing streams: {limit} reached");
        }
    }
}

/// Serves the streams peers open until the fabric shuts down: reads each stream's request,
/// checks it against what the peer may do (`options.rights`), dials it (an exit request with
/// `dialer`, which applies the exit policy; a shared port on this host's loopback), answers,
/// relays.
pub async fn serve(fabric: Arc<Fabric>, dialer: Arc<dyn Dialer>, options: ExitOptions) {
    let mut limits = StreamLimits::new(&options);
    let mut refusals = Refusals::default();
    while let Some(incoming) = fabric.accept().await {
        // Refused at once rather than queued: a queued stream still holds whatever its
        // client sent, so a queue would let clients make the exit buffer without bound.
        let admitted = match limits.admit(incoming.peer) {
            Ok(admitted) => admitted,
            Err(why) => {
                refusals.note(incoming.peer, why, Instant::now());
                let mut stream = incoming.stream;
                tokio::spawn(async move {
                    let _ = stream.write_all(&[Reply::GeneralFailure.to_byte()]).await;
                    let _ = stream.shutdown().await;
                });
                continue;
            }
        };
        let dialer = dialer.clone();
        let options = options.clone();
        let span = debug_span!("stream", peer = %incoming.peer, id = incoming.stream.id().0);
        tokio::spawn(
            async move {
                let _admitted = admitted;
                if let Err(error) = serve_stream(incoming, dialer.as_ref(), &options).await {
                    debug!(%error, "exit stream ended with an error");
                }
            }
            .instrument(span),
        );
    }
    info!("exit stopped accepting streams");
}

async fn serve_stream(
    incoming: Incoming,
    dialer: &dyn Dialer,
    options: &ExitOptions,
) -> io::Result<()> {
    let peer = incoming.peer;
    let mut stream = incoming.stream;
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    let (target, used) = loop {
        match WireTarget::parse(&buf) {
            Ok(Some(t)) => break t,
            Ok(None) => {}
            Err(e) => {
                warn!(peer = %peer, error = %e, "bad exit request");
                let _ = stream.write_all(&[Reply::GeneralFailure.to_byte()]).await;
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
        }
        let n = tokio::time::timeout(options.header_timeout, stream.read(&mut chunk))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no request header"))??;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let rights = options.mesh.now().rights.of(&peer);
    if let Err(why) = permitted(&rights, &target) {
        options.accounts.refused(peer);
        info!(peer = %peer, %target, "refused: {why}");
        stream.write_all(&[Reply::NotAllowed.to_byte()]).await?;
        stream.shutdown().await?;
        return Ok(());
    }
    let target = match target {
        WireTarget::Ping => {
            stream.write_all(&[Reply::Connected.to_byte()]).await?;
            stream.shutdown().await?;
            return Ok(());
        }
        WireTarget::Grants => {
            let grants = Grants {
                exit: rights.exit,
                shares: rights.share.to_string(),
                introducer: rights.introduce,
            };
            let mut answer = vec![Reply::Connected.to_byte()];
            // Too many ranges to say (beyond what any share can hold): say none, and the rest.
            let said = grants.emit().or_else(|| {
                Grants {
                    shares: String::new(),
                    ..grants
                }
                .emit()
            });
            answer.extend(said.unwrap_or_default());
            stream.write_all(&answer).await?;
            stream.shutdown().await?;
            return Ok(());
        }
        WireTarget::GrantsChanged => {
            stream.write_all(&[Reply::Connected.to_byte()]).await?;
            stream.shutdown().await?;
            if let Some(tx) = &options.news {
                // Full: the peer's grants are asked again on its next session.
                let _ = tx.try_send(PeerNews::GrantsChanged(peer));
            }
            return Ok(());
        }
        WireTarget::Introduce => {
            let reply = match read_introduction(&mut stream, &buf[used..], options).await {
                Ok(entries) => match options.mesh.introduce(peer, &entries) {
                    Ok(added) => {
                        info!(peer = %peer, introduced = entries.len(), new = added.len(), "introduction taken");
                        if let Some(tx) = &options.news {
                            for id in added {
                                // Full: befriended at the next start.
                                let _ = tx.try_send(PeerNews::Introduced(id));
                            }
                        }
                        Reply::Connected
                    }
                    Err(e) => {
                        warn!(peer = %peer, error = %e, "introduction not taken");
                        Reply::GeneralFailure
                    }
                },
                Err(e) => {
                    warn!(peer = %peer, error = %e, "bad introduction");
                    Reply::GeneralFailure
                }
            };
            stream.write_all(&[reply.to_byte()]).await?;
            stream.shutdown().await?;
            return Ok(());
        }
        WireTarget::Share(port) => {
            let upstream = match dial_loopback(port, options).await {
                Ok(s) => s,
                Err(e) => {
                    info!(peer = %peer, port, error = %e, "shared port did not answer");
                    stream.write_all(&[reply_for(&e).to_byte()]).await?;
                    stream.shutdown().await?;
                    return Ok(());
                }
            };
            debug!(peer = %peer, port, "shared port connected");
            return answer_and_relay(
                stream,
                upstream,
                &buf[used..],
                options,
                (peer, Right::Share),
            )
            .await;
        }
        other => from_wire(other),
    };
    let Some(target) = target else {
        // The exit's own resolvers: no destination policy applies (the client names no
        // destination) and none is bypassed (queries go only where the exit's own do).
        debug!(peer = %peer, "dns through the exit's resolvers");
        options.accounts.opened(peer, Side::Served, Right::Exit);
        stream.write_all(&[Reply::Connected.to_byte()]).await?;
        let (reader, mut writer) = tokio::io::split(stream);
        // Queries the client sent right behind its header come first.
        let mut reader = (&buf[used..]).chain(reader);
        let answered = dns::serve(&mut reader, &mut writer, &options.resolvers).await?;
        debug!(peer = %peer, answered, "dns stream done");
        return Ok(());
    };
    let upstream = match dialer.connect(target.clone()).await {
        Ok(s) => s,
        Err(e) => {
            info!(peer = %peer, %target, error = %e, "exit refused or failed");
            stream.write_all(&[reply_for(&e).to_byte()]).await?;
            stream.shutdown().await?;
            return Ok(());
        }
    };
    debug!(peer = %peer, %target, "exit connected");
    answer_and_relay(stream, upstream, &buf[used..], options, (peer, Right::Exit)).await
}

/// Says "connected", hands the target what the peer sent behind its header, and relays.
async fn answer_and_relay(
    mut stream: fabric::mux::io::Stream,
    mut upstream: BoxedStream,
    early: &[u8],
    options: &ExitOptions,
    (peer, right): (PublicKey, Right),
) -> io::Result<()> {
    options.accounts.opened(peer, Side::Served, right);
    stream.write_all(&[Reply::Connected.to_byte()]).await?;
    upstream.write_all(early).await?;
    let mut moved = crate::relay::relay(&mut stream, &mut upstream, options.idle_timeout).await?;
    moved.up += early.len() as u64;
    options.accounts.relayed(peer, Side::Served, right, moved);
    Ok(())
}

/// Whether a peer with `rights` may ask for `target`: exit requests (addresses, names, the
/// resolver) need the exit right, a shared port the share of that port. A `.tox` name is refused even to an
/// exit's peers: it names a peer of theirs, and this node never forwards to a third peer
/// (nor asks DNS about it).
fn permitted(rights: &Rights, target: &WireTarget) -> Result<(), String> {
    match target {
        WireTarget::Share(port) if rights.share.contains(*port, Transport::Tcp) => Ok(()),
        WireTarget::Share(port) => Err(format!("port {port} is not shared with this peer")),
        // A session is only held with known or allowed peers: they may know it answers, and
        // what they may do here.
        WireTarget::Ping | WireTarget::Grants | WireTarget::GrantsChanged => Ok(()),
        WireTarget::Introduce if rights.introduce => Ok(()),
        WireTarget::Introduce => Err("this node does not take this peer as its introducer".into()),
        _ if !rights.exit => Err("this peer may not use this node as its exit".into()),
        WireTarget::Name(name, _) if fabric::overlay::TargetName::parse(name).is_some() => {
            Err("a .tox name is a peer of the client's: no transit through this node".into())
        }
        _ => Ok(()),
    }
}

/// The body of an introduction: what followed the header in `early`, then the rest from
/// `stream`, bounded in size and in time (the header's timeout).
async fn read_introduction(
    stream: &mut fabric::mux::io::Stream,
    early: &[u8],
    options: &ExitOptions,
) -> io::Result<Vec<fabric::introduction::Introduced>> {
    use fabric::introduction::{MAX_BODY, body_len, parse};
    let mut body = early.to_vec();
    let read = async {
        let mut chunk = [0u8; 1024];
        loop {
            if body.len() >= 2 {
                let len = body_len([body[0], body[1]])
                    .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "too long"))?;
                if body.len() >= 2 + len {
                    return parse(&body[2..2 + len])
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e));
                }
            }
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "cut short"));
            }
            if body.len() + n > MAX_BODY {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "too long"));
            }
            body.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(options.header_timeout, read)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no introduction"))?
}

/// A shared port, on this host's loopback: IPv4 first, then IPv6 (a service may listen on
/// either). No exit policy applies: the user shared this port by its number.
async fn dial_loopback(port: u16, options: &ExitOptions) -> Result<BoxedStream, DialError> {
    let v4 = std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, port));
    let v6 = std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port));
    match options.loopback.connect(Target::Ip(v4)).await {
        Ok(s) => Ok(s),
        Err(first) => options
            .loopback
            .connect(Target::Ip(v6))
            .await
            .map_err(|_| first),
    }
}

/// A target as the exit-request header carries it (names unresolved).
fn to_wire(target: &Target) -> WireTarget {
    match target {
        Target::Ip(a) => WireTarget::Ip(*a),
        Target::Domain(name, port) => WireTarget::Name(name.clone(), *port),
    }
}

/// A target from an exit-request header; `None` for the exit's resolver, which is no
/// destination to dial.
fn from_wire(target: WireTarget) -> Option<Target> {
    match target {
        WireTarget::Ip(a) => Some(Target::Ip(a)),
        WireTarget::Name(n, p) => Some(Target::Domain(n, p)),
        WireTarget::Resolver
        | WireTarget::Share(_)
        | WireTarget::Ping
        | WireTarget::Grants
        | WireTarget::Introduce
        | WireTarget::GrantsChanged => None,
    }
}

fn reply_for(e: &DialError) -> Reply {
    match e {
        DialError::Refused => Reply::Refused,
        DialError::HostUnreachable | DialError::Resolve(_) => Reply::HostUnreachable,
        DialError::NetworkUnreachable => Reply::NetworkUnreachable,
        DialError::TimedOut => Reply::TimedOut,
        DialError::PolicyDenied(_) => Reply::NotAllowed,
        DialError::Other(_) => Reply::GeneralFailure,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use fabric::target::UdpHeader;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// An exit played in-process: it reads the request header and answers `reply` (or
    /// never answers when `None`), counting the streams opened to it.
    #[derive(Debug)]
    struct FakeExit {
        key: PublicKey,
        up: AtomicBool,
        reply: Option<Reply>,
        opened: AtomicUsize,
        datagrams: Mutex<Vec<Vec<u8>>>,
        /// Every byte it read before answering (all of them, when it never answers).
        before_reply: Arc<Mutex<Vec<u8>>>,
    }

    impl FakeExit {
        fn new(n: u8, reply: Option<Reply>) -> Arc<Self> {
            Arc::new(Self {
                key: PublicKey([n; 32]),
                up: AtomicBool::new(true),
                reply,
                opened: AtomicUsize::new(0),
                datagrams: Mutex::default(),
                before_reply: Arc::default(),
            })
        }

        fn opened(&self) -> usize {
            self.opened.load(Ordering::SeqCst)
        }
    }

    impl ExitLink for FakeExit {
        fn public_key(&self) -> PublicKey {
            self.key
        }

        fn is_connected(&self) -> bool {
            self.up.load(Ordering::SeqCst)
        }

        fn open(&self) -> io::Result<BoxedStream> {
            self.opened.fetch_add(1, Ordering::SeqCst);
            let (client, mut exit) = tokio::io::duplex(4096);
            let reply = self.reply;
            let before_reply = self.before_reply.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 256];
                while !matches!(WireTarget::parse(&buf), Ok(Some(_))) {
                    match exit.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                before_reply.lock().unwrap().extend_from_slice(&buf);
                let Some(reply) = reply else {
                    // Never answers: keeps what comes until the client drops the stream.
                    while let Ok(n @ 1..) = exit.read(&mut chunk).await {
                        before_reply.lock().unwrap().extend_from_slice(&chunk[..n]);
                    }
                    return;
                };
                let _ = exit.write_all(&[reply.to_byte()]).await;
                // Hold the stream until the client drops it.
                let _ = exit.read(&mut chunk).await;
            });
            Ok(Box::new(client))
        }

        fn send_datagram(&self, payload: Vec<u8>) -> Result<(), DatagramError> {
            if !self.is_connected() {
                return Err(DatagramError::NoSession);
            }
            self.datagrams.lock().unwrap().push(payload);
            Ok(())
        }
    }

    fn dialer(exits: &[&Arc<FakeExit>]) -> FabricDialer {
        FabricDialer::new(Duration::from_secs(10), exits.iter().map(|e| e.key))
    }

    fn add(dialer: &FabricDialer, exit: &Arc<FakeExit>) {
        dialer.add_link(exit.clone()).unwrap();
    }

    /// Lets spawned tasks run until `held` requests wait (virtual time does not move: this
    /// task never sleeps).
    async fn until_held(dialer: &FabricDialer, held: usize) {
        while dialer.held().load(Ordering::SeqCst) != held {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_made_before_any_exit_is_up_waits_for_one() {
        let exit = FakeExit::new(1, Some(Reply::Connected));
        let dialer = dialer(&[&exit]);
        let started = tokio::time::Instant::now();
        let pending = tokio::spawn({
            let dialer = dialer.clone();
            async move { dialer.connect(target()).await.map(|_| ()) }
        });
        let udp = tokio::spawn({
            let dialer = dialer.clone();
            async move { dialer.udp_associate().await.map(|_| ()) }
        });
        until_held(&dialer, 2).await;
        tokio::time::advance(Duration::from_secs(7)).await;
        assert!(!pending.is_finished(), "held, not refused");
        add(&dialer, &exit);
        pending
            .await
            .unwrap()
            .expect("served once the exit came up");
        udp.await.unwrap().expect("udp associate served too");
        assert_eq!(started.elapsed(), Duration::from_secs(7));
        assert_eq!(dialer.held().load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_waits_at_most_the_connect_timeout() {
        let exit = FakeExit::new(1, Some(Reply::Connected));
        let dialer = dialer(&[&exit]);
        let started = tokio::time::Instant::now();
        let err = dialer.connect(target()).await.unwrap_err();
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        assert!(err.to_string().contains("no session to any exit"), "{err}");
        assert_eq!(dialer.held().load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_waits_while_the_exit_reconnects() {
        let exit = FakeExit::new(1, Some(Reply::Connected));
        let dialer = dialer(&[&exit]);
        add(&dialer, &exit);
        exit.up.store(false, Ordering::SeqCst);
        let pending = tokio::spawn({
            let dialer = dialer.clone();
            async move { dialer.connect(target()).await.map(|_| ()) }
        });
        until_held(&dialer, 1).await;
        assert_eq!(exit.opened(), 0, "nothing opened on a session that is down");
        // The session comes back: the fabric's change reaches the dialer.
        exit.up.store(true, Ordering::SeqCst);
        dialer.changes.send_modify(|n| *n += 1);
        pending.await.unwrap().expect("served after the reconnect");
        assert_eq!(exit.opened(), 1);
    }

    fn target() -> Target {
        "example.test:443".parse().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_resolver_query_travels_with_the_request_for_the_stream() {
        // The exit never answers the request, and still gets the query: the client does not
        // wait for the stream to be accepted before sending it (one round trip per lookup).
        let exit = FakeExit::new(1, None);
        let dialer = dialer(&[&exit]);
        add(&dialer, &exit);
        let query = dns::framed(b"a query").unwrap();
        let pending = tokio::spawn({
            let dialer = dialer.clone();
            let query = query.clone();
            async move { dialer.resolver_with(query).unwrap().await.map(|_| ()) }
        });
        let mut expected = Vec::new();
        WireTarget::Resolver.emit(&mut expected).unwrap();
        expected.extend_from_slice(&query);
        for _ in 0..1000 {
            if exit.before_reply.lock().unwrap().len() >= expected.len() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(*exit.before_reply.lock().unwrap(), expected);
        pending.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_destination_timeout_is_final_and_not_retried_on_the_next_exit() {
        let first = FakeExit::new(1, Some(Reply::TimedOut));
        let second = FakeExit::new(2, Some(Reply::Connected));
        let dialer = dialer(&[&first, &second]);
        add(&dialer, &first);
        add(&dialer, &second);
        let err = dialer.connect(target()).await.unwrap_err();
        assert!(matches!(err, DialError::TimedOut), "{err:?}");
        assert_eq!((first.opened(), second.opened()), (1, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn an_exit_that_does_not_answer_fails_over_after_the_reply_wait() {
        let silent = FakeExit::new(1, None);
        let second = FakeExit::new(2, Some(Reply::Connected));
        let dialer = dialer(&[&silent, &second]);
        add(&dialer, &silent);
        add(&dialer, &second);
        let started = tokio::time::Instant::now();
        dialer.connect(target()).await.unwrap();
        // The exit's connect timeout plus the path's margin, in virtual time.
        let waited = started.elapsed();
        let want = Duration::from_secs(10) + PATH_MARGIN;
        assert!(
            (want..want + Duration::from_millis(10)).contains(&waited),
            "{waited:?}"
        );
        assert_eq!((silent.opened(), second.opened()), (1, 1));
    }

    #[tokio::test]
    async fn busy_or_routeless_exits_fail_over_and_destination_answers_do_not() {
        for (reply, fails_over) in [
            (Reply::GeneralFailure, true),
            (Reply::NetworkUnreachable, true),
            (Reply::Refused, false),
            (Reply::HostUnreachable, false),
            (Reply::NotAllowed, false),
            (Reply::TimedOut, false),
        ] {
            let first = FakeExit::new(1, Some(reply));
            let second = FakeExit::new(2, Some(Reply::Connected));
            let dialer = dialer(&[&first, &second]);
            add(&dialer, &first);
            add(&dialer, &second);
            let got = dialer.connect(target()).await;
            assert_eq!(got.is_ok(), fails_over, "{reply:?}");
            assert_eq!(second.opened(), usize::from(fails_over), "{reply:?}");
        }
    }

    #[tokio::test]
    async fn failover_follows_the_configured_order_not_the_order_sessions_came_up() {
        let primary = FakeExit::new(1, Some(Reply::Connected));
        let backup = FakeExit::new(2, Some(Reply::Connected));
        let dialer = dialer(&[&primary, &backup]);
        // No session yet: a clear error, nothing opened.
        let err = dialer.connect(target()).await.unwrap_err();
        assert!(err.to_string().contains("no session"), "{err}");
        // The backup comes up first and serves meanwhile.
        add(&dialer, &backup);
        dialer.connect(target()).await.unwrap();
        assert_eq!((primary.opened(), backup.opened()), (0, 1));
        // Once the primary is up it takes new streams.
        add(&dialer, &primary);
        dialer.connect(target()).await.unwrap();
        assert_eq!((primary.opened(), backup.opened()), (1, 1));
        // While its session is down, the backup takes them again.
        primary.up.store(false, Ordering::SeqCst);
        dialer.connect(target()).await.unwrap();
        assert_eq!((primary.opened(), backup.opened()), (1, 2));

        // A peer that was never configured is not taken.
        let stranger = FakeExit::new(9, Some(Reply::Connected));
        assert!(dialer.exits.fill(stranger).is_err());
    }

    #[tokio::test]
    async fn udp_flows_can_move_to_an_exit_that_came_up_after_them() {
        let primary = FakeExit::new(1, Some(Reply::Connected));
        let backup = FakeExit::new(2, Some(Reply::Connected));
        let dialer = dialer(&[&primary, &backup]);
        add(&dialer, &backup);
        let flow = dialer.udp_associate().await.unwrap();
        let to: Target = "192.0.2.53:53".parse().unwrap();
        flow.send_to(b"one", &to).await.unwrap();
        assert_eq!(backup.datagrams.lock().unwrap().len(), 1);
        // The primary comes up after the flow began; then the backup's session drops.
        add(&dialer, &primary);
        backup.up.store(false, Ordering::SeqCst);
        flow.send_to(b"two", &to).await.unwrap();
        assert_eq!(primary.datagrams.lock().unwrap().len(), 1);
        primary.up.store(false, Ordering::SeqCst);
        let err = flow.send_to(b"three", &to).await.unwrap_err();
        assert!(err.to_string().contains("no session"), "{err}");
    }

    #[tokio::test]
    async fn a_flow_takes_datagrams_only_from_the_exit_it_goes_through() {
        let primary = FakeExit::new(1, Some(Reply::Connected));
        let other = FakeExit::new(2, Some(Reply::Connected));
        let dialer = dialer(&[&primary, &other]);
        add(&dialer, &primary);
        add(&dialer, &other);
        let flow = dialer.udp_associate().await.unwrap();
        let to: Target = "192.0.2.53:53".parse().unwrap();
        flow.send_to(b"q", &to).await.unwrap();
        // The flow's number, as the exit saw it.
        let sent = primary.datagrams.lock().unwrap()[0].clone();
        let (header, _) = UdpHeader::parse(&sent).unwrap();
        let reply = |text: &[u8]| {
            UdpHeader {
                flow: header.flow,
                addr: WireTarget::Ip("192.0.2.53:53".parse().unwrap()),
            }
            .datagram(text)
            .unwrap()
        };
        // Another exit (any peer with a session) guessing the number is ignored.
        let ended = UdpHeader::end(header.flow);
        dialer.udp.deliver(other.key, &reply(b"forged"));
        dialer.udp.deliver(primary.key, &reply(b"answer"));
        let mut buf = [0u8; 64];
        let (n, from) = flow.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"answer");
        assert_eq!(from, "192.0.2.53:53".parse().unwrap());
        // Closing the association tells the exit, which frees the flow at once.
        drop(flow);
        assert_eq!(
            primary.datagrams.lock().unwrap().last(),
            Some(&ended.to_vec())
        );
        assert!(other.datagrams.lock().unwrap().is_empty());
    }

    fn options(max_streams: usize, streams_per_client: usize) -> ExitOptions {
        ExitOptions {
            max_streams,
            streams_per_client,
            ..ExitOptions::default()
        }
    }

    #[test]
    fn the_exit_caps_streams_over_all_clients() {
        let (a, b, c) = (PublicKey([1; 32]), PublicKey([2; 32]), PublicKey([3; 32]));
        let mut limits = StreamLimits::new(&options(2, 256));
        let first = limits.admit(a).unwrap();
        let _second = limits.admit(b).unwrap();
        assert_eq!(limits.admit(c).unwrap_err(), Refusal::ExitFull);
        assert_eq!(limits.admit(a).unwrap_err(), Refusal::ExitFull);
        drop(first);
        let _third = limits.admit(c).unwrap();
    }

    #[test]
    fn one_client_cannot_take_the_places_of_the_others() {
        let (a, b) = (PublicKey([1; 32]), PublicKey([2; 32]));
        let mut limits = StreamLimits::new(&options(3, 2));
        let _held: Vec<_> = (0..2).map(|_| limits.admit(a).unwrap()).collect();
        assert_eq!(limits.admit(a).unwrap_err(), Refusal::ClientFull);
        // The refused stream took no place from the exit's total.
        let _b = limits.admit(b).unwrap();
        assert_eq!(limits.admit(b).unwrap_err(), Refusal::ExitFull);
        // The per-client limit never exceeds the total, and a huge total does not panic.
        assert_eq!(StreamLimits::new(&options(3, 256)).per_client, 3);
        let _huge = StreamLimits::new(&options(usize::MAX, 256));
    }

    #[test]
    fn refusals_warn_at_most_once_a_minute() {
        let mut refusals = Refusals::default();
        let t0 = Instant::now();
        refusals.note(PublicKey([1; 32]), Refusal::ExitFull, t0);
        assert_eq!(refusals.last_warning, Some(t0));
        refusals.note(
            PublicKey([1; 32]),
            Refusal::ExitFull,
            t0 + Duration::from_secs(59),
        );
        assert_eq!(refusals.last_warning, Some(t0));
        let later = t0 + REFUSAL_WARNING_EVERY;
        refusals.note(PublicKey([1; 32]), Refusal::ClientFull, later);
        assert_eq!(refusals.last_warning, Some(later));
        assert_eq!(refusals.count, 3);
    }
}
