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
//! relays bytes both ways. UDP flows travel as session datagrams (see [`udp`]).

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fabric::id::PublicKey;
use fabric::peer::{Fabric, Incoming, Peer};
use fabric::target::{Reply, Target as WireTarget};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;
use tracing::{Instrument as _, debug, debug_span, info, warn};

use crate::dialer::{BoxFuture, BoxedStream, DialError, Dialer, Target, UdpFlow};

mod udp;

use self::udp::UdpFlows;
pub use self::udp::{UdpOptions, serve_udp};

/// Reaches targets through exit peers. With several exits, new flows go to the first one
/// with a live session (failover in the order given).
#[derive(Debug, Clone)]
pub struct FabricDialer {
    exits: Arc<Mutex<Vec<Arc<Peer>>>>,
    /// How long to wait for the exit's answer (its own connect timeout plus the path).
    reply_timeout: Duration,
    udp: Arc<UdpFlows>,
}

impl FabricDialer {
    /// A dialer over no exits yet; add them with [`FabricDialer::add_exit`] as their sessions
    /// come up.
    pub fn new(connect_timeout: Duration) -> Self {
        Self {
            exits: Arc::default(),
            reply_timeout: connect_timeout + Duration::from_secs(10),
            udp: Arc::default(),
        }
    }

    /// Hands the datagrams the exits send to this dialer's UDP flows, until `fabric` shuts
    /// down. Run it as a task beside the dialer.
    pub fn deliver_datagrams(
        &self,
        fabric: Arc<Fabric>,
    ) -> impl Future<Output = ()> + Send + 'static {
        self.udp.clone().run(fabric)
    }

    /// Makes `peer` available for new flows, after those added before it.
    pub fn add_exit(&self, peer: Peer) {
        self.exits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::new(peer));
    }

    /// The exits in failover order.
    pub fn exits(&self) -> Vec<Arc<Peer>> {
        self.exits.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    async fn connect_via(&self, peer: &Peer, target: &Target) -> Result<BoxedStream, DialError> {
        let mut header = Vec::with_capacity(64);
        to_wire(target)
            .emit(&mut header)
            .map_err(|e| DialError::Other(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
        let mut stream = peer.open().map_err(DialError::Other)?;
        stream.write_all(&header).await.map_err(DialError::Other)?;
        let mut code = [0u8; 1];
        match tokio::time::timeout(self.reply_timeout, stream.read_exact(&mut code)).await {
            Err(_) => return Err(DialError::TimedOut),
            Ok(Err(e)) => return Err(DialError::Other(e)),
            Ok(Ok(_)) => {}
        }
        match Reply::from_byte(code[0]) {
            Reply::Connected => Ok(Box::new(stream)),
            Reply::NotAllowed => Err(DialError::PolicyDenied(format!(
                "the exit does not allow {target}"
            ))),
            Reply::NetworkUnreachable => Err(DialError::NetworkUnreachable),
            Reply::HostUnreachable => Err(DialError::HostUnreachable),
            Reply::Refused => Err(DialError::Refused),
            Reply::TimedOut => Err(DialError::TimedOut),
            _ => Err(DialError::Other(io::Error::other(
                "the exit could not connect",
            ))),
        }
    }
}

impl Dialer for FabricDialer {
    fn connect(&self, target: Target) -> BoxFuture<'_, Result<BoxedStream, DialError>> {
        Box::pin(async move {
            let exits = self.exits();
            let mut last = None;
            // Healthy exits first, in the order given; the others only if none is.
            let (up, down): (Vec<_>, Vec<_>) = exits.iter().partition(|p| p.is_connected());
            for peer in up.into_iter().chain(down) {
                match self.connect_via(peer, &target).await {
                    Ok(stream) => return Ok(stream),
                    // The target's own answer holds for every exit.
                    Err(
                        e @ (DialError::Refused
                        | DialError::PolicyDenied(_)
                        | DialError::HostUnreachable
                        | DialError::Resolve(_)),
                    ) => return Err(e),
                    Err(e) => {
                        debug!(exit = %peer.public_key(), error = %e, "exit failed, trying the next");
                        last = Some(e);
                    }
                }
            }
            Err(last.unwrap_or_else(|| {
                DialError::Other(io::Error::new(
                    io::ErrorKind::NotConnected,
                    "no session to any exit yet (still connecting over Tox)",
                ))
            }))
        })
    }

    fn udp_associate(&self) -> BoxFuture<'_, Result<Box<dyn UdpFlow>, DialError>> {
        Box::pin(async { self.udp.associate(self.exits()) })
    }
}

/// How the exit serves its clients.
#[derive(Debug, Clone)]
pub struct ExitOptions {
    /// Idle timeout of relayed connections.
    pub idle_timeout: Option<Duration>,
    /// Streams one client may have open at once; more are refused at once. Each open stream
    /// may hold up to one mux window of unread data, so this also bounds what one client can
    /// make the exit buffer (256 × 4 MiB).
    pub streams_per_client: usize,
    /// How long a client has to send its request header.
    pub header_timeout: Duration,
}

impl Default for ExitOptions {
    fn default() -> Self {
        Self {
            idle_timeout: Some(Duration::from_secs(300)),
            streams_per_client: 256,
            header_timeout: Duration::from_secs(30),
        }
    }
}

/// Serves streams opened by allowed clients until the fabric shuts down: reads each stream's
/// request, dials it with `dialer` (which applies the exit policy), answers, relays.
pub async fn serve(fabric: Arc<Fabric>, dialer: Arc<dyn Dialer>, options: ExitOptions) {
    let mut limits: HashMap<PublicKey, Arc<Semaphore>> = HashMap::new();
    while let Some(incoming) = fabric.accept().await {
        let limit = limits
            .entry(incoming.peer)
            .or_insert_with(|| Arc::new(Semaphore::new(options.streams_per_client)))
            .clone();
        // Refused at once rather than queued: a queued stream still holds whatever its
        // client sent, so a queue would let one client make the exit buffer without bound.
        let Ok(slot) = limit.try_acquire_owned() else {
            warn!(peer = %incoming.peer, "client over its stream limit, stream refused");
            let mut stream = incoming.stream;
            tokio::spawn(async move {
                let _ = stream.write_all(&[Reply::GeneralFailure.to_byte()]).await;
                let _ = stream.shutdown().await;
            });
            continue;
        };
        let dialer = dialer.clone();
        let options = options.clone();
        let span = debug_span!("stream", peer = %incoming.peer, id = incoming.stream.id().0);
        tokio::spawn(
            async move {
                let _slot = slot;
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
    let target = from_wire(target);
    let mut upstream = match dialer.connect(target.clone()).await {
        Ok(s) => s,
        Err(e) => {
            info!(peer = %peer, %target, error = %e, "exit refused or failed");
            stream.write_all(&[reply_for(&e).to_byte()]).await?;
            stream.shutdown().await?;
            return Ok(());
        }
    };
    debug!(peer = %peer, %target, "exit connected");
    stream.write_all(&[Reply::Connected.to_byte()]).await?;
    // Bytes the client sent right behind its header belong to the target.
    upstream.write_all(&buf[used..]).await?;
    crate::relay::relay(&mut stream, &mut upstream, options.idle_timeout).await?;
    Ok(())
}

/// A target as the exit-request header carries it (names unresolved).
fn to_wire(target: &Target) -> WireTarget {
    match target {
        Target::Ip(a) => WireTarget::Ip(*a),
        Target::Domain(name, port) => WireTarget::Name(name.clone(), *port),
    }
}

/// A target from an exit-request header.
fn from_wire(target: WireTarget) -> Target {
    match target {
        WireTarget::Ip(a) => Target::Ip(a),
        WireTarget::Name(n, p) => Target::Domain(n, p),
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
