//! The receive path of a punched UDP link: a `UdpPunch` fed raw bytes (as from a stranger),
//! packets sealed by the real peer with arbitrary plaintexts (a buggy peer), replays of
//! earlier packets, and timer ticks. Checks: no panic; raw bytes never authenticate; a replay
//! is never accepted twice; data is only delivered from packets the peer sealed.

#![no_main]

use std::net::SocketAddr;
use std::time::Duration;

use arbitrary::Arbitrary;
use fabric::link::{LinkKeys, OpenError, Sealer};
use fabric::punch::udp::{Input, InputError, PunchConfig, UdpPunch};
use fabric::time::Instant;
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
enum Op {
    Raw(Vec<u8>),
    Sealed(Vec<u8>),
    Replay(u8),
    Tick(u16),
    Transmit,
}

fuzz_target!(|ops: Vec<Op>| {
    let peer_addr: SocketAddr = "192.0.2.1:1000".parse().unwrap();
    let mut now = Instant::now();
    // Raw keys: an X25519 exchange per run would make the fuzzer crawl.
    let ours = LinkKeys::from_raw([1; 32], [2; 32], true);
    let mut punch = UdpPunch::new(now, ours, &[peer_addr], PunchConfig::default());
    let (mut peer, _): (Sealer, _) = LinkKeys::from_raw([2; 32], [1; 32], false).split();
    let mut sent: Vec<Vec<u8>> = Vec::new();
    let mut buf = Vec::new();
    for op in ops.into_iter().take(256) {
        match op {
            Op::Raw(mut bytes) => {
                let r = punch.handle_input(now, peer_addr, &mut bytes);
                assert!(
                    matches!(r, Err(InputError::Open(_))),
                    "raw bytes authenticated: {r:?}"
                );
            }
            Op::Sealed(plain) => {
                let mut wire = Vec::new();
                peer.seal(&plain, &mut wire).expect("seal");
                sent.push(wire.clone());
                let r = punch.handle_input(now, peer_addr, &mut wire);
                if let Ok(Input::Data(d)) = r {
                    assert_eq!(d, &plain[1..]);
                }
            }
            Op::Replay(i) => {
                if let Some(wire) = sent.get(usize::from(i) % sent.len().max(1)) {
                    let mut wire = wire.clone();
                    let r = punch.handle_input(now, peer_addr, &mut wire);
                    assert!(
                        matches!(r, Err(InputError::Open(OpenError::Replay(_) | OpenError::NotLink))),
                        "replay accepted: {r:?}"
                    );
                }
            }
            Op::Tick(ms) => {
                now += Duration::from_millis(u64::from(ms));
                punch.handle_timeout(now);
            }
            Op::Transmit => {
                let _ = punch.poll_transmit(now, &mut buf);
                let _ = punch.poll_event();
            }
        }
    }
});
