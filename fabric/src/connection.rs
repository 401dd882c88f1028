//! A connection to a peer: the [`mux`] riding on a [`Session`], as one sans-IO
//! endpoint.
//!
//! ```text
//!  streams ─► Mux ──frames──► Session (KCP) ──packets──► path
//!  streams ◄─ Mux ◄─bytes──── Session (KCP) ◄─packets─── path
//! ```
//!
//! The mux hands the session only what the session's pacer and window admit
//! ([`Session::send_capacity`]), so bytes wait in the mux, where its round-robin scheduler can
//! put a short request ahead of a bulk transfer, instead of in KCP's first-in-first-out queue.
//! Each stream's frames go to the session as a flow of their own ([`Session::send_flow`]), so
//! that a request does not wait, at the receiver, behind a transfer's lost segments.
//!
//! Call order is the session's (see [`crate::session`]): inputs and timeouts, then the
//! application's reads and writes on [`Connection::mux`], then [`Connection::poll_transmit`]
//! until `None`, [`Connection::poll_event`], and sleep until [`Connection::poll_timeout`].

use crate::mux::frame::{Cmd, HEADER_LEN, Header};
use crate::mux::{self, Mux};
use crate::session::{self, CloseReason, ConvId, Event, InputError, Session};
use crate::time::Instant;

/// The largest credit of a stream over a session, in bytes.
///
/// One stream moves at most one window per round trip, so the seed's 512 KiB caps a single
/// download at 512 KiB / RTT: 52 Mbit/s at 80 ms. Paths through Tox and across continents
/// are long, so streams over a session get 4 MiB (84 Mbit/s at 400 ms). A stream starts at
/// [`mux::INITIAL_WINDOW`] and grows to this while its application reads.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;

/// Receive credit all sessions of a node grant their peers together, in bytes (the
/// [`mux::SharedBudget`] a node passes to every session's mux): four sessions' worth of
/// [`mux::CONNECTION_BUDGET`].
pub const NODE_BUDGET: usize = 256 * 1024 * 1024;

/// The mux settings for streams over a session: windows of [`STREAM_WINDOW`], the default
/// initial window, per-connection budget and backlog, and no node budget (the caller adds
/// its own [`mux::SharedBudget`]).
///
/// Buffers grow only with unread data, so idle streams cost nothing; what a peer can make us
/// hold is bounded by the budgets (see [`mux`], "Memory").
pub fn mux_config() -> mux::Config {
    mux::Config {
        window: STREAM_WINDOW,
        ..mux::Config::default()
    }
}

/// [`mux_config`] for an end that accepts the peer's streams (`accepts_streams`: the exit
/// role), or that refuses them all at once (the client role: nothing would ever accept them).
pub fn mux_config_for(accepts_streams: bool) -> mux::Config {
    let config = mux_config();
    mux::Config {
        accept_backlog: if accepts_streams {
            config.accept_backlog
        } else {
            0
        },
        ..config
    }
}

/// One end of a sans-IO protocol driven by packets and time: what [`crate::testing::Pair`]
/// and the drivers need of an endpoint.
pub trait Endpoint {
    /// Feeds one packet from the path.
    fn handle_input(&mut self, now: Instant, packet: &[u8]) -> Result<(), InputError>;
    /// Advances time.
    fn handle_timeout(&mut self, now: Instant);
    /// Puts the next packet into `buf`; `None` when there is nothing to send now.
    fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<usize>;
    /// When [`Endpoint::handle_timeout`] is due.
    fn poll_timeout(&self) -> Option<Instant>;
}

impl Endpoint for Session {
    fn handle_input(&mut self, now: Instant, packet: &[u8]) -> Result<(), InputError> {
        Self::handle_input(self, now, packet)
    }
    fn handle_timeout(&mut self, now: Instant) {
        Self::handle_timeout(self, now);
    }
    fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<usize> {
        Self::poll_transmit(self, now, buf)
    }
    fn poll_timeout(&self) -> Option<Instant> {
        Self::poll_timeout(self)
    }
}

/// The mux over a session.
#[derive(Debug)]
pub struct Connection {
    session: Session,
    mux: Mux,
    /// Bytes moving between mux and session, kept to reuse its allocation.
    scratch: Vec<u8>,
}

impl Connection {
    /// A connection on `conv`, starting at `now`.
    pub fn new(conv: ConvId, session: session::Config, mux: mux::Config, now: Instant) -> Self {
        Self {
            session: Session::new(conv, session, now),
            mux: Mux::new(mux),
            scratch: Vec::new(),
        }
    }

    /// The streams.
    pub fn mux(&mut self) -> &mut Mux {
        &mut self.mux
    }

    /// The session underneath, for datagrams and statistics.
    pub fn session(&mut self) -> &mut Session {
        &mut self.session
    }

    /// The session's next event. A mux protocol error closes the session, so it shows here.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.session.poll_event()
    }

    /// Moves what arrived on the session into the mux.
    fn deliver(&mut self) {
        self.scratch.clear();
        if self.session.recv(&mut self.scratch) == 0 {
            return;
        }
        if let Err(error) = self.mux.handle_input(&self.scratch) {
            tracing::debug!(conv = %self.session.conv(), %error, "mux protocol error");
            self.session.close(CloseReason::ProtocolError);
        }
    }
}

/// Where the frames a session carries come from: the mux core, or the tokio handle around
/// one (`fabric::peer`'s driver).
pub(crate) trait FrameSource {
    /// Whether frames are waiting.
    fn has_transmit(&self) -> bool;
    /// Appends frames, at most `budget` bytes; returns how many.
    fn poll_transmit(&mut self, budget: usize, out: &mut Vec<u8>) -> usize;
}

impl FrameSource for Mux {
    fn has_transmit(&self) -> bool {
        Self::has_transmit(self)
    }
    fn poll_transmit(&mut self, budget: usize, out: &mut Vec<u8>) -> usize {
        Self::poll_transmit(self, budget, out)
    }
}

#[cfg(feature = "tokio")]
impl FrameSource for mux::io::Handle {
    fn has_transmit(&self) -> bool {
        Self::has_transmit(self)
    }
    fn poll_transmit(&mut self, budget: usize, out: &mut Vec<u8>) -> usize {
        Self::poll_transmit(self, budget, out)
    }
}

/// Moves frames into `session`, as many as its pacer and window admit, so that bytes wait in
/// the mux's round-robin scheduler rather than in KCP's queue. Returns whether frames are
/// left waiting for capacity (the session's timer or the next acknowledgement frees it).
pub(crate) fn feed(
    session: &mut Session,
    frames: &mut impl FrameSource,
    now: Instant,
    scratch: &mut Vec<u8>,
) -> bool {
    while frames.has_transmit() {
        // A record is at most `MAX_RECORD`, and a stream's run of frames must fit in one.
        let capacity = session.send_capacity(now).min(session::MAX_RECORD);
        if capacity == 0 {
            return true;
        }
        scratch.clear();
        if frames.poll_transmit(capacity, scratch) == 0 || send_frames(session, scratch).is_err() {
            break;
        }
    }
    false
}

/// The flow of frames that belong to no stream (VRM).
const CONTROL_FLOW: u32 = 0;

/// Hands whole frames to `session`, each run of one stream's frames as one call on that
/// stream's flow: the peer reads them back whole and each stream in order.
fn send_frames(session: &mut Session, mut frames: &[u8]) -> Result<(), InputError> {
    while !frames.is_empty() {
        let Some((flow, mut run)) = frame_at(frames) else {
            // The mux emits whole frames only; should it not, the rest stays in one piece.
            return session.send_flow(CONTROL_FLOW, frames);
        };
        while let Some((next, len)) = frame_at(&frames[run..])
            && next == flow
        {
            run += len;
        }
        session.send_flow(flow, &frames[..run])?;
        frames = &frames[run..];
    }
    Ok(())
}

/// The flow of the whole frame at the start of `b` and its length, header included.
fn frame_at(b: &[u8]) -> Option<(u32, usize)> {
    let header = Header::parse(b).ok()?;
    let (flow, payload) = match header.cmd {
        Cmd::Psh => (u32::from(header.id), header.length as usize),
        Cmd::Syn | Cmd::Fin | Cmd::Cfm => (u32::from(header.id), 0),
        // A VRM frame's id is a challenge, not a stream.
        Cmd::VrmRequest | Cmd::VrmReply => (CONTROL_FLOW, 0),
    };
    let len = HEADER_LEN.checked_add(payload)?;
    (len <= b.len()).then_some((flow, len))
}

impl Endpoint for Connection {
    fn handle_input(&mut self, now: Instant, packet: &[u8]) -> Result<(), InputError> {
        self.session.handle_input(now, packet)?;
        self.deliver();
        Ok(())
    }

    fn handle_timeout(&mut self, now: Instant) {
        self.session.handle_timeout(now);
        if self.session.is_closed() && self.mux.failure().is_none() {
            self.mux.fail(mux::Failure::link("session closed"));
        }
    }

    fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<usize> {
        feed(&mut self.session, &mut self.mux, now, &mut self.scratch);
        self.session.poll_transmit(now, buf)
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.session.poll_timeout()
    }
}
