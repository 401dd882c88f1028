//! Resuming a session without Tox: what lets two peers that met before find and trust each
//! other again in one round trip, after a restart of either or the loss of their session.
//!
//! ```text
//!  cache (data dir)          handshake (sans-IO)                 peer::direct (driver)
//!  peer ─► endpoints ──────► HELLO{Open} ──────────────────────► WELCOME{Accept conv}
//!  our direct port           on the Tox keys, one round trip      ─► session on a direct link
//! ```
//!
//! * [`handshake`]: the HELLO/WELCOME exchange on the two Tox identities' X25519 keys, with
//!   replay protection, giving the keys of a direct UDP link;
//! * [`cache`]: the file of endpoints that worked, read at start and written as they change.

pub mod cache;
pub mod handshake;
