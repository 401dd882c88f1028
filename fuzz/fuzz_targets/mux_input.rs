//! Hostile bytes from the link: the mux must return errors, never panic, hang or allocate
//! by an unchecked length, and stay dead after an error.

#![no_main]

use fabric::mux::{Config, Mux, StreamError};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&shape, rest)) = data.split_first() else {
        return;
    };
    let config = Config {
        window: 4096 << (shape & 7),
        max_input_frame: 1024 << ((shape >> 3) & 7),
        accept_backlog: 1 + usize::from(shape >> 6) * 8,
        ..Config::default()
    };
    let mut mux = Mux::new(config);
    // A few streams of our own with unconfirmed data, so CFM and replies have something to hit.
    for _ in 0..3 {
        let id = mux.open().expect("fresh mux has ids");
        mux.write(id, &[0u8; 3000])
            .expect("fresh stream takes data");
    }
    mux.verify(0x1234, 0x5678_9abc).expect("first challenge");
    let mut out = Vec::new();
    mux.poll_transmit(usize::MAX, &mut out);
    let mut buf = [0u8; 1500];
    let mut failed = None;
    // Feed in chunks whose sizes come from the input itself.
    let mut input = rest;
    let mut turn = 0usize;
    while !input.is_empty() {
        let take = (usize::from(input[0]) % 97 + 1).min(input.len());
        let (chunk, tail) = input.split_at(take);
        input = tail;
        let result = mux.handle_input(chunk);
        match (&failed, result) {
            (None, Err(error)) => failed = Some(error),
            (Some(first), Err(again)) => assert_eq!(*first, again, "a dead mux repeats its error"),
            (Some(_), Ok(())) => panic!("input accepted after a fatal error"),
            (None, Ok(())) => {}
        }
        while mux.poll_event().is_some() {}
        while let Some(id) = mux.accept() {
            if turn.is_multiple_of(3) {
                mux.close(id);
            }
        }
        // Read and write on every id the input may have named, and transmit.
        for raw in 1..=8u16 {
            let id = fabric::mux::StreamId(raw);
            match mux.read(id, &mut buf) {
                Ok(_) | Err(StreamError::WouldBlock | StreamError::UnknownStream(_)) => {}
                Err(StreamError::MuxFailed(_)) => assert!(failed.is_some()),
                Err(other) => panic!("unexpected read error {other:?}"),
            }
            let _ = mux.write(id, &buf[..turn % 700]);
            if turn.is_multiple_of(5) {
                let _ = mux.finish(id);
            }
        }
        out.clear();
        mux.poll_transmit(turn * 131 % 70_000, &mut out);
        if failed.is_some() {
            assert!(out.is_empty() && !mux.has_transmit());
        }
        turn += 1;
    }
    let stats = mux.stats();
    assert!(stats.recv_buffered <= stats.streams * (4096usize << 7) * 2);
});
