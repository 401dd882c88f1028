//! UDP hole punching, sans-IO: probe every remote candidate from one local socket, agree on
//! one verified address, then hold the NAT mapping open with keepalives.
//!
//! ```text
//!  controlling (lower x25519 key)                controlled
//!  Probe{id} ──► every remote candidate ──►      answers ProbeAck{id} to the source address,
//!  ◄── ProbeAck{id}                              and probes too (adding unknown sources as
//!  first acked address = verified               peer-reflexive candidates)
//!  Nominate{id} ──► verified address ──►         winner = source of Nominate
//!  ◄── NominateAck{id}                           Event::Connected
//!  Event::Connected
//!  Keepalive{token} ◄──► KeepaliveAck{token}     every keepalive interval, both ways
//!  nothing authenticated for `dead_after` ──►    Event::Dead
//! ```
//!
//! Every packet, probes included, is sealed with the link keys (see [`crate::link`]), so only
//! the peer that holds the Tox-exchanged keys can verify a pair or inject data. Only the
//! controlling side nominates, so both ends agree on the winner without a tie-break.
//!
//! Poll order: after [`UdpPunch::handle_input`] / [`UdpPunch::handle_timeout`], drain
//! [`UdpPunch::poll_transmit`] and [`UdpPunch::poll_event`], then sleep until
//! [`UdpPunch::poll_timeout`].

use std::collections::VecDeque;
use std::net::SocketAddr;

use super::filter::AddressFilter;
use crate::link::{LinkKeys, OpenError, Opener, SealError, Sealer};
use crate::time::{Duration, Instant};

/// Timings of punching and keepalive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PunchConfig {
    /// The gap between two probes (round-robin over the remote candidates), and between
    /// nomination retransmissions. RFC 8445's Ta is 50 ms; we punch faster.
    pub probe_interval: Duration,
    /// Give up if no pair is agreed by then.
    pub punch_timeout: Duration,
    /// How often a keepalive goes out on the agreed path (NAT UDP mappings last ≥ 30 s in
    /// practice; RFC 4787 asks for ≥ 2 min).
    pub keepalive_interval: Duration,
    /// Declare the path dead after this long without an authenticated packet from the peer.
    pub dead_after: Duration,
}

impl Default for PunchConfig {
    fn default() -> Self {
        Self {
            probe_interval: Duration::from_millis(20),
            punch_timeout: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(15),
            dead_after: Duration::from_secs(50),
        }
    }
}

/// What the punch reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// Both sides agreed on this remote address; [`UdpPunch::seal_data`] works from now on.
    Connected {
        /// Where the peer is reached.
        remote: SocketAddr,
    },
    /// No pair was agreed within the punch timeout.
    Failed,
    /// The agreed path carried nothing authenticated for `dead_after`.
    Dead,
}

/// A packet to send: its bytes were written to the caller's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transmit {
    /// The destination.
    pub dst: SocketAddr,
}

/// What a received packet was.
#[derive(Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Input<'a> {
    /// A session packet from the peer (decrypted in place).
    Data(&'a [u8]),
    /// Punching or keepalive traffic, handled.
    Control,
}

/// Why a received packet was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InputError {
    /// It did not open (not a link packet, replay, forgery).
    #[error(transparent)]
    Open(#[from] OpenError),
    /// It opened but its contents are malformed (a buggy peer; a stranger cannot get here).
    #[error("malformed link message")]
    Malformed,
}

/// Why data could not be sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// No pair is agreed (yet, or any more).
    #[error("punched path not connected")]
    NotConnected,
    /// Sealing failed.
    #[error(transparent)]
    Seal(#[from] SealError),
}

/// The first byte of the plaintext of a link packet.
mod msg {
    pub(super) const PROBE: u8 = 1;
    pub(super) const PROBE_ACK: u8 = 2;
    pub(super) const NOMINATE: u8 = 3;
    pub(super) const NOMINATE_ACK: u8 = 4;
    pub(super) const KEEPALIVE: u8 = 5;
    pub(super) const KEEPALIVE_ACK: u8 = 6;
    pub(super) const DATA: u8 = 0x10;
}

/// The most remote candidates we probe (signalling carries at most 40, plus peer-reflexive).
const MAX_REMOTES: usize = 64;
/// The most control packets queued; beyond that, answers are dropped (the peer retries).
const MAX_QUEUED: usize = 64;
/// How many sent probes we remember for matching acks and measuring RTT.
const PROBE_MEMORY: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Probing,
    /// Controlling: nominated `remote` with `id`, waiting for the ack.
    Nominating {
        remote: SocketAddr,
        id: u64,
    },
    Connected {
        remote: SocketAddr,
    },
    Failed,
    Dead,
}

/// The timers, indexing [`UdpPunch::timers`].
#[derive(Debug, Clone, Copy)]
enum Timer {
    /// Send the next probe, or retransmit the nomination.
    Probe = 0,
    /// Give up punching.
    GiveUp = 1,
    /// Send a keepalive.
    Keepalive = 2,
    /// Check whether the path went quiet.
    Idle = 3,
}

/// One UDP punching attempt and, once it succeeds, the link it made. See the module docs.
#[derive(Debug)]
pub struct UdpPunch {
    config: PunchConfig,
    controlling: bool,
    sealer: Sealer,
    opener: Opener,
    state: State,
    remotes: Vec<SocketAddr>,
    next_remote: usize,
    next_id: u64,
    /// Probes sent: id, destination, when.
    sent_probes: VecDeque<(u64, SocketAddr, Instant)>,
    /// Control messages to seal and send: destination, type, id/token.
    queue: VecDeque<(SocketAddr, u8, u64)>,
    events: VecDeque<Event>,
    timers: [Option<Instant>; 4],
    last_heard: Instant,
    keepalive_sent: Option<(u64, Instant)>,
    rtt: Option<Duration>,
    /// Outcomes of the latest keepalives, newest in bit 0 (1: answered), and how many of
    /// [`LOSS_WINDOW`] bits hold one: the path's own loss, whatever the session sends over it.
    keepalive_outcomes: u32,
    keepalive_samples: u32,
    /// Keepalive round trips decided (answered or lost) since the link came up.
    keepalive_rounds: u64,
    /// Which addresses we may send to: remote candidates and sources of control messages.
    filter: AddressFilter,
}

/// Keepalives answered or not before [`UdpPunch::loss`] says anything.
const MIN_LOSS_SAMPLES: u32 = 4;
/// Keepalives [`UdpPunch::loss`] looks back over: long enough for a figure, short enough that
/// a path that recovered is seen to within a few dozen seconds.
const LOSS_WINDOW: u32 = 16;

impl UdpPunch {
    /// Starts punching towards `remotes` (the peer's UDP candidates) with the keys of the
    /// offer exchange.
    pub fn new(now: Instant, keys: LinkKeys, remotes: &[SocketAddr], config: PunchConfig) -> Self {
        let controlling = keys.controlling();
        let (sealer, opener) = keys.split();
        let mut punch = Self {
            config,
            controlling,
            sealer,
            opener,
            state: State::Probing,
            remotes: Vec::new(),
            next_remote: 0,
            next_id: 0,
            sent_probes: VecDeque::new(),
            queue: VecDeque::new(),
            events: VecDeque::new(),
            timers: [None; 4],
            last_heard: now,
            keepalive_sent: None,
            rtt: None,
            keepalive_outcomes: 0,
            keepalive_samples: 0,
            keepalive_rounds: 0,
            filter: AddressFilter::any(),
        };
        for &r in remotes {
            punch.add_remote(r);
        }
        punch.timers[Timer::Probe as usize] = Some(now);
        punch.timers[Timer::GiveUp as usize] = Some(now + config.punch_timeout);
        punch
    }

    /// A link already agreed on `remote` by other means (a direct handshake that reached the
    /// peer there): connected from the start, with keepalives and the dead timer running. Its
    /// first event is [`Event::Connected`].
    pub fn established(
        now: Instant,
        keys: LinkKeys,
        remote: SocketAddr,
        config: PunchConfig,
    ) -> Self {
        // No filter: the driver's socket is connected to `remote`, so nothing else reaches it.
        let mut punch = Self::new(now, keys, &[remote], config);
        punch.connect(now, remote);
        punch
    }

    /// Restricts the addresses it sends to (see [`super::filter`]): remote candidates already
    /// given that the filter refuses are dropped, later ones and the sources of control
    /// messages are checked. [`UdpPunch::new`] filters nothing, for tests that punch on
    /// loopback; a punch towards a peer's candidates must set one.
    pub fn with_filter(mut self, filter: AddressFilter) -> Self {
        self.remotes.retain(|&addr| match filter.check(addr) {
            Ok(()) => true,
            Err(why) => {
                tracing::debug!(%addr, %why, "punch candidate refused");
                false
            }
        });
        self.filter = filter;
        self
    }

    /// Whether this side nominates.
    pub fn controlling(&self) -> bool {
        self.controlling
    }

    /// The agreed remote address, once connected.
    pub fn remote(&self) -> Option<SocketAddr> {
        match self.state {
            State::Connected { remote } => Some(remote),
            _ => None,
        }
    }

    /// The latest round-trip time measured by a probe or keepalive.
    pub fn rtt(&self) -> Option<Duration> {
        self.rtt
    }

    /// The share of the latest keepalives (up to 16, one round trip each, lost either way)
    /// that went unanswered; `None` until a few were sent on the agreed path.
    pub fn loss(&self) -> Option<f64> {
        let n = self.keepalive_samples;
        if n < MIN_LOSS_SAMPLES {
            return None;
        }
        let answered = (self.keepalive_outcomes & ((1 << n) - 1)).count_ones();
        Some(f64::from(n - answered) / f64::from(n))
    }

    /// How many keepalive round trips were decided, answered or lost: a figure's age.
    pub fn keepalive_rounds(&self) -> u64 {
        self.keepalive_rounds
    }

    fn record_keepalive(&mut self, answered: bool) {
        self.keepalive_outcomes = (self.keepalive_outcomes << 1) | u32::from(answered);
        self.keepalive_samples = (self.keepalive_samples + 1).min(LOSS_WINDOW);
        self.keepalive_rounds += 1;
    }

    /// Adds a remote candidate learned later (trickled over Tox). Unspecified addresses,
    /// port 0, duplicates and what the filter refuses are ignored.
    pub fn add_remote(&mut self, addr: SocketAddr) {
        if addr.ip().is_unspecified()
            || addr.port() == 0
            || self.remotes.contains(&addr)
            || self.remotes.len() >= MAX_REMOTES
        {
            return;
        }
        if let Err(why) = self.filter.check(addr) {
            tracing::debug!(%addr, %why, "punch candidate refused");
            return;
        }
        tracing::debug!(%addr, "punch candidate");
        self.remotes.push(addr);
    }

    /// Feeds a packet received on the socket from `from`; decrypts it in place.
    pub fn handle_input<'a>(
        &mut self,
        now: Instant,
        from: SocketAddr,
        packet: &'a mut [u8],
    ) -> Result<Input<'a>, InputError> {
        if matches!(self.state, State::Failed | State::Dead) {
            return Err(InputError::Open(OpenError::NotLink));
        }
        let plain = self.opener.open(packet)?;
        let (&kind, body) = plain.split_first().ok_or(InputError::Malformed)?;
        if let State::Connected { remote } = self.state
            && remote == from
        {
            self.last_heard = now;
        }
        if kind == msg::DATA {
            return Ok(Input::Data(body));
        }
        let id = u64::from_be_bytes(body.try_into().map_err(|_| InputError::Malformed)?);
        tracing::trace!(%from, kind, id, "punch control");
        if let Err(why) = self.filter.check(from) {
            // Every control message is answered, or makes its source a remote: a source we
            // may not send to gets nothing (a replayed probe could name any address).
            tracing::debug!(%from, %why, "punch control from a refused source");
            return Ok(Input::Control);
        }
        match kind {
            msg::PROBE => {
                // The peer can reach us from `from`: answer there, and probe it too (it is a
                // peer-reflexive candidate if we did not know it).
                self.add_remote(from);
                self.enqueue(from, msg::PROBE_ACK, id);
            }
            msg::PROBE_ACK => self.on_probe_ack(now, from, id),
            msg::NOMINATE if !self.controlling => match self.state {
                State::Probing => {
                    self.connect(now, from);
                    self.enqueue(from, msg::NOMINATE_ACK, id);
                }
                // A retransmitted nomination: our ack was lost.
                State::Connected { remote } if remote == from => {
                    self.enqueue(from, msg::NOMINATE_ACK, id);
                }
                _ => {}
            },
            msg::NOMINATE_ACK => {
                if let State::Nominating { remote, id: want } = self.state
                    && remote == from
                    && id == want
                {
                    self.connect(now, from);
                }
            }
            msg::KEEPALIVE => self.enqueue(from, msg::KEEPALIVE_ACK, id),
            msg::KEEPALIVE_ACK => {
                if let Some((token, sent)) = self.keepalive_sent
                    && token == id
                {
                    self.rtt = Some(now.saturating_duration_since(sent));
                    self.keepalive_sent = None;
                    self.record_keepalive(true);
                }
            }
            _ => return Err(InputError::Malformed),
        }
        Ok(Input::Control)
    }

    fn on_probe_ack(&mut self, now: Instant, from: SocketAddr, id: u64) {
        let Some(&(_, dst, sent)) = self.sent_probes.iter().find(|p| p.0 == id) else {
            return;
        };
        // A pair is verified only if the ack comes from where the probe went.
        if dst != from {
            return;
        }
        self.rtt = Some(now.saturating_duration_since(sent));
        if self.controlling && self.state == State::Probing {
            let id = self.take_id();
            tracing::debug!(remote = %from, "punch nominate");
            self.state = State::Nominating { remote: from, id };
            self.enqueue(from, msg::NOMINATE, id);
            self.timers[Timer::Probe as usize] = Some(now + self.config.probe_interval);
        }
    }

    fn connect(&mut self, now: Instant, remote: SocketAddr) {
        tracing::info!(%remote, "punched udp path connected");
        self.state = State::Connected { remote };
        self.last_heard = now;
        self.timers = [None; 4];
        self.timers[Timer::Keepalive as usize] = Some(now + self.config.keepalive_interval);
        self.timers[Timer::Idle as usize] = Some(now + self.config.dead_after);
        self.events.push_back(Event::Connected { remote });
    }

    fn enqueue(&mut self, dst: SocketAddr, kind: u8, id: u64) {
        if self.queue.len() < MAX_QUEUED {
            self.queue.push_back((dst, kind, id));
        }
    }

    fn take_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Runs the timers that are due.
    pub fn handle_timeout(&mut self, now: Instant) {
        let due = |t: Option<Instant>| t.is_some_and(|t| t <= now);
        if due(self.timers[Timer::GiveUp as usize]) {
            tracing::info!("udp punching failed");
            self.state = State::Failed;
            self.timers = [None; 4];
            self.queue.clear();
            self.events.push_back(Event::Failed);
            return;
        }
        if due(self.timers[Timer::Probe as usize]) {
            self.timers[Timer::Probe as usize] = Some(now + self.config.probe_interval);
            match self.state {
                State::Probing if !self.remotes.is_empty() => {
                    let dst = self.remotes[self.next_remote % self.remotes.len()];
                    self.next_remote = self.next_remote.wrapping_add(1);
                    let id = self.take_id();
                    if self.sent_probes.len() >= PROBE_MEMORY {
                        self.sent_probes.pop_front();
                    }
                    self.sent_probes.push_back((id, dst, now));
                    self.enqueue(dst, msg::PROBE, id);
                }
                State::Nominating { remote, id } => self.enqueue(remote, msg::NOMINATE, id),
                _ => {}
            }
        }
        if let State::Connected { remote } = self.state {
            if due(self.timers[Timer::Idle as usize]) {
                let quiet_until = self.last_heard + self.config.dead_after;
                if quiet_until <= now {
                    tracing::info!(%remote, "punched udp path dead");
                    self.state = State::Dead;
                    self.timers = [None; 4];
                    self.events.push_back(Event::Dead);
                    return;
                }
                self.timers[Timer::Idle as usize] = Some(quiet_until);
            }
            if due(self.timers[Timer::Keepalive as usize]) {
                self.timers[Timer::Keepalive as usize] = Some(now + self.config.keepalive_interval);
                let token = self.take_id();
                // The previous keepalive had a whole interval to be answered.
                if self.keepalive_sent.is_some() {
                    self.record_keepalive(false);
                }
                self.keepalive_sent = Some((token, now));
                self.enqueue(remote, msg::KEEPALIVE, token);
            }
        }
    }

    /// Writes the next control packet into `buf` (cleared first) and says where it goes.
    pub fn poll_transmit(&mut self, _now: Instant, buf: &mut Vec<u8>) -> Option<Transmit> {
        let (dst, kind, id) = self.queue.pop_front()?;
        let mut plain = [0u8; 9];
        plain[0] = kind;
        plain[1..].copy_from_slice(&id.to_be_bytes());
        buf.clear();
        if let Err(e) = self.sealer.seal(&plain, buf) {
            tracing::warn!(error = %e, "cannot seal punch message");
            self.queue.clear();
            return None;
        }
        Some(Transmit { dst })
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) must run next; `None` when nothing is
    /// pending (failed or dead). Queued transmits are not timers: drain them first.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.iter().flatten().min().copied()
    }

    /// Seals a session packet for the agreed path: appends it to `out` (not cleared) and
    /// returns where to send it.
    pub fn seal_data(
        &mut self,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<SocketAddr, SendError> {
        let State::Connected { remote } = self.state else {
            return Err(SendError::NotConnected);
        };
        self.sealer.seal_parts(&[&[msg::DATA], payload], out)?;
        Ok(remote)
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha20Rng;

    use super::*;
    use crate::link::LinkSecret;

    fn keys(seed_a: u8, seed_b: u8) -> (LinkKeys, LinkKeys) {
        let a = LinkSecret::from_random([seed_a; 32]);
        let b = LinkSecret::from_random([seed_b; 32]);
        let (pa, pb) = (a.public(), b.public());
        (a.derive(pb).unwrap(), b.derive(pa).unwrap())
    }

    /// A deterministic two-host network: each host has one address; a packet to any other
    /// address vanishes (an unreachable candidate), others are lost with probability `loss`
    /// and arrive after `delay`.
    struct Net {
        rng: ChaCha20Rng,
        loss: f64,
        delay: Duration,
        in_flight: Vec<(Instant, usize, SocketAddr, Vec<u8>)>,
        addrs: [SocketAddr; 2],
        /// Host 1 behind a symmetric NAT: one mapping (destination, public source) per
        /// destination; its own address is unreachable; a mapping only lets in packets from
        /// the destination it was made for.
        symmetric_1: Option<Vec<(SocketAddr, SocketAddr)>>,
    }

    impl Net {
        fn send(&mut self, now: Instant, from: usize, dst: SocketAddr, bytes: Vec<u8>) {
            let mut src = self.addrs[from];
            if from == 1
                && let Some(maps) = &mut self.symmetric_1
            {
                src = match maps.iter().find(|m| m.0 == dst) {
                    Some(m) => m.1,
                    None => {
                        let public =
                            SocketAddr::from(([203, 0, 113, 99], 20000 + maps.len() as u16));
                        maps.push((dst, public));
                        public
                    }
                };
            }
            let to = match &self.symmetric_1 {
                Some(maps) if maps.iter().any(|m| m.1 == dst && m.0 == src) => 1,
                Some(_) if dst == self.addrs[1] => return,
                _ => match self.addrs.iter().position(|&a| a == dst) {
                    Some(to) => to,
                    None => return,
                },
            };
            if to == from || self.rng.random_bool(self.loss) {
                return;
            }
            self.in_flight.push((now + self.delay, to, src, bytes));
        }
    }

    /// Runs both punches until both report an outcome or `limit` passes; returns the events
    /// and when they happened.
    fn run(
        punches: &mut [UdpPunch; 2],
        net: &mut Net,
        start: Instant,
        limit: Duration,
    ) -> [Option<(Event, Instant)>; 2] {
        let mut now = start;
        let mut outcome = [None, None];
        let mut buf = Vec::new();
        while now < start + limit && outcome.iter().any(Option::is_none) {
            // Deliver what is due.
            let (due, later): (Vec<_>, Vec<_>) = net.in_flight.drain(..).partition(|p| p.0 <= now);
            net.in_flight = later;
            for (_, to, from, mut bytes) in due {
                let _ = punches[to].handle_input(now, from, &mut bytes);
            }
            for (i, p) in punches.iter_mut().enumerate() {
                p.handle_timeout(now);
                while let Some(t) = p.poll_transmit(now, &mut buf) {
                    net.send(now, i, t.dst, buf.clone());
                }
                while let Some(e) = p.poll_event() {
                    outcome[i].get_or_insert((e, now));
                }
            }
            let next = punches
                .iter()
                .filter_map(UdpPunch::poll_timeout)
                .chain(net.in_flight.iter().map(|p| p.0))
                .min();
            let Some(next) = next else { break };
            now = if next > now {
                next
            } else {
                now + Duration::from_micros(1)
            };
        }
        outcome
    }

    fn setup(loss: f64, seed: u64) -> ([UdpPunch; 2], Net, Instant) {
        let now = Instant::now();
        let a: SocketAddr = "198.51.100.1:4000".parse().unwrap();
        let b: SocketAddr = "203.0.113.7:5000".parse().unwrap();
        let dead_a: SocketAddr = "10.0.0.1:4000".parse().unwrap();
        let dead_b: SocketAddr = "10.0.0.2:5000".parse().unwrap();
        let (ka, kb) = keys(1, 2);
        let config = PunchConfig::default();
        let pa = UdpPunch::new(now, ka, &[dead_b, b], config);
        let pb = UdpPunch::new(now, kb, &[dead_a, a], config);
        let net = Net {
            rng: ChaCha20Rng::seed_from_u64(seed),
            loss,
            delay: Duration::from_millis(30),
            in_flight: Vec::new(),
            addrs: [a, b],
            symmetric_1: None,
        };
        ([pa, pb], net, now)
    }

    #[test]
    fn punches_past_unreachable_candidates() {
        let (mut p, mut net, start) = setup(0.0, 1);
        let out = run(&mut p, &mut net, start, Duration::from_secs(20));
        assert_eq!(
            out[0].unwrap().0,
            Event::Connected {
                remote: net.addrs[1]
            }
        );
        assert_eq!(
            out[1].unwrap().0,
            Event::Connected {
                remote: net.addrs[0]
            }
        );
        // Probes go every 20 ms round-robin over two candidates, 30 ms one way: well under 1 s.
        assert!(
            out.iter()
                .all(|o| o.unwrap().1 - start < Duration::from_secs(1))
        );
        let rtt = p[0].rtt().unwrap();
        assert!(rtt >= Duration::from_millis(60) && rtt < Duration::from_millis(61));
    }

    #[test]
    fn punches_under_heavy_loss_with_every_seed() {
        for seed in 0..50 {
            let (mut p, mut net, start) = setup(0.3, seed);
            let out = run(&mut p, &mut net, start, Duration::from_secs(20));
            let remotes = [net.addrs[1], net.addrs[0]];
            for i in 0..2 {
                assert_eq!(
                    out[i].map(|o| o.0),
                    Some(Event::Connected { remote: remotes[i] }),
                    "seed {seed} side {i}"
                );
            }
        }
    }

    #[test]
    fn punches_to_a_peer_behind_a_symmetric_nat_in_either_role() {
        for (seed_a, seed_b) in [(1, 2), (2, 1)] {
            let now = Instant::now();
            let a: SocketAddr = "198.51.100.1:4000".parse().unwrap();
            // What B learned from STUN: useless, its NAT maps per destination.
            let b_stun: SocketAddr = "203.0.113.99:3478".parse().unwrap();
            let (ka, kb) = keys(seed_a, seed_b);
            let config = PunchConfig::default();
            let mut p = [
                UdpPunch::new(now, ka, &[b_stun], config),
                UdpPunch::new(now, kb, &[a], config),
            ];
            let mut net = Net {
                rng: ChaCha20Rng::seed_from_u64(5),
                loss: 0.1,
                delay: Duration::from_millis(20),
                in_flight: Vec::new(),
                addrs: [a, b_stun],
                symmetric_1: Some(Vec::new()),
            };
            let out = run(&mut p, &mut net, now, Duration::from_secs(20));
            // B's mapping towards A, learned by A as a peer-reflexive candidate.
            let b_mapped: SocketAddr = "203.0.113.99:20000".parse().unwrap();
            assert_eq!(
                out[0].map(|o| o.0),
                Some(Event::Connected { remote: b_mapped })
            );
            assert_eq!(out[1].map(|o| o.0), Some(Event::Connected { remote: a }));
            assert_ne!(p[0].controlling(), p[1].controlling());
        }
    }

    #[test]
    fn data_flows_and_keepalives_hold_the_path() {
        let (mut p, mut net, start) = setup(0.0, 7);
        run(&mut p, &mut net, start, Duration::from_secs(20));
        let mut wire = Vec::new();
        let dst = p[0].seal_data(b"session packet", &mut wire).unwrap();
        assert_eq!(dst, net.addrs[1]);
        let now = start + Duration::from_secs(1);
        assert_eq!(
            p[1].handle_input(now, net.addrs[0], &mut wire),
            Ok(Input::Data(&b"session packet"[..]))
        );
        // Ten minutes of keepalives with no data: nobody declares the path dead.
        let out = run(&mut p, &mut net, now, Duration::from_secs(600));
        assert_eq!(out, [None, None]);
        assert!(p[0].remote().is_some() && p[1].remote().is_some());
    }

    /// Keepalives measure the path's loss: a keepalive or its answer lost, one each way, so
    /// 20 % loss on the wire loses 1 − 0.8² = 36 % of round trips.
    #[test]
    fn keepalives_measure_the_path_loss() {
        let (mut p, mut net, start) = setup(0.0, 11);
        run(&mut p, &mut net, start, Duration::from_secs(20));
        assert_eq!(p[0].loss(), None, "nothing measured yet");
        let now = start + Duration::from_secs(1);
        run(&mut p, &mut net, now, Duration::from_secs(120));
        assert_eq!(p[0].loss(), Some(0.0));
        // The keepalives of a half hour at 20 % loss: the last 16 of them.
        net.loss = 0.2;
        let later = now + Duration::from_secs(120);
        let out = run(&mut p, &mut net, later, Duration::from_secs(1800));
        assert_eq!(out, [None, None], "a lossy path is not a dead one");
        for side in &p {
            let loss = side.loss().expect("measured");
            assert!((0.1..=0.65).contains(&loss), "loss {loss}");
        }
    }

    #[test]
    fn silent_peer_is_declared_dead() {
        let (mut p, mut net, start) = setup(0.0, 3);
        run(&mut p, &mut net, start, Duration::from_secs(20));
        // Cut the link: every packet is lost from now on.
        net.loss = 1.0;
        let cut = start + Duration::from_secs(1);
        let out = run(&mut p, &mut net, cut, Duration::from_secs(120));
        for o in out {
            let (event, at) = o.unwrap();
            assert_eq!(event, Event::Dead);
            let after = at - cut;
            assert!(after >= Duration::from_secs(49) && after <= Duration::from_secs(51));
        }
        assert_eq!(
            p[0].seal_data(b"x", &mut Vec::new()),
            Err(SendError::NotConnected)
        );
    }

    #[test]
    fn gives_up_when_unreachable() {
        let (mut p, mut net, start) = setup(1.0, 0);
        let out = run(&mut p, &mut net, start, Duration::from_secs(20));
        for o in out {
            let (event, at) = o.unwrap();
            assert_eq!(event, Event::Failed);
            assert_eq!(at - start, Duration::from_secs(10));
        }
    }

    #[test]
    fn strangers_cannot_verify_a_pair() {
        let (mut p, net, start) = setup(0.0, 0);
        // Someone with other keys sends well-formed link packets.
        let (kx, _) = keys(9, 8);
        let mut stranger = UdpPunch::new(start, kx, &[net.addrs[0]], PunchConfig::default());
        stranger.handle_timeout(start);
        let mut buf = Vec::new();
        stranger.poll_transmit(start, &mut buf).unwrap();
        assert_eq!(
            p[0].handle_input(start, net.addrs[1], &mut buf),
            Err(InputError::Open(OpenError::Forged))
        );
        assert!(p[0].poll_event().is_none());
    }

    /// Every destination `punch` sends to within 3 s, with the probes peers send it from
    /// `sources` answered along the way.
    fn destinations(
        punch: &mut UdpPunch,
        peer: &mut UdpPunch,
        sources: &[SocketAddr],
        start: Instant,
    ) -> Vec<SocketAddr> {
        let mut buf = Vec::new();
        let mut seen = Vec::new();
        // The peer's probes (it has one candidate of ours), one arriving from each source.
        let mut t = start;
        for &from in sources {
            loop {
                peer.handle_timeout(t);
                if peer.poll_transmit(t, &mut buf).is_some() {
                    break;
                }
                t += Duration::from_millis(10);
            }
            punch.handle_input(start, from, &mut buf).unwrap();
        }
        let mut now = start;
        while now < start + Duration::from_secs(3) {
            punch.handle_timeout(now);
            while let Some(t) = punch.poll_transmit(now, &mut buf) {
                if !seen.contains(&t.dst) {
                    seen.push(t.dst);
                }
            }
            now += Duration::from_millis(50);
        }
        seen
    }

    #[test]
    fn candidates_and_probe_sources_outside_the_filter_get_nothing() {
        // B12: a peer names our loopback and LAN hosts as its candidates, and (replayed)
        // probes arrive from such addresses too.
        use super::super::filter::{AddressFilter, LocalNetwork};
        let start = Instant::now();
        let public: SocketAddr = "203.1.113.7:5000".parse().unwrap();
        let hostile: Vec<SocketAddr> =
            ["127.0.0.1:22", "10.0.0.1:22", "192.168.7.1:80", "0.0.0.0:1"]
                .iter()
                .map(|a| a.parse().unwrap())
                .collect();
        let neighbour: SocketAddr = "192.168.1.40:5000".parse().unwrap();
        let mut remotes = hostile.clone();
        remotes.extend([public, neighbour]);
        let sources: Vec<SocketAddr> = vec![
            "127.0.0.1:6000".parse().unwrap(),
            "10.9.9.9:7".parse().unwrap(),
        ];

        // Unfiltered (as every punch was before the filter): all of them are probed.
        let (ka, kb) = keys(1, 2);
        let mut open = UdpPunch::new(start, ka, &remotes, PunchConfig::default());
        let mut peer = UdpPunch::new(start, kb, &[public], PunchConfig::default());
        let sent = destinations(&mut open, &mut peer, &sources, start);
        assert!(
            sent.contains(&hostile[0]) && sent.contains(&sources[0]),
            "{sent:?}"
        );

        // Filtered for a host on 192.168.1.0/24: only the public and the neighbouring address.
        let filter = AddressFilter::new(vec![LocalNetwork {
            addr: "192.168.1.20".parse().unwrap(),
            prefix: 24,
        }]);
        let (ka, kb) = keys(1, 2);
        let mut closed =
            UdpPunch::new(start, ka, &remotes, PunchConfig::default()).with_filter(filter);
        let mut peer = UdpPunch::new(start, kb, &[public], PunchConfig::default());
        for &addr in &hostile {
            closed.add_remote(addr);
        }
        let mut sent = destinations(&mut closed, &mut peer, &sources, start);
        sent.sort();
        let mut want = vec![public, neighbour];
        want.sort();
        assert_eq!(sent, want);
    }
}
