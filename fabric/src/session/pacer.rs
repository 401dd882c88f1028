//! How fast new data may enter KCP: a model of the path in the style of BBR.
//!
//! KCP without its congestion window (kcptun's `nc = 1`, which random loss makes necessary:
//! a loss-based window collapses at a few percent of loss) sends its whole window at once and
//! overflows the first router buffer on the way. KCP with its window treats every random loss
//! as congestion. Neither works on the lossy paths this fabric is for.
//!
//! The pacer instead measures what the path delivers: the rate at which the peer acknowledges
//! segments and the smallest round-trip time. Every packet the session sends leaves at
//! `gain × max delivery rate`, and what is in flight is capped at two bandwidth-delay
//! products. Gains follow BBR: a startup that grows 2.89× a round until the rate stops growing
//! or the round-trip time swells (a queue is forming), a drain, then a cycle probing 1.25× for
//! one round and draining at 0.75× the next. Random loss lowers each delivery sample by the
//! loss rate, but a probing round still beats the last maximum while `1.25 × (1 − loss) > 1`,
//! so the estimate holds up to about 20 % loss.

use std::collections::VecDeque;

use crate::time::{Duration, Instant};

const STARTUP_GAIN: f64 = 2.885;
const PROBE_GAINS: [f64; 8] = [1.25, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0];
/// Rounds of delivery-rate samples the max filter spans.
const RATE_WINDOW: usize = 10;
/// The smallest RTT is forgotten after this long, so a path that got slower is noticed.
const MIN_RTT_WINDOW: Duration = Duration::from_secs(10);
/// Rate before anything is measured: 32 segments per 100 ms.
const INITIAL_SEGMENTS: f64 = 32.0;
const INITIAL_RTT: Duration = Duration::from_millis(100);
/// In-flight allowance for acknowledgements that arrive in bunches (see `cwnd_segments`).
const ACK_AGGREGATION: Duration = Duration::from_millis(5);
/// Shortest rate-sampling round (see `maybe_end_round`).
const MIN_ROUND: Duration = Duration::from_millis(20);
/// Most loss a delivery sample is scaled up for (see `maybe_end_round`).
const MAX_CREDITED_LOSS: f64 = 0.3;
/// Rate the pacer never goes below, so a session can always recover: 16 KB/s.
const MIN_RATE: f64 = 16_000.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Startup,
    Drain,
    ProbeBandwidth(usize),
}

/// The pacer of one session. All rates in bytes per second.
#[derive(Debug)]
pub(crate) struct Pacer {
    mss: usize,
    phase: Phase,
    /// Delivery-rate samples of recent rounds, newest last.
    samples: VecDeque<f64>,
    min_rtt: Option<(Duration, Instant)>,
    round_start: Instant,
    round_acked: usize,
    /// Whether sending was held back by the pacer or the window at some point this round: a
    /// round in which it never was says little about the path, only about the application.
    round_capped: bool,
    round_max_rtt: Duration,
    /// Transmission totals now and at the start of the round, for the round's loss rate.
    totals: (u64, u64),
    round_totals: (u64, u64),
    /// Best rate at the last startup check, and rounds without 25 % growth since.
    startup_best: f64,
    startup_flat_rounds: u32,
    tokens: f64,
    tokens_at: Instant,
}

impl Pacer {
    pub(crate) fn new(now: Instant, mss: usize) -> Self {
        Self {
            mss,
            phase: Phase::Startup,
            samples: VecDeque::with_capacity(RATE_WINDOW),
            min_rtt: None,
            round_start: now,
            round_acked: 0,
            round_capped: false,
            round_max_rtt: Duration::ZERO,
            totals: (0, 0),
            round_totals: (0, 0),
            startup_best: 0.0,
            startup_flat_rounds: 0,
            tokens: INITIAL_SEGMENTS * mss as f64,
            tokens_at: now,
        }
    }

    /// The peer acknowledged `segments` data segments; `sent` and `resent` are the session's
    /// running totals of first transmissions and retransmissions.
    pub(crate) fn on_acked(&mut self, now: Instant, segments: usize, sent: u64, resent: u64) {
        self.round_acked += segments * self.mss;
        self.totals = (sent, resent);
        self.maybe_end_round(now);
    }

    /// A round-trip time was measured.
    pub(crate) fn on_rtt(&mut self, now: Instant, rtt: Duration) {
        let rtt = rtt.max(Duration::from_millis(1));
        self.round_max_rtt = self.round_max_rtt.max(rtt);
        let stale = self
            .min_rtt
            .is_none_or(|(m, at)| rtt <= m || now.saturating_duration_since(at) > MIN_RTT_WINDOW);
        if stale {
            self.min_rtt = Some((rtt, now));
        }
    }

    fn rtt(&self) -> Duration {
        self.min_rtt.map_or(INITIAL_RTT, |(m, _)| m)
    }

    /// The largest recent delivery rate, or the initial guess.
    pub(crate) fn bandwidth(&self) -> f64 {
        let measured = self.samples.iter().copied().fold(0.0, f64::max);
        let initial = INITIAL_SEGMENTS * self.mss as f64 / INITIAL_RTT.as_secs_f64();
        if measured > 0.0 { measured } else { initial }
    }

    fn gain(&self) -> f64 {
        match self.phase {
            Phase::Startup => STARTUP_GAIN,
            Phase::Drain => 1.0 / STARTUP_GAIN,
            Phase::ProbeBandwidth(i) => PROBE_GAINS[i],
        }
    }

    /// The rate new data is admitted at.
    pub(crate) fn pacing_rate(&self) -> f64 {
        (self.gain() * self.bandwidth()).max(MIN_RATE)
    }

    /// Segments that may be in flight: two bandwidth-delay products, as BBR allows, plus an
    /// allowance for acknowledgements that come back in bunches, and never fewer than a
    /// startup burst.
    ///
    /// The allowance matters where the propagation delay is tiny and the round trip is mostly
    /// processing: over Tox on one machine the smallest RTT reads 1 ms while a loaded round
    /// trip takes 5-7 ms in the Tox threads, and two bandwidth-delay products alone held a
    /// session to a third of what the path carries. BBR adds its `extra_acked` for the same
    /// reason.
    pub(crate) fn cwnd_segments(&self) -> usize {
        let bw = self.bandwidth();
        let bdp = bw * self.rtt().as_secs_f64() / self.mss as f64;
        let gain = if self.phase == Phase::Startup {
            STARTUP_GAIN
        } else {
            2.0
        };
        let aggregation = bw * ACK_AGGREGATION.as_secs_f64() / self.mss as f64;
        ((bdp * gain + aggregation) as usize).max(2 * INITIAL_SEGMENTS as usize)
    }

    fn burst(&self) -> f64 {
        // Enough to cover a driver's timer granularity (about a millisecond) without
        // letting a long pause turn into a line-rate burst.
        (self.pacing_rate() * 0.002).max(16.0 * self.mss as f64)
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.tokens_at).as_secs_f64();
        self.tokens = (self.tokens + dt * self.pacing_rate()).min(self.burst());
        self.tokens_at = self.tokens_at.max(now);
    }

    /// Whether a packet of `bytes` may leave at `now`. Tokens may go negative by one packet,
    /// so a packet larger than the burst still leaves.
    pub(crate) fn may_send(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens > 0.0
    }

    /// A packet of `bytes` left.
    pub(crate) fn on_sent(&mut self, bytes: usize) {
        self.tokens -= bytes as f64;
    }

    /// Sending was held back by the pacer or the window: the path, not the application, is
    /// the limit this round.
    pub(crate) fn on_limited(&mut self) {
        self.round_capped = true;
    }

    /// When the next packet may leave.
    pub(crate) fn next_send_at(&self) -> Instant {
        if self.tokens > 0.0 {
            return self.tokens_at;
        }
        // Just past the point where tokens turn positive again.
        let missing = -self.tokens + 1.0;
        self.tokens_at + Duration::from_secs_f64(missing / self.pacing_rate())
    }

    fn maybe_end_round(&mut self, now: Instant) {
        let length = now.saturating_duration_since(self.round_start);
        // At least two round trips, and at least 20 ms: over a fast path a round of two
        // milliseconds samples the bursts in which packets are processed, not the rate.
        if length < (self.rtt() * 2).max(MIN_ROUND) {
            return;
        }
        let swollen = self.round_max_rtt > self.rtt() * 3 / 2 + Duration::from_millis(2);
        let mut sample = self.round_acked as f64 / length.as_secs_f64();
        // Random loss lowers every sample by the loss rate, and past about 20 % the 1.25
        // probe no longer lifts the estimate: it spirals down. Losses while the round trip has
        // not swollen come from the path, not from a queue this session filled, so the sample
        // is scaled back up by them. With a swollen round trip, loss is congestion: no credit.
        let sent = self.totals.0.saturating_sub(self.round_totals.0);
        let resent = self.totals.1.saturating_sub(self.round_totals.1);
        self.round_totals = self.totals;
        if !swollen && sent + resent > 0 {
            let loss = (resent as f64 / (sent + resent) as f64).min(MAX_CREDITED_LOSS);
            sample /= 1.0 - loss;
        }
        // An application-limited round only counts when it beats what we know.
        if self.round_capped || sample > self.bandwidth() || self.samples.is_empty() {
            if self.samples.len() == RATE_WINDOW {
                self.samples.pop_front();
            }
            self.samples.push_back(sample);
        }
        self.round_start = now;
        self.round_acked = 0;
        self.round_capped = false;
        self.round_max_rtt = Duration::ZERO;
        self.next_phase(swollen);
    }

    fn next_phase(&mut self, rtt_swollen: bool) {
        self.phase = match self.phase {
            Phase::Startup => {
                let bw = self.bandwidth();
                let growing = bw >= self.startup_best * 1.25;
                if growing {
                    self.startup_best = bw;
                    self.startup_flat_rounds = 0;
                } else {
                    self.startup_flat_rounds += 1;
                }
                // A swollen round trip says a queue is forming only while the delivery rate
                // has stopped growing too: on a fast path one scheduling hiccup of a few
                // milliseconds swells it, and leaving startup on that alone left a fresh
                // session at 20 Mbit/s for seconds (probing adds only 25 % per cycle).
                if self.startup_flat_rounds >= 3 || (rtt_swollen && !growing) {
                    Phase::Drain
                } else {
                    Phase::Startup
                }
            }
            Phase::Drain => Phase::ProbeBandwidth(0),
            Phase::ProbeBandwidth(i) => Phase::ProbeBandwidth((i + 1) % PROBE_GAINS.len()),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds the pacer a path of `rate` bytes/s and `rtt`, acking everything it sends after
    /// one RTT, and returns the pacing rate it settles on.
    fn settle(rate: f64, rtt: Duration) -> f64 {
        simulate(rate, rtt, 20_000, None)
    }

    /// As `settle`, for `steps` milliseconds; at step `hiccup` (if any) one RTT sample reads
    /// 10 ms, as when a scheduler delays the peer once.
    fn simulate(rate: f64, rtt: Duration, steps: usize, hiccup: Option<usize>) -> f64 {
        let mss = 1000;
        let t0 = Instant::now();
        let mut p = Pacer::new(t0, mss);
        let step = Duration::from_millis(1);
        let mut now = t0;
        let mut in_flight: VecDeque<(Instant, usize)> = VecDeque::new();
        let mut queue_free_at = t0;
        for i in 0..steps {
            now += step;
            if hiccup == Some(i) {
                p.on_rtt(now, Duration::from_millis(10));
            }
            // The application always has more than the pacer lets out.
            while p.may_send(now) {
                p.on_sent(mss);
                // A bottleneck of `rate`: each segment leaves after the previous one.
                queue_free_at = queue_free_at.max(now) + Duration::from_secs_f64(mss as f64 / rate);
                in_flight.push_back((queue_free_at + rtt, 1));
            }
            p.on_limited();
            while in_flight.front().is_some_and(|(at, _)| *at <= now) {
                let (_, n) = in_flight.pop_front().unwrap();
                p.on_acked(now, n, 0, 0);
                p.on_rtt(now, rtt + queue_free_at.saturating_duration_since(now));
            }
        }
        p.bandwidth()
    }

    #[test]
    fn finds_the_bottleneck_rate() {
        for (rate, rtt_ms) in [(1_250_000.0, 40), (12_500_000.0, 40), (12_500_000.0, 200)] {
            let bw = settle(rate, Duration::from_millis(rtt_ms));
            assert!(
                bw > rate * 0.85 && bw < rate * 1.3,
                "rate {rate} rtt {rtt_ms}: estimated {bw}"
            );
        }
    }

    /// A fresh session on a fast path (50 MB/s, 1 ms) whose first round sees one delayed
    /// acknowledgement still finds the path within a quarter of a second: a swollen RTT ends
    /// startup only once the rate stops growing (it once held cold sessions at a twentieth
    /// of the path for seconds).
    #[test]
    fn startup_survives_a_hiccup_while_the_rate_grows() {
        let rate = 50_000_000.0;
        let rtt = Duration::from_millis(1);
        let smooth = simulate(rate, rtt, 250, None);
        let hiccup = simulate(rate, rtt, 250, Some(5));
        assert!(smooth > rate * 0.7, "smooth startup reached {smooth}");
        assert!(
            hiccup > rate * 0.7,
            "startup with a hiccup reached {hiccup}"
        );
    }

    #[test]
    fn tokens_are_bounded_and_refill() {
        let t0 = Instant::now();
        let mut p = Pacer::new(t0, 1000);
        let mut sent = 0;
        while p.may_send(t0) {
            p.on_sent(1000);
            sent += 1;
        }
        // The first flight is one burst: 16 segments at the initial rate.
        assert_eq!(sent, 16);
        let later = p.next_send_at();
        assert!(later > t0);
        assert!(p.may_send(later));
        // A long pause does not build up an unbounded burst.
        let mut burst = 0;
        let t1 = t0 + Duration::from_secs(100);
        while p.may_send(t1) {
            p.on_sent(1000);
            burst += 1;
        }
        assert!(burst as f64 <= p.burst() / 1000.0 + 1.0, "{burst}");
    }
}
