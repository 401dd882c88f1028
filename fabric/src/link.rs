//! Link crypto for punched UDP paths: keys agreed over Tox, one AEAD seal per packet.
//!
//! ```text
//!  Tox lossless (authenticated by the Tox keys)      punched UDP (anyone can inject)
//!  ────────────────────────────────────────────      ─────────────────────────────────
//!  LinkOffer{x25519 public, candidates, …} ──►      0xF0 | counter u64 BE | ChaCha20-Poly1305(
//!  ◄── LinkOffer{x25519 public, …}                                   plaintext) | tag[16]
//!         │                                                 ▲
//!         └─ X25519 → HKDF-SHA256 → one key per direction ──┘
//! ```
//!
//! Each side makes a fresh [`LinkSecret`] per offer and sends its public half inside a
//! [`signal::LinkOffer`] over the Tox channel, which the peers' Tox keys already authenticate.
//! The shared secret goes through HKDF-SHA256 into two keys, one per direction; the side with
//! the lower public key sends with the first. The nonce is the 64-bit packet counter, which
//! only grows: a [`Sealer`] refuses to seal once it would wrap, and because keys are new for
//! every offer, a (key, nonce) pair is never used twice. The [`Opener`] checks a sliding
//! [`ReplayWindow`] of [`REPLAY_WINDOW`] counters, so a replayed or very old packet is dropped.
//!
//! Native builds seal with `ring`'s ChaCha20-Poly1305 (hand-written vector code, about twice
//! the speed of the portable crate on x86-64); builds without the `tokio` feature (wasm) use
//! the portable `chacha20poly1305` crate. Both are the same RFC 8439 AEAD, byte for byte.

pub mod signal;

use hkdf::Hkdf;
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};

/// The first byte of every sealed link packet. STUN messages start with two zero bits, so a
/// socket shared by STUN and the link can tell them apart by this byte alone.
pub const MARKER: u8 = 0xF0;
/// Bytes before the ciphertext: marker and counter.
pub const HEADER_LEN: usize = 9;
/// Bytes of the Poly1305 tag after the ciphertext.
pub const TAG_LEN: usize = 16;
/// Bytes a sealed packet adds to its plaintext.
pub const OVERHEAD: usize = HEADER_LEN + TAG_LEN;
/// How many counters behind the highest one seen the [`ReplayWindow`] still accepts.
pub const REPLAY_WINDOW: u64 = 2048;

/// Why link keys could not be derived.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The peer's public key is a low-order point: the shared secret would be predictable.
    #[error("peer x25519 key is not contributory")]
    NotContributory,
    /// The peer offered our own public key back (a reflection).
    #[error("peer offered our own x25519 key")]
    Reflected,
}

/// Why a packet could not be sealed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// The counter space of this key is spent; make a new offer.
    #[error("link packet counter exhausted")]
    Exhausted,
}

/// Why a received packet was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// Shorter than header and tag, or not starting with [`MARKER`].
    #[error("not a link packet")]
    NotLink,
    /// Already received, or older than the replay window.
    #[error("replayed or stale link packet {0}")]
    Replay(u64),
    /// The tag does not authenticate the packet under our key.
    #[error("link packet failed authentication")]
    Forged,
}

/// One side's ephemeral X25519 secret for one offer. Not `Clone`: it is consumed by
/// [`LinkSecret::derive`], so keys (and thus counters) are never reused across offers.
pub struct LinkSecret {
    secret: StaticSecret,
    public: [u8; 32],
}

impl core::fmt::Debug for LinkSecret {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("LinkSecret")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

impl LinkSecret {
    /// A secret from 32 random bytes the caller draws from a CSPRNG (the core never draws
    /// randomness itself, so it stays deterministic and builds for wasm without `getrandom`).
    pub fn from_random(bytes: [u8; 32]) -> Self {
        let secret = StaticSecret::from(bytes);
        let public = PublicKey::from(&secret).to_bytes();
        Self { secret, public }
    }

    /// The public half, to send to the peer in a [`signal::LinkOffer`].
    pub fn public(&self) -> [u8; 32] {
        self.public
    }

    /// Derives the two directional keys from the peer's public half.
    pub fn derive(self, peer_public: [u8; 32]) -> Result<LinkKeys, KeyError> {
        if peer_public == self.public {
            return Err(KeyError::Reflected);
        }
        let shared = self.secret.diffie_hellman(&PublicKey::from(peer_public));
        if !shared.was_contributory() {
            return Err(KeyError::NotContributory);
        }
        let low_first = self.public < peer_public;
        let (lo, hi) = if low_first {
            (self.public, peer_public)
        } else {
            (peer_public, self.public)
        };
        let mut info = Vec::with_capacity(16 + 64);
        info.extend_from_slice(b"proxy link v1");
        info.extend_from_slice(&lo);
        info.extend_from_slice(&hi);
        let hk = Hkdf::<Sha256>::new(Some(b"proxy punched link"), shared.as_bytes());
        let mut okm = [0u8; 64];
        // 64 bytes is far below HKDF-SHA256's limit of 255 × 32: this cannot fail.
        hk.expand(&info, &mut okm)
            .unwrap_or_else(|_| unreachable!("64 bytes is a valid hkdf output length"));
        let (lo_to_hi, hi_to_lo) = okm.split_at(32);
        let (send, recv) = if low_first {
            (lo_to_hi, hi_to_lo)
        } else {
            (hi_to_lo, lo_to_hi)
        };
        Ok(LinkKeys {
            send: key(send),
            recv: key(recv),
            controlling: low_first,
        })
    }
}

fn key(bytes: &[u8]) -> [u8; 32] {
    let mut k = [0; 32];
    k.copy_from_slice(bytes);
    k
}

/// The two directional keys of a link. Not `Clone`, for the same reason as [`LinkSecret`].
pub struct LinkKeys {
    send: [u8; 32],
    recv: [u8; 32],
    controlling: bool,
}

impl core::fmt::Debug for LinkKeys {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("LinkKeys")
            .field("controlling", &self.controlling)
            .finish_non_exhaustive()
    }
}

#[cfg(fuzzing)]
impl LinkKeys {
    /// Keys from raw bytes, skipping X25519 and HKDF: for fuzzers only, where the key exchange
    /// would dominate every run.
    pub fn from_raw(send: [u8; 32], recv: [u8; 32], controlling: bool) -> Self {
        Self {
            send,
            recv,
            controlling,
        }
    }
}

impl LinkKeys {
    /// Keys agreed by another exchange (the direct handshake); `controlling` must be true on
    /// exactly one side.
    pub(crate) fn from_parts(send: [u8; 32], recv: [u8; 32], controlling: bool) -> Self {
        Self {
            send,
            recv,
            controlling,
        }
    }

    /// Whether our public key was the lower one: the side that nominates the punched pair.
    /// Both sides compute opposite answers from the same two public keys.
    pub fn controlling(&self) -> bool {
        self.controlling
    }

    /// Splits into the sending and receiving halves.
    pub fn split(self) -> (Sealer, Opener) {
        (
            Sealer {
                aead: aead::Aead::new(&self.send),
                next: 0,
            },
            Opener {
                aead: aead::Aead::new(&self.recv),
                window: ReplayWindow::default(),
            },
        )
    }
}

fn nonce(counter: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    n
}

/// ChaCha20-Poly1305 with a detached tag, from `ring` where it is built (see the module docs).
#[cfg(feature = "tokio")]
mod aead {
    use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, Tag, UnboundKey};

    pub(super) struct Aead(LessSafeKey);

    impl Aead {
        pub(super) fn new(key: &[u8; 32]) -> Self {
            // A 32-byte key is exactly what ChaCha20-Poly1305 takes: this cannot fail.
            let key = UnboundKey::new(&CHACHA20_POLY1305, key)
                .unwrap_or_else(|_| unreachable!("32-byte chacha20-poly1305 key"));
            Self(LessSafeKey::new(key))
        }

        pub(super) fn seal(
            &self,
            nonce: [u8; 12],
            aad: &[u8],
            body: &mut [u8],
        ) -> Option<[u8; 16]> {
            let tag = self
                .0
                .seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(aad),
                    body,
                )
                .ok()?;
            tag.as_ref().try_into().ok()
        }

        pub(super) fn open(
            &self,
            nonce: [u8; 12],
            aad: &[u8],
            body: &mut [u8],
            tag: [u8; 16],
        ) -> bool {
            self.0
                .open_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(aad),
                    Tag::from(tag),
                    body,
                    0..,
                )
                .is_ok()
        }
    }
}

/// ChaCha20-Poly1305 with a detached tag, portable (see the module docs).
#[cfg(not(feature = "tokio"))]
mod aead {
    use chacha20poly1305::aead::AeadInPlace;
    use chacha20poly1305::{ChaCha20Poly1305, KeyInit, Tag};

    pub(super) struct Aead(ChaCha20Poly1305);

    impl Aead {
        pub(super) fn new(key: &[u8; 32]) -> Self {
            Self(ChaCha20Poly1305::new(key.into()))
        }

        pub(super) fn seal(
            &self,
            nonce: [u8; 12],
            aad: &[u8],
            body: &mut [u8],
        ) -> Option<[u8; 16]> {
            let tag = self
                .0
                .encrypt_in_place_detached(&nonce.into(), aad, body)
                .ok()?;
            Some(tag.into())
        }

        pub(super) fn open(
            &self,
            nonce: [u8; 12],
            aad: &[u8],
            body: &mut [u8],
            tag: [u8; 16],
        ) -> bool {
            let tag = Tag::from(tag);
            self.0
                .decrypt_in_place_detached(&nonce.into(), aad, body, &tag)
                .is_ok()
        }
    }
}

/// Seals outgoing packets with our sending key and a strictly increasing counter.
pub struct Sealer {
    aead: aead::Aead,
    next: u64,
}

impl core::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Sealer")
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}

impl Sealer {
    /// Appends the sealed form of `plaintext` to `out`.
    pub fn seal(&mut self, plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), SealError> {
        self.seal_parts(&[plaintext], out)
    }

    /// Appends the sealed form of the concatenation of `parts` to `out` (saves the caller a
    /// copy when it prefixes a payload with a type byte).
    pub fn seal_parts(&mut self, parts: &[&[u8]], out: &mut Vec<u8>) -> Result<(), SealError> {
        // The last counter is never used, so `next` never wraps to an old value.
        if self.next == u64::MAX {
            return Err(SealError::Exhausted);
        }
        let counter = self.next;
        self.next += 1;
        let start = out.len();
        out.reserve(parts.iter().map(|p| p.len()).sum::<usize>() + OVERHEAD);
        out.push(MARKER);
        out.extend_from_slice(&counter.to_be_bytes());
        for part in parts {
            out.extend_from_slice(part);
        }
        let (header, body) = out[start..].split_at_mut(HEADER_LEN);
        let tag = self
            .aead
            .seal(nonce(counter), header, body)
            // ChaCha20-Poly1305 only fails for plaintexts beyond 256 GiB.
            .ok_or(SealError::Exhausted)?;
        out.extend_from_slice(&tag);
        Ok(())
    }

    /// The counter the next packet will carry.
    pub fn next_counter(&self) -> u64 {
        self.next
    }

    #[cfg(test)]
    pub(crate) fn set_next_counter(&mut self, next: u64) {
        self.next = next;
    }
}

/// Opens incoming packets with our receiving key, dropping replays.
pub struct Opener {
    aead: aead::Aead,
    window: ReplayWindow,
}

impl core::fmt::Debug for Opener {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Opener")
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

impl Opener {
    /// Authenticates and decrypts `packet` in place; returns the plaintext inside it. The
    /// replay window only moves for packets that authenticate, so forgeries cannot push it.
    pub fn open<'a>(&mut self, packet: &'a mut [u8]) -> Result<&'a mut [u8], OpenError> {
        if packet.len() < OVERHEAD || packet[0] != MARKER {
            return Err(OpenError::NotLink);
        }
        let mut c = [0u8; 8];
        c.copy_from_slice(&packet[1..HEADER_LEN]);
        let counter = u64::from_be_bytes(c);
        if !self.window.check(counter) {
            return Err(OpenError::Replay(counter));
        }
        let (header, rest) = packet.split_at_mut(HEADER_LEN);
        let (body, tag) = rest.split_at_mut(rest.len() - TAG_LEN);
        let mut t = [0u8; TAG_LEN];
        t.copy_from_slice(tag);
        if !self.aead.open(nonce(counter), header, body, t) {
            return Err(OpenError::Forged);
        }
        self.window.commit(counter);
        Ok(body)
    }
}

/// A sliding window over packet counters (RFC 6479 style, one bit per counter): accepts each
/// counter at most once, and none more than [`REPLAY_WINDOW`] − 1 behind the highest seen.
#[derive(Debug, Clone, Default)]
pub struct ReplayWindow {
    /// One past the highest counter committed; 0 before any.
    top: u64,
    bits: [u64; (REPLAY_WINDOW / 64) as usize],
}

impl ReplayWindow {
    /// Whether `counter` would be accepted (does not record it).
    pub fn check(&self, counter: u64) -> bool {
        if counter >= self.top {
            return true;
        }
        if self.top - counter > REPLAY_WINDOW {
            return false;
        }
        let (word, bit) = Self::slot(counter);
        self.bits[word] & (1 << bit) == 0
    }

    /// Records `counter` as received; call only after [`check`](Self::check) and
    /// authentication succeeded.
    pub fn commit(&mut self, counter: u64) {
        if counter >= self.top {
            let advance = counter + 1 - self.top;
            if advance >= REPLAY_WINDOW {
                self.bits = [0; (REPLAY_WINDOW / 64) as usize];
            } else {
                for c in self.top..=counter {
                    let (word, bit) = Self::slot(c);
                    self.bits[word] &= !(1 << bit);
                }
            }
            self.top = counter + 1;
        }
        let (word, bit) = Self::slot(counter);
        self.bits[word] |= 1 << bit;
    }

    fn slot(counter: u64) -> (usize, u32) {
        let i = counter % REPLAY_WINDOW;
        ((i / 64) as usize, (i % 64) as u32)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn pair() -> (LinkKeys, LinkKeys) {
        let a = LinkSecret::from_random([1; 32]);
        let b = LinkSecret::from_random([2; 32]);
        let (pa, pb) = (a.public(), b.public());
        (a.derive(pb).unwrap(), b.derive(pa).unwrap())
    }

    #[test]
    fn seal_open_both_directions() {
        let (a, b) = pair();
        assert_ne!(a.controlling(), b.controlling());
        let (mut a_tx, mut a_rx) = a.split();
        let (mut b_tx, mut b_rx) = b.split();
        let mut p = Vec::new();
        a_tx.seal(b"hello b", &mut p).unwrap();
        assert_eq!(p.len(), 7 + OVERHEAD);
        assert_eq!(b_rx.open(&mut p.clone()).unwrap(), b"hello b");
        // Directions have separate keys: our own packet does not open with our receive key.
        assert_eq!(a_rx.open(&mut p.clone()), Err(OpenError::Forged));
        let mut q = Vec::new();
        b_tx.seal(b"hello a", &mut q).unwrap();
        assert_eq!(a_rx.open(&mut q).unwrap(), b"hello a");
    }

    /// Whichever backend seals (ring in native builds), the packet is RFC 8439
    /// ChaCha20-Poly1305 as the portable crate (the wasm backend) computes it.
    #[test]
    fn sealed_packets_are_standard_chacha20_poly1305() {
        use chacha20poly1305::aead::AeadInPlace;
        use chacha20poly1305::{ChaCha20Poly1305, KeyInit};

        let (a, _) = pair();
        let send = a.send;
        let (mut tx, _) = a.split();
        let mut p = Vec::new();
        tx.seal(b"skip", &mut p).unwrap();
        p.clear();
        tx.seal(b"standard", &mut p).unwrap();
        let (header, rest) = p.split_at_mut(HEADER_LEN);
        let (body, tag) = rest.split_at_mut(rest.len() - TAG_LEN);
        ChaCha20Poly1305::new(&send.into())
            .decrypt_in_place_detached(&nonce(1).into(), header, body, (&*tag).into())
            .unwrap();
        assert_eq!(body, b"standard");
    }

    #[test]
    fn replays_and_forgeries_are_dropped() {
        let (a, b) = pair();
        let (mut tx, _) = a.split();
        let (_, mut rx) = b.split();
        let mut p = Vec::new();
        tx.seal(b"once", &mut p).unwrap();
        rx.open(&mut p.clone()).unwrap();
        assert_eq!(rx.open(&mut p.clone()), Err(OpenError::Replay(0)));
        let mut q = Vec::new();
        tx.seal(b"twice", &mut q).unwrap();
        let mut forged = q.clone();
        forged[HEADER_LEN] ^= 1;
        assert_eq!(rx.open(&mut forged), Err(OpenError::Forged));
        // The forgery did not consume counter 1: the genuine packet still opens.
        assert_eq!(rx.open(&mut q).unwrap(), b"twice");
        // Changing the counter in the header breaks authentication too.
        let mut r = Vec::new();
        tx.seal(b"x", &mut r).unwrap();
        r[8] = 99;
        assert_eq!(rx.open(&mut r), Err(OpenError::Forged));
        assert_eq!(rx.open(&mut [0u8; 10]), Err(OpenError::NotLink));
    }

    #[test]
    fn counter_never_wraps() {
        let (a, _) = pair();
        let (mut tx, _) = a.split();
        tx.set_next_counter(u64::MAX - 1);
        tx.seal(b"", &mut Vec::new()).unwrap();
        assert_eq!(tx.seal(b"", &mut Vec::new()), Err(SealError::Exhausted));
        assert_eq!(tx.seal(b"", &mut Vec::new()), Err(SealError::Exhausted));
    }

    #[test]
    fn low_order_and_reflected_keys_are_refused() {
        let a = LinkSecret::from_random([1; 32]);
        assert_eq!(a.derive([0; 32]).unwrap_err(), KeyError::NotContributory);
        let a = LinkSecret::from_random([1; 32]);
        let own = a.public();
        assert_eq!(a.derive(own).unwrap_err(), KeyError::Reflected);
    }

    #[test]
    fn window_edges() {
        let mut w = ReplayWindow::default();
        w.commit(5000);
        assert!(!w.check(5000));
        assert!(w.check(5000 - (REPLAY_WINDOW - 1)));
        assert!(!w.check(5000 - REPLAY_WINDOW));
        assert!(w.check(4999));
        w.commit(4999);
        assert!(!w.check(4999));
        // A jump by exactly the window size clears everything behind.
        w.commit(5000 + REPLAY_WINDOW);
        assert!(w.check(5001));
        assert!(!w.check(5000));
    }

    proptest! {
        /// Against a model (a set of everything accepted and the highest counter), any order of
        /// arrivals is accepted exactly when the model says so.
        #[test]
        fn window_matches_model(counters in proptest::collection::vec(0u64..6000, 1..400)) {
            let mut w = ReplayWindow::default();
            let mut seen = std::collections::HashSet::new();
            let mut top: Option<u64> = None;
            for c in counters {
                let fresh = !seen.contains(&c)
                    && top.is_none_or(|t| c > t || t - c < REPLAY_WINDOW);
                prop_assert_eq!(w.check(c), fresh, "counter {}", c);
                if fresh {
                    w.commit(c);
                    seen.insert(c);
                    top = Some(top.map_or(c, |t| t.max(c)));
                }
            }
        }
    }
}
