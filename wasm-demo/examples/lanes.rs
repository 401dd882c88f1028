//! The demo's two lanes in virtual time, without a browser: how long the same transfer takes
//! over the fabric and over the TCP-like baseline, per loss level, with the page's default
//! link (20 Mbit/s, 30 ms one-way delay, 2 ms jitter) and 8 streams of 512 KiB.
//!
//! `cargo run --release -p wasm-demo --example lanes`

use fabric::time::{Duration, Instant};
use wasm_demo::demo::{Demo, Settings};
use wasm_demo::lane::Status;

fn main() {
    println!(
        "{:>5} {:>12} {:>12} {:>12} {:>12} {:>8}",
        "loss", "fabric", "fabric retx", "baseline", "base retx", "ratio"
    );
    for loss in [0.0, 0.01, 0.02, 0.05, 0.10, 0.20] {
        let t0 = Instant::now();
        let mut demo = Demo::new(t0);
        demo.set(Settings {
            loss,
            ..Settings::default()
        });
        demo.start();
        let mut now = t0;
        // 60 frames a second, at most 20 simulated minutes.
        for _ in 0..(20 * 60 * 60) {
            now += Duration::from_micros(16_667);
            demo.tick(now, usize::MAX);
            let run = demo.run().expect("started");
            if run.fabric.status() != Status::Running && run.baseline.status() != Status::Running {
                break;
            }
        }
        let run = demo.run_mut().expect("started");
        let show = |status: Status, elapsed: Duration| match status {
            Status::Complete { verified: true } => format!("{:.2} s", elapsed.as_secs_f64()),
            Status::Running => "unfinished".to_string(),
            other => format!("{other:?}"),
        };
        let (fs, fe) = (run.fabric.status(), run.fabric.elapsed());
        let (bs, be) = (run.baseline.status(), run.baseline.elapsed());
        let fr = run.fabric.protocol_stats().retransmits;
        let br = run.baseline.protocol_stats().retransmits;
        let ratio = match bs {
            Status::Running => "-".to_string(),
            _ => format!("{:.1}x", be.as_secs_f64() / fe.as_secs_f64()),
        };
        println!(
            "{:>4.0}% {:>12} {:>12} {:>12} {:>12} {:>8}",
            loss * 100.0,
            show(fs, fe),
            fr,
            show(bs, be),
            br,
            ratio
        );
    }
}
