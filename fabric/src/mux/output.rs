//! Output: [`Mux::poll_transmit`] and what builds the frames it emits: VRM first, then each
//! stream's due control frames (SYN, credit growth, CFM, FIN), then PSH frames round-robin.

use super::Mux;
use super::buffer::idle_pool_size;
use super::frame::{CFM_GROWTH, Cmd, HEADER_LEN, Header};
use super::table::stream_in;

impl Mux {
    /// Whether [`Mux::poll_transmit`] has frames to emit.
    pub fn has_transmit(&self) -> bool {
        self.failure.is_none()
            && !(self.vrm_out.is_empty()
                && self.ctrl_queue.is_empty()
                && self.data_queue.is_empty())
    }

    /// Appends whole frames to `out`, at most `budget` bytes, and returns how many bytes it
    /// appended. VRM and control frames (SYN, CFM, FIN) go first, then data from the streams
    /// round-robin in PSH frames of at most [`Config::max_frame`] payload bytes, cut to fit
    /// the budget. The budget is never exceeded; a budget under 8 bytes may emit nothing.
    ///
    /// [`Config::max_frame`]: super::Config::max_frame
    pub fn poll_transmit(&mut self, budget: usize, out: &mut Vec<u8>) -> usize {
        if self.failure.is_some() {
            return 0;
        }
        let start = out.len();
        let limit = start.saturating_add(budget);
        while let Some(header) = self.vrm_out.front() {
            if out.len() + HEADER_LEN > limit {
                return out.len() - start;
            }
            self.emit_header(*header, out);
            self.vrm_out.pop_front();
        }
        if !self.transmit_control(limit, out) {
            // SYNs must precede their stream's data: no data until control is all out.
            return out.len() - start;
        }
        self.transmit_data(limit, out);
        if self.stats.send_buffered == 0 && self.stats.recv_buffered == 0 {
            self.pool.trim(idle_pool_size(self.stats.streams));
        }
        out.len() - start
    }

    fn emit_header(&mut self, header: Header, out: &mut Vec<u8>) {
        header.emit(out);
        self.stats.frames_sent += 1;
    }

    /// Emits due control frames; false if the budget ran out first.
    fn transmit_control(&mut self, limit: usize, out: &mut Vec<u8>) -> bool {
        while let Some(&id) = self.ctrl_queue.front() {
            let Some(stream) = self
                .streams
                .get_mut(usize::from(id))
                .and_then(Option::as_mut)
            else {
                self.ctrl_queue.pop_front();
                continue;
            };
            let mut frames = [None; 4];
            if stream.syn_pending {
                frames[0] = Some(Header {
                    cmd: Cmd::Syn,
                    id,
                    length: 0,
                });
            }
            if stream.grant_pending > 0 {
                // Before the confirmation it was decided with (see "Credit").
                frames[1] = Some(Header {
                    cmd: Cmd::Cfm,
                    id,
                    // `grant_pending < window <= i32::MAX`: below the flag.
                    length: CFM_GROWTH | stream.grant_pending,
                });
            }
            if stream.cfm_pending > 0 {
                frames[2] = Some(Header {
                    cmd: Cmd::Cfm,
                    id,
                    length: stream.cfm_pending,
                });
            }
            if stream.fin_ready() {
                frames[3] = Some(Header {
                    cmd: Cmd::Fin,
                    id,
                    length: 0,
                });
            }
            for header in frames.into_iter().flatten() {
                if out.len() + HEADER_LEN > limit {
                    return false;
                }
                header.emit(out);
                self.stats.frames_sent += 1;
                match header.cmd {
                    Cmd::Syn => stream.syn_pending = false,
                    Cmd::Cfm if header.length & CFM_GROWTH != 0 => stream.grant_pending = 0,
                    Cmd::Cfm => {
                        stream.recv_outstanding -= stream.cfm_pending;
                        stream.cfm_pending = 0;
                    }
                    _ => stream.fin_sent = true,
                }
            }
            stream.in_ctrl = false;
            self.ctrl_queue.pop_front();
            self.maybe_release(id);
        }
        true
    }

    /// Emits PSH frames round-robin until the budget or the data runs out.
    fn transmit_data(&mut self, limit: usize, out: &mut Vec<u8>) {
        let max_frame = self.config.max_frame;
        while let Some(&id) = self.data_queue.front() {
            let room = limit.saturating_sub(out.len() + HEADER_LEN);
            if room == 0 {
                return;
            }
            let Some(stream) = stream_in(&mut self.streams, id) else {
                self.data_queue.pop_front();
                continue;
            };
            let n = stream.send_buf.len().min(max_frame).min(room);
            self.data_queue.pop_front();
            if n == 0 {
                stream.in_data = false;
                continue;
            }
            // `n <= max_frame <= window <= u32::MAX`.
            Header {
                cmd: Cmd::Psh,
                id,
                length: n as u32,
            }
            .emit(out);
            stream.send_buf.append_to(n, out, &mut self.pool);
            stream.unconfirmed += n as u32;
            let more = !stream.send_buf.is_empty();
            self.stats.frames_sent += 1;
            self.stats.bytes_sent += n as u64;
            self.stats.send_buffered -= n;
            if more {
                self.data_queue.push_back(id);
                continue;
            }
            stream.in_data = false;
            if !stream.fin_ready() {
                continue;
            }
            if out.len() + HEADER_LEN <= limit {
                // The FIN follows the stream's last byte directly.
                Header {
                    cmd: Cmd::Fin,
                    id,
                    length: 0,
                }
                .emit(out);
                stream.fin_sent = true;
                self.stats.frames_sent += 1;
                self.maybe_release(id);
            } else {
                self.queue_ctrl(id);
            }
        }
    }
}
