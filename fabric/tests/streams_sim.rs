//! Streams of the mux over a KCP session on simulated lossy paths: many concurrent streams,
//! every byte checked by SHA-256; a reader that stops never stalls the others; streams
//! survive a path change.

use std::collections::HashMap;

use fabric::connection::Connection;
use fabric::mux::{self, StreamError, StreamId};
use fabric::session;
use fabric::testing::{LinkConfig, Pair, SimNet};
use fabric::time::{Duration, Instant};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use sha2::{Digest, Sha256};

fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0; len];
    ChaCha20Rng::seed_from_u64(seed).fill(&mut v[..]);
    v
}

fn link(rtt_ms: u64, loss: f64) -> LinkConfig {
    LinkConfig::with_rate_rtt_loss(100, Duration::from_millis(rtt_ms), loss)
}

/// `A` opens streams and writes a payload on each, then finishes it; `B` accepts them and
/// reads each to its end.
struct Upload {
    outgoing: Vec<(StreamId, Vec<u8>, usize, bool)>,
    incoming: HashMap<StreamId, (Vec<u8>, bool)>,
    /// Streams `B` does not read (to prove they block nothing else).
    unread: usize,
    /// A stream `B` accepts that is not part of the upload.
    ignore: Option<StreamId>,
    buf: Vec<u8>,
}

impl Upload {
    fn start(a: &mut Connection, sizes: &[usize], unread: usize) -> Self {
        let outgoing = sizes
            .iter()
            .enumerate()
            .map(|(i, &len)| (a.mux().open().unwrap(), payload(len, i as u64), 0, false))
            .collect();
        Self {
            outgoing,
            incoming: HashMap::new(),
            unread,
            ignore: None,
            buf: vec![0; 64 * 1024],
        }
    }

    /// One round of application work; true once every read stream has reached its end.
    fn pump(&mut self, a: &mut Connection, b: &mut Connection) -> bool {
        for (id, data, written, finished) in &mut self.outgoing {
            while *written < data.len() {
                match a.mux().write(*id, &data[*written..]) {
                    Ok(0) => break,
                    Ok(n) => *written += n,
                    Err(e) => panic!("write: {e}"),
                }
            }
            if *written == data.len() && !*finished {
                a.mux().finish(*id).unwrap();
                *finished = true;
            }
        }
        while let Some(id) = b.mux().accept() {
            self.incoming.insert(id, (Vec::new(), false));
        }
        let mut done = 0;
        for (id, (got, eof)) in &mut self.incoming {
            // The first `unread` streams (by id) are never read.
            if (id.0 as usize) <= self.unread || Some(*id) == self.ignore {
                continue;
            }
            while !*eof {
                match b.mux().read(*id, &mut self.buf) {
                    Ok(0) => *eof = true,
                    Ok(n) => got.extend_from_slice(&self.buf[..n]),
                    Err(StreamError::WouldBlock) => break,
                    Err(e) => panic!("read: {e}"),
                }
            }
            done += usize::from(*eof);
        }
        done == self.outgoing.len() - self.unread
    }

    fn verify(&self) {
        for (id, data, _, _) in &self.outgoing {
            if (id.0 as usize) <= self.unread {
                continue;
            }
            let (got, eof) = &self.incoming[id];
            assert!(eof);
            assert_eq!(got.len(), data.len(), "stream {id:?} length");
            assert_eq!(
                Sha256::digest(got),
                Sha256::digest(data),
                "stream {id:?} content"
            );
        }
    }
}

#[test]
fn many_streams_at_every_loss_level() {
    for (i, loss) in [0.0, 0.01, 0.05, 0.10, 0.20].into_iter().enumerate() {
        let t0 = Instant::now();
        let net = SimNet::symmetric(link(40, loss), 7 + i as u64);
        let mut pair =
            Pair::connections(net, session::Config::default(), mux::Config::default(), t0);
        // 32 streams, 64 KiB to 1 MiB each: about 12 MB in all.
        let sizes: Vec<usize> = (0..32).map(|k| (64 << 10) + k * (30 << 10)).collect();
        let mut up = Upload::start(&mut pair.a, &sizes, 0);
        let done = pair.run_until(t0 + Duration::from_secs(300), |a, b, _| up.pump(a, b));
        assert!(done, "loss {loss}: not done in 300 virtual seconds");
        up.verify();
    }
}

#[test]
fn a_reader_that_stops_blocks_no_other_stream() {
    let t0 = Instant::now();
    let net = SimNet::symmetric(link(40, 0.02), 11);
    let mut pair = Pair::connections(net, session::Config::default(), mux::Config::default(), t0);
    // Stream 1 carries 8 MiB that are never read; streams 2..=9 must still complete.
    let mut sizes = vec![8 << 20];
    sizes.extend([1 << 20; 8]);
    let mut up = Upload::start(&mut pair.a, &sizes, 1);
    let done = pair.run_until(t0 + Duration::from_secs(120), |a, b, _| up.pump(a, b));
    assert!(done, "the other streams stalled behind the unread one");
    up.verify();
    // The unread stream holds at most one window at the receiver.
    let window = mux::Config::default().window as usize;
    assert!(pair.b.mux().stats().recv_buffered <= window);
}

#[test]
fn streams_survive_a_path_change() {
    let t0 = Instant::now();
    let net = SimNet::symmetric(link(150, 0.05), 12);
    let mut pair = Pair::connections(net, session::Config::default(), mux::Config::default(), t0);
    let mut up = Upload::start(&mut pair.a, &[2 << 20; 6], 0);
    let reached = pair.run_until(t0 + Duration::from_secs(120), |a, b, _| {
        up.pump(a, b);
        up.incoming.values().map(|(g, _)| g.len()).sum::<usize>() > 4 << 20
    });
    assert!(reached);
    // Direct link found: same session, new path, packets on the old one lost.
    pair.net = SimNet::symmetric(link(5, 0.0), 13);
    assert!(pair.run_until(t0 + Duration::from_secs(240), |a, b, _| up.pump(a, b)));
    up.verify();
}

#[test]
fn request_response_beside_a_bulk_transfer() {
    let t0 = Instant::now();
    let net = SimNet::symmetric(link(40, 0.05), 14);
    let mut pair = Pair::connections(net, session::Config::default(), mux::Config::default(), t0);
    let mut bulk = Upload::start(&mut pair.a, &[32 << 20], 0);
    let rr = pair.a.mux().open().unwrap();
    bulk.ignore = Some(rr);
    let mut rr_peer = None;
    let mut sent_at = None;
    let mut rtts = Vec::new();
    let mut buf = [0u8; 16];
    let done = pair.run_until(t0 + Duration::from_secs(120), |a, b, now| {
        let bulk_done = bulk.pump(a, b);
        if bulk.incoming.len() < 2 {
            // The request stream is accepted along with the bulk one.
            return false;
        }
        let peer = *rr_peer.get_or_insert_with(|| {
            *bulk
                .incoming
                .keys()
                .find(|id| **id == rr)
                .expect("request stream")
        });
        if sent_at.is_none() && rtts.len() < 50 {
            assert_eq!(a.mux().write(rr, b"?").unwrap(), 1);
            sent_at = Some(now);
        }
        if let Ok(1) = b.mux().read(peer, &mut buf) {
            assert_eq!(b.mux().write(peer, b"!").unwrap(), 1);
        }
        if let Ok(1) = a.mux().read(rr, &mut buf) {
            rtts.push(now - sent_at.take().unwrap());
        }
        bulk_done || rtts.len() == 50
    });
    assert!(done);
    assert_eq!(rtts.len(), 50, "every request answered");
    rtts.sort();
    // Request and response travel between bulk frames, not behind all of them: far below the
    // seconds a first-in-first-out queue of 32 MiB would take.
    assert!(
        rtts[25] < Duration::from_millis(400),
        "median {:?}",
        rtts[25]
    );
}
