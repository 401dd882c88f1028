//! Hostile bytes from the link to the wasm demo's TCP-like baseline endpoint: it must refuse
//! or absorb them without panicking, keep what it sends within the MTU, and always run dry
//! when asked for packets.

#![no_main]

use fabric::connection::Endpoint;
use fabric::time::{Duration, Instant};
use libfuzzer_sys::fuzz_target;
use wasm_demo::baseline::{Baseline, Config, Read};

fuzz_target!(|data: &[u8]| {
    let config = Config::default();
    let mtu = config.mtu;
    let mut end = Baseline::new(config);
    let t0 = Instant::now();
    // Flows of our own with data in flight, so acknowledgements have something to hit.
    let flows: Vec<u16> = (0..3).map(|_| end.open()).collect();
    for &flow in &flows {
        end.write(flow, &[7u8; 20_000]);
    }
    end.finish(flows[2]);
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let mut input = data;
    let mut turn = 0u64;
    while let Some((&len, rest)) = input.split_first() {
        let take = usize::from(len).min(rest.len());
        let (packet, tail) = rest.split_at(take);
        input = tail;
        let now = t0 + Duration::from_millis(turn * 37);
        let _ = end.handle_input(now, packet);
        if end.poll_timeout().is_some_and(|t| t <= now) {
            end.handle_timeout(now);
        }
        let mut sent = 0;
        while let Some(n) = end.poll_transmit(now, &mut out) {
            assert!(n <= mtu, "packet of {n} bytes over the MTU");
            sent += 1;
            assert!(sent < 100_000, "poll_transmit does not run dry");
        }
        while end.accept().is_some() {}
        for flow in 0..=8u16 {
            while let Read::Data(n) = end.read(flow, &mut buf) {
                assert!(n > 0);
            }
        }
        turn += 1;
    }
});
