//! Pairing with one ticket (issue "Pairing"), sans-IO: the ticket an inviter prints and the
//! joiner pastes, and the proof the joiner's friend request carries.
//!
//! ```text
//! ticket   "proxy-ticket-" base32(version 1 | inviter's Tox ID (38) | secret (16)
//!                               | expires u64 BE (unix seconds) | name len u8 | name
//!                               | endpoints u8 | each: 4 or 6, address (4 | 16), port u16 BE
//!                               | checksum: SHA-256 of all before, first 4 bytes)
//! request  "proxy-join-" base32(version 1 | invitation id (8) | proof (32) | nospam (4)
//!                               | name len u8 | name)
//!          invitation id = SHA-256("proxy invitation" ‖ secret)[..8]
//!          proof = HMAC-SHA256(secret, "proxy join v1" ‖ joiner's key ‖ inviter's key)
//! ```
//!
//! The secret (128 bits) is in the ticket only: the request, which travels through the Tox
//! network as a friend request's message, carries the invitation's id (to find it, revealing
//! nothing of the secret) and a proof bound to both keys, so a request seen on the way cannot
//! be replayed from another key, and the inviter checks it in constant time. Base32
//! (RFC 4648, lowercase, no padding) keeps the ticket one word that survives a chat window, a
//! terminal's double-click and a phone's keyboard; the checksum turns a mangled paste into a
//! clear error instead of a wrong peer.

use std::net::{IpAddr, SocketAddr};

use hkdf::Hkdf;
use sha2::{Digest as _, Sha256};
use thiserror::Error;

use crate::id::{PublicKey, ToxId};
use crate::overlay::PeerName;

/// What a ticket starts with.
pub const TICKET_PREFIX: &str = "proxy-ticket-";
/// What a join request (a friend request's message) starts with.
pub const REQUEST_PREFIX: &str = "proxy-join-";
/// Bytes of secret in a ticket.
pub const SECRET_LEN: usize = 16;
/// Endpoints a ticket carries at most.
pub const MAX_ENDPOINTS: usize = 4;
const VERSION: u8 = 1;
const CHECKSUM_LEN: usize = 4;

/// An invitation's secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub [u8; SECRET_LEN]);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never in logs.
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// A fresh secret from the system's random source.
    #[cfg(feature = "tokio")]
    pub fn random() -> Self {
        Self(rand::random::<[u8; SECRET_LEN]>())
    }

    /// The invitation's id: how the inviter finds the invitation a request is for, without
    /// the request revealing the secret.
    pub fn invitation_id(&self) -> [u8; 8] {
        let hash = Sha256::new()
            .chain_update(b"proxy invitation")
            .chain_update(self.0)
            .finalize();
        let mut id = [0u8; 8];
        id.copy_from_slice(&hash[..8]);
        id
    }

    /// The proof that the holder of a ticket with this secret, with key `joiner`, asks to
    /// pair with `inviter`.
    pub fn proof(&self, joiner: &PublicKey, inviter: &PublicKey) -> [u8; 32] {
        // HKDF's extract step is HMAC-SHA256(salt, input): the secret keys it.
        let mut input = Vec::with_capacity(13 + 64);
        input.extend_from_slice(b"proxy join v1");
        input.extend_from_slice(&joiner.0);
        input.extend_from_slice(&inviter.0);
        let (prk, _) = Hkdf::<Sha256>::extract(Some(&self.0), &input);
        prk.into()
    }

    /// Whether `proof` is this secret's for `joiner` and `inviter`, compared in constant
    /// time.
    pub fn verify(&self, proof: &[u8; 32], joiner: &PublicKey, inviter: &PublicKey) -> bool {
        let expected = self.proof(joiner, inviter);
        let diff = expected
            .iter()
            .zip(proof)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        std::hint::black_box(diff) == 0
    }
}

/// What an inviter hands the joiner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    /// The inviter's Tox ID (what the joiner befriends).
    pub inviter: ToxId,
    /// The invitation's secret.
    pub secret: Secret,
    /// When the invitation expires, in seconds since the Unix epoch.
    pub expires: u64,
    /// The name the inviter suggests the joiner call it.
    pub name: Option<PeerName>,
    /// Where the inviter's direct socket answered lately (at most [`MAX_ENDPOINTS`]), so the
    /// first contact need not wait for Tox.
    pub endpoints: Vec<SocketAddr>,
}

/// Why a ticket or request was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum PairingError {
    /// It does not start as a ticket (or request) does.
    #[error("not a proxy ticket (it starts with \"{TICKET_PREFIX}\")")]
    Prefix,
    /// A character base32 does not have, or a length it cannot have.
    #[error("the ticket is damaged (not base32): copy it whole")]
    Encoding,
    /// The checksum does not match.
    #[error("the ticket is damaged (checksum): copy it whole")]
    Checksum,
    /// A version this node does not read.
    #[error("ticket version {0} (this proxy reads version {VERSION}): update proxy")]
    Version(u8),
    /// Too short, too long, or a field out of range.
    #[error("the ticket is malformed: {0}")]
    Malformed(&'static str),
}

impl Ticket {
    /// The ticket as one line.
    pub fn encode(&self) -> String {
        let mut b = vec![VERSION];
        b.extend_from_slice(self.inviter.as_bytes());
        b.extend_from_slice(&self.secret.0);
        b.extend_from_slice(&self.expires.to_be_bytes());
        let name = self.name.as_ref().map_or("", PeerName::as_str);
        // Names are DNS labels: at most 63 bytes.
        b.push(name.len() as u8);
        b.extend_from_slice(name.as_bytes());
        let endpoints = &self.endpoints[..self.endpoints.len().min(MAX_ENDPOINTS)];
        b.push(endpoints.len() as u8);
        for e in endpoints {
            match e.ip() {
                IpAddr::V4(a) => {
                    b.push(4);
                    b.extend_from_slice(&a.octets());
                }
                IpAddr::V6(a) => {
                    b.push(6);
                    b.extend_from_slice(&a.octets());
                }
            }
            b.extend_from_slice(&e.port().to_be_bytes());
        }
        let sum = Sha256::digest(&b);
        b.extend_from_slice(&sum[..CHECKSUM_LEN]);
        format!("{TICKET_PREFIX}{}", base32_encode(&b))
    }

    /// Reads a ticket (surrounding blanks ignored, any case).
    pub fn parse(text: &str) -> Result<Self, PairingError> {
        let text = text.trim();
        let body = strip_prefix_ci(text, TICKET_PREFIX).ok_or(PairingError::Prefix)?;
        let b = base32_decode(body).ok_or(PairingError::Encoding)?;
        if b.len() < CHECKSUM_LEN + 1 {
            return Err(PairingError::Malformed("too short"));
        }
        let (data, sum) = b.split_at(b.len() - CHECKSUM_LEN);
        if Sha256::digest(data)[..CHECKSUM_LEN] != *sum {
            return Err(PairingError::Checksum);
        }
        let mut r = Reader(data);
        let version = r.u8()?;
        if version != VERSION {
            return Err(PairingError::Version(version));
        }
        let inviter = ToxId::from_bytes(r.take(38)?.try_into().map_err(|_| short())?)
            .map_err(|_| PairingError::Malformed("the inviter's Tox ID"))?;
        let secret = Secret(r.take(SECRET_LEN)?.try_into().map_err(|_| short())?);
        let expires = u64::from_be_bytes(r.take(8)?.try_into().map_err(|_| short())?);
        let name_len = usize::from(r.u8()?);
        let name = match name_len {
            0 => None,
            n => Some(
                std::str::from_utf8(r.take(n)?)
                    .ok()
                    .and_then(|s| s.parse::<PeerName>().ok())
                    .ok_or(PairingError::Malformed("the inviter's name"))?,
            ),
        };
        let count = usize::from(r.u8()?);
        if count > MAX_ENDPOINTS {
            return Err(PairingError::Malformed("too many endpoints"));
        }
        let mut endpoints = Vec::with_capacity(count);
        for _ in 0..count {
            let ip = match r.u8()? {
                4 => IpAddr::from(<[u8; 4]>::try_from(r.take(4)?).map_err(|_| short())?),
                6 => IpAddr::from(<[u8; 16]>::try_from(r.take(16)?).map_err(|_| short())?),
                _ => return Err(PairingError::Malformed("an endpoint's address family")),
            };
            let port = u16::from_be_bytes(r.take(2)?.try_into().map_err(|_| short())?);
            endpoints.push(SocketAddr::new(ip, port));
        }
        if !r.0.is_empty() {
            return Err(PairingError::Malformed("bytes after the endpoints"));
        }
        Ok(Self {
            inviter,
            secret,
            expires,
            name,
            endpoints,
        })
    }
}

/// What the joiner sends the inviter, as its friend request's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinRequest {
    /// Which invitation ([`Secret::invitation_id`]).
    pub invitation: [u8; 8],
    /// [`Secret::proof`] for the joiner's and the inviter's keys.
    pub proof: [u8; 32],
    /// The joiner's nospam: with the key the request came from, its whole Tox ID.
    pub nospam: [u8; 4],
    /// The name the joiner suggests the inviter call it.
    pub name: Option<PeerName>,
}

impl JoinRequest {
    /// The request for `ticket` from the node whose Tox ID is `joiner`.
    pub fn new(ticket: &Ticket, joiner: &ToxId, name: Option<PeerName>) -> Self {
        Self {
            invitation: ticket.secret.invitation_id(),
            proof: ticket
                .secret
                .proof(&joiner.public_key(), &ticket.inviter.public_key()),
            nospam: joiner.nospam(),
            name,
        }
    }

    /// The message text (at most about 110 bytes: well within a friend request's 1,016).
    pub fn encode(&self) -> String {
        let mut b = vec![VERSION];
        b.extend_from_slice(&self.invitation);
        b.extend_from_slice(&self.proof);
        b.extend_from_slice(&self.nospam);
        let name = self.name.as_ref().map_or("", PeerName::as_str);
        b.push(name.len() as u8);
        b.extend_from_slice(name.as_bytes());
        format!("{REQUEST_PREFIX}{}", base32_encode(&b))
    }

    /// Reads a message as bytes (a friend request's, a direct hello's): `None` for anything
    /// that is not a join request, UTF-8 included.
    pub fn from_message(message: &[u8]) -> Option<Self> {
        Self::parse(std::str::from_utf8(message).ok()?)
    }

    /// Reads a friend request's message; `None` for anything that is not a join request.
    pub fn parse(text: &str) -> Option<Self> {
        let body = strip_prefix_ci(text.trim(), REQUEST_PREFIX)?;
        let b = base32_decode(body)?;
        let mut r = Reader(&b);
        if r.u8().ok()? != VERSION {
            return None;
        }
        let invitation = r.take(8).ok()?.try_into().ok()?;
        let proof = r.take(32).ok()?.try_into().ok()?;
        let nospam = r.take(4).ok()?.try_into().ok()?;
        let name = match usize::from(r.u8().ok()?) {
            0 => None,
            n => Some(std::str::from_utf8(r.take(n).ok()?).ok()?.parse().ok()?),
        };
        r.0.is_empty().then_some(Self {
            invitation,
            proof,
            nospam,
            name,
        })
    }
}

fn short() -> PairingError {
    PairingError::Malformed("too short")
}

fn strip_prefix_ci<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &text[prefix.len()..])
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], PairingError> {
        if self.0.len() < n {
            return Err(short());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, PairingError> {
        Ok(self.take(1)?[0])
    }
}

const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// RFC 4648 base32, lowercase, no padding.
fn base32_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(5) * 8);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &byte in data {
        acc = (acc << 8) | u32::from(byte);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(ALPHABET[((acc >> bits) & 31) as usize]));
        }
    }
    if bits > 0 {
        out.push(char::from(ALPHABET[((acc << (5 - bits)) & 31) as usize]));
    }
    out
}

/// The inverse of [`base32_encode`] (either case); `None` for a character outside the
/// alphabet, a length no encoding has, or non-zero padding bits.
fn base32_decode(text: &str) -> Option<Vec<u8>> {
    // Lengths mod 8 that an encoding of whole bytes can leave: 0, 2, 4, 5, 7.
    if matches!(text.len() % 8, 1 | 3 | 6) {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() * 5 / 8);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text.bytes() {
        let v = match c.to_ascii_lowercase() {
            c @ b'a'..=b'z' => c - b'a',
            c @ b'2'..=b'7' => c - b'2' + 26,
            _ => return None,
        };
        acc = (acc << 5) | u32::from(v);
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
        acc &= (1 << bits) - 1;
    }
    // What is left over must be padding, all zero.
    (acc == 0).then_some(out)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn ticket() -> Ticket {
        Ticket {
            inviter: ToxId::new(PublicKey([7; 32]), [1, 2, 3, 4]),
            secret: Secret([9; SECRET_LEN]),
            expires: 1_800_000_000,
            name: Some("nas".parse().unwrap()),
            endpoints: vec![
                "203.0.113.7:40123".parse().unwrap(),
                "[2001:db8::7]:40123".parse().unwrap(),
            ],
        }
    }

    #[test]
    fn a_ticket_is_one_word_and_reads_back() {
        let t = ticket();
        let text = t.encode();
        assert!(text.starts_with(TICKET_PREFIX));
        assert!(text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
        assert_eq!(Ticket::parse(&text), Ok(t.clone()));
        assert_eq!(
            Ticket::parse(&format!("  {}\n", text.to_uppercase())),
            Ok(t)
        );
    }

    #[test]
    fn damaged_tickets_say_so() {
        let text = ticket().encode();
        assert_eq!(Ticket::parse("hello"), Err(PairingError::Prefix));
        assert_eq!(
            Ticket::parse(&format!("{TICKET_PREFIX}!!")),
            Err(PairingError::Encoding)
        );
        // One character changed: the checksum catches it (or the encoding does).
        let at = text.len() - 10;
        let mut changed = text.clone().into_bytes();
        changed[at] = if changed[at] == b'a' { b'b' } else { b'a' };
        let changed = String::from_utf8(changed).unwrap();
        assert!(matches!(
            Ticket::parse(&changed),
            Err(PairingError::Checksum | PairingError::Encoding)
        ));
        // Cut short.
        assert!(Ticket::parse(&text[..text.len() - 8]).is_err());
    }

    #[test]
    fn the_proof_binds_both_keys_and_the_secret() {
        let t = ticket();
        let (joiner_id, other) = (
            ToxId::new(PublicKey([1; 32]), [5, 6, 7, 8]),
            PublicKey([2; 32]),
        );
        let joiner = joiner_id.public_key();
        let inviter = t.inviter.public_key();
        let req = JoinRequest::new(&t, &joiner_id, Some("laptop".parse().unwrap()));
        let back = JoinRequest::parse(&req.encode()).unwrap();
        assert_eq!(back, req);
        assert_eq!(back.invitation, t.secret.invitation_id());
        assert_eq!(ToxId::new(joiner, back.nospam), joiner_id, "the whole ID");
        assert!(t.secret.verify(&back.proof, &joiner, &inviter));
        assert!(
            !t.secret.verify(&back.proof, &other, &inviter),
            "replayed from another key"
        );
        assert!(
            !t.secret.verify(&back.proof, &joiner, &other),
            "for another inviter"
        );
        assert!(!Secret([8; SECRET_LEN]).verify(&back.proof, &joiner, &inviter));
        // The request reveals nothing of the secret's bytes.
        assert!(!req.encode().contains(&base32_encode(&t.secret.0)));
        assert!(req.encode().len() < 200);
        assert_eq!(JoinRequest::parse("proxy session"), None);
    }

    proptest! {
        #[test]
        fn base32_round_trips(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            prop_assert_eq!(base32_decode(&base32_encode(&data)), Some(data));
        }

        #[test]
        fn any_text_is_a_ticket_or_an_error(text in "\\PC{0,200}") {
            let _ = Ticket::parse(&text);
            let _ = JoinRequest::parse(&text);
        }

        #[test]
        fn any_ticket_reads_back(
            key in any::<[u8; 32]>(),
            secret in any::<[u8; SECRET_LEN]>(),
            expires in any::<u64>(),
            ports in proptest::collection::vec(any::<u16>(), 0..=MAX_ENDPOINTS),
        ) {
            let t = Ticket {
                inviter: ToxId::new(PublicKey(key), [0; 4]),
                secret: Secret(secret),
                expires,
                name: None,
                endpoints: ports
                    .iter()
                    .map(|p| SocketAddr::from(([192, 0, 2, 1], *p)))
                    .collect(),
            };
            prop_assert_eq!(Ticket::parse(&t.encode()), Ok(t));
        }
    }
}
