//! One lane of the demo: two endpoints joined by a [`SimNet`], moving a [`Workload`] from
//! `A` to `B` in step with the page's clock, with the counters sampled for the charts.

use std::collections::HashMap;
use std::rc::Rc;

use fabric::connection::{Connection, Endpoint};
use fabric::mux::{StreamError, StreamId};
use fabric::testing::{LinkConfig, LinkStats, Pair, SimNet};
use fabric::time::{Duration, Instant};
use sha2::{Digest, Sha256};

use crate::baseline::{self, Baseline};

/// How often a lane records a [`Sample`], in its own (simulated) time.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// The span rates in a [`Sample`] are averaged over.
const RATE_WINDOW: usize = 5;

/// Why a transfer stopped short.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TransferError {
    /// The sender could not open a stream.
    #[error("could not open a stream: {0}")]
    Open(String),
    /// A stream failed while writing or reading.
    #[error("stream failed: {0}")]
    Stream(String),
    /// The receiver accepted a stream the sender never opened.
    #[error("unexpected stream {0}")]
    UnknownStream(u16),
}

/// Outcome of one read from a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Read {
    /// Bytes were copied out.
    Data(usize),
    /// The stream ended and everything was read.
    End,
    /// Nothing to read yet.
    Blocked,
}

/// Counters a lane shows, whatever protocol carries it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProtocolStats {
    /// Smoothed round-trip time.
    pub srtt: Option<Duration>,
    /// Data segments sent again.
    pub retransmits: u64,
    /// Data segments sent the first time.
    pub segments_sent: u64,
}

/// What the workload needs of an endpoint: streams it can open, accept, write and read.
pub trait Streams: Endpoint {
    /// Opens a stream to the peer; the id is the one the peer accepts.
    fn open_stream(&mut self) -> Result<u16, TransferError>;
    /// The next stream the peer opened.
    fn accept_stream(&mut self) -> Option<u16>;
    /// Buffers what it can of `data`; `Ok(0)` means blocked.
    fn write_stream(&mut self, id: u16, data: &[u8]) -> Result<usize, TransferError>;
    /// Ends the stream after what was written.
    fn finish_stream(&mut self, id: u16) -> Result<(), TransferError>;
    /// Reads from the stream.
    fn read_stream(&mut self, id: u16, buf: &mut [u8]) -> Result<Read, TransferError>;
    /// The sender's counters.
    fn protocol_stats(&mut self) -> ProtocolStats;
}

impl Streams for Connection {
    fn open_stream(&mut self) -> Result<u16, TransferError> {
        self.mux()
            .open()
            .map(|id| id.0)
            .map_err(|e| TransferError::Open(e.to_string()))
    }
    fn accept_stream(&mut self) -> Option<u16> {
        self.mux().accept().map(|id| id.0)
    }
    fn write_stream(&mut self, id: u16, data: &[u8]) -> Result<usize, TransferError> {
        self.mux()
            .write(StreamId(id), data)
            .map_err(|e| TransferError::Stream(e.to_string()))
    }
    fn finish_stream(&mut self, id: u16) -> Result<(), TransferError> {
        self.mux()
            .finish(StreamId(id))
            .map_err(|e| TransferError::Stream(e.to_string()))
    }
    fn read_stream(&mut self, id: u16, buf: &mut [u8]) -> Result<Read, TransferError> {
        match self.mux().read(StreamId(id), buf) {
            Ok(0) => Ok(Read::End),
            Ok(n) => Ok(Read::Data(n)),
            Err(StreamError::WouldBlock) => Ok(Read::Blocked),
            Err(e) => Err(TransferError::Stream(e.to_string())),
        }
    }
    fn protocol_stats(&mut self) -> ProtocolStats {
        let s = self.session().stats();
        ProtocolStats {
            srtt: s.srtt,
            retransmits: s.retransmits,
            segments_sent: s.segments_sent,
        }
    }
}

impl Streams for Baseline {
    fn open_stream(&mut self) -> Result<u16, TransferError> {
        Ok(self.open())
    }
    fn accept_stream(&mut self) -> Option<u16> {
        self.accept()
    }
    fn write_stream(&mut self, id: u16, data: &[u8]) -> Result<usize, TransferError> {
        Ok(self.write(id, data))
    }
    fn finish_stream(&mut self, id: u16) -> Result<(), TransferError> {
        self.finish(id);
        Ok(())
    }
    fn read_stream(&mut self, id: u16, buf: &mut [u8]) -> Result<Read, TransferError> {
        Ok(match self.read(id, buf) {
            baseline::Read::Data(n) => Read::Data(n),
            baseline::Read::End => Read::End,
            baseline::Read::Blocked => Read::Blocked,
        })
    }
    fn protocol_stats(&mut self) -> ProtocolStats {
        let s = self.stats();
        ProtocolStats {
            srtt: s.srtt,
            retransmits: s.retransmits,
            segments_sent: s.segments_sent,
        }
    }
}

/// The bytes to move: one payload per stream, with its SHA-256. Shared by both lanes.
#[derive(Debug)]
pub struct Workload {
    payloads: Vec<(Vec<u8>, [u8; 32])>,
}

impl Workload {
    /// `streams` payloads of `size` bytes each, pseudo-random from `seed`.
    pub fn new(streams: usize, size: usize, seed: u64) -> Self {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
        let payloads = (0..streams)
            .map(|_| {
                let mut data = vec![0; size];
                rng.fill(&mut data[..]);
                let digest = Sha256::digest(&data).into();
                (data, digest)
            })
            .collect();
        Self { payloads }
    }

    /// Total bytes.
    pub fn total(&self) -> usize {
        self.payloads.iter().map(|(p, _)| p.len()).sum()
    }
}

/// Where one stream of the transfer stands.
#[derive(Debug)]
struct StreamState {
    id: u16,
    written: usize,
    finished: bool,
    /// The receiver has accepted it.
    accepted: bool,
    received: usize,
    hasher: Sha256,
    /// SHA-256 of what arrived, once the stream ended.
    digest: Option<[u8; 32]>,
}

/// One stream's result, for the page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamReport {
    /// Bytes sent.
    pub size: usize,
    /// Bytes received so far.
    pub received: usize,
    /// SHA-256 of what was sent.
    pub sent_digest: [u8; 32],
    /// SHA-256 of what arrived, once the stream ended.
    pub received_digest: Option<[u8; 32]>,
}

/// A lane's counters at one moment, for the charts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// Seconds since the transfer started.
    pub t: f64,
    /// Bytes the receiver has read.
    pub delivered: u64,
    /// Goodput over the last half second, Mbit/s.
    pub goodput_mbit: f64,
    /// Smoothed RTT in milliseconds (0 before the first measurement).
    pub rtt_ms: f64,
    /// Retransmissions so far.
    pub retransmits: u64,
    /// Retransmissions per second over the last half second.
    pub retransmits_per_s: f64,
}

/// Where a lane is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Moving bytes.
    Running,
    /// Every stream ended; `verified` says whether every digest matched.
    Complete {
        /// Every received stream has the length and SHA-256 of what was sent.
        verified: bool,
    },
    /// Stopped on an error.
    Failed(TransferError),
}

/// Two endpoints of one protocol over a simulated path, moving a workload.
#[derive(Debug)]
pub struct Lane<E> {
    pair: Pair<E>,
    workload: Rc<Workload>,
    streams: Vec<StreamState>,
    /// Receiver's stream id → index in `streams`.
    index: HashMap<u16, usize>,
    buf: Vec<u8>,
    started: Instant,
    /// The time the lane has run up to (the pair's clock is already at the next event).
    reached: Instant,
    /// When every stream ended, or the transfer failed.
    finished: Option<Instant>,
    failure: Option<TransferError>,
    samples: Vec<Sample>,
    /// Steps since the start, for the curious.
    steps: u64,
}

/// The fabric: the mux over a KCP session, exactly as the proxy runs them.
pub fn fabric_lane(net: SimNet, workload: Rc<Workload>, now: Instant) -> Lane<Connection> {
    let pair = Pair::connections(
        net,
        fabric::session::Config::default(),
        fabric::connection::mux_config(),
        now,
    );
    Lane::new(pair, workload)
}

/// The TCP-like comparison, one flow per stream.
pub fn baseline_lane(net: SimNet, workload: Rc<Workload>, now: Instant) -> Lane<Baseline> {
    let a = Baseline::new(baseline::Config::default());
    let b = Baseline::new(baseline::Config::default());
    Lane::new(Pair::with(net, a, b, now), workload)
}

impl<E: Streams> Lane<E> {
    /// Opens one stream per payload on `pair.a`, starting at `pair.now`.
    pub fn new(mut pair: Pair<E>, workload: Rc<Workload>) -> Self {
        let mut streams = Vec::new();
        let mut failure = None;
        for _ in &workload.payloads {
            match pair.a.open_stream() {
                Ok(id) => streams.push(StreamState {
                    id,
                    written: 0,
                    finished: false,
                    accepted: false,
                    received: 0,
                    hasher: Sha256::new(),
                    digest: None,
                }),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        let index = streams.iter().enumerate().map(|(i, s)| (s.id, i)).collect();
        let started = pair.now;
        Self {
            pair,
            workload,
            streams,
            index,
            buf: vec![0; 64 * 1024],
            started,
            reached: started,
            finished: None,
            failure,
            samples: Vec::new(),
            steps: 0,
        }
    }

    /// Runs the lane up to `until`, at most `max_steps` protocol steps. Returns whether it
    /// caught up (otherwise it lags and continues from where it stopped next time).
    pub fn advance(&mut self, until: Instant, max_steps: usize) -> bool {
        let mut steps = 0;
        while self.pair.now <= until {
            self.sample_until(self.pair.now);
            if steps == max_steps {
                self.reached = self.pair.now;
                return false;
            }
            let Self {
                pair,
                workload,
                streams,
                index,
                buf,
                failure,
                finished,
                ..
            } = self;
            let more = pair.step(|a, b, now| {
                if failure.is_some() || finished.is_some() {
                    return;
                }
                match pump(a, b, workload, streams, index, buf) {
                    Ok(true) => *finished = Some(now),
                    Ok(false) => {}
                    Err(e) => {
                        *failure = Some(e);
                        *finished = Some(now);
                    }
                }
            });
            steps += 1;
            self.steps += 1;
            if !more {
                // Nothing in flight and no timer: rest until the next call.
                self.pair.now = until;
                break;
            }
        }
        self.sample_until(until);
        self.reached = until;
        true
    }

    /// Changes both directions of the path from now on.
    pub fn set_link(&mut self, config: &LinkConfig) {
        self.pair.net.a_to_b.set_config(config.clone());
        self.pair.net.b_to_a.set_config(config.clone());
    }

    /// Where the transfer stands.
    pub fn status(&self) -> Status {
        if let Some(e) = &self.failure {
            return Status::Failed(e.clone());
        }
        if self.finished.is_none() {
            return Status::Running;
        }
        let verified = self
            .streams
            .iter()
            .zip(&self.workload.payloads)
            .all(|(s, (data, digest))| s.received == data.len() && s.digest == Some(*digest));
        Status::Complete { verified }
    }

    /// Seconds from the start to the end of the transfer (or to now, while it runs).
    pub fn elapsed(&self) -> Duration {
        self.finished.unwrap_or(self.reached) - self.started
    }

    /// Bytes the receiver has read, over all streams.
    pub fn delivered(&self) -> u64 {
        self.streams.iter().map(|s| s.received as u64).sum()
    }

    /// Per-stream results.
    pub fn reports(&self) -> Vec<StreamReport> {
        self.streams
            .iter()
            .zip(&self.workload.payloads)
            .map(|(s, (data, digest))| StreamReport {
                size: data.len(),
                received: s.received,
                sent_digest: *digest,
                received_digest: s.digest,
            })
            .collect()
    }

    /// The sender's protocol counters.
    pub fn protocol_stats(&mut self) -> ProtocolStats {
        self.pair.a.protocol_stats()
    }

    /// Both directions' link counters: `A → B`, then `B → A`.
    pub fn link_stats(&self) -> (LinkStats, LinkStats) {
        (self.pair.net.a_to_b.stats(), self.pair.net.b_to_a.stats())
    }

    /// Samples recorded so far, one per [`SAMPLE_EVERY`].
    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }

    /// The time the lane has run up to.
    pub fn reached(&self) -> Instant {
        self.reached
    }

    /// Protocol steps run so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Records a sample at every boundary up to `now` (the counters do not change between
    /// steps, so the values at the last step stand for the whole gap).
    fn sample_until(&mut self, now: Instant) {
        // A finished lane records one more sample, then its chart line stops.
        let limit = self.finished.map_or(now, |f| now.min(f + SAMPLE_EVERY));
        loop {
            let t = SAMPLE_EVERY * (self.samples.len() as u32 + 1);
            if self.started + t > limit {
                return;
            }
            let stats = self.pair.a.protocol_stats();
            let delivered = self.delivered();
            let back = self.samples.len().checked_sub(RATE_WINDOW - 1);
            let (d0, r0, span) = match back.and_then(|i| self.samples.get(i)) {
                Some(old) => (old.delivered, old.retransmits, RATE_WINDOW as f64),
                None => (0, 0, self.samples.len() as f64 + 1.0),
            };
            let span_s = span * SAMPLE_EVERY.as_secs_f64();
            self.samples.push(Sample {
                t: t.as_secs_f64(),
                delivered,
                goodput_mbit: (delivered - d0) as f64 * 8.0 / span_s / 1e6,
                rtt_ms: stats.srtt.map_or(0.0, |d| d.as_secs_f64() * 1e3),
                retransmits: stats.retransmits,
                retransmits_per_s: (stats.retransmits - r0) as f64 / span_s,
            });
        }
    }
}

/// One round of application work: `a` writes every stream as far as it may and finishes
/// it; `b` accepts and reads everything, hashing as it goes. Returns whether every stream
/// has ended at `b`.
fn pump<E: Streams>(
    a: &mut E,
    b: &mut E,
    workload: &Workload,
    streams: &mut [StreamState],
    index: &HashMap<u16, usize>,
    buf: &mut [u8],
) -> Result<bool, TransferError> {
    for (s, (data, _)) in streams.iter_mut().zip(&workload.payloads) {
        while s.written < data.len() {
            match a.write_stream(s.id, &data[s.written..])? {
                0 => break,
                n => s.written += n,
            }
        }
        if s.written == data.len() && !s.finished {
            a.finish_stream(s.id)?;
            s.finished = true;
        }
    }
    while let Some(id) = b.accept_stream() {
        let i = *index.get(&id).ok_or(TransferError::UnknownStream(id))?;
        streams[i].accepted = true;
    }
    let mut ended = 0;
    for s in streams.iter_mut().filter(|s| s.accepted) {
        while s.digest.is_none() {
            match b.read_stream(s.id, buf)? {
                Read::Data(n) => {
                    s.hasher.update(&buf[..n]);
                    s.received += n;
                }
                Read::End => s.digest = Some(std::mem::take(&mut s.hasher).finalize().into()),
                Read::Blocked => break,
            }
        }
        ended += usize::from(s.digest.is_some());
    }
    Ok(ended == streams.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(loss: f64, seed: u64) -> SimNet {
        SimNet::symmetric(
            LinkConfig::with_rate_rtt_loss(20, Duration::from_millis(60), loss),
            seed,
        )
    }

    /// Runs `lane` in 16 ms frames, as a page at 60 frames a second would, for at most
    /// `limit`.
    fn run_frames<E: Streams>(lane: &mut Lane<E>, t0: Instant, limit: Duration) {
        let mut now = t0;
        while lane.status() == Status::Running && now < t0 + limit {
            now += Duration::from_millis(16);
            assert!(lane.advance(now, usize::MAX));
        }
    }

    #[test]
    fn fabric_lane_completes_at_ten_percent_loss_with_matching_digests() {
        let t0 = Instant::now();
        let work = Rc::new(Workload::new(8, 256 << 10, 1));
        let mut lane = fabric_lane(net(0.10, 1), work.clone(), t0);
        run_frames(&mut lane, t0, Duration::from_secs(60));
        assert_eq!(lane.status(), Status::Complete { verified: true });
        assert_eq!(lane.delivered(), work.total() as u64);
        for r in lane.reports() {
            assert_eq!(r.received_digest, Some(r.sent_digest));
        }
        assert!(lane.protocol_stats().retransmits > 0, "loss was repaired");
        let samples = lane.samples();
        assert!(!samples.is_empty());
        assert!(samples.iter().any(|s| s.goodput_mbit > 1.0));
        assert!(
            samples
                .windows(2)
                .all(|w| w[1].t > w[0].t && w[1].delivered >= w[0].delivered)
        );
    }

    #[test]
    fn baseline_lane_completes_and_is_slower_under_loss() {
        let t0 = Instant::now();
        let work = Rc::new(Workload::new(4, 128 << 10, 2));
        let mut fabric = fabric_lane(net(0.05, 3), work.clone(), t0);
        let mut tcp = baseline_lane(net(0.05, 3), work, t0);
        run_frames(&mut fabric, t0, Duration::from_secs(300));
        run_frames(&mut tcp, t0, Duration::from_secs(300));
        assert_eq!(fabric.status(), Status::Complete { verified: true });
        assert_eq!(tcp.status(), Status::Complete { verified: true });
        assert!(
            tcp.elapsed() > fabric.elapsed(),
            "fabric {:?}, baseline {:?}",
            fabric.elapsed(),
            tcp.elapsed()
        );
    }

    #[test]
    fn a_corrupted_byte_fails_verification() {
        let t0 = Instant::now();
        let work = Rc::new(Workload::new(2, 10_000, 4));
        let mut lane = baseline_lane(net(0.0, 5), work, t0);
        run_frames(&mut lane, t0, Duration::from_secs(10));
        assert_eq!(lane.status(), Status::Complete { verified: true });
        // What the checks would say had one byte differed on the way.
        let mut h = Sha256::new();
        h.update(&lane.workload.payloads[0].0[1..]);
        h.update([0]);
        lane.streams[0].digest = Some(h.finalize().into());
        assert_eq!(lane.status(), Status::Complete { verified: false });
    }

    #[test]
    fn a_lane_that_cannot_keep_up_lags_and_resumes() {
        let t0 = Instant::now();
        let work = Rc::new(Workload::new(2, 64 << 10, 6));
        let mut lane = fabric_lane(net(0.0, 7), work, t0);
        assert!(!lane.advance(t0 + Duration::from_secs(5), 3));
        assert!(lane.pair.now < t0 + Duration::from_secs(5));
        assert!(lane.advance(t0 + Duration::from_secs(5), usize::MAX));
        assert_eq!(lane.status(), Status::Complete { verified: true });
    }
}
