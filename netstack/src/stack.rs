//! The sans-IO core: a smoltcp interface that accepts every destination, plus the flow logic
//! around it (which SYN opens which socket, which UDP datagram goes to the application, which
//! sockets are reaped).
//!
//! The driver calls, in this order, each time it wakes:
//! 1. [`Stack::handle_input`] for every packet read from the device,
//! 2. [`Stack::poll`] once,
//! 3. [`Stack::poll_transmit`] until `None`, writing each buffer to the device, and
//!    [`Stack::poll_event`] until `None`, handing each event to the application,
//! 4. [`Stack::poll_timeout`] to learn when to wake up at the latest.
//!
//! The core never reads the clock: `now` is an argument.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Checksum, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpListenEndpoint};
use tracing::{debug, trace};

use crate::offload::{self, VNET_HDR_LEN};

/// Largest IP packet the stack handles with offload (a 64 KiB TSO segment).
const MAX_PACKET: usize = 65535;
/// How long a socket whose application handle is gone may take to finish its FIN exchange.
const LINGER: Duration = Duration::from_secs(30);
/// Spare packet buffers kept for reuse.
const POOL: usize = 256;

/// How the stack is tuned.
#[derive(Debug, Clone)]
pub struct StackConfig {
    /// MTU of the TUN device (what the kernel side sends and receives per segment).
    pub mtu: usize,
    /// Whether the device carries `virtio_net_hdr` (Linux offload): 64 KiB segments and partial
    /// checksums both ways.
    pub offload: bool,
    /// Receive buffer per TCP flow (bounds the window advertised to the application).
    pub tcp_rx_buffer: usize,
    /// Send buffer per TCP flow.
    pub tcp_tx_buffer: usize,
    /// SYNs waiting for the application's answer at most (more are refused).
    pub max_pending: usize,
    /// Seed for initial sequence numbers.
    pub seed: u64,
}

impl Default for StackConfig {
    fn default() -> Self {
        Self {
            mtu: 1500,
            offload: true,
            // The window must cover the round trip through the stack, which on a busy machine
            // is milliseconds of scheduling, not the microseconds of the wire: 512 KiB left
            // the sender window-limited 84 % of the time at 2 ms. Buffers are allocated zeroed
            // and lazily backed by the kernel: an idle flow costs the pages it touched, not
            // these sizes. The receive side (upload) gets more: when the relay task is not
            // scheduled for a few milliseconds, a 4 MiB window ran dry and the application's
            // kernel retransmitted (7-14 retransmissions per 5 s upload at load 10-13, 0-3
            // with 16 MiB, and 2.2 -> 2.5 Gbit/s on average over five alternating runs).
            tcp_rx_buffer: 16 * 1024 * 1024,
            tcp_tx_buffer: 4 * 1024 * 1024,
            max_pending: 4096,
            seed: 0x6e65_7473_7461_636b,
        }
    }
}

/// One TCP connection or UDP exchange as the application saw it: `src` is the application's
/// own address, `dst` the destination it meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// The application's address and port.
    pub src: SocketAddr,
    /// The original destination.
    pub dst: SocketAddr,
}

/// What the stack tells the application.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A SYN for a new connection arrived; answer with [`Stack::accept`] or [`Stack::reject`].
    TcpSyn(FlowKey),
    /// A UDP datagram from the application.
    Udp {
        /// Who sent it to where.
        key: FlowKey,
        /// The payload.
        payload: Vec<u8>,
    },
    /// An ICMP (v4 or v6) echo request; answer with [`Stack::send_echo_reply`] or not at all.
    Echo(EchoRequest),
}

/// An echo request ("ping") from the application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EchoRequest {
    /// The application's address.
    pub src: IpAddr,
    /// The address it pinged.
    pub dst: IpAddr,
    /// The identifier, sequence number and data after the type, code and checksum: what the
    /// reply carries back unchanged.
    pub body: Vec<u8>,
}

/// What happened to one packet given to [`Stack::handle_input`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// Queued for the TCP/IP stack.
    Queued,
    /// A UDP datagram, turned into an [`Event::Udp`].
    Udp,
    /// An echo request, turned into an [`Event::Echo`].
    Echo,
    /// A SYN held back until the application accepts or rejects the connection.
    Held,
    /// Not IP, truncated, a duplicate SYN, or a protocol this stack does not carry.
    Dropped,
}

/// The socket of an accepted flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowId(SocketHandle);

/// Why a connection could not be accepted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AcceptError {
    /// No SYN waits for this flow (rejected already, or never seen).
    #[error("no pending connection for this flow")]
    NotPending,
}

/// Per-socket bookkeeping.
#[derive(Debug)]
struct FlowMeta {
    key: FlowKey,
    /// The application dropped its handle: reap once closed.
    detached: bool,
}

/// The TCP/IP core. See the module docs for the call order.
pub struct Stack {
    iface: Interface,
    sockets: SocketSet<'static>,
    dev: QueueDevice,
    config: StackConfig,
    pending: HashMap<FlowKey, Vec<u8>>,
    flows: HashMap<FlowKey, SocketHandle>,
    meta: HashMap<SocketHandle, FlowMeta>,
    closing: HashSet<SocketHandle>,
    events: VecDeque<Event>,
    /// Application addresses UDP replies went to since the driver last asked (they keep the
    /// UDP flows alive).
    udp_replied: Vec<SocketAddr>,
}

impl std::fmt::Debug for Stack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stack")
            .field("flows", &self.flows.len())
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl Stack {
    /// A stack with no flows.
    pub fn new(config: StackConfig, now: Instant) -> Self {
        let mut dev = QueueDevice::new(&config);
        let mut iface_config = Config::new(HardwareAddress::Ip);
        iface_config.random_seed = config.seed;
        let mut iface = Interface::new(iface_config, &mut dev, now);
        // With any-IP the interface answers for every destination; the addresses only serve as
        // sources for the ICMP errors it may send.
        iface.set_any_ip(true);
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(IpAddress::v4(198, 18, 0, 1), 32));
            let _ = addrs.push(IpCidr::new(IpAddress::v6(0xfc00, 0, 0, 0, 0, 0, 0, 1), 128));
        });
        Self {
            iface,
            sockets: SocketSet::new(Vec::new()),
            dev,
            config,
            pending: HashMap::new(),
            flows: HashMap::new(),
            meta: HashMap::new(),
            closing: HashSet::new(),
            events: VecDeque::new(),
            udp_replied: Vec::new(),
        }
    }

    /// The configuration the stack runs with.
    pub fn config(&self) -> &StackConfig {
        &self.config
    }

    /// Takes one packet read from the device: `buf[offset..len]` is the IP packet (with
    /// offload, `offset` is [`VNET_HDR_LEN`] and the header before it is ignored: checksums from
    /// the kernel are not verified, partial or not). Bytes past `len` are ignored, so a read
    /// buffer can keep its full length (no zeroing per packet).
    pub fn handle_input(
        &mut self,
        _now: Instant,
        mut buf: Vec<u8>,
        offset: usize,
        len: usize,
    ) -> Input {
        let Some(packet) = buf.get_mut(offset..len) else {
            return Input::Dropped;
        };
        let Some(info) = offload::l4_info(packet) else {
            trace!(len = packet.len(), "not an IP packet we carry");
            self.dev.recycle(buf);
            return Input::Dropped;
        };
        let l4 = info.ip_hdr_len;
        let Some((src_ip, dst_ip)) = addresses(packet, info.version) else {
            return Input::Dropped;
        };
        match info.protocol {
            6 if info.l4_len >= 20 => {
                let ports = (port_at(packet, l4), port_at(packet, l4 + 2));
                let key = FlowKey {
                    src: SocketAddr::new(src_ip, ports.0),
                    dst: SocketAddr::new(dst_ip, ports.1),
                };
                let flags = packet[l4 + 13];
                let syn_only = flags & 0x12 == 0x02 && flags & 0x04 == 0;
                if syn_only && !self.flows.contains_key(&key) {
                    if self.pending.contains_key(&key) {
                        // A retransmitted SYN while the application is still dialing.
                        self.dev.recycle(buf);
                        return Input::Dropped;
                    }
                    if self.pending.len() >= self.config.max_pending {
                        debug!(%key.dst, "too many pending connections, refusing");
                        self.dev.rx.push_back((buf, offset, len));
                        return Input::Queued;
                    }
                    if self.config.offload {
                        let mss = self.local_mss(info.version);
                        offload::raise_syn_mss(&mut buf[offset..], mss);
                    }
                    self.pending.insert(key, trim(buf, offset, &info));
                    self.events.push_back(Event::TcpSyn(key));
                    return Input::Held;
                }
                self.dev.rx.push_back((buf, offset, len));
                Input::Queued
            }
            17 if info.l4_len >= 8 => {
                let key = FlowKey {
                    src: SocketAddr::new(src_ip, port_at(packet, l4)),
                    dst: SocketAddr::new(dst_ip, port_at(packet, l4 + 2)),
                };
                let udp_len = usize::from(port_at(packet, l4 + 4));
                let end = l4 + udp_len.clamp(8, info.l4_len);
                let payload = packet[l4 + 8..end].to_vec();
                self.dev.recycle(buf);
                self.events.push_back(Event::Udp { key, payload });
                Input::Udp
            }
            // Echo requests go to the application, which answers those it can stand for (a
            // peer's overlay address, say): the stack itself would answer only its own
            // addresses.
            1 | 58 if is_echo_request(info.version, info.protocol, &packet[l4..]) => {
                let end = l4 + info.l4_len;
                let body = packet[l4 + 4..end].to_vec();
                self.dev.recycle(buf);
                self.events.push_back(Event::Echo(EchoRequest {
                    src: src_ip,
                    dst: dst_ip,
                    body,
                }));
                Input::Echo
            }
            // Other ICMP and everything else goes to smoltcp, which drops what it cannot use.
            _ => {
                self.dev.rx.push_back((buf, offset, len));
                Input::Queued
            }
        }
    }

    /// The MSS the stack pretends the application offered: the largest segment that fits a
    /// 64 KiB IP packet.
    fn local_mss(&self, version: u8) -> u16 {
        let ip = if version == 4 { 20 } else { 40 };
        (MAX_PACKET - ip - 20) as u16
    }

    /// Opens the socket for a pending SYN and lets the handshake proceed.
    pub fn accept(&mut self, key: FlowKey) -> Result<FlowId, AcceptError> {
        let syn = self.pending.remove(&key).ok_or(AcceptError::NotPending)?;
        let rx = tcp::SocketBuffer::new(vec![0; self.config.tcp_rx_buffer]);
        let tx = tcp::SocketBuffer::new(vec![0; self.config.tcp_tx_buffer]);
        let mut socket = tcp::Socket::new(rx, tx);
        // ACK at once: the peer is the local kernel, delayed ACKs only cost throughput.
        socket.set_ack_delay(None);
        socket.set_nagle_enabled(false);
        let endpoint = IpListenEndpoint {
            addr: Some(key.dst.ip().into()),
            port: key.dst.port(),
        };
        // Listening cannot fail with a non-zero port; a zero port gets a RST below.
        if socket.listen(endpoint).is_err() {
            let n = syn.len();
            self.dev.rx.push_back((syn, 0, n));
            return Err(AcceptError::NotPending);
        }
        let handle = self.sockets.add(socket);
        self.flows.insert(key, handle);
        self.meta.insert(
            handle,
            FlowMeta {
                key,
                detached: false,
            },
        );
        let n = syn.len();
        self.dev.rx.push_back((syn, 0, n));
        trace!(src = %key.src, dst = %key.dst, "accepted");
        Ok(FlowId(handle))
    }

    /// Refuses a pending SYN: the application gets a RST, as from a closed port.
    pub fn reject(&mut self, key: FlowKey) {
        if let Some(syn) = self.pending.remove(&key) {
            // No socket matches, so smoltcp answers the SYN with a RST.
            let n = syn.len();
            self.dev.rx.push_back((syn, 0, n));
        }
    }

    /// Runs the TCP/IP stack over the queued packets and timers.
    pub fn poll(&mut self, now: Instant) {
        self.iface.poll(now, &mut self.dev, &mut self.sockets);
        self.reap();
    }

    /// Removes detached sockets that finished closing (or lingered too long).
    fn reap(&mut self) {
        if self.closing.is_empty() {
            return;
        }
        let mut done = Vec::new();
        for &handle in &self.closing {
            let socket = self.sockets.get::<tcp::Socket>(handle);
            // TIME-WAIT protects a later connection with the same 4-tuple from old segments;
            // the peer here is the local kernel, which picks a fresh port for a new connection,
            // so the socket can go at once.
            if matches!(socket.state(), tcp::State::Closed | tcp::State::TimeWait) {
                done.push(handle);
            }
        }
        for handle in done {
            self.remove(handle);
        }
    }

    fn remove(&mut self, handle: SocketHandle) {
        self.closing.remove(&handle);
        if let Some(meta) = self.meta.remove(&handle) {
            self.flows.remove(&meta.key);
            trace!(src = %meta.key.src, dst = %meta.key.dst, "reaped");
        }
        self.sockets.remove(handle);
    }

    /// The application dropped its handle: close the socket (FIN after what is buffered) and
    /// reap it once closed.
    pub fn detach(&mut self, id: FlowId) {
        let Some(meta) = self.meta.get_mut(&id.0) else {
            return;
        };
        meta.detached = true;
        let socket = self.sockets.get_mut::<tcp::Socket>(id.0);
        socket.close();
        socket.set_timeout(Some(LINGER.into()));
        self.closing.insert(id.0);
        self.reap();
    }

    /// Aborts a flow (RST to the application) and reaps it.
    pub fn abort(&mut self, id: FlowId) {
        if self.meta.contains_key(&id.0) {
            self.sockets.get_mut::<tcp::Socket>(id.0).abort();
            if let Some(meta) = self.meta.get_mut(&id.0) {
                meta.detached = true;
            }
            self.closing.insert(id.0);
        }
    }

    /// The socket of an accepted flow.
    pub fn socket(&mut self, id: FlowId) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(id.0)
    }

    /// Queues a UDP datagram from `key.dst` to `key.src` (a reply to the application).
    pub fn send_udp(&mut self, key: FlowKey, payload: &[u8]) {
        let mut buf = self.dev.buffer();
        let start = if self.config.offload { VNET_HDR_LEN } else { 0 };
        buf.resize(start, 0);
        if !build_udp(&mut buf, key.dst, key.src, payload) {
            self.dev.recycle(buf);
            return;
        }
        if self.config.offload {
            offload::VnetHdr::default().emit(&mut buf);
        }
        self.dev.tx.push_back(buf);
        if self.udp_replied.last() != Some(&key.src) {
            self.udp_replied.push(key.src);
        }
    }

    /// Queues the echo reply to `request`, from the address it pinged.
    pub fn send_echo_reply(&mut self, request: &EchoRequest) {
        let mut buf = self.dev.buffer();
        let start = if self.config.offload { VNET_HDR_LEN } else { 0 };
        buf.resize(start, 0);
        if !build_echo_reply(&mut buf, request) {
            self.dev.recycle(buf);
            return;
        }
        if self.config.offload {
            offload::VnetHdr::default().emit(&mut buf);
        }
        self.dev.tx.push_back(buf);
    }

    /// Moves the application addresses that got UDP replies since the last call into `out`.
    pub fn take_udp_replied(&mut self, out: &mut Vec<SocketAddr>) {
        out.append(&mut self.udp_replied);
    }

    /// The next buffer to write to the device (with the `virtio_net_hdr` in front when the
    /// device has offload). Give it back with [`Stack::recycle`] once written.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.dev.tx.pop_front()
    }

    /// Returns a written buffer for reuse.
    pub fn recycle(&mut self, buf: Vec<u8>) {
        self.dev.recycle(buf);
    }

    /// An empty buffer to read the next packet into.
    pub fn buffer(&mut self) -> Vec<u8> {
        self.dev.buffer()
    }

    /// The next event for the application.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Stack::poll`] must run next at the latest (`None`: only on input).
    pub fn poll_timeout(&mut self, now: Instant) -> Option<Instant> {
        self.iface.poll_at(now, &self.sockets)
    }

    /// Open TCP flows (accepted and not yet reaped).
    pub fn tcp_flows(&self) -> usize {
        self.flows.len()
    }

    /// SYNs waiting for the application.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

fn port_at(p: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([p[i], p[i + 1]])
}

fn addresses(p: &[u8], version: u8) -> Option<(IpAddr, IpAddr)> {
    if version == 4 {
        let s: [u8; 4] = p.get(12..16)?.try_into().ok()?;
        let d: [u8; 4] = p.get(16..20)?.try_into().ok()?;
        Some((Ipv4Addr::from(s).into(), Ipv4Addr::from(d).into()))
    } else {
        let s: [u8; 16] = p.get(8..24)?.try_into().ok()?;
        let d: [u8; 16] = p.get(24..40)?.try_into().ok()?;
        Some((Ipv6Addr::from(s).into(), Ipv6Addr::from(d).into()))
    }
}

/// Copies the IP packet out of a read buffer into a right-sized one (a SYN waits a whole dial;
/// it should not pin a 64 KiB buffer).
fn trim(buf: Vec<u8>, offset: usize, info: &offload::L4Info) -> Vec<u8> {
    let len = info.ip_hdr_len + info.l4_len;
    buf[offset..offset + len].to_vec()
}

/// Whether an ICMP message (`l4`: from its type on) is an echo request of its IP version.
fn is_echo_request(version: u8, protocol: u8, l4: &[u8]) -> bool {
    l4.len() >= 8 && l4[1] == 0 && matches!((version, protocol, l4[0]), (4, 1, 8) | (6, 58, 128))
}

/// Appends the IP header of a packet from `src` to `dst` carrying `l4_len` bytes of
/// `protocol` (IPv4 with its header checksum; TTL or hop limit 64). `false` when the families
/// differ or the packet would not fit in 64 KiB.
fn push_ip_header(
    buf: &mut Vec<u8>,
    src: IpAddr,
    dst: IpAddr,
    protocol: u8,
    l4_len: usize,
) -> bool {
    let start = buf.len();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let total = 20 + l4_len;
            if total > MAX_PACKET {
                return false;
            }
            buf.extend_from_slice(&[0x45, 0]);
            buf.extend_from_slice(&(total as u16).to_be_bytes());
            buf.extend_from_slice(&[0, 0, 0x40, 0, 64, protocol, 0, 0]);
            buf.extend_from_slice(&s.octets());
            buf.extend_from_slice(&d.octets());
            let csum = !offload::fold(offload::sum_words(0, &buf[start..start + 20]));
            buf[start + 10..start + 12].copy_from_slice(&csum.to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            if l4_len > MAX_PACKET {
                return false;
            }
            buf.extend_from_slice(&[0x60, 0, 0, 0]);
            buf.extend_from_slice(&(l4_len as u16).to_be_bytes());
            buf.extend_from_slice(&[protocol, 64]);
            buf.extend_from_slice(&s.octets());
            buf.extend_from_slice(&d.octets());
        }
        _ => return false,
    }
    true
}

/// Appends to `buf` the IP packet answering `request`: from its destination to its source,
/// ICMP echo reply (type 0, or 129 for IPv6) with the request's body.
fn build_echo_reply(buf: &mut Vec<u8>, request: &EchoRequest) -> bool {
    let start = buf.len();
    let (protocol, kind) = if request.src.is_ipv4() {
        (1, 0)
    } else {
        (58, 129)
    };
    if !push_ip_header(
        buf,
        request.dst,
        request.src,
        protocol,
        4 + request.body.len(),
    ) {
        return false;
    }
    buf.extend_from_slice(&[kind, 0, 0, 0]);
    buf.extend_from_slice(&request.body);
    offload::fill_l4_checksum(&mut buf[start..])
}

/// Appends an IP+UDP packet from `src` to `dst` to `buf`, with full checksums. `false` when
/// the families differ or the payload does not fit a 64 KiB packet.
pub(crate) fn build_udp(
    buf: &mut Vec<u8>,
    src: SocketAddr,
    dst: SocketAddr,
    payload: &[u8],
) -> bool {
    let start = buf.len();
    let udp_len = 8 + payload.len();
    if !push_ip_header(buf, src.ip(), dst.ip(), 17, udp_len) {
        return false;
    }
    buf.extend_from_slice(&src.port().to_be_bytes());
    buf.extend_from_slice(&dst.port().to_be_bytes());
    buf.extend_from_slice(&(udp_len as u16).to_be_bytes());
    buf.extend_from_slice(&[0, 0]);
    buf.extend_from_slice(payload);
    offload::fill_l4_checksum(&mut buf[start..])
}

/// The smoltcp device: packets handed in by [`Stack::handle_input`] and packets waiting for
/// [`Stack::poll_transmit`], in memory.
#[derive(Debug)]
struct QueueDevice {
    rx: VecDeque<(Vec<u8>, usize, usize)>,
    tx: VecDeque<Vec<u8>>,
    pool: Vec<Vec<u8>>,
    /// Buffers smoltcp consumed (kept apart from `pool` so the rx and tx tokens borrow
    /// different fields).
    spent: Vec<Vec<u8>>,
    offload: bool,
    mtu: usize,
}

impl QueueDevice {
    fn new(config: &StackConfig) -> Self {
        Self {
            rx: VecDeque::new(),
            tx: VecDeque::new(),
            pool: Vec::new(),
            spent: Vec::new(),
            offload: config.offload,
            mtu: config.mtu,
        }
    }

    fn buffer(&mut self) -> Vec<u8> {
        self.spent
            .pop()
            .or_else(|| self.pool.pop())
            .unwrap_or_else(|| Vec::with_capacity(VNET_HDR_LEN + MAX_PACKET))
    }

    fn recycle(&mut self, buf: Vec<u8>) {
        if self.pool.len() < POOL && buf.capacity() >= VNET_HDR_LEN + MAX_PACKET {
            self.pool.push(buf);
        }
    }
}

impl phy::Device for QueueDevice {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let (buf, offset, len) = self.rx.pop_front()?;
        Some((
            RxToken {
                buf,
                offset,
                len,
                spent: &mut self.spent,
            },
            TxToken {
                tx: &mut self.tx,
                pool: &mut self.pool,
                offload: self.offload,
                mtu: self.mtu,
            },
        ))
    }

    fn transmit(&mut self, _now: Instant) -> Option<Self::TxToken<'_>> {
        Some(TxToken {
            tx: &mut self.tx,
            pool: &mut self.pool,
            offload: self.offload,
            mtu: self.mtu,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = if self.offload { MAX_PACKET } else { self.mtu };
        let mut checksum = ChecksumCapabilities::default();
        // Packets come from the local kernel: nothing to verify. Outgoing TCP checksums are
        // left to the kernel (partial checksums) with offload.
        checksum.ipv4 = Checksum::Tx;
        checksum.udp = Checksum::Tx;
        checksum.tcp = if self.offload {
            Checksum::None
        } else {
            Checksum::Tx
        };
        checksum.icmpv4 = Checksum::Tx;
        checksum.icmpv6 = Checksum::Tx;
        caps.checksum = checksum;
        caps
    }
}

#[derive(Debug)]
struct RxToken<'a> {
    buf: Vec<u8>,
    offset: usize,
    len: usize,
    spent: &'a mut Vec<Vec<u8>>,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let r = f(&self.buf[self.offset..self.len]);
        if self.spent.len() < POOL && self.buf.capacity() >= VNET_HDR_LEN + MAX_PACKET {
            self.spent.push(self.buf);
        }
        r
    }
}

#[derive(Debug)]
struct TxToken<'a> {
    tx: &'a mut VecDeque<Vec<u8>>,
    pool: &'a mut Vec<Vec<u8>>,
    offload: bool,
    mtu: usize,
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = self
            .pool
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(VNET_HDR_LEN + MAX_PACKET));
        let start = if self.offload { VNET_HDR_LEN } else { 0 };
        // smoltcp writes every byte of the `len` it asked for: only grow with zeros, never
        // clear a reused buffer first.
        if buf.len() < start + len {
            buf.resize(start + len, 0);
        } else {
            buf.truncate(start + len);
        }
        let r = f(&mut buf[start..]);
        if self.offload {
            offload::prepare_tx(&mut buf, self.mtu);
        }
        self.tx.push_back(buf);
        r
    }
}

#[cfg(test)]
mod tests;
