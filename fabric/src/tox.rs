//! The c-toxcore binding: one thread owns the `Tox*` instance; tokio talks to it over channels.
//!
//! ```text
//!  tokio tasks                         the tox thread (owns Tox*, never shared)
//!  ───────────                         ─────────────────────────────────────────
//!  ToxHandle::send_lossy ─┐  commands   ┌► tox_friend_send_lossy_packet  ─► UDP / TCP relay
//!  ToxHandle::add_friend ─┼──(mpsc)────►┤  tox_friend_add, save (atomic, 0600)
//!  ToxHandle::status ─────┘             └► tox_iterate every tox_iteration_interval
//!                                              │ callbacks (friend request: policy applied here)
//!  mpsc::Receiver<ToxEvent> ◄──(mpsc)──────────┘
//! ```
//!
//! The thread waits for the next command or the next iteration, whichever comes first, so a
//! queue of packets is sent as soon as it arrives and an idle node sleeps between iterations.
//!
//! Custom packets: lossy ones (first byte in [`LOSSY_ID_RANGE`]) carry KCP segments; lossless
//! ones (first byte in [`LOSSLESS_ID_RANGE`]) carry control messages. Both are at most
//! [`MAX_CUSTOM_PACKET`] bytes, id byte included. c-toxcore refuses custom packets to a friend
//! that is not online with us: the handle then reports [`ToxError::FriendNotConnected`] for
//! lossless packets and counts (in [`ToxStatus`]) the lossy packets it had to drop.

use std::collections::HashSet;
use std::ops::RangeInclusive;
use std::path::PathBuf;

use crate::id::{BootstrapNode, PublicKey};

pub mod ffi;
mod node;
mod save;
mod socket;
mod strangers;
#[cfg(feature = "test-util")]
pub mod testnet;

pub use ffi::{Connection, MAX_CUSTOM_PACKET};
pub use node::{FriendStatus, JOIN_REQUESTS_PER_MINUTE, ToxEvent, ToxHandle, ToxNode, ToxStatus};
/// Writes a file of the data dir atomically with mode 0600, as the node's own savedata is
/// written (the directory made 0700 if missing; durable once this returns).
pub use save::store as write_private;

/// First bytes c-toxcore accepts for custom lossy packets.
pub const LOSSY_ID_RANGE: RangeInclusive<u8> = 192..=254;
/// First bytes c-toxcore accepts for custom lossless packets (69 is also allowed by c-toxcore
/// but reserved here).
pub const LOSSLESS_ID_RANGE: RangeInclusive<u8> = 160..=191;

/// Whose friend requests a node accepts. Requests from anyone else are dropped silently (logged
/// at debug): the sender cannot tell a refusal from an offline node.
///
/// The policy governs new friends only: friends kept in the savedata stay friends when their
/// key leaves the list (remove them with [`ToxHandle::remove_friend`]); the exit role checks
/// every session's peer against its own policy anyway.
///
/// Friends accepted under `allow_any` whose key is not in `keys` are strangers: at most 8 at
/// once and then one every 10 s are accepted, at most 64 at a time, they are removed after
/// 5 minutes without a packet from them, and they are never written to `tox.save`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FriendPolicy {
    /// Accept every request.
    pub allow_any: bool,
    /// Accept requests from these keys. They are also added as friends at start, so an allowed
    /// peer that already knows our ID connects without a request.
    pub keys: HashSet<PublicKey>,
}

impl FriendPolicy {
    /// Whether a request from `pk` is accepted.
    pub fn allows(&self, pk: &PublicKey) -> bool {
        self.allow_any || self.keys.contains(pk)
    }
}

/// How to run a Tox node.
#[derive(Debug, Clone)]
pub struct ToxConfig {
    /// Directory of `tox.save` (the identity, mode 0600). Created if missing.
    pub data_dir: PathBuf,
    /// DHT nodes to bootstrap from (UDP), in addition to the public ones if enabled.
    pub bootstrap: Vec<BootstrapNode>,
    /// Also bootstrap from [`crate::id::public_bootstrap_nodes`].
    pub use_public_bootstrap: bool,
    /// TCP relays to use (for peers that cannot do UDP).
    pub tcp_relays: Vec<BootstrapNode>,
    /// Use UDP (false: TCP relays only).
    pub udp_enabled: bool,
    /// Dual-stack IPv6 socket (false: IPv4 only).
    pub ipv6_enabled: bool,
    /// LAN discovery broadcasts. Off by default: a proxy node should not announce itself.
    pub local_discovery: bool,
    /// First UDP port to try (0 and 0: c-toxcore's default 33445..=33545).
    pub start_port: u16,
    /// Last UDP port to try.
    pub end_port: u16,
    /// Also serve as a TCP relay on this port (0: off).
    pub tcp_relay_port: u16,
    /// Whose friend requests are accepted.
    pub allow: FriendPolicy,
    /// Display name other Tox clients show for this node.
    pub name: Option<String>,
    /// Capacity of the event channel. Lossy packets that find it full are dropped (and
    /// counted); other events wait for room.
    pub event_capacity: usize,
    /// Capacity of the command channel (mostly outgoing packets).
    pub command_capacity: usize,
    /// Let c-toxcore lock its crypto buffers in memory (`mlock`), as it does by default.
    ///
    /// Off here: c-toxcore locks and unlocks a buffer around every packet it encrypts or
    /// decrypts, and those syscalls took about 40 % of the Tox thread during bulk transfers.
    /// With this off, the Tox thread refuses them (see `ffi::refuse_memory_locks`) and Tox
    /// secrets can be swapped out like the rest of the process's memory; turn it on where
    /// swap is not encrypted and that matters more than speed.
    pub lock_memory: bool,
}

impl ToxConfig {
    /// Defaults for a node keeping its identity in `data_dir`: public bootstrap on, UDP and
    /// IPv6 on, LAN discovery off, default ports, no relay server, nobody allowed.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            bootstrap: Vec::new(),
            use_public_bootstrap: true,
            tcp_relays: Vec::new(),
            udp_enabled: true,
            ipv6_enabled: true,
            local_discovery: false,
            start_port: 0,
            end_port: 0,
            tcp_relay_port: 0,
            allow: FriendPolicy::default(),
            name: None,
            event_capacity: 4096,
            command_capacity: 4096,
            lock_memory: false,
        }
    }
}

/// What can go wrong talking to a Tox node.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ToxError {
    /// Reading or writing the savedata failed.
    #[error("tox save file {path}: {source}")]
    Save {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// c-toxcore could not create the instance.
    #[error("starting tox: {0}")]
    New(#[from] ffi::NewError),
    /// The OS refused to start the tox thread or its timer.
    #[error("starting the tox thread: {0}")]
    Thread(std::io::Error),
    /// The node has shut down (or its thread died).
    #[error("the tox node has shut down")]
    NodeGone,
    /// The packet's first byte is outside the range for its kind.
    #[error("packet id byte {id} outside {lo}..={hi}", lo = range.start(), hi = range.end())]
    InvalidPacketId {
        /// The first byte given.
        id: u8,
        /// The allowed range.
        range: RangeInclusive<u8>,
    },
    /// Empty packet.
    #[error("empty packet")]
    EmptyPacket,
    /// Longer than [`MAX_CUSTOM_PACKET`].
    #[error("packet of {0} bytes exceeds the tox limit of {MAX_CUSTOM_PACKET}")]
    PacketTooLong(usize),
    /// The peer is not on the friend list.
    #[error("peer {0} is not a friend")]
    NotAFriend(String),
    /// The friend is not online with us; c-toxcore drops custom packets until it is.
    #[error("friend {0} is not connected")]
    FriendNotConnected(String),
    /// c-toxcore's lossless send queue to this friend is full; retry later.
    #[error("send queue to friend {0} is full")]
    SendQueueFull(String),
    /// The command queue to the tox thread is full (only from `try_send_*`).
    #[error("tox command queue full")]
    QueueFull,
    /// Adding a friend failed.
    #[error("adding friend: {0}")]
    FriendAdd(#[from] ffi::FriendAddError),
    /// Any other refusal by c-toxcore to send a packet.
    #[error("sending packet: {0}")]
    Packet(ffi::PacketError),
}

/// Checks a packet against c-toxcore's rules before it is queued, so the caller learns about a
/// bad packet immediately rather than from a counter.
pub(crate) fn check_packet(data: &[u8], range: &RangeInclusive<u8>) -> Result<(), ToxError> {
    let Some(&id) = data.first() else {
        return Err(ToxError::EmptyPacket);
    };
    if !range.contains(&id) {
        return Err(ToxError::InvalidPacketId {
            id,
            range: range.clone(),
        });
    }
    if data.len() > MAX_CUSTOM_PACKET {
        return Err(ToxError::PacketTooLong(data.len()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_checks() {
        assert!(check_packet(&[200, 1], &LOSSY_ID_RANGE).is_ok());
        assert!(check_packet(&[254], &LOSSY_ID_RANGE).is_ok());
        assert!(matches!(
            check_packet(&[], &LOSSY_ID_RANGE),
            Err(ToxError::EmptyPacket)
        ));
        let err = check_packet(&[255], &LOSSY_ID_RANGE).unwrap_err();
        assert_eq!(err.to_string(), "packet id byte 255 outside 192..=254");
        assert!(check_packet(&[160], &LOSSLESS_ID_RANGE).is_ok());
        assert!(check_packet(&[192], &LOSSLESS_ID_RANGE).is_err());
        let big = vec![200u8; MAX_CUSTOM_PACKET + 1];
        assert!(matches!(
            check_packet(&big, &LOSSY_ID_RANGE),
            Err(ToxError::PacketTooLong(1374))
        ));
        assert!(check_packet(&big[..MAX_CUSTOM_PACKET], &LOSSY_ID_RANGE).is_ok());
    }

    #[test]
    fn policy() {
        let pk = PublicKey([7; 32]);
        let mut p = FriendPolicy::default();
        assert!(!p.allows(&pk));
        p.keys.insert(pk);
        assert!(p.allows(&pk));
        assert!(!p.allows(&PublicKey([8; 32])));
        p.allow_any = true;
        assert!(p.allows(&PublicKey([8; 32])));
    }
}
