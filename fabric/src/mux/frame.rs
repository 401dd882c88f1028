//! The seed-004 frame format.
//!
//! Every frame starts with a 7-byte header, all integers in network order (big-endian):
//!
//! ```text
//!  0        1                 3                                 7
//! +--------+--------+--------+--------+--------+--------+--------+------------------
//! |  cmd   |     id (u16)    |           length (u32)            | payload (PSH only)
//! +--------+--------+--------+--------+--------+--------+--------+------------------
//! ```
//!
//! | cmd          | byte | id            | length                                   |
//! |--------------|------|---------------|------------------------------------------|
//! | SYN          | 0x00 | stream opened | 0                                        |
//! | FIN          | 0x01 | stream        | 0 (the sender will write no more)        |
//! | PSH          | 0x02 | stream        | payload bytes that follow the header     |
//! | CFM          | 0x03 | stream        | bytes the receiving application consumed |
//! | VRM request  | 0x04 | random `v1`   | random `v2`                              |
//! | VRM reply    | 0x84 | `verify_code(v1, v2).0` | `verify_code(v1, v2).1`        |
//!
//! The seed leaves open how a VRM reply differs from a request; we set the high bit of the
//! command byte on replies (`0x84`). That keeps both ends' challenges apart when both probe at
//! the same time, and a peer speaking the unflagged seed dialect still sees a VRM-shaped frame.

use std::fmt;

/// Length of a frame header on the wire.
pub const HEADER_LEN: usize = 7;

/// A CFM whose length has this bit set grows the receiver's credit by the rest of the length
/// instead of confirming bytes (see the mux docs, "Credit"). Seed-004 confirmations never come
/// near it: a window, and so any confirmation, is smaller.
pub const CFM_GROWTH: u32 = 1 << 31;

/// A stream identifier as carried in the header. Id 0 is reserved (never a stream), so 65,535
/// ids are usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(pub u16);

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The command byte of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cmd {
    /// Open a stream.
    Syn,
    /// The sender finished writing on a stream (half close).
    Fin,
    /// Stream payload of `length` bytes follows.
    Psh,
    /// The receiver's application consumed `length` bytes: credit returns to the sender.
    Cfm,
    /// A peer-detection challenge.
    VrmRequest,
    /// The answer to a peer-detection challenge.
    VrmReply,
}

impl Cmd {
    /// The wire byte.
    pub fn to_byte(self) -> u8 {
        match self {
            Self::Syn => 0x00,
            Self::Fin => 0x01,
            Self::Psh => 0x02,
            Self::Cfm => 0x03,
            Self::VrmRequest => 0x04,
            Self::VrmReply => 0x84,
        }
    }

    /// Decodes a wire byte; `None` for bytes that name no command.
    pub fn from_byte(byte: u8) -> Option<Self> {
        Some(match byte {
            0x00 => Self::Syn,
            0x01 => Self::Fin,
            0x02 => Self::Psh,
            0x03 => Self::Cfm,
            0x04 => Self::VrmRequest,
            0x84 => Self::VrmReply,
            _ => return None,
        })
    }
}

/// Why a header could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// Fewer than [`HEADER_LEN`] bytes.
    #[error("frame header truncated")]
    Truncated,
    /// The command byte names no command.
    #[error("unknown frame command {0:#04x}")]
    UnknownCommand(u8),
}

/// A parsed frame header (the `Repr` of the smoltcp wire pattern).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Header {
    /// The command.
    pub cmd: Cmd,
    /// Stream id, or `v1` of a VRM frame.
    pub id: u16,
    /// Payload length (PSH), confirmed bytes (CFM), `v2` (VRM), zero otherwise.
    pub length: u32,
}

impl Header {
    /// Parses the first [`HEADER_LEN`] bytes of `bytes`.
    pub fn parse(bytes: &[u8]) -> Result<Self, FrameError> {
        let Some(raw) = bytes.first_chunk::<HEADER_LEN>() else {
            return Err(FrameError::Truncated);
        };
        let cmd = Cmd::from_byte(raw[0]).ok_or(FrameError::UnknownCommand(raw[0]))?;
        Ok(Self {
            cmd,
            id: u16::from_be_bytes([raw[1], raw[2]]),
            length: u32::from_be_bytes([raw[3], raw[4], raw[5], raw[6]]),
        })
    }

    /// The header's wire bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let id = self.id.to_be_bytes();
        let len = self.length.to_be_bytes();
        [
            self.cmd.to_byte(),
            id[0],
            id[1],
            len[0],
            len[1],
            len[2],
            len[3],
        ]
    }

    /// Appends the header's wire bytes to `out`.
    pub fn emit(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_bytes());
    }
}

/// A whole frame borrowed from a buffer: a header and, for PSH, its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// The header.
    pub header: Header,
    /// The payload (empty unless the command is PSH).
    pub payload: &'a [u8],
}

impl<'a> Frame<'a> {
    /// Parses one frame from the front of `bytes`, returning it and the bytes it used, or
    /// `Ok(None)` when `bytes` holds only part of a frame. Non-PSH frames carry no payload
    /// whatever their length says.
    pub fn parse(bytes: &'a [u8]) -> Result<Option<(Self, usize)>, FrameError> {
        let header = match Header::parse(bytes) {
            Ok(header) => header,
            Err(FrameError::Truncated) => return Ok(None),
            Err(error) => return Err(error),
        };
        let payload_len = match header.cmd {
            Cmd::Psh => header.length as usize,
            _ => 0,
        };
        // Saturating: on 32-bit targets a hostile length must not overflow the range end.
        let Some(payload) = bytes.get(HEADER_LEN..HEADER_LEN.saturating_add(payload_len)) else {
            return Ok(None);
        };
        Ok(Some((Self { header, payload }, HEADER_LEN + payload.len())))
    }

    /// Appends the frame's wire bytes to `out`.
    pub fn emit(&self, out: &mut Vec<u8>) {
        self.header.emit(out);
        out.extend_from_slice(self.payload);
    }
}

/// The VRM answer to the challenge `(v1, v2)`, implementing what the seed documents (its Go
/// code shifts the wrong amounts): the four nibbles of `v1`, most significant first,
/// `(b1, b2, b3, b4)` become `(b3, b4, b2, b1)`, and the four bytes of `v2` become
/// `(b1, b4, b2, b3)`.
pub fn verify_code(v1: u16, v2: u32) -> (u16, u32) {
    let [b1, b2, b3, b4] = [(v1 >> 12) & 0xf, (v1 >> 8) & 0xf, (v1 >> 4) & 0xf, v1 & 0xf];
    let r1 = (b3 << 12) | (b4 << 8) | (b2 << 4) | b1;
    let [c1, c2, c3, c4] = v2.to_be_bytes();
    let r2 = u32::from_be_bytes([c1, c4, c2, c3]);
    (r1, r2)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn header_is_big_endian() {
        let header = Header {
            cmd: Cmd::Psh,
            id: 0x0102,
            length: 0x0304_0506,
        };
        assert_eq!(
            header.to_bytes(),
            [0x02, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06]
        );
        assert_eq!(Header::parse(&header.to_bytes()), Ok(header));
    }

    #[test]
    fn every_command_byte_round_trips() {
        for byte in 0..=u8::MAX {
            match Cmd::from_byte(byte) {
                Some(cmd) => assert_eq!(cmd.to_byte(), byte),
                None => assert_eq!(
                    Header::parse(&[byte, 0, 0, 0, 0, 0, 0]),
                    Err(FrameError::UnknownCommand(byte))
                ),
            }
        }
    }

    #[test]
    fn truncated_input_is_incomplete_not_an_error() {
        let mut wire = Vec::new();
        Frame {
            header: Header {
                cmd: Cmd::Psh,
                id: 7,
                length: 3,
            },
            payload: b"abc",
        }
        .emit(&mut wire);
        for cut in 0..wire.len() {
            assert_eq!(Frame::parse(&wire[..cut]), Ok(None), "cut at {cut}");
        }
        let (frame, used) = Frame::parse(&wire).unwrap().unwrap();
        assert_eq!(used, wire.len());
        assert_eq!(frame.payload, b"abc");
        assert_eq!(Header::parse(&wire[..3]), Err(FrameError::Truncated));
    }

    #[test]
    fn control_frames_carry_no_payload() {
        let wire = Header {
            cmd: Cmd::Cfm,
            id: 1,
            length: 1 << 30,
        }
        .to_bytes();
        let (frame, used) = Frame::parse(&wire).unwrap().unwrap();
        assert_eq!((frame.payload.len(), used), (0, HEADER_LEN));
    }

    #[test]
    fn verify_code_permutes_nibbles_and_bytes() {
        assert_eq!(verify_code(0x1234, 0x1122_3344), (0x3421, 0x1144_2233));
        assert_eq!(verify_code(0, 0), (0, 0));
        assert_eq!(verify_code(0xf000, 0xff00_0000), (0x000f, 0xff00_0000));
    }

    fn arb_header() -> impl Strategy<Value = Header> {
        let cmd = prop_oneof![
            Just(Cmd::Syn),
            Just(Cmd::Fin),
            Just(Cmd::Psh),
            Just(Cmd::Cfm),
            Just(Cmd::VrmRequest),
            Just(Cmd::VrmReply),
        ];
        (cmd, any::<u16>(), any::<u32>()).prop_map(|(cmd, id, length)| Header { cmd, id, length })
    }

    fn arb_frames() -> impl Strategy<Value = Vec<(Header, Vec<u8>)>> {
        let frame = (arb_header(), proptest::collection::vec(any::<u8>(), 0..300)).prop_map(
            |(mut header, payload)| {
                if header.cmd == Cmd::Psh {
                    header.length = payload.len() as u32;
                    (header, payload)
                } else {
                    (header, Vec::new())
                }
            },
        );
        proptest::collection::vec(frame, 0..20)
    }

    proptest! {
        #[test]
        fn header_round_trips(header in arb_header()) {
            prop_assert_eq!(Header::parse(&header.to_bytes()), Ok(header));
        }

        #[test]
        fn verify_code_is_a_bijection_of_order_dividing_12(v1 in any::<u16>(), v2 in any::<u32>()) {
            // The nibble permutation is a 4-cycle, the byte permutation a 3-cycle: applying the
            // code 12 times is the identity, and no information is lost on the way.
            let mut value = (v1, v2);
            for _ in 0..12 {
                value = verify_code(value.0, value.1);
            }
            prop_assert_eq!(value, (v1, v2));
        }

        #[test]
        fn frame_sequences_round_trip_under_any_chunking(
            frames in arb_frames(),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..10),
        ) {
            let mut wire = Vec::new();
            for (header, payload) in &frames {
                Frame { header: *header, payload }.emit(&mut wire);
            }
            let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(wire.len() + 1)).collect();
            cuts.push(wire.len());
            cuts.sort_unstable();
            // Feed chunk by chunk into a reassembly buffer, as a driver would.
            let mut pending = Vec::new();
            let mut parsed = Vec::new();
            let mut start = 0;
            for cut in cuts {
                pending.extend_from_slice(&wire[start..cut]);
                start = cut;
                let mut used_total = 0;
                while let Some((frame, used)) = Frame::parse(&pending[used_total..]).unwrap() {
                    parsed.push((frame.header, frame.payload.to_vec()));
                    used_total += used;
                }
                pending.drain(..used_total);
            }
            prop_assert!(pending.is_empty());
            prop_assert_eq!(parsed, frames);
        }
    }
}
