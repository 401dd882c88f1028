//! Tokio drivers for the punching cores: STUN queries over UDP and TCP, and a task that runs a
//! [`UdpPunch`] on a socket and then carries sealed session packets.
//!
//! The link task `select!`s over the socket, one `sleep_until(poll_timeout)` and a wake-up
//! from its handle, as every driver in `fabric` does. [`UdpLink`] is its handle; session
//! packets are sealed and sent from the handle directly (no task hop per packet).

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};
use tokio::sync::{Notify, mpsc};
use tracing::Instrument as _;

use super::stun::{self, QueryError, Transaction, TransactionConfig, TransactionId};
use super::udp::{Event, Input, SendError, UdpPunch};
use crate::time::Instant;

/// Why a STUN query failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StunError {
    /// The socket failed.
    #[error("stun socket: {0}")]
    Io(#[from] io::Error),
    /// The transaction failed.
    #[error(transparent)]
    Query(#[from] QueryError),
    /// The TCP server sent something that is not STUN.
    #[error("stun server sent garbage: {0}")]
    Garbage(#[from] stun::ParseError),
    /// The TCP server closed the connection before answering.
    #[error("stun server closed the connection")]
    Closed,
}

/// How many datagrams one wake-up of the link task reads at most.
const BATCH: usize = 64;

fn random_id() -> TransactionId {
    TransactionId(rand::random())
}

/// The destination to hand a socket whose local address is `local` for reaching `dst`: a
/// socket of both families (bound to `[::]`) reaches IPv4 peers at their v4-mapped
/// addresses. Everything above the sockets deals in plain addresses ([`canonical`]).
pub(crate) fn wire_addr(local: SocketAddr, dst: SocketAddr) -> SocketAddr {
    match dst {
        SocketAddr::V4(v4) if local.is_ipv6() => {
            SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port())
        }
        other => other,
    }
}

/// `addr` as the rest of the fabric names it: an IPv4 peer seen through a socket of both
/// families arrives as `[::ffff:a.b.c.d]`, which is `a.b.c.d`.
pub(crate) fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// A UDP socket for punching: both families on one port (`[::]`, not v6-only) where the
/// host has IPv6, else IPv4 only.
pub fn bind_punch_udp() -> io::Result<UdpSocket> {
    bind_udp_port(0)
}

/// A UDP socket on `port` (0: any free port), both families where the host has IPv6.
pub fn bind_udp_port(port: u16) -> io::Result<UdpSocket> {
    let dual = || -> io::Result<std::net::UdpSocket> {
        let socket = socket2::Socket::new(
            socket2::Domain::IPV6,
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )?;
        socket.set_only_v6(false)?;
        socket.bind(&SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)).into())?;
        Ok(socket.into())
    };
    let socket = match dual() {
        Ok(socket) => socket,
        Err(error) => {
            tracing::debug!(%error, "no dual-stack udp socket, ipv4 only");
            std::net::UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, port))?
        }
    };
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket)
}

/// A TCP socket for punching, bound with port reuse to a free port: both families on
/// `[::]` where the host has IPv6, else IPv4 only.
pub fn bind_punch_tcp() -> io::Result<TcpSocket> {
    reusable_tcp_socket(SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))).or_else(|error| {
        tracing::debug!(%error, "no dual-stack tcp socket, ipv4 only");
        reusable_tcp_socket(SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0)))
    })
}

/// Asks `server` over UDP which address it sees `socket` as (our server-reflexive candidate
/// for that socket). Packets that are not the response are dropped, so run it before the
/// socket carries anything else.
pub async fn stun_udp(
    socket: &UdpSocket,
    server: SocketAddr,
    config: TransactionConfig,
) -> Result<SocketAddr, StunError> {
    let mut tx = Transaction::new(Instant::now(), random_id(), false, config);
    let mut buf = vec![0u8; 1500];
    let local = socket.local_addr()?;
    loop {
        let now = Instant::now();
        tx.handle_timeout(now);
        if let Some(request) = tx.poll_transmit(now) {
            socket.send_to(request, wire_addr(local, server)).await?;
        }
        if let Some(result) = tx.poll_result() {
            return Ok(result?);
        }
        let Some(deadline) = tx.poll_timeout() else {
            return Err(QueryError::Timeout.into());
        };
        tokio::select! {
            r = socket.recv_from(&mut buf) => {
                let (n, from) = r?;
                if canonical(from) == server {
                    tx.handle_input(Instant::now(), &buf[..n]);
                }
            }
            () = tokio::time::sleep_until(deadline.into()) => {}
        }
    }
}

/// A TCP socket bound to `local` with `SO_REUSEADDR` and `SO_REUSEPORT`, so the same port can
/// query STUN, listen and dial out at once (the basis of TCP simultaneous open). An IPv6
/// `local` takes both families (dial IPv4 peers at `wire_addr`).
pub fn reusable_tcp_socket(local: SocketAddr) -> io::Result<TcpSocket> {
    let domain = if local.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    if local.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_address(true)?;
    #[cfg(all(unix, not(any(target_os = "solaris", target_os = "illumos"))))]
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&local.into())?;
    Ok(TcpSocket::from_std_stream(socket.into()))
}

/// Asks `server` over TCP (RFC 8489 framing) which address it sees us as, from a socket bound
/// to `local` with port reuse (port 0: any). Returns our local address and the mapped one.
pub async fn stun_tcp(
    local: SocketAddr,
    server: SocketAddr,
    config: TransactionConfig,
) -> Result<(SocketAddr, SocketAddr), StunError> {
    let mut tx = Transaction::new(Instant::now(), random_id(), true, config);
    let deadline = Instant::now() + config.reliable_timeout;
    let work = async {
        let mut stream: TcpStream = reusable_tcp_socket(local)?
            .connect(wire_addr(local, server))
            .await?;
        let local = stream.local_addr()?;
        if let Some(request) = tx.poll_transmit(Instant::now()) {
            stream.write_all(request).await?;
        }
        let mut buf = Vec::with_capacity(512);
        loop {
            // Frame one message, hand it over, repeat until the transaction has its answer.
            while let Some(len) = stun::frame_len(&buf)?
                && buf.len() >= len
            {
                tx.handle_input(Instant::now(), &buf[..len]);
                buf.drain(..len);
                if let Some(result) = tx.poll_result() {
                    return Ok((local, result?));
                }
            }
            if buf.len() > 4096 {
                return Err(StunError::Garbage(stun::ParseError::BadLength(buf.len())));
            }
            let mut chunk = [0u8; 1024];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(StunError::Closed);
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    match tokio::time::timeout_at(deadline.into(), work).await {
        Ok(r) => r,
        Err(_) => Err(QueryError::Timeout.into()),
    }
}

/// What a [`UdpLink`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LinkEvent {
    /// Punching succeeded; session packets flow to `remote`.
    Connected {
        /// The agreed remote address.
        remote: SocketAddr,
    },
    /// A session packet from the peer.
    Data(Vec<u8>),
    /// Punching failed; the task has ended.
    Failed,
    /// The path died; the task has ended.
    Dead,
}

/// Why [`UdpLink::try_send`] did not send a packet.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrySendError {
    /// The socket's send buffer is full: wait for [`UdpLink::writable`] and send again (or
    /// drop the packet, as a router would; KCP retransmits).
    #[error("udp link send buffer full")]
    Full,
    /// No pair is agreed (yet, or any more), or the key is spent.
    #[error(transparent)]
    Link(#[from] SendError),
    /// The socket failed (for instance an ICMP error from the last packet).
    #[error("udp link socket: {0}")]
    Io(#[from] io::Error),
}

impl From<TrySendError> for io::Error {
    fn from(e: TrySendError) -> Self {
        match e {
            TrySendError::Full => io::ErrorKind::WouldBlock.into(),
            TrySendError::Link(e) => Self::new(io::ErrorKind::NotConnected, e),
            TrySendError::Io(e) => e,
        }
    }
}

/// Socket buffers a link asks for. A KCP window of 4,096 segments is 5.6 MB in flight; the
/// default buffers (about 200 KiB) overflow within a millisecond at a gigabit, and every
/// overflow is a loss KCP has to repair. The kernel caps the request at
/// `net.core.{r,w}mem_max`.
pub const SOCKET_BUFFER: usize = 4 << 20;

/// How many events the link task may queue for a slow reader before it stops reading the
/// socket. Kept short: packets waiting here only add delay that the session's pacer reads as
/// a queue forming; the socket's own buffer behind it ([`SOCKET_BUFFER`]) absorbs bursts.
const EVENT_QUEUE: usize = 512;

/// What the handle and the task share. The core sits behind one `std` mutex that is never
/// held across an `.await` or a syscall: the task takes it to open a received packet or run a
/// timer, a sender to seal one packet.
#[derive(Debug)]
struct Shared {
    socket: Arc<UdpSocket>,
    /// The socket's local address: its family says how to address IPv4 peers.
    local: SocketAddr,
    punch: Mutex<UdpPunch>,
    /// Wakes the task after a sender or [`UdpLink::add_remote`] gave the core work.
    wake: Notify,
    /// Scratch for sealing, reused by every [`UdpLink::try_send`].
    send_buf: Mutex<Vec<u8>>,
    /// Set when the task has ended; senders then report [`LinkSendError::Closed`].
    ended: AtomicBool,
}

impl Shared {
    fn try_send(&self, packet: &[u8]) -> Result<(), TrySendError> {
        let mut buf = lock(&self.send_buf);
        buf.clear();
        let dst = lock(&self.punch).seal_data(packet, &mut buf)?;
        match self.socket.try_send_to(&buf, wire_addr(self.local, dst)) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(TrySendError::Full),
            Err(e) => Err(e.into()),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind; carry on with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The handle of a punched UDP link task. Dropping it stops the task.
///
/// Sending does not go through the task: [`UdpLink::try_send`] seals the packet into a
/// reused buffer and writes it to the socket from the caller's own task, without awaiting
/// anything, and reports a full socket buffer as [`TrySendError::Full`]. Receiving does: the
/// task reads the socket, opens packets and queues them as [`LinkEvent::Data`], which
/// [`UdpLink::next_events`] takes in batches.
#[derive(Debug)]
pub struct UdpLink {
    shared: Arc<Shared>,
    events: mpsc::Receiver<LinkEvent>,
}

impl UdpLink {
    /// Spawns the task that punches with `punch` on `socket` and then carries packets.
    /// Enlarges the socket's buffers to [`SOCKET_BUFFER`] (as far as the kernel allows).
    pub fn spawn(socket: Arc<UdpSocket>, punch: UdpPunch) -> Self {
        Self::start(socket, punch, Inbound::Socket)
    }

    /// Spawns a link on a socket it shares with other links (a node's direct socket): it
    /// sends on `socket` and takes its packets from `inbound`, where the socket's one reader
    /// puts what came from `remote`. The link ends when that reader drops the sender.
    pub fn spawn_demuxed(
        socket: Arc<UdpSocket>,
        punch: UdpPunch,
        remote: SocketAddr,
        inbound: mpsc::Receiver<Vec<u8>>,
    ) -> Self {
        Self::start(
            socket,
            punch,
            Inbound::Demuxed {
                rx: inbound,
                remote,
                first: None,
            },
        )
    }

    fn start(socket: Arc<UdpSocket>, punch: UdpPunch, mut inbound: Inbound) -> Self {
        let sock = socket2::SockRef::from(&*socket);
        for (what, r) in [
            ("rcvbuf", sock.set_recv_buffer_size(SOCKET_BUFFER)),
            ("sndbuf", sock.set_send_buffer_size(SOCKET_BUFFER)),
        ] {
            if let Err(e) = r {
                tracing::debug!(error = %e, what, "cannot enlarge udp link buffer");
            }
        }
        let (event_tx, events) = mpsc::channel(EVENT_QUEUE);
        // An unbound socket has no address: treat it as IPv4 (sends fail as they would).
        let local = socket
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0)));
        let shared = Arc::new(Shared {
            socket,
            local,
            punch: Mutex::new(punch),
            wake: Notify::new(),
            send_buf: Mutex::new(Vec::with_capacity(2048)),
            ended: AtomicBool::new(false),
        });
        // The span goes on the future: a guard held across `.await` would leak into whatever
        // else runs on the thread meanwhile.
        let span = tracing::debug_span!("udp_link", local = ?shared.socket.local_addr().ok());
        let task_shared = shared.clone();
        tokio::spawn(
            async move {
                run(&task_shared, &mut inbound, event_tx).await;
                task_shared.ended.store(true, Ordering::Release);
            }
            .instrument(span),
        );
        Self { shared, events }
    }

    /// Seals `packet` and writes it to the socket now, without waiting. The packet is dropped
    /// (like any datagram) when this returns an error.
    pub fn try_send(&self, packet: &[u8]) -> Result<(), TrySendError> {
        self.shared.try_send(packet)
    }

    /// Waits until the socket has room for a packet (after [`TrySendError::Full`]).
    pub async fn writable(&self) -> io::Result<()> {
        self.shared.socket.writable().await
    }

    /// Sends a session packet, waiting while the socket's buffer is full. Dropped, like any
    /// datagram, if not connected.
    pub async fn send(&self, packet: Vec<u8>) -> Result<(), io::Error> {
        loop {
            match self.try_send(&packet) {
                Err(TrySendError::Full) => self.writable().await?,
                Err(TrySendError::Link(e)) => {
                    tracing::trace!(error = %e, "link packet not sent");
                    return Ok(());
                }
                Err(TrySendError::Io(e)) => {
                    tracing::debug!(error = %e, "link send failed");
                    return Ok(());
                }
                Ok(()) => return Ok(()),
            }
        }
    }

    /// Adds a remote candidate that arrived later over Tox.
    pub async fn add_remote(&self, addr: SocketAddr) -> Result<(), io::Error> {
        if self.events.is_closed() {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        lock(&self.shared.punch).add_remote(addr);
        self.shared.wake.notify_one();
        Ok(())
    }

    /// The agreed remote address, once connected.
    pub fn remote(&self) -> Option<SocketAddr> {
        lock(&self.shared.punch).remote()
    }

    /// The latest round trip measured by a probe or keepalive.
    pub fn rtt(&self) -> Option<crate::time::Duration> {
        lock(&self.shared.punch).rtt()
    }

    /// The share of the latest keepalive round trips lost (see [`UdpPunch::loss`]).
    pub fn loss(&self) -> Option<f64> {
        lock(&self.shared.punch).loss()
    }

    /// Keepalive round trips decided so far (see [`UdpPunch::keepalive_rounds`]).
    pub fn keepalive_rounds(&self) -> u64 {
        lock(&self.shared.punch).keepalive_rounds()
    }

    /// The next event; `None` once the task has ended and every event was read.
    pub async fn next_event(&mut self) -> Option<LinkEvent> {
        self.events.recv().await
    }

    /// Waits for at least one event and appends up to `limit` of those queued to `out`
    /// (one wake-up for a burst of packets); returns how many, 0 once the task has ended and
    /// every event was read.
    pub async fn next_events(&mut self, out: &mut Vec<LinkEvent>, limit: usize) -> usize {
        self.events.recv_many(out, limit).await
    }

    /// A cheap handle for sending session packets, for a driver that does not own the link.
    /// It seals and sends from the caller's task as [`UdpLink::try_send`] does. Once the link
    /// task has ended (punching failed, the path died or the [`UdpLink`] was dropped) it
    /// reports [`LinkSendError::Closed`].
    pub fn sender(&self) -> UdpLinkSender {
        UdpLinkSender(self.shared.clone())
    }
}

/// Sends session packets on a [`UdpLink`] (see [`UdpLink::sender`]).
#[derive(Debug, Clone)]
pub struct UdpLinkSender(Arc<Shared>);

/// Why a packet was not sent on a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LinkSendError {
    /// The link is behind (a full socket buffer or queue); the packet was not sent.
    #[error("link queue full")]
    Full,
    /// The link has ended.
    #[error("link closed")]
    Closed,
}

impl UdpLinkSender {
    /// Seals and sends a session packet now, without waiting. A socket error other than a
    /// full buffer counts as sent: the packet is lost as a datagram can be.
    pub fn try_send(&self, packet: impl AsRef<[u8]>) -> Result<(), LinkSendError> {
        if self.0.ended.load(Ordering::Acquire) {
            return Err(LinkSendError::Closed);
        }
        match self.0.try_send(packet.as_ref()) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full) => Err(LinkSendError::Full),
            Err(TrySendError::Link(_)) => Err(LinkSendError::Closed),
            Err(TrySendError::Io(e)) => {
                tracing::trace!(error = %e, "link packet lost");
                Ok(())
            }
        }
    }

    /// Sends a session packet, waiting while the socket's buffer is full.
    pub async fn send(&self, packet: impl AsRef<[u8]>) -> Result<(), LinkSendError> {
        loop {
            match self.try_send(packet.as_ref()) {
                Err(LinkSendError::Full) => self
                    .0
                    .socket
                    .writable()
                    .await
                    .map_err(|_| LinkSendError::Closed)?,
                r => return r,
            }
        }
    }
}

/// Where a link's packets come from.
enum Inbound {
    /// Its own socket.
    Socket,
    /// A shared socket's reader hands over what came from `remote`.
    Demuxed {
        rx: mpsc::Receiver<Vec<u8>>,
        remote: SocketAddr,
        /// A packet taken while waiting, not yet read.
        first: Option<Vec<u8>>,
    },
}

impl Inbound {
    /// Waits until a packet can be read (cancel-safe).
    async fn readable(&mut self, socket: &UdpSocket) -> io::Result<()> {
        match self {
            Self::Socket => socket.readable().await,
            Self::Demuxed { first: Some(_), .. } => Ok(()),
            Self::Demuxed { rx, first, .. } => match rx.recv().await {
                Some(packet) => {
                    *first = Some(packet);
                    Ok(())
                }
                None => Err(io::ErrorKind::BrokenPipe.into()),
            },
        }
    }

    fn try_recv(&mut self, socket: &UdpSocket, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        match self {
            Self::Socket => socket.try_recv_from(buf),
            Self::Demuxed { rx, remote, first } => {
                let packet = match first.take() {
                    Some(p) => p,
                    None => rx.try_recv().map_err(|_| io::ErrorKind::WouldBlock)?,
                };
                let n = packet.len().min(buf.len());
                buf[..n].copy_from_slice(&packet[..n]);
                Ok((n, *remote))
            }
        }
    }
}

async fn run(shared: &Shared, inbound: &mut Inbound, events: mpsc::Sender<LinkEvent>) {
    let socket = &shared.socket;
    let mut rx = vec![0u8; 65536];
    let mut tx = Vec::with_capacity(2048);
    let mut out = VecDeque::with_capacity(BATCH);
    loop {
        // Flush what the core wants sent and said. Control packets that meet a full socket
        // buffer are dropped: probes and keepalives are retried by the core.
        let deadline = {
            let now = Instant::now();
            let mut punch = lock(&shared.punch);
            if punch.poll_timeout().is_some_and(|t| t <= now) {
                punch.handle_timeout(now);
            }
            while let Some(t) = punch.poll_transmit(now, &mut tx) {
                if let Err(e) = socket.try_send_to(&tx, wire_addr(shared.local, t.dst)) {
                    tracing::debug!(error = %e, dst = %t.dst, "punch send failed");
                }
            }
            take_events(&mut punch, &mut out);
            punch.poll_timeout()
        };
        let end = out
            .iter()
            .any(|e| matches!(e, LinkEvent::Failed | LinkEvent::Dead));
        if !hand_over(shared, inbound, &events, &mut out, &mut rx, &mut tx).await || end {
            return;
        }
        tokio::select! {
            r = inbound.readable(socket) => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "udp link socket failed");
                    return;
                }
                read_batch(shared, inbound, &mut rx, &mut out);
                // Answer the keepalives of this batch before waiting for the consumer.
                flush_transmits(shared, &mut tx);
                if !hand_over(shared, inbound, &events, &mut out, &mut rx, &mut tx).await {
                    return;
                }
            }
            () = shared.wake.notified() => {}
            () = events.closed() => return,
            () = sleep_until(deadline) => {}
        }
    }
}

/// Events beyond the channel's that the task holds while its consumer is behind, reading on
/// meanwhile; with this many it stops reading until the consumer takes some (the socket's
/// buffer holds the rest, as it did before).
const BACKLOG: usize = 2 * BATCH;

/// Hands `out` to the consumer; `false` once it is gone. While the consumer is behind, the
/// task goes on reading the socket, holding up to [`BACKLOG`] events, so that keepalives are
/// answered on time: a late answer counts as lost, and a consumer that is only slow made a
/// healthy link read as lossy to the peer (review B15), which then left it.
async fn hand_over(
    shared: &Shared,
    inbound: &mut Inbound,
    events: &mpsc::Sender<LinkEvent>,
    out: &mut VecDeque<LinkEvent>,
    rx: &mut [u8],
    tx: &mut Vec<u8>,
) -> bool {
    while let Some(event) = out.pop_front() {
        let event = match events.try_send(event) {
            Ok(()) => continue,
            Err(mpsc::error::TrySendError::Closed(_)) => return false,
            Err(mpsc::error::TrySendError::Full(event)) => event,
        };
        out.push_front(event);
        tokio::select! {
            permit = events.reserve() => {
                let Ok(permit) = permit else {
                    return false;
                };
                if let Some(event) = out.pop_front() {
                    permit.send(event);
                }
            }
            // A socket error disables this branch; the main loop reports it.
            Ok(()) = inbound.readable(&shared.socket), if out.len() < BACKLOG => {
                read_batch(shared, inbound, rx, out);
                flush_transmits(shared, tx);
            }
        }
    }
    true
}

/// Reads up to [`BATCH`] packets, one lock per packet so senders are never held up for
/// longer than one open; data goes to `out`, the core answers the rest.
fn read_batch(
    shared: &Shared,
    inbound: &mut Inbound,
    rx: &mut [u8],
    out: &mut VecDeque<LinkEvent>,
) {
    for _ in 0..BATCH {
        let (n, from) = match inbound.try_recv(&shared.socket, rx) {
            Ok((n, from)) => (n, canonical(from)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            // ICMP errors surface here on Linux; keepalives decide about the path.
            Err(e) => {
                tracing::trace!(error = %e, "recv error");
                continue;
            }
        };
        let packet = &mut rx[..n];
        if stun::is_stun(packet) {
            continue;
        }
        let mut punch = lock(&shared.punch);
        let input = punch.handle_input(Instant::now(), from, packet);
        // What the packet made of the link (a nomination that connects it) goes before its
        // data: a consumer must never see data from a link it has not seen connect.
        take_events(&mut punch, out);
        drop(punch);
        match input {
            Ok(Input::Data(data)) => out.push_back(LinkEvent::Data(data.to_vec())),
            Ok(_) => {}
            Err(e) => tracing::trace!(error = %e, %from, "dropped link packet"),
        }
    }
}

/// Moves the core's events to `out`, in order.
fn take_events(punch: &mut UdpPunch, out: &mut VecDeque<LinkEvent>) {
    while let Some(event) = punch.poll_event() {
        out.push_back(match event {
            Event::Connected { remote } => LinkEvent::Connected { remote },
            Event::Failed => LinkEvent::Failed,
            Event::Dead => LinkEvent::Dead,
        });
    }
}

/// Sends what the core has queued (probes, keepalives and their answers) without waiting:
/// packets that meet a full socket buffer are dropped, the core retries what matters.
fn flush_transmits(shared: &Shared, tx: &mut Vec<u8>) {
    let now = Instant::now();
    let mut punch = lock(&shared.punch);
    while let Some(t) = punch.poll_transmit(now, tx) {
        if let Err(e) = shared
            .socket
            .try_send_to(tx, wire_addr(shared.local, t.dst))
        {
            tracing::debug!(error = %e, dst = %t.dst, "punch send failed");
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::link::LinkSecret;
    use crate::punch::udp::PunchConfig;

    /// A STUN server for tests: answers Binding requests over UDP, ignoring the first
    /// `drop_first` of them (to exercise retransmission).
    async fn udp_server(drop_first: usize) -> SocketAddr {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            let mut seen = 0;
            while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                let Some(response) = answer(&buf[..n], from) else {
                    continue;
                };
                seen += 1;
                if seen > drop_first {
                    let _ = socket.send_to(&response, from).await;
                }
            }
        });
        addr
    }

    fn answer(request: &[u8], from: SocketAddr) -> Option<Vec<u8>> {
        let packet = stun::Packet::new_checked(request).ok()?;
        let repr = stun::Repr::parse(&packet).ok()?;
        if repr.class != stun::Class::Request || repr.method != stun::METHOD_BINDING {
            return None;
        }
        let mut out = Vec::new();
        stun::Repr::binding_success(repr.transaction_id, from).emit(&mut out);
        Some(out)
    }

    /// The same over TCP; answers each request on a connection, byte by byte to exercise
    /// the client's framing.
    async fn tcp_server() -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, from)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 512];
                    loop {
                        if let Ok(Some(len)) = stun::frame_len(&buf)
                            && buf.len() >= len
                        {
                            let request: Vec<u8> = buf.drain(..len).collect();
                            if let Some(response) = answer(&request, from) {
                                for b in response {
                                    if stream.write_all(&[b]).await.is_err() {
                                        return;
                                    }
                                }
                            }
                            continue;
                        }
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn stun_over_udp_reports_our_address() {
        let server = udp_server(0).await;
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mapped = stun_udp(&socket, server, TransactionConfig::default())
            .await
            .unwrap();
        assert_eq!(mapped, socket.local_addr().unwrap());
    }

    #[tokio::test]
    async fn stun_over_udp_retransmits() {
        let server = udp_server(2).await;
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let config = TransactionConfig {
            rto: Duration::from_millis(20),
            ..Default::default()
        };
        let started = Instant::now();
        let mapped = stun_udp(&socket, server, config).await.unwrap();
        assert_eq!(mapped, socket.local_addr().unwrap());
        // The third request (sent at 20 + 40 = 60 ms) is the first one answered.
        assert!(started.elapsed() >= Duration::from_millis(60));
    }

    #[tokio::test]
    async fn stun_over_udp_times_out() {
        // A server that never answers: a bound socket nobody reads.
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let config = TransactionConfig {
            rto: Duration::from_millis(5),
            max_sends: 3,
            rm: 2,
            ..Default::default()
        };
        let err = stun_udp(&socket, silent.local_addr().unwrap(), config)
            .await
            .unwrap_err();
        assert!(
            matches!(err, StunError::Query(QueryError::Timeout)),
            "{err}"
        );
    }

    #[tokio::test]
    async fn stun_over_tcp_reports_our_address_from_a_reusable_port() {
        let server = tcp_server().await;
        let (local, mapped) = stun_tcp(
            "127.0.0.1:0".parse().unwrap(),
            server,
            TransactionConfig::default(),
        )
        .await
        .unwrap();
        assert_eq!(mapped, local);
        // The port is reusable, as TCP punching needs: while the first connection may still
        // be in TIME_WAIT, the same port listens and queries another server.
        let listener = reusable_tcp_socket(local).unwrap().listen(8).unwrap();
        assert_eq!(listener.local_addr().unwrap(), local);
        let other = tcp_server().await;
        let (local2, mapped2) = stun_tcp(local, other, TransactionConfig::default())
            .await
            .unwrap();
        assert_eq!(local2, local);
        assert_eq!(mapped2, local);
    }

    #[tokio::test]
    async fn two_peers_punch_on_loopback_and_exchange_sealed_packets() {
        let sa = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let sb = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        // Each side learns its candidate from STUN, as it would behind a NAT.
        let server = udp_server(0).await;
        let ca = stun_udp(&sa, server, TransactionConfig::default())
            .await
            .unwrap();
        let cb = stun_udp(&sb, server, TransactionConfig::default())
            .await
            .unwrap();
        // The offers: public halves cross over (here directly; in proxy, over Tox).
        let a = LinkSecret::from_random(rand::random());
        let b = LinkSecret::from_random(rand::random());
        let (pa, pb) = (a.public(), b.public());
        let now = Instant::now();
        let config = PunchConfig::default();
        // An unreachable candidate first: a port nobody listens on.
        let dead: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let mut la = UdpLink::spawn(
            sa,
            UdpPunch::new(now, a.derive(pb).unwrap(), &[dead, cb], config),
        );
        let mut lb = UdpLink::spawn(
            sb,
            UdpPunch::new(now, b.derive(pa).unwrap(), &[dead, ca], config),
        );
        let connected = async {
            let ea = la.next_event().await;
            let eb = lb.next_event().await;
            (ea, eb)
        };
        let (ea, eb) = tokio::time::timeout(Duration::from_secs(5), connected)
            .await
            .unwrap();
        assert_eq!(ea, Some(LinkEvent::Connected { remote: cb }));
        assert_eq!(eb, Some(LinkEvent::Connected { remote: ca }));
        // More than two batches of the driver (64), which once lost the packet at each batch end.
        for i in 0..300u32 {
            la.send(i.to_be_bytes().to_vec()).await.unwrap();
        }
        let mut got = Vec::new();
        let receive = async {
            while got.len() < 300 {
                match lb.next_event().await {
                    Some(LinkEvent::Data(d)) => got.push(d),
                    other => panic!("unexpected {other:?}"),
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(5), receive)
            .await
            .unwrap();
        // Loopback does not lose or reorder: every packet, in order.
        let want: Vec<Vec<u8>> = (0..300u32).map(|i| i.to_be_bytes().to_vec()).collect();
        assert_eq!(got, want);
        lb.send(b"back".to_vec()).await.unwrap();
        let back = tokio::time::timeout(Duration::from_secs(5), la.next_event())
            .await
            .unwrap();
        assert_eq!(back, Some(LinkEvent::Data(b"back".to_vec())));
    }

    /// Sockets of both families punch over IPv6 and over IPv4 (v4-mapped on the wire) and
    /// name the peer by its plain address either way.
    #[tokio::test]
    async fn dual_stack_links_punch_over_ipv6_and_ipv4() {
        if std::net::UdpSocket::bind("[::1]:0").is_err() {
            tracing::warn!("skipped: no IPv6 loopback");
            return;
        }
        for ip in [
            std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
            std::net::IpAddr::from([127, 0, 0, 1]),
        ] {
            let sa = Arc::new(bind_punch_udp().unwrap());
            let sb = Arc::new(bind_punch_udp().unwrap());
            assert!(sa.local_addr().unwrap().is_ipv6(), "both families on [::]");
            let (la, mut lb) = pair_on(sa, sb, ip, PunchConfig::default()).await;
            la.send(b"hello".to_vec()).await.unwrap();
            let got = tokio::time::timeout(Duration::from_secs(5), lb.next_event())
                .await
                .unwrap();
            assert_eq!(got, Some(LinkEvent::Data(b"hello".to_vec())), "{ip}");
        }
    }

    #[test]
    fn addresses_cross_the_socket_boundary_in_plain_form() {
        let v4: SocketAddr = "192.0.2.1:5".parse().unwrap();
        let v6: SocketAddr = "[2001:db8::1]:5".parse().unwrap();
        let any4: SocketAddr = "0.0.0.0:1".parse().unwrap();
        let any6: SocketAddr = "[::]:1".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:192.0.2.1]:5".parse().unwrap();
        assert_eq!(wire_addr(any6, v4), mapped);
        assert_eq!(wire_addr(any4, v4), v4);
        assert_eq!(wire_addr(any6, v6), v6);
        assert_eq!(canonical(mapped), v4);
        assert_eq!(canonical(v6), v6);
    }

    /// A pair of links punched to each other on loopback.
    async fn pair() -> (UdpLink, UdpLink) {
        pair_with(PunchConfig::default()).await
    }

    /// Keepalives measure the link's loss on both sides, whichever side nominated.
    #[tokio::test]
    async fn both_sides_measure_their_keepalive_loss() {
        let config = PunchConfig {
            keepalive_interval: Duration::from_millis(100),
            ..PunchConfig::default()
        };
        let (la, lb) = pair_with(config).await;
        tokio::time::sleep(Duration::from_millis(1200)).await;
        // Loopback loses nothing; an answer later than the next keepalive (a starved runtime
        // on a loaded machine) counts as lost, so allow a few.
        for loss in [la.loss(), lb.loss()] {
            assert!(loss.is_some_and(|l| l <= 0.25), "{loss:?}");
        }
    }

    async fn pair_with(config: PunchConfig) -> (UdpLink, UdpLink) {
        let sa = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let sb = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        pair_on(sa, sb, [127, 0, 0, 1].into(), config).await
    }

    /// Links on `sa` and `sb`, each given the other's port at `ip` as its only candidate;
    /// returns once both name the other there.
    async fn pair_on(
        sa: Arc<UdpSocket>,
        sb: Arc<UdpSocket>,
        ip: std::net::IpAddr,
        config: PunchConfig,
    ) -> (UdpLink, UdpLink) {
        let ca = SocketAddr::new(ip, sa.local_addr().unwrap().port());
        let cb = SocketAddr::new(ip, sb.local_addr().unwrap().port());
        let a = LinkSecret::from_random(rand::random());
        let b = LinkSecret::from_random(rand::random());
        let (pa, pb) = (a.public(), b.public());
        let now = Instant::now();
        let mut la = UdpLink::spawn(sa, UdpPunch::new(now, a.derive(pb).unwrap(), &[cb], config));
        let mut lb = UdpLink::spawn(sb, UdpPunch::new(now, b.derive(pa).unwrap(), &[ca], config));
        let up = async { (la.next_event().await, lb.next_event().await) };
        let (ea, eb) = tokio::time::timeout(Duration::from_secs(5), up)
            .await
            .unwrap();
        assert_eq!(ea, Some(LinkEvent::Connected { remote: cb }), "{ip}");
        assert_eq!(eb, Some(LinkEvent::Connected { remote: ca }), "{ip}");
        (la, lb)
    }

    /// Review B15: a consumer that is behind must not leave the peer's keepalives
    /// unanswered (a late answer counts as lost), or a healthy link reads as lossy and the
    /// session leaves it. `b`'s consumer takes nothing here: `a` fills its event queue, then
    /// only keepalives flow, and every one must be answered.
    #[tokio::test]
    async fn keepalives_are_answered_while_the_consumer_is_behind() {
        let config = PunchConfig {
            // An answer is late after one interval: ample on loopback, even loaded.
            keepalive_interval: Duration::from_millis(300),
            ..PunchConfig::default()
        };
        let (la, _lb) = pair_with(config).await;
        let sender = la.sender();
        for i in 0..(EVENT_QUEUE + BATCH) as u32 {
            sender.send(i.to_be_bytes()).await.unwrap();
        }
        // A full window of keepalive round trips after the burst.
        let measured = async {
            let first = la.keepalive_rounds();
            while la.keepalive_rounds() < first + 16 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(30), measured)
            .await
            .expect("keepalives go out");
        assert_eq!(la.loss(), Some(0.0), "every keepalive answered");
    }

    #[tokio::test]
    async fn try_send_before_connecting_says_not_connected() {
        let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let keys = LinkSecret::from_random([7; 32])
            .derive(LinkSecret::from_random([8; 32]).public())
            .unwrap();
        let dead: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let link = UdpLink::spawn(
            socket,
            UdpPunch::new(Instant::now(), keys, &[dead], PunchConfig::default()),
        );
        assert!(matches!(
            link.try_send(b"early"),
            Err(TrySendError::Link(SendError::NotConnected))
        ));
        assert_eq!(link.sender().try_send(b"early"), Err(LinkSendError::Closed));
    }

    #[tokio::test]
    async fn senders_deliver_in_batches_and_close_with_the_link() {
        let (la, mut lb) = pair().await;
        let sender = la.sender();
        for i in 0..1000u32 {
            sender.send(i.to_be_bytes()).await.unwrap();
        }
        let mut got = Vec::new();
        let receive = async {
            let mut events = Vec::new();
            while got.len() < 1000 {
                events.clear();
                assert!(lb.next_events(&mut events, 256).await > 0);
                for e in events.drain(..) {
                    match e {
                        LinkEvent::Data(d) => got.push(d),
                        other => panic!("unexpected {other:?}"),
                    }
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(5), receive)
            .await
            .unwrap();
        let want: Vec<Vec<u8>> = (0..1000u32).map(|i| i.to_be_bytes().to_vec()).collect();
        assert_eq!(got, want);
        // Dropping the link ends its task; the sender then reports the link closed.
        drop(la);
        let closed = async {
            while sender.try_send(b"late") != Err(LinkSendError::Closed) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), closed)
            .await
            .unwrap();
    }
}
