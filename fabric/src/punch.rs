//! Hole punching: learning our public addresses (STUN) and opening direct paths to a peer
//! through NATs.
//!
//! ```text
//!  stun::Transaction ──► server-reflexive address ─┐
//!  host addresses ─────────────────────────────────┼─► link::signal::LinkOffer ──► over Tox
//!                                                  │
//!  peer's LinkOffer (over Tox) ─► link::LinkSecret::derive ─► udp::UdpPunch ─► Connected
//! ```
//!
//! [`stun`] and [`udp`] are sans-IO cores; [`driver`] (feature `tokio`) runs them on sockets.

#[cfg(feature = "tokio")]
pub mod driver;
pub mod stun;
#[cfg(feature = "tokio")]
pub mod tcp;
pub mod udp;
