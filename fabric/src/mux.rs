//! The seed-004 stream multiplexer: many byte streams over one reliable, ordered link.
//!
//! [`Mux`] is the sans-IO core. It reads bytes from the link with [`Mux::handle_input`] and
//! hands back bytes for the link from [`Mux::poll_transmit`]; it never does I/O, never
//! spawns, and needs no clock (the KCP session underneath keeps the link alive). The `tokio`
//! feature adds the `io` module: a shared `Handle`, `Stream`s that are
//! `AsyncRead + AsyncWrite`, and a ready-made driver over any `AsyncRead + AsyncWrite`.
//!
//! ```text
//!  application ── open/write/finish/close ──► Mux ── poll_transmit ──► link (KCP, TCP, pipe)
//!  application ◄── poll_event/accept/read ─── Mux ◄── handle_input ──── link
//! ```
//!
//! # Where things are
//!
//! This file holds [`Config`], [`Event`], [`Stats`], the [`Mux`] struct, the application
//! calls and [`Mux::poll_event`]. The rest of the core is more `impl Mux` blocks in child
//! modules:
//!
//! * `input`: [`Mux::handle_input`], the handler of each frame and of PSH payloads;
//! * `output`: [`Mux::poll_transmit`] and the building of control and data frames;
//! * `table`: the stream table: installing, admitting and releasing streams, and the
//!   successor that takes over an id the peer re-opened;
//! * `stream` (per-stream state), `buffer` (chunked buffers and their pool), `budget`
//!   (receive budgets), `ids` (the id bitmap), [`frame`] (the wire format), `error`, and,
//!   with the `tokio` feature, `io` (the tokio adapter).
//!
//! # Protocol
//!
//! Frames are `cmd u8 | id u16 | length u32`, big-endian (see [`frame`]).
//!
//! ## Credit
//!
//! Each direction of a stream has credit: a sender never has more bytes sent and
//! unconfirmed than the receiver granted, and the receiver returns credit with CFM as its
//! application reads. So a stream whose reader stops holds at most its credit in the
//! receiver and never blocks the link or other streams. A peer sending beyond its credit is a
//! protocol violation: the mux fails, which bounds memory.
//!
//! Credit starts at the initial window ([`Config::initial_window`], 64 KiB) each way, so a
//! stream nobody accepted pins little, and grows to the window ([`Config::window`], 512 KiB)
//! once the application holds the stream: when it opens or accepts it, budget permitting
//! (and, if the budget was short then, at a later read that returns credit).
//! Growth travels in a CFM whose length has its top bit set ([`frame::CFM_GROWTH`]): it
//! raises the sender's credit by the rest of the length, and never beyond the window (more is
//! a protocol violation). A plain CFM confirms consumed bytes exactly as in seed 004, so a
//! sender knows when all its bytes were confirmed. (Folding growth into the confirmed amount
//! would not tell the two apart: a sender could take growth for a confirmation, release the
//! id, and then receive the real confirmation for an id it no longer knows.) Growth goes out
//! before our FIN, or just before a confirmation the sender still waits for, so it always
//! reaches a stream the sender still holds. The frames are
//! seed 004's, as are their meanings but for that top bit (a seed-004 CFM never comes near
//! it: windows are smaller); what is ours is that credit starts below the window. **Both ends
//! must use the same window and initial window** (the protocol has no field to announce
//! them).
//!
//! CFM batching: we confirm consumed bytes once they reach a quarter of the stream's credit,
//! and, once the peer's FIN arrived, as soon as the application drained the stream (the last
//! bytes of a stream are always confirmed, which lets both ends release the id). Closing a
//! stream discards its unread data and confirms it at once.
//!
//! Stream ids come from a bitmap (1..=65535; 0 is reserved), lowest free first, never wrapping:
//! with all in use, [`Mux::open`] fails with [`OpenError::IdsExhausted`]. An id is released
//! ([`Event::Released`]) once our FIN went out, the peer's FIN arrived, every byte either way
//! was confirmed, and the application closed the stream ([`Mux::close`]). When the peer,
//! having finished its side, reopens an id our application still holds, the new stream waits
//! (its data bounded by credit) until the application closes the old one, then appears.
//!
//! Both ends opening the same id at once bind to one stream: a SYN for an id we opened and
//! of which the peer has shown nothing yet is simply accepted as the other half.
//!
//! Open a stream and write to it before the next transmit, and its SYN and first PSH leave in
//! the same flight: no round trip per stream.
//!
//! # Memory
//!
//! A stream's buffers start empty and return their memory as they drain: an idle stream costs
//! its state only (about 170 bytes, measured by `tests/mux_memory.rs`). Buffered bytes live in
//! 16 KiB chunks from a per-mux pool of free chunks (at most 512; whenever nothing is
//! buffered it is trimmed to 64 plus 32 per open stream); a buffer that starts small gets a
//! small first chunk instead.
//!
//! What a peer can make us hold is the credit we granted it, and that is bounded three ways:
//!
//! * per stream: the window, and the initial window until our application accepts the stream
//!   (a stream waiting in the accept queue never grows);
//! * per mux: [`Config::budget`], the sum of the credit of all streams. A peer's new stream
//!   needs the initial window from it, or is refused like one beyond the accept backlog;
//!   growth takes what is left but the last quarter (kept for the initial windows of new
//!   streams, so that grown streams never make the next ones be refused), and a stream
//!   that finds no room keeps the credit it has (the peer's writes then wait for reads,
//!   data is never dropped). A stream returns its share when its id is released.
//!   Streams our application opens take their initial window even beyond the budget: their
//!   number is ours to limit;
//! * per node: [`Config::shared_budget`], one [`SharedBudget`] for all sessions, drawn on
//!   like the mux budget.
//!
//! With [`Config::accept_backlog`] 0 every stream the peer opens is refused (answered with
//! FIN, its data discarded): for an end whose application never accepts.
//!
//! # Driving the core
//!
//! After any input or application call, a driver:
//!
//! 1. feeds link bytes, arbitrarily chunked, to [`Mux::handle_input`]; an `Err` is fatal;
//! 2. drains [`Mux::poll_event`] (wake readers, writers and acceptors) and [`Mux::accept`];
//! 3. calls [`Mux::poll_transmit`] while [`Mux::has_transmit`] and the link accepts bytes;
//! 4. when the link dies, calls [`Mux::fail`] so every stream reports the error.
//!
//! Events are edge-triggered: after `Readable`, read until [`StreamError::WouldBlock`]; after a
//! short write, wait for `Writable`. At most one `Readable` and one `Writable` per stream wait
//! in the queue at a time, so an undrained queue stays bounded.

mod budget;
mod buffer;
mod error;
pub mod frame;
mod ids;
mod input;
#[cfg(feature = "tokio")]
pub mod io;
mod output;
mod stream;
mod table;

use std::collections::VecDeque;

use self::budget::Budgets;
pub use self::budget::SharedBudget;
use self::buffer::Pool;
pub use self::error::{Failure, OpenError, ProtocolError, StreamError, VerifyError};
pub use self::frame::StreamId;
use self::frame::{Cmd, HEADER_LEN, Header, verify_code};
use self::ids::IdBitmap;
use self::input::InputState;
use self::stream::Stream;
use self::table::{Table, stream_in};

/// Largest credit of one stream by default, in bytes: seed 004's window.
pub const DEFAULT_WINDOW: u32 = 512 * 1024;

/// Credit a stream starts with in each direction, in bytes: what a peer may send on a stream
/// before our application accepted it and read from it. Enough for a request and its first
/// bytes in one flight.
pub const INITIAL_WINDOW: u32 = 64 * 1024;

/// Receive credit one mux grants its peer over all streams by default, in bytes: with the
/// initial window, room for 1,024 streams nobody accepted, or 16 streams at the 4 MiB window
/// used over sessions.
pub const CONNECTION_BUDGET: usize = 64 * 1024 * 1024;

/// Tuning of a [`Mux`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Largest credit of a stream in bytes: unconfirmed bytes a sender may have in flight, and
    /// what a receiver buffers at most. Must be equal on both ends. Default
    /// [`DEFAULT_WINDOW`].
    pub window: u32,
    /// Credit a stream starts with each way ([`INITIAL_WINDOW`] by default, at most
    /// `window`). Must be equal on both ends.
    pub initial_window: u32,
    /// Receive credit granted over all streams of this mux (see the module docs, "Memory").
    /// Default [`CONNECTION_BUDGET`].
    pub budget: usize,
    /// Receive credit shared with other muxes of this node; `None` for no such limit.
    pub shared_budget: Option<SharedBudget>,
    /// Largest PSH payload we emit. Small frames keep a short request from waiting behind a
    /// bulk transfer's frame. Default 16 KiB; must not exceed the peer's `max_input_frame`.
    pub max_frame: usize,
    /// Largest PSH payload we accept; a larger one fails the mux. Default 64 KiB.
    pub max_input_frame: usize,
    /// Streams opened by the peer and not yet accepted; beyond it new streams are refused
    /// (answered with FIN, their data discarded). Default 1024.
    pub accept_backlog: usize,
    /// Peer verification challenges we may have outstanding. Default 16.
    pub max_verify_outstanding: usize,
    /// Which ids this end opens streams with. Default [`StreamIds::Any`] (seed 004).
    pub stream_ids: StreamIds,
}

/// Which stream ids an end opens with.
///
/// In seed 004 both ends take the lowest free id, and two opens of the same id at once bind
/// into one stream: fine when one side only opens. When both do (a mesh session, where each
/// end is client and server), that would join two unrelated requests, so the ends split the
/// ids: the end that opened the session takes odd ids, the other even ones, and a peer's
/// SYN in our own space is a protocol error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StreamIds {
    /// Any free id, lowest first; the peer may open any id (seed 004).
    #[default]
    Any,
    /// Odd ids (1, 3, …, 65535: 32,768 of them); the peer opens even ones.
    Odd,
    /// Even ids (2, 4, …, 65534: 32,767 of them); the peer opens odd ones.
    Even,
}

impl StreamIds {
    /// Whether an id is one this end opens with (and so the peer must not).
    pub(crate) fn is_ours(self, id: u16) -> bool {
        match self {
            Self::Any => false,
            Self::Odd => !id.is_multiple_of(2),
            Self::Even => id.is_multiple_of(2),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            window: DEFAULT_WINDOW,
            initial_window: INITIAL_WINDOW,
            budget: CONNECTION_BUDGET,
            shared_budget: None,
            max_frame: 16 * 1024,
            max_input_frame: 64 * 1024,
            accept_backlog: 1024,
            max_verify_outstanding: 16,
            stream_ids: StreamIds::Any,
        }
    }
}

/// What happened, for the application or driver to act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// The peer opened a stream; take it with [`Mux::accept`].
    Incoming(StreamId),
    /// Data arrived on a stream that had none buffered.
    Readable(StreamId),
    /// A stream whose write was cut short can take more bytes.
    Writable(StreamId),
    /// The peer finished writing: reads return EOF once the buffer drains.
    Finished(StreamId),
    /// The id was recycled; it no longer names the stream it did.
    Released(StreamId),
    /// The peer answered a verification challenge correctly: it speaks this protocol.
    Verified,
}

impl Event {
    /// The stream the event is about, if any.
    pub fn stream(&self) -> Option<StreamId> {
        match *self {
            Self::Incoming(id)
            | Self::Readable(id)
            | Self::Writable(id)
            | Self::Finished(id)
            | Self::Released(id) => Some(id),
            Self::Verified => None,
        }
    }
}

/// Counters of a [`Mux`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Streams holding an id (open, half closed, or waiting for the FIN handshake).
    pub streams: usize,
    /// Payload bytes emitted in PSH frames.
    pub bytes_sent: u64,
    /// Payload bytes received in PSH frames.
    pub bytes_received: u64,
    /// Bytes written by applications and not yet emitted.
    pub send_buffered: usize,
    /// Bytes received and not yet read.
    pub recv_buffered: usize,
    /// Receive credit granted to the peer over all streams: what it may make us buffer.
    pub recv_credit: usize,
    /// Frames emitted.
    pub frames_sent: u64,
    /// Frames received.
    pub frames_received: u64,
}

/// The sans-IO multiplexer. See the [module docs](self) for the protocol and call order.
#[derive(Debug)]
pub struct Mux {
    config: Config,
    /// Streams by id; grows to the highest id seen.
    streams: Table,
    /// Free buffer chunks shared by the streams.
    pool: Pool,
    ids: IdBitmap,
    /// Streams with a SYN, CFM or FIN due.
    ctrl_queue: VecDeque<u16>,
    /// Streams with buffered data, served round-robin.
    data_queue: VecDeque<u16>,
    /// VRM frames (our requests, our replies) to send.
    vrm_out: VecDeque<Header>,
    /// Answers we expect, in the order we asked (the link is ordered).
    challenges: VecDeque<(u16, u32)>,
    events: VecDeque<Event>,
    accept_queue: VecDeque<u16>,
    input: InputState,
    failure: Option<Failure>,
    stats: Stats,
    budget: Budgets,
}

impl Mux {
    /// A mux with no streams. Out-of-range settings are clamped:
    /// `1 <= window <= i32::MAX`, `1 <= initial_window <= window`,
    /// `1 <= max_frame <= window`, `max_input_frame <= u32::MAX`.
    pub fn new(mut config: Config) -> Self {
        // Growth is sent below the CFM's top bit.
        config.window = config.window.clamp(1, i32::MAX as u32);
        config.initial_window = config.initial_window.clamp(1, config.window);
        config.max_frame = config.max_frame.clamp(1, config.window as usize);
        config.max_input_frame = config.max_input_frame.min(u32::MAX as usize);
        Self {
            streams: Vec::new(),
            pool: Pool::default(),
            ids: IdBitmap::new(config.stream_ids),
            ctrl_queue: VecDeque::new(),
            data_queue: VecDeque::new(),
            vrm_out: VecDeque::new(),
            challenges: VecDeque::new(),
            events: VecDeque::new(),
            accept_queue: VecDeque::new(),
            input: InputState::Header {
                buf: [0; HEADER_LEN],
                have: 0,
            },
            failure: None,
            stats: Stats::default(),
            budget: Budgets {
                limit: config.budget,
                used: 0,
                shared: config.shared_budget.clone(),
                shared_held: 0,
            },
            config,
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Why the mux failed, if it did.
    pub fn failure(&self) -> Option<&Failure> {
        self.failure.as_ref()
    }

    /// Counters and buffer levels.
    pub fn stats(&self) -> Stats {
        Stats {
            recv_credit: self.budget.used,
            ..self.stats
        }
    }

    // ---- application calls -------------------------------------------------------------

    /// Opens a stream; its SYN is queued and precedes any data written to it.
    pub fn open(&mut self) -> Result<StreamId, OpenError> {
        if let Some(failure) = &self.failure {
            return Err(OpenError::MuxFailed(failure.clone()));
        }
        let id = self.ids.alloc().ok_or(OpenError::IdsExhausted)?;
        // Events still queued for an earlier stream on this id (its `Released`, say) would
        // be read as news about the new one.
        if !self.events.is_empty() {
            self.events
                .retain(|event| event.stream() != Some(StreamId(id)));
        }
        let initial = self.config.initial_window;
        let mut stream = Stream::local(initial);
        self.budget.force(initial);
        stream.charged = initial;
        self.install(id, stream);
        self.queue_ctrl(id);
        self.grow(id);
        tracing::debug!(stream = id, "open");
        Ok(StreamId(id))
    }

    /// Takes the next stream the peer opened.
    pub fn accept(&mut self) -> Option<StreamId> {
        while let Some(id) = self.accept_queue.pop_front() {
            if let Some(stream) = self.stream_mut(id)
                && stream.in_accept
                && !stream.app_closed
            {
                stream.in_accept = false;
                self.grow(id);
                return Some(StreamId(id));
            }
        }
        None
    }

    /// Buffers as much of `data` as the stream's credit allows and returns how much that was.
    /// `Ok(0)` with non-empty `data` means blocked: [`Event::Writable`] follows when credit
    /// returns. Accepted bytes will be delivered unless the link fails.
    pub fn write(&mut self, id: StreamId, data: &[u8]) -> Result<usize, StreamError> {
        if let Some(failure) = &self.failure {
            return Err(StreamError::MuxFailed(failure.clone()));
        }
        let stream = app_stream(&mut self.streams, id)?;
        if stream.fin_queued {
            return Err(StreamError::Finished(id));
        }
        let n = stream.send_space().min(data.len());
        stream.write_blocked = n < data.len();
        if n == 0 {
            return Ok(0);
        }
        stream.send_buf.push(&data[..n], &mut self.pool);
        let enqueue = !stream.in_data;
        stream.in_data = true;
        self.stats.send_buffered += n;
        if enqueue {
            self.data_queue.push_back(id.0);
        }
        Ok(n)
    }

    /// Reads received bytes. `Ok(0)` for a non-empty `buf` is EOF: the peer finished and
    /// everything was read. [`StreamError::WouldBlock`] means nothing is buffered yet.
    /// After a failure, bytes received before it are still delivered, then the failure.
    pub fn read(&mut self, id: StreamId, buf: &mut [u8]) -> Result<usize, StreamError> {
        let window = self.config.window;
        let failure = self.failure.clone();
        let stream = app_stream(&mut self.streams, id)?;
        if stream.recv_buf.is_empty() {
            return match failure {
                _ if stream.fin_recv => Ok(0),
                Some(failure) => Err(StreamError::MuxFailed(failure)),
                None => Err(StreamError::WouldBlock),
            };
        }
        let n = stream.recv_buf.read_into(buf, &mut self.pool);
        stream.cfm_pending += n as u32;
        let quarter = (stream.recv_limit / 4).max(1);
        let confirm =
            stream.cfm_pending >= quarter || (stream.fin_recv && stream.recv_buf.is_empty());
        let short = stream.recv_limit < window;
        self.stats.recv_buffered -= n;
        if confirm {
            if short && failure.is_none() {
                // The budgets were short when the stream was taken: try again.
                self.grow(id.0);
            }
            self.queue_ctrl(id.0);
        }
        Ok(n)
    }

    /// Finishes our direction (half close): FIN follows the buffered data; reads go on.
    /// Finishing twice is harmless.
    pub fn finish(&mut self, id: StreamId) -> Result<(), StreamError> {
        if let Some(failure) = &self.failure {
            return Err(StreamError::MuxFailed(failure.clone()));
        }
        let stream = app_stream(&mut self.streams, id)?;
        if stream.fin_queued {
            return Ok(());
        }
        stream.fin_queued = true;
        if stream.fin_ready() {
            self.queue_ctrl(id.0);
        }
        Ok(())
    }

    /// The application is done with the stream: FIN if not yet sent (after buffered data),
    /// unread and future incoming data discarded and confirmed. The id is released once the
    /// FIN handshake completes. Closing an unknown or closed stream does nothing.
    pub fn close(&mut self, id: StreamId) {
        let Ok(stream) = app_stream(&mut self.streams, id) else {
            return;
        };
        stream.app_closed = true;
        stream.fin_queued = true;
        let discarded = stream.recv_buf.clear(&mut self.pool);
        stream.cfm_pending += discarded as u32;
        let control = stream.has_control();
        let unaccepted = std::mem::take(&mut stream.in_accept);
        self.stats.recv_buffered -= discarded;
        tracing::debug!(stream = id.0, discarded, "close");
        if unaccepted {
            // Closed straight from its `Incoming` event: it no longer counts against the backlog.
            self.accept_queue.retain(|&queued| queued != id.0);
        }
        if control {
            self.queue_ctrl(id.0);
        }
        self.maybe_release(id.0);
    }

    /// Sends a verification challenge; [`Event::Verified`] follows when the peer answers
    /// `verify_code(v1, v2)`, a wrong answer fails the mux. Pass random values: the core has
    /// no RNG.
    pub fn verify(&mut self, v1: u16, v2: u32) -> Result<(), VerifyError> {
        if let Some(failure) = &self.failure {
            return Err(VerifyError::MuxFailed(failure.clone()));
        }
        if self.challenges.len() >= self.config.max_verify_outstanding {
            return Err(VerifyError::TooManyOutstanding);
        }
        self.challenges.push_back(verify_code(v1, v2));
        self.vrm_out.push_back(Header {
            cmd: Cmd::VrmRequest,
            id: v1,
            length: v2,
        });
        Ok(())
    }

    /// Fails the mux (the link died): every stream operation now reports `failure`, after
    /// delivering bytes already received. The first failure sticks.
    pub fn fail(&mut self, failure: Failure) {
        if self.failure.is_none() {
            tracing::debug!(%failure, "mux failed");
            self.failure = Some(failure);
            self.budget.release_shared();
            self.ctrl_queue.clear();
            self.data_queue.clear();
            self.vrm_out.clear();
        }
    }

    /// Grows the receive window of a stream the application holds to the full window, as far
    /// as the budgets allow (see "Credit" and "Memory" in the module docs).
    ///
    /// The growth must reach a peer that still holds the stream. Before our FIN it does: the
    /// peer releases the id only after our FIN, which follows the growth. After our FIN, only
    /// with a confirmation of bytes the peer still counts as unconfirmed (`cfm_pending`),
    /// which goes out right behind the growth.
    fn grow(&mut self, id: u16) {
        let window = self.config.window;
        let Some(stream) = stream_in(&mut self.streams, id) else {
            return;
        };
        if !stream.may_grow(window) || (stream.fin_sent && stream.cfm_pending == 0) {
            return;
        }
        let grown = self.budget.take_for_growth(window - stream.recv_limit);
        if grown == 0 {
            return;
        }
        stream.recv_limit += grown;
        stream.grant_pending += grown;
        stream.charged += grown;
        tracing::trace!(stream = id, window = stream.recv_limit, "window grows");
        self.queue_ctrl(id);
    }

    // ---- driver calls ------------------------------------------------------------------

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        let event = self.events.pop_front()?;
        match event {
            Event::Readable(id) => {
                if let Some(s) = self.stream_mut(id.0) {
                    s.readable_queued = false;
                }
            }
            Event::Writable(id) => {
                if let Some(s) = self.stream_mut(id.0) {
                    s.writable_queued = false;
                }
            }
            _ => {}
        }
        Some(event)
    }
}

/// The stream the application means by `id`: open and not closed by it.
fn app_stream(streams: &mut Table, id: StreamId) -> Result<&mut Stream, StreamError> {
    match stream_in(streams, id.0) {
        Some(stream) if !stream.app_closed => Ok(stream),
        _ => Err(StreamError::UnknownStream(id)),
    }
}

#[cfg(test)]
mod tests;
