//! The tokio driver: one task owns the TUN device and runs the [`Stack`] whenever a packet
//! arrives, an application handle did something, or a timer is due. It `select!`s over those
//! three and nothing else; flows reach the application through one channel.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use smoltcp::time::Instant;
use tokio::sync::{Notify, mpsc};
use tracing::{debug, trace, warn};

use crate::device::TunDevice;
use crate::offload::VNET_HDR_LEN;
use crate::stack::{Event, FlowKey, Stack, StackConfig};
use crate::tcp::TcpRequest;
use crate::udp::{FlowTable, Lookup, UdpFlowId};

/// Packets read per wake-up before the stack runs (bounds latency and the lock hold time).
const BATCH: usize = 32;
/// Size of a read buffer: the virtio header and a 64 KiB packet.
const READ_BUF: usize = VNET_HDR_LEN + 65535;
/// Datagrams queued per UDP flow before newer ones are dropped.
const UDP_QUEUE: usize = 256;

/// What the driver and the application handles share: the stack behind one lock (never held
/// across an `.await`) and the bell that wakes the driver.
pub(crate) struct Shared {
    stack: Mutex<Stack>,
    bell: Notify,
    epoch: std::time::Instant,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Stack> {
        // A panic while holding the lock leaves smoltcp's state usable; go on with it.
        self.stack.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn wake(&self) {
        self.bell.notify_one();
    }

    fn now(&self) -> Instant {
        Instant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }
}

/// A new flow from the application.
#[derive(Debug)]
#[non_exhaustive]
pub enum Incoming {
    /// A TCP connection waiting to be accepted or refused.
    Tcp(TcpRequest),
    /// The first datagram of a UDP flow (later ones arrive on the flow itself).
    Udp(UdpFlow),
    /// An ICMP echo request ("ping"): answered only if the application says so.
    Echo(Echo),
}

/// An echo request from the application, to answer with [`Echo::reply`] (dropping it leaves
/// the ping unanswered, as a host that does not exist would).
#[derive(Debug)]
pub struct Echo {
    shared: Arc<Shared>,
    request: crate::stack::EchoRequest,
}

impl Echo {
    /// The address pinged.
    pub fn dst(&self) -> std::net::IpAddr {
        self.request.dst
    }

    /// The application's address.
    pub fn src(&self) -> std::net::IpAddr {
        self.request.src
    }

    /// Answers it, from the address pinged.
    pub fn reply(self) {
        self.shared.lock().send_echo_reply(&self.request);
        self.shared.wake();
    }
}

/// The datagrams one application socket sends through the TUN, to any destination.
#[derive(Debug)]
pub struct UdpFlow {
    src: SocketAddr,
    rx: mpsc::Receiver<(SocketAddr, Vec<u8>)>,
    reply: UdpReply,
}

impl UdpFlow {
    /// The application socket's address.
    pub fn src(&self) -> SocketAddr {
        self.src
    }

    /// The next datagram: where the application sent it, and its payload. `None` once the flow
    /// expired (idle) or the stack stopped.
    pub async fn recv(&mut self) -> Option<(SocketAddr, Vec<u8>)> {
        self.rx.recv().await
    }

    /// A handle to send replies to the application.
    pub fn reply(&self) -> UdpReply {
        self.reply.clone()
    }
}

/// Sends datagrams to one application socket.
#[derive(Clone)]
pub struct UdpReply {
    shared: Arc<Shared>,
    to: SocketAddr,
}

impl fmt::Debug for UdpReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UdpReply").field("to", &self.to).finish()
    }
}

impl UdpReply {
    /// Sends `payload` to the application as if from `from` (the address it sent to, or any
    /// other peer). Dropped when the families differ.
    pub fn send(&self, from: SocketAddr, payload: &[u8]) {
        let from = SocketAddr::new(from.ip().to_canonical(), from.port());
        self.shared.lock().send_udp(
            FlowKey {
                src: self.to,
                dst: from,
            },
            payload,
        );
        self.shared.wake();
    }
}

/// A running stack: the driver task and the stream of new flows.
#[derive(Debug)]
pub struct NetStack {
    incoming: mpsc::Receiver<Incoming>,
    task: tokio::task::JoinHandle<io::Result<()>>,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

impl NetStack {
    /// Starts the driver on `device` (its offload and MTU override `config`'s).
    pub fn spawn(device: TunDevice, mut config: StackConfig, udp_idle: Duration) -> Self {
        config.offload = device.offload();
        config.mtu = usize::from(device.mtu());
        let epoch = std::time::Instant::now();
        let shared = Arc::new(Shared {
            stack: Mutex::new(Stack::new(config, Instant::from_micros(0))),
            bell: Notify::new(),
            epoch,
        });
        let (tx, incoming) = mpsc::channel(1024);
        let task = tokio::spawn(drive(device, shared, tx, udp_idle));
        Self { incoming, task }
    }

    /// The next new flow; `None` once the driver stopped.
    pub async fn accept(&mut self) -> Option<Incoming> {
        self.incoming.recv().await
    }

    /// Stops the driver (dropping the device closes it).
    pub fn abort(&self) {
        self.task.abort();
    }
}

impl Drop for NetStack {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn drive(
    device: TunDevice,
    shared: Arc<Shared>,
    incoming: mpsc::Sender<Incoming>,
    udp_idle: Duration,
) -> io::Result<()> {
    let offset = if device.offload() { VNET_HDR_LEN } else { 0 };
    let mut inbox: Vec<(Vec<u8>, usize)> = Vec::with_capacity(BATCH);
    let mut outbox: Vec<Vec<u8>> = Vec::with_capacity(BATCH);
    let mut events = Vec::new();
    let mut spare: Vec<Vec<u8>> = Vec::new();
    let mut written: Vec<Vec<u8>> = Vec::new();
    let mut replied: Vec<SocketAddr> = Vec::new();
    let mut udp = FlowTable::new(udp_idle);
    let mut udp_tx: HashMap<UdpFlowId, mpsc::Sender<(SocketAddr, Vec<u8>)>> = HashMap::new();
    loop {
        // 1. Read what the kernel has for us, without holding the lock.
        let mut drained = false;
        while inbox.len() < BATCH {
            let mut buf = spare.pop().unwrap_or_default();
            // Zeroed once per buffer: buffers keep their length through the stack and back.
            if buf.len() < READ_BUF {
                buf.resize(READ_BUF, 0);
            }
            match device.try_recv(&mut buf) {
                Ok(n) => inbox.push((buf, n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    spare.push(buf);
                    drained = true;
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        // 2. Run the stack.
        let deadline = {
            let mut stack = shared.lock();
            let now = shared.now();
            for (buf, n) in inbox.drain(..) {
                stack.handle_input(now, buf, offset, n);
            }
            stack.poll(now);
            while let Some(buf) = stack.poll_transmit() {
                outbox.push(buf);
            }
            while let Some(ev) = stack.poll_event() {
                events.push(ev);
            }
            // Written buffers go back to the stack for its next packets; reads get buffers the
            // stack consumed, which still have their full length.
            for buf in written.drain(..) {
                stack.recycle(buf);
            }
            while spare.len() < BATCH {
                spare.push(stack.buffer());
            }
            // Replies keep a flow alive too (a stream the application only receives).
            stack.take_udp_replied(&mut replied);
            for src in replied.drain(..) {
                udp.touch(now, src);
            }
            for (src, id) in udp.handle_timeout(now) {
                trace!(%src, "udp flow expired");
                udp_tx.remove(&id);
            }
            let tcp = stack.poll_timeout(now);
            let deadline = match (tcp, udp.poll_timeout()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            deadline.map(|d| tokio::time::Instant::now() + wait_until(d, now))
        };
        // 3. Write what the stack produced.
        for buf in outbox.drain(..) {
            if let Err(e) = device.send(&buf).await {
                // The kernel refuses a malformed packet with EINVAL; never stop for one.
                warn!(%e, len = buf.len(), "tun write failed");
            }
            written.push(buf);
        }
        // 4. Hand the events to the application.
        for ev in events.drain(..) {
            match ev {
                Event::TcpSyn(key) => {
                    let req = TcpRequest::new(shared.clone(), key);
                    if incoming.try_send(Incoming::Tcp(req)).is_err() {
                        // Dropping the request refuses it.
                        debug!(dst = %key.dst, "application not keeping up, refusing");
                    }
                }
                Event::Echo(request) => {
                    let echo = Echo {
                        shared: shared.clone(),
                        request,
                    };
                    // A full queue drops the ping, as a busy host's would be.
                    let _ = incoming.try_send(Incoming::Echo(echo));
                }
                Event::Udp { key, payload } => {
                    let now = shared.now();
                    let mut lookup = udp.lookup(now, key.src);
                    if let Lookup::Existing(id) = lookup
                        && udp_tx.get(&id).is_none_or(mpsc::Sender::is_closed)
                    {
                        // The application ended this flow (an answered DNS socket, say): this
                        // datagram starts a new one rather than being lost.
                        udp.remove(key.src);
                        udp_tx.remove(&id);
                        lookup = udp.lookup(now, key.src);
                    }
                    let sent = match lookup {
                        Lookup::Existing(id) => match udp_tx.get(&id) {
                            Some(tx) => match tx.try_send((key.dst, payload)) {
                                Ok(()) => true,
                                Err(mpsc::error::TrySendError::Full(_)) => true,
                                Err(mpsc::error::TrySendError::Closed(_)) => false,
                            },
                            None => false,
                        },
                        Lookup::New(id) => {
                            let (tx, rx) = mpsc::channel(UDP_QUEUE);
                            let _ = tx.try_send((key.dst, payload));
                            let flow = UdpFlow {
                                src: key.src,
                                rx,
                                reply: UdpReply {
                                    shared: shared.clone(),
                                    to: key.src,
                                },
                            };
                            udp_tx.insert(id, tx);
                            incoming.try_send(Incoming::Udp(flow)).is_ok()
                        }
                    };
                    if !sent && let Some(id) = udp.remove(key.src) {
                        // The application side is gone: the next datagram starts afresh.
                        udp_tx.remove(&id);
                    }
                }
            }
        }
        if incoming.is_closed() {
            return Ok(());
        }
        if !drained {
            // More packets are waiting: go on, but let the relays run in between.
            tokio::task::yield_now().await;
            continue;
        }
        // 5. Sleep until a packet, an application handle, or a timer.
        let sleep = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = device.readable() => r?,
            () = shared.bell.notified() => {}
            () = sleep => {}
        }
    }
}

/// How long to sleep until `deadline`: zero when it is due. smoltcp's `poll_at` says "poll
/// now" with `Instant::from_millis(0)`, and its `Instant - Instant` is an absolute
/// difference, so subtracting directly would sleep for the process's uptime instead.
fn wait_until(deadline: Instant, now: Instant) -> Duration {
    if deadline <= now {
        return Duration::ZERO;
    }
    Duration::from_micros((deadline - now).total_micros())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_due_deadline_means_now() {
        let now = Instant::from_secs(3600);
        assert_eq!(wait_until(Instant::from_millis(0), now), Duration::ZERO);
        assert_eq!(wait_until(Instant::from_secs(3599), now), Duration::ZERO);
        assert_eq!(wait_until(now, now), Duration::ZERO);
        assert_eq!(
            wait_until(Instant::from_millis(3_600_250), now),
            Duration::from_millis(250)
        );
    }
}
