//! The wire format of session packets: what a path carries between two peers.
//!
//! ```text
//! kcp       'K' | KCP segments (conv u32 LE first, as KCP writes them)      lane 0
//! lane      'L' | lane u8 | KCP segments                               lanes 1..16
//! datagram  'D' | conv u32 BE | payload                  unreliable, for UDP flows
//! ping      'P' | conv u32 BE | token u64 BE              keepalive and RTT probe
//! pong      'Q' | conv u32 BE | token u64 BE              the echo of a ping
//! ```
//!
//! A session runs several KCP conversations side by side, its lanes (see `super::lane`); all
//! share the session's conv and differ in the lane number. Lane 0 keeps the plain `'K'` form.
//!
//! Paths treat packets as opaque bytes. A packet whose conv is not the session's is refused
//! before any of its contents are looked at, so a stale packet from an earlier incarnation of
//! the session (or another session) can never corrupt this one.

use super::{ConvId, InputError};

/// The first byte of a session packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Kcp = b'K' as isize,
    Lane = b'L' as isize,
    Datagram = b'D' as isize,
    Ping = b'P' as isize,
    Pong = b'Q' as isize,
}

/// The conv a session packet is addressed to: little-endian inside KCP's own header,
/// big-endian in ours. `None` for a packet too short to say.
pub(crate) fn conv_of(packet: &[u8]) -> Option<ConvId> {
    let (&kind, rest) = packet.split_first()?;
    if kind == Kind::Lane as u8 {
        let b: [u8; 4] = rest.get(1..5)?.try_into().ok()?;
        return Some(ConvId(u32::from_le_bytes(b)));
    }
    let b: [u8; 4] = rest.get(..4)?.try_into().ok()?;
    Some(ConvId(if kind == Kind::Kcp as u8 {
        u32::from_le_bytes(b)
    } else {
        u32::from_be_bytes(b)
    }))
}

/// Lanes a session may run; a packet naming a higher lane is refused.
pub(crate) const MAX_LANES: usize = 16;

/// Bytes a KCP packet spends before its segments, whatever its lane: every lane's KCP gets
/// the same MTU, so all lanes cut segments alike.
pub(crate) const KCP_PREFIX: usize = 2;

/// Appends the start of a KCP packet of `lane` to `out`.
pub(crate) fn kcp_prefix(lane: u8, out: &mut Vec<u8>) {
    if lane == 0 {
        out.push(Kind::Kcp as u8);
    } else {
        out.extend_from_slice(&[Kind::Lane as u8, lane]);
    }
}

/// Bytes a datagram packet spends before its payload.
pub(crate) const DATAGRAM_OVERHEAD: usize = 5;
/// KCP's own segment header.
pub(crate) const KCP_HEADER: usize = 24;

/// A parsed session packet, borrowing from the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Packet<'a> {
    /// KCP segments of a lane, without the kind and lane bytes.
    Kcp {
        lane: u8,
        segments: &'a [u8],
    },
    Datagram(&'a [u8]),
    Ping(u64),
    Pong(u64),
}

impl<'a> Packet<'a> {
    /// Parses `data`, refusing anything not addressed to `conv`.
    pub(crate) fn parse(data: &'a [u8], conv: ConvId) -> Result<Self, InputError> {
        let got = conv_of(data).ok_or(InputError::Truncated)?;
        if got != conv {
            return Err(InputError::WrongConv(got));
        }
        let (&kind, rest) = data.split_first().ok_or(InputError::Truncated)?;
        if kind == Kind::Kcp as u8 {
            return Ok(Self::Kcp {
                lane: 0,
                segments: rest,
            });
        }
        if kind == Kind::Lane as u8 {
            // `conv_of` saw the lane byte and a conv after it.
            let (&lane, segments) = rest.split_first().ok_or(InputError::Truncated)?;
            if lane == 0 || usize::from(lane) >= MAX_LANES {
                return Err(InputError::BadLane(lane));
            }
            return Ok(Self::Kcp { lane, segments });
        }
        let body = &rest[4..];
        let token = || -> Result<u64, InputError> {
            let b: [u8; 8] = body.try_into().map_err(|_| InputError::Truncated)?;
            Ok(u64::from_be_bytes(b))
        };
        match kind {
            k if k == Kind::Datagram as u8 => Ok(Self::Datagram(body)),
            k if k == Kind::Ping as u8 => Ok(Self::Ping(token()?)),
            k if k == Kind::Pong as u8 => Ok(Self::Pong(token()?)),
            other => Err(InputError::UnknownKind(other)),
        }
    }

    /// Appends the packet to `out`.
    pub(crate) fn emit(&self, conv: ConvId, out: &mut Vec<u8>) {
        match *self {
            Self::Kcp { lane, segments } => {
                kcp_prefix(lane, out);
                out.extend_from_slice(segments);
            }
            Self::Datagram(payload) => {
                out.push(Kind::Datagram as u8);
                out.extend_from_slice(&conv.0.to_be_bytes());
                out.extend_from_slice(payload);
            }
            Self::Ping(token) | Self::Pong(token) => {
                let kind = if matches!(self, Self::Ping(_)) {
                    Kind::Ping
                } else {
                    Kind::Pong
                };
                out.push(kind as u8);
                out.extend_from_slice(&conv.0.to_be_bytes());
                out.extend_from_slice(&token.to_be_bytes());
            }
        }
    }
}

/// One KCP segment header, checked before the segment reaches the `kcp` crate.
///
/// The crate trusts its input more than a network-facing decoder may: an ACK timestamp far in
/// the past overflows its RTT arithmetic, and a command it does not know aborts the whole
/// packet after earlier segments were already applied. Checking every header first makes a
/// packet all-or-nothing and keeps hostile values out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SegmentHeader {
    pub(crate) conv: u32,
    pub(crate) cmd: u8,
    pub(crate) ts: u32,
    pub(crate) sn: u32,
    /// Every segment below this one has arrived (at the end that sent this segment).
    pub(crate) una: u32,
    pub(crate) len: usize,
}

pub(crate) const CMD_PUSH: u8 = 81;
pub(crate) const CMD_ACK: u8 = 82;
pub(crate) const CMD_WASK: u8 = 83;
pub(crate) const CMD_WINS: u8 = 84;

impl SegmentHeader {
    fn parse(b: &[u8]) -> Option<Self> {
        let b: &[u8; KCP_HEADER] = b.get(..KCP_HEADER)?.try_into().ok()?;
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Some(Self {
            conv: u32_at(0),
            cmd: b[4],
            ts: u32_at(8),
            sn: u32_at(12),
            una: u32_at(16),
            len: u32_at(20) as usize,
        })
    }
}

/// The segments of a KCP packet this session wrote or has checked, each with its header and
/// its bytes (header included). A truncated tail ends the walk; [`check_segments`] is what
/// refuses such input from the network.
pub(crate) fn segments(b: &[u8]) -> impl Iterator<Item = (SegmentHeader, &[u8])> {
    let mut rest = b;
    std::iter::from_fn(move || {
        let h = SegmentHeader::parse(rest)?;
        let (segment, tail) = rest.split_at((KCP_HEADER + h.len).min(rest.len()));
        rest = tail;
        Some((h, segment))
    })
}

/// Checks every segment in `segments` (KCP bytes without the kind byte); returns whether any
/// carries data.
///
/// `now_ms` is the session clock KCP runs on; `mss` bounds a segment's payload.
pub(crate) fn check_segments(
    segments: &[u8],
    conv: ConvId,
    now_ms: u32,
    mss: usize,
) -> Result<bool, InputError> {
    let mut has_data = false;
    let mut rest = segments;
    if rest.len() < KCP_HEADER {
        return Err(InputError::Truncated);
    }
    while !rest.is_empty() {
        let h = SegmentHeader::parse(rest).ok_or(InputError::Truncated)?;
        if h.conv != conv.0 {
            return Err(InputError::WrongConv(ConvId(h.conv)));
        }
        match h.cmd {
            CMD_PUSH => has_data = true,
            CMD_WASK | CMD_WINS => {}
            CMD_ACK => {
                // An ACK echoes a timestamp we sent: it cannot be from the future, and a
                // segment stays in flight at most KCP's 60 s maximum RTO times its few
                // retransmissions. Anything else is forged or corrupt.
                let age = now_ms.wrapping_sub(h.ts);
                if age > MAX_ACK_AGE_MS {
                    return Err(InputError::BadTimestamp);
                }
            }
            other => return Err(InputError::UnknownKcpCommand(other)),
        }
        if h.len > mss || (h.cmd != CMD_PUSH && h.len != 0) {
            return Err(InputError::BadLength(h.len));
        }
        let end = KCP_HEADER + h.len;
        if rest.len() < end {
            return Err(InputError::Truncated);
        }
        rest = &rest[end..];
    }
    Ok(has_data)
}

const MAX_ACK_AGE_MS: u32 = 10 * 60 * 1000;

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(conv: u32, cmd: u8, ts: u32, payload: &[u8]) -> Vec<u8> {
        let mut s = Vec::new();
        s.extend_from_slice(&conv.to_le_bytes());
        s.extend_from_slice(&[cmd, 0, 0, 1]);
        s.extend_from_slice(&ts.to_le_bytes());
        s.extend_from_slice(&[0; 8]);
        s.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        s.extend_from_slice(payload);
        s
    }

    #[test]
    fn packets_round_trip() {
        let conv = ConvId(0xDEAD_BEEF);
        let kcp = segment(conv.0, CMD_PUSH, 5, b"hi");
        for p in [
            Packet::Kcp {
                lane: 0,
                segments: &kcp,
            },
            Packet::Kcp {
                lane: 3,
                segments: &kcp,
            },
            Packet::Datagram(b"payload"),
            Packet::Datagram(b""),
            Packet::Ping(7),
            Packet::Pong(u64::MAX),
        ] {
            let mut out = Vec::new();
            p.emit(conv, &mut out);
            assert_eq!(Packet::parse(&out, conv), Ok(p));
            assert_eq!(
                Packet::parse(&out, ConvId(1)),
                Err(InputError::WrongConv(conv))
            );
        }
    }

    #[test]
    fn garbage_is_refused() {
        let conv = ConvId(9);
        assert_eq!(Packet::parse(&[], conv), Err(InputError::Truncated));
        assert_eq!(Packet::parse(b"K\x09", conv), Err(InputError::Truncated));
        assert_eq!(
            Packet::parse(b"Z\0\0\0\x09", conv),
            Err(InputError::UnknownKind(b'Z'))
        );
        assert_eq!(
            Packet::parse(b"P\0\0\0\x09\0", conv),
            Err(InputError::Truncated)
        );
        assert_eq!(
            Packet::parse(b"L\x01\x09\0\0", conv),
            Err(InputError::Truncated)
        );
        for lane in [0, MAX_LANES as u8, 255] {
            assert_eq!(
                Packet::parse(&[b'L', lane, 9, 0, 0, 0], conv),
                Err(InputError::BadLane(lane))
            );
        }
    }

    #[test]
    fn segment_checks() {
        let conv = ConvId(3);
        let ok = [
            segment(3, CMD_PUSH, 0, b"abc"),
            segment(3, CMD_ACK, 90, b""),
        ]
        .concat();
        assert_eq!(check_segments(&ok, conv, 100, 1000), Ok(true));
        let future_ack = segment(3, CMD_ACK, 101, b"");
        assert_eq!(
            check_segments(&future_ack, conv, 100, 1000),
            Err(InputError::BadTimestamp)
        );
        let mut truncated = segment(3, CMD_PUSH, 0, b"abc");
        truncated.pop();
        assert_eq!(
            check_segments(&truncated, conv, 100, 1000),
            Err(InputError::Truncated)
        );
        assert_eq!(
            check_segments(&segment(3, 99, 0, b""), conv, 100, 1000),
            Err(InputError::UnknownKcpCommand(99))
        );
        assert_eq!(
            check_segments(&segment(3, CMD_PUSH, 0, &[0; 11]), conv, 100, 10),
            Err(InputError::BadLength(11))
        );
        assert_eq!(
            check_segments(&segment(4, CMD_PUSH, 0, b""), conv, 100, 10),
            Err(InputError::WrongConv(ConvId(4)))
        );
    }
}
