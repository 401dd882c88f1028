//! What one wake of the TUN driver costs the UDP flow table while many flows sit idle: each
//! wake looks up the flow of the datagram that woke it, expires what is due and asks when to
//! wake next (`FlowTable::lookup`, `handle_timeout`, `poll_timeout`, as `driver.rs` does).
//!
//! ```text
//! cargo bench -p netstack --bench udp_timers
//! ```
//!
//! Prints, per number of idle flows: nanoseconds per wake and wakes per second of one core.

#![allow(clippy::print_stdout, missing_docs)]

use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use netstack::udp::FlowTable;
use smoltcp::time::Instant;

/// Wakes measured per table size.
const WAKES: u64 = 20_000;

fn main() {
    println!(
        "{:>10} {:>14} {:>16}",
        "idle flows", "ns per wake", "wakes/s (1 core)"
    );
    for idle_flows in [0u32, 64, 1024, 4096, 16384] {
        let mut table = FlowTable::new(Duration::from_secs(60));
        let t0 = Instant::from_secs(1);
        for i in 0..idle_flows {
            let src = SocketAddr::from((Ipv4Addr::from(0x0a00_0000 + i), 40000));
            table.lookup(t0, src);
        }
        // One busy flow: a datagram every 100 µs, well inside everyone's idle time.
        let busy = SocketAddr::from((Ipv4Addr::new(10, 255, 0, 1), 5353));
        let start = std::time::Instant::now();
        for wake in 0..WAKES {
            let now = t0 + smoltcp::time::Duration::from_micros(100 * wake);
            black_box(table.lookup(now, busy));
            black_box(table.handle_timeout(now));
            black_box(table.poll_timeout());
        }
        let per_wake = start.elapsed().as_nanos() as f64 / WAKES as f64;
        assert_eq!(table.len() as u32, idle_flows + 1, "no flow expired");
        println!("{idle_flows:>10} {per_wake:>14.0} {:>16.0}", 1e9 / per_wake);
    }
}
