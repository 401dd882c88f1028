//! The stream table: streams by id, installed when opened (by us or the peer), admitted to
//! the accept queue or refused, and released once both ends are done with them. A successor
//! the peer opened on an id our application still holds waits in the held stream and takes
//! the id over on release.

use super::stream::Stream;
use super::{Event, Mux, StreamId};

/// Streams by id.
pub(super) type Table = Vec<Option<Box<Stream>>>;

/// The stream `id` of `streams`: what [`Mux::stream_mut`] is for callers that also hold other
/// fields of the mux (the budgets, the queues) at the same time.
pub(super) fn stream_in(streams: &mut Table, id: u16) -> Option<&mut Stream> {
    streams.get_mut(usize::from(id))?.as_deref_mut()
}

impl Mux {
    pub(super) fn install(&mut self, id: u16, stream: Stream) {
        let index = usize::from(id);
        if self.streams.len() <= index {
            self.streams.resize_with(index + 1, || None);
        }
        self.streams[index] = Some(Box::new(stream));
        self.stats.streams += 1;
    }

    pub(super) fn stream(&self, id: u16) -> Option<&Stream> {
        self.streams.get(usize::from(id))?.as_deref()
    }

    pub(super) fn stream_mut(&mut self, id: u16) -> Option<&mut Stream> {
        stream_in(&mut self.streams, id)
    }

    /// Whether frames for `id` belong to a queued successor rather than the held stream.
    pub(super) fn is_successor_target(&self, id: u16) -> bool {
        self.stream(id).is_some_and(|s| s.successor.is_some())
    }

    pub(super) fn queue_ctrl(&mut self, id: u16) {
        if let Some(stream) = self.stream_mut(id)
            && !stream.in_ctrl
        {
            stream.in_ctrl = true;
            self.ctrl_queue.push_back(id);
        }
    }

    /// Releases `id` if the FIN handshake is complete and the application let go; a queued
    /// successor then takes the id over.
    pub(super) fn maybe_release(&mut self, id: u16) {
        let index = usize::from(id);
        let Some(stream) = self.streams.get(index).and_then(Option::as_deref) else {
            return;
        };
        let done = stream.app_closed && stream.wire_done() && !stream.in_ctrl && !stream.in_data;
        if !done {
            return;
        }
        let Some(mut stream) = self.streams[index].take() else {
            return;
        };
        self.budget.give(stream.charged);
        self.stats.streams -= 1;
        self.events.push_back(Event::Released(StreamId(id)));
        tracing::debug!(stream = id, "released");
        match stream.successor.take() {
            Some(successor) => {
                self.streams[index] = Some(successor);
                self.stats.streams += 1;
                self.admit(id);
                if let Some(s) = self.stream_mut(id)
                    && !s.recv_buf.is_empty()
                {
                    s.readable_queued = true;
                    self.events.push_back(Event::Readable(StreamId(id)));
                }
                if self.stream(id).is_some_and(|s| s.fin_recv) {
                    self.events.push_back(Event::Finished(StreamId(id)));
                }
                if self.stream(id).is_some_and(Stream::has_control) {
                    self.queue_ctrl(id);
                }
                self.maybe_release(id);
            }
            None => self.ids.free(id),
        }
    }

    /// A new peer stream enters the accept queue, or is refused when the backlog is full or
    /// the budgets cannot cover its initial window: refused streams are closed at once (FIN,
    /// data discarded and confirmed) and hold no budget.
    pub(super) fn admit(&mut self, id: u16) {
        let full = self.accept_queue.len() >= self.config.accept_backlog;
        let initial = self.config.initial_window;
        let Some(stream) = stream_in(&mut self.streams, id) else {
            return;
        };
        let mut refused = full.then_some("accept backlog full");
        if refused.is_none() && stream.charged == 0 {
            let got = self.budget.take_up_to(initial);
            stream.charged = got;
            if got < initial {
                refused = Some("receive budget spent");
            }
        }
        if let Some(why) = refused {
            tracing::debug!(stream = id, why, "refused");
            self.budget.give(std::mem::take(&mut stream.charged));
            let discarded = stream.recv_buf.clear(&mut self.pool);
            stream.cfm_pending += discarded as u32;
            stream.app_closed = true;
            stream.fin_queued = true;
            self.stats.recv_buffered -= discarded;
            self.queue_ctrl(id);
            return;
        }
        stream.in_accept = true;
        self.accept_queue.push_back(id);
        self.events.push_back(Event::Incoming(StreamId(id)));
    }
}
