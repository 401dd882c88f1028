//! The SOCKS5 UDP request header (RFC 1928 §7), sans-IO.
//!
//! ```text
//! +----+------+------+----------+----------+----------+
//! |RSV | FRAG | ATYP | DST.ADDR | DST.PORT |   DATA   |
//! | 2  |  1   |  1   | Variable |    2     | Variable |
//! +----+------+------+----------+----------+----------+
//! ```
//!
//! fast-socks5 has a parser for this too, but it is `async` over a slice and copies the
//! address into an owned type per call; this one is a plain function over the datagram that
//! borrows the payload, which suits the per-datagram hot path and a fuzzer.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::dialer::Target;

/// Why a datagram from the client was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UdpHeaderError {
    /// Shorter than its header says.
    #[error("truncated udp request header")]
    Truncated,
    /// The reserved field was not zero.
    #[error("nonzero reserved field in udp request header")]
    Reserved,
    /// Fragmentation is optional in RFC 1928 and we do not reassemble.
    #[error("fragmented udp request (frag {0}) not supported")]
    Fragmented(u8),
    /// Unknown ATYP.
    #[error("unknown address type {0}")]
    AddressType(u8),
    /// A domain name that is empty or not UTF-8.
    #[error("invalid domain name in udp request header")]
    Domain,
}

/// Bytes of the longest header we emit (IPv6 source): what to reserve in front of a payload.
pub const MAX_EMIT_LEN: usize = 4 + 16 + 2;

/// Splits a client datagram into its destination and payload.
pub fn parse(datagram: &[u8]) -> Result<(Target, &[u8]), UdpHeaderError> {
    let [r0, r1, frag, atyp, rest @ ..] = datagram else {
        return Err(UdpHeaderError::Truncated);
    };
    if (*r0, *r1) != (0, 0) {
        return Err(UdpHeaderError::Reserved);
    }
    if *frag != 0 {
        return Err(UdpHeaderError::Fragmented(*frag));
    }
    let (target, rest) = match atyp {
        1 => {
            let (ip, rest) = split::<4>(rest)?;
            let (port, rest) = split::<2>(rest)?;
            let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), u16::from_be_bytes(port));
            (Target::Ip(addr), rest)
        }
        4 => {
            let (ip, rest) = split::<16>(rest)?;
            let (port, rest) = split::<2>(rest)?;
            let addr = SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), u16::from_be_bytes(port));
            (Target::Ip(addr), rest)
        }
        3 => {
            let (&len, rest) = rest.split_first().ok_or(UdpHeaderError::Truncated)?;
            let len = usize::from(len);
            if rest.len() < len {
                return Err(UdpHeaderError::Truncated);
            }
            let (name, rest) = rest.split_at(len);
            let (port, rest) = split::<2>(rest)?;
            let name = std::str::from_utf8(name).map_err(|_| UdpHeaderError::Domain)?;
            if name.is_empty() {
                return Err(UdpHeaderError::Domain);
            }
            (Target::from_host_port(name, u16::from_be_bytes(port)), rest)
        }
        other => return Err(UdpHeaderError::AddressType(*other)),
    };
    Ok((target, rest))
}

fn split<const N: usize>(bytes: &[u8]) -> Result<([u8; N], &[u8]), UdpHeaderError> {
    let (head, rest) = bytes
        .split_first_chunk::<N>()
        .ok_or(UdpHeaderError::Truncated)?;
    Ok((*head, rest))
}

/// Length of the header [`emit`] writes for `source`.
pub fn header_len(source: SocketAddr) -> usize {
    match source {
        SocketAddr::V4(_) => 4 + 4 + 2,
        SocketAddr::V6(_) => 4 + 16 + 2,
    }
}

/// Writes the header for a datagram from `source` into `out`, which must be exactly
/// [`header_len`] bytes (so the caller can place it right before a payload already in its
/// buffer, and send header and payload in one system call without copying the payload).
pub fn emit(source: SocketAddr, out: &mut [u8]) {
    debug_assert_eq!(out.len(), header_len(source));
    out[..3].fill(0);
    let port = source.port().to_be_bytes();
    match source.ip().to_canonical() {
        IpAddr::V4(ip) if out.len() == 10 => {
            out[3] = 1;
            out[4..8].copy_from_slice(&ip.octets());
        }
        ip => {
            let v6 = match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            out[3] = 4;
            out[4..20].copy_from_slice(&v6.octets());
        }
    }
    let n = out.len();
    out[n - 2..].copy_from_slice(&port);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_ipv4_ipv6_domain() {
        let d = [0, 0, 0, 1, 127, 0, 0, 1, 0, 53, b'h', b'i'];
        let (t, p) = parse(&d).unwrap();
        assert_eq!(t, Target::Ip("127.0.0.1:53".parse().unwrap()));
        assert_eq!(p, b"hi");

        let mut d = vec![0, 0, 0, 4];
        d.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        d.extend_from_slice(&[1, 0, b'x']);
        let (t, p) = parse(&d).unwrap();
        assert_eq!(t, Target::Ip("[::1]:256".parse().unwrap()));
        assert_eq!(p, b"x");

        let d = [0, 0, 0, 3, 3, b'a', b'.', b'b', 0, 80];
        let (t, p) = parse(&d).unwrap();
        assert_eq!(t, Target::Domain("a.b".into(), 80));
        assert!(p.is_empty());
    }

    #[test]
    fn parse_rejects_garbage() {
        assert_eq!(parse(&[]), Err(UdpHeaderError::Truncated));
        assert_eq!(parse(&[0, 0, 0, 1, 1, 2]), Err(UdpHeaderError::Truncated));
        assert_eq!(
            parse(&[0, 1, 0, 1, 1, 2, 3, 4, 0, 0]),
            Err(UdpHeaderError::Reserved)
        );
        assert_eq!(
            parse(&[0, 0, 1, 1, 1, 2, 3, 4, 0, 0]),
            Err(UdpHeaderError::Fragmented(1))
        );
        assert_eq!(parse(&[0, 0, 0, 9, 1]), Err(UdpHeaderError::AddressType(9)));
        assert_eq!(
            parse(&[0, 0, 0, 3, 5, b'a', 0, 80]),
            Err(UdpHeaderError::Truncated)
        );
        assert_eq!(parse(&[0, 0, 0, 3, 0, 0, 80]), Err(UdpHeaderError::Domain));
        assert_eq!(
            parse(&[0, 0, 0, 3, 1, 0xff, 0, 80]),
            Err(UdpHeaderError::Domain)
        );
    }

    #[test]
    fn emit_round_trips() {
        for src in ["1.2.3.4:53", "[2001:db8::1]:5353", "[::ffff:1.2.3.4]:9"] {
            let src: SocketAddr = src.parse().unwrap();
            let mut buf = vec![0; header_len(src)];
            emit(src, &mut buf);
            buf.extend_from_slice(b"payload");
            let (t, p) = parse(&buf).unwrap();
            match t {
                Target::Ip(a) => {
                    assert_eq!(a.port(), src.port());
                    assert_eq!(a.ip().to_canonical(), src.ip().to_canonical());
                }
                other => panic!("{other:?}"),
            }
            assert_eq!(p, b"payload");
        }
    }

    #[test]
    fn parse_never_panics_on_short_or_random_input() {
        // A cheap stand-in for the fuzzer: every prefix of valid datagrams and byte noise.
        let seeds: [&[u8]; 3] = [
            &[0, 0, 0, 1, 127, 0, 0, 1, 0, 53, 1],
            &[0, 0, 0, 3, 3, b'a', b'.', b'b', 0, 80],
            &[
                0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1,
            ],
        ];
        for seed in seeds {
            for n in 0..=seed.len() {
                let _ = parse(&seed[..n]);
            }
        }
        let mut x: u32 = 1;
        for _ in 0..10_000 {
            let mut d = [0u8; 24];
            for b in &mut d {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                *b = x as u8 & 7;
            }
            let n = (x as usize) % d.len();
            let _ = parse(&d[..n]);
        }
    }
}
