//! Hole punching: learning our public addresses (STUN) and opening direct paths to a peer
//! through NATs.
//!
//! ```text
//!  stun::Transaction ──► server-reflexive address ─┐
//!  host addresses ─────────────────────────────────┼─► link::signal::LinkOffer ──► over Tox
//!                                                  │
//!  peer's LinkOffer (over Tox) ─► link::LinkSecret::derive ─► udp::UdpPunch ─► Connected
//!                                                          └► tcp::punch_tcp (TLS, pinned)
//! ```
//!
//! [`stun`] and [`udp`] are sans-IO cores; [`driver`] and [`tcp`] (feature `tokio`) run them
//! on sockets.
//!
//! # Bringing up a punched path (what the session layer does)
//!
//! 1. Bind one UDP socket (`0.0.0.0:0`) and, for TCP, pick one local port. Learn the
//!    server-reflexive candidates with [`driver::stun_udp`] on that socket and
//!    [`driver::stun_tcp`] from that port, for each configured STUN server; add the host
//!    addresses of the interfaces (same ports).
//! 2. Make a fresh [`crate::link::LinkSecret`] from 32 random bytes and, for TCP, a
//!    [`tcp::TlsIdentity`]; send a [`crate::link::signal::Signal::Offer`] with its public key,
//!    the TLS fingerprint and the candidates in a Tox lossless packet. Candidates learned later
//!    go in `Signal::Candidates` with the same offer id.
//! 3. On the peer's offer: `secret.derive(offer.x25519_public)` gives the
//!    [`crate::link::LinkKeys`] (both sides must have sent and received one offer each; a new
//!    offer from either side means both make new secrets). Start
//!    [`udp::UdpPunch::new`] with the peer's UDP candidates (or spawn
//!    [`driver::UdpLink::spawn`] on the socket), and/or [`tcp::punch_tcp`] with the peer's TCP
//!    candidates, `keys.controlling()` and the peer's fingerprint.
//! 4. [`udp::Event::Connected`] (or [`driver::LinkEvent::Connected`]) says the path is usable:
//!    session packets go through [`udp::UdpPunch::seal_data`] (or [`driver::UdpLink::send`])
//!    and come out of [`udp::UdpPunch::handle_input`] as [`udp::Input::Data`] (or
//!    [`driver::LinkEvent::Data`]). [`udp::Event::Dead`] / `Failed` says to fall back to Tox;
//!    [`udp::UdpPunch::rtt`] is the latest keepalive round trip for choosing a path.

#[cfg(feature = "tokio")]
pub mod driver;
pub mod stun;
#[cfg(feature = "tokio")]
pub mod tcp;
pub mod udp;
