//! The surface the page calls through `wasm-bindgen`: a [`WebDemo`] that reads the page's
//! clock (`performance.now()`, through [`fabric::time::Instant`]) on every tick, and flat
//! views of its lanes for the charts.
//!
//! Lanes are numbered: [`FABRIC`] and [`BASELINE`].

use wasm_bindgen::prelude::wasm_bindgen;

use fabric::time::{Duration, Instant};

use crate::demo::{Demo, Settings};
use crate::lane::{Lane, Sample, Status, Streams};

/// Lane number of the fabric (mux over a KCP session).
pub const FABRIC: u32 = 0;
/// Lane number of the TCP-like baseline.
pub const BASELINE: u32 = 1;
/// Numbers per sample in [`WebDemo::samples`]: seconds, bytes delivered, goodput (Mbit/s),
/// RTT (ms), retransmissions so far, retransmissions per second.
pub const SAMPLE_FIELDS: usize = 6;

/// The demo as the page sees it.
#[wasm_bindgen]
#[derive(Debug)]
pub struct WebDemo {
    demo: Demo,
    /// Protocol steps per lane per tick, adapted so a tick takes about [`TICK_WORK`].
    budget: usize,
}

/// How long one tick may step the protocols: most of a 60 Hz frame, the rest for drawing.
const TICK_WORK: Duration = Duration::from_millis(10);
/// Bounds of the step budget.
const BUDGET: (usize, usize) = (100, 1_000_000);

/// One lane's counters at the last tick.
#[wasm_bindgen]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LaneView {
    /// Seconds since the transfer started (until it ended).
    pub elapsed_s: f64,
    /// Bytes the receiver has read.
    pub delivered: f64,
    /// Bytes to move.
    pub total: f64,
    /// Smoothed RTT, ms (0 before the first measurement).
    pub rtt_ms: f64,
    /// Data segments sent again.
    pub retransmits: f64,
    /// Data segments sent the first time.
    pub segments_sent: f64,
    /// Packets the links dropped at random, both directions.
    pub link_lost: f64,
    /// Packets the bottleneck queues dropped, both directions.
    pub queue_drops: f64,
    /// Packets handed to the links, both directions.
    pub link_sent: f64,
    /// Every stream ended.
    pub complete: bool,
    /// Every stream ended with the length and SHA-256 that was sent.
    pub verified: bool,
    /// The transfer stopped on an error ([`WebDemo::status_text`] says which).
    pub failed: bool,
}

impl Default for WebDemo {
    fn default() -> Self {
        Self::new()
    }
}

#[wasm_bindgen]
impl WebDemo {
    /// A demo with default settings, nothing running.
    #[wasm_bindgen(constructor)]
    pub fn new() -> Self {
        Self {
            demo: Demo::new(Instant::now()),
            budget: 2_000,
        }
    }

    /// Sets the controls: loss in percent, delays in milliseconds, bandwidth in Mbit/s, the
    /// stream count and size (KiB) and seed for the next start, and the time scale.
    #[allow(clippy::too_many_arguments)] // one argument per control of the page
    pub fn configure(
        &mut self,
        loss_pct: f64,
        delay_ms: f64,
        jitter_ms: f64,
        bandwidth_mbit: f64,
        streams: u32,
        stream_kib: u32,
        seed: u32,
        speed: f64,
    ) {
        let ms = |v: f64| Duration::from_secs_f64(v.clamp(0.0, 10_000.0) / 1e3);
        self.demo.set(Settings {
            loss: loss_pct / 100.0,
            delay: ms(delay_ms),
            jitter: ms(jitter_ms),
            bandwidth_mbit: bandwidth_mbit.clamp(0.1, 1000.0),
            streams: streams.clamp(1, 64) as usize,
            stream_size: stream_kib.clamp(1, 16 << 10) as usize * 1024,
            seed: u64::from(seed),
            speed,
        });
    }

    /// Starts a transfer on both lanes.
    pub fn start(&mut self) {
        self.demo.start();
    }

    /// Advances both lanes to the page's clock, within this frame's share of work.
    pub fn tick(&mut self) {
        let start = Instant::now();
        let before = self.demo.steps();
        self.demo.tick(start, self.budget);
        let steps = self.demo.steps() - before;
        self.budget = next_budget(self.budget, steps, Instant::now() - start);
    }

    /// Whether a lane is still moving bytes.
    pub fn running(&self) -> bool {
        self.demo.run().is_some_and(|r| {
            r.fabric.status() == Status::Running || r.baseline.status() == Status::Running
        })
    }

    /// Whether a lane fell behind the clock in the last tick (the machine is too slow for
    /// the chosen rate and speed).
    pub fn lagging(&self) -> bool {
        self.demo.lagging()
    }

    /// A lane's counters; `undefined` before the first start.
    pub fn lane(&mut self, lane: u32) -> Option<LaneView> {
        let run = self.demo.run_mut()?;
        let total = run.total as f64;
        Some(match lane {
            FABRIC => view(&mut run.fabric, total),
            _ => view(&mut run.baseline, total),
        })
    }

    /// "running", "complete", "complete, checksum mismatch" or "failed: …".
    pub fn status_text(&self, lane: u32) -> String {
        let Some(run) = self.demo.run() else {
            return "idle".into();
        };
        let status = match lane {
            FABRIC => run.fabric.status(),
            _ => run.baseline.status(),
        };
        match status {
            Status::Running => "running".into(),
            Status::Complete { verified: true } => "complete".into(),
            Status::Complete { verified: false } => "complete, checksum mismatch".into(),
            Status::Failed(e) => format!("failed: {e}"),
        }
    }

    /// Samples from index `from` on, [`SAMPLE_FIELDS`] numbers each.
    pub fn samples(&self, lane: u32, from: u32) -> Vec<f64> {
        let Some(run) = self.demo.run() else {
            return Vec::new();
        };
        let samples = match lane {
            FABRIC => run.fabric.samples(),
            _ => run.baseline.samples(),
        };
        flatten(samples.get(from as usize..).unwrap_or_default())
    }

    /// Numbers per sample in [`WebDemo::samples`].
    pub fn sample_fields() -> u32 {
        SAMPLE_FIELDS as u32
    }

    /// Each stream's received fraction, 0..=1.
    pub fn progress(&self, lane: u32) -> Vec<f64> {
        let Some(run) = self.demo.run() else {
            return Vec::new();
        };
        let reports = match lane {
            FABRIC => run.fabric.reports(),
            _ => run.baseline.reports(),
        };
        reports
            .iter()
            .map(|r| r.received as f64 / r.size.max(1) as f64)
            .collect()
    }

    /// Each stream's SHA-256, sent and received (empty until it ended), as a JSON array of
    /// `{"sent": hex, "received": hex}`.
    pub fn digests(&self, lane: u32) -> String {
        let Some(run) = self.demo.run() else {
            return "[]".into();
        };
        let reports = match lane {
            FABRIC => run.fabric.reports(),
            _ => run.baseline.reports(),
        };
        let items: Vec<String> = reports
            .iter()
            .map(|r| {
                format!(
                    r#"{{"sent":"{}","received":"{}"}}"#,
                    hex(&r.sent_digest),
                    r.received_digest
                        .as_ref()
                        .map(|d| hex(d))
                        .unwrap_or_default()
                )
            })
            .collect();
        format!("[{}]", items.join(","))
    }
}

fn view<E: Streams>(lane: &mut Lane<E>, total: f64) -> LaneView {
    let stats = lane.protocol_stats();
    let (there, back) = lane.link_stats();
    let status = lane.status();
    LaneView {
        elapsed_s: lane.elapsed().as_secs_f64(),
        delivered: lane.delivered() as f64,
        total,
        rtt_ms: stats.srtt.map_or(0.0, |d| d.as_secs_f64() * 1e3),
        retransmits: stats.retransmits as f64,
        segments_sent: stats.segments_sent as f64,
        link_lost: (there.lost + back.lost) as f64,
        queue_drops: (there.queue_drops + back.queue_drops) as f64,
        link_sent: (there.sent + back.sent) as f64,
        complete: matches!(status, Status::Complete { .. }),
        verified: status == Status::Complete { verified: true },
        failed: matches!(status, Status::Failed(_)),
    }
}

/// The step budget for the next tick, from how long `steps` took in this one.
fn next_budget(budget: usize, steps: u64, took: Duration) -> usize {
    if steps == 0 {
        return budget;
    }
    let target = if took.is_zero() {
        // Below the clock's resolution (browsers coarsen performance.now()).
        budget.saturating_mul(2)
    } else {
        (steps as f64 * TICK_WORK.as_secs_f64() / took.as_secs_f64()) as usize
    };
    // Half-way there each frame: one slow frame (a GC pause) does not halve the work.
    ((budget + target) / 2).clamp(BUDGET.0, BUDGET.1)
}

fn flatten(samples: &[Sample]) -> Vec<f64> {
    samples
        .iter()
        .flat_map(|s| {
            [
                s.t,
                s.delivered as f64,
                s.goodput_mbit,
                s.rtt_ms,
                s.retransmits as f64,
                s.retransmits_per_s,
            ]
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_json_with_hex_and_samples_have_the_stride() {
        let t0 = Instant::now();
        let mut web = WebDemo {
            demo: Demo::new(t0),
            budget: usize::MAX,
        };
        assert_eq!(web.digests(FABRIC), "[]");
        assert!(web.lane(FABRIC).is_none());
        web.configure(0.0, 5.0, 0.0, 50.0, 2, 16, 9, 1.0);
        web.start();
        let mut now = t0;
        for _ in 0..200 {
            now += Duration::from_millis(16);
            web.demo.tick(now, usize::MAX);
        }
        let digests = web.digests(FABRIC);
        assert!(digests.starts_with(r#"[{"sent":""#), "{digests}");
        assert_eq!(digests.matches(r#""sent":""#).count(), 2);
        assert_eq!(web.status_text(FABRIC), "complete");
        let view = web.lane(FABRIC).unwrap();
        assert!(view.verified && view.complete && !view.failed);
        assert_eq!(view.delivered, view.total);
        assert_eq!(view.total, 2.0 * 16.0 * 1024.0);
        assert_eq!(web.samples(FABRIC, 0).len() % SAMPLE_FIELDS, 0);
        assert_eq!(web.progress(BASELINE), vec![1.0, 1.0]);
    }

    #[test]
    fn the_budget_follows_the_time_steps_take() {
        let ms = Duration::from_millis;
        assert_eq!(next_budget(1000, 1000, ms(10)), 1000);
        assert_eq!(next_budget(1000, 1000, ms(40)), (1000 + 250) / 2);
        assert_eq!(next_budget(1000, 500, ms(1)), (1000 + 5000) / 2);
        assert_eq!(next_budget(1000, 1000, Duration::ZERO), 1500);
        assert_eq!(
            next_budget(1000, 0, ms(5)),
            1000,
            "idle ticks teach nothing"
        );
        assert_eq!(next_budget(100, 1, ms(1000)), BUDGET.0);
    }
}
