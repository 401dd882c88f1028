//! What every listener shares: the dialer, timeouts, the connection limit, and shutdown.
//!
//! One accept loop per listener; one task per accepted connection, tracked so that shutdown
//! can wait for connections in flight. A connection holds a semaphore permit (shared by all
//! listeners) for its whole life; over the limit a listener holds its one newly accepted
//! client until a slot frees and accepts nothing more, so further clients wait in the
//! kernel's backlog instead of being accepted and dropped.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info_span, warn};

use crate::BindError;
use crate::config::ListenAddr;
use crate::dialer::Dialer;
use crate::guard::Dialers;
use crate::socks::Credentials;
use crate::status::{Counters, Status};

/// Settings shared by the SOCKS5 and HTTP front-ends.
#[derive(Debug, Clone)]
pub struct Shared {
    /// Where connections go: one dialer for clients on this host, one for the others.
    pub dialers: Dialers,
    /// Credentials SOCKS5 and HTTP proxy clients must present, if any.
    pub auth: Option<Arc<Credentials>>,
    /// End relays that moved nothing for this long (`None`: never).
    pub idle_timeout: Option<Duration>,
    /// How long a client may take to say where it wants to go.
    pub handshake_timeout: Duration,
    /// Caps concurrent client connections over all listeners.
    pub limit: Arc<Semaphore>,
    /// Cancelled on shutdown: listeners stop accepting.
    pub shutdown: CancellationToken,
    /// Every connection task, so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// Connection and byte counters for status output.
    pub counters: Arc<Counters>,
    /// What `GET /status` on the HTTP listener shows, once set.
    pub status: Option<Arc<Status>>,
}

impl Shared {
    /// Settings with a fresh limit of `max_connections`, a new shutdown token and tracker.
    pub fn new(dialers: Dialers, idle_timeout: Option<Duration>, max_connections: usize) -> Self {
        Self {
            dialers,
            auth: None,
            idle_timeout,
            handshake_timeout: Duration::from_secs(30),
            limit: Arc::new(Semaphore::new(max_connections)),
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            counters: Arc::default(),
            status: None,
        }
    }

    /// The dialer for a client connecting from `peer`.
    pub fn dialer_for(&self, peer: SocketAddr) -> &Arc<dyn Dialer> {
        self.dialers.for_client(peer)
    }

    /// Stops the listeners and waits up to `grace` for connections in flight; returns how
    /// many were still open when the grace period ran out.
    pub async fn shut_down(&self, grace: Duration) -> usize {
        self.shutdown.cancel();
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            return self.tracker.len();
        }
        0
    }
}

/// Accepts connections on `listener` until shutdown and runs `handle` for each in its own
/// tracked task, with a span naming the front-end and the client.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    shared: Shared,
    kind: &'static str,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut id: u64 = 0;
    loop {
        let (stream, peer) = tokio::select! {
            () = shared.shutdown.cancelled() => return,
            res = listener.accept() => match res {
                Ok(accepted) => accepted,
                Err(err) => {
                    // EMFILE and friends: back off instead of spinning on the error.
                    warn!(kind, %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Over the limit this one connection waits here, and the listener accepts no more
        // until it gets its slot. (Taking the permit before accepting would let an idle
        // listener sit on a slot while another listener's clients wait.)
        let permit = tokio::select! {
            () = shared.shutdown.cancelled() => return,
            permit = shared.limit.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
        };
        id += 1;
        let span = info_span!("conn", kind, id, %peer);
        let fut = handle(stream, peer);
        let counters = shared.counters.clone();
        counters.accepted();
        shared.tracker.spawn(
            async move {
                debug!("accepted");
                fut.await;
                counters.finished();
                drop(permit);
            }
            .instrument(span),
        );
    }
}

/// Binds a listener at `at`: one socket, or two for `:PORT` on loopback (127.0.0.1 and, where
/// the host has IPv6, `[::1]` on the same port).
pub async fn bind(what: &'static str, at: ListenAddr) -> Result<Vec<TcpListener>, BindError> {
    let err = |addr, source| BindError { what, addr, source };
    match at {
        ListenAddr::At(addr) => Ok(vec![
            TcpListener::bind(addr).await.map_err(|e| err(addr, e))?,
        ]),
        ListenAddr::AllInterfaces(port) => {
            let v6 = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port));
            match bind_dual_stack(v6) {
                Ok(listener) => Ok(vec![listener]),
                Err(e) if no_ipv6(&e) => {
                    let v4 = SocketAddr::from(([0, 0, 0, 0], port));
                    Ok(vec![TcpListener::bind(v4).await.map_err(|e| err(v4, e))?])
                }
                Err(e) => Err(err(v6, e)),
            }
        }
        ListenAddr::Loopback(port) => {
            // Port 0: the kernel picks the IPv4 port, which may be taken on [::1]; pick
            // again a few times.
            let mut tries = if port == 0 { 8 } else { 1 };
            loop {
                let v4 = SocketAddr::from(([127, 0, 0, 1], port));
                let first = TcpListener::bind(v4).await.map_err(|e| err(v4, e))?;
                let chosen = first.local_addr().map_err(|e| err(v4, e))?.port();
                let v6 = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, chosen));
                match TcpListener::bind(v6).await {
                    Ok(second) => return Ok(vec![first, second]),
                    Err(e) if no_ipv6(&e) => {
                        debug!(what, "no IPv6 loopback: listening on 127.0.0.1 only");
                        return Ok(vec![first]);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tries > 1 => {
                        tries -= 1;
                    }
                    Err(e) => return Err(err(v6, e)),
                }
            }
        }
    }
}

/// A listener on `[::]` that takes IPv4 clients too, whatever `net.ipv6.bindv6only` says.
fn bind_dual_stack(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::IPV6,
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_only_v6(false)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// Whether a bind failed because this host has no IPv6: no `::1` (EADDRNOTAVAIL), or no
/// IPv6 at all (EAFNOSUPPORT, 97 on Linux; std has no kind of its own for it).
fn no_ipv6(err: &std::io::Error) -> bool {
    const EAFNOSUPPORT: i32 = 97;
    err.kind() == std::io::ErrorKind::AddrNotAvailable || err.raw_os_error() == Some(EAFNOSUPPORT)
}

/// Raises this process's open-file limit to its hard limit: every relayed connection holds
/// two sockets and, when spliced, two pipes (four descriptors), and the usual soft limit of
/// 1,024 would cap the proxy far below `--max-connections`. Returns the new soft limit.
#[cfg(target_os = "linux")]
pub fn raise_fd_limit() -> std::io::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(hard.max(soft))
}
