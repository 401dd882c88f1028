//! What one wake of the TUN driver costs the UDP flow table while many flows sit idle: each
//! wake looks up the flow of the datagram that woke it, expires what is due and asks when to
//! wake next (`FlowTable::lookup`, `handle_timeout`, `poll_timeout`, as `driver.rs` does).
//!
//! ```text
//! cargo bench -p netstack --bench udp_timers
//! ```
//!
//! Prints, per number of idle flows: nanoseconds per wake and wakes per second of one core.
//! Then the same for idle TCP flows, whose timers live in smoltcp: each wake runs
//! `Stack::poll` and `Stack::poll_timeout`, which walk smoltcp's socket set.

#![allow(clippy::print_stdout, missing_docs)]

use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use netstack::stack::{Event, Stack, StackConfig};
use netstack::udp::FlowTable;
use smoltcp::time::Instant;

/// Wakes measured per UDP table size (10 µs apart: 10 s, well inside the idle time).
const UDP_WAKES: u64 = 1_000_000;
/// Wakes measured per number of TCP flows (each costs far more).
const WAKES: u64 = 20_000;

fn main() {
    udp();
    tcp();
}

fn udp() {
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
        // One busy flow: a datagram every 10 µs.
        let busy = SocketAddr::from((Ipv4Addr::new(10, 255, 0, 1), 5353));
        let start = std::time::Instant::now();
        for wake in 0..UDP_WAKES {
            let now = t0 + smoltcp::time::Duration::from_micros(10 * wake);
            black_box(table.lookup(now, busy));
            black_box(table.handle_timeout(now));
            black_box(table.poll_timeout());
        }
        let per_wake = start.elapsed().as_nanos() as f64 / UDP_WAKES as f64;
        assert_eq!(table.len() as u32, idle_flows + 1, "no flow expired");
        println!("{idle_flows:>10} {per_wake:>14.0} {:>16.0}", 1e9 / per_wake);
    }
}

/// An IPv4 TCP segment from `src` to `dst` without checksums (the stack verifies none: its
/// packets come from the local kernel).
fn segment(src: SocketAddr, dst: SocketAddr, seq: u32, ack: u32, flags: u8) -> Vec<u8> {
    let (std::net::IpAddr::V4(s), std::net::IpAddr::V4(d)) = (src.ip(), dst.ip()) else {
        unreachable!("IPv4 only")
    };
    let syn = flags & 0x02 != 0;
    let len = if syn { 44 } else { 40 };
    let mut p = vec![0u8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&s.octets());
    p[16..20].copy_from_slice(&d.octets());
    p[20..22].copy_from_slice(&src.port().to_be_bytes());
    p[22..24].copy_from_slice(&dst.port().to_be_bytes());
    p[24..28].copy_from_slice(&seq.to_be_bytes());
    p[28..32].copy_from_slice(&ack.to_be_bytes());
    p[32] = ((len as u8 - 20) / 4) << 4;
    p[33] = flags;
    p[34..36].copy_from_slice(&65535u16.to_be_bytes());
    if syn {
        p[40..44].copy_from_slice(&[2, 4, 0x05, 0xb4]);
    }
    p
}

fn tcp() {
    println!();
    println!(
        "{:>10} {:>14} {:>16}",
        "TCP flows", "ns per wake", "wakes/s (1 core)"
    );
    let config = StackConfig {
        offload: false,
        ..StackConfig::default()
    };
    for flows in [0u32, 64, 1024, 4096] {
        let t0 = Instant::from_secs(1);
        let mut stack = Stack::new(config.clone(), t0);
        let dst = SocketAddr::from((Ipv4Addr::new(192, 0, 2, 1), 80));
        // Each flow: SYN, accepted, SYN-ACK answered with an ACK: established and idle.
        for i in 0..flows {
            let src = SocketAddr::from((Ipv4Addr::from(0x0a00_0000 + i), 40000));
            let syn = segment(src, dst, 1000, 0, 0x02);
            let n = syn.len();
            stack.handle_input(t0, syn, 0, n);
            while let Some(ev) = stack.poll_event() {
                if let Event::TcpSyn(key) = ev {
                    stack.accept(key).expect("pending");
                }
            }
            stack.poll(t0);
            let synack = stack.poll_transmit().expect("syn-ack");
            let their_seq = u32::from_be_bytes([synack[24], synack[25], synack[26], synack[27]]);
            stack.recycle(synack);
            let ack = segment(src, dst, 1001, their_seq.wrapping_add(1), 0x10);
            let n = ack.len();
            stack.handle_input(t0, ack, 0, n);
            stack.poll(t0);
            while let Some(buf) = stack.poll_transmit() {
                stack.recycle(buf);
            }
        }
        assert_eq!(stack.tcp_flows() as u32, flows);
        let start = std::time::Instant::now();
        for wake in 0..WAKES {
            let now = t0 + smoltcp::time::Duration::from_micros(100 * wake);
            stack.poll(now);
            black_box(stack.poll_timeout(now));
            while let Some(buf) = stack.poll_transmit() {
                stack.recycle(buf);
            }
        }
        let per_wake = start.elapsed().as_nanos() as f64 / WAKES as f64;
        println!("{flows:>10} {per_wake:>14.0} {:>16.0}", 1e9 / per_wake);
    }
}
