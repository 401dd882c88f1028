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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use fabric::id::PublicKey;
use fabric::peer::{DatagramError, Fabric};
use fabric::target::{FlowId, Target as WireTarget, UdpHeader};
use tokio::sync::{Notify, mpsc};
use tracing::{debug, warn};

use super::{ExitLink, Exits};
use crate::dialer::{BoxFuture, DialError, Dialer, Target, UdpFlow};
use crate::mesh::Mesh;

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

/// One client flow as the registry sees it: where its datagrams go, and which exit it goes
/// through (only that exit's datagrams are its own).
#[derive(Debug)]
struct Registered {
    tx: mpsc::Sender<Reply>,
    exit: Mutex<PublicKey>,
}

/// The client's open UDP flows, by number: where datagrams from the exits are delivered.
#[derive(Debug)]
pub(crate) struct UdpFlows {
    flows: Mutex<HashMap<FlowId, Arc<Registered>>>,
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
    fn register(&self, exit: PublicKey) -> (FlowId, Arc<Registered>, mpsc::Receiver<Reply>) {
        let (tx, rx) = mpsc::channel(FLOW_QUEUE);
        let registered = Arc::new(Registered {
            tx,
            exit: Mutex::new(exit),
        });
        let mut flows = lock(&self.flows);
        let mut next = lock(&self.next);
        loop {
            let id = FlowId(*next);
            *next = next.wrapping_add(1);
            if let std::collections::hash_map::Entry::Vacant(v) = flows.entry(id) {
                v.insert(registered.clone());
                return (id, registered, rx);
            }
        }
    }

    /// Hands a datagram from exit `from` to its flow; drops it when the flow is gone or
    /// behind, or goes through another exit (flow numbers are no secret between exits).
    pub(crate) fn deliver(&self, from: PublicKey, datagram: &[u8]) {
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
        let Some(flow) = lock(&self.flows).get(&header.flow).cloned() else {
            return;
        };
        if *lock(&flow.exit) != from {
            debug!(flow = %header.flow, exit = %from, "datagram from an exit the flow does not use");
            return;
        }
        let _ = flow.tx.try_send((source, payload.to_vec()));
    }

    /// Delivers the datagrams `fabric` receives until it shuts down.
    pub(crate) async fn run(self: Arc<Self>, fabric: Arc<Fabric>) {
        while let Some((from, datagram)) = fabric.recv_datagram().await {
            self.deliver(from, &datagram);
        }
    }

    /// Opens a flow through the first exit with a live session.
    pub(crate) fn associate(
        self: &Arc<Self>,
        exits: Arc<Exits>,
    ) -> Result<Box<dyn UdpFlow>, DialError> {
        let peer = first_connected(&exits)?;
        let (flow, registered, rx) = self.register(peer.public_key());
        debug!(%flow, exit = %peer.public_key(), "udp flow through exit");
        Ok(Box::new(FabricUdpFlow {
            flow,
            peer: Mutex::new(peer),
            registered,
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
    /// Its entry in the registry (which exit's datagrams are its own).
    registered: Arc<Registered>,
    /// All configured exits, also those that come up after the flow began.
    exits: Arc<Exits>,
    rx: tokio::sync::Mutex<mpsc::Receiver<Reply>>,
    flows: Arc<UdpFlows>,
}

impl Drop for FabricUdpFlow {
    fn drop(&mut self) {
        lock(&self.flows.flows).remove(&self.flow);
        // Best effort: the exit frees the flow now rather than when it idles out.
        let peer = lock(&self.peer).clone();
        let _ = peer.send_datagram(UdpHeader::end(self.flow).to_vec());
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
                *lock(&self.registered.exit) = next.public_key();
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
    /// Flows one client may have open at once; a new one beyond closes its oldest.
    pub flows_per_client: usize,
    /// Who may send UDP through this node: peers with the exit right (none by default).
    pub mesh: Arc<Mesh>,
}

impl Default for UdpOptions {
    fn default() -> Self {
        Self {
            // QUIC's default idle timeout is 30 s and keepalives are usually shorter; DNS
            // flows are done in a second. Two minutes is what conntrack gives replied UDP.
            idle_timeout: Duration::from_secs(120),
            flows_per_client: 256,
            mesh: Arc::default(),
        }
    }
}

type FlowKey = (PublicKey, FlowId);
type FlowItem = (WireTarget, Vec<u8>);

/// A flow that saw at most one datagram each way (a lookup and its answer, a probe) closes
/// after this much idle time, not the full idle timeout: resolvers and browsers open a new
/// socket per query, and each would otherwise hold a flow for minutes.
const SHORT_IDLE: Duration = Duration::from_secs(10);

/// One client flow at the exit, as the table sees it.
#[derive(Debug)]
struct ExitFlow {
    tx: mpsc::Sender<FlowItem>,
    /// When a datagram last went either way, in milliseconds since the table began.
    last: Arc<AtomicU64>,
    /// Ends the flow's task (its client opened a flow beyond its limit, and this one was
    /// its oldest).
    stop: Arc<Notify>,
}

/// The exit's flows, and how many each client has.
#[derive(Debug, Default)]
struct FlowTable {
    flows: HashMap<FlowKey, ExitFlow>,
    per_peer: HashMap<PublicKey, usize>,
}

impl FlowTable {
    fn insert(&mut self, key: FlowKey, flow: ExitFlow) {
        if self.flows.insert(key, flow).is_none() {
            *self.per_peer.entry(key.0).or_default() += 1;
        }
    }

    fn remove(&mut self, key: &FlowKey) -> Option<ExitFlow> {
        let flow = self.flows.remove(key)?;
        if let Some(n) = self.per_peer.get_mut(&key.0) {
            *n -= 1;
            if *n == 0 {
                self.per_peer.remove(&key.0);
            }
        }
        Some(flow)
    }

    /// Ends a flow its client closed; false if there was none.
    fn end(&mut self, key: &FlowKey) -> bool {
        match self.remove(key) {
            Some(flow) => {
                flow.stop.notify_one();
                true
            }
            None => false,
        }
    }

    fn count(&self, peer: PublicKey) -> usize {
        self.per_peer.get(&peer).copied().unwrap_or(0)
    }

    /// Ends `peer`'s least recently used flow, making room for a new one of its own.
    fn evict_oldest(&mut self, peer: PublicKey) -> Option<FlowId> {
        let oldest = self
            .flows
            .iter()
            .filter(|((p, _), _)| *p == peer)
            .min_by_key(|(_, f)| f.last.load(Ordering::Relaxed))
            .map(|(key, _)| *key)?;
        let flow = self.remove(&oldest)?;
        flow.stop.notify_one();
        Some(oldest.1)
    }
}

/// Serves the UDP flows of allowed clients until the fabric shuts down: one socket from
/// `dialer` per flow, replies sent back on the session. A client at its flow limit loses its
/// own least recently used flow, never the new one.
pub async fn serve_udp(fabric: Arc<Fabric>, dialer: Arc<dyn Dialer>, options: UdpOptions) {
    let table: Arc<Mutex<FlowTable>> = Arc::default();
    let epoch = Instant::now();
    while let Some((peer, datagram)) = fabric.recv_datagram().await {
        if !options.mesh.now().rights.may_exit(&peer) {
            // UDP flows are exit traffic only (shares are TCP for now).
            debug!(%peer, "datagram from a peer without the exit right dropped");
            continue;
        }
        if let Some(flow) = UdpHeader::parse_end(&datagram) {
            if lock(&table).end(&(peer, flow)) {
                debug!(%peer, %flow, "udp flow ended by the client");
            }
            continue;
        }
        let (header, payload) = match UdpHeader::parse(&datagram) {
            Ok(parsed) => parsed,
            Err(error) => {
                debug!(%peer, %error, "bad datagram from a client");
                continue;
            }
        };
        let key = (peer, header.flow);
        let item = (header.addr, payload.to_vec());
        let tx = lock(&table).flows.get(&key).map(|f| f.tx.clone());
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
        let (tx, rx) = mpsc::channel(FLOW_QUEUE);
        let _ = tx.try_send(item);
        let flow = ExitFlow {
            tx,
            last: Arc::new(AtomicU64::new(millis_since(epoch))),
            stop: Arc::new(Notify::new()),
        };
        let (last, stop, own) = (flow.last.clone(), flow.stop.clone(), flow.tx.clone());
        {
            let mut table = lock(&table);
            if table.count(peer) >= options.flows_per_client
                && let Some(evicted) = table.evict_oldest(peer)
            {
                debug!(%peer, flow = %evicted, "client at its udp flow limit: its oldest flow closed");
            }
            table.insert(key, flow);
        }
        tokio::spawn(run_flow(
            fabric.clone(),
            dialer.clone(),
            key,
            FlowTask {
                rx,
                own,
                last,
                stop,
                epoch,
            },
            table.clone(),
            options.idle_timeout,
        ));
    }
}

/// What one flow's task holds of its own.
#[derive(Debug)]
struct FlowTask {
    rx: mpsc::Receiver<FlowItem>,
    /// Its own sender, to tell its table entry from a newer flow's of the same number.
    own: mpsc::Sender<FlowItem>,
    last: Arc<AtomicU64>,
    stop: Arc<Notify>,
    epoch: Instant,
}

fn millis_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// One client flow at the exit: its socket, until it has been idle for `idle` (or
/// [`SHORT_IDLE`] after a single exchange), or is evicted.
async fn run_flow(
    fabric: Arc<Fabric>,
    dialer: Arc<dyn Dialer>,
    (peer, flow): FlowKey,
    mut task: FlowTask,
    table: Arc<Mutex<FlowTable>>,
    idle: Duration,
) {
    match dialer.udp_associate().await {
        Ok(socket) => {
            debug!(%peer, %flow, "udp flow opened");
            let stop = task.stop.clone();
            tokio::select! {
                () = relay_flow(&fabric, socket.as_ref(), peer, flow, &mut task, idle) => {}
                () = stop.notified() => debug!(%peer, %flow, "udp flow evicted"),
            }
            debug!(%peer, %flow, "udp flow closed");
        }
        Err(error) => warn!(%peer, %flow, %error, "udp socket for a flow failed"),
    }
    let mut table = lock(&table);
    if table
        .flows
        .get(&(peer, flow))
        .is_some_and(|f| f.tx.same_channel(&task.own))
    {
        table.remove(&(peer, flow));
    }
}

async fn relay_flow(
    fabric: &Fabric,
    socket: &dyn UdpFlow,
    peer: PublicKey,
    flow: FlowId,
    task: &mut FlowTask,
    idle: Duration,
) {
    let mut buf = vec![0u8; 65536];
    let (mut sent, mut received) = (0u64, 0u64);
    loop {
        let wait = if sent <= 1 && received <= 1 {
            idle.min(SHORT_IDLE)
        } else {
            idle
        };
        tokio::select! {
            item = task.rx.recv() => {
                let Some((addr, payload)) = item else { return };
                let Some(target) = super::from_wire(addr) else {
                    debug!(%peer, %flow, "udp datagram to the resolver kind: dropped (streams only)");
                    continue;
                };
                sent += 1;
                task.last.store(millis_since(task.epoch), Ordering::Relaxed);
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
                received += 1;
                task.last.store(millis_since(task.epoch), Ordering::Relaxed);
                let header = UdpHeader { flow, addr: WireTarget::Ip(source) };
                let Ok(datagram) = header.datagram(&buf[..n]) else { continue };
                // One too large for a session datagram comes back as an error: dropped.
                if let Err(error) = fabric.send_datagram(peer, datagram) {
                    debug!(%peer, %flow, %error, "udp reply not sent");
                }
            }
            () = tokio::time::sleep(wait) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(last: u64) -> ExitFlow {
        ExitFlow {
            tx: mpsc::channel(1).0,
            last: Arc::new(AtomicU64::new(last)),
            stop: Arc::new(Notify::new()),
        }
    }

    #[tokio::test]
    async fn a_client_at_its_limit_loses_its_own_oldest_flow() {
        let (a, b) = (PublicKey([1; 32]), PublicKey([2; 32]));
        let mut table = FlowTable::default();
        table.insert((a, FlowId(1)), flow(50));
        table.insert((a, FlowId(2)), flow(10));
        table.insert((a, FlowId(3)), flow(30));
        // Another client's older flow is not a's to give up.
        table.insert((b, FlowId(2)), flow(1));
        let stop = table.flows[&(a, FlowId(2))].stop.clone();
        assert_eq!(table.count(a), 3);
        assert_eq!(table.evict_oldest(a), Some(FlowId(2)));
        // The evicted flow's task is told to end (the notification waits for it).
        stop.notified().await;
        assert_eq!(table.count(a), 2);
        assert_eq!(table.count(b), 1);
        assert!(table.flows.contains_key(&(b, FlowId(2))));
        assert_eq!(table.evict_oldest(a), Some(FlowId(3)));
        assert_eq!(table.evict_oldest(a), Some(FlowId(1)));
        assert_eq!(table.evict_oldest(a), None);
        assert_eq!(table.count(a), 0);
        assert!(!table.per_peer.contains_key(&a));
    }

    #[tokio::test]
    async fn a_flow_its_client_ended_is_freed_at_once() {
        let (a, b) = (PublicKey([1; 32]), PublicKey([2; 32]));
        let mut table = FlowTable::default();
        table.insert((a, FlowId(7)), flow(1));
        let stop = table.flows[&(a, FlowId(7))].stop.clone();
        // Another client cannot end a's flow of the same number.
        assert!(!table.end(&(b, FlowId(7))));
        assert!(table.end(&(a, FlowId(7))));
        stop.notified().await;
        assert_eq!(table.count(a), 0);
        assert!(!table.end(&(a, FlowId(7))));
    }
}
