//! UDP through exits: each client association becomes a numbered flow whose datagrams ride
//! the session's datagram channel, led by a [`UdpHeader`].
//!
//! ```text
//! client: UdpFlow::send_to ─► [flow | destination | payload] ─► Peer::send_datagram ─► …
//! exit:   Fabric::recv_datagram ─► flow table (peer, flow) ─► one UDP socket per flow
//!         socket reply ─► [flow | source | payload] ─► Fabric::send_datagram ─► client
//! client: Fabric::recv_datagram ─► UdpFlows (by flow number) ─► UdpFlow::recv_from
//! ```
//!
//! Datagrams are best effort end to end, as UDP is: a full queue anywhere drops, never
//! blocks. The exit applies its policy to every destination (the socket comes from its
//! [`PolicyDialer`](crate::exit_policy::PolicyDialer)) and expires idle flows.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use fabric::id::PublicKey;
use fabric::peer::{DatagramError, Fabric};
use fabric::target::{FlowId, Target as WireTarget, UdpHeader};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::{ExitLink, Exits};
use crate::dialer::{BoxFuture, DialError, Dialer, Target, UdpFlow};

/// Datagrams waiting for one flow's reader (client) or socket (exit); more are dropped.
const FLOW_QUEUE: usize = 256;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The first exit, in the configured order, with a live session.
fn first_connected(exits: &Exits) -> Result<Arc<dyn ExitLink>, DialError> {
    exits.first_connected().ok_or_else(|| {
        DialError::Other(io::Error::new(
            io::ErrorKind::NotConnected,
            "no session to any exit (still connecting over Tox, or reconnecting)",
        ))
    })
}

/// A datagram from an exit: its source and payload.
type Reply = (SocketAddr, Vec<u8>);

/// The client's open UDP flows, by number: where datagrams from the exits are delivered.
#[derive(Debug)]
pub(crate) struct UdpFlows {
    flows: Mutex<HashMap<FlowId, mpsc::Sender<Reply>>>,
    next: Mutex<u32>,
}

impl Default for UdpFlows {
    fn default() -> Self {
        // Numbers start at random so a restarted client does not land on flows the exit
        // still holds for its previous run.
        let start = RandomState::new().hash_one(std::process::id()) as u32;
        Self {
            flows: Mutex::default(),
            next: Mutex::new(start),
        }
    }
}

impl UdpFlows {
    fn register(&self) -> (FlowId, mpsc::Receiver<Reply>) {
        let (tx, rx) = mpsc::channel(FLOW_QUEUE);
        let mut flows = lock(&self.flows);
        let mut next = lock(&self.next);
        loop {
            let id = FlowId(*next);
            *next = next.wrapping_add(1);
            if let std::collections::hash_map::Entry::Vacant(v) = flows.entry(id) {
                v.insert(tx);
                return (id, rx);
            }
        }
    }

    /// Hands a datagram from an exit to its flow; drops it when the flow is gone or behind.
    fn deliver(&self, datagram: &[u8]) {
        let (header, payload) = match UdpHeader::parse(datagram) {
            Ok(parsed) => parsed,
            Err(error) => {
                debug!(%error, "bad datagram from an exit");
                return;
            }
        };
        let WireTarget::Ip(source) = header.addr else {
            debug!(flow = %header.flow, "datagram from an exit without a source address");
            return;
        };
        let tx = lock(&self.flows).get(&header.flow).cloned();
        if let Some(tx) = tx {
            let _ = tx.try_send((source, payload.to_vec()));
        }
    }

    /// Delivers the datagrams `fabric` receives until it shuts down.
    pub(crate) async fn run(self: Arc<Self>, fabric: Arc<Fabric>) {
        while let Some((_, datagram)) = fabric.recv_datagram().await {
            self.deliver(&datagram);
        }
    }

    /// Opens a flow through the first exit with a live session.
    pub(crate) fn associate(
        self: &Arc<Self>,
        exits: Arc<Exits>,
    ) -> Result<Box<dyn UdpFlow>, DialError> {
        let peer = first_connected(&exits)?;
        let (flow, rx) = self.register();
        debug!(%flow, exit = %peer.public_key(), "udp flow through exit");
        Ok(Box::new(FabricUdpFlow {
            flow,
            peer: Mutex::new(peer),
            exits,
            rx: tokio::sync::Mutex::new(rx),
            flows: self.clone(),
        }))
    }
}

/// One UDP association through an exit.
#[derive(Debug)]
struct FabricUdpFlow {
    flow: FlowId,
    /// The exit the flow goes through; it moves to another one if its session is lost
    /// (and stays there: a flow's source address must not change under the application).
    peer: Mutex<Arc<dyn ExitLink>>,
    /// All configured exits, also those that come up after the flow began.
    exits: Arc<Exits>,
    rx: tokio::sync::Mutex<mpsc::Receiver<Reply>>,
    flows: Arc<UdpFlows>,
}

impl Drop for FabricUdpFlow {
    fn drop(&mut self) {
        lock(&self.flows.flows).remove(&self.flow);
    }
}

impl FabricUdpFlow {
    fn send(&self, payload: &[u8], target: &Target) -> Result<(), DialError> {
        let header = UdpHeader {
            flow: self.flow,
            addr: super::to_wire(target),
        };
        let datagram = || {
            header
                .datagram(payload)
                .map_err(|e| DialError::Other(io::Error::new(io::ErrorKind::InvalidInput, e)))
        };
        let peer = lock(&self.peer).clone();
        match peer.send_datagram(datagram()?) {
            Ok(()) => Ok(()),
            Err(DatagramError::NoSession) => {
                // Fail over: the exit's session is down, another may be up.
                let next = first_connected(&self.exits)?;
                *lock(&self.peer) = next.clone();
                next.send_datagram(datagram()?).map_err(datagram_error)
            }
            Err(e) => Err(datagram_error(e)),
        }
    }
}

fn datagram_error(e: DatagramError) -> DialError {
    let kind = match e {
        DatagramError::TooLarge { .. } => io::ErrorKind::InvalidInput,
        _ => io::ErrorKind::NotConnected,
    };
    DialError::Other(io::Error::new(kind, e))
}

impl UdpFlow for FabricUdpFlow {
    fn send_to<'a>(
        &'a self,
        payload: &'a [u8],
        target: &'a Target,
    ) -> BoxFuture<'a, Result<(), DialError>> {
        Box::pin(async move { self.send(payload, target) })
    }

    fn recv_from<'a>(
        &'a self,
        buf: &'a mut [u8],
    ) -> BoxFuture<'a, io::Result<(usize, SocketAddr)>> {
        Box::pin(async move {
            let Some((source, payload)) = self.rx.lock().await.recv().await else {
                return Err(io::Error::new(
                    io::ErrorKind::NotConnected,
                    "udp flow closed",
                ));
            };
            // As recv_from on a socket: a datagram longer than the buffer is truncated.
            let n = payload.len().min(buf.len());
            buf[..n].copy_from_slice(&payload[..n]);
            Ok((n, source))
        })
    }
}

/// How the exit serves UDP flows.
#[derive(Debug, Clone)]
pub struct UdpOptions {
    /// A flow with no datagram either way for this long is closed (its socket released).
    pub idle_timeout: Duration,
    /// Flows one client may have open at once; datagrams opening more are dropped.
    pub flows_per_client: usize,
}

impl Default for UdpOptions {
    fn default() -> Self {
        Self {
            // QUIC's default idle timeout is 30 s and keepalives are usually shorter; DNS
            // flows are done in a second. Two minutes is what conntrack gives replied UDP.
            idle_timeout: Duration::from_secs(120),
            flows_per_client: 256,
        }
    }
}

type FlowKey = (PublicKey, FlowId);
type FlowTable = Arc<Mutex<HashMap<FlowKey, mpsc::Sender<(WireTarget, Vec<u8>)>>>>;

/// Serves the UDP flows of allowed clients until the fabric shuts down: one socket from
/// `dialer` per flow, replies sent back on the session.
pub async fn serve_udp(fabric: Arc<Fabric>, dialer: Arc<dyn Dialer>, options: UdpOptions) {
    let table: FlowTable = Arc::default();
    while let Some((peer, datagram)) = fabric.recv_datagram().await {
        let (header, payload) = match UdpHeader::parse(&datagram) {
            Ok(parsed) => parsed,
            Err(error) => {
                debug!(%peer, %error, "bad datagram from a client");
                continue;
            }
        };
        let key = (peer, header.flow);
        let item = (header.addr, payload.to_vec());
        let tx = lock(&table).get(&key).cloned();
        let item = match tx {
            Some(tx) => match tx.try_send(item) {
                Ok(()) => continue,
                // Behind: drop, as a full socket buffer would.
                Err(mpsc::error::TrySendError::Full(_)) => continue,
                // The flow just expired: open it again.
                Err(mpsc::error::TrySendError::Closed(item)) => item,
            },
            None => item,
        };
        let flows_of_peer = lock(&table).keys().filter(|(p, _)| *p == peer).count();
        if flows_of_peer >= options.flows_per_client {
            warn!(%peer, "client over its udp flow limit, datagram dropped");
            continue;
        }
        let (tx, rx) = mpsc::channel(FLOW_QUEUE);
        let _ = tx.try_send(item);
        lock(&table).insert(key, tx.clone());
        tokio::spawn(run_flow(
            fabric.clone(),
            dialer.clone(),
            key,
            rx,
            tx,
            table.clone(),
            options.idle_timeout,
        ));
    }
}

/// One client flow at the exit: its socket, until it has been idle for `idle`.
async fn run_flow(
    fabric: Arc<Fabric>,
    dialer: Arc<dyn Dialer>,
    (peer, flow): FlowKey,
    mut rx: mpsc::Receiver<(WireTarget, Vec<u8>)>,
    own: mpsc::Sender<(WireTarget, Vec<u8>)>,
    table: FlowTable,
    idle: Duration,
) {
    match dialer.udp_associate().await {
        Ok(socket) => {
            debug!(%peer, %flow, "udp flow opened");
            relay_flow(&fabric, socket.as_ref(), peer, flow, &mut rx, idle).await;
            debug!(%peer, %flow, "udp flow closed");
        }
        Err(error) => warn!(%peer, %flow, %error, "udp socket for a flow failed"),
    }
    let mut table = lock(&table);
    if table
        .get(&(peer, flow))
        .is_some_and(|tx| tx.same_channel(&own))
    {
        table.remove(&(peer, flow));
    }
}

async fn relay_flow(
    fabric: &Fabric,
    socket: &dyn UdpFlow,
    peer: PublicKey,
    flow: FlowId,
    rx: &mut mpsc::Receiver<(WireTarget, Vec<u8>)>,
    idle: Duration,
) {
    let mut buf = vec![0u8; 65536];
    loop {
        tokio::select! {
            item = rx.recv() => {
                let Some((addr, payload)) = item else { return };
                let Some(target) = super::from_wire(addr) else {
                    debug!(%peer, %flow, "udp datagram to the resolver kind: dropped (streams only)");
                    continue;
                };
                if let Err(error) = socket.send_to(&payload, &target).await {
                    debug!(%peer, %flow, %target, %error, "udp datagram not sent");
                }
            }
            got = socket.recv_from(&mut buf) => {
                let (n, source) = match got {
                    Ok(got) => got,
                    Err(error) => {
                        debug!(%peer, %flow, %error, "udp socket failed");
                        return;
                    }
                };
                let header = UdpHeader { flow, addr: WireTarget::Ip(source) };
                let Ok(datagram) = header.datagram(&buf[..n]) else { continue };
                // One too large for a session datagram comes back as an error: dropped.
                if let Err(error) = fabric.send_datagram(peer, datagram) {
                    debug!(%peer, %flow, %error, "udp reply not sent");
                }
            }
            () = tokio::time::sleep(idle) => return,
        }
    }
}
