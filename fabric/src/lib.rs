//! The peer fabric of `proxy`: every application flow becomes a stream of a multiplexer inside
//! one reliable KCP session per peer, and that session travels over whatever path reaches the
//! peer (Tox lossy packets today; hole-punched UDP/TCP links later).
//!
//! ```text
//!  app flow ─► mux::Stream ─┐                       ┌─► path (Tox lossy packet, punched link)
//!  app flow ─► mux::Stream ─┼─► mux ─► session(KCP) ─┤
//!  UDP flow ─► datagram ────┼────────► session ──────┘   opaque packets, any path, any order
//!                           └── control messages (conv assignment, close) over Tox lossless
//! ```
//!
//! The protocol cores ([`mux`], [`session`]) are sans-IO: they take bytes and `now`, and hand
//! back bytes and the next deadline. Drivers (feature `tokio`) own sockets and timers.

#![deny(clippy::print_stdout, clippy::print_stderr)]

pub mod connection;
pub mod id;
pub mod introduction;
pub mod link;
pub mod mux;
pub mod overlay;
pub mod pairing;
#[cfg(feature = "tokio")]
pub mod path;
#[cfg(feature = "tox")]
pub mod peer;
pub mod punch;
pub mod resume;
pub mod session;
pub mod target;
#[cfg(feature = "test-util")]
pub mod testing;
pub mod time;
#[cfg(feature = "tox")]
pub mod tox;
