//! The direct handshake: one round trip on the two peers' long-term Tox keys, with no Tox
//! in between.
//!
//! ```text
//!  initiator I                                               responder R
//!  HELLO  = D1 | 1 | S_I | E_I | seal(k1, ts | boot | body)  ──►  k1 from ss, es
//!  WELCOME = D2 | 1 | id(E_I) | E_R | seal(k2, boot | body)  ◄──  k2, link keys from ss, es, se, ee
//! ```
//!
//! `S` are the long-term X25519 keys of the Tox identities (each side knows the other's public
//! half: it is the peer's Tox ID), `E` fresh ephemerals. `ss = DH(S_I, S_R)` and
//! `es = DH(E_I, S_R)` authenticate the HELLO to R (only I or R can compute `ss`) and hide
//! its body; the WELCOME adds `se = DH(S_I, E_R)` and `ee = DH(E_I, E_R)`, so only I can open
//! it and the link keys have forward secrecy (as in Noise KK).
//!
//! Replay: a HELLO carries the initiator's wall-clock time in milliseconds; R accepts from a
//! peer only times later than the last it accepted and within [`MAX_SKEW_MS`] of its own
//! clock (WireGuard's TAI64N rule). A replayed WELCOME opens for no one: its keys need `E_I`'s
//! secret, which lives only as long as the pending hello. `boot` is a random number drawn at
//! each start, so each side sees when the other restarted.
//!
//! Sans-IO: the caller passes randomness and the clock in, and sends the bytes.

use std::collections::HashMap;

use chacha20poly1305::aead::{Aead as _, Payload};
use chacha20poly1305::{ChaCha20Poly1305, KeyInit as _};
use hkdf::Hkdf;
use sha2::{Digest as _, Sha256};
use x25519_dalek::{PublicKey as XPublic, StaticSecret};

use crate::id::PublicKey;
use crate::link::LinkKeys;

/// First byte of a HELLO.
pub const HELLO: u8 = 0xD1;
/// First byte of a WELCOME.
pub const WELCOME: u8 = 0xD2;
const VERSION: u8 = 1;
const TAG: usize = 16;
/// Bytes before a HELLO's sealed part: type, version, static key, ephemeral key.
const HELLO_HEAD: usize = 2 + 32 + 32;
/// Bytes before a WELCOME's sealed part: type, version, hello id, ephemeral key.
const WELCOME_HEAD: usize = 2 + 8 + 32;
/// The largest body either message carries (a control message fits many times over).
pub const MAX_BODY: usize = 1024;
/// How far a HELLO's time may be from the responder's clock.
pub const MAX_SKEW_MS: u64 = 120_000;

/// Why a handshake message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// Not a HELLO or WELCOME of this version, or cut short.
    #[error("not a direct handshake message")]
    Malformed,
    /// The tag does not authenticate it under the keys it names.
    #[error("direct handshake failed authentication")]
    Forged,
    /// A key that would make the exchange predictable (low order, or our own).
    #[error("direct handshake with a degenerate key")]
    BadKey,
    /// A time already seen from this peer, or too far from ours.
    #[error("replayed or stale hello")]
    Replay,
    /// A body over [`MAX_BODY`].
    #[error("direct handshake body too long")]
    TooLong,
}

/// This node's long-term key pair (its Tox identity's X25519 keys).
pub struct Identity {
    secret: StaticSecret,
    public: PublicKey,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// The key pair of a Tox secret key.
    pub fn from_secret(secret: [u8; 32]) -> Self {
        let secret = StaticSecret::from(secret);
        let public = PublicKey(XPublic::from(&secret).to_bytes());
        Self { secret, public }
    }

    /// Our public key (the one in our Tox ID).
    pub fn public(&self) -> PublicKey {
        self.public
    }

    fn dh(&self, peer: &[u8; 32]) -> Result<[u8; 32], HandshakeError> {
        dh(&self.secret, peer)
    }
}

fn dh(secret: &StaticSecret, peer: &[u8; 32]) -> Result<[u8; 32], HandshakeError> {
    let shared = secret.diffie_hellman(&XPublic::from(*peer));
    if !shared.was_contributory() {
        return Err(HandshakeError::BadKey);
    }
    Ok(shared.to_bytes())
}

/// What a HELLO carries, once opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloBody {
    /// Who sent it (authenticated).
    pub peer: PublicKey,
    /// The sender's clock, milliseconds since the Unix epoch.
    pub timestamp: u64,
    /// The sender's boot number.
    pub boot: u64,
    /// The application's message.
    pub body: Vec<u8>,
}

/// What a WELCOME carries, once opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WelcomeBody {
    /// The responder's boot number.
    pub boot: u64,
    /// The application's message.
    pub body: Vec<u8>,
}

/// A HELLO we sent, waiting for its WELCOME.
pub struct PendingHello {
    peer: PublicKey,
    ephemeral: StaticSecret,
    ephemeral_public: [u8; 32],
    ss: [u8; 32],
    es: [u8; 32],
    hello_hash: [u8; 32],
}

impl std::fmt::Debug for PendingHello {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingHello")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

/// Writes a HELLO to `peer` into `out` and returns what opens its answer.
///
/// `ephemeral` is 32 bytes from a CSPRNG; `timestamp` the wall clock in milliseconds, later
/// than any earlier HELLO of ours to this peer (the responder refuses repeats).
pub fn hello(
    identity: &Identity,
    peer: PublicKey,
    ephemeral: [u8; 32],
    timestamp: u64,
    boot: u64,
    body: &[u8],
    out: &mut Vec<u8>,
) -> Result<PendingHello, HandshakeError> {
    if body.len() > MAX_BODY {
        return Err(HandshakeError::TooLong);
    }
    if peer == identity.public {
        return Err(HandshakeError::BadKey);
    }
    let ephemeral = StaticSecret::from(ephemeral);
    let ephemeral_public = XPublic::from(&ephemeral).to_bytes();
    let ss = identity.dh(&peer.0)?;
    let es = dh(&ephemeral, &peer.0)?;
    let k1 = hello_key(&ss, &es, &identity.public, &peer, &ephemeral_public);
    out.clear();
    out.extend_from_slice(&[HELLO, VERSION]);
    out.extend_from_slice(&identity.public.0);
    out.extend_from_slice(&ephemeral_public);
    let mut plain = Vec::with_capacity(16 + body.len());
    plain.extend_from_slice(&timestamp.to_be_bytes());
    plain.extend_from_slice(&boot.to_be_bytes());
    plain.extend_from_slice(body);
    let sealed = seal(&k1, &out[..HELLO_HEAD], &plain);
    out.extend_from_slice(&sealed);
    Ok(PendingHello {
        peer,
        ephemeral,
        ephemeral_public,
        ss,
        es,
        hello_hash: Sha256::digest(&out[..]).into(),
    })
}

impl PendingHello {
    /// The peer this HELLO went to.
    pub fn peer(&self) -> PublicKey {
        self.peer
    }

    /// Whether `packet` is a WELCOME that names this HELLO (cheap: no crypto).
    pub fn matches(&self, packet: &[u8]) -> bool {
        packet.len() >= WELCOME_HEAD
            && packet[0] == WELCOME
            && packet[1] == VERSION
            && packet[2..10] == self.ephemeral_public[..8]
    }

    /// Opens the peer's WELCOME: its message and the link's keys (we are the controlling
    /// side of the link).
    pub fn open_welcome(
        &self,
        identity: &Identity,
        packet: &[u8],
    ) -> Result<(WelcomeBody, LinkKeys), HandshakeError> {
        if !self.matches(packet) || packet.len() < WELCOME_HEAD + TAG {
            return Err(HandshakeError::Malformed);
        }
        let responder_ephemeral: [u8; 32] = packet[10..42]
            .try_into()
            .map_err(|_| HandshakeError::Malformed)?;
        let se = identity.dh(&responder_ephemeral)?;
        let ee = dh(&self.ephemeral, &responder_ephemeral)?;
        let keys = Keys::derive(
            [&self.ss, &self.es, &se, &ee],
            &identity.public,
            &self.peer,
            &self.ephemeral_public,
            &responder_ephemeral,
        );
        let aad = welcome_aad(&packet[..WELCOME_HEAD], &self.hello_hash);
        let plain = open(&keys.welcome, &aad, &packet[WELCOME_HEAD..])?;
        let boot = u64::from_be_bytes(
            plain
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .ok_or(HandshakeError::Malformed)?,
        );
        let body = WelcomeBody {
            boot,
            body: plain[8..].to_vec(),
        };
        Ok((body, LinkKeys::from_parts(keys.i2r, keys.r2i, true)))
    }
}

/// The responder's side: opens HELLOs and remembers, per peer, the latest time accepted.
#[derive(Debug, Default)]
pub struct Responder {
    last: HashMap<PublicKey, u64>,
}

/// A HELLO that passed authentication and the replay check: answer it with
/// [`ReceivedHello::welcome`], or drop it.
pub struct ReceivedHello {
    /// What it said.
    pub hello: HelloBody,
    ss: [u8; 32],
    es: [u8; 32],
    initiator_ephemeral: [u8; 32],
    hello_hash: [u8; 32],
}

impl std::fmt::Debug for ReceivedHello {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReceivedHello")
            .field("hello", &self.hello)
            .finish_non_exhaustive()
    }
}

/// The peer a HELLO claims to come from, before any crypto: to decide whether to spend a
/// Diffie-Hellman on it at all.
pub fn hello_sender(packet: &[u8]) -> Option<PublicKey> {
    if packet.len() < HELLO_HEAD + TAG + 16 || packet[0] != HELLO || packet[1] != VERSION {
        return None;
    }
    packet[2..34].try_into().ok().map(PublicKey)
}

impl Responder {
    /// Opens a HELLO received at wall-clock time `now_ms`.
    pub fn open_hello(
        &mut self,
        identity: &Identity,
        packet: &[u8],
        now_ms: u64,
    ) -> Result<ReceivedHello, HandshakeError> {
        let peer = hello_sender(packet).ok_or(HandshakeError::Malformed)?;
        if peer == identity.public {
            return Err(HandshakeError::BadKey);
        }
        let initiator_ephemeral: [u8; 32] = packet[34..66]
            .try_into()
            .map_err(|_| HandshakeError::Malformed)?;
        let ss = identity.dh(&peer.0)?;
        let es = identity.dh(&initiator_ephemeral)?;
        let k1 = hello_key(&ss, &es, &peer, &identity.public, &initiator_ephemeral);
        let plain = open(&k1, &packet[..HELLO_HEAD], &packet[HELLO_HEAD..])?;
        let word = |at: usize| {
            plain
                .get(at..at + 8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes)
                .ok_or(HandshakeError::Malformed)
        };
        let (timestamp, boot) = (word(0)?, word(8)?);
        if timestamp.abs_diff(now_ms) > MAX_SKEW_MS
            || self.last.get(&peer).is_some_and(|&last| timestamp <= last)
        {
            return Err(HandshakeError::Replay);
        }
        self.last.insert(peer, timestamp);
        Ok(ReceivedHello {
            hello: HelloBody {
                peer,
                timestamp,
                boot,
                body: plain[16..].to_vec(),
            },
            ss,
            es,
            initiator_ephemeral,
            hello_hash: Sha256::digest(packet).into(),
        })
    }
}

impl ReceivedHello {
    /// Writes the WELCOME into `out` and returns the link's keys (we are not controlling).
    pub fn welcome(
        &self,
        identity: &Identity,
        ephemeral: [u8; 32],
        boot: u64,
        body: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<LinkKeys, HandshakeError> {
        if body.len() > MAX_BODY {
            return Err(HandshakeError::TooLong);
        }
        let ephemeral = StaticSecret::from(ephemeral);
        let ephemeral_public = XPublic::from(&ephemeral).to_bytes();
        let se = dh(&ephemeral, &self.hello.peer.0)?;
        let ee = dh(&ephemeral, &self.initiator_ephemeral)?;
        let keys = Keys::derive(
            [&self.ss, &self.es, &se, &ee],
            &self.hello.peer,
            &identity.public,
            &self.initiator_ephemeral,
            &ephemeral_public,
        );
        out.clear();
        out.extend_from_slice(&[WELCOME, VERSION]);
        out.extend_from_slice(&self.initiator_ephemeral[..8]);
        out.extend_from_slice(&ephemeral_public);
        let mut plain = Vec::with_capacity(8 + body.len());
        plain.extend_from_slice(&boot.to_be_bytes());
        plain.extend_from_slice(body);
        let aad = welcome_aad(&out[..WELCOME_HEAD], &self.hello_hash);
        let sealed = seal(&keys.welcome, &aad, &plain);
        out.extend_from_slice(&sealed);
        Ok(LinkKeys::from_parts(keys.r2i, keys.i2r, false))
    }
}

const SALT: &[u8] = b"proxy direct handshake v1";

fn hello_key(
    ss: &[u8; 32],
    es: &[u8; 32],
    initiator: &PublicKey,
    responder: &PublicKey,
    initiator_ephemeral: &[u8; 32],
) -> [u8; 32] {
    let mut ikm = [0u8; 64];
    ikm[..32].copy_from_slice(ss);
    ikm[32..].copy_from_slice(es);
    let mut key = [0u8; 32];
    expand(
        &ikm,
        &[b"hello", &initiator.0, &responder.0, initiator_ephemeral],
        &mut key,
    );
    key
}

struct Keys {
    welcome: [u8; 32],
    i2r: [u8; 32],
    r2i: [u8; 32],
}

impl Keys {
    fn derive(
        dhs: [&[u8; 32]; 4],
        initiator: &PublicKey,
        responder: &PublicKey,
        initiator_ephemeral: &[u8; 32],
        responder_ephemeral: &[u8; 32],
    ) -> Self {
        let mut ikm = [0u8; 128];
        for (i, d) in dhs.iter().enumerate() {
            ikm[i * 32..(i + 1) * 32].copy_from_slice(*d);
        }
        let mut okm = [0u8; 96];
        expand(
            &ikm,
            &[
                b"welcome",
                &initiator.0,
                &responder.0,
                initiator_ephemeral,
                responder_ephemeral,
            ],
            &mut okm,
        );
        let part = |i: usize| -> [u8; 32] {
            let mut k = [0u8; 32];
            k.copy_from_slice(&okm[i * 32..(i + 1) * 32]);
            k
        };
        Self {
            welcome: part(0),
            i2r: part(1),
            r2i: part(2),
        }
    }
}

fn expand(ikm: &[u8], info: &[&[u8]], out: &mut [u8]) {
    let info: Vec<u8> = info.concat();
    Hkdf::<Sha256>::new(Some(SALT), ikm)
        .expand(&info, out)
        // At most 96 bytes, far below HKDF-SHA256's limit of 255 × 32.
        .unwrap_or_else(|_| unreachable!("a valid hkdf output length"));
}

fn welcome_aad(head: &[u8], hello_hash: &[u8; 32]) -> Vec<u8> {
    [head, hello_hash].concat()
}

/// Each key seals exactly one message (the ephemerals are fresh), so a zero nonce is safe.
fn seal(key: &[u8; 32], aad: &[u8], plain: &[u8]) -> Vec<u8> {
    ChaCha20Poly1305::new(key.into())
        .encrypt(&[0u8; 12].into(), Payload { msg: plain, aad })
        .unwrap_or_else(|_| unreachable!("chacha20poly1305 seals any message under 256 GiB"))
}

fn open(key: &[u8; 32], aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, HandshakeError> {
    if sealed.len() < TAG {
        return Err(HandshakeError::Malformed);
    }
    ChaCha20Poly1305::new(key.into())
        .decrypt(&[0u8; 12].into(), Payload { msg: sealed, aad })
        .map_err(|_| HandshakeError::Forged)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Identity, Identity) {
        (
            Identity::from_secret([1; 32]),
            Identity::from_secret([2; 32]),
        )
    }

    const T: u64 = 1_800_000_000_000;

    /// One round trip: both sides end with matching keys and each other's messages.
    fn exchange(i: &Identity, r: &Identity, resp: &mut Responder, ts: u64) -> (LinkKeys, LinkKeys) {
        let mut buf = Vec::new();
        let pending = hello(i, r.public(), [7; 32], ts, 11, b"open", &mut buf).unwrap();
        let got = resp.open_hello(r, &buf, ts + 5).unwrap();
        assert_eq!(got.hello.peer, i.public());
        assert_eq!((got.hello.timestamp, got.hello.boot), (ts, 11));
        assert_eq!(got.hello.body, b"open");
        let mut answer = Vec::new();
        let r_keys = got.welcome(r, [9; 32], 22, b"accept", &mut answer).unwrap();
        assert!(pending.matches(&answer));
        let (welcome, i_keys) = pending.open_welcome(i, &answer).unwrap();
        assert_eq!(welcome.boot, 22);
        assert_eq!(welcome.body, b"accept");
        (i_keys, r_keys)
    }

    #[test]
    fn a_round_trip_agrees_on_link_keys_that_carry_packets_both_ways() {
        let (i, r) = pair();
        let (ik, rk) = exchange(&i, &r, &mut Responder::default(), T);
        assert!(ik.controlling() && !rk.controlling());
        let ((mut i_seal, mut i_open), (mut r_seal, mut r_open)) = (ik.split(), rk.split());
        let mut p = Vec::new();
        i_seal.seal(b"to r", &mut p).unwrap();
        assert_eq!(r_open.open(&mut p).unwrap(), b"to r");
        p.clear();
        r_seal.seal(b"to i", &mut p).unwrap();
        assert_eq!(i_open.open(&mut p).unwrap(), b"to i");
    }

    #[test]
    fn a_replayed_or_stale_hello_is_refused() {
        let (i, r) = pair();
        let mut resp = Responder::default();
        let mut buf = Vec::new();
        hello(&i, r.public(), [7; 32], T, 1, b"", &mut buf).unwrap();
        assert!(resp.open_hello(&r, &buf, T).is_ok());
        assert_eq!(
            resp.open_hello(&r, &buf, T).unwrap_err(),
            HandshakeError::Replay
        );
        // An older time, even with a fresh ephemeral, is a replay as well.
        hello(&i, r.public(), [8; 32], T - 1, 1, b"", &mut buf).unwrap();
        assert_eq!(
            resp.open_hello(&r, &buf, T).unwrap_err(),
            HandshakeError::Replay
        );
        // A clock far from ours: refused even by a responder that never saw this peer.
        hello(
            &i,
            r.public(),
            [8; 32],
            T + MAX_SKEW_MS + 1,
            1,
            b"",
            &mut buf,
        )
        .unwrap();
        assert_eq!(
            Responder::default().open_hello(&r, &buf, T).unwrap_err(),
            HandshakeError::Replay
        );
        // A later one is fine.
        hello(&i, r.public(), [8; 32], T + 1, 1, b"", &mut buf).unwrap();
        assert!(resp.open_hello(&r, &buf, T).is_ok());
    }

    #[test]
    fn only_the_named_responder_opens_a_hello_and_only_its_initiator_the_welcome() {
        let (i, r) = pair();
        let eve = Identity::from_secret([3; 32]);
        let mut buf = Vec::new();
        let pending = hello(&i, r.public(), [7; 32], T, 1, b"x", &mut buf).unwrap();
        assert_eq!(
            Responder::default().open_hello(&eve, &buf, T).unwrap_err(),
            HandshakeError::Forged
        );
        // Eve claims to be I: she cannot compute ss with I's public key alone.
        let mut forged = Vec::new();
        hello(&eve, r.public(), [7; 32], T, 1, b"x", &mut forged).unwrap();
        forged[2..34].copy_from_slice(&i.public().0);
        assert_eq!(
            Responder::default().open_hello(&r, &forged, T).unwrap_err(),
            HandshakeError::Forged
        );
        // A WELCOME from Eve's own exchange does not open with I's pending state.
        let got = Responder::default().open_hello(&r, &buf, T).unwrap();
        let mut answer = Vec::new();
        got.welcome(&r, [9; 32], 1, b"y", &mut answer).unwrap();
        let other = hello(&i, r.public(), [6; 32], T + 1, 1, b"x", &mut buf).unwrap();
        assert!(!other.matches(&answer));
        assert!(other.open_welcome(&i, &answer).is_err());
        // Every bit of the WELCOME matters.
        for at in 10..answer.len() {
            let mut bad = answer.clone();
            bad[at] ^= 1;
            assert!(pending.open_welcome(&i, &bad).is_err(), "byte {at}");
        }
        assert!(pending.open_welcome(&i, &answer).is_ok());
    }

    #[test]
    fn every_cut_or_flipped_hello_is_an_error_never_a_panic() {
        let (i, r) = pair();
        let mut buf = Vec::new();
        hello(&i, r.public(), [7; 32], T, 1, b"body", &mut buf).unwrap();
        for len in 0..buf.len() {
            assert!(Responder::default().open_hello(&r, &buf[..len], T).is_err());
        }
        for at in 0..buf.len() {
            let mut bad = buf.clone();
            bad[at] ^= 0x40;
            assert!(
                Responder::default().open_hello(&r, &bad, T).is_err(),
                "byte {at}"
            );
        }
        // A low-order ephemeral is refused before any use.
        let mut low = buf.clone();
        low[34..66].copy_from_slice(&[0; 32]);
        assert_eq!(
            Responder::default().open_hello(&r, &low, T).unwrap_err(),
            HandshakeError::BadKey
        );
    }
}
