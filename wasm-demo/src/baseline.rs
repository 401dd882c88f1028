//! The comparison lane: a TCP-like transfer, one flow per stream, as a browser without the
//! fabric would open one TCP connection per download.
//!
//! Each flow is TCP NewReno without selective acknowledgements (RFC 5681 and 6582, RTO per
//! RFC 6298), in whole segments rather than bytes:
//!
//! - cumulative acknowledgements, one per data packet received (no delayed ACKs);
//! - slow start from 10 segments, congestion avoidance, fast retransmit on three duplicate
//!   acknowledgements, NewReno fast recovery (a partial acknowledgement resends the next hole);
//! - a retransmission timeout of `srtt + 4·rttvar` (at least 200 ms, Karn's rule: no samples
//!   from retransmitted segments), doubled on each expiry, which collapses the window to one
//!   segment and goes back to the first unacknowledged one;
//! - the receiver keeps out-of-order segments within its window, as TCP receivers do.
//!
//! It is sans-IO like the fabric's cores and implements the same
//! [`Endpoint`](fabric::connection::Endpoint) trait, so one [`fabric::testing::Pair`] drives
//! either over the same seeded [`fabric::testing::SimNet`].
//!
//! ```text
//!  DATA  kind=1 | flow u16 | seq u32 | flags u8 (1 = FIN) | payload
//!  ACK   kind=2 | flow u16 | next expected seq u32 | 0
//! ```

use std::collections::{BTreeMap, VecDeque};

use fabric::connection::Endpoint;
use fabric::session::InputError;
use fabric::time::{Duration, Instant};

const KIND_DATA: u8 = 1;
const KIND_ACK: u8 = 2;
const FLAG_FIN: u8 = 1;
/// Bytes before the payload of every packet.
pub const HEADER: usize = 8;

/// Settings of a [`Baseline`] endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Largest packet, header included (the fabric session's MTU, for a fair comparison).
    pub mtu: usize,
    /// Segments the receiver accepts ahead of the next in-order one (its advertised window).
    pub recv_window: u32,
    /// Bytes a flow accepts from the application ahead of acknowledgements.
    pub send_buffer: usize,
    /// Congestion window at the start, in segments (RFC 6928).
    pub initial_window: f64,
    /// Smallest retransmission timeout.
    pub min_rto: Duration,
    /// Largest retransmission timeout.
    pub max_rto: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            mtu: fabric::session::Config::default().mtu,
            recv_window: 2048,
            send_buffer: 4 << 20,
            initial_window: 10.0,
            min_rto: Duration::from_millis(200),
            max_rto: Duration::from_secs(60),
        }
    }
}

/// Counters and estimates over all flows of an endpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Stats {
    /// Mean smoothed round-trip time of the flows that have one.
    pub srtt: Option<Duration>,
    /// Packets handed to the path (data and acknowledgements).
    pub packets_sent: u64,
    /// Data segments sent the first time.
    pub segments_sent: u64,
    /// Data segments sent again (fast retransmits, NewReno holes and go-back-N after a
    /// timeout).
    pub retransmits: u64,
    /// Retransmission timeouts.
    pub timeouts: u64,
    /// Packets refused as malformed.
    pub invalid_packets: u64,
}

/// What [`Baseline::read`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Read {
    /// This many bytes were copied out.
    Data(usize),
    /// The sender finished and every byte was read.
    End,
    /// Nothing buffered yet.
    Blocked,
}

#[derive(Debug)]
struct Segment {
    data: Vec<u8>,
    fin: bool,
    /// When it was last sent; `None` before the first time.
    sent_at: Option<Instant>,
    /// Sent more than once: no RTT sample from it (Karn).
    resent: bool,
}

/// The sending half of one flow.
#[derive(Debug)]
struct Sender {
    /// Segments from `una` on: unacknowledged, then not yet sent.
    segments: VecDeque<Segment>,
    /// Oldest unacknowledged sequence number.
    una: u32,
    /// Next sequence number to send (reset to `una` after a timeout).
    next: u32,
    /// One past the highest sequence number ever sent.
    high: u32,
    /// Payload bytes held in `segments`.
    buffered: usize,
    fin_queued: bool,
    cwnd: f64,
    ssthresh: f64,
    dupacks: u32,
    /// In fast recovery until this sequence number is acknowledged.
    recover: Option<u32>,
    /// The first unacknowledged segment must go out again (fast retransmit or a hole).
    resend_una: bool,
    srtt: Option<Duration>,
    rttvar: Duration,
    rto: Duration,
    rto_at: Option<Instant>,
}

impl Sender {
    fn new(config: &Config) -> Self {
        Self {
            segments: VecDeque::new(),
            una: 0,
            next: 0,
            high: 0,
            buffered: 0,
            fin_queued: false,
            cwnd: config.initial_window,
            ssthresh: f64::INFINITY,
            dupacks: 0,
            recover: None,
            resend_una: false,
            srtt: None,
            rttvar: Duration::ZERO,
            rto: Duration::from_secs(1),
            rto_at: None,
        }
    }

    fn flight(&self) -> u32 {
        self.high - self.una
    }

    fn write(&mut self, data: &[u8], config: &Config) -> usize {
        let max = config.mtu - HEADER;
        let n = data
            .len()
            .min(config.send_buffer.saturating_sub(self.buffered));
        let mut rest = &data[..n];
        // Top up a last segment that has not been sent yet.
        let has_unsent = self.segments.len() > (self.next - self.una) as usize;
        if let Some(last) = self.segments.back_mut()
            && has_unsent
            && last.sent_at.is_none()
            && !last.fin
            && last.data.len() < max
        {
            let take = rest.len().min(max - last.data.len());
            last.data.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
        }
        for chunk in rest.chunks(max) {
            self.segments.push_back(Segment {
                data: chunk.to_vec(),
                fin: false,
                sent_at: None,
                resent: false,
            });
        }
        self.buffered += n;
        n
    }

    fn finish(&mut self) {
        if !self.fin_queued {
            self.fin_queued = true;
            self.segments.push_back(Segment {
                data: Vec::new(),
                fin: true,
                sent_at: None,
                resent: false,
            });
        }
    }

    fn has_transmit(&self, config: &Config) -> bool {
        if self.resend_una && !self.segments.is_empty() {
            return true;
        }
        let window = self
            .cwnd
            .floor()
            .max(1.0)
            .min(f64::from(config.recv_window)) as u32;
        (self.next - self.una) < window && ((self.next - self.una) as usize) < self.segments.len()
    }

    /// Writes the next packet of this flow into `buf`; returns whether it was a retransmission.
    fn transmit(&mut self, flow: u16, now: Instant, buf: &mut Vec<u8>) -> bool {
        let seq = if self.resend_una {
            self.resend_una = false;
            self.una
        } else {
            let seq = self.next;
            self.next += 1;
            seq
        };
        let segment = &mut self.segments[(seq - self.una) as usize];
        let resent = segment.sent_at.is_some();
        segment.resent |= resent;
        segment.sent_at = Some(now);
        buf.clear();
        buf.push(KIND_DATA);
        buf.extend_from_slice(&flow.to_be_bytes());
        buf.extend_from_slice(&seq.to_be_bytes());
        buf.push(if segment.fin { FLAG_FIN } else { 0 });
        buf.extend_from_slice(&segment.data);
        self.high = self.high.max(seq + 1);
        if self.rto_at.is_none() {
            self.rto_at = Some(now + self.rto);
        }
        resent
    }

    fn on_ack(&mut self, ack: u32, now: Instant, config: &Config) {
        if ack > self.high {
            return; // acknowledges what was never sent: not ours to believe
        }
        if ack > self.una {
            let acked = ack - self.una;
            let newest = &self.segments[(acked - 1) as usize];
            if let (Some(sent), false) = (newest.sent_at, newest.resent) {
                self.sample_rtt(now.saturating_duration_since(sent), config);
            }
            for _ in 0..acked {
                if let Some(s) = self.segments.pop_front() {
                    self.buffered -= s.data.len();
                }
            }
            self.una = ack;
            self.next = self.next.max(ack);
            match self.recover {
                Some(recover) if ack >= recover => {
                    self.recover = None;
                    self.cwnd = self.ssthresh;
                    self.dupacks = 0;
                }
                Some(_) => {
                    // Partial acknowledgement: the next hole is lost too.
                    self.resend_una = true;
                    self.cwnd = (self.cwnd - f64::from(acked) + 1.0).max(1.0);
                }
                None => {
                    self.dupacks = 0;
                    if self.cwnd < self.ssthresh {
                        self.cwnd += f64::from(acked);
                    } else {
                        self.cwnd += f64::from(acked) / self.cwnd;
                    }
                }
            }
            self.rto_at = (self.una < self.high).then(|| now + self.rto);
        } else if ack == self.una && self.una < self.high {
            self.dupacks += 1;
            if self.recover.is_none() && self.dupacks == 3 {
                self.ssthresh = (f64::from(self.flight()) / 2.0).max(2.0);
                self.cwnd = self.ssthresh + 3.0;
                self.recover = Some(self.high);
                self.resend_una = true;
            } else if self.recover.is_some() && self.dupacks > 3 {
                self.cwnd += 1.0;
            }
        }
    }

    fn sample_rtt(&mut self, rtt: Duration, config: &Config) {
        match self.srtt {
            None => {
                self.srtt = Some(rtt);
                self.rttvar = rtt / 2;
            }
            Some(srtt) => {
                self.rttvar = (self.rttvar * 3 + srtt.abs_diff(rtt)) / 4;
                self.srtt = Some((srtt * 7 + rtt) / 8);
            }
        }
        let srtt = self.srtt.unwrap_or(rtt);
        self.rto = (srtt + (self.rttvar * 4).max(Duration::from_millis(10)))
            .clamp(config.min_rto, config.max_rto);
    }

    fn on_timeout(&mut self, now: Instant, config: &Config) {
        self.ssthresh = (f64::from(self.flight()) / 2.0).max(2.0);
        self.cwnd = 1.0;
        self.next = self.una;
        self.recover = None;
        self.dupacks = 0;
        self.resend_una = false;
        self.rto = (self.rto * 2).min(config.max_rto);
        self.rto_at = Some(now + self.rto);
    }
}

/// The receiving half of one flow.
#[derive(Debug, Default)]
struct Receiver {
    /// Next in-order sequence number.
    next: u32,
    out_of_order: BTreeMap<u32, (Vec<u8>, bool)>,
    ready: VecDeque<u8>,
    fin: bool,
}

impl Receiver {
    fn on_data(&mut self, seq: u32, fin: bool, payload: &[u8], window: u32) {
        if self.fin || seq < self.next || seq - self.next >= window {
            return;
        }
        if seq != self.next {
            self.out_of_order
                .entry(seq)
                .or_insert_with(|| (payload.to_vec(), fin));
            return;
        }
        self.deliver(payload, fin);
        while !self.fin
            && let Some((data, fin)) = self.out_of_order.remove(&self.next)
        {
            self.deliver(&data, fin);
        }
    }

    fn deliver(&mut self, payload: &[u8], fin: bool) {
        self.ready.extend(payload);
        self.next += 1;
        if fin {
            self.fin = true;
            self.out_of_order.clear();
        }
    }
}

/// One end of the TCP-like baseline: any number of flows in each direction.
#[derive(Debug)]
pub struct Baseline {
    config: Config,
    senders: BTreeMap<u16, Sender>,
    receivers: BTreeMap<u16, Receiver>,
    accept_queue: VecDeque<u16>,
    /// Acknowledgements to send, one per data packet received.
    acks: VecDeque<(u16, u32)>,
    /// The flow that sent last, for round-robin.
    cursor: u16,
    next_flow: u16,
    stats: Stats,
}

impl Baseline {
    /// An endpoint with no flows.
    pub fn new(config: Config) -> Self {
        Self {
            config,
            senders: BTreeMap::new(),
            receivers: BTreeMap::new(),
            accept_queue: VecDeque::new(),
            acks: VecDeque::new(),
            cursor: 0,
            next_flow: 1,
            stats: Stats::default(),
        }
    }

    /// Opens a flow to the peer; it appears there with the first segment that arrives.
    pub fn open(&mut self) -> u16 {
        let flow = self.next_flow;
        self.next_flow = self.next_flow.wrapping_add(1).max(1);
        self.senders.insert(flow, Sender::new(&self.config));
        flow
    }

    /// Takes the next flow the peer opened.
    pub fn accept(&mut self) -> Option<u16> {
        self.accept_queue.pop_front()
    }

    /// Buffers as much of `data` as the send buffer takes; returns how much. Unknown or
    /// finished flows take nothing.
    pub fn write(&mut self, flow: u16, data: &[u8]) -> usize {
        match self.senders.get_mut(&flow) {
            Some(s) if !s.fin_queued => s.write(data, &self.config),
            _ => 0,
        }
    }

    /// Ends the flow after the data already written.
    pub fn finish(&mut self, flow: u16) {
        if let Some(s) = self.senders.get_mut(&flow) {
            s.finish();
        }
    }

    /// Reads what arrived in order on `flow`.
    pub fn read(&mut self, flow: u16, buf: &mut [u8]) -> Read {
        let Some(r) = self.receivers.get_mut(&flow) else {
            return Read::Blocked;
        };
        if r.ready.is_empty() {
            return if r.fin { Read::End } else { Read::Blocked };
        }
        let n = buf.len().min(r.ready.len());
        for (dst, src) in buf.iter_mut().zip(r.ready.drain(..n)) {
            *dst = src;
        }
        Read::Data(n)
    }

    /// Counters so far.
    pub fn stats(&self) -> Stats {
        let rtts: Vec<Duration> = self.senders.values().filter_map(|s| s.srtt).collect();
        let srtt = (!rtts.is_empty()).then(|| rtts.iter().sum::<Duration>() / rtts.len() as u32);
        Stats { srtt, ..self.stats }
    }

    fn invalid(&mut self, error: InputError) -> Result<(), InputError> {
        self.stats.invalid_packets += 1;
        Err(error)
    }
}

impl Endpoint for Baseline {
    fn handle_input(&mut self, now: Instant, packet: &[u8]) -> Result<(), InputError> {
        let Some((header, payload)) = packet.split_first_chunk::<HEADER>() else {
            return self.invalid(InputError::Truncated);
        };
        let [kind, f0, f1, s0, s1, s2, s3, flags] = *header;
        let flow = u16::from_be_bytes([f0, f1]);
        let seq = u32::from_be_bytes([s0, s1, s2, s3]);
        if packet.len() > self.config.mtu || (kind == KIND_ACK && !payload.is_empty()) {
            return self.invalid(InputError::BadLength(packet.len()));
        }
        match kind {
            KIND_DATA => {
                let receiver = self.receivers.entry(flow).or_insert_with(|| {
                    self.accept_queue.push_back(flow);
                    Receiver::default()
                });
                receiver.on_data(seq, flags & FLAG_FIN != 0, payload, self.config.recv_window);
                self.acks.push_back((flow, receiver.next));
            }
            KIND_ACK => {
                if let Some(sender) = self.senders.get_mut(&flow) {
                    sender.on_ack(seq, now, &self.config);
                }
            }
            other => return self.invalid(InputError::UnknownKind(other)),
        }
        Ok(())
    }

    fn handle_timeout(&mut self, now: Instant) {
        for sender in self.senders.values_mut() {
            if sender.rto_at.is_some_and(|t| t <= now) {
                if sender.una < sender.high {
                    sender.on_timeout(now, &self.config);
                    self.stats.timeouts += 1;
                } else {
                    sender.rto_at = None;
                }
            }
        }
    }

    fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<usize> {
        if let Some((flow, next)) = self.acks.pop_front() {
            buf.clear();
            buf.push(KIND_ACK);
            buf.extend_from_slice(&flow.to_be_bytes());
            buf.extend_from_slice(&next.to_be_bytes());
            buf.push(0);
            self.stats.packets_sent += 1;
            return Some(buf.len());
        }
        // Round-robin: the first flow after the one that sent last that has something to send.
        let cursor = self.cursor;
        let config = &self.config;
        let flow = self
            .senders
            .range(cursor.saturating_add(1)..)
            .chain(self.senders.range(..=cursor))
            .find(|(_, s)| s.has_transmit(config))
            .map(|(flow, _)| *flow)?;
        let sender = self.senders.get_mut(&flow)?;
        if sender.transmit(flow, now, buf) {
            self.stats.retransmits += 1;
        } else {
            self.stats.segments_sent += 1;
        }
        self.stats.packets_sent += 1;
        self.cursor = flow;
        Some(buf.len())
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.senders.values().filter_map(|s| s.rto_at).min()
    }
}

#[cfg(test)]
mod tests {
    use fabric::testing::{LinkConfig, Pair, SimNet};

    use super::*;

    /// Sends `sizes` bytes on as many flows from `A` to `B`; returns what `B` read on each
    /// and the virtual time it took, or `None` if it did not finish in 10 virtual minutes.
    fn transfer(link: LinkConfig, seed: u64, sizes: &[usize]) -> Option<(Vec<Vec<u8>>, Duration)> {
        let t0 = Instant::now();
        let a = Baseline::new(Config::default());
        let b = Baseline::new(Config::default());
        let mut pair = Pair::with(SimNet::symmetric(link, seed), a, b, t0);
        let data: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| (0..n).map(|k| (k * 7 + i * 13) as u8).collect())
            .collect();
        let flows: Vec<u16> = data.iter().map(|_| pair.a.open()).collect();
        let mut written = vec![0; data.len()];
        let mut got: BTreeMap<u16, (Vec<u8>, bool)> = BTreeMap::new();
        let mut buf = vec![0; 64 * 1024];
        let done = pair.run_until(t0 + Duration::from_secs(600), |a, b, _| {
            for (i, &flow) in flows.iter().enumerate() {
                written[i] += a.write(flow, &data[i][written[i]..]);
                if written[i] == data[i].len() {
                    a.finish(flow);
                }
            }
            while let Some(flow) = b.accept() {
                got.insert(flow, (Vec::new(), false));
            }
            for (flow, (bytes, end)) in &mut got {
                loop {
                    match b.read(*flow, &mut buf) {
                        Read::Data(n) => bytes.extend_from_slice(&buf[..n]),
                        Read::End => {
                            *end = true;
                            break;
                        }
                        Read::Blocked => break,
                    }
                }
            }
            got.len() == flows.len() && got.values().all(|(_, end)| *end)
        });
        let took = pair.now - t0;
        let received = got.into_values().map(|(bytes, _)| bytes).collect();
        assert_eq!(pair.b.stats().invalid_packets, 0);
        done.then(|| {
            assert_eq!(received, data, "every flow delivers its bytes in order");
            (received, took)
        })
    }

    #[test]
    fn clean_link_delivers_every_flow_in_order() {
        let link = LinkConfig::with_rate_rtt_loss(20, Duration::from_millis(40), 0.0);
        assert!(transfer(link, 1, &[300_000, 1, 0, 70_000]).is_some());
    }

    #[test]
    fn lossy_link_still_delivers_everything() {
        for (loss, seed) in [(0.02, 2), (0.10, 3)] {
            let link = LinkConfig::with_rate_rtt_loss(20, Duration::from_millis(40), loss);
            assert!(
                transfer(link, seed, &[200_000; 4]).is_some(),
                "loss {loss}: not done in 10 virtual minutes"
            );
        }
    }

    #[test]
    fn reordering_and_duplicates_are_harmless() {
        let link = LinkConfig {
            jitter: Duration::from_millis(5),
            reorder: 0.1,
            duplicate: 0.05,
            loss: 0.01,
            ..LinkConfig::with_rate_rtt_loss(20, Duration::from_millis(40), 0.0)
        };
        assert!(transfer(link, 4, &[500_000, 100_000]).is_some());
    }

    #[test]
    fn loss_costs_the_baseline_dearly() {
        // The point of the demo lane: without selective acknowledgements and with a window
        // halved on every loss, 10 % loss makes the same transfer many times slower.
        let clean = LinkConfig::with_rate_rtt_loss(20, Duration::from_millis(40), 0.0);
        let lossy = LinkConfig::with_rate_rtt_loss(20, Duration::from_millis(40), 0.10);
        let (_, fast) = transfer(clean, 5, &[500_000]).unwrap();
        let (_, slow) = transfer(lossy, 5, &[500_000]).unwrap();
        assert!(slow > fast * 4, "clean {fast:?}, 10 % loss {slow:?}");
    }

    #[test]
    fn timeout_goes_back_to_the_first_unacknowledged_segment() {
        let config = Config::default();
        let t0 = Instant::now();
        let mut s = Sender::new(&config);
        s.write(&vec![1; 5 * (config.mtu - HEADER)], &config);
        let mut buf = Vec::new();
        while s.has_transmit(&config) {
            s.transmit(1, t0, &mut buf);
        }
        assert_eq!((s.una, s.next, s.high), (0, 5, 5));
        s.on_ack(2, t0 + Duration::from_millis(50), &config);
        assert_eq!(s.una, 2);
        let rto_at = s.rto_at.unwrap();
        s.on_timeout(rto_at, &config);
        assert_eq!((s.next, s.cwnd), (2, 1.0));
        assert!(s.has_transmit(&config));
        assert!(
            s.transmit(1, rto_at, &mut buf),
            "resending counts as a retransmission"
        );
        assert!(
            !s.has_transmit(&config),
            "one segment in flight after a timeout"
        );
    }

    #[test]
    fn three_duplicate_acks_trigger_one_fast_retransmit() {
        let config = Config::default();
        let t0 = Instant::now();
        let mut s = Sender::new(&config);
        s.write(&vec![1; 8 * (config.mtu - HEADER)], &config);
        let mut buf = Vec::new();
        while s.has_transmit(&config) {
            s.transmit(1, t0, &mut buf);
        }
        let t1 = t0 + Duration::from_millis(50);
        s.on_ack(1, t1, &config);
        for _ in 0..3 {
            s.on_ack(1, t1, &config);
        }
        assert!(s.resend_una && s.recover == Some(8));
        assert!(s.transmit(1, t1, &mut buf));
        assert_eq!(u32::from_be_bytes(buf[3..7].try_into().unwrap()), 1);
        s.on_ack(1, t1, &config);
        assert!(
            !s.resend_una,
            "more duplicates inflate the window, no second resend"
        );
        s.on_ack(8, t1, &config);
        assert_eq!(s.recover, None);
    }

    #[test]
    fn malformed_packets_are_refused_and_counted() {
        let mut b = Baseline::new(Config::default());
        let now = Instant::now();
        assert_eq!(b.handle_input(now, &[1, 2, 3]), Err(InputError::Truncated));
        assert_eq!(
            b.handle_input(now, &[9, 0, 1, 0, 0, 0, 0, 0]),
            Err(InputError::UnknownKind(9))
        );
        assert_eq!(
            b.handle_input(now, &[2, 0, 1, 0, 0, 0, 0, 0, 7]),
            Err(InputError::BadLength(9))
        );
        let mut jumbo = vec![1, 0, 1, 0, 0, 0, 0, 0];
        jumbo.resize(Config::default().mtu + 1, 0);
        assert_eq!(
            b.handle_input(now, &jumbo),
            Err(InputError::BadLength(jumbo.len()))
        );
        assert_eq!(b.accept(), None, "a refused packet opens no flow");
        // An acknowledgement for a flow we never opened, and one beyond what was sent.
        assert_eq!(b.handle_input(now, &[2, 0, 7, 0, 0, 0, 9, 0]), Ok(()));
        let flow = b.open();
        b.write(flow, b"hi");
        let mut buf = Vec::new();
        b.poll_transmit(now, &mut buf).unwrap();
        let mut ack = vec![2];
        ack.extend_from_slice(&flow.to_be_bytes());
        ack.extend_from_slice(&u32::MAX.to_be_bytes());
        ack.push(0);
        assert_eq!(b.handle_input(now, &ack), Ok(()));
        assert_eq!(b.senders[&flow].una, 0);
        assert_eq!(b.stats().invalid_packets, 4);
    }
}
