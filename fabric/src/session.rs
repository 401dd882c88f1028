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
mod flight;
mod lane;
mod outbox;
mod pacer;
mod packet;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use thiserror::Error;
use tracing::{debug, trace};

pub use self::config::{Config, KcpMode};
pub use self::control::{CloseReason, Control};
use self::lane::Lanes;
pub use self::lane::MAX_RECORD;
use self::outbox::OutQueue;
use self::pacer::Pacer;
#[cfg(feature = "tox")]
pub(crate) use self::packet::conv_of;
use self::packet::{DATAGRAM_OVERHEAD, Packet};
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
    /// A lane number out of range.
    #[error("no lane {0}")]
    BadLane(u8),
    /// A lane's bytes broke the record framing; this one does end the session.
    #[error("lane record of impossible length")]
    BadRecord,
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
    /// Segments waiting in KCP (queued or in flight, unacknowledged), all lanes together.
    pub waiting_segments: usize,
    /// KCP lanes open (see [`Config::lanes`]).
    pub lanes: usize,
    /// The pacer's estimate of the path's delivery rate, bytes per second.
    pub delivery_rate: f64,
    /// The rate data packets currently leave at, bytes per second.
    pub pacing_rate: f64,
}

/// FNV-1a over a lane's packet: tells the copies of one acknowledgement packet apart from
/// another.
fn fingerprint(lane: u8, b: &[u8]) -> u64 {
    std::iter::once(&lane)
        .chain(b)
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, &x| {
            (h ^ u64::from(x)).wrapping_mul(0x0000_0100_0000_01b3)
        })
        | 1
}

/// One KCP session. See the module docs for the order of calls.
#[derive(Debug)]
pub struct Session {
    conv: ConvId,
    config: Config,
    lanes: Lanes,
    outbox: Arc<Mutex<OutQueue>>,
    /// KCP's millisecond clock counts from here.
    epoch: Instant,
    now: Instant,
    last_rx: Instant,
    last_tx: Instant,
    /// When something that asks for an answer first went out since the last valid packet
    /// arrived (see [`Config::answer_timeout`]).
    unanswered_since: Option<Instant>,
    /// When the peer last sent data (not only acknowledgements or pings).
    last_data_rx: Option<Instant>,
    last_ping: Option<Instant>,
    ping_token: u64,
    ping_outstanding: Option<(u64, Instant)>,
    /// A ping that became due and has not gone out yet.
    ping_pending: Option<u64>,
    pongs: VecDeque<u64>,
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

impl Session {
    /// A session on `conv`, starting at `now`.
    pub fn new(conv: ConvId, config: Config, now: Instant) -> Self {
        let outbox = Arc::new(Mutex::new(OutQueue::default()));
        let lanes = Lanes::new(conv.0, config.clone(), outbox.clone(), 0);
        let pacer = Pacer::new(now, lanes.mss());
        let mut session = Self {
            conv,
            config,
            lanes,
            outbox,
            epoch: now,
            now,
            last_rx: now,
            last_tx: now,
            unanswered_since: None,
            last_data_rx: None,
            last_ping: None,
            ping_token: 0,
            ping_outstanding: None,
            ping_pending: None,
            pongs: VecDeque::new(),
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
            waiting_segments: self.waiting_segments(),
            lanes: self.lanes.open_lanes(),
            delivery_rate: self.pacer.bandwidth(),
            pacing_rate: self.pacer.pacing_rate(),
            ..self.stats
        }
    }

    /// The smoothed round-trip time, as in [`Stats::srtt`] (without building all of them).
    pub fn srtt(&self) -> Option<Duration> {
        self.stats.srtt
    }

    /// Segments queued or in flight, as in [`Stats::waiting_segments`].
    pub fn waiting_segments(&self) -> usize {
        self.lanes.wait_snd()
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
                self.unanswered_since = None;
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
            Packet::Kcp { lane, segments } => {
                let now_ms = self.now_ms();
                let has_data =
                    packet::check_segments(segments, self.conv, now_ms, self.lanes.mss())?;
                if has_data {
                    self.last_data_rx = Some(self.now);
                }
                if !has_data {
                    let print = fingerprint(lane, segments);
                    if self.recent_acks.contains(&print) {
                        // The second copy of an acknowledgement packet: already applied.
                        return Ok(());
                    }
                    self.recent_acks.rotate_right(1);
                    self.recent_acks[0] = print;
                }
                self.ack_samples(lane, segments, now_ms);
                if let Err(error) = self.lanes.input(lane, segments, now_ms) {
                    if error == InputError::BadRecord {
                        debug!(conv = %self.conv, lane, "lane framing broken");
                        self.finish(CloseReason::ProtocolError, false);
                    }
                    return Err(error);
                }
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

    /// Delivery and RTT samples from the acknowledgements in a (checked) KCP packet of
    /// `lane`; the segments they acknowledge need no copy any more.
    fn ack_samples(&mut self, lane: u8, segments: &[u8], now_ms: u32) {
        let mut newest = None;
        let mut acked = 0;
        {
            let mut q = self.outbox.lock().unwrap_or_else(|e| e.into_inner());
            for (h, _) in packet::segments(segments) {
                q.flight.on_una(lane, h.una);
                if h.cmd == packet::CMD_ACK {
                    q.flight.on_ack(lane, h.sn);
                    newest = Some(now_ms.wrapping_sub(h.ts));
                    acked += 1;
                }
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
            self.lanes.set_min_rto(floor);
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
        if self
            .unanswered_since
            .is_some_and(|t| now.saturating_duration_since(t) >= self.config.answer_timeout)
        {
            debug!(conv = %self.conv, "no answer for the answer timeout: the peer is gone");
            self.finish(CloseReason::Timeout, false);
            return;
        }
        let cap = flight::resend_cap(self.stats.srtt);
        let now_ms = self.now_ms();
        self.outbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .flight
            .resend_overdue(now_ms, cap);
        if self.ping_due(now) {
            self.ping_token = self.ping_token.wrapping_add(1);
            self.ping_outstanding = Some((self.ping_token, now));
            self.ping_pending = Some(self.ping_token);
            self.last_ping = Some(now);
        }
    }

    /// How long a wait for an answer goes before the session probes, and then how often:
    /// a smoothed round trip, 100 to 500 ms. Ten probes or more in the answer timeout: a live
    /// peer is taken for dead only if every one of them, or its answer, is lost (at 20 % loss
    /// each way, one time in 28,000).
    fn probe_interval(&self) -> Duration {
        self.stats
            .srtt
            .unwrap_or(Duration::from_millis(500))
            .clamp(Duration::from_millis(100), Duration::from_millis(500))
    }

    /// When a peer that was sending data has been quiet long enough to ask whether it is
    /// still there (once per burst of its data): a receiver expects no answer of its own, and
    /// would otherwise learn of a dead sender only at the next keepalive.
    fn quiet_check_at(&self) -> Option<Instant> {
        let data = self.last_data_rx?;
        if self.last_ping.is_some_and(|p| p >= data) {
            return None;
        }
        let quiet = self
            .stats
            .srtt
            .map_or(Duration::from_secs(1), |s| s * 4)
            .max(Duration::from_secs(1));
        Some(self.last_rx + quiet)
    }

    fn ping_due(&self, now: Instant) -> bool {
        if self.quiet_check_at().is_some_and(|at| now >= at) {
            return true;
        }
        if let Some(since) = self.unanswered_since {
            // Waiting for an answer: probe, so that a live peer is heard from and a dead one
            // is known as such within the answer timeout.
            let probe = self.probe_interval();
            return now.saturating_duration_since(since) >= probe
                && self
                    .last_ping
                    .is_none_or(|t| now.saturating_duration_since(t) >= probe);
        }
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
        let mss = self.lanes.mss();
        let room = window.saturating_sub(self.lanes.wait_snd()) * mss;
        // New data waits for the paced queue to run low, so that it never sits behind a
        // long backlog: a few milliseconds' worth keeps the path busy between wake-ups.
        let backlog = self
            .outbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .queued_bytes();
        let target = (self.pacer.pacing_rate() * 0.004) as usize;
        let target = target.max(8 * mss);
        // Whole segments: what `send` is given is flushed as it is, so a capacity that ends
        // mid-segment would leave a part-filled segment behind every call (the window counts
        // segments, not bytes). Rounding up overshoots the backlog target by under a segment.
        // The record header (see `lane`) takes a few bytes of the last segment.
        let capacity = (room.min(target.saturating_sub(backlog)).div_ceil(mss) * mss)
            .saturating_sub(lane::RECORD_OVERHEAD);
        if capacity == 0 {
            self.pacer.on_limited();
        }
        capacity
    }

    /// The pacer's current estimates: bottleneck rate (bytes/s) and pacing rate (bytes/s).
    pub fn path_estimate(&self) -> (f64, f64) {
        (self.pacer.bandwidth(), self.pacer.pacing_rate())
    }

    /// Queues reliable bytes, all of one flow: the peer receives them in order. Takes all of
    /// `data`; callers pace themselves with [`Session::send_capacity`].
    pub fn send(&mut self, data: &[u8]) -> Result<(), InputError> {
        self.send_flow(0, data)
    }

    /// Queues reliable bytes of `flow`, a caller's name for bytes that must stay in order
    /// (the mux uses its stream ids). Different flows may travel on different lanes, so that
    /// one's losses do not delay the other.
    ///
    /// The peer's [`Session::recv`] returns the bytes of each call contiguous (cut only every
    /// [`MAX_RECORD`] bytes), the calls of one flow in order, and calls of different flows
    /// interleaved only at call boundaries: a caller that sends whole frames per call reads
    /// whole frames.
    pub fn send_flow(&mut self, flow: u32, data: &[u8]) -> Result<(), InputError> {
        if self.closed.is_some() {
            return Err(InputError::Closed);
        }
        let now_ms = self.now_ms();
        self.lanes.send(flow, data, now_ms)
    }

    /// Appends the reliable bytes that have arrived, in order, to `out`. Returns how many.
    pub fn recv(&mut self, out: &mut Vec<u8>) -> usize {
        self.lanes.recv(out)
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
        let now_ms = self.now_ms();
        // Keepalive packets are tiny and time-critical: they skip the pacer.
        if let Some(token) = self.pongs.pop_front() {
            Packet::Pong(token).emit(self.conv, buf);
        } else if let Some(token) = self.ping_pending.take() {
            Packet::Ping(token).emit(self.conv, buf);
            self.unanswered_since.get_or_insert(now);
        } else {
            let lanes = &self.lanes;
            let mut q = self.outbox.lock().unwrap_or_else(|e| e.into_inner());
            // Acknowledgements and the copies of a thin flow's packet skip the pacer (see
            // `OutQueue::next_ack` and `OutQueue::next_copy`).
            if q.next_ack(buf) || q.next_copy(buf) {
                // Sent as it is.
            } else if self.datagrams_out.is_empty() && !q.has_data() {
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
                } else if q.next_resend(now_ms, buf)
                    || q.next_data(|lane| lanes.lane_wait_snd(lane), buf)
                {
                    self.unanswered_since.get_or_insert(now);
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
        // At least a millisecond ahead: KCP's clock has no finer grain. An idle session has
        // no KCP deadline at all: KCP's `check` never says more than its interval (10 ms),
        // which woke every idle session a hundred times a second (B13).
        let kcp_at = (!self.lanes.is_idle()).then(|| {
            let kcp_wait = self.lanes.check(now_ms).max(1);
            self.now + Duration::from_millis(u64::from(kcp_wait))
        });
        let idle_at = self.last_rx + self.config.idle_timeout;
        let keepalive = self.config.keepalive;
        let ping_at = match self.unanswered_since {
            Some(since) => {
                let probe = self.probe_interval();
                (since + probe).max(self.last_ping.map_or(self.epoch, |t| t + probe))
            }
            None => (self.last_tx.min(self.last_rx) + keepalive)
                .max(self.last_ping.map_or(self.epoch, |t| t + keepalive / 2)),
        };
        let mut at = idle_at.min(ping_at);
        if let Some(kcp_at) = kcp_at {
            at = at.min(kcp_at);
        }
        if let Some(quiet) = self.quiet_check_at() {
            at = at.min(quiet);
        }
        if let Some(since) = self.unanswered_since {
            at = at.min(since + self.config.answer_timeout);
        }
        let resend_check = self
            .outbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .flight
            .oldest_sent();
        if let Some(ms) = resend_check {
            let cap = flight::resend_cap(self.stats.srtt);
            let due = self.epoch + Duration::from_millis(u64::from(ms)) + cap;
            at = at.min(due.max(self.now));
        }
        if self.pacing_blocked {
            at = at.min(self.pacer.next_send_at());
        }
        Some(at)
    }

    /// The session now travels on another path (a punched link died or came up, a lossy link
    /// gave way): what was in flight on the old one is presumed lost.
    ///
    /// Every unacknowledged data segment is sent again at once, ahead of new data, instead of
    /// at KCP's backed-off timers, and the pacer and the RTO floor start over for the new path,
    /// as RFC 9000 §9.4 has QUIC do. Acknowledgements still in flight on the old path cost a
    /// duplicate or two, no more.
    pub fn on_path_change(&mut self, now: Instant) {
        if self.closed.is_some() {
            return;
        }
        self.tick(now);
        let now_ms = self.now_ms();
        let waiting = {
            let mut q = self.outbox.lock().unwrap_or_else(|e| e.into_inner());
            q.flight.resend_all(now_ms);
            q.flight.bytes()
        };
        debug!(conv = %self.conv, waiting, "path changed: in-flight data sent again");
        self.pacer = Pacer::new(now, self.lanes.mss());
        self.pacing_blocked = false;
        self.stats.min_rtt = None;
        self.stats.srtt = None;
        if self.config.min_rto.is_none() {
            let (nodelay, ..) = self.config.mode.params();
            self.lanes.set_min_rto(if nodelay { 30 } else { 100 });
        }
        // The peer may be gone with the old path: ask at once rather than at the keepalive.
        self.ping_token = self.ping_token.wrapping_add(1);
        self.ping_outstanding = Some((self.ping_token, now));
        self.ping_pending = Some(self.ping_token);
        self.last_ping = Some(now);
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
        self.lanes.clear();
        self.outbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Lets KCP send what `send`, `recv` or input asked for.
    fn flush_pending(&mut self) {
        self.lanes.flush_pending();
    }

    /// Moves KCP's clock to `now` and lets it do what is due.
    fn tick(&mut self, now: Instant) {
        self.now = self.now.max(now);
        let now_ms = self.now_ms();
        self.lanes.update(now_ms);
    }

    /// KCP's clock: milliseconds since the session began, wrapping as KCP expects.
    fn now_ms(&self) -> u32 {
        self.now.saturating_duration_since(self.epoch).as_millis() as u32
    }
}
