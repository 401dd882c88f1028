//! Goodput and request/response latency of the fabric (mux over a KCP session) on a
//! simulated 100 Mbit/s path, for RTT {2, 40, 200} ms and loss {0, 1, 5, 10, 20} %.
//!
//! Each cell runs 22 virtual seconds: one stream uploads without pause while a second stream
//! carries 1-byte requests, each answered by 1 byte, one at a time. Goodput counts the bulk
//! bytes the receiver read from second 2 to second 22 (after startup), "first 2 s" those of
//! the startup itself (how fast a fresh session finds the path); latency is the time
//! from writing a request to reading its answer. The "alone" columns run the same requests
//! on an otherwise idle session: the latency of a lone interactive flow. Beside a bulk
//! transfer the two streams travel on different KCP lanes of the session, so the request does
//! not wait for the upload's lost segments; it still shares the pacer and the path's queue
//! with it. The path's buffer holds one bandwidth-delay product (at least 64 KB). Virtual time: the figures do not depend on the
//! machine, only the wall-clock column does.
//!
//! `cargo bench -p fabric --features test-util --bench session_sim`

use fabric::connection::Connection;
use fabric::mux::{self, StreamError};
use fabric::session;
use fabric::testing::{LinkConfig, Pair, SimNet};
use fabric::time::{Duration, Instant};

const WARMUP: Duration = Duration::from_secs(2);
const MEASURE: Duration = Duration::from_secs(20);

struct Cell {
    /// Goodput of the first two seconds: how fast a fresh session's pacer finds the path.
    startup_mbit: f64,
    goodput_mbit: f64,
    p50: Duration,
    p99: Duration,
    samples: usize,
    retransmit_pct: f64,
}

fn run(rtt: Duration, loss: f64, seed: u64, with_bulk: bool) -> Cell {
    let t0 = Instant::now();
    let net = SimNet::symmetric(LinkConfig::with_rate_rtt_loss(100, rtt, loss), seed);
    let mut pair: Pair<Connection> =
        Pair::connections(net, session::Config::default(), mux_config(), t0);
    let bulk = pair.a.mux().open().expect("open");
    let rr = pair.a.mux().open().expect("open");
    let chunk = vec![0x5Au8; 256 * 1024];
    let mut buf = vec![0u8; 256 * 1024];
    let (mut bulk_peer, mut rr_peer) = (None, None);
    let mut received = 0usize;
    let mut received_at_warmup = None;
    let mut sent_at: Option<Instant> = None;
    let mut latencies = Vec::new();
    let end = t0 + WARMUP + MEASURE;
    pair.run_until(end, |a, b, now| {
        while with_bulk && a.mux().write(bulk, &chunk).unwrap_or(0) > 0 {}
        while let Some(id) = b.mux().accept() {
            if id == bulk {
                bulk_peer = Some(id);
            } else {
                rr_peer = Some(id);
            }
        }
        if let Some(id) = bulk_peer {
            loop {
                match b.mux().read(id, &mut buf) {
                    Ok(n) if n > 0 => received += n,
                    Ok(_) | Err(StreamError::WouldBlock) => break,
                    Err(e) => panic!("bulk read: {e}"),
                }
            }
        }
        if now >= t0 + WARMUP && received_at_warmup.is_none() {
            received_at_warmup = Some(received);
        }
        if sent_at.is_none() {
            assert_eq!(a.mux().write(rr, b"?").expect("request"), 1);
            sent_at = Some(now);
        }
        if let Some(id) = rr_peer
            && let Ok(1) = b.mux().read(id, &mut buf[..1])
        {
            assert_eq!(b.mux().write(id, b"!").expect("response"), 1);
        }
        if let Ok(1) = a.mux().read(rr, &mut buf[..1]) {
            let sent = sent_at.take().expect("a request was out");
            if sent >= t0 + WARMUP {
                latencies.push(now - sent);
            }
        }
        false
    });
    let bytes = received - received_at_warmup.unwrap_or(0);
    latencies.sort();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(Duration::MAX)
    };
    let stats = pair.a.session().stats();
    Cell {
        startup_mbit: received_at_warmup.unwrap_or(0) as f64 * 8.0 / WARMUP.as_secs_f64() / 1e6,
        goodput_mbit: bytes as f64 * 8.0 / MEASURE.as_secs_f64() / 1e6,
        p50: pct(0.50),
        p99: pct(0.99),
        samples: latencies.len(),
        retransmit_pct: stats.retransmits as f64 * 100.0 / stats.segments_sent.max(1) as f64,
    }
}

fn main() {
    // `cargo bench` passes flags such as --bench; a name filter is not supported here.
    println!(
        "fabric over SimNet: 100 Mbit/s, buffer = 1 BDP, one bulk stream + 1-byte request/response"
    );
    println!(
        "{:>7} {:>6} {:>9} {:>14} {:>10} {:>10} {:>8} {:>8} {:>8} | {:>10} {:>10} {:>8}",
        "rtt",
        "loss",
        "first 2 s",
        "goodput",
        "rr p50",
        "rr p99",
        "p99/rtt",
        "samples",
        "retx",
        "alone p50",
        "alone p99",
        "p99/rtt"
    );
    // SIM_RTT_MS and SIM_LOSS_PCT pick one row or column (e.g. SIM_RTT_MS=40 SIM_LOSS_PCT=5).
    let only = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<f64>().ok());
    let (only_rtt, only_loss) = (only("SIM_RTT_MS"), only("SIM_LOSS_PCT"));
    for rtt_ms in [2u64, 40, 200] {
        if only_rtt.is_some_and(|r| r != rtt_ms as f64) {
            continue;
        }
        for loss in [0.0, 0.01, 0.05, 0.10, 0.20] {
            if only_loss.is_some_and(|l| (l / 100.0 - loss).abs() > 1e-9) {
                continue;
            }
            let wall = Instant::now();
            let rtt = Duration::from_millis(rtt_ms);
            let c = run(rtt, loss, 1, true);
            let alone = run(rtt, loss, 1, false);
            println!(
                "{:>5}ms {:>5.0}% {:>9.1} {:>9.1} Mbit/s {:>8.1}ms {:>8.1}ms {:>8.2} {:>8} {:>7.1}% | {:>8.1}ms {:>8.1}ms {:>8.2}   ({:.1}s wall)",
                rtt_ms,
                loss * 100.0,
                c.startup_mbit,
                c.goodput_mbit,
                c.p50.as_secs_f64() * 1e3,
                c.p99.as_secs_f64() * 1e3,
                c.p99.as_secs_f64() / rtt.as_secs_f64(),
                c.samples,
                c.retransmit_pct,
                alone.p50.as_secs_f64() * 1e3,
                alone.p99.as_secs_f64() * 1e3,
                alone.p99.as_secs_f64() / rtt.as_secs_f64(),
                wall.elapsed().as_secs_f64(),
            );
        }
    }
}

/// The mux window the fabric gives streams over a session: see `connection::mux_config`.
fn mux_config() -> mux::Config {
    fabric::connection::mux_config()
}
