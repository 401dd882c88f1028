//! What this node lets each peer do (issue "Mesh"). A peer has no rights unless given some:
//!
//! - **exit**: it may use this node as its exit (`--allow ID|NAME`, `--allow-any`, or
//!   `exit = true` in its `[[peer]]` table), under the exit policy;
//! - **share**: it may reach these ports of this node's loopback (`--share NAME:PORTS`, or
//!   `share = "PORTS"` in its `[[peer]]` table).
//!
//! Any known peer (`--peer`) and any peer with a right may hold a session with this node;
//! what flows on it is checked stream by stream here, never by the session. A peer that asks
//! for what it was not given is refused, and nothing is dialed.

use std::collections::HashMap;

use fabric::id::PublicKey;

use crate::peers::PeerTable;
use crate::share::{PortSet, Transport};

/// What one peer may do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rights {
    /// May use this node as its exit.
    pub exit: bool,
    /// Ports of this node's loopback it may reach.
    pub share: PortSet,
    /// May introduce its peers to this node and this node to them (it is this node's
    /// introducer: see [`crate::introduce`]).
    pub introduce: bool,
}

/// Every peer's rights.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RightsTable {
    by_key: HashMap<PublicKey, Rights>,
    /// `--allow-any`: anyone may use this node as an exit.
    any_exit: bool,
}

impl RightsTable {
    /// Gives `pk` the exit right.
    pub fn grant_exit(&mut self, pk: PublicKey) {
        self.by_key.entry(pk).or_default().exit = true;
    }

    /// Lets `pk` reach `ports`.
    pub fn grant_share(&mut self, pk: PublicKey, ports: &PortSet) {
        self.by_key.entry(pk).or_default().share.extend(ports);
    }

    /// Takes the exit right from `pk` (an `--allow-any` node still serves it).
    pub fn revoke_exit(&mut self, pk: &PublicKey) {
        if let Some(r) = self.by_key.get_mut(pk) {
            r.exit = false;
        }
    }

    /// Takes every shared port from `pk`.
    pub fn revoke_shares(&mut self, pk: &PublicKey) {
        if let Some(r) = self.by_key.get_mut(pk) {
            r.share = PortSet::default();
        }
    }

    /// Makes `pk` this node's introducer.
    pub fn grant_introduce(&mut self, pk: PublicKey) {
        self.by_key.entry(pk).or_default().introduce = true;
    }

    /// `pk` is no longer this node's introducer.
    pub fn revoke_introduce(&mut self, pk: &PublicKey) {
        if let Some(r) = self.by_key.get_mut(pk) {
            r.introduce = false;
        }
    }

    /// Takes every right from `pk` (it was removed).
    pub fn remove(&mut self, pk: &PublicKey) {
        self.by_key.remove(pk);
    }

    /// Whether `pk` is this node's introducer.
    pub fn may_introduce(&self, pk: &PublicKey) -> bool {
        self.by_key.get(pk).is_some_and(|r| r.introduce)
    }

    /// `--allow-any`: an open exit.
    pub fn allow_any_exit(&mut self) {
        self.any_exit = true;
    }

    /// Whether anyone at all may use this node as an exit.
    pub fn any_exit(&self) -> bool {
        self.any_exit
    }

    /// Whether `pk` may use this node as its exit.
    pub fn may_exit(&self, pk: &PublicKey) -> bool {
        self.any_exit || self.by_key.get(pk).is_some_and(|r| r.exit)
    }

    /// Whether `pk` may reach `port` of this node's loopback.
    pub fn may_reach(&self, pk: &PublicKey, port: u16, transport: Transport) -> bool {
        self.by_key
            .get(pk)
            .is_some_and(|r| r.share.contains(port, transport))
    }

    /// The rights of `pk` (none for a peer not in the table).
    pub fn of(&self, pk: &PublicKey) -> Rights {
        let mut rights = self.by_key.get(pk).cloned().unwrap_or_default();
        rights.exit |= self.any_exit;
        rights
    }

    /// Peers given any right.
    pub fn keys(&self) -> impl Iterator<Item = &PublicKey> {
        self.by_key.keys()
    }

    /// Whether no peer has any right.
    pub fn is_empty(&self) -> bool {
        !self.any_exit && self.by_key.is_empty()
    }

    /// Who may hold a session with this node: the known peers and those given a right.
    pub fn session_peers<'a>(&'a self, peers: &'a PeerTable) -> Vec<PublicKey> {
        let mut keys: Vec<PublicKey> = peers
            .iter()
            .map(|p| p.id.public_key())
            .chain(self.keys().copied())
            .collect();
        keys.sort();
        keys.dedup();
        keys
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_has_only_the_rights_it_was_given() {
        let (a, b, c) = (PublicKey([1; 32]), PublicKey([2; 32]), PublicKey([3; 32]));
        let mut table = RightsTable::default();
        table.grant_exit(a);
        table.grant_share(b, &"8080,22".parse().unwrap());
        assert!(table.may_exit(&a) && !table.may_exit(&b) && !table.may_exit(&c));
        assert!(table.may_reach(&b, 8080, Transport::Tcp));
        assert!(!table.may_reach(&b, 8080, Transport::Udp));
        assert!(!table.may_reach(&b, 8081, Transport::Tcp));
        assert!(
            !table.may_reach(&a, 8080, Transport::Tcp),
            "exit is no share"
        );
        assert!(!table.may_reach(&c, 22, Transport::Tcp));
        table.allow_any_exit();
        assert!(table.may_exit(&c) && table.of(&c).exit);
        assert!(
            !table.may_reach(&c, 22, Transport::Tcp),
            "an open exit shares nothing"
        );
    }
}
