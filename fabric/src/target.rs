//! The exit-request header: the first bytes a client writes on a new stream, naming where the
//! exit should connect, and the one byte the exit answers.
//!
//! ```text
//! request  version 1 | kind u8 | address | port u16 BE
//!          kind 1: IPv4, 4 bytes; kind 3: name, length u8 then 1..=255 bytes; kind 4: IPv6, 16
//!          kind 16: the exit's own DNS resolver, no address and no port: the stream then
//!          carries DNS messages framed as over TCP (RFC 1035 §4.2.2: length u16 BE, message)
//!          kind 18: a TCP port this peer shares, on its own loopback: port u16 BE only (a
//!          share names no host: the peer dials 127.0.0.1 or [::1], nothing else)
//!          kind 19: a ping: nothing after it; the peer answers "connected" and closes (a ping
//!          of its overlay address, answered only when the peer itself answers)
//!          kind 20: what the asker may do at the peer: nothing after it; the peer answers
//!          "connected", then its grants (see [`Grants`]) and closes
//!          kind 21: an introduction of the asker's peers: the body of
//!          [`crate::introduction`] follows; the peer answers 0 when it took it (it takes the
//!          asker as its introducer), 2 when not, and closes
//!          kind 22: what the asker grants the peer changed: nothing after it; the peer
//!          answers "connected", closes, and asks the asker's grants (kind 20) again
//! reply    code u8: 0 connected, then as SOCKS5 (RFC 1928 §6): 1 general failure,
//!          2 not allowed by policy, 3 network unreachable, 4 host unreachable,
//!          5 connection refused, 6 timed out
//! ```
//!
//! Names travel unresolved: the exit resolves them, so the client never leaks a DNS query.
//! The application's bytes may follow the header in the same flight, before the reply.
//!
//! UDP flows travel in session datagrams, each led by a [`UdpHeader`]:
//!
//! ```text
//! datagram  flow u32 BE | address as in the request (version | kind | address | port) | payload
//! ```
//! From the client the address is the destination (a name is resolved at the exit); from the
//! exit it is the source of the reply. A client whose association ended says so, so the exit
//! frees the flow at once instead of when it idles out:
//!
//! ```text
//! end       flow u32 BE | version 1 | kind 17   (nothing after it)
//! ``` The flow number is the client's: one per UDP
//! association, so the exit keeps one socket per flow and replies reach the right one.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use thiserror::Error;

const VERSION: u8 = 1;
const KIND_V4: u8 = 1;
const KIND_NAME: u8 = 3;
const KIND_V6: u8 = 4;
const KIND_RESOLVER: u8 = 16;
const KIND_END: u8 = 17;
const KIND_SHARE: u8 = 18;
const KIND_PING: u8 = 19;
const KIND_GRANTS: u8 = 20;
const KIND_INTRODUCE: u8 = 21;
const KIND_GRANTS_CHANGED: u8 = 22;

/// Where the exit should connect.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// An address and port.
    Ip(SocketAddr),
    /// A host name (1 to 255 bytes) and port, resolved by the exit.
    Name(String, u16),
    /// The exit's own DNS resolver (its `--dns` servers or its system's), spoken to with
    /// DNS-over-TCP framing: whatever the client's resolver address was, names are answered
    /// where they are dialed, and the exit's destination policy is neither needed nor
    /// bypassed.
    Resolver,
    /// A TCP port the peer shares (`--share`), dialed on its own loopback: how `NAME.tox:PORT`
    /// and a peer's overlay addresses are reached. The peer checks it against what it shares
    /// with us, never against its exit policy, and it never leaves the peer's host.
    Share(u16),
    /// A round trip to the peer itself, nothing dialed: how a ping of its overlay address is
    /// answered.
    Ping,
    /// What the asker may do at the peer ([`Grants`]), so each end of a pair can show the
    /// rights both ways.
    Grants,
    /// An introduction of the asker's other peers ([`crate::introduction`]), whose body
    /// follows the header.
    Introduce,
    /// What the asker grants the peer changed: the peer asks again ([`Target::Grants`]).
    GrantsChanged,
}

/// What a peer lets the asker do, as it answers [`Target::Grants`]:
///
/// ```text
/// flags u8 | length u16 BE | shared ports as text (`22/tcp,8000-8100/tcp`, `*`)
/// flags    bit 0: may use the peer as its exit; bit 1: the peer takes the asker as its
///          introducer (it takes introductions from it, and may be introduced by it)
/// ```
///
/// The ports stay text: the sharing side's own syntax, parsed (and bounded) by whoever shows
/// them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Grants {
    /// May use the peer as its exit.
    pub exit: bool,
    /// The ports of the peer's loopback it may reach, as the peer writes them.
    pub shares: String,
    /// The peer takes the asker as its introducer.
    pub introducer: bool,
}

/// The longest grants answer read.
pub const MAX_GRANTS: usize = 3 + 4096;

impl Grants {
    /// The encoded answer; `None` if the ports' text is longer than [`MAX_GRANTS`] allows.
    pub fn emit(&self) -> Option<Vec<u8>> {
        let len = u16::try_from(self.shares.len())
            .ok()
            .filter(|&n| usize::from(n) + 3 <= MAX_GRANTS)?;
        let mut out = vec![u8::from(self.exit) | (u8::from(self.introducer) << 1)];
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(self.shares.as_bytes());
        Some(out)
    }

    /// Decodes a whole answer; `None` when it is malformed.
    pub fn parse(b: &[u8]) -> Option<Self> {
        let (&flags, rest) = b.split_first()?;
        let len = usize::from(u16::from_be_bytes(rest.get(..2)?.try_into().ok()?));
        let text = rest.get(2..)?;
        if flags > 3 || text.len() != len {
            return None;
        }
        Some(Self {
            exit: flags & 1 == 1,
            shares: std::str::from_utf8(text).ok()?.to_owned(),
            introducer: flags & 2 == 2,
        })
    }
}

/// A request header that cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum TargetError {
    /// A version this exit does not speak.
    #[error("unknown exit-request version {0}")]
    Version(u8),
    /// An address kind that does not exist.
    #[error("unknown address kind {0}")]
    Kind(u8),
    /// An empty host name.
    #[error("empty host name")]
    EmptyName,
    /// A host name that is not UTF-8.
    #[error("host name is not UTF-8")]
    NameEncoding,
    /// A name too long for the header.
    #[error("host name of {0} bytes (at most 255)")]
    NameTooLong(usize),
}

impl Target {
    /// Decodes a request from the start of `b`: the target and the header's length, or `None`
    /// when more bytes are needed.
    pub fn parse(b: &[u8]) -> Result<Option<(Self, usize)>, TargetError> {
        let Some(&version) = b.first() else {
            return Ok(None);
        };
        if version != VERSION {
            return Err(TargetError::Version(version));
        }
        let Some(&kind) = b.get(1) else {
            return Ok(None);
        };
        let (addr_len, start) = match kind {
            KIND_RESOLVER => return Ok(Some((Self::Resolver, 2))),
            KIND_PING => return Ok(Some((Self::Ping, 2))),
            KIND_GRANTS => return Ok(Some((Self::Grants, 2))),
            KIND_INTRODUCE => return Ok(Some((Self::Introduce, 2))),
            KIND_GRANTS_CHANGED => return Ok(Some((Self::GrantsChanged, 2))),
            KIND_SHARE => {
                return Ok(b
                    .get(2..4)
                    .map(|p| (Self::Share(u16::from_be_bytes([p[0], p[1]])), 4)));
            }
            KIND_V4 => (4, 2),
            KIND_V6 => (16, 2),
            KIND_NAME => match b.get(2) {
                None => return Ok(None),
                Some(0) => return Err(TargetError::EmptyName),
                Some(&n) => (usize::from(n), 3),
            },
            other => return Err(TargetError::Kind(other)),
        };
        let end = start + addr_len + 2;
        if b.len() < end {
            return Ok(None);
        }
        let addr = &b[start..start + addr_len];
        let port = u16::from_be_bytes([b[end - 2], b[end - 1]]);
        let target = match kind {
            KIND_V4 => {
                let a: [u8; 4] = addr.try_into().map_err(|_| TargetError::Kind(kind))?;
                Self::Ip(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(a)), port))
            }
            KIND_V6 => {
                let a: [u8; 16] = addr.try_into().map_err(|_| TargetError::Kind(kind))?;
                Self::Ip(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(a)), port))
            }
            _ => {
                let name = std::str::from_utf8(addr).map_err(|_| TargetError::NameEncoding)?;
                Self::Name(name.to_owned(), port)
            }
        };
        Ok(Some((target, end)))
    }

    /// Appends the encoded request to `out`.
    pub fn emit(&self, out: &mut Vec<u8>) -> Result<(), TargetError> {
        out.push(VERSION);
        match self {
            Self::Ip(SocketAddr::V4(a)) => {
                out.push(KIND_V4);
                out.extend_from_slice(&a.ip().octets());
                out.extend_from_slice(&a.port().to_be_bytes());
            }
            Self::Ip(SocketAddr::V6(a)) => {
                out.push(KIND_V6);
                out.extend_from_slice(&a.ip().octets());
                out.extend_from_slice(&a.port().to_be_bytes());
            }
            Self::Name(name, port) => {
                let len =
                    u8::try_from(name.len()).map_err(|_| TargetError::NameTooLong(name.len()))?;
                if len == 0 {
                    return Err(TargetError::EmptyName);
                }
                out.push(KIND_NAME);
                out.push(len);
                out.extend_from_slice(name.as_bytes());
                out.extend_from_slice(&port.to_be_bytes());
            }
            Self::Resolver => out.push(KIND_RESOLVER),
            Self::Ping => out.push(KIND_PING),
            Self::Grants => out.push(KIND_GRANTS),
            Self::Introduce => out.push(KIND_INTRODUCE),
            Self::GrantsChanged => out.push(KIND_GRANTS_CHANGED),
            Self::Share(port) => {
                out.push(KIND_SHARE);
                out.extend_from_slice(&port.to_be_bytes());
            }
        }
        Ok(())
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Ip(a) => a.fmt(f),
            Self::Name(n, p) => write!(f, "{n}:{p}"),
            Self::Resolver => f.write_str("the exit's resolver"),
            Self::Share(port) => write!(f, "shared port {port}"),
            Self::Ping => f.write_str("a ping"),
            Self::Grants => f.write_str("its grants"),
            Self::Introduce => f.write_str("an introduction"),
            Self::GrantsChanged => f.write_str("news that its grants changed"),
        }
    }
}

/// A client's UDP association, as numbered by the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowId(pub u32);

impl std::fmt::Display for FlowId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// The header in front of a UDP payload in a session datagram.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UdpHeader {
    /// The association.
    pub flow: FlowId,
    /// The destination (client to exit) or the source (exit to client).
    pub addr: Target,
}

/// A UDP datagram header that cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum UdpHeaderError {
    /// Shorter than its header.
    #[error("truncated udp datagram header")]
    Truncated,
    /// The address does not decode.
    #[error("udp datagram address: {0}")]
    Address(#[from] TargetError),
}

impl UdpHeader {
    /// The longest header: flow, version, kind, a 255-byte name and a port.
    pub const MAX_LEN: usize = 4 + 2 + 1 + 255 + 2;

    /// Splits a datagram into its header and payload. A datagram arrives whole, so a short
    /// one is an error, not a request for more.
    pub fn parse(datagram: &[u8]) -> Result<(Self, &[u8]), UdpHeaderError> {
        let (flow, rest) = datagram
            .split_first_chunk::<4>()
            .ok_or(UdpHeaderError::Truncated)?;
        let (addr, used) = Target::parse(rest)?.ok_or(UdpHeaderError::Truncated)?;
        let header = Self {
            flow: FlowId(u32::from_be_bytes(*flow)),
            addr,
        };
        Ok((header, &rest[used..]))
    }

    /// Appends the header to `out`; the payload goes right after it.
    pub fn emit(&self, out: &mut Vec<u8>) -> Result<(), TargetError> {
        out.extend_from_slice(&self.flow.0.to_be_bytes());
        self.addr.emit(out)
    }

    /// The datagram that says flow `flow` ended (the client closed its association).
    pub fn end(flow: FlowId) -> [u8; 6] {
        let f = flow.0.to_be_bytes();
        [f[0], f[1], f[2], f[3], VERSION, KIND_END]
    }

    /// The flow a datagram ends, if it is an [`UdpHeader::end`] datagram.
    pub fn parse_end(datagram: &[u8]) -> Option<FlowId> {
        match datagram {
            [a, b, c, d, VERSION, KIND_END] => Some(FlowId(u32::from_be_bytes([*a, *b, *c, *d]))),
            _ => None,
        }
    }

    /// A whole datagram: this header, then `payload`.
    pub fn datagram(&self, payload: &[u8]) -> Result<Vec<u8>, TargetError> {
        let mut datagram = Vec::with_capacity(Self::MAX_LEN + payload.len());
        self.emit(&mut datagram)?;
        datagram.extend_from_slice(payload);
        Ok(datagram)
    }
}

/// The exit's answer to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reply {
    /// Connected: the stream now carries the target's bytes.
    Connected,
    /// Failed for another reason.
    GeneralFailure,
    /// The exit's policy refuses this destination.
    NotAllowed,
    /// No route to the network.
    NetworkUnreachable,
    /// No route to the host, or the name does not resolve.
    HostUnreachable,
    /// The target refused the connection.
    Refused,
    /// The connection attempt timed out.
    TimedOut,
}

impl Reply {
    /// The reply byte.
    pub fn to_byte(self) -> u8 {
        match self {
            Self::Connected => 0,
            Self::GeneralFailure => 1,
            Self::NotAllowed => 2,
            Self::NetworkUnreachable => 3,
            Self::HostUnreachable => 4,
            Self::Refused => 5,
            Self::TimedOut => 6,
        }
    }

    /// Decodes a reply byte; unknown codes are general failures.
    pub fn from_byte(b: u8) -> Self {
        match b {
            0 => Self::Connected,
            2 => Self::NotAllowed,
            3 => Self::NetworkUnreachable,
            4 => Self::HostUnreachable,
            5 => Self::Refused,
            6 => Self::TimedOut,
            _ => Self::GeneralFailure,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn any_target() -> impl Strategy<Value = Target> {
        prop_oneof![
            // Scope ids and flow labels mean nothing at the exit and are not carried.
            (any::<IpAddr>(), any::<u16>())
                .prop_map(|(ip, port)| Target::Ip(SocketAddr::new(ip, port))),
            ("[a-z0-9.-]{1,255}", any::<u16>()).prop_map(|(n, p)| Target::Name(n, p)),
            Just(Target::Resolver),
            any::<u16>().prop_map(Target::Share),
            Just(Target::Ping),
            Just(Target::Grants),
            Just(Target::Introduce),
            Just(Target::GrantsChanged),
        ]
    }

    proptest! {
        #[test]
        fn round_trips_with_trailing_data(t in any_target(), tail in proptest::collection::vec(any::<u8>(), 0..32)) {
            let mut b = Vec::new();
            t.emit(&mut b).unwrap();
            let len = b.len();
            // Every prefix asks for more; the whole header parses, whatever follows it.
            for cut in 0..len {
                prop_assert_eq!(Target::parse(&b[..cut]), Ok(None));
            }
            b.extend_from_slice(&tail);
            prop_assert_eq!(Target::parse(&b), Ok(Some((t, len))));
        }

        #[test]
        fn udp_header_round_trips(flow in any::<u32>(), addr in any_target(), payload in proptest::collection::vec(any::<u8>(), 0..64)) {
            let h = UdpHeader { flow: FlowId(flow), addr };
            let mut b = Vec::new();
            h.emit(&mut b).unwrap();
            let len = b.len();
            prop_assert!(len <= UdpHeader::MAX_LEN);
            for cut in 0..len {
                prop_assert!(UdpHeader::parse(&b[..cut]).is_err());
            }
            b.extend_from_slice(&payload);
            let (back, rest) = UdpHeader::parse(&b).unwrap();
            prop_assert_eq!(back, h);
            prop_assert_eq!(rest, &payload[..]);
        }

        #[test]
        fn parse_never_panics(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Target::parse(&b);
        }
    }

    #[test]
    fn bad_headers() {
        assert_eq!(Target::parse(&[2]), Err(TargetError::Version(2)));
        assert_eq!(Target::parse(&[1, 9]), Err(TargetError::Kind(9)));
        assert_eq!(Target::parse(&[1, 16, 7]), Ok(Some((Target::Resolver, 2))));
        let g = Grants {
            exit: true,
            shares: "22/tcp,8080/tcp".into(),
            introducer: false,
        };
        assert_eq!(Grants::parse(&g.emit().unwrap()), Some(g.clone()));
        let introducer = Grants {
            introducer: true,
            ..g.clone()
        };
        assert_eq!(introducer.emit().unwrap()[0], 3);
        assert_eq!(Grants::parse(&introducer.emit().unwrap()), Some(introducer));
        assert_eq!(Target::parse(&[1, 21, 0]), Ok(Some((Target::Introduce, 2))));
        let mut bad = g.emit().unwrap();
        bad[0] = 4;
        assert_eq!(Grants::parse(&bad), None, "only two flags");
        let mut cut = g.emit().unwrap();
        cut.pop();
        assert_eq!(Grants::parse(&cut), None, "length must match");
        assert_eq!(Grants::parse(&[]), None);
        assert_eq!(Target::parse(&[1, 18, 0x1f]), Ok(None), "half a port");
        assert_eq!(
            Target::parse(&[1, 18, 0x1f, 0x90, 9]),
            Ok(Some((Target::Share(8080), 4)))
        );
        assert_eq!(Target::parse(&[1, 3, 0]), Err(TargetError::EmptyName));
        assert_eq!(
            Target::parse(&[1, 3, 1, 0xff, 0, 80]),
            Err(TargetError::NameEncoding)
        );
        let long = Target::Name("a".repeat(256), 1);
        assert_eq!(
            long.emit(&mut Vec::new()),
            Err(TargetError::NameTooLong(256))
        );
    }

    #[test]
    fn flow_end_round_trips_and_is_no_data_datagram() {
        let end = UdpHeader::end(FlowId(0xdead_beef));
        assert_eq!(UdpHeader::parse_end(&end), Some(FlowId(0xdead_beef)));
        // Data datagrams are never taken for an end, and an end is no data datagram.
        assert!(UdpHeader::parse(&end).is_err());
        let data = UdpHeader {
            flow: FlowId(1),
            addr: Target::Ip("192.0.2.1:53".parse().unwrap()),
        }
        .datagram(&[])
        .unwrap();
        assert_eq!(UdpHeader::parse_end(&data), None);
        let mut longer = end.to_vec();
        longer.push(0);
        assert_eq!(UdpHeader::parse_end(&longer), None);
    }

    #[test]
    fn reply_codes_round_trip() {
        for b in 0..=6 {
            assert_eq!(Reply::from_byte(b).to_byte(), b);
        }
        assert_eq!(Reply::from_byte(200), Reply::GeneralFailure);
    }
}
