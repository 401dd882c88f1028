//! Tokio drivers for the punching cores: STUN queries over UDP and TCP, and a task that runs a
//! [`UdpPunch`] on a socket and then carries sealed session packets.
//!
//! The link task `select!`s over the socket, one `sleep_until(poll_timeout)` and a command
//! channel, as every driver in `fabric` does. [`UdpLink`] is its handle.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};
use tokio::sync::mpsc;

use super::stun::{self, QueryError, Transaction, TransactionConfig, TransactionId};
use super::udp::{Event, Input, UdpPunch};
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

/// How many datagrams or commands one wake-up of the link task handles at most.
const BATCH: usize = 64;

fn random_id() -> TransactionId {
    TransactionId(rand::random())
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
    loop {
        let now = Instant::now();
        tx.handle_timeout(now);
        if let Some(request) = tx.poll_transmit(now) {
            socket.send_to(request, server).await?;
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
                if from == server {
                    tx.handle_input(Instant::now(), &buf[..n]);
                }
            }
            () = tokio::time::sleep_until(deadline.into()) => {}
        }
    }
}

/// A TCP socket bound to `local` with `SO_REUSEADDR` and `SO_REUSEPORT`, so the same port can
/// query STUN, listen and dial out at once (the basis of TCP simultaneous open).
pub fn reusable_tcp_socket(local: SocketAddr) -> io::Result<TcpSocket> {
    let socket = if local.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    #[cfg(all(unix, not(any(target_os = "solaris", target_os = "illumos"))))]
    socket.set_reuseport(true)?;
    socket.bind(local)?;
    Ok(socket)
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
        let mut stream: TcpStream = reusable_tcp_socket(local)?.connect(server).await?;
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

#[derive(Debug)]
enum Command {
    Send(Vec<u8>),
    AddRemote(SocketAddr),
}

/// The handle of a punched UDP link task. Dropping it stops the task.
#[derive(Debug)]
pub struct UdpLink {
    commands: mpsc::Sender<Command>,
    events: mpsc::Receiver<LinkEvent>,
}

impl UdpLink {
    /// Spawns the task that punches with `punch` on `socket` and then carries packets.
    pub fn spawn(socket: Arc<UdpSocket>, punch: UdpPunch) -> Self {
        let (commands, command_rx) = mpsc::channel(256);
        let (event_tx, events) = mpsc::channel(256);
        tokio::spawn(run(socket, punch, command_rx, event_tx));
        Self { commands, events }
    }

    /// Queues a session packet for the peer (dropped, like any datagram, if not connected).
    pub async fn send(&self, packet: Vec<u8>) -> Result<(), io::Error> {
        self.commands
            .send(Command::Send(packet))
            .await
            .map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))
    }

    /// Adds a remote candidate that arrived later over Tox.
    pub async fn add_remote(&self, addr: SocketAddr) -> Result<(), io::Error> {
        self.commands
            .send(Command::AddRemote(addr))
            .await
            .map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))
    }

    /// The next event; `None` once the task has ended and every event was read.
    pub async fn next_event(&mut self) -> Option<LinkEvent> {
        self.events.recv().await
    }

    /// A cheap handle for sending session packets, for a driver that does not own the link.
    /// The link task runs until the [`UdpLink`] and every sender are dropped.
    pub fn sender(&self) -> UdpLinkSender {
        UdpLinkSender(self.commands.clone())
    }
}

/// Sends session packets on a [`UdpLink`] (see [`UdpLink::sender`]).
#[derive(Debug, Clone)]
pub struct UdpLinkSender(mpsc::Sender<Command>);

/// Why a packet was not queued on a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LinkSendError {
    /// The link task is behind; the packet was not queued.
    #[error("link queue full")]
    Full,
    /// The link task has ended.
    #[error("link closed")]
    Closed,
}

impl UdpLinkSender {
    /// Queues a session packet without waiting.
    pub fn try_send(&self, packet: Vec<u8>) -> Result<(), LinkSendError> {
        self.0.try_send(Command::Send(packet)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => LinkSendError::Full,
            mpsc::error::TrySendError::Closed(_) => LinkSendError::Closed,
        })
    }

    /// Queues a session packet, waiting while the link task is behind.
    pub async fn send(&self, packet: Vec<u8>) -> Result<(), LinkSendError> {
        self.0
            .send(Command::Send(packet))
            .await
            .map_err(|_| LinkSendError::Closed)
    }
}

async fn run(
    socket: Arc<UdpSocket>,
    mut punch: UdpPunch,
    mut commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<LinkEvent>,
) {
    let span = tracing::debug_span!("udp_link", local = ?socket.local_addr().ok());
    let _enter = span.enter();
    let mut rx = vec![0u8; 65536];
    let mut tx = Vec::with_capacity(2048);
    loop {
        // Flush what the core wants sent and said.
        let now = Instant::now();
        while let Some(t) = punch.poll_transmit(now, &mut tx) {
            if let Err(e) = socket.send_to(&tx, t.dst).await {
                tracing::debug!(error = %e, dst = %t.dst, "punch send failed");
            }
        }
        while let Some(event) = punch.poll_event() {
            let (event, end) = match event {
                Event::Connected { remote } => (LinkEvent::Connected { remote }, false),
                Event::Failed => (LinkEvent::Failed, true),
                Event::Dead => (LinkEvent::Dead, true),
            };
            if events.send(event).await.is_err() || end {
                return;
            }
        }
        let deadline = punch.poll_timeout();
        tokio::select! {
            r = socket.recv_from(&mut rx) => {
                // Then drain what else is queued without another trip through select.
                let mut next = Some(r);
                for i in 1..=BATCH {
                    let Some(r) = next.take() else { break };
                    match r {
                        Ok((n, from)) => {
                            if !on_datagram(&mut punch, from, &mut rx[..n], &events).await {
                                return;
                            }
                        }
                        // ICMP errors surface here on Linux; keepalives decide about the path.
                        Err(e) => tracing::trace!(error = %e, "recv error"),
                    }
                    if i == BATCH {
                        break;
                    }
                    next = match socket.try_recv_from(&mut rx) {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
                        r => Some(r),
                    };
                }
            }
            command = commands.recv() => {
                let mut next = command;
                for i in 1..=BATCH {
                    match next.take() {
                        None => return,
                        Some(Command::AddRemote(addr)) => punch.add_remote(addr),
                        Some(Command::Send(packet)) => {
                            tx.clear();
                            match punch.seal_data(&packet, &mut tx) {
                                Ok(dst) => {
                                    if let Err(e) = socket.send_to(&tx, dst).await {
                                        tracing::debug!(error = %e, "link send failed");
                                    }
                                }
                                Err(e) => tracing::trace!(error = %e, "link packet not sent"),
                            }
                        }
                    }
                    if i == BATCH {
                        break;
                    }
                    match commands.try_recv() {
                        Ok(c) => next = Some(c),
                        Err(mpsc::error::TryRecvError::Empty) => break,
                        Err(mpsc::error::TryRecvError::Disconnected) => return,
                    }
                }
            }
            () = sleep_until(deadline) => {}
        }
        // Timers run after every wake-up, so a busy socket cannot starve keepalives.
        let now = Instant::now();
        if punch.poll_timeout().is_some_and(|t| t <= now) {
            punch.handle_timeout(now);
        }
    }
}

/// Hands one datagram to the core; `false` once the event receiver is gone.
async fn on_datagram(
    punch: &mut UdpPunch,
    from: SocketAddr,
    packet: &mut [u8],
    events: &mpsc::Sender<LinkEvent>,
) -> bool {
    if stun::is_stun(packet) {
        return true;
    }
    match punch.handle_input(Instant::now(), from, packet) {
        Ok(Input::Data(data)) => events.send(LinkEvent::Data(data.to_vec())).await.is_ok(),
        Ok(_) => true,
        Err(e) => {
            tracing::trace!(error = %e, %from, "dropped link packet");
            true
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
}
