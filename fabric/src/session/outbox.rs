//! Where the lanes' KCP instances write their packets, and the order they leave in.
//!
//! The `kcp` crate owns its output writer and offers no way to reach it again, so every lane's
//! [`Outbox`] shares one [`OutQueue`] with the session. The lock is never contended: both
//! sides are the same `Session`.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex};

use super::flight::InFlight;
use super::packet;

/// How many times a thin flow's data packet is sent.
pub(super) const THIN_COPIES: u8 = 3;

/// Segments in flight at or under which a lane counts as a thin flow.
pub(super) const THIN_SEGMENTS: usize = 4;

/// Buffers kept for reuse.
const FREE_BUFFERS: usize = 64;

/// The packets KCP wrote and the session has not sent yet.
#[derive(Debug, Default)]
pub(super) struct OutQueue {
    /// Data packets of each lane, by lane number.
    lanes: Vec<LaneQueue>,
    /// The lane round-robin resumes at.
    next_lane: usize,
    /// Packets without data segments (acknowledgements, window probes), of every lane: they
    /// skip the pacer, because delaying acknowledgements bunches them up, which inflates the
    /// sender's rate estimate and RTT.
    acks: VecDeque<Vec<u8>>,
    /// Bytes in the lanes' data queues.
    queued_bytes: usize,
    /// The front of `acks` has gone out once and is due again.
    ack_copy_due: bool,
    /// Spent packet buffers, reused so the steady state allocates nothing.
    free: Vec<Vec<u8>>,
    /// Copies of the data segments the peer has not acknowledged (see `flight`).
    pub(super) flight: InFlight,
    pub(super) retransmits: u64,
    pub(super) segments_sent: u64,
}

#[derive(Debug, Default)]
struct LaneQueue {
    packets: VecDeque<Vec<u8>>,
    /// How many copies of the thin flow's packet at the front of `packets` have gone out
    /// (0: the front packet is not a thin flow's).
    thin_copies_sent: u8,
    /// Highest data sequence number sent so far on this lane, to tell retransmissions apart.
    highest_sn: Option<u32>,
}

/// The writer one lane's KCP instance owns.
#[derive(Debug)]
pub(super) struct Outbox {
    queue: Arc<Mutex<OutQueue>>,
    lane: u8,
}

impl Outbox {
    pub(super) fn new(queue: Arc<Mutex<OutQueue>>, lane: u8) -> Self {
        Self { queue, lane }
    }
}

impl io::Write for Outbox {
    fn write(&mut self, segments: &[u8]) -> io::Result<usize> {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let lane = usize::from(self.lane);
        if q.lanes.len() <= lane {
            q.lanes.resize_with(lane + 1, LaneQueue::default);
        }
        q.count_segments(lane, segments);
        // KCP packs its acknowledgements into the same packet as data. Data is paced, at the
        // rate of *this* direction, which may be slow; acknowledgements held back with it
        // would bunch up and inflate the peer's RTT. So the two part ways here: segments are
        // independent in KCP's input, in any grouping.
        let mut acks = q.free.pop().unwrap_or_default();
        let mut data = q.free.pop().unwrap_or_default();
        acks.clear();
        data.clear();
        packet::kcp_prefix(self.lane, &mut acks);
        packet::kcp_prefix(self.lane, &mut data);
        let prefix = acks.len();
        for (h, segment) in packet::segments(segments) {
            let out = if h.cmd == packet::CMD_ACK {
                &mut acks
            } else {
                &mut data
            };
            out.extend_from_slice(segment);
        }
        if acks.len() > prefix {
            q.acks.push_back(acks);
        } else {
            q.recycle(acks);
        }
        if data.len() > prefix {
            q.queued_bytes += data.len();
            q.lanes[lane].packets.push_back(data);
        } else {
            q.recycle(data);
        }
        Ok(segments.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl OutQueue {
    /// Counts first transmissions and retransmissions of data segments in a packet KCP wrote.
    /// Keeps a copy of each until the peer acknowledges it.
    fn count_segments(&mut self, lane: usize, segments: &[u8]) {
        for (h, segment) in packet::segments(segments) {
            if h.cmd != packet::CMD_PUSH {
                continue;
            }
            self.flight.on_sent(lane as u8, h.sn, h.ts, segment);
            let highest = &mut self.lanes[lane].highest_sn;
            match *highest {
                Some(high) if (h.sn.wrapping_sub(high) as i32) <= 0 => self.retransmits += 1,
                _ => {
                    *highest = Some(h.sn);
                    self.segments_sent += 1;
                }
            }
        }
    }

    pub(super) fn recycle(&mut self, spent: Vec<u8>) {
        if self.free.len() < FREE_BUFFERS {
            self.free.push(spent);
        }
    }

    /// Bytes of data packets waiting for the pacer.
    pub(super) fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// Whether any data packet waits, new or to be sent again.
    pub(super) fn has_data(&self) -> bool {
        self.queued_bytes > 0 || self.flight.has_resends()
    }

    /// Puts the next segment the session sends again itself (see `flight`) into `buf`,
    /// stamped `now_ms`. These go before new data: they are what the peer waits for.
    pub(super) fn next_resend(&mut self, now_ms: u32, buf: &mut Vec<u8>) -> bool {
        let sent = self.flight.next_resend(now_ms, buf);
        if sent {
            self.retransmits += 1;
        }
        sent
    }

    /// Puts the next acknowledgement packet into `buf`, if any.
    ///
    /// Every acknowledgement-only packet goes out twice. KCP acknowledges each segment on its
    /// own, with no ranges: one lost acknowledgement while any earlier segment is missing
    /// makes the sender retransmit a segment that had arrived. On a lossy path that was a
    /// third of all retransmissions; the second copy costs about 2 % more bytes on the return
    /// path.
    pub(super) fn next_ack(&mut self, buf: &mut Vec<u8>) -> bool {
        let Some(p) = self.acks.pop_front() else {
            return false;
        };
        if self.ack_copy_due {
            self.ack_copy_due = false;
            let spent = std::mem::replace(buf, p);
            self.recycle(spent);
        } else {
            self.ack_copy_due = true;
            buf.clear();
            buf.extend_from_slice(&p);
            self.acks.push_front(p);
        }
        true
    }

    /// Puts the next data packet into `buf`; `in_flight(lane)` is what that lane's KCP holds
    /// unacknowledged. Returns whether there was one.
    ///
    /// A thin lane goes first. A thin flow (a request, a response, a keystroke) has no later
    /// segments whose acknowledgements would trigger a fast retransmission: a lost segment
    /// waits for the RTO, several round trips. While a lane carries only a few segments, each
    /// of its data packets goes out three times instead (see [`OutQueue::next_copy`]), ahead
    /// of the other lanes' backlog; KCP drops the copies that arrive later. (Two copies still
    /// left one exchange in 200 waiting for the RTO at 5 % loss.) The other lanes share the
    /// path round-robin.
    pub(super) fn next_data(
        &mut self,
        in_flight: impl Fn(usize) -> usize,
        buf: &mut Vec<u8>,
    ) -> bool {
        let lanes = self.lanes.len();
        let thin = (0..lanes).find(|&i| {
            let l = &self.lanes[i];
            l.packets.len() == 1 && l.thin_copies_sent == 0 && in_flight(i) <= THIN_SEGMENTS
        });
        let Some(lane) = thin.or_else(|| {
            (0..lanes)
                .map(|i| (self.next_lane + i) % lanes)
                .find(|&i| !self.lanes[i].packets.is_empty())
        }) else {
            return false;
        };
        self.next_lane = (lane + 1) % lanes;
        let l = &mut self.lanes[lane];
        if thin.is_some()
            && let Some(p) = l.packets.front()
        {
            l.thin_copies_sent = 1;
            buf.clear();
            buf.extend_from_slice(p);
            return true;
        }
        self.pop(lane, buf)
    }

    /// Puts the next copy of a thin lane's packet into `buf`, if one is due.
    ///
    /// Copies follow the first transmission at once and do not count against the pacer: they
    /// are what the pacer's delivery rate never sees (the peer acknowledges one of them), so
    /// charging them would lower the rate each round, and with several thin lanes the rate
    /// spiralled down until every lane was thin. Only lanes with at most
    /// [`THIN_SEGMENTS`] in flight make copies, which bounds the extra load.
    pub(super) fn next_copy(&mut self, buf: &mut Vec<u8>) -> bool {
        let Some(lane) = self
            .lanes
            .iter()
            .position(|l| (1..THIN_COPIES).contains(&l.thin_copies_sent))
        else {
            return false;
        };
        let l = &mut self.lanes[lane];
        l.thin_copies_sent += 1;
        if l.thin_copies_sent < THIN_COPIES
            && let Some(p) = l.packets.front()
        {
            buf.clear();
            buf.extend_from_slice(p);
            return true;
        }
        l.thin_copies_sent = 0;
        self.pop(lane, buf)
    }

    /// Moves the front packet of `lane` into `buf`.
    fn pop(&mut self, lane: usize, buf: &mut Vec<u8>) -> bool {
        let Some(p) = self.lanes[lane].packets.pop_front() else {
            return false;
        };
        self.queued_bytes -= p.len();
        let spent = std::mem::replace(buf, p);
        self.recycle(spent);
        true
    }

    /// Drops everything waiting: the session ended.
    pub(super) fn clear(&mut self) {
        for l in &mut self.lanes {
            l.packets.clear();
            l.thin_copies_sent = 0;
        }
        self.acks.clear();
        self.queued_bytes = 0;
        self.flight.clear();
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    /// One KCP data segment of `len` payload bytes, numbered `sn`.
    fn segment(sn: u32, len: usize) -> Vec<u8> {
        let mut s = Vec::new();
        s.extend_from_slice(&7u32.to_le_bytes());
        s.extend_from_slice(&[packet::CMD_PUSH, 0, 0, 1]);
        s.extend_from_slice(&[0; 4]);
        s.extend_from_slice(&sn.to_le_bytes());
        s.extend_from_slice(&[0; 4]);
        s.extend_from_slice(&(len as u32).to_le_bytes());
        s.extend(std::iter::repeat_n(0xAB, len));
        s
    }

    /// Takes every data packet out, as `(kind byte, lane byte)`, with `in_flight` segments
    /// on each lane.
    fn drain(q: &Arc<Mutex<OutQueue>>, in_flight: &[usize]) -> Vec<(u8, u8)> {
        let mut q = q.lock().unwrap();
        let mut buf = Vec::new();
        let mut sent = Vec::new();
        while q.next_copy(&mut buf) || q.next_data(|l| in_flight[l], &mut buf) {
            sent.push((buf[0], if buf[0] == b'L' { buf[1] } else { 0 }));
        }
        assert_eq!(q.queued_bytes(), 0);
        sent
    }

    #[test]
    fn a_thin_lane_jumps_the_backlog_three_times() {
        let q = Arc::new(Mutex::new(OutQueue::default()));
        let mut bulk = Outbox::new(q.clone(), 0);
        let mut thin = Outbox::new(q.clone(), 2);
        for sn in 0..5 {
            bulk.write_all(&segment(sn, 1000)).unwrap();
        }
        thin.write_all(&segment(0, 1)).unwrap();
        let sent = drain(&q, &[500, 0, 1]);
        // The request of lane 2 goes first, three times, then the bulk lane's backlog.
        let expected: Vec<(u8, u8)> = [(b'L', 2); 3].into_iter().chain([(b'K', 0); 5]).collect();
        assert_eq!(sent, expected);
    }

    #[test]
    fn busy_lanes_take_turns_and_are_sent_once() {
        let q = Arc::new(Mutex::new(OutQueue::default()));
        let mut a = Outbox::new(q.clone(), 0);
        let mut b = Outbox::new(q.clone(), 1);
        for sn in 0..3 {
            a.write_all(&segment(sn, 100)).unwrap();
            b.write_all(&segment(sn, 100)).unwrap();
        }
        let sent = drain(&q, &[100, 100]);
        assert_eq!(
            sent,
            [
                (b'K', 0),
                (b'L', 1),
                (b'K', 0),
                (b'L', 1),
                (b'K', 0),
                (b'L', 1)
            ]
        );
        // Sent the first time, each counted once.
        assert_eq!(q.lock().unwrap().segments_sent, 6);
        // The same segment written again is a retransmission.
        a.write_all(&segment(1, 100)).unwrap();
        assert_eq!(q.lock().unwrap().retransmits, 1);
    }

    #[test]
    fn acknowledgements_part_from_data_and_go_out_twice() {
        let q = Arc::new(Mutex::new(OutQueue::default()));
        let mut lane = Outbox::new(q.clone(), 3);
        let mut ack = segment(9, 0);
        ack[4] = packet::CMD_ACK;
        lane.write_all(&[ack.clone(), segment(1, 10)].concat())
            .unwrap();
        let mut q = q.lock().unwrap();
        let mut buf = Vec::new();
        for _ in 0..2 {
            assert!(q.next_ack(&mut buf));
            assert_eq!(buf, [&[b'L', 3][..], &ack].concat());
        }
        assert!(!q.next_ack(&mut buf));
        assert!(q.has_data());
    }
}
