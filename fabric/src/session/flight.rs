//! Copies of the data segments the peer has not acknowledged, so that the session can send
//! them again itself, where KCP's own timers would wait too long:
//!
//! - **On a path change**, every segment in flight on the old path is gone with it. KCP
//!   resends each at its own retransmission time, which by then has backed off 1.5× per
//!   timeout (nodelay): a move noticed after a second of silence waited about as long again
//!   for the next try. The session resends them all at once instead, as QUIC does when its
//!   path changes (RFC 9000 §9.4).
//! - **After a long outage** KCP's per-segment backoff has no upper bound (only the RTO
//!   estimate is capped): eight seconds without a packet put the next try seconds after the
//!   path came back. A segment that KCP has left unsent for [`resend_cap`] is sent again.
//!
//! Copies are taken as KCP writes its segments (see `Outbox`) and dropped when the peer
//! acknowledges them, by an ACK segment or by the `una` every segment carries. A resend is a
//! copy of KCP's own segment with the timestamp set to the moment it leaves, so the peer's
//! acknowledgement measures a true round trip for KCP and the pacer, and KCP drops whichever
//! copy arrives second. A copy whose acknowledgement was missed is sent again at the next
//! cap and acknowledged again: the peer acknowledges every segment below its window.
//!
//! Sequence numbers are compared as KCP compares them, wrapping; after 2³² segments on one
//! lane the acknowledged-below sweep stops at the wrap, and what it leaves behind is
//! acknowledged one by one when resent (harmless, and 5 TB away).

use std::collections::{BTreeMap, VecDeque};

use super::packet::{self, KCP_HEADER};
use crate::time::Duration;

/// Shortest time KCP may leave an unacknowledged segment unsent before the session sends it.
const MIN_RESEND_CAP: Duration = Duration::from_secs(1);
/// Longest.
const MAX_RESEND_CAP: Duration = Duration::from_secs(4);

/// How long a segment may wait unsent and unacknowledged: two smoothed round trips, within
/// [`MIN_RESEND_CAP`]..=[`MAX_RESEND_CAP`]. KCP's own first tries come well before (its RTO
/// is about `srtt + 4 rttvar`), so the cap only cuts the backed-off tail.
pub(super) fn resend_cap(srtt: Option<Duration>) -> Duration {
    srtt.map_or(MIN_RESEND_CAP, |s| s * 2)
        .clamp(MIN_RESEND_CAP, MAX_RESEND_CAP)
}

/// Whether sequence number `a` comes before `b`, in KCP's wrapping order.
fn before(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

#[derive(Debug)]
struct Copy {
    /// The whole segment, header included, as KCP last wrote it.
    segment: Vec<u8>,
    /// KCP's clock when it, or the session, last sent it.
    sent_ms: u32,
    /// Waiting in the resend queue.
    queued: bool,
}

/// The unacknowledged data segments of every lane, and those due to be sent again.
#[derive(Debug, Default)]
pub(super) struct InFlight {
    lanes: Vec<BTreeMap<u32, Copy>>,
    /// `(lane, sn)` of the copies to send again, oldest first.
    resends: VecDeque<(u8, u32)>,
    /// Bytes held in copies.
    bytes: usize,
    /// At or before the oldest time a copy not queued was last sent: nothing is overdue
    /// before this plus the cap. `None` when nothing is in flight.
    oldest_sent_ms: Option<u32>,
    /// Spent segment buffers, reused.
    free: Vec<Vec<u8>>,
}

/// Buffers kept for reuse.
const FREE_BUFFERS: usize = 256;

impl InFlight {
    /// KCP sent (or resent) data segment `sn` of `lane`; `segment` is all of it.
    pub(super) fn on_sent(&mut self, lane: u8, sn: u32, ts: u32, segment: &[u8]) {
        let lane = usize::from(lane);
        if self.lanes.len() <= lane {
            self.lanes.resize_with(lane + 1, BTreeMap::new);
        }
        if let Some(copy) = self.lanes[lane].get_mut(&sn) {
            // KCP's own retransmission: the same bytes, a new time.
            copy.sent_ms = ts;
        } else {
            let mut buf = self.free.pop().unwrap_or_default();
            buf.clear();
            buf.extend_from_slice(segment);
            self.bytes += buf.len();
            self.lanes[lane].insert(
                sn,
                Copy {
                    segment: buf,
                    sent_ms: ts,
                    queued: false,
                },
            );
        }
        if self.oldest_sent_ms.is_none() {
            self.oldest_sent_ms = Some(ts);
        }
    }

    /// The peer acknowledged `sn` of `lane`.
    pub(super) fn on_ack(&mut self, lane: u8, sn: u32) {
        if let Some(map) = self.lanes.get_mut(usize::from(lane))
            && let Some(copy) = map.remove(&sn)
        {
            self.bytes -= copy.segment.len();
            recycle(&mut self.free, copy.segment);
        }
    }

    /// The peer has every segment of `lane` before `una`.
    pub(super) fn on_una(&mut self, lane: u8, una: u32) {
        let Some(map) = self.lanes.get_mut(usize::from(lane)) else {
            return;
        };
        while let Some(entry) = map.first_entry() {
            if !before(*entry.key(), una) {
                break;
            }
            let copy = entry.remove();
            self.bytes -= copy.segment.len();
            recycle(&mut self.free, copy.segment);
        }
    }

    /// Queues every copy to be sent again (the path changed).
    pub(super) fn resend_all(&mut self, now_ms: u32) {
        self.resends.clear();
        for (lane, map) in self.lanes.iter_mut().enumerate() {
            for (&sn, copy) in map.iter_mut() {
                copy.queued = true;
                copy.sent_ms = now_ms;
                self.resends.push_back((lane as u8, sn));
            }
        }
    }

    /// Queues the copies KCP has left unsent for `cap` or longer. Returns the new
    /// [`InFlight::oldest_sent`].
    pub(super) fn resend_overdue(&mut self, now_ms: u32, cap: Duration) -> Option<u32> {
        let cap_ms = cap.as_millis() as u32;
        if self
            .oldest_sent_ms
            .is_none_or(|at| (now_ms.wrapping_sub(at) as i32) < cap_ms as i32)
        {
            return self.oldest_sent_ms;
        }
        let mut oldest: Option<u32> = None;
        for (lane, map) in self.lanes.iter_mut().enumerate() {
            for (&sn, copy) in map.iter_mut() {
                if copy.queued {
                    continue;
                }
                if now_ms.wrapping_sub(copy.sent_ms) as i32 >= cap_ms as i32 {
                    copy.queued = true;
                    copy.sent_ms = now_ms;
                    self.resends.push_back((lane as u8, sn));
                } else if oldest.is_none_or(|o| (copy.sent_ms.wrapping_sub(o) as i32) < 0) {
                    oldest = Some(copy.sent_ms);
                }
            }
        }
        // Queued copies are looked at again once they have left (`next_resend` sets the
        // time), so what counts is the oldest of the others.
        self.oldest_sent_ms = oldest;
        self.oldest_sent_ms
    }

    /// At or before the oldest time (KCP's clock) a copy was last sent: nothing is overdue
    /// before this plus the cap. `None` when nothing is in flight.
    pub(super) fn oldest_sent(&self) -> Option<u32> {
        self.oldest_sent_ms
    }

    /// Whether copies wait to be sent again.
    pub(super) fn has_resends(&self) -> bool {
        !self.resends.is_empty()
    }

    /// Puts the next copy due into `buf` as a packet of its lane, stamped `now_ms`. Copies
    /// acknowledged since they were queued are skipped.
    pub(super) fn next_resend(&mut self, now_ms: u32, buf: &mut Vec<u8>) -> bool {
        while let Some((lane, sn)) = self.resends.pop_front() {
            let Some(copy) = self
                .lanes
                .get_mut(usize::from(lane))
                .and_then(|m| m.get_mut(&sn))
            else {
                continue;
            };
            copy.queued = false;
            copy.sent_ms = now_ms;
            if self.oldest_sent_ms.is_none() {
                self.oldest_sent_ms = Some(now_ms);
            }
            buf.clear();
            packet::kcp_prefix(lane, buf);
            let at = buf.len();
            buf.extend_from_slice(&copy.segment);
            // The timestamp KCP echoes in its acknowledgement (bytes 8..12 of the header).
            if copy.segment.len() >= KCP_HEADER {
                buf[at + 8..at + 12].copy_from_slice(&now_ms.to_le_bytes());
            }
            return true;
        }
        false
    }

    /// Bytes held in copies.
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Drops every copy: the session ended.
    pub(super) fn clear(&mut self) {
        self.lanes.clear();
        self.resends.clear();
        self.bytes = 0;
        self.oldest_sent_ms = None;
    }
}

fn recycle(free: &mut Vec<Vec<u8>>, spent: Vec<u8>) {
    if free.len() < FREE_BUFFERS {
        free.push(spent);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A data segment `sn` with `len` payload bytes, sent at `ts`.
    fn segment(sn: u32, ts: u32, len: usize) -> Vec<u8> {
        let mut s = Vec::new();
        s.extend_from_slice(&7u32.to_le_bytes());
        s.extend_from_slice(&[packet::CMD_PUSH, 0, 0, 1]);
        s.extend_from_slice(&ts.to_le_bytes());
        s.extend_from_slice(&sn.to_le_bytes());
        s.extend_from_slice(&[0; 4]);
        s.extend_from_slice(&(len as u32).to_le_bytes());
        s.extend(std::iter::repeat_n(0xAB, len));
        s
    }

    fn sent(f: &mut InFlight, lane: u8, sn: u32, ts: u32) {
        f.on_sent(lane, sn, ts, &segment(sn, ts, 10));
    }

    /// `(lane, sn, ts)` of every resend due, in order.
    fn drain(f: &mut InFlight, now_ms: u32) -> Vec<(u8, u32, u32)> {
        let mut buf = Vec::new();
        let mut out = Vec::new();
        while f.next_resend(now_ms, &mut buf) {
            let lane = if buf[0] == b'L' { buf[1] } else { 0 };
            let seg = &buf[if lane == 0 { 1 } else { 2 }..];
            let (h, _) = packet::segments(seg).next().unwrap();
            out.push((lane, h.sn, h.ts));
        }
        out
    }

    #[test]
    fn acknowledged_segments_are_forgotten() {
        let mut f = InFlight::default();
        for sn in 0..5 {
            sent(&mut f, 0, sn, 100);
            sent(&mut f, 1, sn, 100);
        }
        f.on_una(0, 3);
        f.on_ack(1, 4);
        f.on_ack(1, 99);
        f.resend_all(200);
        assert_eq!(
            drain(&mut f, 200),
            [
                (0, 3, 200),
                (0, 4, 200),
                (1, 0, 200),
                (1, 1, 200),
                (1, 2, 200),
                (1, 3, 200)
            ]
        );
        f.on_una(0, 5);
        f.on_una(1, 5);
        assert_eq!(f.bytes(), 0);
    }

    #[test]
    fn only_segments_kcp_left_alone_for_the_cap_are_resent() {
        let mut f = InFlight::default();
        let cap = Duration::from_secs(1);
        sent(&mut f, 0, 0, 0);
        sent(&mut f, 0, 1, 600);
        assert_eq!(f.resend_overdue(700, cap), Some(0));
        assert!(drain(&mut f, 700).is_empty());
        // KCP resent segment 0 itself at 900: not due before 1,900.
        sent(&mut f, 0, 0, 900);
        assert_eq!(f.resend_overdue(1000, cap), Some(600));
        assert!(!f.has_resends());
        assert_eq!(f.resend_overdue(1650, cap), Some(900));
        assert_eq!(drain(&mut f, 1650), [(0, 1, 1650)]);
        // Acknowledged while queued: skipped.
        f.resend_overdue(2000, cap);
        f.on_ack(0, 0);
        assert!(drain(&mut f, 2000).is_empty());
    }

    #[test]
    fn sequence_numbers_wrap_as_kcp_wraps_them() {
        let mut f = InFlight::default();
        sent(&mut f, 0, u32::MAX - 1, 0);
        sent(&mut f, 0, u32::MAX, 0);
        f.on_una(0, u32::MAX);
        f.resend_all(5);
        assert_eq!(drain(&mut f, 5), [(0, u32::MAX, 5)]);
        assert!(before(u32::MAX, 0));
        assert!(!before(0, u32::MAX));
    }
}
