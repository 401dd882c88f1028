//! Lanes: several KCP conversations inside one session, so that one flow's losses do not hold
//! up another flow's bytes.
//!
//! One ordered KCP stream makes every byte wait for every hole before it. Beside a bulk
//! upload at 5 % loss some thirty holes are open at any time, and a 1-byte request waits until
//! the last of them is filled: at 40 ms RTT its p99 was 6.7 round trips. So the session runs
//! up to [`MAX_LANES`] KCP instances (lanes) on its one conv, as kcptun's `--conn` runs several
//! connections, and the caller tags what it sends with a *flow* (the mux stream a frame
//! belongs to). A flow sticks to one lane, so its bytes stay in order; a flow whose lane has
//! gone idle picks the least loaded lane again, so a request never queues behind a transfer
//! that happens to have opened first.
//!
//! The receiver hands its caller one byte stream, as before. What each [`Lanes::send`] call
//! was given travels as one *record* (`length varint | bytes`), and the receiver interleaves
//! lanes only at record boundaries, so a caller that sends whole frames per call reads whole
//! frames back. Records are moved to that stream as soon as they are complete, inside the
//! input that completed them.
//!
//! Why re-laning a flow never reorders it: a flow leaves its lane only once that lane's KCP
//! has nothing unacknowledged (`wait_snd() == 0`). Then the peer's KCP had every segment of
//! the lane, in order, before it sent the last acknowledgement; the input that delivered them
//! also moved their records to the receiver's stream. The flow's next record, on any lane,
//! was sent after that acknowledgement arrived, so it lands behind them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tracing::debug;

use super::outbox::{OutQueue, Outbox};
use super::packet::{KCP_HEADER, KCP_PREFIX, MAX_LANES};
use super::{Config, InputError};

/// Largest record; bigger sends are cut. A record is buffered whole at the receiver before it
/// is handed on, so this bounds what one lane can make the peer hold.
pub const MAX_RECORD: usize = 1 << 20;

/// Bytes of a record length: LEB128, 7 bits a byte, enough for [`MAX_RECORD`].
const MAX_VARINT: usize = 3;

/// Most bytes a record spends on its header.
pub(super) const RECORD_OVERHEAD: usize = MAX_VARINT;

/// Flows remembered before idle ones are forgotten.
const FLOW_TABLE: usize = 256;

/// The lanes of one session.
#[derive(Debug)]
pub(super) struct Lanes {
    conv: u32,
    config: Config,
    outbox: Arc<Mutex<OutQueue>>,
    lanes: Vec<Lane>,
    /// The lane each flow last went on.
    flows: HashMap<u32, u8>,
    /// KCP's minimum RTO, applied to lanes opened later too.
    min_rto: Option<u32>,
    /// Lanes with something to flush (input to acknowledge, data to send), one bit each.
    needs_flush: u32,
    /// Records received whole, in the order they completed.
    received: Vec<u8>,
}

#[derive(Debug)]
struct Lane {
    kcp: kcp::Kcp<Outbox>,
    /// Bytes received in order that do not yet make a whole record.
    partial: Vec<u8>,
}

impl Lanes {
    /// Lane 0, started at `now_ms`; further lanes open when used.
    pub(super) fn new(
        conv: u32,
        config: Config,
        outbox: Arc<Mutex<OutQueue>>,
        now_ms: u32,
    ) -> Self {
        let mut lanes = Self {
            conv,
            config,
            outbox,
            lanes: Vec::new(),
            flows: HashMap::new(),
            min_rto: None,
            needs_flush: 0,
            received: Vec::new(),
        };
        lanes.open(0, now_ms);
        lanes
    }

    /// Payload bytes of a segment (the same on every lane).
    pub(super) fn mss(&self) -> usize {
        self.lanes[0].kcp.mss()
    }

    /// Segments queued or unacknowledged, all lanes together.
    pub(super) fn wait_snd(&self) -> usize {
        self.lanes.iter().map(|l| l.kcp.wait_snd()).sum()
    }

    /// How many lanes this end runs, and accepts from the peer.
    fn count(&self) -> usize {
        usize::from(self.config.lanes).clamp(1, MAX_LANES)
    }

    /// How many lanes are open.
    pub(super) fn open_lanes(&self) -> usize {
        self.lanes.len()
    }

    /// Segments queued or unacknowledged on `lane`.
    pub(super) fn lane_wait_snd(&self, lane: usize) -> usize {
        self.lanes.get(lane).map_or(0, |l| l.kcp.wait_snd())
    }

    /// Sets KCP's minimum RTO on every lane, now and later.
    pub(super) fn set_min_rto(&mut self, ms: u32) {
        self.min_rto = Some(ms);
        for l in &mut self.lanes {
            l.kcp.set_rx_minrto(ms);
        }
    }

    /// Opens lanes up to `lane`.
    fn open(&mut self, lane: usize, now_ms: u32) {
        while self.lanes.len() <= lane {
            let n = self.lanes.len() as u8;
            let mut kcp = kcp::Kcp::new_stream(self.conv, Outbox::new(self.outbox.clone(), n));
            let (nodelay, interval, resend, no_cwnd) = self.config.mode.params();
            let kcp_mtu = self
                .config
                .mtu
                .saturating_sub(KCP_PREFIX)
                .max(KCP_HEADER + 64);
            if kcp.set_mtu(kcp_mtu).is_err() {
                debug!(
                    conv = self.conv,
                    kcp_mtu, "KCP refused the MTU, keeping its default"
                );
            }
            kcp.set_nodelay(nodelay, interval as i32, resend as i32, no_cwnd);
            kcp.set_wndsize(
                self.config.send_window.max(32),
                self.config.recv_window.max(128),
            );
            if let Some(rto) = self.config.min_rto {
                kcp.set_rx_minrto(rto.as_millis().clamp(1, 60_000) as u32);
            } else if let Some(rto) = self.min_rto {
                kcp.set_rx_minrto(rto);
            }
            // Dead peers are found by the idle timeout, in time rather than in
            // retransmissions.
            kcp.set_maximum_resend_times(u32::MAX);
            if let Err(error) = kcp.update(now_ms) {
                debug!(conv = self.conv, %error, "KCP update failed");
            }
            self.lanes.push(Lane {
                kcp,
                partial: Vec::new(),
            });
        }
    }

    /// Feeds checked segments of `lane` to its KCP and moves the records they complete to
    /// the received stream.
    ///
    /// `Err(BadLane)` refuses a lane beyond our own [`Config::lanes`]: each lane may hold a
    /// receive window of out-of-order segments, so the peer must not choose how many there
    /// are (an honest peer runs the same number, the default). `Err(BadRecord)` means the
    /// peer broke the record framing: the lane's stream cannot be resynchronised, and the
    /// session must end.
    pub(super) fn input(
        &mut self,
        lane: u8,
        segments: &[u8],
        now_ms: u32,
    ) -> Result<(), InputError> {
        let index = usize::from(lane);
        if index >= self.count() {
            return Err(InputError::BadLane(lane));
        }
        self.open(index, now_ms);
        let l = &mut self.lanes[index];
        l.kcp
            .input(segments)
            .map_err(|e| InputError::Kcp(e.to_string()))?;
        self.needs_flush |= 1 << index;
        // Every segment in order goes on to the record reader at once (see the module docs:
        // the peer may move a flow to another lane as soon as this input is acknowledged).
        let mss = l.kcp.mss();
        loop {
            let len = l.partial.len();
            l.partial.resize(len + mss, 0);
            match l.kcp.recv(&mut l.partial[len..]) {
                Ok(n) => l.partial.truncate(len + n),
                Err(_) => {
                    l.partial.truncate(len);
                    break;
                }
            }
        }
        take_records(&mut l.partial, &mut self.received)
    }

    /// Queues `data` on the lane of `flow`, as one record (or several, every
    /// [`MAX_RECORD`] bytes).
    pub(super) fn send(
        &mut self,
        flow: u32,
        mut data: &[u8],
        now_ms: u32,
    ) -> Result<(), InputError> {
        let lane = self.lane_for(flow, now_ms);
        let l = &mut self.lanes[lane];
        // KCP refuses a single call of 128 segments or more.
        let chunk = l.kcp.mss() * 64;
        loop {
            let record = &data[..data.len().min(MAX_RECORD)];
            data = &data[record.len()..];
            let mut header = [0u8; MAX_VARINT];
            let n = encode_len(record.len(), &mut header);
            l.kcp
                .send(&header[..n])
                .map_err(|e| InputError::Kcp(e.to_string()))?;
            for piece in record.chunks(chunk) {
                l.kcp
                    .send(piece)
                    .map_err(|e| InputError::Kcp(e.to_string()))?;
            }
            if data.is_empty() {
                break;
            }
        }
        self.needs_flush |= 1 << lane;
        Ok(())
    }

    /// The lane `flow` goes on: its lane while that holds anything unacknowledged, else the
    /// least loaded (lowest numbered among equals).
    fn lane_for(&mut self, flow: u32, now_ms: u32) -> usize {
        if let Some(&lane) = self.flows.get(&flow)
            && self.lane_wait_snd(usize::from(lane)) > 0
        {
            return usize::from(lane);
        }
        let lane = (0..self.count())
            .min_by_key(|&i| (self.lane_wait_snd(i), i))
            .unwrap_or(0);
        self.open(lane, now_ms);
        if self.flows.len() >= FLOW_TABLE {
            // Flows on idle lanes may go anywhere anyway: forget them.
            let lanes = &self.lanes;
            self.flows.retain(|_, l| {
                lanes
                    .get(usize::from(*l))
                    .is_some_and(|l| l.kcp.wait_snd() > 0)
            });
        }
        self.flows.insert(flow, lane as u8);
        lane
    }

    /// Appends the records received whole so far to `out`; returns how many bytes.
    pub(super) fn recv(&mut self, out: &mut Vec<u8>) -> usize {
        let n = self.received.len();
        if out.is_empty() {
            std::mem::swap(out, &mut self.received);
        } else {
            out.append(&mut self.received);
        }
        n
    }

    /// Lets every lane's KCP do what is due at `now_ms`.
    pub(super) fn update(&mut self, now_ms: u32) {
        for l in &mut self.lanes {
            if let Err(error) = l.kcp.update(now_ms) {
                debug!(conv = self.conv, %error, "KCP update failed");
            }
            // `check` (this crate returns a delay, not ikcp's absolute time) says "now" as
            // soon as a retransmission is due, but `update` only flushes on its interval
            // ticks: a driver trusting `check` would spin until the tick. Flushing here sends
            // the retransmission on time and moves `check` forward.
            if l.kcp.check(now_ms) == 0
                && let Err(error) = l.kcp.flush()
            {
                debug!(conv = self.conv, %error, "KCP flush failed");
            }
        }
    }

    /// Flushes the lanes that input, `send` or `recv` gave something to send.
    pub(super) fn flush_pending(&mut self) {
        let mut pending = std::mem::take(&mut self.needs_flush);
        while pending != 0 {
            let lane = pending.trailing_zeros() as usize;
            pending &= pending - 1;
            if let Some(l) = self.lanes.get_mut(lane)
                && let Err(error) = l.kcp.flush()
            {
                debug!(conv = self.conv, lane, %error, "KCP flush failed");
            }
        }
    }

    /// Whether no lane has anything to send, to acknowledge or waiting for acknowledgement:
    /// KCP's timers have nothing to do, however often they are asked.
    pub(super) fn is_idle(&self) -> bool {
        self.needs_flush == 0 && self.lanes.iter().all(|l| l.kcp.wait_snd() == 0)
    }

    /// Milliseconds until some lane's KCP needs `update`.
    pub(super) fn check(&self, now_ms: u32) -> u32 {
        self.lanes
            .iter()
            .map(|l| l.kcp.check(now_ms))
            .min()
            .unwrap_or(u32::MAX)
    }

    /// Drops what waits to be received: the session ended.
    pub(super) fn clear(&mut self) {
        self.received = Vec::new();
        for l in &mut self.lanes {
            l.partial = Vec::new();
        }
    }
}

/// Writes `len` as LEB128 into `out`; returns how many bytes. `len` is at most
/// [`MAX_RECORD`].
fn encode_len(mut len: usize, out: &mut [u8; MAX_VARINT]) -> usize {
    let mut n = 0;
    loop {
        let byte = (len & 0x7f) as u8;
        len >>= 7;
        if len == 0 {
            out[n] = byte;
            return n + 1;
        }
        out[n] = byte | 0x80;
        n += 1;
    }
}

/// A record length at the start of `b`: `Ok(Some((len, header bytes)))`, `Ok(None)` when
/// more bytes are needed.
fn decode_len(b: &[u8]) -> Result<Option<(usize, usize)>, InputError> {
    let mut len = 0usize;
    for (i, &byte) in b.iter().take(MAX_VARINT).enumerate() {
        len |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            if len > MAX_RECORD {
                return Err(InputError::BadRecord);
            }
            return Ok(Some((len, i + 1)));
        }
    }
    if b.len() >= MAX_VARINT {
        return Err(InputError::BadRecord);
    }
    Ok(None)
}

/// Moves the whole records at the start of `partial` to `out`, keeping the incomplete tail.
fn take_records(partial: &mut Vec<u8>, out: &mut Vec<u8>) -> Result<(), InputError> {
    let mut at = 0;
    while let Some((len, header)) = decode_len(&partial[at..])? {
        let start = at + header;
        let Some(record) = partial.get(start..start + len) else {
            break;
        };
        out.extend_from_slice(record);
        at = start + len;
    }
    partial.drain(..at);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(data: &[u8]) -> Vec<u8> {
        let mut header = [0; MAX_VARINT];
        let n = encode_len(data.len(), &mut header);
        [&header[..n], data].concat()
    }

    #[test]
    fn lengths_round_trip() {
        for len in [0, 1, 127, 128, 16_383, 16_384, MAX_RECORD] {
            let mut b = [0; MAX_VARINT];
            let n = encode_len(len, &mut b);
            assert_eq!(decode_len(&b[..n]), Ok(Some((len, n))), "{len}");
            // Cut short, it asks for more.
            assert_eq!(decode_len(&b[..n - 1]), Ok(None), "{len}");
        }
        assert_eq!(decode_len(&[0x81, 0x80, 0x40]), Err(InputError::BadRecord));
        assert_eq!(decode_len(&[0xff, 0xff, 0xff]), Err(InputError::BadRecord));
    }

    #[test]
    fn records_come_out_whole_however_the_bytes_arrive() {
        let records: Vec<Vec<u8>> = [0usize, 1, 200, 5000, 3]
            .iter()
            .map(|&n| (0..n).map(|i| i as u8).collect())
            .collect();
        let wire: Vec<u8> = records.iter().flat_map(|r| record(r)).collect();
        let whole: Vec<u8> = records.concat();
        for step in [1, 2, 7, 1000, wire.len()] {
            let (mut partial, mut out) = (Vec::new(), Vec::new());
            for piece in wire.chunks(step) {
                let before = out.len();
                partial.extend_from_slice(piece);
                take_records(&mut partial, &mut out).expect("valid records");
                // Output grows only by whole records.
                let boundaries: Vec<usize> = records
                    .iter()
                    .scan(0, |at, r| {
                        *at += r.len();
                        Some(*at)
                    })
                    .collect();
                assert!(out.len() == before || boundaries.contains(&out.len()));
            }
            assert_eq!(out, whole, "step {step}");
            assert!(partial.is_empty());
        }
    }
}
