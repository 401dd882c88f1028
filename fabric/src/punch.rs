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
//! on sockets. [`filter`] decides which of a peer's candidates (and which sources of its
//! probes) we send anything to.
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
//!    session packets go through [`udp::UdpPunch::seal_data`] (or [`driver::UdpLink::try_send`])
//!    and come out of [`udp::UdpPunch::handle_input`] as [`udp::Input::Data`] (or
//!    [`driver::LinkEvent::Data`]). [`udp::Event::Dead`] / `Failed` says to fall back to Tox;
//!    [`udp::UdpPunch::rtt`] (or [`driver::UdpLink::rtt`]) is the latest keepalive round trip
//!    for choosing a path.
//!
//! # Driving a session over a [`driver::UdpLink`] at full speed
//!
//! The session driver sends each packet with [`driver::UdpLink::try_send`]`(&[u8])`: it
//! seals into a reused buffer and writes to the socket from the caller's task, with no
//! channel and no `.await`. [`driver::TrySendError::Full`] means the socket's send buffer is
//! full: await [`driver::UdpLink::writable`] and send the packet again (what the async
//! [`driver::UdpLink::send`] does). `TrySendError::Link` means not connected (any more).
//! Received packets come from the link's own task as [`driver::LinkEvent::Data`]; take them
//! in bursts with [`driver::UdpLink::next_events`]`(&mut vec, limit)` (one wake-up for many
//! packets), feed them all to the session, then flush its transmits once. Sockets get
//! [`driver::SOCKET_BUFFER`]-sized kernel buffers (capped by `net.core.{r,w}mem_max`). The
//! session's MTU on a link is the path MTU less IP/UDP headers (28), [`crate::link::OVERHEAD`]
//! and one type byte: 1,446 on a 1,500-byte path (`punch-agent` uses 1,440).
//! `tests/src/bin/punch-agent.rs` has a complete driver (`drive`) of a session with the mux.

#[cfg(feature = "tokio")]
pub mod driver;
pub mod filter;
pub mod stun;
#[cfg(feature = "tokio")]
pub mod tcp;
pub mod udp;
