//! Input: [`Mux::handle_input`] cuts the link's bytes into frames and hands each to its
//! handler (`on_header` for VRM, then `on_syn`, `on_fin`, `on_psh`, `on_cfm`), and PSH payload
//! bytes to their stream (`on_payload`). A protocol violation fails the mux.

use super::frame::{CFM_GROWTH, Cmd, HEADER_LEN, Header, verify_code};
use super::stream::Stream;
use super::table::{Table, stream_in};
use super::{Event, Failure, Mux, ProtocolError, StreamId};

/// Where [`Mux::handle_input`] is inside the byte stream.
#[derive(Debug, Clone, Copy)]
pub(super) enum InputState {
    /// Collecting a header; `have` bytes of it are in `buf`.
    Header { buf: [u8; HEADER_LEN], have: usize },
    /// Inside a PSH payload whose header was validated; the bytes go to stream `id`.
    Payload { id: u16, remaining: usize },
}

impl Mux {
    /// Feeds bytes from the link; frames may be split anywhere. An error is fatal: the mux
    /// is failed, and this and every later call return it.
    pub fn handle_input(&mut self, mut data: &[u8]) -> Result<(), ProtocolError> {
        if let Some(failure) = &self.failure {
            return Err(match failure {
                Failure::Protocol(error) => error.clone(),
                Failure::Link(_) => ProtocolError::Failed,
            });
        }
        while !data.is_empty() {
            match self.input {
                InputState::Header { mut buf, mut have } => {
                    let raw = if have == 0 && data.len() >= HEADER_LEN {
                        let (raw, rest) = data.split_at(HEADER_LEN);
                        data = rest;
                        raw
                    } else {
                        let take = (HEADER_LEN - have).min(data.len());
                        buf[have..have + take].copy_from_slice(&data[..take]);
                        have += take;
                        data = &data[take..];
                        if have < HEADER_LEN {
                            self.input = InputState::Header { buf, have };
                            return Ok(());
                        }
                        &buf[..]
                    };
                    let result = match Header::parse(raw) {
                        Ok(header) => self.on_header(header),
                        Err(_) => Err(ProtocolError::UnknownCommand(raw[0])),
                    };
                    if let InputState::Header { .. } = self.input {
                        self.input = InputState::Header {
                            buf: [0; HEADER_LEN],
                            have: 0,
                        };
                    }
                    if let Err(error) = result {
                        return Err(self.fail_protocol(error));
                    }
                }
                InputState::Payload { id, remaining } => {
                    let take = remaining.min(data.len());
                    self.on_payload(id, &data[..take]);
                    data = &data[take..];
                    self.input = if take == remaining {
                        InputState::Header {
                            buf: [0; HEADER_LEN],
                            have: 0,
                        }
                    } else {
                        InputState::Payload {
                            id,
                            remaining: remaining - take,
                        }
                    };
                }
            }
        }
        Ok(())
    }

    fn fail_protocol(&mut self, error: ProtocolError) -> ProtocolError {
        tracing::debug!(%error, "protocol violation");
        self.fail(Failure::Protocol(error.clone()));
        error
    }

    fn on_header(&mut self, header: Header) -> Result<(), ProtocolError> {
        self.stats.frames_received += 1;
        let id = header.id;
        match header.cmd {
            Cmd::VrmRequest => {
                if self.vrm_out.len() >= 1024 {
                    return Err(ProtocolError::VerifyFlood);
                }
                let (r1, r2) = verify_code(id, header.length);
                self.vrm_out.push_back(Header {
                    cmd: Cmd::VrmReply,
                    id: r1,
                    length: r2,
                });
                return Ok(());
            }
            Cmd::VrmReply => {
                let expected = self
                    .challenges
                    .pop_front()
                    .ok_or(ProtocolError::UnexpectedVerifyReply)?;
                if expected != (id, header.length) {
                    return Err(ProtocolError::VerifyMismatch);
                }
                self.events.push_back(Event::Verified);
                return Ok(());
            }
            _ => {}
        }
        if id == 0 {
            return Err(ProtocolError::ReservedId(header.cmd));
        }
        match header.cmd {
            Cmd::Syn => self.on_syn(id),
            Cmd::Fin => self.on_fin(id),
            Cmd::Psh => self.on_psh(id, header.length),
            Cmd::Cfm => self.on_cfm(id, header.length),
            Cmd::VrmRequest | Cmd::VrmReply => Ok(()),
        }
    }

    fn on_syn(&mut self, id: u16) -> Result<(), ProtocolError> {
        let initial = self.config.initial_window;
        if self.config.stream_ids.is_ours(id) {
            return Err(ProtocolError::OpenInOurIdSpace(StreamId(id)));
        }
        let Some(stream) = self.stream_mut(id) else {
            self.ids.mark(id);
            self.install(id, Stream::remote(initial));
            self.admit(id);
            return Ok(());
        };
        if stream.opened_locally && !stream.remote_seen {
            // Both ends opened this id at once: the two halves make one stream.
            stream.remote_seen = true;
            tracing::debug!(stream = id, "simultaneous open bound");
            return Ok(());
        }
        if stream.wire_done() && !stream.app_closed && stream.successor.is_none() {
            // The peer released the id and reopened it; our application still holds the old
            // stream, so the new one waits for it to let go.
            let mut successor = Stream::remote(initial);
            // One per stream our application holds: bounded by it, like our own opens.
            successor.charged = initial;
            stream.successor = Some(Box::new(successor));
            self.budget.force(initial);
            tracing::debug!(stream = id, "reopened while held: queued");
            return Ok(());
        }
        Err(ProtocolError::DuplicateSyn(StreamId(id)))
    }

    fn on_fin(&mut self, id: u16) -> Result<(), ProtocolError> {
        let successor = self.is_successor_target(id);
        let stream = input_stream(&mut self.streams, id, Cmd::Fin)?;
        if stream.fin_recv {
            return Err(ProtocolError::DuplicateFin(StreamId(id)));
        }
        stream.fin_recv = true;
        stream.remote_seen = true;
        if successor {
            // Announced when the successor takes the id over.
            return Ok(());
        }
        let notify = !stream.app_closed;
        if stream.recv_buf.is_empty() && stream.cfm_pending > 0 {
            self.queue_ctrl(id);
        }
        if notify {
            self.events.push_back(Event::Finished(StreamId(id)));
        }
        self.maybe_release(id);
        Ok(())
    }

    fn on_psh(&mut self, id: u16, length: u32) -> Result<(), ProtocolError> {
        if length as usize > self.config.max_input_frame {
            return Err(ProtocolError::FrameTooLarge {
                len: length,
                max: self.config.max_input_frame,
            });
        }
        let stream = input_stream(&mut self.streams, id, Cmd::Psh)?;
        if stream.fin_recv {
            return Err(ProtocolError::DataAfterFin(StreamId(id)));
        }
        if u64::from(stream.recv_outstanding) + u64::from(length) > u64::from(stream.recv_limit) {
            return Err(ProtocolError::CreditExceeded {
                id: StreamId(id),
                len: length,
                outstanding: stream.recv_outstanding,
                window: stream.recv_limit,
            });
        }
        stream.remote_seen = true;
        stream.recv_outstanding += length;
        if length > 0 {
            self.input = InputState::Payload {
                id,
                remaining: length as usize,
            };
        }
        Ok(())
    }

    fn on_payload(&mut self, id: u16, bytes: &[u8]) {
        self.stats.bytes_received += bytes.len() as u64;
        let successor = self.is_successor_target(id);
        let Some(stream) = input_stream(&mut self.streams, id, Cmd::Psh).ok() else {
            return;
        };
        if stream.app_closed {
            stream.cfm_pending += bytes.len() as u32;
            self.queue_ctrl(id);
            return;
        }
        let was_empty = stream.recv_buf.is_empty();
        stream.recv_buf.push(bytes, &mut self.pool);
        let notify = was_empty && !successor && !stream.readable_queued;
        if notify {
            stream.readable_queued = true;
        }
        self.stats.recv_buffered += bytes.len();
        if notify {
            self.events.push_back(Event::Readable(StreamId(id)));
        }
    }

    fn on_cfm(&mut self, id: u16, amount: u32) -> Result<(), ProtocolError> {
        let window = self.config.window;
        let stream = input_stream(&mut self.streams, id, Cmd::Cfm)?;
        if amount & CFM_GROWTH != 0 {
            let grown = amount & !CFM_GROWTH;
            if u64::from(stream.send_limit) + u64::from(grown) > u64::from(window) {
                return Err(ProtocolError::CreditBeyondWindow {
                    id: StreamId(id),
                    grown,
                    credit: stream.send_limit,
                    window,
                });
            }
            stream.send_limit += grown;
        } else {
            if amount > stream.unconfirmed {
                return Err(ProtocolError::BogusConfirm {
                    id: StreamId(id),
                    amount,
                    unconfirmed: stream.unconfirmed,
                });
            }
            stream.unconfirmed -= amount;
        }
        stream.remote_seen = true;
        let writable = stream.write_blocked
            && !stream.fin_queued
            && stream.send_space() > 0
            && !stream.writable_queued;
        if writable {
            stream.write_blocked = false;
            stream.writable_queued = true;
            self.events.push_back(Event::Writable(StreamId(id)));
        }
        self.maybe_release(id);
        Ok(())
    }
}

/// The stream a frame from the peer for `id` addresses: the successor if one is queued.
fn input_stream(streams: &mut Table, id: u16, cmd: Cmd) -> Result<&mut Stream, ProtocolError> {
    let stream = stream_in(streams, id).ok_or(ProtocolError::UnknownStream {
        cmd,
        id: StreamId(id),
    })?;
    Ok(match stream.successor {
        Some(ref mut successor) => successor,
        None => stream,
    })
}
