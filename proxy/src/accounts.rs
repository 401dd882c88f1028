//! What this node served each peer, by what right (issue "Mesh", accounting both ways): the
//! streams and bytes it relayed for a peer as its exit and to its shared ports, and what it
//! refused. What this node sent *through* a peer is that peer's session counters.

use std::collections::HashMap;
use std::sync::Mutex;

use fabric::id::PublicKey;

use crate::relay::Transferred;

/// Which right a served stream used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// An exit request (an address, a name, the resolver).
    Exit,
    /// A shared port.
    Share,
}

/// One peer's figures, as served by this node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerCounts {
    /// Streams served as its exit.
    pub exit_streams: u64,
    /// Bytes from the peer to what it reached through this node as its exit.
    pub exit_up: u64,
    /// Bytes back to the peer, as its exit.
    pub exit_down: u64,
    /// Streams to shared ports.
    pub share_streams: u64,
    /// Bytes from the peer to this node's shared ports.
    pub share_up: u64,
    /// Bytes from this node's shared ports to the peer.
    pub share_down: u64,
    /// Streams refused: what the peer asked for it had no right to.
    pub refused: u64,
}

/// Every peer's [`PeerCounts`].
#[derive(Debug, Default)]
pub struct PeerAccounts {
    by_peer: Mutex<HashMap<PublicKey, PeerCounts>>,
}

/// Peers counted at most: a node serves its peers, and beyond this many the figures of new
/// ones are dropped rather than let strangers (refused ones, say) grow the table.
const MAX_PEERS: usize = 4096;

impl PeerAccounts {
    fn with(&self, pk: PublicKey, f: impl FnOnce(&mut PeerCounts)) {
        let mut map = self.by_peer.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_PEERS && !map.contains_key(&pk) {
            return;
        }
        f(map.entry(pk).or_default());
    }

    /// A stream for `pk` started, under `right`.
    pub fn opened(&self, pk: PublicKey, right: Served) {
        self.with(pk, |c| match right {
            Served::Exit => c.exit_streams += 1,
            Served::Share => c.share_streams += 1,
        });
    }

    /// A stream for `pk` under `right` ended having moved `t`.
    pub fn relayed(&self, pk: PublicKey, right: Served, t: Transferred) {
        self.with(pk, |c| match right {
            Served::Exit => {
                c.exit_up += t.up;
                c.exit_down += t.down;
            }
            Served::Share => {
                c.share_up += t.up;
                c.share_down += t.down;
            }
        });
    }

    /// A request of `pk` was refused for want of a right.
    pub fn refused(&self, pk: PublicKey) {
        self.with(pk, |c| c.refused += 1);
    }

    /// The figures of `pk`.
    pub fn of(&self, pk: &PublicKey) -> PeerCounts {
        let map = self.by_peer.lock().unwrap_or_else(|e| e.into_inner());
        map.get(pk).copied().unwrap_or_default()
    }

    /// Every counted peer's figures.
    pub fn all(&self) -> Vec<(PublicKey, PeerCounts)> {
        let map = self.by_peer.lock().unwrap_or_else(|e| e.into_inner());
        map.iter().map(|(k, v)| (*k, *v)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_peer_and_right() {
        let (a, b) = (PublicKey([1; 32]), PublicKey([2; 32]));
        let accounts = PeerAccounts::default();
        accounts.opened(a, Served::Exit);
        accounts.relayed(a, Served::Exit, Transferred { up: 10, down: 20 });
        accounts.opened(a, Served::Share);
        accounts.relayed(a, Served::Share, Transferred { up: 1, down: 2 });
        accounts.refused(b);
        assert_eq!(
            accounts.of(&a),
            PeerCounts {
                exit_streams: 1,
                exit_up: 10,
                exit_down: 20,
                share_streams: 1,
                share_up: 1,
                share_down: 2,
                refused: 0
            }
        );
        assert_eq!(accounts.of(&b).refused, 1);
        assert_eq!(accounts.all().len(), 2);
    }
}
