//! Deterministic simulated networks for tests, benches and the wasm demo.
//!
//! [`SimLink`] is one direction of a path: a bottleneck of a given bandwidth with a drop-tail
//! queue, then a one-way delay with jitter, random loss, reordering, duplication and an MTU.
//! [`SimNet`] joins two links into a duplex path between endpoint `A` and endpoint `B`.
//! Everything is driven in virtual time: callers pass `now`, ask [`SimNet::next_delivery`]
//! when the next packet lands, and jump the clock there. One seeded `ChaCha20Rng` per link
//! makes every run with the same seed identical, so a failing seed can be replayed.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::connection::{Connection, Endpoint};
use crate::mux::Config as MuxConfig;
use crate::session::{Config as SessionConfig, ConvId, Session};
use crate::time::{Duration, Instant};

/// How one direction of a simulated path behaves.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkConfig {
    /// Bottleneck rate in bits per second; `None` serialises instantly.
    pub bandwidth_bps: Option<u64>,
    /// Bytes the bottleneck may hold waiting for the wire; arrivals beyond it are dropped
    /// (drop-tail), as a router buffer would.
    pub queue_limit: usize,
    /// One-way propagation delay.
    pub delay: Duration,
    /// Extra delay drawn uniformly from `0..=jitter` for each packet. Jitter alone does not
    /// reorder: a packet never lands before the one sent ahead of it unless `reorder` says so.
    pub jitter: Duration,
    /// Probability that a packet is lost.
    pub loss: f64,
    /// Probability that a packet is held back by an extra `delay / 2 + jitter` and so
    /// overtaken by later packets.
    pub reorder: f64,
    /// Probability that a packet is delivered twice.
    pub duplicate: f64,
    /// Largest packet the link carries; larger ones are dropped and counted.
    pub mtu: usize,
}

impl Default for LinkConfig {
    fn default() -> Self {
        Self {
            bandwidth_bps: None,
            queue_limit: usize::MAX,
            delay: Duration::from_millis(10),
            jitter: Duration::ZERO,
            loss: 0.0,
            reorder: 0.0,
            duplicate: 0.0,
            mtu: 1500,
        }
    }
}

impl LinkConfig {
    /// A link of `mbit` Mbit/s with `rtt / 2` one-way delay and `loss` random loss, whose
    /// bottleneck buffer holds one bandwidth-delay product (a common router sizing).
    pub fn with_rate_rtt_loss(mbit: u64, rtt: Duration, loss: f64) -> Self {
        let bps = mbit * 1_000_000;
        let bdp = (bps as f64 / 8.0 * rtt.as_secs_f64()) as usize;
        Self {
            bandwidth_bps: Some(bps),
            queue_limit: bdp.max(64 * 1024),
            delay: rtt / 2,
            loss,
            ..Self::default()
        }
    }
}

/// Counters of one simulated link.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Packets handed to the link.
    pub sent: u64,
    /// Packets delivered (duplicates count twice).
    pub delivered: u64,
    /// Packets dropped by random loss.
    pub lost: u64,
    /// Packets dropped because the bottleneck queue was full.
    pub queue_drops: u64,
    /// Packets dropped for exceeding the MTU.
    pub mtu_drops: u64,
    /// Bytes delivered.
    pub delivered_bytes: u64,
}

#[derive(Debug)]
struct InFlight {
    at: Instant,
    seq: u64,
    packet: Vec<u8>,
}

impl PartialEq for InFlight {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for InFlight {}
impl PartialOrd for InFlight {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for InFlight {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// One direction of a simulated path.
#[derive(Debug)]
pub struct SimLink {
    config: LinkConfig,
    rng: ChaCha20Rng,
    /// When the bottleneck finishes serialising what it already holds.
    wire_free_at: Option<Instant>,
    /// Landing time of the last in-order packet, so jitter never reorders on its own.
    last_landing: Option<Instant>,
    in_flight: BinaryHeap<Reverse<InFlight>>,
    seq: u64,
    stats: LinkStats,
}

impl SimLink {
    /// A link with `config`, its randomness seeded by `seed`.
    pub fn new(config: LinkConfig, seed: u64) -> Self {
        Self {
            config,
            rng: ChaCha20Rng::seed_from_u64(seed),
            wire_free_at: None,
            last_landing: None,
            in_flight: BinaryHeap::new(),
            seq: 0,
            stats: LinkStats::default(),
        }
    }

    /// The link's behaviour.
    pub fn config(&self) -> &LinkConfig {
        &self.config
    }

    /// Changes the link's behaviour from now on; packets already in flight keep their times.
    pub fn set_config(&mut self, config: LinkConfig) {
        self.config = config;
    }

    /// Counters so far.
    pub fn stats(&self) -> LinkStats {
        self.stats
    }

    /// Hands `packet` to the link at `now`.
    pub fn send(&mut self, now: Instant, packet: &[u8]) {
        self.stats.sent += 1;
        if packet.len() > self.config.mtu {
            self.stats.mtu_drops += 1;
            return;
        }
        // Serialisation through the bottleneck comes first: a packet lost further along
        // still used the wire.
        let leaves_at = match self.config.bandwidth_bps {
            Some(bps) => {
                let start = self.wire_free_at.filter(|t| *t > now).unwrap_or(now);
                let queued = start.saturating_duration_since(now);
                let queued_bytes = (queued.as_secs_f64() * bps as f64 / 8.0) as usize;
                if queued_bytes + packet.len() > self.config.queue_limit {
                    self.stats.queue_drops += 1;
                    return;
                }
                let wire = Duration::from_secs_f64(packet.len() as f64 * 8.0 / bps as f64);
                self.wire_free_at = Some(start + wire);
                start + wire
            }
            None => now,
        };
        if self.chance(self.config.loss) {
            self.stats.lost += 1;
            return;
        }
        let mut at = leaves_at + self.config.delay + self.jitter();
        if self.chance(self.config.reorder) {
            at += self.config.delay / 2 + self.config.jitter + Duration::from_millis(1);
        } else {
            if let Some(last) = self.last_landing {
                at = at.max(last);
            }
            self.last_landing = Some(at);
        }
        if self.chance(self.config.duplicate) {
            let again = at + self.jitter();
            self.push(again, packet.to_vec());
        }
        self.push(at, packet.to_vec());
    }

    /// When the next packet lands, if any is in flight.
    pub fn next_delivery(&self) -> Option<Instant> {
        self.in_flight.peek().map(|Reverse(p)| p.at)
    }

    /// A packet that has landed by `now`, oldest first.
    pub fn poll_deliver(&mut self, now: Instant) -> Option<Vec<u8>> {
        if self.next_delivery()? > now {
            return None;
        }
        let Reverse(p) = self.in_flight.pop()?;
        self.stats.delivered += 1;
        self.stats.delivered_bytes += p.packet.len() as u64;
        Some(p.packet)
    }

    /// Whether nothing is in flight.
    pub fn is_idle(&self) -> bool {
        self.in_flight.is_empty()
    }

    fn push(&mut self, at: Instant, packet: Vec<u8>) {
        self.seq += 1;
        self.in_flight.push(Reverse(InFlight {
            at,
            seq: self.seq,
            packet,
        }));
    }

    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.rng.random::<f64>() < p
    }

    fn jitter(&mut self) -> Duration {
        if self.config.jitter.is_zero() {
            return Duration::ZERO;
        }
        let nanos = self.config.jitter.as_nanos() as u64;
        Duration::from_nanos(self.rng.random_range(0..=nanos))
    }
}

/// Which end of a [`SimNet`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The first endpoint.
    A,
    /// The second endpoint.
    B,
}

impl Side {
    /// The other end.
    pub fn peer(self) -> Self {
        match self {
            Self::A => Self::B,
            Self::B => Self::A,
        }
    }
}

/// A duplex simulated path: `A → B` and `B → A` links with their own seeds.
#[derive(Debug)]
pub struct SimNet {
    /// The link carrying packets from `A` to `B`.
    pub a_to_b: SimLink,
    /// The link carrying packets from `B` to `A`.
    pub b_to_a: SimLink,
}

impl SimNet {
    /// A path whose two directions both behave as `config`.
    pub fn symmetric(config: LinkConfig, seed: u64) -> Self {
        Self::new(config.clone(), config, seed)
    }

    /// A path with separately configured directions.
    pub fn new(a_to_b: LinkConfig, b_to_a: LinkConfig, seed: u64) -> Self {
        Self {
            a_to_b: SimLink::new(a_to_b, seed),
            b_to_a: SimLink::new(b_to_a, seed ^ 0x9E37_79B9_7F4A_7C15),
        }
    }

    /// Sends `packet` from `from` towards the other end.
    pub fn send(&mut self, from: Side, now: Instant, packet: &[u8]) {
        self.link_from(from).send(now, packet);
    }

    /// A packet that has reached `to` by `now`.
    pub fn poll_deliver(&mut self, to: Side, now: Instant) -> Option<Vec<u8>> {
        self.link_from(to.peer()).poll_deliver(now)
    }

    /// When the next packet lands at either end.
    pub fn next_delivery(&self) -> Option<Instant> {
        match (self.a_to_b.next_delivery(), self.b_to_a.next_delivery()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The link carrying packets sent by `from`.
    pub fn link_from(&mut self, from: Side) -> &mut SimLink {
        match from {
            Side::A => &mut self.a_to_b,
            Side::B => &mut self.b_to_a,
        }
    }
}

/// Two endpoints ([`Session`]s, or [`Connection`]s with
/// their streams) joined by a [`SimNet`], driven in virtual time.
///
/// Each [`Pair::step`] delivers every packet that has landed, runs due timers, lets the
/// caller move application data, then sends everything the sessions have to send. Time jumps
/// straight to the next landing or deadline, so a simulated hour takes seconds.
#[derive(Debug)]
pub struct Pair<E = Session> {
    /// The path between the two sessions; swap it to move them to another path.
    pub net: SimNet,
    /// Endpoint `A`.
    pub a: E,
    /// Endpoint `B`.
    pub b: E,
    /// Virtual time.
    pub now: Instant,
    buf: Vec<u8>,
}

impl Pair<Session> {
    /// Two sessions with `config`, over `net`, starting at `now`.
    pub fn new(net: SimNet, config: SessionConfig, now: Instant) -> Self {
        let conv = ConvId(0x5EED);
        let a = Session::new(conv, config.clone(), now);
        let b = Session::new(conv, config, now);
        Self::with(net, a, b, now)
    }
}

impl Pair<Connection> {
    /// Two connections (mux over session) over `net`, starting at `now`.
    pub fn connections(net: SimNet, session: SessionConfig, mux: MuxConfig, now: Instant) -> Self {
        let conv = ConvId(0x5EED);
        let a = Connection::new(conv, session.clone(), mux.clone(), now);
        let b = Connection::new(conv, session, mux, now);
        Self::with(net, a, b, now)
    }
}

impl<E: Endpoint> Pair<E> {
    /// Two endpoints over `net`, starting at `now`.
    pub fn with(net: SimNet, a: E, b: E, now: Instant) -> Self {
        Self {
            net,
            a,
            b,
            now,
            buf: Vec::new(),
        }
    }

    /// One round: input, timers, `app(a, b, now)`, output. Returns `false` once nothing is
    /// left to happen (no packet in flight and no deadline), and then leaves time alone.
    pub fn step(&mut self, mut app: impl FnMut(&mut E, &mut E, Instant)) -> bool {
        let now = self.now;
        for side in [Side::A, Side::B] {
            while let Some(p) = self.net.poll_deliver(side, now) {
                // Refused packets (loss-mangled, duplicated) are the session's business.
                let _ = self.session(side).handle_input(now, &p);
            }
            let s = self.session(side);
            if s.poll_timeout().is_some_and(|t| t <= now) {
                s.handle_timeout(now);
            }
        }
        app(&mut self.a, &mut self.b, now);
        for side in [Side::A, Side::B] {
            let mut buf = std::mem::take(&mut self.buf);
            while self.session(side).poll_transmit(now, &mut buf).is_some() {
                self.net.send(side, now, &buf);
            }
            self.buf = buf;
        }
        let next = [
            self.net.next_delivery(),
            self.a.poll_timeout(),
            self.b.poll_timeout(),
        ]
        .into_iter()
        .flatten()
        .min();
        match next {
            Some(t) => {
                self.now = t.max(now);
                true
            }
            None => false,
        }
    }

    /// Runs [`Pair::step`] until `done` says so or virtual time passes `limit`. Returns
    /// whether `done` was reached.
    pub fn run_until(
        &mut self,
        limit: Instant,
        mut app: impl FnMut(&mut E, &mut E, Instant) -> bool,
    ) -> bool {
        let mut done = false;
        while !done && self.now <= limit {
            if !self.step(|a, b, now| done = app(a, b, now)) && !done {
                return false;
            }
        }
        done
    }

    fn session(&mut self, side: Side) -> &mut E {
        match side {
            Side::A => &mut self.a,
            Side::B => &mut self.b,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(link: &mut SimLink, until: Instant) -> Vec<(Instant, Vec<u8>)> {
        let mut out = Vec::new();
        while let Some(at) = link.next_delivery() {
            if at > until {
                break;
            }
            out.push((at, link.poll_deliver(at).unwrap()));
        }
        out
    }

    #[test]
    fn delay_and_bandwidth_shape_delivery() {
        let t0 = Instant::now();
        let config = LinkConfig {
            bandwidth_bps: Some(8_000_000), // 1 MB/s: a 1000-byte packet takes 1 ms
            delay: Duration::from_millis(20),
            ..LinkConfig::default()
        };
        let mut link = SimLink::new(config, 1);
        for i in 0..10u8 {
            link.send(t0, &[i; 1000]);
        }
        let got = drain(&mut link, t0 + Duration::from_secs(1));
        assert_eq!(got.len(), 10);
        for (i, (at, p)) in got.iter().enumerate() {
            assert_eq!(p[0], i as u8, "in order");
            let expect = Duration::from_millis(20 + 1 + i as u64);
            let took = at.duration_since(t0);
            assert!(
                took.abs_diff(expect) < Duration::from_micros(10),
                "{took:?}"
            );
        }
    }

    #[test]
    fn drop_tail_queue_and_mtu() {
        let t0 = Instant::now();
        let config = LinkConfig {
            bandwidth_bps: Some(8_000_000),
            queue_limit: 5_000,
            mtu: 1000,
            ..LinkConfig::default()
        };
        let mut link = SimLink::new(config, 1);
        link.send(t0, &[0; 1001]);
        for _ in 0..10 {
            link.send(t0, &[0; 1000]);
        }
        let s = link.stats();
        assert_eq!(s.mtu_drops, 1);
        assert_eq!(s.queue_drops, 5);
        assert_eq!(drain(&mut link, t0 + Duration::from_secs(1)).len(), 5);
    }

    #[test]
    fn loss_rate_is_close_to_config_and_seed_replays() {
        let t0 = Instant::now();
        let config = LinkConfig {
            loss: 0.2,
            ..LinkConfig::default()
        };
        let run = |seed| {
            let mut link = SimLink::new(config.clone(), seed);
            for i in 0..10_000u32 {
                link.send(t0, &i.to_le_bytes());
            }
            drain(&mut link, t0 + Duration::from_secs(1))
                .into_iter()
                .map(|(_, p)| p)
                .collect::<Vec<_>>()
        };
        let a = run(7);
        assert_eq!(a, run(7), "same seed, same run");
        assert_ne!(a, run(8));
        let lost = 10_000 - a.len();
        assert!((1800..2200).contains(&lost), "lost {lost}");
    }

    #[test]
    fn jitter_keeps_order_unless_reordering_is_asked_for() {
        let t0 = Instant::now();
        let mut config = LinkConfig {
            jitter: Duration::from_millis(5),
            ..LinkConfig::default()
        };
        let order = |config: LinkConfig| {
            let mut link = SimLink::new(config, 3);
            for i in 0..1000u32 {
                link.send(t0 + Duration::from_micros(i as u64 * 100), &i.to_le_bytes());
            }
            drain(&mut link, t0 + Duration::from_secs(10))
                .into_iter()
                .map(|(_, p)| u32::from_le_bytes(p.try_into().unwrap()))
                .collect::<Vec<_>>()
        };
        let plain = order(config.clone());
        assert!(plain.windows(2).all(|w| w[0] < w[1]));
        config.reorder = 0.1;
        config.duplicate = 0.05;
        let mixed = order(config);
        assert!(mixed.windows(2).any(|w| w[0] > w[1]), "some reordering");
        assert!(mixed.len() > 1020, "some duplicates: {}", mixed.len());
    }
}
