//! Sequential SOCKS-like connections through the tokio adapter of the mux (see
//! `support/sequential.rs`); the figures for thousands are `benches/mux_sequential.rs`.

#![cfg(feature = "tokio")]

#[path = "support/sequential.rs"]
mod sequential;

use std::time::Duration;

use fabric::mux::Config;
use fabric::mux::io;

/// Review B1 (9 of 5,000 SOCKS connections hung 10 s): the exit's relay holds each stream a
/// moment after its FIN, so with paused time every next connection reopens the id the exit
/// still holds. Each must still be accepted: none fails, none hangs.
#[tokio::test(start_paused = true)]
async fn sequential_connections_reusing_a_held_id_never_hang() {
    let (left, right) = tokio::io::duplex(256 * 1024);
    let (client, _client_driver) = io::spawn(left, Config::default());
    let (exit, _exit_driver) = io::spawn(right, Config::default());
    let _serving = sequential::serve(exit, Duration::from_millis(1));
    let outcome = sequential::sequential(&client, 500, Duration::from_secs(10)).await;
    assert_eq!(
        outcome,
        sequential::Outcome {
            ok: 500,
            slowest: outcome.slowest,
            ..Default::default()
        }
    );
}
