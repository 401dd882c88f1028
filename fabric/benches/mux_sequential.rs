//! Sequential SOCKS-like connections through the tokio adapter of the mux, printed as
//! figures: connections per second, failures and hangs (review B1: 9 of 5,000 hung 10 s).
//!
//! `cargo bench -p fabric --bench mux_sequential` makes 5,000 connections (`CONNECTIONS=N`
//! for another count) over `tokio::io::duplex` on a two-worker runtime, once with the exit's
//! relay dropping each stream as soon as it is done, and once with it holding the stream for
//! 1 ms, so that nearly every connection reopens an id the exit still holds (`HOLD_MS=0` or
//! `HOLD_MS=1` for one of the two). A connection that takes over 10 s counts as hung.

#![allow(clippy::print_stdout)]

#[path = "../tests/support/sequential.rs"]
mod sequential;

use std::time::{Duration, Instant};

use fabric::mux::Config;
use fabric::mux::io;

fn main() {
    let n: u64 = std::env::var("CONNECTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    println!("{n} sequential connections through a mux pair over tokio::io::duplex");
    println!(
        "{:<28} {:>10} {:>6} {:>6} {:>6} {:>12}",
        "exit relay", "conn/s", "ok", "failed", "hung", "slowest"
    );
    let only: Option<u64> = std::env::var("HOLD_MS").ok().and_then(|v| v.parse().ok());
    let scenarios = [
        ("drops at once", Duration::ZERO),
        ("holds 1 ms after its FIN", Duration::from_millis(1)),
    ];
    for (label, hold) in scenarios
        .into_iter()
        .filter(|(_, hold)| only.is_none_or(|ms| hold.as_millis() == u128::from(ms)))
    {
        let (outcome, elapsed) = runtime.block_on(async {
            let (left, right) = tokio::io::duplex(256 * 1024);
            let (client, client_driver) = io::spawn(left, Config::default());
            let (exit, exit_driver) = io::spawn(right, Config::default());
            let serving = sequential::serve(exit, hold);
            let started = Instant::now();
            let outcome = sequential::sequential(&client, n, Duration::from_secs(10)).await;
            let elapsed = started.elapsed();
            client.fail("bench over");
            let _ = client_driver.await;
            let _ = exit_driver.await;
            serving.abort();
            (outcome, elapsed)
        });
        println!(
            "{:<28} {:>10.0} {:>6} {:>6} {:>6} {:>12?}",
            label,
            outcome.ok as f64 / elapsed.as_secs_f64(),
            outcome.ok,
            outcome.failed,
            outcome.hung,
            outcome.slowest
        );
    }
}
