//! Per-stream state of the mux core.
//!
//! Credit bookkeeping, in bytes, for one stream. Each direction starts with the initial
//! window and may grow to the full window (see the mux docs, "Credit"):
//!
//! * sending: `send_buf.len() + unconfirmed <= send_limit <= window`, where `unconfirmed`
//!   counts bytes emitted in PSH frames and not yet returned by the peer's CFM, and
//!   `send_limit` is the credit the peer granted. A CFM first confirms unconfirmed bytes; what
//!   is left over raises `send_limit`. `write` accepts only what keeps this true, so
//!   everything buffered can always be sent: a stream is never credit-blocked inside the
//!   scheduler, and its memory is bounded by the window.
//! * receiving: `recv_outstanding <= recv_limit <= window`, where `recv_outstanding` counts
//!   bytes announced by the peer's PSH headers and not yet returned by our emitted CFMs, and
//!   `recv_limit` the credit we granted (including grants still waiting in `grant_pending`).
//!   A header that would break this is a protocol violation, checked before a single payload
//!   byte is stored. `charged` is what the stream holds of the receive budgets.

use super::buffer::ChunkBuf;

/// One stream's state. Buffers start empty (no allocation) and are freed when they drain, so
/// an idle stream costs only this struct.
#[derive(Debug, Default)]
pub(crate) struct Stream {
    /// Bytes the application wrote that are not yet in a PSH frame.
    pub(crate) send_buf: ChunkBuf,
    /// Bytes received that the application has not read.
    pub(crate) recv_buf: ChunkBuf,
    /// Bytes sent in PSH frames that the peer has not confirmed.
    pub(crate) unconfirmed: u32,
    /// Bytes the peer announced in PSH headers that our CFMs have not yet returned.
    pub(crate) recv_outstanding: u32,
    /// Bytes consumed (read or discarded) that no CFM has reported yet.
    pub(crate) cfm_pending: u32,
    /// Credit the peer granted us: we never have more than this unconfirmed or buffered.
    pub(crate) send_limit: u32,
    /// Credit we granted the peer, `grant_pending` included.
    pub(crate) recv_limit: u32,
    /// Credit beyond consumed bytes that our next CFM announces (a window that grows).
    pub(crate) grant_pending: u32,
    /// Receive budget (connection and node) this stream holds; returned when it ends.
    pub(crate) charged: u32,
    /// We opened the stream (our SYN).
    pub(crate) opened_locally: bool,
    /// The peer has shown it knows the stream: its SYN, or any frame for it.
    pub(crate) remote_seen: bool,
    /// Our SYN still has to be emitted.
    pub(crate) syn_pending: bool,
    /// The application finished writing (or closed): FIN follows the buffered data.
    pub(crate) fin_queued: bool,
    /// Our FIN went out.
    pub(crate) fin_sent: bool,
    /// The peer's FIN arrived: no more data will come.
    pub(crate) fin_recv: bool,
    /// The application closed the stream: incoming data is discarded (and confirmed).
    pub(crate) app_closed: bool,
    /// A write was cut short: emit `Writable` when credit returns.
    pub(crate) write_blocked: bool,
    /// The stream sits in the control queue.
    pub(crate) in_ctrl: bool,
    /// The stream sits in the data round-robin queue.
    pub(crate) in_data: bool,
    /// It waits in the accept queue.
    pub(crate) in_accept: bool,
    /// A `Readable` event for it is queued.
    pub(crate) readable_queued: bool,
    /// A `Writable` event for it is queued.
    pub(crate) writable_queued: bool,
    /// A stream the peer opened on this id after both FINs of this one, while our application
    /// still holds this one: it takes the id over when this one is released.
    pub(crate) successor: Option<Box<Self>>,
}

impl Stream {
    /// A stream we open, with `initial` credit each way: our SYN is pending.
    pub(crate) fn local(initial: u32) -> Self {
        Self {
            opened_locally: true,
            syn_pending: true,
            send_limit: initial,
            recv_limit: initial,
            ..Self::default()
        }
    }

    /// A stream the peer opened, with `initial` credit each way.
    pub(crate) fn remote(initial: u32) -> Self {
        Self {
            remote_seen: true,
            send_limit: initial,
            recv_limit: initial,
            ..Self::default()
        }
    }

    /// Bytes `write` may still accept.
    pub(crate) fn send_space(&self) -> usize {
        (self.send_limit as usize).saturating_sub(self.send_buf.len() + self.unconfirmed as usize)
    }

    /// Whether a control frame (SYN, CFM, or a FIN not waiting behind data) is due.
    pub(crate) fn has_control(&self) -> bool {
        self.syn_pending || self.cfm_pending > 0 || self.grant_pending > 0 || self.fin_ready()
    }

    /// Whether the receive window may still grow: the application holds the stream and the
    /// peer may still send on it.
    pub(crate) fn may_grow(&self, window: u32) -> bool {
        self.recv_limit < window && !self.app_closed && !self.in_accept && !self.fin_recv
    }

    /// Our FIN can go: finished, everything buffered already sent.
    pub(crate) fn fin_ready(&self) -> bool {
        self.fin_queued && !self.fin_sent && self.send_buf.is_empty()
    }

    /// Both directions are over and nothing is owed either way: the peer may reuse the id as
    /// soon as it has released its side, and so may we once the application let go.
    pub(crate) fn wire_done(&self) -> bool {
        self.fin_sent
            && self.fin_recv
            && self.unconfirmed == 0
            && self.recv_outstanding == 0
            && self.cfm_pending == 0
            && self.grant_pending == 0
            && !self.syn_pending
    }
}
