//! The page's model: the link settings, the workload, and the two lanes that move it, kept in
//! step with the page's clock.
//!
//! The page calls [`Demo::tick`] once per animation frame with the current time. The demo's
//! clock advances by the time since the last frame (at most [`MAX_FRAME`], so a hidden tab does
//! not come back to a burst of simulated minutes), and each lane runs every protocol event up
//! to that clock at its exact simulated time: the sessions see the same timings they would see
//! on a real path, however irregular the frames are.
//!
//! A tick takes at most a given number of protocol steps, so a frame stays short on a slow
//! machine. A lane that runs out of steps lags; the clock then waits for it, and the whole
//! simulation runs slower than real time (the page says so) instead of falling ever further
//! behind.

use std::rc::Rc;

use fabric::connection::Connection;
use fabric::testing::{LinkConfig, SimNet};
use fabric::time::{Duration, Instant};

use crate::baseline::Baseline;
use crate::lane::{self, Lane, Status, Workload};

/// Longest stretch of time one frame may advance the simulation.
pub const MAX_FRAME: Duration = Duration::from_millis(100);

/// What the page's controls set.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Packet loss in each direction, 0..=1.
    pub loss: f64,
    /// One-way delay.
    pub delay: Duration,
    /// Extra one-way delay drawn per packet from `0..=jitter`.
    pub jitter: Duration,
    /// Bottleneck rate in each direction, Mbit/s.
    pub bandwidth_mbit: f64,
    /// Streams in the transfer.
    pub streams: usize,
    /// Bytes per stream.
    pub stream_size: usize,
    /// Seed of the payloads and of the links' randomness (the same for both lanes).
    pub seed: u64,
    /// Simulated seconds per second of the page's clock.
    pub speed: f64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            loss: 0.02,
            delay: Duration::from_millis(30),
            jitter: Duration::from_millis(2),
            bandwidth_mbit: 20.0,
            streams: 8,
            stream_size: 512 << 10,
            seed: 1,
            speed: 1.0,
        }
    }
}

impl Settings {
    /// One direction of the path: the bottleneck buffer holds one bandwidth-delay product
    /// (at least 64 KiB), as [`LinkConfig::with_rate_rtt_loss`] sizes it.
    pub fn link(&self) -> LinkConfig {
        let bps = (self.bandwidth_mbit.max(0.01) * 1e6) as u64;
        let bdp = (bps as f64 / 8.0 * (self.delay * 2).as_secs_f64()) as usize;
        LinkConfig {
            bandwidth_bps: Some(bps),
            queue_limit: bdp.max(64 * 1024),
            delay: self.delay,
            jitter: self.jitter,
            loss: self.loss.clamp(0.0, 1.0),
            ..LinkConfig::default()
        }
    }
}

/// Both lanes of a running (or finished) transfer.
#[derive(Debug)]
pub struct Run {
    /// The fabric: mux over a KCP session.
    pub fabric: Lane<Connection>,
    /// The TCP-like baseline.
    pub baseline: Lane<Baseline>,
    /// Bytes moved per lane.
    pub total: usize,
}

/// The demo.
#[derive(Debug)]
pub struct Demo {
    settings: Settings,
    /// The simulation's clock.
    clock: Instant,
    /// The page's clock at the last tick.
    last_tick: Instant,
    run: Option<Run>,
    /// Whether a lane fell behind the clock in the last tick.
    lagging: bool,
}

impl Demo {
    /// A demo with default settings and nothing running, its clock starting at `now`.
    pub fn new(now: Instant) -> Self {
        Self {
            settings: Settings::default(),
            clock: now,
            last_tick: now,
            run: None,
            lagging: false,
        }
    }

    /// The settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Changes the settings. Link settings apply at once to a running transfer; stream count,
    /// size and seed apply to the next [`Demo::start`].
    pub fn set(&mut self, settings: Settings) {
        if let Some(run) = &mut self.run {
            let link = settings.link();
            run.fabric.set_link(&link);
            run.baseline.set_link(&link);
        }
        self.settings = settings;
    }

    /// Starts a transfer on both lanes, replacing any running one.
    pub fn start(&mut self) {
        let s = &self.settings;
        let workload = Rc::new(Workload::new(s.streams, s.stream_size, s.seed));
        let total = workload.total();
        // The same link and the same seed: both lanes draw their losses from identical
        // random sequences.
        let net = || SimNet::symmetric(s.link(), s.seed);
        self.run = Some(Run {
            fabric: lane::fabric_lane(net(), workload.clone(), self.clock),
            baseline: lane::baseline_lane(net(), workload, self.clock),
            total,
        });
    }

    /// Advances to the page's clock `now`, taking at most `max_steps` protocol steps in each
    /// lane.
    pub fn tick(&mut self, now: Instant, max_steps: usize) {
        let elapsed = now.saturating_duration_since(self.last_tick).min(MAX_FRAME);
        self.last_tick = now;
        self.clock += elapsed.mul_f64(self.settings.speed.clamp(0.0, 100.0));
        self.lagging = false;
        let Some(run) = &mut self.run else {
            return;
        };
        let mut behind = None::<Instant>;
        if run.fabric.status() == Status::Running && !run.fabric.advance(self.clock, max_steps) {
            behind = Some(run.fabric.reached());
        }
        if run.baseline.status() == Status::Running && !run.baseline.advance(self.clock, max_steps)
        {
            let reached = run.baseline.reached();
            behind = Some(behind.map_or(reached, |b| b.min(reached)));
        }
        if let Some(reached) = behind {
            self.lagging = true;
            self.clock = self.clock.min(reached);
        }
    }

    /// Protocol steps both lanes have taken so far.
    pub fn steps(&self) -> u64 {
        self.run
            .as_ref()
            .map_or(0, |r| r.fabric.steps() + r.baseline.steps())
    }

    /// The current transfer, if one was started.
    pub fn run(&self) -> Option<&Run> {
        self.run.as_ref()
    }

    /// The current transfer, mutably (for the protocol counters).
    pub fn run_mut(&mut self) -> Option<&mut Run> {
        self.run.as_mut()
    }

    /// Whether a lane could not keep up with the clock in the last tick.
    pub fn lagging(&self) -> bool {
        self.lagging
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_at_sixty_frames_complete_both_lanes() {
        let t0 = Instant::now();
        let mut demo = Demo::new(t0);
        demo.set(Settings {
            loss: 0.10,
            streams: 4,
            stream_size: 64 << 10,
            ..Settings::default()
        });
        demo.start();
        let mut now = t0;
        for _ in 0..(120 * 60) {
            now += Duration::from_micros(16_667);
            demo.tick(now, usize::MAX);
        }
        let run = demo.run().unwrap();
        assert_eq!(run.fabric.status(), Status::Complete { verified: true });
        assert_eq!(run.baseline.status(), Status::Complete { verified: true });
        assert_eq!(run.total, 4 * (64 << 10));
    }

    #[test]
    fn a_long_pause_advances_the_simulation_by_one_frame_at_most() {
        let t0 = Instant::now();
        let mut demo = Demo::new(t0);
        demo.start();
        demo.tick(t0 + Duration::from_secs(3600), usize::MAX);
        let run = demo.run().unwrap();
        assert_eq!(run.fabric.samples().len(), 1, "100 ms: one sample");
        assert!(run.fabric.elapsed() <= MAX_FRAME);
    }

    #[test]
    fn link_changes_reach_a_running_transfer() {
        let t0 = Instant::now();
        let mut demo = Demo::new(t0);
        demo.set(Settings {
            loss: 0.0,
            ..Settings::default()
        });
        demo.start();
        demo.tick(t0 + Duration::from_millis(50), usize::MAX);
        demo.set(Settings {
            loss: 1.0,
            ..Settings::default()
        });
        let mut now = t0 + Duration::from_millis(50);
        let before = demo.run().unwrap().fabric.delivered();
        // In-flight packets land within a round trip; after that nothing gets through.
        for _ in 0..20 {
            now += Duration::from_millis(100);
            demo.tick(now, usize::MAX);
        }
        let mid = demo.run().unwrap().fabric.delivered();
        for _ in 0..20 {
            now += Duration::from_millis(100);
            demo.tick(now, usize::MAX);
        }
        assert_eq!(demo.run().unwrap().fabric.delivered(), mid);
        assert!(mid >= before);
        let (a_to_b, _) = demo.run().unwrap().fabric.link_stats();
        assert!(a_to_b.lost > 0);
    }

    #[test]
    fn a_step_budget_slows_the_clock_instead_of_piling_up_lag() {
        let t0 = Instant::now();
        let mut demo = Demo::new(t0);
        demo.set(Settings {
            loss: 0.0,
            bandwidth_mbit: 100.0,
            ..Settings::default()
        });
        demo.start();
        let mut now = t0;
        for _ in 0..100 {
            now += Duration::from_millis(100);
            demo.tick(now, 20);
            assert!(demo.lagging());
            assert!(demo.steps() > 0);
        }
        // 10 s of page time, but at 20 steps a frame the simulation is far behind, and the
        // clock waited for it rather than running ahead.
        assert!(
            demo.clock - t0 < Duration::from_secs(2),
            "{:?}",
            demo.clock - t0
        );
        let run = demo.run().unwrap();
        assert!(demo.clock <= run.fabric.reached().max(run.baseline.reached()));
        assert!(run.fabric.steps() <= 100 * 21);
        // With the budget lifted it catches up and finishes.
        for _ in 0..300 {
            now += Duration::from_millis(100);
            demo.tick(now, usize::MAX);
        }
        assert!(!demo.lagging());
        assert_eq!(
            demo.run().unwrap().fabric.status(),
            Status::Complete { verified: true }
        );
    }
}
