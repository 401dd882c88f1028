//! Tests of the mux core: two `Mux`es joined by an in-memory, budgeted link.

use super::frame::{CFM_GROWTH, Frame};
use super::*;

fn pair() -> (Mux, Mux) {
    (Mux::new(Config::default()), Mux::new(Config::default()))
}

/// Moves at most `budget` bytes each way once; returns the bytes moved.
fn step(a: &mut Mux, b: &mut Mux, budget: usize) -> usize {
    let mut wire = Vec::new();
    let ab = a.poll_transmit(budget, &mut wire);
    b.handle_input(&wire).expect("a -> b");
    wire.clear();
    let ba = b.poll_transmit(budget, &mut wire);
    a.handle_input(&wire).expect("b -> a");
    ab + ba
}

/// Steps until nothing moves.
fn settle(a: &mut Mux, b: &mut Mux) {
    for _ in 0..10_000 {
        if step(a, b, 1 << 20) == 0 {
            return;
        }
    }
    panic!("link never settled");
}

fn events(mux: &mut Mux) -> Vec<Event> {
    std::iter::from_fn(|| mux.poll_event()).collect()
}

fn frames(wire: &[u8]) -> Vec<(Cmd, u16, u32)> {
    let mut rest = wire;
    let mut out = Vec::new();
    while let Some((frame, used)) = Frame::parse(rest).unwrap() {
        out.push((frame.header.cmd, frame.header.id, frame.header.length));
        rest = &rest[used..];
    }
    assert!(rest.is_empty());
    out
}

fn read_all(mux: &mut Mux, id: StreamId) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = mux.read(id, &mut buf) {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    got
}

#[test]
fn open_and_data_leave_in_one_flight() {
    let (mut a, mut b) = pair();
    let id = a.open().unwrap();
    assert_eq!(a.write(id, b"GET / HTTP/1.1\r\n\r\n").unwrap(), 18);
    let mut wire = Vec::new();
    a.poll_transmit(usize::MAX, &mut wire);
    // The SYN, our receive window grown to the full window (we hold the stream), the data.
    let growth = CFM_GROWTH | (DEFAULT_WINDOW - INITIAL_WINDOW);
    assert_eq!(
        frames(&wire),
        vec![
            (Cmd::Syn, id.0, 0),
            (Cmd::Cfm, id.0, growth),
            (Cmd::Psh, id.0, 18)
        ]
    );
    b.handle_input(&wire).unwrap();
    assert_eq!(
        events(&mut b),
        vec![Event::Incoming(id), Event::Readable(id)]
    );
    assert_eq!(b.accept(), Some(id));
    let mut buf = [0u8; 64];
    assert_eq!(b.read(id, &mut buf).unwrap(), 18);
    assert_eq!(&buf[..18], b"GET / HTTP/1.1\r\n\r\n");
    assert_eq!(b.read(id, &mut buf), Err(StreamError::WouldBlock));
}

#[test]
fn half_close_works_in_both_directions() {
    let (mut a, mut b) = pair();
    let id = a.open().unwrap();
    a.write(id, b"request").unwrap();
    a.finish(id).unwrap();
    assert_eq!(a.write(id, b"more"), Err(StreamError::Finished(id)));
    settle(&mut a, &mut b);
    assert_eq!(b.accept(), Some(id));
    assert_eq!(read_all(&mut b, id), b"request");
    let mut buf = [0u8; 8];
    assert_eq!(b.read(id, &mut buf), Ok(0), "eof after a's fin");
    assert!(events(&mut b).contains(&Event::Finished(id)));
    // b can still answer on its half, a can still read.
    b.write(id, b"response").unwrap();
    b.finish(id).unwrap();
    settle(&mut a, &mut b);
    assert_eq!(read_all(&mut a, id), b"response");
    assert_eq!(a.read(id, &mut buf), Ok(0));
    assert!(events(&mut a).contains(&Event::Finished(id)));
}

#[test]
fn ids_are_recycled_only_after_both_fins_and_close() {
    let (mut a, mut b) = pair();
    let id = a.open().unwrap();
    assert_eq!(id, StreamId(1));
    a.write(id, b"x").unwrap();
    a.close(id);
    settle(&mut a, &mut b);
    // Our FIN is out, the peer's is not: the id stays taken.
    assert_eq!(a.open().unwrap(), StreamId(2));
    assert!(!events(&mut a).contains(&Event::Released(id)));
    assert_eq!(b.accept(), Some(id));
    assert_eq!(read_all(&mut b, id), b"x");
    b.finish(id).unwrap();
    settle(&mut a, &mut b);
    assert!(
        events(&mut a).contains(&Event::Released(id)),
        "a saw both fins"
    );
    // b finished but still holds the stream: its side is not released.
    assert!(!events(&mut b).contains(&Event::Released(id)));
    b.close(id);
    settle(&mut a, &mut b);
    assert!(events(&mut b).contains(&Event::Released(id)));
    assert_eq!(a.open().unwrap(), StreamId(1), "lowest free id reused");
    assert_eq!(a.stats().streams, 2);
}

#[test]
fn peer_reopening_an_id_we_still_hold_waits_for_our_close() {
    let (mut a, mut b) = pair();
    let id = a.open().unwrap();
    a.finish(id).unwrap();
    settle(&mut a, &mut b);
    assert_eq!(b.accept(), Some(id));
    b.finish(id).unwrap();
    let mut buf = [0u8; 4];
    settle(&mut a, &mut b);
    assert_eq!(b.read(id, &mut buf), Ok(0));
    a.close(id);
    settle(&mut a, &mut b);
    // a released id 1; b's application still holds it.
    assert!(events(&mut a).contains(&Event::Released(id)));
    let again = a.open().unwrap();
    assert_eq!(again, id);
    a.write(again, b"second").unwrap();
    settle(&mut a, &mut b);
    // The old stream still reads EOF; the new one waits.
    assert_eq!(b.read(id, &mut buf), Ok(0));
    assert_eq!(b.accept(), None);
    events(&mut b);
    b.close(id);
    settle(&mut a, &mut b);
    let got = events(&mut b);
    assert!(
        got.contains(&Event::Released(id)) && got.contains(&Event::Incoming(id)),
        "{got:?}"
    );
    assert_eq!(b.accept(), Some(id));
    assert_eq!(read_all(&mut b, id), b"second");
}

#[test]
fn simultaneous_open_binds_one_stream() {
    let (mut a, mut b) = pair();
    let ida = a.open().unwrap();
    let idb = b.open().unwrap();
    assert_eq!(ida, idb);
    a.write(ida, b"from a").unwrap();
    b.write(idb, b"from b").unwrap();
    settle(&mut a, &mut b);
    assert_eq!(a.accept(), None);
    assert_eq!(b.accept(), None);
    assert_eq!(read_all(&mut a, ida), b"from b");
    assert_eq!(read_all(&mut b, idb), b"from a");
    assert_eq!((a.stats().streams, b.stats().streams), (1, 1));
}

/// Two ends that both open streams (a mesh session: each side is client and server) each
/// take ids of their own parity, so a simultaneous open makes two streams, never one bound
/// from two requests.
#[test]
fn ends_with_id_spaces_never_bind_two_opens_into_one_stream() {
    let mut a = Mux::new(Config {
        stream_ids: StreamIds::Odd,
        ..Config::default()
    });
    let mut b = Mux::new(Config {
        stream_ids: StreamIds::Even,
        ..Config::default()
    });
    let ida = a.open().unwrap();
    let idb = b.open().unwrap();
    assert_ne!(ida, idb);
    assert_eq!((ida.0 % 2, idb.0 % 2), (1, 0));
    a.write(ida, b"from a").unwrap();
    b.write(idb, b"from b").unwrap();
    settle(&mut a, &mut b);
    assert_eq!(a.accept(), Some(idb));
    assert_eq!(b.accept(), Some(ida));
    assert_eq!(read_all(&mut a, idb), b"from b");
    assert_eq!(read_all(&mut b, ida), b"from a");
    assert_eq!((a.stats().streams, b.stats().streams), (2, 2));
}

/// A peer that opens an id of our space breaks the rule both ends agreed on: the mux fails
/// rather than bind the stream to one of ours.
#[test]
fn a_peer_open_in_our_id_space_is_a_protocol_error() {
    let mut a = Mux::new(Config {
        stream_ids: StreamIds::Odd,
        ..Config::default()
    });
    let mut b = Mux::new(Config::default());
    b.open().unwrap();
    let mut wire = Vec::new();
    b.poll_transmit(usize::MAX, &mut wire);
    assert_eq!(
        a.handle_input(&wire),
        Err(ProtocolError::OpenInOurIdSpace(StreamId(1)))
    );
}

#[test]
fn each_id_space_has_half_the_ids_and_no_wrap_around() {
    for (ids, first, count) in [(StreamIds::Odd, 1, 32_768), (StreamIds::Even, 2, 32_767)] {
        let mut a = Mux::new(Config {
            stream_ids: ids,
            ..Config::default()
        });
        for n in 0..count {
            assert_eq!(a.open(), Ok(StreamId(first + 2 * n)), "{ids:?}");
        }
        assert_eq!(a.open(), Err(OpenError::IdsExhausted), "{ids:?}");
    }
}

#[test]
fn id_exhaustion_is_an_error() {
    let mut a = Mux::new(Config::default());
    for expected in 1..=u16::MAX {
        assert_eq!(a.open(), Ok(StreamId(expected)));
    }
    assert_eq!(a.open(), Err(OpenError::IdsExhausted));
    assert_eq!(a.open(), Err(OpenError::IdsExhausted), "no wrap-around");
}

#[test]
fn writer_stops_at_window_and_resumes_after_reads() {
    let config = Config {
        window: 64 * 1024,
        ..Config::default()
    };
    let (mut a, mut b) = (Mux::new(config.clone()), Mux::new(config));
    let id = a.open().unwrap();
    let data = vec![7u8; 100 * 1024];
    let n = a.write(id, &data).unwrap();
    assert_eq!(n, 64 * 1024);
    assert_eq!(a.write(id, &data[n..]), Ok(0), "blocked at the window");
    settle(&mut a, &mut b);
    assert_eq!(
        a.write(id, &data[n..]),
        Ok(0),
        "still blocked: nothing was read"
    );
    assert_eq!(b.stats().recv_buffered, 64 * 1024);
    b.accept();
    let mut buf = vec![0u8; 20 * 1024];
    assert_eq!(b.read(id, &mut buf), Ok(20 * 1024));
    settle(&mut a, &mut b);
    assert!(events(&mut a).contains(&Event::Writable(id)));
    let more = a.write(id, &data[n..]).unwrap();
    assert_eq!(more, 20 * 1024, "exactly the confirmed credit came back");
}

#[test]
fn slow_reader_does_not_stall_other_streams() {
    let config = Config {
        window: 32 * 1024,
        ..Config::default()
    };
    let (mut a, mut b) = (Mux::new(config.clone()), Mux::new(config));
    let slow = a.open().unwrap();
    let fast = a.open().unwrap();
    let total = 1 << 20;
    let chunk = vec![1u8; 8 * 1024];
    let (mut sent_slow, mut sent_fast, mut got_fast) = (0, 0, 0);
    let mut buf = vec![0u8; 16 * 1024];
    for _ in 0..10_000 {
        // Both writers always push as hard as they can; the link carries 4 KiB per step.
        sent_slow += a.write(slow, &chunk).unwrap();
        if sent_fast < total {
            sent_fast += a
                .write(fast, &chunk[..chunk.len().min(total - sent_fast)])
                .unwrap();
        }
        step(&mut a, &mut b, 4096);
        while b.accept().is_some() {}
        while let Ok(n) = b.read(fast, &mut buf) {
            got_fast += n;
        }
        if got_fast == total {
            break;
        }
    }
    assert_eq!(got_fast, total, "the fast stream got everything");
    assert_eq!(
        sent_slow,
        32 * 1024,
        "the unread stream is held at its window"
    );
    assert!(b.stats().recv_buffered <= 32 * 1024);
}

#[test]
fn frames_respect_budget_and_max_frame() {
    let (mut a, _) = pair();
    let id = a.open().unwrap();
    a.write(id, &vec![0u8; 100_000]).unwrap();
    let mut wire = Vec::new();
    assert_eq!(a.poll_transmit(5, &mut wire), 0, "a header does not fit");
    let n = a.poll_transmit(37, &mut wire);
    assert!(n <= 37);
    let growth = CFM_GROWTH | (DEFAULT_WINDOW - INITIAL_WINDOW);
    assert_eq!(
        frames(&wire),
        vec![(Cmd::Syn, 1, 0), (Cmd::Cfm, 1, growth), (Cmd::Psh, 1, 16)]
    );
    wire.clear();
    a.poll_transmit(100_000, &mut wire);
    let lens: Vec<u32> = frames(&wire).iter().map(|f| f.2).collect();
    assert!(lens.iter().all(|&len| len as usize <= a.config().max_frame));
    assert!(wire.len() <= 100_000);
}

#[test]
fn data_is_round_robin_across_streams() {
    let (mut a, _) = pair();
    let s1 = a.open().unwrap();
    let s2 = a.open().unwrap();
    a.write(s1, &vec![0u8; 64 * 1024]).unwrap();
    a.write(s2, &vec![0u8; 64 * 1024]).unwrap();
    let mut wire = Vec::new();
    a.poll_transmit(4 * (16 * 1024 + 7) + 14, &mut wire);
    let ids: Vec<u16> = frames(&wire)
        .iter()
        .filter(|f| f.0 == Cmd::Psh)
        .map(|f| f.1)
        .collect();
    assert_eq!(ids, vec![1, 2, 1, 2]);
}

#[test]
fn verification_answers_and_checks() {
    let (mut a, mut b) = pair();
    a.verify(0x1234, 0x1122_3344).unwrap();
    let mut wire = Vec::new();
    a.poll_transmit(64, &mut wire);
    assert_eq!(frames(&wire), vec![(Cmd::VrmRequest, 0x1234, 0x1122_3344)]);
    b.handle_input(&wire).unwrap();
    wire.clear();
    b.poll_transmit(64, &mut wire);
    assert_eq!(frames(&wire), vec![(Cmd::VrmReply, 0x3421, 0x1144_2233)]);
    a.handle_input(&wire).unwrap();
    assert_eq!(events(&mut a), vec![Event::Verified]);

    // Both probing at once: each answers the other and checks its own.
    a.verify(1, 2).unwrap();
    b.verify(3, 4).unwrap();
    settle(&mut a, &mut b);
    assert_eq!(events(&mut a), vec![Event::Verified]);
    assert_eq!(events(&mut b), vec![Event::Verified]);
}

fn header(cmd: u8, id: u16, length: u32) -> Vec<u8> {
    let mut v = vec![cmd];
    v.extend_from_slice(&id.to_be_bytes());
    v.extend_from_slice(&length.to_be_bytes());
    v
}

/// A mux `b` that accepted stream 1 from `a`, which sent `sent` bytes on it.
fn established(sent: usize) -> (Mux, Mux) {
    let (mut a, mut b) = pair();
    let id = a.open().unwrap();
    a.write(id, &vec![0u8; sent]).unwrap();
    settle(&mut a, &mut b);
    (a, b)
}

#[test]
fn every_malformed_input_class_is_fatal_and_later_calls_do_not_panic() {
    // Stream 1 was accepted: its credit grew to the window. On the opener's side, the
    // acceptor has not grown it yet in `established` (nothing accepted there).
    let credit = Config::default().window;
    let growth_room = Config::default().window - Config::default().initial_window;
    type Check = Box<dyn Fn(&ProtocolError) -> bool>;
    let cases: Vec<(&str, Vec<u8>, Check)> = vec![
        (
            "unknown cmd",
            header(0x09, 1, 0),
            Box::new(|e| *e == ProtocolError::UnknownCommand(9)),
        ),
        (
            "psh unknown id",
            [header(2, 9, 3), b"abc".to_vec()].concat(),
            Box::new(|e| matches!(e, ProtocolError::UnknownStream { cmd: Cmd::Psh, .. })),
        ),
        (
            "cfm unknown id",
            header(3, 9, 1),
            Box::new(|e| matches!(e, ProtocolError::UnknownStream { .. })),
        ),
        (
            "fin unknown id",
            header(1, 9, 0),
            Box::new(|e| matches!(e, ProtocolError::UnknownStream { .. })),
        ),
        (
            "reserved id",
            header(0, 0, 0),
            Box::new(|e| matches!(e, ProtocolError::ReservedId(_))),
        ),
        (
            "psh over max frame",
            header(2, 1, 64 * 1024 + 1),
            Box::new(|e| matches!(e, ProtocolError::FrameTooLarge { .. })),
        ),
        (
            "huge psh length",
            header(2, 1, u32::MAX),
            Box::new(|e| matches!(e, ProtocolError::FrameTooLarge { .. })),
        ),
        (
            "credit overrun",
            (0..9)
                .flat_map(|_| [header(2, 1, 64 * 1024), vec![0; 64 * 1024]].concat())
                .collect(),
            Box::new(
                move |e| matches!(e, ProtocolError::CreditExceeded { window: w, .. } if *w == credit),
            ),
        ),
        (
            "data after fin",
            [header(1, 1, 0), header(2, 1, 1), vec![0]].concat(),
            Box::new(|e| *e == ProtocolError::DataAfterFin(StreamId(1))),
        ),
        (
            "duplicate fin",
            [header(1, 1, 0), header(1, 1, 0)].concat(),
            Box::new(|e| *e == ProtocolError::DuplicateFin(StreamId(1))),
        ),
        (
            "duplicate syn",
            header(0, 1, 0),
            Box::new(|e| *e == ProtocolError::DuplicateSyn(StreamId(1))),
        ),
        (
            "bogus cfm",
            header(3, 1, 1),
            Box::new(|e| matches!(e, ProtocolError::BogusConfirm { .. })),
        ),
        (
            "credit grown beyond the window",
            header(3, 1, CFM_GROWTH | (growth_room + 1)),
            Box::new(|e| matches!(e, ProtocolError::CreditBeyondWindow { .. })),
        ),
        (
            "unsolicited verify reply",
            header(0x84, 1, 1),
            Box::new(|e| *e == ProtocolError::UnexpectedVerifyReply),
        ),
    ];
    for (name, input, check) in cases {
        // `a` holds stream 1 with 10 bytes sent and unconfirmed; `b` accepted it.
        let (mut a, mut b) = established(10);
        b.accept();
        // Feed the bad bytes to `b` (as if from `a`), split in two to exercise reassembly.
        let cut = input.len() / 2;
        let result = b
            .handle_input(&input[..cut])
            .and_then(|()| b.handle_input(&input[cut..]));
        let error = result.expect_err(name);
        assert!(check(&error), "{name}: {error:?}");
        assert_eq!(
            b.handle_input(&header(0, 5, 0)),
            Err(error.clone()),
            "{name}: stays dead"
        );
        let mut buf = [0u8; 64];
        assert!(matches!(
            b.read(StreamId(1), &mut buf),
            Ok(_) | Err(StreamError::MuxFailed(_))
        ));
        assert!(matches!(
            b.write(StreamId(1), b"x"),
            Err(StreamError::MuxFailed(_))
        ));
        assert!(matches!(b.open(), Err(OpenError::MuxFailed(_))));
        assert!(!b.has_transmit());
        let mut out = Vec::new();
        assert_eq!(b.poll_transmit(1 << 20, &mut out), 0);
        b.close(StreamId(1));
        events(&mut b);
        drop(a.handle_input(&[]));
    }

    // A bogus CFM is also caught on the sending side: `a` sent 10 bytes, b confirms 11.
    let (mut a, _) = established(10);
    assert!(matches!(
        a.handle_input(&header(3, 1, 11)),
        Err(ProtocolError::BogusConfirm {
            amount: 11,
            unconfirmed: 10,
            ..
        })
    ));
    // Growing a's credit exactly to the window is fine.
    let (mut a, _) = established(10);
    assert_eq!(
        a.handle_input(&header(3, 1, CFM_GROWTH | growth_room)),
        Ok(())
    );
    // A wrong verification answer.
    let (mut a, _) = pair();
    a.verify(1, 2).unwrap();
    assert_eq!(
        a.handle_input(&header(0x84, 1, 2)),
        Err(ProtocolError::VerifyMismatch)
    );
}

#[test]
fn closed_stream_discards_and_returns_credit() {
    let config = Config {
        window: 16 * 1024,
        ..Config::default()
    };
    let (mut a, mut b) = (Mux::new(config.clone()), Mux::new(config));
    let id = a.open().unwrap();
    a.write(id, &[1u8; 16 * 1024]).unwrap();
    settle(&mut a, &mut b);
    b.accept();
    b.close(id);
    settle(&mut a, &mut b);
    assert_eq!(b.stats().recv_buffered, 0);
    // The writer got its credit back and may keep writing into the void until it finishes.
    assert_eq!(a.write(id, &[1u8; 16 * 1024]), Ok(16 * 1024));
    settle(&mut a, &mut b);
    a.finish(id).unwrap();
    let mut buf = [0u8; 4];
    assert_eq!(a.read(id, &mut buf), Ok(0), "b's close sent its fin");
    a.close(id);
    settle(&mut a, &mut b);
    assert_eq!((a.stats().streams, b.stats().streams), (0, 0));
}

#[test]
fn accept_backlog_refuses_with_fin() {
    let config = Config {
        accept_backlog: 2,
        ..Config::default()
    };
    let (mut a, mut b) = (Mux::new(config.clone()), Mux::new(config));
    let ids: Vec<StreamId> = (0..3).map(|_| a.open().unwrap()).collect();
    for &id in &ids {
        a.write(id, b"hi").unwrap();
    }
    settle(&mut a, &mut b);
    let mut buf = [0u8; 4];
    assert_eq!(a.read(ids[2], &mut buf), Ok(0), "third stream refused: eof");
    assert_eq!(a.read(ids[0], &mut buf), Err(StreamError::WouldBlock));
    assert_eq!(b.accept(), Some(ids[0]));
    assert_eq!(b.accept(), Some(ids[1]));
    assert_eq!(b.accept(), None);

    // Streams closed before being accepted leave the backlog.
    let more: Vec<StreamId> = (0..2).map(|_| a.open().unwrap()).collect();
    settle(&mut a, &mut b);
    b.close(more[0]);
    b.close(more[1]);
    let last = a.open().unwrap();
    settle(&mut a, &mut b);
    assert_eq!(b.accept(), Some(last));
}

#[test]
fn failure_reports_to_every_stream_after_buffered_data() {
    let (mut a, mut b) = pair();
    let id = a.open().unwrap();
    a.write(id, b"tail").unwrap();
    settle(&mut a, &mut b);
    b.accept();
    b.fail(Failure::link("connection reset"));
    let mut buf = [0u8; 8];
    assert_eq!(
        b.read(id, &mut buf),
        Ok(4),
        "bytes received before the failure"
    );
    assert!(matches!(
        b.read(id, &mut buf),
        Err(StreamError::MuxFailed(Failure::Link(_)))
    ));
    assert_eq!(b.handle_input(b"x"), Err(ProtocolError::Failed));
}

#[test]
fn idle_streams_allocate_no_buffers() {
    let (mut a, mut b) = pair();
    let id = a.open().unwrap();
    a.write(id, &[0u8; 1000]).unwrap();
    settle(&mut a, &mut b);
    b.accept();
    let mut buf = [0u8; 1000];
    assert_eq!(b.read(id, &mut buf), Ok(1000));
    let sa = a.stream(id.0).unwrap();
    let sb = b.stream(id.0).unwrap();
    assert_eq!(
        sa.send_buf.chunks() + sb.recv_buf.chunks(),
        0,
        "freed when drained"
    );
}

#[test]
fn reopening_an_id_drops_its_stale_events() {
    let (mut a, mut b) = pair();
    let id = a.open().unwrap();
    a.finish(id).unwrap();
    settle(&mut a, &mut b);
    b.accept();
    b.close(id);
    settle(&mut a, &mut b);
    events(&mut a);
    // The application closes and at once reopens, before draining events.
    a.close(id);
    let again = a.open().unwrap();
    assert_eq!(again, id);
    assert!(
        !events(&mut a).contains(&Event::Released(id)),
        "stale release of the new stream"
    );
}

mod chunking {
    use proptest::prelude::*;

    use super::*;

    /// What a receiver makes of `wire` fed in pieces cut at `cuts`.
    fn receive(wire: &[u8], cuts: &[usize]) -> (Vec<Event>, Vec<(StreamId, Vec<u8>)>) {
        let mut b = Mux::new(Config::default());
        let mut start = 0;
        for &cut in cuts.iter().chain(std::iter::once(&wire.len())) {
            b.handle_input(&wire[start..cut]).unwrap();
            start = cut;
        }
        let events = events(&mut b);
        let mut data = Vec::new();
        while let Some(id) = b.accept() {
            data.push((id, read_all(&mut b, id)));
        }
        (events, data)
    }

    proptest! {
        #[test]
        fn input_chunking_does_not_matter(
            writes in proptest::collection::vec((0usize..4, 0usize..40_000), 1..12),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..16),
            verify in any::<bool>(),
        ) {
            let mut a = Mux::new(Config::default());
            let ids: Vec<StreamId> = (0..4).map(|_| a.open().unwrap()).collect();
            if verify {
                a.verify(7, 9).unwrap();
            }
            let mut wire = Vec::new();
            for (i, &(stream, len)) in writes.iter().enumerate() {
                let data: Vec<u8> = (0..len).map(|j| (i * 31 + j) as u8).collect();
                a.write(ids[stream], &data).unwrap();
                a.poll_transmit(usize::MAX, &mut wire);
            }
            a.finish(ids[0]).unwrap();
            a.poll_transmit(usize::MAX, &mut wire);
            let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(wire.len() + 1)).collect();
            cuts.sort_unstable();
            prop_assert_eq!(receive(&wire, &cuts), receive(&wire, &[]));
        }
    }
}

#[test]
fn fin_follows_all_data_even_with_tiny_budgets() {
    let (mut a, mut b) = pair();
    let id = a.open().unwrap();
    a.write(id, &[9u8; 40_000]).unwrap();
    a.finish(id).unwrap();
    let mut wire = Vec::new();
    let mut all = Vec::new();
    for budget in (0..).map(|i| 7 + i % 50) {
        wire.clear();
        if a.poll_transmit(budget, &mut wire) == 0 && !a.has_transmit() {
            break;
        }
        assert!(wire.len() <= budget);
        all.extend_from_slice(&wire);
    }
    let seen = frames(&all);
    assert_eq!(seen.first(), Some(&(Cmd::Syn, 1, 0)));
    assert_eq!(seen.last(), Some(&(Cmd::Fin, 1, 0)));
    let data: u32 = seen.iter().filter(|f| f.0 == Cmd::Psh).map(|f| f.2).sum();
    assert_eq!(data, 40_000);
    b.handle_input(&all).unwrap();
    b.accept();
    assert_eq!(read_all(&mut b, id).len(), 40_000);
}

/// Writes from `a` on every stream in `ids` as far as credit allows and moves frames both
/// ways until nothing moves; `b` neither accepts nor reads.
fn flood(a: &mut Mux, b: &mut Mux, ids: &[StreamId]) {
    let chunk = vec![7u8; 64 * 1024];
    for _ in 0..10_000 {
        let mut wrote = 0;
        for &id in ids {
            wrote += a.write(id, &chunk).unwrap_or(0);
        }
        if step(a, b, 1 << 20) == 0 && wrote == 0 {
            return;
        }
    }
    panic!("flood never settled");
}

#[test]
fn a_peer_filling_unaccepted_streams_pins_at_most_the_budget() {
    // B8: every stream the peer opens may hold data before anyone accepts it; the sum over
    // streams is what a hostile peer can make us keep.
    let (mut a, mut b) = pair();
    let ids: Vec<StreamId> = (0..200).map(|_| a.open().unwrap()).collect();
    flood(&mut a, &mut b, &ids);
    let pinned = b.stats().recv_buffered;
    assert!(
        pinned <= CONNECTION_BUDGET,
        "{pinned} bytes pinned by streams nobody accepted"
    );
    assert_eq!(
        pinned,
        200 * INITIAL_WINDOW as usize,
        "each unaccepted stream holds its initial window"
    );
    assert_eq!(b.stats().recv_credit, pinned);
}

/// Moves `total` bytes from `a` to `b` on `id`, `b` reading everything; checks the bytes.
fn transfer(a: &mut Mux, b: &mut Mux, id: StreamId, total: usize) {
    let pattern = |i: usize| (i % 251) as u8;
    let (mut sent, mut got) = (0, 0);
    let mut buf = vec![0u8; 32 * 1024];
    for _ in 0..100_000 {
        if got == total {
            return;
        }
        let chunk: Vec<u8> = (sent..(sent + 32 * 1024).min(total)).map(pattern).collect();
        sent += a.write(id, &chunk).unwrap();
        step(a, b, 1 << 20);
        while let Ok(n) = b.read(id, &mut buf) {
            if n == 0 {
                break;
            }
            assert!(
                buf[..n]
                    .iter()
                    .enumerate()
                    .all(|(i, &x)| x == pattern(got + i))
            );
            got += n;
        }
    }
    panic!("transfer stalled at {got} of {total} bytes");
}

#[test]
fn an_accepted_stream_grows_to_the_window_and_an_unaccepted_one_does_not() {
    let (mut a, mut b) = pair();
    let read = a.open().unwrap();
    let unread = a.open().unwrap();
    a.write(unread, &[1u8; 100]).unwrap();
    settle(&mut a, &mut b);
    assert_eq!(b.accept(), Some(read), "only the first is taken");
    transfer(&mut a, &mut b, read, 4 << 20);
    let window = Config::default().window;
    assert_eq!(b.stream(read.0).unwrap().recv_limit, window);
    // Once every byte is confirmed (the FIN makes the reader confirm the last ones), the
    // writer's credit is the whole window.
    a.finish(read).unwrap();
    settle(&mut a, &mut b);
    let writer = a.stream(read.0).unwrap();
    assert_eq!((writer.unconfirmed, writer.send_limit), (0, window));
    assert_eq!(a.stream(unread.0).unwrap().send_limit, INITIAL_WINDOW);
    assert_eq!(
        b.stats().recv_credit,
        (window + INITIAL_WINDOW) as usize,
        "the budget holds each stream's credit"
    );
    // Releasing the streams returns their budget.
    for id in [read, unread] {
        a.close(id);
        b.close(id);
    }
    settle(&mut a, &mut b);
    assert_eq!((a.stats().streams, b.stats().streams), (0, 0));
    assert_eq!((a.stats().recv_credit, b.stats().recv_credit), (0, 0));
}

#[test]
fn at_the_budget_new_peer_streams_are_refused_and_old_ones_keep_their_credit() {
    let budget = 4 * INITIAL_WINDOW;
    let config = Config {
        budget: budget as usize,
        ..Config::default()
    };
    let (mut a, mut b) = (Mux::new(config.clone()), Mux::new(config));
    let ids: Vec<StreamId> = (0..5).map(|_| a.open().unwrap()).collect();
    settle(&mut a, &mut b);
    let accepted: Vec<StreamId> = std::iter::from_fn(|| b.accept()).collect();
    assert_eq!(accepted, ids[..4], "the fifth found no budget");
    let mut buf = [0u8; 4];
    assert_eq!(a.read(ids[4], &mut buf), Ok(0), "refused: eof");
    // No room to grow: the streams still carry everything, at their initial credit, and
    // never beyond what was granted.
    transfer(&mut a, &mut b, ids[0], 1 << 20);
    assert_eq!(b.stream(ids[0].0).unwrap().recv_limit, INITIAL_WINDOW);
    assert_eq!(b.stats().recv_credit, budget as usize);
    // Streams that end return their share, and a stream may grow into it, all but the
    // quarter of the budget kept for new streams' initial windows.
    for &id in &ids[1..3] {
        a.close(id);
        b.close(id);
    }
    settle(&mut a, &mut b);
    transfer(&mut a, &mut b, ids[0], 1 << 20);
    assert_eq!(
        b.stream(ids[0].0).unwrap().recv_limit,
        INITIAL_WINDOW + (budget - budget / 4 - 2 * INITIAL_WINDOW)
    );
    // That quarter still admits a new stream.
    let next = a.open().unwrap();
    settle(&mut a, &mut b);
    assert_eq!(b.accept(), Some(next));
}

#[test]
fn muxes_sharing_a_node_budget_draw_on_one_count_and_give_it_back() {
    let node = SharedBudget::new(4 * INITIAL_WINDOW as usize);
    let config = Config {
        shared_budget: Some(node.clone()),
        ..Config::default()
    };
    let (mut a1, mut b1) = (Mux::new(Config::default()), Mux::new(config.clone()));
    let (mut a2, mut b2) = (Mux::new(Config::default()), Mux::new(config));
    for _ in 0..3 {
        a1.open().unwrap();
    }
    settle(&mut a1, &mut b1);
    let ids2: Vec<StreamId> = (0..2).map(|_| a2.open().unwrap()).collect();
    settle(&mut a2, &mut b2);
    assert_eq!(std::iter::from_fn(|| b1.accept()).count(), 3);
    assert_eq!(
        std::iter::from_fn(|| b2.accept()).collect::<Vec<_>>(),
        ids2[..1],
        "the node budget had room for one more"
    );
    assert_eq!(node.used(), 4 * INITIAL_WINDOW as usize);
    // A failed mux gives its share back at once, a dropped one too.
    b1.fail(Failure::link("gone"));
    assert_eq!(node.used(), INITIAL_WINDOW as usize);
    drop(b2);
    assert_eq!(node.used(), 0);
}

#[test]
fn with_no_accept_backlog_every_peer_stream_is_refused() {
    let config = Config {
        accept_backlog: 0,
        ..Config::default()
    };
    let (mut a, mut b) = (Mux::new(Config::default()), Mux::new(config));
    let ids: Vec<StreamId> = (0..100).map(|_| a.open().unwrap()).collect();
    for &id in &ids {
        a.write(id, &[5u8; 1000]).unwrap();
    }
    settle(&mut a, &mut b);
    let mut buf = [0u8; 4];
    assert_eq!(a.read(ids[0], &mut buf), Ok(0), "refused: eof");
    assert_eq!(b.accept(), None);
    assert_eq!(b.stats().recv_buffered, 0);
    assert_eq!(b.stats().recv_credit, 0);
    for id in ids {
        a.close(id);
    }
    settle(&mut a, &mut b);
    assert_eq!((a.stats().streams, b.stats().streams), (0, 0));
}

#[test]
fn windows_grow_both_ways_through_half_closes_and_every_id_is_released() {
    // Growth announced while the peer finishes, closes and releases: a growth must never
    // reach an id the peer already released (the peer would fail the mux), nor be taken for
    // a confirmation. Small link budgets interleave frames of all streams.
    for budget in [997, 4096, 70_000] {
        let (mut a, mut b) = pair();
        let ids: Vec<StreamId> = (0..4).map(|_| a.open().unwrap()).collect();
        let total = 3 << 20;
        let data = vec![0x33u8; 32 * 1024];
        let mut sent_a = [0usize; 4];
        let mut sent_b = [0usize; 4];
        let mut got_a = vec![0usize; 4];
        let mut got_b = vec![0usize; 4];
        let mut buf = vec![0u8; 8192];
        let mut accepted = Vec::new();
        for round in 0..1_000_000 {
            while let Some(id) = b.accept() {
                accepted.push(id);
            }
            for (i, &id) in ids.iter().enumerate() {
                // `a` uploads, half as much on odd streams, and finishes; `b` sends `total`.
                let upload = total / (1 + i % 2);
                if sent_a[i] < upload {
                    let n = (upload - sent_a[i]).min(data.len());
                    sent_a[i] += a.write(id, &data[..n]).unwrap();
                } else {
                    a.finish(id).unwrap();
                }
                if accepted.contains(&id) {
                    if sent_b[i] < total {
                        let n = (total - sent_b[i]).min(data.len());
                        sent_b[i] += b.write(id, &data[..n]).unwrap();
                    } else {
                        b.finish(id).unwrap();
                    }
                    while let Ok(n) = b.read(id, &mut buf) {
                        if n == 0 {
                            break;
                        }
                        got_b[i] += n;
                    }
                }
                while let Ok(n) = a.read(id, &mut buf) {
                    if n == 0 {
                        break;
                    }
                    got_a[i] += n;
                }
            }
            events(&mut a);
            events(&mut b);
            let uploads: Vec<usize> = (0..4).map(|i| total / (1 + i % 2)).collect();
            if got_a.iter().all(|&n| n == total) && got_b == uploads {
                let mut eof = [0u8; 1];
                if ids.iter().all(|&id| b.read(id, &mut eof) == Ok(0)) {
                    break;
                }
            }
            assert!(round < 999_999, "stalled: {got_a:?} {got_b:?}");
            step(&mut a, &mut b, budget);
        }
        // The test is about growth: it happened both ways.
        let window = Config::default().window;
        assert!(
            ids.iter()
                .all(|&id| a.stream(id.0).unwrap().recv_limit == window)
        );
        assert!(b.stream(ids[0].0).is_none_or(|s| s.recv_limit == window));
        for &id in &ids {
            a.close(id);
            b.close(id);
        }
        settle(&mut a, &mut b);
        assert_eq!((a.stats().streams, b.stats().streams), (0, 0), "{budget}");
        assert_eq!((a.stats().recv_credit, b.stats().recv_credit), (0, 0));
    }
}
