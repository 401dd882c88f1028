//! The seam between the front-ends (SOCKS5, HTTP, later TUN) and the transports.
//!
//! A front-end turns a client request into a [`Target`] and asks a [`Dialer`] for a byte stream
//! (TCP) or a datagram flow (UDP). [`DirectDialer`] dials from this host; the exit role wraps
//! it in [`crate::exit_policy::PolicyDialer`]; with `--exit` a fabric-backed dialer will open a
//! mux stream to the exit peer instead. Front-ends never see which one they talk to.

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::str::FromStr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UdpSocket};
use tokio::task::JoinSet;
use tracing::{debug, trace};

/// Where a client wants to go: an address, or a name the transport resolves (at the exit, so
/// the client side leaks no DNS).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// An IP address and port.
    Ip(SocketAddr),
    /// A host name and port, resolved by whoever finally dials.
    Domain(String, u16),
}

impl Target {
    /// The port of the target.
    pub fn port(&self) -> u16 {
        match self {
            Self::Ip(addr) => addr.port(),
            Self::Domain(_, port) => *port,
        }
    }

    /// Builds a target from a host (name or IP literal, IPv6 with or without brackets) and a
    /// port. IP literals become [`Target::Ip`] so they are never sent to a resolver.
    pub fn from_host_port(host: &str, port: u16) -> Self {
        let bare = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        match bare.parse::<IpAddr>() {
            Ok(ip) => Self::Ip(SocketAddr::new(ip, port)),
            Err(_) => Self::Domain(host.to_owned(), port),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ip(addr) => addr.fmt(f),
            Self::Domain(name, port) => write!(f, "{name}:{port}"),
        }
    }
}

/// Error parsing a `host:port` string into a [`Target`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
#[error("expected host:port, got {0:?}")]
pub struct ParseTargetError(String);

impl FromStr for Target {
    type Err = ParseTargetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(Self::Ip(addr));
        }
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| ParseTargetError(s.into()))?;
        let port = port.parse().map_err(|_| ParseTargetError(s.into()))?;
        if host.is_empty() || host.contains(':') {
            return Err(ParseTargetError(s.into()));
        }
        Ok(Self::from_host_port(host, port))
    }
}

/// Why a dial failed. Each reason maps to a SOCKS5 reply code and an HTTP status, so the
/// client learns why, not just that.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DialError {
    /// The destination actively refused the connection.
    #[error("connection refused")]
    Refused,
    /// No route to the destination host.
    #[error("host unreachable")]
    HostUnreachable,
    /// No route to the destination network.
    #[error("network unreachable")]
    NetworkUnreachable,
    /// The connection attempt took longer than the connect timeout.
    #[error("connection timed out")]
    TimedOut,
    /// The name could not be resolved (or resolved to no address).
    #[error("cannot resolve {0}")]
    Resolve(String),
    /// The exit policy does not allow this destination.
    #[error("destination refused by policy: {0}")]
    PolicyDenied(String),
    /// Anything else.
    #[error(transparent)]
    Other(io::Error),
}

impl DialError {
    /// The SOCKS5 reply code (RFC 1928 §6) that tells a client why.
    pub fn socks_reply(&self) -> u8 {
        match self {
            Self::PolicyDenied(_) => 0x02,
            Self::NetworkUnreachable => 0x03,
            Self::HostUnreachable | Self::Resolve(_) => 0x04,
            Self::Refused => 0x05,
            // RFC 1928 has no "timed out"; "TTL expired" is what curl, Dante and most clients
            // understand as one.
            Self::TimedOut => 0x06,
            Self::Other(_) => 0x01,
        }
    }

    /// The HTTP status an HTTP proxy answers with.
    pub fn http_status(&self) -> u16 {
        match self {
            Self::PolicyDenied(_) => 403,
            Self::TimedOut => 504,
            _ => 502,
        }
    }

    /// Classifies an I/O error from a connect or send into a dial error.
    pub fn from_io(err: io::Error) -> Self {
        match err.kind() {
            io::ErrorKind::ConnectionRefused => Self::Refused,
            io::ErrorKind::HostUnreachable => Self::HostUnreachable,
            io::ErrorKind::NetworkUnreachable => Self::NetworkUnreachable,
            io::ErrorKind::TimedOut => Self::TimedOut,
            _ => Self::Other(err),
        }
    }
}

impl From<DialError> for io::Error {
    fn from(err: DialError) -> Self {
        let kind = match &err {
            DialError::Refused => io::ErrorKind::ConnectionRefused,
            DialError::HostUnreachable => io::ErrorKind::HostUnreachable,
            DialError::NetworkUnreachable => io::ErrorKind::NetworkUnreachable,
            DialError::TimedOut => io::ErrorKind::TimedOut,
            DialError::PolicyDenied(_) => io::ErrorKind::PermissionDenied,
            DialError::Resolve(_) | DialError::Other(_) => io::ErrorKind::Other,
        };
        Self::new(kind, err)
    }
}

/// A bidirectional byte stream a dialer hands back (a TCP connection, a mux stream).
/// `Any` lets the relay recognise a plain `TcpStream` and splice it.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin + fmt::Debug + Any {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + fmt::Debug + Any> Stream for T {}

/// A stream whose concrete type the front-end does not care about.
pub type BoxedStream = Box<dyn Stream>;

/// A boxed future, so [`Dialer`] and [`UdpFlow`] stay object-safe without `async_trait`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Opens connections and datagram flows to targets. Object-safe: front-ends hold an
/// `Arc<dyn Dialer>`.
pub trait Dialer: Send + Sync + fmt::Debug + 'static {
    /// Opens a byte stream to `target`.
    fn connect(&self, target: Target) -> BoxFuture<'_, Result<BoxedStream, DialError>>;

    /// Opens a datagram flow: one client's UDP association, which may talk to many targets.
    fn udp_associate(&self) -> BoxFuture<'_, Result<Box<dyn UdpFlow>, DialError>>;

    /// A stream to the DNS resolver of wherever this dialer's traffic leaves (an exit's own),
    /// carrying DNS messages framed as over TCP; `None` when names resolve on this host, where
    /// a query is best sent where the application sent it.
    fn resolver(&self) -> Option<BoxFuture<'_, Result<BoxedStream, DialError>>> {
        None
    }

    /// [`Dialer::resolver`] with `first` (framed queries) already sent on it. A dialer that
    /// can send them in the same flight as its request saves the round trip of waiting for
    /// the stream to be accepted: a lookup then costs one round trip, not two.
    fn resolver_with(
        &self,
        first: Vec<u8>,
    ) -> Option<BoxFuture<'_, Result<BoxedStream, DialError>>> {
        let open = self.resolver()?;
        Some(Box::pin(async move {
            let mut stream = open.await?;
            let sent = async {
                tokio::io::AsyncWriteExt::write_all(&mut stream, &first).await?;
                tokio::io::AsyncWriteExt::flush(&mut stream).await
            };
            sent.await.map_err(DialError::Other)?;
            Ok(stream)
        }))
    }
}

/// One client's UDP association (SOCKS5 UDP ASSOCIATE, a TUN UDP flow). Datagrams keep their
/// boundaries; delivery is best effort, as with UDP.
pub trait UdpFlow: Send + Sync + fmt::Debug {
    /// Sends one datagram to `target`.
    fn send_to<'a>(
        &'a self,
        payload: &'a [u8],
        target: &'a Target,
    ) -> BoxFuture<'a, Result<(), DialError>>;

    /// Receives one datagram into `buf`: its length and where it came from.
    fn recv_from<'a>(&'a self, buf: &'a mut [u8])
    -> BoxFuture<'a, io::Result<(usize, SocketAddr)>>;
}

/// Dials from this host: plain TCP and UDP sockets.
#[derive(Debug, Clone)]
pub struct DirectDialer {
    connect_timeout: Duration,
    /// `SO_MARK` for every socket (Linux), so policy routing keeps them out of a TUN.
    mark: Option<u32>,
}

/// How long to wait for one address before racing the next one as well (RFC 8305 suggests
/// 250 ms for the "connection attempt delay").
const ATTEMPT_DELAY: Duration = Duration::from_millis(250);

impl DirectDialer {
    /// A dialer whose connects give up after `connect_timeout` (resolution included).
    pub fn new(connect_timeout: Duration) -> Self {
        Self {
            connect_timeout,
            mark: None,
        }
    }

    /// Marks every socket this dialer opens with `mark` (`SO_MARK`, Linux, needs
    /// `CAP_NET_ADMIN`): TUN mode routes marked packets around its device.
    pub fn with_mark(mut self, mark: u32) -> Self {
        self.mark = Some(mark);
        self
    }

    /// How long one connect may take, resolution included.
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// Connects to `target`, resolving names on this host; resolution and connecting share
    /// one connect timeout.
    pub async fn connect_tcp(&self, target: &Target) -> Result<TcpStream, DialError> {
        let deadline = tokio::time::Instant::now() + self.connect_timeout;
        let addrs = tokio::time::timeout_at(deadline, resolve(target))
            .await
            .map_err(|_| DialError::TimedOut)??;
        self.connect_addrs_until(&addrs, deadline).await
    }

    /// Connects to the first of `addrs` that answers, racing them in the order given as
    /// RFC 8305 says ([`resolve`] returns them in that order: families alternating), within
    /// the connect timeout.
    pub async fn connect_addrs(&self, addrs: &[SocketAddr]) -> Result<TcpStream, DialError> {
        let deadline = tokio::time::Instant::now() + self.connect_timeout;
        self.connect_addrs_until(addrs, deadline).await
    }

    /// [`connect_addrs`](Self::connect_addrs), giving up at `deadline`: for a caller that
    /// spent part of the connect timeout already (resolving, checking).
    pub async fn connect_addrs_until(
        &self,
        addrs: &[SocketAddr],
        deadline: tokio::time::Instant,
    ) -> Result<TcpStream, DialError> {
        let stream = tokio::time::timeout_at(deadline, connect_any(addrs, self.mark))
            .await
            .map_err(|_| DialError::TimedOut)??;
        // Interactive traffic (TLS handshakes, SSH) must not wait for Nagle; bulk transfers
        // fill whole segments anyway.
        stream.set_nodelay(true).map_err(DialError::Other)?;
        Ok(stream)
    }
}

impl Dialer for DirectDialer {
    fn connect(&self, target: Target) -> BoxFuture<'_, Result<BoxedStream, DialError>> {
        Box::pin(async move {
            let stream = self.connect_tcp(&target).await?;
            Ok(Box::new(stream) as BoxedStream)
        })
    }

    fn udp_associate(&self) -> BoxFuture<'_, Result<Box<dyn UdpFlow>, DialError>> {
        Box::pin(async move {
            let flow = DirectUdpFlow::bind_marked(self.mark).map_err(DialError::Other)?;
            Ok(Box::new(flow) as Box<dyn UdpFlow>)
        })
    }
}

/// Resolves a target to its addresses, in the order to try them: alternating families,
/// starting with the resolver's first choice (RFC 8305 §4).
pub async fn resolve(target: &Target) -> Result<Vec<SocketAddr>, DialError> {
    let (name, port) = match target {
        Target::Ip(addr) => return Ok(vec![*addr]),
        Target::Domain(name, port) => (name, *port),
    };
    let resolved: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), port))
        .await
        .map_err(|err| {
            debug!(%name, %err, "resolve failed");
            DialError::Resolve(name.clone())
        })?
        .collect();
    if resolved.is_empty() {
        return Err(DialError::Resolve(name.clone()));
    }
    Ok(interleave_families(resolved))
}

/// Reorders addresses so the families alternate, the resolver's first choice first: a
/// broken family then costs one attempt delay, not one attempt per address of it.
fn interleave_families(addrs: Vec<SocketAddr>) -> Vec<SocketAddr> {
    let Some(first) = addrs.first() else {
        return addrs;
    };
    let first_v6 = first.is_ipv6();
    let (mut first, mut second): (Vec<_>, Vec<_>) =
        addrs.into_iter().partition(|a| a.is_ipv6() == first_v6);
    first.reverse();
    second.reverse();
    let mut out = Vec::with_capacity(first.len() + second.len());
    loop {
        match (first.pop(), second.pop()) {
            (None, None) => return out,
            (a, b) => out.extend(a.into_iter().chain(b)),
        }
    }
}

/// Happy Eyeballs (RFC 8305 §5): try the addresses in order, starting the next one when the
/// previous fails or has not answered within [`ATTEMPT_DELAY`]; the first connection wins and
/// the others are dropped (aborted with the `JoinSet`). No timeout of its own: callers bound
/// it with their deadline.
async fn connect_any(addrs: &[SocketAddr], mark: Option<u32>) -> Result<TcpStream, DialError> {
    if let [addr] = addrs {
        // The common case (IP literal, single record) needs no task.
        return connect_one(*addr, mark).await.map_err(DialError::from_io);
    }
    let mut attempts = JoinSet::new();
    let mut next = addrs.iter();
    let mut last_err = DialError::HostUnreachable;
    loop {
        if let Some(&addr) = next.next() {
            trace!(%addr, "connect attempt");
            attempts.spawn(async move { connect_one(addr, mark).await });
        } else if attempts.is_empty() {
            return Err(last_err);
        }
        tokio::select! {
            Some(res) = attempts.join_next() => match res {
                Ok(Ok(stream)) => return Ok(stream),
                Ok(Err(err)) => last_err = better_error(last_err, DialError::from_io(err)),
                Err(join) => last_err = DialError::Other(io::Error::other(join)),
            },
            // No answer yet: race the next address too.
            () = tokio::time::sleep(ATTEMPT_DELAY), if next.len() > 0 => {}
            else => return Err(last_err),
        }
    }
}

/// Connects one TCP socket, marked first when `mark` is set.
async fn connect_one(addr: SocketAddr, mark: Option<u32>) -> io::Result<TcpStream> {
    let Some(mark) = mark else {
        return TcpStream::connect(addr).await;
    };
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    set_mark(&socket, mark)?;
    socket.set_nonblocking(true)?;
    tokio::net::TcpSocket::from_std_stream(socket.into())
        .connect(addr)
        .await
}

#[cfg(target_os = "linux")]
fn set_mark(socket: &socket2::Socket, mark: u32) -> io::Result<()> {
    socket.set_mark(mark)
}

#[cfg(not(target_os = "linux"))]
fn set_mark(_socket: &socket2::Socket, _mark: u32) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "socket marks exist on Linux only",
    ))
}

/// Of two failures, keep the one that says more: a refusal proves the host is there.
fn better_error(old: DialError, new: DialError) -> DialError {
    let rank = |e: &DialError| match e {
        DialError::Refused => 3,
        DialError::TimedOut => 2,
        DialError::HostUnreachable | DialError::NetworkUnreachable => 1,
        _ => 0,
    };
    if rank(&new) >= rank(&old) { new } else { old }
}

/// A UDP socket of this host, dual-stack when the host has IPv6.
#[derive(Debug)]
pub struct DirectUdpFlow {
    socket: UdpSocket,
    dual_stack: bool,
}

impl DirectUdpFlow {
    /// Binds an unspecified address on an ephemeral port.
    pub fn bind() -> io::Result<Self> {
        Self::bind_marked(None)
    }

    /// Like [`bind`](Self::bind), with `SO_MARK` set when `mark` is.
    pub fn bind_marked(mark: Option<u32>) -> io::Result<Self> {
        match bind_dual_stack(mark) {
            Ok(socket) => Ok(Self {
                socket,
                dual_stack: true,
            }),
            Err(err) => {
                debug!(%err, "no dual-stack UDP socket, falling back to IPv4");
                use socket2::{Domain, Protocol, Socket, Type};
                let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
                if let Some(mark) = mark {
                    set_mark(&socket, mark)?;
                }
                socket.bind(&SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0)).into())?;
                socket.set_nonblocking(true)?;
                let std: std::net::UdpSocket = socket.into();
                Ok(Self {
                    socket: UdpSocket::from_std(std)?,
                    dual_stack: false,
                })
            }
        }
    }

    /// A dual-stack socket sends to IPv4 destinations through their IPv4-mapped form.
    fn wire_addr(&self, addr: SocketAddr) -> SocketAddr {
        match (self.dual_stack, addr) {
            (true, SocketAddr::V4(v4)) => {
                SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port())
            }
            _ => addr,
        }
    }
}

fn bind_dual_stack(mark: Option<u32>) -> io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
    if let Some(mark) = mark {
        set_mark(&socket, mark)?;
    }
    socket.set_only_v6(false)?;
    socket.set_nonblocking(true)?;
    socket.bind(&SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0).into())?;
    UdpSocket::from_std(socket.into())
}

impl UdpFlow for DirectUdpFlow {
    fn send_to<'a>(
        &'a self,
        payload: &'a [u8],
        target: &'a Target,
    ) -> BoxFuture<'a, Result<(), DialError>> {
        Box::pin(async move {
            // Names are resolved per datagram (no cache): SOCKS clients nearly always send
            // UDP to addresses, which is the path that must be cheap.
            let addr = match target {
                Target::Ip(addr) => *addr,
                Target::Domain(..) => {
                    let addrs = resolve(target).await?;
                    let usable = addrs.iter().find(|a| self.dual_stack || a.is_ipv4());
                    *usable.unwrap_or(&addrs[0])
                }
            };
            if !self.dual_stack && addr.is_ipv6() {
                return Err(DialError::NetworkUnreachable);
            }
            self.socket
                .send_to(payload, self.wire_addr(addr))
                .await
                .map_err(DialError::from_io)?;
            Ok(())
        })
    }

    fn recv_from<'a>(
        &'a self,
        buf: &'a mut [u8],
    ) -> BoxFuture<'a, io::Result<(usize, SocketAddr)>> {
        Box::pin(async move {
            let (n, from) = self.socket.recv_from(buf).await?;
            // Report IPv4 peers as IPv4, not as the mapped form the dual-stack socket sees.
            Ok((n, SocketAddr::new(from.ip().to_canonical(), from.port())))
        })
    }
}

/// A listener whose accept queue is full, so that a connect to it hangs (Linux drops SYNs to
/// a full queue), all on loopback; its address, and what must stay alive for it to hang.
#[cfg(test)]
pub(crate) fn stalled_listener() -> (SocketAddr, impl Sized) {
    use socket2::{Domain, Socket, Type};
    let listener = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    listener
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    listener.listen(0).unwrap();
    let addr = listener.local_addr().unwrap().as_socket().unwrap();
    // Fill the queue until connects stop completing; two in a row that do not complete
    // within a second, so a stall of a loaded machine is not taken for a full queue.
    let mut fillers = Vec::new();
    let mut unanswered = 0;
    for _ in 0..16 {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Ok(s) => {
                fillers.push(s);
                unanswered = 0;
            }
            Err(err) if err.kind() == io::ErrorKind::TimedOut => {
                unanswered += 1;
                if unanswered == 2 {
                    return (addr, (listener, fillers));
                }
            }
            Err(err) => panic!("filling the accept queue: {err}"),
        }
    }
    panic!("the accept queue of a listen(0) socket never filled");
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn target_parsing() {
        assert_eq!(
            "127.0.0.1:80".parse::<Target>().unwrap(),
            Target::Ip("127.0.0.1:80".parse().unwrap())
        );
        assert_eq!(
            "[::1]:443".parse::<Target>().unwrap(),
            Target::Ip("[::1]:443".parse().unwrap())
        );
        assert_eq!(
            "example.com:443".parse::<Target>().unwrap(),
            Target::Domain("example.com".into(), 443)
        );
        assert!("example.com".parse::<Target>().is_err());
        assert!(":80".parse::<Target>().is_err());
        assert!("a:b:80".parse::<Target>().is_err());
        assert!("example.com:99999".parse::<Target>().is_err());
        assert_eq!(
            Target::from_host_port("[::1]", 80),
            Target::Ip("[::1]:80".parse().unwrap())
        );
    }

    #[test]
    fn error_codes() {
        assert_eq!(DialError::Refused.socks_reply(), 5);
        assert_eq!(DialError::PolicyDenied("x".into()).socks_reply(), 2);
        assert_eq!(DialError::PolicyDenied("x".into()).http_status(), 403);
        assert_eq!(DialError::TimedOut.http_status(), 504);
        assert_eq!(DialError::Resolve("x".into()).http_status(), 502);
        assert_eq!(DialError::NetworkUnreachable.socks_reply(), 3);
        assert_eq!(DialError::HostUnreachable.socks_reply(), 4);
        let io = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert!(matches!(DialError::from_io(io), DialError::Refused));
    }

    #[test]
    fn families_alternate() {
        let a: Vec<SocketAddr> = ["[::1]:1", "[::2]:1", "1.1.1.1:1", "[::3]:1", "2.2.2.2:1"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let got: Vec<String> = interleave_families(a)
            .iter()
            .map(|a| a.to_string())
            .collect();
        assert_eq!(
            got,
            ["[::1]:1", "1.1.1.1:1", "[::2]:1", "2.2.2.2:1", "[::3]:1"]
        );
    }

    #[tokio::test]
    async fn direct_connect_and_refusal() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let dialer = DirectDialer::new(Duration::from_secs(5));
        let accept = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(b"hi").await.unwrap();
        });
        let mut stream = dialer.connect(Target::Ip(addr)).await.unwrap();
        let mut buf = [0; 2];
        stream.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hi");
        accept.await.unwrap();

        // Nothing listens there any more once the listener is gone.
        let err = dialer.connect(Target::Ip(addr)).await.unwrap_err();
        assert!(matches!(err, DialError::Refused), "{err:?}");
    }

    #[tokio::test]
    async fn connect_any_falls_through_to_a_working_address() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let good = listener.local_addr().unwrap();
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let stream = connect_any(&[dead, good], None).await.unwrap();
        assert_eq!(stream.peer_addr().unwrap(), good);
        let err = connect_any(&[dead, dead], None).await.unwrap_err();
        assert!(matches!(err, DialError::Refused), "{err:?}");
    }

    #[tokio::test]
    async fn connect_addrs_races_past_an_address_that_never_answers() {
        let (stalled, _keep) = stalled_listener();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let good = listener.local_addr().unwrap();
        // A connect timeout far beyond the hang guard: a dialer that waited for the stalled
        // address before trying the next would never finish in time.
        let dialer = DirectDialer::new(Duration::from_secs(3600));
        let stream = tokio::time::timeout(
            Duration::from_secs(60),
            dialer.connect_addrs(&[stalled, good]),
        )
        .await
        .expect("hang guard")
        .unwrap();
        assert_eq!(stream.peer_addr().unwrap(), good);
        assert!(stream.nodelay().unwrap());
        let err = dialer.connect_addrs(&[]).await.unwrap_err();
        assert!(matches!(err, DialError::HostUnreachable), "{err:?}");
    }

    #[tokio::test]
    async fn udp_flow_round_trip() {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let server_addr = server.local_addr().unwrap();
        let dialer = DirectDialer::new(Duration::from_secs(5));
        let flow = dialer.udp_associate().await.unwrap();
        flow.send_to(b"ping", &Target::Ip(server_addr))
            .await
            .unwrap();
        let mut buf = [0; 16];
        let (n, from) = server.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"ping");
        server.send_to(b"pong", from).await.unwrap();
        let (n, from) = flow.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"pong");
        assert_eq!(from, server_addr);
    }

    #[tokio::test]
    async fn connect_timeout_on_a_full_backlog() {
        // A listener that never accepts, with its backlog filled: Linux drops further SYNs,
        // so a connect hangs until the dialer's timeout, all on loopback.
        use socket2::{Domain, Socket, Type};
        let listener = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        listener
            .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        listener.listen(0).unwrap();
        let addr = listener.local_addr().unwrap().as_socket().unwrap();
        let mut fillers = Vec::new();
        let dialer = DirectDialer::new(Duration::from_millis(300));
        let mut timed_out = false;
        for _ in 0..8 {
            match dialer.connect_tcp(&Target::Ip(addr)).await {
                Ok(s) => fillers.push(s),
                Err(DialError::TimedOut) => {
                    timed_out = true;
                    break;
                }
                Err(err) => panic!("{err:?}"),
            }
        }
        assert!(timed_out, "backlog never filled");
    }
}
