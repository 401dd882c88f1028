//! One KCP conversation between two peers, with an unreliable datagram channel beside it.
//!
//! The session turns a reliable byte stream (the mux's frames) into opaque packets for
//! whatever path reaches the peer, and back. It does not care which path a packet came by:
//! packets from a new path are as good as packets from the old one, so a path change never
//! breaks the streams above.
//!
//! Sans-IO. A driver calls, in this order, whenever something happens:
//!
//! 1. [`Session::handle_input`] for each packet from any path, [`Session::handle_timeout`]
//!    when the deadline from [`Session::poll_timeout`] has passed;
//! 2. [`Session::recv`] and [`Session::recv_datagram`] to take what arrived;
//! 3. [`Session::send`] (at most [`Session::send_capacity`] bytes, so that the reliable
//!    queue never grows a backlog that would delay a later urgent byte) and
//!    [`Session::send_datagram`];
//! 4. [`Session::poll_transmit`] until it returns `None`, sending each packet on the path;
//! 5. [`Session::poll_event`] until `None`;
//! 6. sleep until [`Session::poll_timeout`] or the next input.
//!
//! The conv is assigned by the exit through [`control`] messages before the session starts.

mod config;
pub mod control;
mod pacer;
mod packet;

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex};

use thiserror::Error;
use tracing::{debug, trace};

pub use self::config::{Config, KcpMode};
pub use self::control::{CloseReason, Control};
use self::pacer::Pacer;
#[cfg(feature = "tox")]
pub(crate) use self::packet::conv_of;
use self::packet::{DATAGRAM_OVERHEAD, KCP_HEADER, Packet};
use crate::time::{Duration, Instant};

/// A KCP conversation id, assigned by the exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConvId(pub u32);

impl std::fmt::Display for ConvId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:08x}", self.0)
    }
}

/// Why a packet was refused. None of these harm the session: the packet is dropped whole.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum InputError {
    /// Shorter than its headers say.
    #[error("packet truncated")]
    Truncated,
    /// Addressed to another conversation.
    #[error("packet for conv {0}, not this session")]
    WrongConv(ConvId),
    /// The first byte names no packet kind.
    #[error("unknown packet kind {0:#04x}")]
    UnknownKind(u8),
    /// A KCP segment with a command KCP does not have.
    #[error("unknown KCP command {0}")]
    UnknownKcpCommand(u8),
    /// A KCP acknowledgement echoing a time we never sent.
    #[error("KCP acknowledgement with an impossible timestamp")]
    BadTimestamp,
    /// A KCP segment longer than the segment size, or a non-data segment with a payload.
    #[error("KCP segment of impossible length {0}")]
    BadLength(usize),
    /// The session has ended.
    #[error("session closed")]
    Closed,
    /// KCP refused the segments.
    #[error("KCP refused the packet: {0}")]
    Kcp(String),
}

/// Something the driver must act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// The session ended, here or at the peer. Nothing more will be sent or received.
    Closed {
        /// Why.
        reason: CloseReason,
        /// Whether the peer ended it (otherwise this end did, and should tell the peer).
        by_peer: bool,
    },
}

/// Counters and estimates of a session.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Stats {
    /// Smoothed round-trip time from KCP acknowledgements and pings.
    pub srtt: Option<Duration>,
    /// Smallest round-trip time seen.
    pub min_rtt: Option<Duration>,
    /// Packets handed to the path.
    pub packets_sent: u64,
    /// Valid packets received.
    pub packets_received: u64,
    /// Bytes handed to the path.
    pub bytes_sent: u64,
    /// Bytes of valid packets received.
    pub bytes_received: u64,
    /// Data segments sent again.
    pub retransmits: u64,
    /// Data segments sent the first time.
    pub segments_sent: u64,
    /// Packets refused as invalid.
    pub invalid_packets: u64,
    /// Datagrams dropped because a queue was full or they were too large.
    pub datagrams_dropped: u64,
    /// Acknowledgements of data segments received.
    pub acks_received: u64,
    /// Segments waiting in KCP (queued or in flight, unacknowledged).
    pub waiting_segments: usize,
    /// The pacer's estimate of the path's delivery rate, bytes per second.
    pub delivery_rate: f64,
    /// The rate data packets currently leave at, bytes per second.
    pub pacing_rate: f64,
}

/// How many times a thin flow's data packet is sent.
const THIN_COPIES: u8 = 3;

/// Segments in flight at or under which a direction counts as a thin flow.
const THIN_SEGMENTS: usize = 4;

/// FNV-1a over a packet: tells the copies of one acknowledgement packet apart from another.
fn fingerprint(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &x| {
        (h ^ u64::from(x)).wrapping_mul(0x0000_0100_0000_01b3)
    }) | 1
}

/// One KCP session. See the module docs for the order of calls.
#[derive(Debug)]
pub struct Session {
    conv: ConvId,
    config: Config,
    kcp: kcp::Kcp<Outbox>,
    outbox: Arc<Mutex<OutQueue>>,
    /// KCP's millisecond clock counts from here.
    epoch: Instant,
    now: Instant,
    last_rx: Instant,
    last_tx: Instant,
    last_ping: Option<Instant>,
    ping_token: u64,
    ping_outstanding: Option<(u64, Instant)>,
    /// A ping that became due and has not gone out yet.
    ping_pending: Option<u64>,
    pongs: VecDeque<u64>,
    needs_flush: bool,
    pacer: Pacer,
    /// The pacer held a packet back at the last `poll_transmit`: wake when it may leave.
    pacing_blocked: bool,
    /// Fingerprints of the last acknowledgement-only packets received, to drop the second
    /// copy the peer sends of each (see `poll_transmit`).
    recent_acks: [u64; 4],
    datagrams_out: VecDeque<Vec<u8>>,
    datagrams_in: VecDeque<Vec<u8>>,
    events: VecDeque<Event>,
    closed: Option<CloseReason>,
    stats: Stats,
}

/// KCP writes its packets here; the session hands them out through `poll_transmit`.
///
/// The `kcp` crate owns its output writer and offers no way to reach it again, so the queue is
/// shared with the session. The lock is never contended: both sides are the same `Session`.
#[derive(Debug, Default)]
struct OutQueue {
    packets: VecDeque<Vec<u8>>,
    /// Packets without data segments (acknowledgements, window probes): they skip the pacer,
    /// because delaying acknowledgements bunches them up, which inflates the sender's rate
    /// estimate and RTT.
    acks: VecDeque<Vec<u8>>,
    /// Bytes in `packets`.
    queued_bytes: usize,
    /// The front of `acks` has gone out once and is due again.
    ack_copy_due: bool,
    /// How many copies of the thin flow's packet at the front of `packets` have gone out
    /// (0: the front packet is not a thin flow's).
    thin_copies_sent: u8,
    /// Spent packet buffers, reused so the steady state allocates nothing.
    free: Vec<Vec<u8>>,
    /// Highest data sequence number sent so far, to tell retransmissions apart.
    highest_sn: Option<u32>,
    retransmits: u64,
    segments_sent: u64,
}

#[derive(Debug)]
struct Outbox(Arc<Mutex<OutQueue>>);

impl io::Write for Outbox {
    fn write(&mut self, segments: &[u8]) -> io::Result<usize> {
        let mut q = self.0.lock().unwrap_or_else(|e| e.into_inner());
        q.count_segments(segments);
        // KCP packs its acknowledgements into the same packet as data. Data is paced, at the
        // rate of *this* direction, which may be slow; acknowledgements held back with it
        // would bunch up and inflate the peer's RTT. So the two part ways here: segments are
        // independent in KCP's input, in any grouping.
        let mut acks = q.free.pop().unwrap_or_default();
        let mut data = q.free.pop().unwrap_or_default();
        acks.clear();
        data.clear();
        acks.push(packet::Kind::Kcp as u8);
        data.push(packet::Kind::Kcp as u8);
        for (h, segment) in packet::segments(segments) {
            let out = if h.cmd == packet::CMD_ACK {
                &mut acks
            } else {
                &mut data
            };
            out.extend_from_slice(segment);
        }
        if acks.len() > 1 {
            q.acks.push_back(acks);
        } else {
            q.recycle(acks);
        }
        if data.len() > 1 {
            q.queued_bytes += data.len();
            q.packets.push_back(data);
        } else {
            q.recycle(data);
        }
        Ok(segments.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl OutQueue {
    /// Counts first transmissions and retransmissions of data segments in a packet KCP wrote.
    fn count_segments(&mut self, segments: &[u8]) {
        for (h, _) in packet::segments(segments) {
            if h.cmd != packet::CMD_PUSH {
                continue;
            }
            match self.highest_sn {
                Some(high) if (h.sn.wrapping_sub(high) as i32) <= 0 => self.retransmits += 1,
                _ => {
                    self.highest_sn = Some(h.sn);
                    self.segments_sent += 1;
                }
            }
        }
    }

    fn recycle(&mut self, spent: Vec<u8>) {
        if self.free.len() < 64 {
            self.free.push(spent);
        }
    }
}

impl Session {
    /// A session on `conv`, starting at `now`.
    pub fn new(conv: ConvId, config: Config, now: Instant) -> Self {
        let outbox = Arc::new(Mutex::new(OutQueue::default()));
        let mut kcp = kcp::Kcp::new_stream(conv.0, Outbox(outbox.clone()));
        let (nodelay, interval, resend, no_cwnd) = config.mode.params();
        // The kind byte of a session packet comes out of the path's MTU.
        let kcp_mtu = config.mtu.saturating_sub(1).max(KCP_HEADER + 64);
        if kcp.set_mtu(kcp_mtu).is_err() {
            debug!(conv = %conv, kcp_mtu, "KCP refused the MTU, keeping its default");
        }
        kcp.set_nodelay(nodelay, interval as i32, resend as i32, no_cwnd);
        kcp.set_wndsize(config.send_window.max(32), config.recv_window.max(128));
        if let Some(rto) = config.min_rto {
            kcp.set_rx_minrto(rto.as_millis().clamp(1, 60_000) as u32);
        }
        // Dead peers are found by the idle timeout, in time rather than in retransmissions.
        kcp.set_maximum_resend_times(u32::MAX);
        let pacer = Pacer::new(now, kcp.mss());
        let mut session = Self {
            conv,
            config,
            kcp,
            outbox,
            epoch: now,
            now,
            last_rx: now,
            last_tx: now,
            last_ping: None,
            ping_token: 0,
            ping_outstanding: None,
            ping_pending: None,
            pongs: VecDeque::new(),
            needs_flush: false,
            pacer,
            pacing_blocked: false,
            recent_acks: [0; 4],
            datagrams_out: VecDeque::new(),
            datagrams_in: VecDeque::new(),
            events: VecDeque::new(),
            closed: None,
            stats: Stats::default(),
        };
        session.tick(now);
        session
    }

    /// The conversation id.
    pub fn conv(&self) -> ConvId {
        self.conv
    }

    /// The settings in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        self.closed.is_some()
    }

    /// Counters and estimates.
    pub fn stats(&self) -> Stats {
        let q = self.outbox.lock().unwrap_or_else(|e| e.into_inner());
        Stats {
            retransmits: q.retransmits,
            segments_sent: q.segments_sent,
            waiting_segments: self.kcp.wait_snd(),
            delivery_rate: self.pacer.bandwidth(),
            pacing_rate: self.pacer.pacing_rate(),
            ..self.stats
        }
    }

    /// Largest payload [`Session::send_datagram`] takes.
    pub fn max_datagram(&self) -> usize {
        self.config.max_datagram()
    }

    /// Feeds one packet from any path.
    ///
    /// An error means the packet was dropped whole; the session is unharmed.
    pub fn handle_input(&mut self, now: Instant, data: &[u8]) -> Result<(), InputError> {
        if self.closed.is_some() {
            return Err(InputError::Closed);
        }
        self.tick(now);
        let result = self.input(data);
        match &result {
            Ok(()) => {
                self.last_rx = now;
                self.stats.packets_received += 1;
                self.stats.bytes_received += data.len() as u64;
            }
            Err(error) => {
                self.stats.invalid_packets += 1;
                trace!(conv = %self.conv, %error, "packet refused");
            }
        }
        result
    }

    fn input(&mut self, data: &[u8]) -> Result<(), InputError> {
        match Packet::parse(data, self.conv)? {
            Packet::Kcp(segments) => {
                let now_ms = self.now_ms();
                let has_data = packet::check_segments(segments, self.conv, now_ms, self.kcp.mss())?;
                if !has_data {
                    let print = fingerprint(segments);
                    if self.recent_acks.contains(&print) {
                        // The second copy of an acknowledgement packet: already applied.
                        return Ok(());
                    }
                    self.recent_acks.rotate_right(1);
                    self.recent_acks[0] = print;
                }
                self.ack_samples(segments, now_ms);
                self.kcp
                    .input(segments)
                    .map_err(|e| InputError::Kcp(e.to_string()))?;
                self.needs_flush = true;
            }
            Packet::Datagram(payload) => {
                if self.datagrams_in.len() >= self.config.datagram_recv_queue {
                    self.stats.datagrams_dropped += 1;
                } else {
                    self.datagrams_in.push_back(payload.to_vec());
                }
            }
            Packet::Ping(token) => {
                // One pong per ping is enough; a flood of pings must not grow the queue.
                if self.pongs.len() < 8 {
                    self.pongs.push_back(token);
                }
            }
            Packet::Pong(token) => {
                if let Some((want, sent)) = self.ping_outstanding
                    && want == token
                {
                    self.ping_outstanding = None;
                    self.rtt_sample(self.now.saturating_duration_since(sent));
                }
            }
        }
        Ok(())
    }

    /// Delivery and RTT samples from the acknowledgements in a (checked) KCP packet.
    fn ack_samples(&mut self, segments: &[u8], now_ms: u32) {
        let mut newest = None;
        let mut acked = 0;
        for (h, _) in packet::segments(segments) {
            if h.cmd == packet::CMD_ACK {
                newest = Some(now_ms.wrapping_sub(h.ts));
                acked += 1;
            }
        }
        if let Some(ms) = newest {
            self.rtt_sample(Duration::from_millis(u64::from(ms)));
        }
        if acked > 0 {
            self.stats.acks_received += acked as u64;
            let (sent, resent) = {
                let q = self.outbox.lock().unwrap_or_else(|e| e.into_inner());
                (q.segments_sent, q.retransmits)
            };
            self.pacer.on_acked(self.now, acked, sent, resent);
        }
    }

    fn rtt_sample(&mut self, rtt: Duration) {
        self.pacer.on_rtt(self.now, rtt);
        let min_rtt = self.stats.min_rtt.map_or(rtt, |m| m.min(rtt));
        if self.stats.min_rtt != Some(min_rtt) && self.config.min_rto.is_none() {
            // KCP's RTO is `srtt + 4 rttvar` above a floor of 30 ms (nodelay). Under load the
            // RTT doubles as the bottleneck queue fills, faster than KCP's integer RTTVAR
            // follows, and the 30 ms floor then fires on segments that were not lost: at
            // 40 ms and 5 % loss, a third of all retransmissions. A floor of 2.5 × the
            // path's own minimum RTT covers that swing and still recovers within a few RTTs.
            let (nodelay, ..) = self.config.mode.params();
            let mode_floor = if nodelay { 30 } else { 100 };
            let floor = (min_rtt.as_millis() as u32 * 5 / 2).clamp(mode_floor, 60_000);
            self.kcp.set_rx_minrto(floor);
        }
        self.stats.min_rtt = Some(min_rtt);
        self.stats.srtt = Some(match self.stats.srtt {
            Some(s) => (s * 7 + rtt) / 8,
            None => rtt,
        });
    }

    /// Advances time to `now`: retransmissions, keepalive, idle timeout.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.closed.is_some() {
            return;
        }
        self.tick(now);
        if now.saturating_duration_since(self.last_rx) >= self.config.idle_timeout {
            debug!(conv = %self.conv, "peer silent for the idle timeout");
            self.finish(CloseReason::Timeout, false);
            return;
        }
        if self.ping_due(now) {
            self.ping_token = self.ping_token.wrapping_add(1);
            self.ping_outstanding = Some((self.ping_token, now));
            self.ping_pending = Some(self.ping_token);
            self.last_ping = Some(now);
        }
    }

    fn ping_due(&self, now: Instant) -> bool {
        let keepalive = self.config.keepalive;
        let recent_ping = self
            .last_ping
            .is_some_and(|t| now.saturating_duration_since(t) < keepalive / 2);
        if recent_ping {
            return false;
        }
        now.saturating_duration_since(self.last_tx) >= keepalive
            || now.saturating_duration_since(self.last_rx) >= keepalive
    }

    /// Bytes [`Session::send`] should be given at `now`: what the pacer admits and what fits
    /// in the window. Giving more only queues it inside KCP, behind everything else, where it
    /// waits and delays whatever urgent byte comes after it.
    pub fn send_capacity(&mut self, now: Instant) -> usize {
        if self.closed.is_some() {
            return 0;
        }
        self.tick(now);
        // Bytes given to `send` wait in KCP's queue until a flush moves them to the paced
        // outbox; flush first so that the backlog below counts them.
        self.flush_pending();
        let window = usize::from(self.config.send_window).min(self.pacer.cwnd_segments());
        let room = window.saturating_sub(self.kcp.wait_snd()) * self.kcp.mss();
        // New data waits for the paced queue to run low, so that it never sits behind a
        // long backlog: a few milliseconds' worth keeps the path busy between wake-ups.
        let backlog = self
            .outbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .queued_bytes;
        let target = (self.pacer.pacing_rate() * 0.004) as usize;
        let target = target.max(8 * self.kcp.mss());
        // Whole segments: what `send` is given is flushed as it is, so a capacity that ends
        // mid-segment would leave a part-filled segment behind every call (the window counts
        // segments, not bytes). Rounding up overshoots the backlog target by under a segment.
        let mss = self.kcp.mss();
        let capacity = room.min(target.saturating_sub(backlog)).div_ceil(mss) * mss;
        if capacity == 0 {
            self.pacer.on_limited();
        }
        capacity
    }

    /// The pacer's current estimates: bottleneck rate (bytes/s) and pacing rate (bytes/s).
    pub fn path_estimate(&self) -> (f64, f64) {
        (self.pacer.bandwidth(), self.pacer.pacing_rate())
    }

    /// Queues reliable bytes. Takes all of `data`; callers pace themselves with
    /// [`Session::send_capacity`].
    pub fn send(&mut self, mut data: &[u8]) -> Result<(), InputError> {
        if self.closed.is_some() {
            return Err(InputError::Closed);
        }
        // KCP refuses a single call of 128 segments or more.
        let chunk = self.kcp.mss() * 64;
        while !data.is_empty() {
            let n = data.len().min(chunk);
            self.kcp
                .send(&data[..n])
                .map_err(|e| InputError::Kcp(e.to_string()))?;
            data = &data[n..];
        }
        self.needs_flush = true;
        Ok(())
    }

    /// Appends the reliable bytes that have arrived, in order, to `out`. Returns how many.
    pub fn recv(&mut self, out: &mut Vec<u8>) -> usize {
        let start = out.len();
        let mss = self.kcp.mss();
        loop {
            let len = out.len();
            out.resize(len + mss, 0);
            match self.kcp.recv(&mut out[len..]) {
                Ok(n) => out.truncate(len + n),
                Err(_) => {
                    out.truncate(len);
                    break;
                }
            }
        }
        let n = out.len() - start;
        if n > 0 {
            // Reading may reopen a window KCP had advertised as full: tell the peer.
            self.needs_flush = true;
        }
        n
    }

    /// Queues an unreliable datagram. It may be lost, duplicated or reordered; it is dropped
    /// (and counted) when too large or when the queue is full.
    pub fn send_datagram(&mut self, payload: &[u8]) -> bool {
        if self.closed.is_some()
            || payload.len() > self.max_datagram()
            || self.datagrams_out.len() >= self.config.datagram_queue
        {
            self.stats.datagrams_dropped += 1;
            return false;
        }
        let mut buf = Vec::with_capacity(payload.len() + DATAGRAM_OVERHEAD);
        Packet::Datagram(payload).emit(self.conv, &mut buf);
        self.datagrams_out.push_back(buf);
        true
    }

    /// A datagram that has arrived.
    pub fn recv_datagram(&mut self) -> Option<Vec<u8>> {
        self.datagrams_in.pop_front()
    }

    /// Puts the next packet for the path into `buf` (replacing its contents) and returns its
    /// length, or `None` when there is nothing to send.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<usize> {
        if self.closed.is_some() {
            return None;
        }
        self.tick(now);
        self.flush_pending();
        buf.clear();
        self.pacing_blocked = false;
        // Keepalive packets are tiny and time-critical: they skip the pacer.
        if let Some(token) = self.pongs.pop_front() {
            Packet::Pong(token).emit(self.conv, buf);
        } else if let Some(token) = self.ping_pending.take() {
            Packet::Ping(token).emit(self.conv, buf);
        } else {
            let in_flight = self.kcp.wait_snd();
            let mut q = self.outbox.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(p) = q.acks.pop_front() {
                // Every acknowledgement-only packet goes out twice. KCP acknowledges each
                // segment on its own, with no ranges: one lost acknowledgement while any
                // earlier segment is missing makes the sender retransmit a segment that had
                // arrived. On a lossy path that was a third of all retransmissions; the
                // second copy costs about 2 % more bytes on the return path.
                if q.ack_copy_due {
                    q.ack_copy_due = false;
                    let spent = std::mem::replace(buf, p);
                    q.recycle(spent);
                } else {
                    q.ack_copy_due = true;
                    buf.extend_from_slice(&p);
                    q.acks.push_front(p);
                }
            } else if self.datagrams_out.is_empty() && q.packets.is_empty() {
                return None;
            } else {
                if !self.pacer.may_send(now) {
                    self.pacing_blocked = true;
                    self.pacer.on_limited();
                    return None;
                }
                // Datagrams first: they carry latency-sensitive flows (DNS, games, QUIC) and
                // their queue is short.
                if let Some(d) = self.datagrams_out.pop_front() {
                    *buf = d;
                } else if let Some(p) = q.packets.pop_front() {
                    q.queued_bytes -= p.len();
                    // A thin flow (a request, a response, a keystroke) has no later segments
                    // whose acknowledgements would trigger a fast retransmission: a lost
                    // segment waits for the RTO, several round trips. While this direction
                    // carries only a few segments, each data packet goes out three times
                    // instead; KCP drops the copies that arrive later. (Two copies still
                    // left one exchange in 200 waiting for the RTO at 5 % loss.)
                    let starts_thin = q.thin_copies_sent == 0
                        && q.packets.is_empty()
                        && in_flight <= THIN_SEGMENTS;
                    if starts_thin || (1..THIN_COPIES - 1).contains(&q.thin_copies_sent) {
                        q.thin_copies_sent += 1;
                        buf.clear();
                        buf.extend_from_slice(&p);
                        q.queued_bytes += p.len();
                        q.packets.push_front(p);
                    } else {
                        q.thin_copies_sent = 0;
                        let spent = std::mem::replace(buf, p);
                        q.recycle(spent);
                    }
                }
                self.pacer.on_sent(buf.len());
            }
        }
        self.last_tx = now;
        self.stats.packets_sent += 1;
        self.stats.bytes_sent += buf.len() as u64;
        Some(buf.len())
    }

    /// When [`Session::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.closed.is_some() {
            return None;
        }
        let now_ms = self.now_ms();
        // At least a millisecond ahead: KCP's clock has no finer grain.
        let kcp_wait = self.kcp.check(now_ms).max(1);
        let kcp_at = self.now + Duration::from_millis(u64::from(kcp_wait));
        let idle_at = self.last_rx + self.config.idle_timeout;
        let keepalive = self.config.keepalive;
        let ping_at = (self.last_tx.min(self.last_rx) + keepalive)
            .max(self.last_ping.map_or(self.epoch, |t| t + keepalive / 2));
        let mut at = kcp_at.min(idle_at).min(ping_at);
        if self.pacing_blocked {
            at = at.min(self.pacer.next_send_at());
        }
        Some(at)
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Ends the session from this end. Queued data is abandoned; the driver tells the peer
    /// with a [`Control::Close`] when it sees the [`Event::Closed`].
    pub fn close(&mut self, reason: CloseReason) {
        self.finish(reason, false);
    }

    /// The peer ended the session (its [`Control::Close`] arrived).
    pub fn handle_peer_close(&mut self, reason: CloseReason) {
        self.finish(reason, true);
    }

    fn finish(&mut self, reason: CloseReason, by_peer: bool) {
        if self.closed.is_some() {
            return;
        }
        debug!(conv = %self.conv, %reason, by_peer, "session closed");
        self.closed = Some(reason);
        self.events.push_back(Event::Closed { reason, by_peer });
        self.datagrams_out.clear();
        let mut q = self.outbox.lock().unwrap_or_else(|e| e.into_inner());
        q.packets.clear();
        q.acks.clear();
        q.queued_bytes = 0;
    }

    /// Lets KCP send what `send`, `recv` or input asked for.
    fn flush_pending(&mut self) {
        if self.needs_flush {
            self.needs_flush = false;
            if let Err(error) = self.kcp.flush() {
                debug!(conv = %self.conv, %error, "KCP flush failed");
            }
        }
    }

    /// Moves KCP's clock to `now` and lets it do what is due.
    fn tick(&mut self, now: Instant) {
        self.now = self.now.max(now);
        let now_ms = self.now_ms();
        if let Err(error) = self.kcp.update(now_ms) {
            debug!(conv = %self.conv, %error, "KCP update failed");
        }
        // `check` (this crate returns a delay, not ikcp's absolute time) says "now" as soon as
        // a retransmission is due, but `update` only flushes on its interval ticks: a driver
        // trusting `check` would spin until the tick. Flushing here sends the retransmission
        // on time and moves `check` forward.
        if self.kcp.check(now_ms) == 0
            && let Err(error) = self.kcp.flush()
        {
            debug!(conv = %self.conv, %error, "KCP flush failed");
        }
    }

    /// KCP's clock: milliseconds since the session began, wrapping as KCP expects.
    fn now_ms(&self) -> u32 {
        self.now.saturating_duration_since(self.epoch).as_millis() as u32
    }
}
