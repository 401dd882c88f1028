//! Hostile packets against a live KCP session: any sequence of inputs, sends, receives and
//! time steps must never panic, and the session must keep its bounds.

#![no_main]

use arbitrary::Arbitrary;
use fabric::session::{Config, ConvId, Session};
use fabric::time::{Duration, Instant};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
enum Op {
    /// A packet as it came off the wire.
    Raw(Vec<u8>),
    /// A packet dressed as KCP for this session's conv, so it gets past the first checks;
    /// lane 0 in the plain form, other lanes (in range or not) in the long form.
    Kcp {
        lane: u8,
        cmd: u8,
        rest: Vec<u8>,
    },
    /// A datagram packet for this conv.
    Datagram(Vec<u8>),
    Send(Vec<u8>),
    /// Bytes of one flow, which picks a lane.
    SendFlow(u32, Vec<u8>),
    Recv,
    Advance(u16),
    Transmit,
}

const CONV: u32 = 0x0102_0304;

fuzz_target!(|ops: Vec<Op>| {
    let t0 = Instant::now();
    let mut now = t0;
    let mut s = Session::new(ConvId(CONV), Config::default(), now);
    let mut out = Vec::new();
    let mut buf = Vec::new();
    for op in ops {
        match op {
            Op::Raw(p) => {
                let _ = s.handle_input(now, &p);
            }
            Op::Kcp { lane, cmd, rest } => {
                let mut p = if lane == 0 {
                    vec![b'K']
                } else {
                    vec![b'L', lane % 20]
                };
                p.extend_from_slice(&CONV.to_le_bytes());
                p.push(81 + cmd % 5);
                p.extend_from_slice(&rest);
                let _ = s.handle_input(now, &p);
            }
            Op::Datagram(d) => {
                let mut p = vec![b'D'];
                p.extend_from_slice(&CONV.to_be_bytes());
                p.extend_from_slice(&d);
                let _ = s.handle_input(now, &p);
            }
            Op::Send(d) => {
                if s.send_capacity(now) > 0 {
                    let _ = s.send(&d);
                }
            }
            Op::SendFlow(flow, d) => {
                if s.send_capacity(now) > 0 {
                    let _ = s.send_flow(flow, &d);
                }
            }
            Op::Recv => {
                out.clear();
                s.recv(&mut out);
                while s.recv_datagram().is_some() {}
            }
            Op::Advance(ms) => {
                now += Duration::from_millis(u64::from(ms));
                s.handle_timeout(now);
            }
            Op::Transmit => {
                let mut n = 0;
                while let Some(len) = s.poll_transmit(now, &mut buf) {
                    assert!(len <= s.config().mtu, "packet over the MTU");
                    n += 1;
                    if n > 100_000 {
                        panic!("poll_transmit never ends");
                    }
                }
            }
        }
        if let Some(t) = s.poll_timeout() {
            assert!(t >= t0, "deadline before the session began");
        }
        assert!(s.stats().lanes <= 16, "more lanes than the wire names");
    }
});
