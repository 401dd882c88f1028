//! The KCP session on simulated lossy paths: every byte arrives, in order, verified by
//! SHA-256; datagrams, keepalive, idle timeout, path changes and hostile packets.

use std::collections::HashMap;

use fabric::session::{CloseReason, Config, ConvId, Event, InputError, Session};
use fabric::testing::{LinkConfig, Pair, SimNet};
use fabric::time::{Duration, Instant};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use sha2::{Digest, Sha256};

/// Deterministic pseudo-random payload.
fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0; len];
    ChaCha20Rng::seed_from_u64(seed).fill(&mut v[..]);
    v
}

/// A one-way reliable transfer: `A` sends `data`, `B` collects it.
struct Transfer {
    data: Vec<u8>,
    sent: usize,
    got: Vec<u8>,
}

impl Transfer {
    fn new(len: usize, seed: u64) -> Self {
        Self {
            data: payload(len, seed),
            sent: 0,
            got: Vec::new(),
        }
    }

    fn pump(&mut self, from: &mut Session, to: &mut Session, now: Instant) -> bool {
        let cap = from.send_capacity(now);
        if cap > 0 && self.sent < self.data.len() {
            let n = cap.min(self.data.len() - self.sent);
            from.send(&self.data[self.sent..self.sent + n]).unwrap();
            self.sent += n;
        }
        to.recv(&mut self.got);
        self.got.len() == self.data.len()
    }

    fn verify(&self) {
        assert_eq!(self.got.len(), self.data.len());
        assert_eq!(
            Sha256::digest(&self.got),
            Sha256::digest(&self.data),
            "content differs"
        );
    }
}

fn link(rtt_ms: u64, loss: f64) -> LinkConfig {
    LinkConfig::with_rate_rtt_loss(100, Duration::from_millis(rtt_ms), loss)
}

#[test]
fn bulk_transfer_survives_every_loss_level() {
    for (i, loss) in [0.0, 0.01, 0.05, 0.10, 0.20].into_iter().enumerate() {
        let t0 = Instant::now();
        let net = SimNet::symmetric(link(40, loss), 100 + i as u64);
        let mut pair = Pair::new(net, Config::default(), t0);
        let mut up = Transfer::new(4 << 20, 1);
        let mut down = Transfer::new(2 << 20, 2);
        let done = pair.run_until(t0 + Duration::from_secs(120), |a, b, now| {
            let u = up.pump(a, b, now);
            let d = down.pump(b, a, now);
            u && d
        });
        assert!(
            done,
            "loss {loss}: transfer did not finish in 120 virtual seconds"
        );
        up.verify();
        down.verify();
        let s = pair.a.stats();
        if loss > 0.0 {
            assert!(s.retransmits > 0, "loss {loss}: no retransmissions counted");
        }
        assert!(!pair.a.is_closed() && !pair.b.is_closed());
    }
}

#[test]
fn reordering_duplication_and_jitter_do_not_corrupt() {
    let t0 = Instant::now();
    let config = LinkConfig {
        jitter: Duration::from_millis(8),
        reorder: 0.05,
        duplicate: 0.05,
        loss: 0.03,
        ..link(30, 0.0)
    };
    let mut pair = Pair::new(SimNet::symmetric(config, 5), Config::default(), t0);
    let mut up = Transfer::new(3 << 20, 9);
    assert!(pair.run_until(t0 + Duration::from_secs(120), |a, b, now| {
        up.pump(a, b, now)
    }));
    up.verify();
}

#[test]
fn session_moves_to_another_path_mid_transfer() {
    let t0 = Instant::now();
    let mut pair = Pair::new(SimNet::symmetric(link(200, 0.02), 1), Config::default(), t0);
    let mut up = Transfer::new(6 << 20, 3);
    // Run until a third has arrived, then move to a faster path while packets are still in
    // flight on the old one: they are simply lost, as on a real path change.
    let third = up.data.len() / 3;
    let reached = pair.run_until(t0 + Duration::from_secs(120), |a, b, now| {
        up.pump(a, b, now);
        up.got.len() > third
    });
    assert!(reached, "transfer never reached a third");
    assert!(!pair.net.a_to_b.is_idle(), "packets in flight at the move");
    pair.net = SimNet::symmetric(link(10, 0.01), 2);
    assert!(pair.run_until(t0 + Duration::from_secs(240), |a, b, now| {
        up.pump(a, b, now)
    }));
    up.verify();
    assert!(!pair.a.is_closed() && !pair.b.is_closed());
}

#[test]
fn datagrams_travel_beside_the_stream() {
    let t0 = Instant::now();
    let mut pair = Pair::new(SimNet::symmetric(link(20, 0.1), 4), Config::default(), t0);
    let mut up = Transfer::new(1 << 20, 4);
    let mut got = Vec::new();
    let mut sent = 0u32;
    let max = pair.a.max_datagram();
    assert!(
        !pair.a.send_datagram(&vec![0; max + 1]),
        "oversized refused"
    );
    let done = pair.run_until(t0 + Duration::from_secs(60), |a, b, now| {
        if sent < 500 && a.send_datagram(&sent.to_be_bytes()) {
            sent += 1;
        }
        while let Some(d) = b.recv_datagram() {
            got.push(u32::from_be_bytes(d.try_into().unwrap()));
        }
        up.pump(a, b, now) && sent == 500
    });
    assert!(done);
    up.verify();
    // About 10 % are lost; what arrives is intact and in range.
    assert!(
        got.len() > 380 && got.len() <= 500,
        "{} datagrams",
        got.len()
    );
    assert!(got.iter().all(|&n| n < 500));
}

#[test]
fn keepalive_holds_an_idle_session_and_silence_ends_it() {
    let t0 = Instant::now();
    let config = Config::default();
    let idle = config.idle_timeout;
    let mut pair = Pair::new(SimNet::symmetric(link(50, 0.0), 6), config, t0);
    // An hour of silence from the application: pings keep both ends alive.
    let hour = t0 + Duration::from_secs(3600);
    while pair.now < hour {
        assert!(pair.step(|_, _, _| {}));
    }
    assert!(!pair.a.is_closed() && !pair.b.is_closed());
    assert!(pair.a.stats().srtt.is_some(), "pings measured the RTT");
    assert!(
        pair.a.stats().packets_sent < 3600,
        "keepalive is not chatty"
    );
    // And an idle session sleeps until its next keepalive, not KCP's 10 ms tick.
    let quiet = pair.now;
    let mut wakes = 0;
    while pair.now < quiet + Duration::from_secs(60) {
        assert!(pair.step(|_, _, _| {}));
        wakes += 1;
    }
    assert!(wakes < 60, "{wakes} wake-ups in an idle minute");

    // Now the path dies: both ends notice within the idle timeout.
    let died = pair.now;
    pair.net.a_to_b.set_config(LinkConfig {
        loss: 1.0,
        ..link(50, 0.0)
    });
    pair.net.b_to_a.set_config(LinkConfig {
        loss: 1.0,
        ..link(50, 0.0)
    });
    let mut closed = Vec::new();
    pair.run_until(died + idle * 2, |a, b, now| {
        for s in [&mut *a, &mut *b] {
            while let Some(Event::Closed { reason, by_peer }) = s.poll_event() {
                closed.push((reason, by_peer, now));
            }
        }
        closed.len() == 2
    });
    assert_eq!(closed.len(), 2, "both ends closed");
    for (reason, by_peer, at) in closed {
        assert_eq!(reason, CloseReason::Timeout);
        assert!(!by_peer);
        assert!(at - died <= idle + Duration::from_secs(1), "noticed late");
    }
}

#[test]
fn hostile_packets_never_harm_a_running_session() {
    let t0 = Instant::now();
    let mut pair = Pair::new(SimNet::symmetric(link(20, 0.02), 8), Config::default(), t0);
    let mut up = Transfer::new(2 << 20, 8);
    let mut rng = ChaCha20Rng::seed_from_u64(99);
    let conv = pair.b.conv().0;
    let mut refused = 0;
    let done = pair.run_until(t0 + Duration::from_secs(60), |a, b, now| {
        for _ in 0..4 {
            let len = rng.random_range(0..1400);
            let mut junk = vec![0u8; len];
            rng.fill(&mut junk[..]);
            // Half the junk looks like KCP for this conv, to get past the first checks.
            if len > 30 && rng.random_bool(0.5) {
                junk[0] = b'K';
                junk[1..5].copy_from_slice(&conv.to_le_bytes());
                junk[5] = 81 + rng.random_range(0..4);
            }
            if b.handle_input(now, &junk).is_err() {
                refused += 1;
            }
        }
        up.pump(a, b, now)
    });
    assert!(done);
    up.verify();
    assert!(refused > 0);
}

#[test]
fn closed_session_refuses_everything() {
    let t0 = Instant::now();
    let mut s = Session::new(ConvId(1), Config::default(), t0);
    s.close(CloseReason::Normal);
    assert_eq!(
        s.poll_event(),
        Some(Event::Closed {
            reason: CloseReason::Normal,
            by_peer: false
        })
    );
    assert!(s.send(b"x").is_err());
    assert!(s.handle_input(t0, b"Kxxxx").is_err());
    assert_eq!(s.send_capacity(t0), 0);
    assert_eq!(s.poll_transmit(t0, &mut Vec::new()), None);
    assert_eq!(s.poll_timeout(), None);
}

/// A record of the lane test: `flow u8 | order u32 | seq u32 | len u32 | payload`, the
/// payload a pattern of all three, so a record cut or spliced anywhere is noticed.
fn lane_record(flow: u8, order: u32, seq: u32, len: usize) -> Vec<u8> {
    let mut r = vec![flow];
    r.extend_from_slice(&order.to_be_bytes());
    r.extend_from_slice(&seq.to_be_bytes());
    r.extend_from_slice(&(len as u32).to_be_bytes());
    r.extend((0..len).map(|i| (u32::from(flow) * 31 + seq + i as u32) as u8));
    r
}

#[test]
fn flows_stay_whole_and_in_order_while_lanes_let_them_overtake() {
    let t0 = Instant::now();
    let mut pair = Pair::new(SimNet::symmetric(link(40, 0.05), 21), Config::default(), t0);
    // Flow 1 uploads without pause; flows 2..=6 send small records now and then, going idle
    // in between, so they change lanes while the bulk flow's lane stays busy.
    let sending = t0 + Duration::from_secs(8);
    let mut order = 0u32;
    let mut sent_seq: HashMap<u8, u32> = HashMap::new();
    let mut got_seq: HashMap<u8, u32> = HashMap::new();
    let mut next_small = t0;
    let (mut stream, mut at) = (Vec::new(), 0usize);
    let (mut max_order, mut overtakes, mut records) = (0u32, 0u32, 0u32);
    let done = pair.run_until(t0 + Duration::from_secs(60), |a, b, now| {
        if now < sending {
            if a.send_capacity(now) > 0 {
                let seq = sent_seq.entry(1).or_default();
                a.send_flow(1, &lane_record(1, order, *seq, 6000)).unwrap();
                *seq += 1;
                order += 1;
            }
            if now >= next_small {
                next_small = now + Duration::from_millis(70);
                let flow = 2 + (order % 5) as u8;
                let seq = sent_seq.entry(flow).or_default();
                let len = 1 + (order as usize * 37) % 300;
                a.send_flow(u32::from(flow), &lane_record(flow, order, *seq, len))
                    .unwrap();
                *seq += 1;
                order += 1;
            }
        }
        b.recv(&mut stream);
        // Parse whole records from the front of what arrived.
        while let Some(head) = stream.get(at..at + 13) {
            let flow = head[0];
            let field = |i: usize| u32::from_be_bytes(head[i..i + 4].try_into().unwrap());
            let (rec_order, seq, len) = (field(1), field(5), field(9) as usize);
            let Some(body) = stream.get(at + 13..at + 13 + len) else {
                break;
            };
            let expected = lane_record(flow, rec_order, seq, len);
            assert_eq!(&stream[at..at + 13 + len], &expected[..], "record spliced");
            let want = got_seq.entry(flow).or_default();
            assert_eq!(seq, *want, "flow {flow} out of order");
            *want += 1;
            assert_eq!(body.len(), len);
            if rec_order < max_order {
                overtakes += 1;
            }
            max_order = max_order.max(rec_order);
            records += 1;
            at += 13 + len;
        }
        now >= sending && records == order
    });
    assert!(done, "{records} of {order} records arrived");
    assert_eq!(at, stream.len(), "bytes beyond the last record");
    assert_eq!(got_seq, sent_seq);
    // Lanes at work: records overtook earlier ones, which one ordered stream never allows.
    assert!(pair.a.stats().lanes > 1, "one lane only");
    assert!(overtakes > 0, "no record overtook an earlier one");
}

/// A KCP data segment for `conv`, numbered `sn`.
fn kcp_push(conv: u32, sn: u32, payload: &[u8]) -> Vec<u8> {
    let mut s = conv.to_le_bytes().to_vec();
    s.extend_from_slice(&[81, 0, 0, 1]);
    s.extend_from_slice(&0u32.to_le_bytes());
    s.extend_from_slice(&sn.to_le_bytes());
    s.extend_from_slice(&0u32.to_le_bytes());
    s.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    s.extend_from_slice(payload);
    s
}

#[test]
fn lane_packets_are_checked() {
    let t0 = Instant::now();
    let conv = 0x0A0B_0C0D_u32;
    let mut s = Session::new(ConvId(conv), Config::default(), t0);
    // No lane 16 (nor 0 in the long form): refused, harmless.
    for lane in [0u8, 16, 255] {
        let mut p = vec![b'L', lane];
        p.extend_from_slice(&kcp_push(conv, 0, &[1, 0xAA]));
        assert_eq!(s.handle_input(t0, &p), Err(InputError::BadLane(lane)));
    }
    assert_eq!(s.poll_event(), None);
    // A whole record on lane 3 comes out; lanes open as packets name them.
    let mut p = vec![b'L', 3];
    p.extend_from_slice(&kcp_push(conv, 0, &[2, b'h', b'i']));
    assert_eq!(s.handle_input(t0, &p), Ok(()));
    let mut out = Vec::new();
    assert_eq!(s.recv(&mut out), 2);
    assert_eq!(out, b"hi");
    assert_eq!(s.stats().lanes, 4);
    // A record length beyond the limit breaks the lane for good: the session ends.
    let mut p = vec![b'L', 3];
    p.extend_from_slice(&kcp_push(conv, 1, &[0xFF, 0xFF, 0xFF, 0x01]));
    assert_eq!(s.handle_input(t0, &p), Err(InputError::BadRecord));
    assert_eq!(
        s.poll_event(),
        Some(Event::Closed {
            reason: CloseReason::ProtocolError,
            by_peer: false
        })
    );
}

#[test]
fn a_peer_cannot_open_more_lanes_than_we_run() {
    // B8: lanes open as the peer's packets name them; each buffers up to the receive window
    // of out-of-order segments, so the number must be ours to choose.
    let t0 = Instant::now();
    let conv = 0x0A0B_0C0D_u32;
    let config = Config::default();
    let ours = usize::from(config.lanes);
    let mut s = Session::new(ConvId(conv), config, t0);
    for lane in 1..16u8 {
        let mut p = vec![b'L', lane];
        // Out of order (sn 5): it would wait in the lane's receive buffer.
        p.extend_from_slice(&kcp_push(conv, 5, &[1, 0xAA]));
        let result = s.handle_input(t0, &p);
        if usize::from(lane) < ours {
            assert_eq!(result, Ok(()), "lane {lane} is one of ours");
        } else {
            assert_eq!(result, Err(InputError::BadLane(lane)), "lane {lane}");
        }
    }
    assert_eq!(s.stats().lanes, ours);
    assert_eq!(s.stats().invalid_packets, (15 - (ours - 1)) as u64);
}

/// Both directions of the pair's path drop everything from now on.
fn black_out(pair: &mut Pair) {
    for l in [&mut pair.net.a_to_b, &mut pair.net.b_to_a] {
        let config = LinkConfig {
            loss: 1.0,
            ..l.config().clone()
        };
        l.set_config(config);
    }
}

/// Runs a transfer until it has moved `bytes` more, and returns how long that took.
fn time_to_progress(pair: &mut Pair, up: &mut Transfer, bytes: usize, limit: Duration) -> Duration {
    let (start, from) = (pair.now, up.got.len());
    let moved = pair.run_until(start + limit, |a, b, now| {
        up.pump(a, b, now);
        up.got.len() >= from + bytes
    });
    assert!(moved, "no progress within {limit:?}");
    pair.now - start
}

#[test]
fn a_path_change_resends_what_was_in_flight_at_once() {
    // However long the driver takes to notice that the path died (a punched link's
    // keepalive goes unanswered for a second or more), the move costs a round trip.
    for (i, noticed_after_ms) in [1000u64, 1700, 2500].into_iter().enumerate() {
        let seed = 10 * i as u64;
        let t0 = Instant::now();
        let mut pair = Pair::new(
            SimNet::symmetric(link(80, 0.0), seed),
            Config::default(),
            t0,
        );
        let mut up = Transfer::new(16 << 20, seed + 1);
        time_to_progress(&mut pair, &mut up, 4 << 20, Duration::from_secs(60));
        black_out(&mut pair);
        let noticed = pair.now + Duration::from_millis(noticed_after_ms);
        assert!(!pair.run_until(noticed, |a, b, now| {
            up.pump(a, b, now);
            false
        }));
        let rtt = Duration::from_millis(40);
        pair.net = SimNet::symmetric(link(40, 0.0), seed + 2);
        let now = pair.now;
        pair.a.on_path_change(now);
        pair.b.on_path_change(now);
        // The first new byte arrives within a round trip of the move (plus slack for the
        // pacer's restart), not at the backed-off retransmission timers.
        let stall = time_to_progress(&mut pair, &mut up, 1, Duration::from_secs(30));
        assert!(
            stall <= rtt + Duration::from_millis(200),
            "noticed after {noticed_after_ms} ms: stalled {stall:?} after the move"
        );
        assert!(
            pair.run_until(pair.now + Duration::from_secs(120), |a, b, now| {
                up.pump(a, b, now)
            })
        );
        up.verify();
    }
}

#[test]
fn a_long_outage_costs_at_most_the_resend_cap_once_the_path_is_back() {
    let t0 = Instant::now();
    // Long enough for the session to outlive the outage (see the test above).
    let mut config = Config::default();
    config.answer_timeout = Duration::from_secs(30);
    let mut pair = Pair::new(SimNet::symmetric(link(40, 0.0), 21), config, t0);
    let mut up = Transfer::new(16 << 20, 22);
    time_to_progress(&mut pair, &mut up, 4 << 20, Duration::from_secs(60));
    // Eight seconds without a packet: KCP's own timers back off 1.5x per timeout with no
    // cap (the next try would fall seconds after the path is back).
    let configs = (
        pair.net.a_to_b.config().clone(),
        pair.net.b_to_a.config().clone(),
    );
    black_out(&mut pair);
    pair.run_until(pair.now + Duration::from_secs(8), |a, b, now| {
        up.pump(a, b, now);
        false
    });
    pair.net.a_to_b.set_config(configs.0);
    pair.net.b_to_a.set_config(configs.1);
    let stall = time_to_progress(&mut pair, &mut up, 1, Duration::from_secs(60));
    assert!(
        stall <= Duration::from_millis(1100),
        "stalled {stall:?} after the path came back"
    );
    assert!(
        pair.run_until(pair.now + Duration::from_secs(120), |a, b, now| {
            up.pump(a, b, now)
        })
    );
    up.verify();
}

/// Runs the pair until both ends closed; returns when each did, after checking why.
fn until_both_closed(pair: &mut Pair, limit: Duration, up: &mut Transfer) -> Vec<Instant> {
    let mut closed = Vec::new();
    pair.run_until(pair.now + limit, |a, b, now| {
        up.pump(a, b, now);
        for s in [&mut *a, &mut *b] {
            while let Some(Event::Closed { reason, by_peer }) = s.poll_event() {
                assert_eq!(reason, CloseReason::Timeout);
                assert!(!by_peer);
                closed.push(now);
            }
        }
        closed.len() == 2
    });
    closed
}

#[test]
fn a_peer_that_falls_silent_is_noticed_within_seconds() {
    let config = Config::default();
    let answer = config.answer_timeout;
    // Busy: data in flight when the path dies.
    let t0 = Instant::now();
    let mut pair = Pair::new(SimNet::symmetric(link(50, 0.0), 31), config.clone(), t0);
    let mut up = Transfer::new(64 << 20, 32);
    time_to_progress(&mut pair, &mut up, 1 << 20, Duration::from_secs(60));
    black_out(&mut pair);
    let died = pair.now;
    let closed = until_both_closed(&mut pair, config.idle_timeout, &mut up);
    assert_eq!(closed.len(), 2, "both ends closed");
    // The sender waits for acknowledgements; the receiver asks after a second of quiet.
    for at in closed {
        assert!(
            at - died <= answer + Duration::from_millis(1500),
            "noticed {:?} after",
            at - died
        );
    }
    // Idle: the next keepalive goes unanswered.
    let mut pair = Pair::new(SimNet::symmetric(link(50, 0.0), 33), config.clone(), t0);
    let mut idle = Transfer::new(0, 34);
    pair.run_until(t0 + Duration::from_secs(95), |_, _, _| false);
    black_out(&mut pair);
    let died = pair.now;
    let closed = until_both_closed(&mut pair, config.idle_timeout, &mut idle);
    assert_eq!(closed.len(), 2, "both ends closed");
    for at in closed {
        assert!(
            at - died <= config.keepalive + answer + Duration::from_secs(1),
            "noticed {:?} after",
            at - died
        );
    }
}

#[test]
fn a_live_peer_on_a_bad_path_is_never_taken_for_dead() {
    // A slow, jittery path losing 20 % of packets both ways, busy and then idle, for ten
    // minutes: probes keep getting through.
    let t0 = Instant::now();
    let config = LinkConfig {
        jitter: Duration::from_millis(300),
        loss: 0.2,
        ..LinkConfig::with_rate_rtt_loss(2, Duration::from_millis(600), 0.0)
    };
    let mut pair = Pair::new(SimNet::symmetric(config, 41), Config::default(), t0);
    let mut up = Transfer::new(2 << 20, 42);
    let mut closed = false;
    pair.run_until(t0 + Duration::from_secs(600), |a, b, now| {
        up.pump(a, b, now);
        closed |= a.poll_event().is_some() || b.poll_event().is_some();
        closed
    });
    assert!(!closed, "a live session was declared dead");
    up.verify();
}
