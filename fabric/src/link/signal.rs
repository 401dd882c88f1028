//! Signalling messages for punched links, carried in Tox lossless packets (which the peers'
//! Tox keys authenticate; this format adds no authentication of its own).
//!
//! ```text
//! offer       'O' | version u8 = 1 | offer id u64 BE | x25519 public [32]
//!                 | flags u8 (bit 0: TLS fingerprint follows) | [sha-256 fingerprint [32]]
//!                 | count u8 | candidate × count
//! candidates  'C' | offer id u64 BE | count u8 | candidate × count      (trickled later)
//! direct      'D' | count u8 | candidate × count   (where our direct socket may be reached:
//!                 the endpoints a resume tries; see `crate::resume`)
//! candidate   kind u8 (bits 0-1: 0 host, 1 server-reflexive, 2 peer-reflexive;
//!                      bit 7: TCP, else UDP)
//!             | family u8 (4 or 6) | address [4 or 16] | port u16 BE
//! ```
//!
//! The offer id ties trickled candidates to the offer (and its keys) they belong to; a new
//! offer means new keys. At most [`MAX_CANDIDATES`] per message keeps a full offer (about
//! 1 KiB) inside one Tox lossless packet (1,373 bytes).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The most candidates one message carries.
pub const MAX_CANDIDATES: usize = 40;
/// The version byte of [`LinkOffer`].
pub const VERSION: u8 = 1;

const TAG_OFFER: u8 = b'O';
const TAG_CANDIDATES: u8 = b'C';
const TAG_DIRECT: u8 = b'D';

/// Why bytes are not a signalling message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SignalError {
    /// The message ends early.
    #[error("truncated signalling message")]
    Truncated,
    /// Bytes after the end of the message.
    #[error("trailing bytes after signalling message")]
    Trailing,
    /// An unknown first byte.
    #[error("unknown signalling message {0:#04x}")]
    UnknownTag(u8),
    /// An offer of a version we do not speak.
    #[error("unsupported link offer version {0}")]
    Version(u8),
    /// Flag bits this version does not define (refused so every message has one encoding).
    #[error("unknown offer flags {0:#04x}")]
    UnknownFlags(u8),
    /// More than [`MAX_CANDIDATES`] candidates.
    #[error("too many candidates: {0}")]
    TooMany(usize),
    /// A candidate with an unknown kind or family.
    #[error("malformed candidate")]
    BadCandidate,
}

/// How a candidate address was learned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CandidateKind {
    /// An address of one of our interfaces.
    Host,
    /// The address a STUN server saw us from.
    ServerReflexive,
    /// The address the peer saw a probe come from.
    PeerReflexive,
}

/// The transport of a candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// Punched UDP.
    Udp,
    /// Punched TCP (simultaneous open).
    Tcp,
}

/// One address the peer may reach us at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Candidate {
    /// How we learned it.
    pub kind: CandidateKind,
    /// UDP or TCP.
    pub protocol: Protocol,
    /// The address.
    pub addr: SocketAddr,
}

/// The message that starts a punched link: our half of the key exchange and where to reach us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkOffer {
    /// Names this offer; a new offer (new keys) gets a new id.
    pub offer_id: u64,
    /// Our X25519 public key for this offer ([`super::LinkSecret::public`]).
    pub x25519_public: [u8; 32],
    /// The SHA-256 of our TLS certificate for punched TCP, if we offer TCP.
    pub tls_fingerprint: Option<[u8; 32]>,
    /// Our candidates known so far.
    pub candidates: Vec<Candidate>,
}

/// Any signalling message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signal {
    /// A new offer.
    Offer(LinkOffer),
    /// More candidates for an earlier offer.
    Candidates {
        /// The offer they belong to.
        offer_id: u64,
        /// The candidates.
        candidates: Vec<Candidate>,
    },
    /// Where the sender's direct socket may be reached (UDP candidates).
    Direct {
        /// The candidates.
        candidates: Vec<Candidate>,
    },
}

impl Signal {
    /// Parses one whole message.
    pub fn parse(data: &[u8]) -> Result<Self, SignalError> {
        let mut r = Reader(data);
        let signal = match r.u8()? {
            TAG_OFFER => {
                let version = r.u8()?;
                if version != VERSION {
                    return Err(SignalError::Version(version));
                }
                let offer_id = r.u64()?;
                let x25519_public = r.array::<32>()?;
                let flags = r.u8()?;
                if flags & !1 != 0 {
                    return Err(SignalError::UnknownFlags(flags));
                }
                let tls_fingerprint = if flags & 1 != 0 {
                    Some(r.array::<32>()?)
                } else {
                    None
                };
                let candidates = r.candidates()?;
                Self::Offer(LinkOffer {
                    offer_id,
                    x25519_public,
                    tls_fingerprint,
                    candidates,
                })
            }
            TAG_CANDIDATES => {
                let offer_id = r.u64()?;
                let candidates = r.candidates()?;
                Self::Candidates {
                    offer_id,
                    candidates,
                }
            }
            TAG_DIRECT => Self::Direct {
                candidates: r.candidates()?,
            },
            other => return Err(SignalError::UnknownTag(other)),
        };
        if !r.0.is_empty() {
            return Err(SignalError::Trailing);
        }
        Ok(signal)
    }

    /// Appends the message to `out`. Fails if it carries more than [`MAX_CANDIDATES`].
    pub fn emit(&self, out: &mut Vec<u8>) -> Result<(), SignalError> {
        match self {
            Self::Offer(offer) => {
                check_count(&offer.candidates)?;
                out.push(TAG_OFFER);
                out.push(VERSION);
                out.extend_from_slice(&offer.offer_id.to_be_bytes());
                out.extend_from_slice(&offer.x25519_public);
                match offer.tls_fingerprint {
                    Some(fp) => {
                        out.push(1);
                        out.extend_from_slice(&fp);
                    }
                    None => out.push(0),
                }
                emit_candidates(&offer.candidates, out);
            }
            Self::Candidates {
                offer_id,
                candidates,
            } => {
                check_count(candidates)?;
                out.push(TAG_CANDIDATES);
                out.extend_from_slice(&offer_id.to_be_bytes());
                emit_candidates(candidates, out);
            }
            Self::Direct { candidates } => {
                check_count(candidates)?;
                out.push(TAG_DIRECT);
                emit_candidates(candidates, out);
            }
        }
        Ok(())
    }
}

fn check_count(c: &[Candidate]) -> Result<(), SignalError> {
    if c.len() > MAX_CANDIDATES {
        return Err(SignalError::TooMany(c.len()));
    }
    Ok(())
}

fn emit_candidates(candidates: &[Candidate], out: &mut Vec<u8>) {
    out.push(candidates.len() as u8);
    for c in candidates {
        let kind = match c.kind {
            CandidateKind::Host => 0,
            CandidateKind::ServerReflexive => 1,
            CandidateKind::PeerReflexive => 2,
        } | match c.protocol {
            Protocol::Udp => 0,
            Protocol::Tcp => 0x80,
        };
        out.push(kind);
        match c.addr.ip() {
            IpAddr::V4(ip) => {
                out.push(4);
                out.extend_from_slice(&ip.octets());
            }
            IpAddr::V6(ip) => {
                out.push(6);
                out.extend_from_slice(&ip.octets());
            }
        }
        out.extend_from_slice(&c.addr.port().to_be_bytes());
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], SignalError> {
        if self.0.len() < n {
            return Err(SignalError::Truncated);
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], SignalError> {
        let mut a = [0; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, SignalError> {
        Ok(self.array::<1>()?[0])
    }

    fn u64(&mut self) -> Result<u64, SignalError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn candidates(&mut self) -> Result<Vec<Candidate>, SignalError> {
        let count = usize::from(self.u8()?);
        if count > MAX_CANDIDATES {
            return Err(SignalError::TooMany(count));
        }
        let mut out = Vec::with_capacity(count);
        for _ in 0..count {
            let kind_byte = self.u8()?;
            let kind = match kind_byte & 0x7F {
                0 => CandidateKind::Host,
                1 => CandidateKind::ServerReflexive,
                2 => CandidateKind::PeerReflexive,
                _ => return Err(SignalError::BadCandidate),
            };
            let protocol = if kind_byte & 0x80 != 0 {
                Protocol::Tcp
            } else {
                Protocol::Udp
            };
            let ip = match self.u8()? {
                4 => IpAddr::V4(Ipv4Addr::from(self.array::<4>()?)),
                6 => IpAddr::V6(Ipv6Addr::from(self.array::<16>()?)),
                _ => return Err(SignalError::BadCandidate),
            };
            let port = u16::from_be_bytes(self.array()?);
            out.push(Candidate {
                kind,
                protocol,
                addr: SocketAddr::new(ip, port),
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn arb_candidate() -> impl Strategy<Value = Candidate> {
        let addr = prop_oneof![
            (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::from((ip, p))),
            (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::from((ip, p))),
        ];
        let kind = prop_oneof![
            Just(CandidateKind::Host),
            Just(CandidateKind::ServerReflexive),
            Just(CandidateKind::PeerReflexive),
        ];
        let protocol = prop_oneof![Just(Protocol::Udp), Just(Protocol::Tcp)];
        (kind, protocol, addr).prop_map(|(kind, protocol, addr)| Candidate {
            kind,
            protocol,
            addr,
        })
    }

    fn arb_signal() -> impl Strategy<Value = Signal> {
        let candidates = || proptest::collection::vec(arb_candidate(), 0..=MAX_CANDIDATES);
        prop_oneof![
            (
                any::<u64>(),
                any::<[u8; 32]>(),
                proptest::option::of(any::<[u8; 32]>()),
                candidates()
            )
                .prop_map(|(offer_id, x25519_public, tls_fingerprint, candidates)| {
                    Signal::Offer(LinkOffer {
                        offer_id,
                        x25519_public,
                        tls_fingerprint,
                        candidates,
                    })
                }),
            (any::<u64>(), candidates()).prop_map(|(offer_id, candidates)| Signal::Candidates {
                offer_id,
                candidates
            }),
            candidates().prop_map(|candidates| Signal::Direct { candidates }),
        ]
    }

    proptest! {
        #[test]
        fn round_trip(signal in arb_signal()) {
            let mut out = Vec::new();
            signal.emit(&mut out).unwrap();
            prop_assert!(out.len() <= 1373, "fits one tox lossless packet: {}", out.len());
            prop_assert_eq!(Signal::parse(&out), Ok(signal));
            // Every strict prefix is refused, never misread.
            for cut in 0..out.len() {
                prop_assert!(Signal::parse(&out[..cut]).is_err());
            }
        }

        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Signal::parse(&bytes);
        }
    }

    #[test]
    fn refusals() {
        assert_eq!(Signal::parse(b"X"), Err(SignalError::UnknownTag(b'X')));
        assert_eq!(Signal::parse(b"O\x02"), Err(SignalError::Version(2)));
        // Found by the link_signal fuzzer: unknown flag bits used to be dropped silently.
        let mut offer = b"O\x01".to_vec();
        offer.extend_from_slice(&[0; 8 + 32]);
        offer.push(0xFF);
        assert_eq!(Signal::parse(&offer), Err(SignalError::UnknownFlags(0xFF)));
        let mut out = Vec::new();
        let too_many = Signal::Candidates {
            offer_id: 1,
            candidates: vec![
                Candidate {
                    kind: CandidateKind::Host,
                    protocol: Protocol::Udp,
                    addr: "127.0.0.1:1".parse().unwrap(),
                };
                MAX_CANDIDATES + 1
            ],
        };
        assert_eq!(
            too_many.emit(&mut out),
            Err(SignalError::TooMany(MAX_CANDIDATES + 1))
        );
        let ok = Signal::Candidates {
            offer_id: 1,
            candidates: Vec::new(),
        };
        ok.emit(&mut out).unwrap();
        out.push(0);
        assert_eq!(Signal::parse(&out), Err(SignalError::Trailing));
    }
}
