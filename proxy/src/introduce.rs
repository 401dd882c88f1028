//! Introductions between friends (issue "Pairing", seed 003's route table by name), on the
//! model of Syncthing's introducer.
//!
//! ```text
//!   b ── takes a as its introducer ──► a ◄── takes a as its introducer ── c
//!   a ── "c is <ID>, version v, I call it c" ──► b      (a stream of kind 21)
//!   a ── "b is <ID>, version v, I call it b" ──► c
//!   b, c: know each other by name, may hold a session, may do nothing at each other's
//!   node until their users grant it
//! ```
//!
//! - **Consent on both sides.** A node takes a peer as its introducer with
//!   `proxy peer grant NAME introducer` (or `--introducer NAME`, `introducer = true`), and says
//!   so in its grants answer. The introducer introduces two of its peers to each other only
//!   when both said so: a peer learns nothing of its introducer's other peers unless they
//!   chose to be introduced too.
//! - **Never forwarded.** A node introduces only peers its user gave it (the command line, the
//!   config file, `proxy peer add`, a pairing), never those it was introduced to: an
//!   introduction travels one hop, so no storm.
//! - **No rights.** An introduced peer may hold a session and is reachable by name, like any
//!   known peer, and may do nothing here until the user grants it something.
//! - **Names stay the user's.** A peer already known keeps its name and origin; a new one
//!   takes the introducer's name for it when free, else `peer-<hex>`. A peer the user removed
//!   stays removed.
//! - **Idempotent.** An entry carries the introducer's version of it (when its user gave it
//!   that peer): the same or an older version changes nothing; a newer one from the same
//!   introducer updates the ID (a new nospam), never the name.
//! - **Bounded.** One introducer may place at most [`MAX_PER_INTRODUCER`] peers here.

use std::collections::HashMap;

use fabric::id::{PublicKey, ToxId};
use fabric::introduction::{Introduced, MAX_ENTRIES};
use fabric::target::Grants;

use crate::mesh::Tables;
use crate::peers::Origin;

/// The most peers one introducer may place in this node's table.
pub const MAX_PER_INTRODUCER: usize = 256;

/// What an introduction changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Peers new to this node (to befriend and dial).
    pub added: Vec<ToxId>,
    /// Whether anything changed (else nothing needs to be kept).
    pub changed: bool,
}

/// Applies `entries`, introduced by `by`, to `tables` of node `own`, under the rules above.
/// `by` must be one of this node's introducers: the caller checks it.
pub fn apply(
    tables: &mut Tables,
    own: &PublicKey,
    by: PublicKey,
    entries: &[Introduced],
) -> Applied {
    let mut applied = Applied::default();
    let mut placed = tables
        .peers
        .iter()
        .filter(|p| matches!(p.origin, Origin::Introduced { by: b, .. } if b == by))
        .count();
    for entry in entries.iter().take(MAX_ENTRIES) {
        let pk = entry.id.public_key();
        if pk == *own || pk == by || tables.removed.contains(&pk) {
            continue;
        }
        if let Some((id, origin)) = tables.peers.by_key_mut(&pk) {
            if let Origin::Introduced { by: b, version } = origin
                && *b == by
                && entry.version > *version
            {
                *version = entry.version;
                *id = entry.id;
                applied.changed = true;
            }
            continue;
        }
        if placed >= MAX_PER_INTRODUCER {
            tracing::warn!(introducer = %by, "introduced peers over the limit: ignored");
            break;
        }
        let Some(name) = tables.peers.free_name(Some(&entry.name), &pk) else {
            continue;
        };
        let origin = Origin::Introduced {
            by,
            version: entry.version,
        };
        if tables.peers.add_from(name, entry.id, origin).is_ok() {
            placed += 1;
            applied.added.push(entry.id);
            applied.changed = true;
        }
    }
    applied
}

/// What this node introduces to its peer `to`: its other peers that took it as their
/// introducer, as `to` did, and that its user gave it. Empty unless `to` is such a peer.
pub fn introductions_for(
    tables: &Tables,
    granted: &HashMap<PublicKey, Grants>,
    to: &PublicKey,
) -> Vec<Introduced> {
    let chose_us = |pk: &PublicKey| granted.get(pk).is_some_and(|g| g.introducer);
    let introducible = |pk: &PublicKey| {
        chose_us(pk) && tables.peers.by_key(pk).is_some_and(|p| p.origin.is_given())
    };
    if !introducible(to) {
        return Vec::new();
    }
    tables
        .peers
        .iter()
        .filter(|p| p.id.public_key() != *to && introducible(&p.id.public_key()))
        .take(MAX_ENTRIES)
        .map(|p| Introduced {
            id: p.id,
            version: p.origin.version(),
            name: p.name.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::peers::PeerTable;
    use crate::rights::RightsTable;
    use crate::route::PeerRoutes;

    fn key(b: u8) -> PublicKey {
        PublicKey([b; 32])
    }

    fn id(b: u8, nospam: u8) -> ToxId {
        ToxId::new(key(b), [nospam; 4])
    }

    fn tables(peers: &[(&str, u8, Origin)]) -> Tables {
        let mut table = PeerTable::default();
        for (name, b, origin) in peers {
            table
                .add_from(name.parse().unwrap(), id(*b, 0), *origin)
                .unwrap();
        }
        Tables {
            routes: Arc::new(PeerRoutes::new(table.clone(), key(99))),
            peers: table,
            rights: RightsTable::default(),
            removed: Vec::new(),
        }
    }

    fn intro(b: u8, nospam: u8, version: u64, name: &str) -> Introduced {
        Introduced {
            id: id(b, nospam),
            version,
            name: name.parse().unwrap(),
        }
    }

    #[test]
    fn an_introduction_adds_new_peers_once_without_rights_or_renaming() {
        let a = key(1);
        let mut t = tables(&[
            ("a", 1, Origin::Paired(5)),
            ("c", 7, Origin::Config), // the user's "c" is another peer
            ("mine", 3, Origin::Added(9)),
        ]);
        t.removed.push(key(4));
        let entries = [
            intro(2, 0, 10, "c"),      // new; its name is taken: peer-<hex>
            intro(3, 0, 10, "theirs"), // known by the user's name
            intro(4, 0, 10, "gone"),   // removed by the user
            intro(99, 0, 10, "me"),    // this node
            intro(1, 0, 10, "a"),      // the introducer itself
            intro(5, 0, 10, "d"),      // new
        ];
        let applied = apply(&mut t, &key(99), a, &entries);
        assert_eq!(applied.added, vec![id(2, 0), id(5, 0)]);
        assert!(applied.changed);
        let c = t.peers.by_key(&key(2)).unwrap();
        assert!(c.name.as_str().starts_with("peer-"), "{}", c.name);
        assert_eq!(c.origin, Origin::Introduced { by: a, version: 10 });
        assert_eq!(t.peers.by_key(&key(3)).unwrap().name.as_str(), "mine");
        assert_eq!(t.peers.by_key(&key(3)).unwrap().origin, Origin::Added(9));
        assert!(t.peers.by_key(&key(4)).is_none());
        assert_eq!(t.peers.by_key(&key(5)).unwrap().name.as_str(), "d");
        assert!(t.rights.is_empty(), "no rights come with an introduction");

        // The same again: nothing changes.
        assert_eq!(apply(&mut t, &key(99), a, &entries), Applied::default());
        // An older version: nothing. A newer one: the ID, never the name.
        assert_eq!(
            apply(&mut t, &key(99), a, &[intro(5, 7, 9, "x")]),
            Applied::default()
        );
        let newer = apply(&mut t, &key(99), a, &[intro(5, 7, 11, "x")]);
        assert!(newer.changed && newer.added.is_empty());
        let d = t.peers.by_key(&key(5)).unwrap();
        assert_eq!((d.name.as_str(), d.id), ("d", id(5, 7)));
        // Another introducer's newer version does not touch a's entry.
        assert_eq!(
            apply(&mut t, &key(99), key(3), &[intro(5, 8, 50, "x")]),
            Applied::default()
        );
    }

    #[test]
    fn one_introducer_places_a_bounded_number_of_peers() {
        let mut t = tables(&[]);
        let mut added = 0;
        for round in 0..5u8 {
            let entries: Vec<Introduced> = (0..64u8)
                .map(|i| Introduced {
                    id: ToxId::new(
                        PublicKey([
                            round, i, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
                            1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
                        ]),
                        [0; 4],
                    ),
                    version: 1,
                    name: format!("p{round}-{i}").parse().unwrap(),
                })
                .collect();
            added += apply(&mut t, &key(99), key(1), &entries).added.len();
        }
        assert_eq!(added, MAX_PER_INTRODUCER);
    }

    #[test]
    fn only_given_peers_that_chose_us_are_introduced_to_each_other() {
        let a = key(1);
        let t = tables(&[
            ("b", 2, Origin::Paired(20)),
            ("c", 3, Origin::Config),
            ("d", 4, Origin::Introduced { by: a, version: 1 }),
            ("e", 5, Origin::Added(30)),
        ]);
        let yes = Grants {
            introducer: true,
            ..Grants::default()
        };
        let granted: HashMap<PublicKey, Grants> = [
            (key(2), yes.clone()),
            (key(3), yes.clone()),
            (key(4), yes.clone()),       // introduced here: never forwarded
            (key(5), Grants::default()), // did not choose us
        ]
        .into_iter()
        .collect();
        let to_b = introductions_for(&t, &granted, &key(2));
        assert_eq!(to_b.len(), 1);
        assert_eq!((to_b[0].id, to_b[0].version), (id(3, 0), 0));
        assert_eq!(to_b[0].name.as_str(), "c");
        let to_c = introductions_for(&t, &granted, &key(3));
        assert_eq!(to_c.len(), 1);
        assert_eq!((to_c[0].id, to_c[0].version), (id(2, 0), 20));
        assert!(introductions_for(&t, &granted, &key(4)).is_empty());
        assert!(introductions_for(&t, &granted, &key(5)).is_empty());
    }
}
