//! Operation sequences on two honest muxes joined by a budgeted link. Honest peers never see
//! a protocol error; every byte read is the next byte its writer wrote; and once everything
//! is closed, every id is released on both ends.

#![no_main]

use std::collections::HashMap;

use arbitrary::Arbitrary;
use fabric::mux::{Config, Event, Mux, StreamError, StreamId};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
enum Op {
    Open(bool),
    Accept(bool),
    Write { side: bool, stream: u8, len: u16 },
    Read { side: bool, stream: u8, len: u16 },
    Finish { side: bool, stream: u8 },
    Close { side: bool, stream: u8 },
    Transmit { side: bool, budget: u16 },
    Verify { side: bool, v1: u16, v2: u32 },
}

#[derive(Debug, Arbitrary)]
struct Input {
    window_shift: u8,
    max_frame: u16,
    backlog: u8,
    ops: Vec<Op>,
}

/// One end: its mux, the streams its application holds, and per-id byte counters.
struct End {
    mux: Mux,
    held: Vec<StreamId>,
    written: HashMap<u16, u64>,
    read: HashMap<u16, u64>,
}

/// The byte at `offset` of any stream: a pattern that catches loss, duplication and reordering.
fn pattern(offset: u64) -> u8 {
    (offset % 251) as u8
}

impl End {
    fn new(config: Config) -> Self {
        Self {
            mux: Mux::new(config),
            held: Vec::new(),
            written: HashMap::new(),
            read: HashMap::new(),
        }
    }

    fn pick(&self, index: u8) -> Option<StreamId> {
        (!self.held.is_empty()).then(|| self.held[usize::from(index) % self.held.len()])
    }

    fn drain_events(&mut self) {
        while let Some(event) = self.mux.poll_event() {
            if let Event::Released(id) = event {
                assert!(
                    !self.held.contains(&id),
                    "released {id} while the application holds it"
                );
                self.written.remove(&id.0);
                self.read.remove(&id.0);
            }
        }
    }

    fn accept_all(&mut self) {
        while let Some(id) = self.mux.accept() {
            assert!(!self.held.contains(&id));
            self.held.push(id);
        }
    }

    fn write(&mut self, id: StreamId, len: usize) {
        let offset = *self.written.get(&id.0).unwrap_or(&0);
        let data: Vec<u8> = (0..len as u64).map(|i| pattern(offset + i)).collect();
        match self.mux.write(id, &data) {
            Ok(n) => *self.written.entry(id.0).or_default() += n as u64,
            Err(StreamError::Finished(_)) => {}
            Err(error) => panic!("write on held stream {id}: {error}"),
        }
    }

    fn read(&mut self, id: StreamId, len: usize) {
        let mut buf = vec![0u8; len.max(1)];
        match self.mux.read(id, &mut buf) {
            Ok(n) => {
                let offset = self.read.entry(id.0).or_default();
                for (i, &byte) in buf[..n].iter().enumerate() {
                    assert_eq!(
                        byte,
                        pattern(*offset + i as u64),
                        "stream {id} byte {}",
                        *offset + i as u64
                    );
                }
                *offset += n as u64;
            }
            Err(StreamError::WouldBlock) => {}
            Err(error) => panic!("read on held stream {id}: {error}"),
        }
    }

    fn close(&mut self, id: StreamId) {
        self.mux.close(id);
        self.held.retain(|&h| h != id);
    }
}

fn transmit(from: &mut End, to: &mut End, budget: usize) -> usize {
    let mut wire = Vec::new();
    let n = from.mux.poll_transmit(budget, &mut wire);
    assert!(n <= budget && n == wire.len());
    to.mux
        .handle_input(&wire)
        .expect("honest peers never violate the protocol");
    from.drain_events();
    to.drain_events();
    n
}

fuzz_target!(|input: Input| {
    let config = Config {
        window: 1024 << (input.window_shift % 10),
        max_frame: usize::from(input.max_frame).max(1),
        max_input_frame: 64 * 1024,
        accept_backlog: usize::from(input.backlog % 16) + 1,
        ..Config::default()
    };
    let mut ends = [End::new(config.clone()), End::new(config)];
    for op in input.ops.iter().take(2000) {
        match *op {
            Op::Open(side) => {
                let end = &mut ends[usize::from(side)];
                if let Ok(id) = end.mux.open() {
                    end.held.push(id);
                }
            }
            Op::Accept(side) => ends[usize::from(side)].accept_all(),
            Op::Write { side, stream, len } => {
                let end = &mut ends[usize::from(side)];
                if let Some(id) = end.pick(stream) {
                    end.write(id, usize::from(len));
                }
            }
            Op::Read { side, stream, len } => {
                let end = &mut ends[usize::from(side)];
                if let Some(id) = end.pick(stream) {
                    end.read(id, usize::from(len));
                }
            }
            Op::Finish { side, stream } => {
                let end = &mut ends[usize::from(side)];
                if let Some(id) = end.pick(stream) {
                    end.mux.finish(id).expect("finish a held stream");
                }
            }
            Op::Close { side, stream } => {
                let end = &mut ends[usize::from(side)];
                if let Some(id) = end.pick(stream) {
                    end.close(id);
                }
            }
            Op::Transmit { side, budget } => {
                let [a, b] = &mut ends;
                let (from, to) = if side { (b, a) } else { (a, b) };
                transmit(from, to, usize::from(budget));
            }
            Op::Verify { side, v1, v2 } => {
                let _ = ends[usize::from(side)].mux.verify(v1, v2);
            }
        }
    }
    // Wind down: both applications accept and close everything; the link runs until quiet.
    for _ in 0..64 {
        for end in &mut ends {
            end.accept_all();
            for id in end.held.clone() {
                end.close(id);
            }
            end.drain_events();
        }
        let [a, b] = &mut ends;
        let moved = transmit(a, b, 1 << 20) + transmit(b, a, 1 << 20);
        if moved == 0 && !a.mux.has_transmit() && !b.mux.has_transmit() {
            break;
        }
    }
    for end in &ends {
        assert_eq!(
            end.mux.stats().streams,
            0,
            "every id released: {:?}",
            end.mux.stats()
        );
        assert!(end.mux.failure().is_none());
    }
});
