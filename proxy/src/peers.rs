//! The peers a node knows by name (issue "Mesh"): `--peer NAME=TOXID` on the command line,
//! `[[peer]]` tables in the config file. A known peer can be named wherever a Tox ID is asked
//! for (`--exit nas`), and (later) reached as `NAME.tox`.
//!
//! ```toml
//! [[peer]]
//! name = "nas"
//! id = "<76 hex digits>"
//! ```
//!
//! Names are DNS labels compared without regard to case ([`PeerName`]); both names and IDs
//! are unique in a table, so a name always means one peer and a peer has one name.

use std::fmt;

use fabric::id::{IdError, PublicKey, ToxId};
use fabric::overlay::{NameError, PeerName};
use serde::Deserialize;

/// A peer known by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownPeer {
    /// What this node calls it.
    pub name: PeerName,
    /// Its Tox ID.
    pub id: ToxId,
    /// Where this node learned of it.
    pub origin: Origin,
}

/// Where a node learned of a peer: what `proxy peers` shows beside it, and what decides
/// whether the node may introduce it to others (only peers its user gave it, never those it
/// was introduced to: introductions are never forwarded).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Origin {
    /// The command line or the config file.
    #[default]
    Config,
    /// `proxy peer add`, at the time given (seconds since the Unix epoch).
    Added(u64),
    /// A pairing (`proxy invite` / `proxy join`), at the time given.
    Paired(u64),
    /// An introduction by the peer `by`, as of its `version`.
    Introduced {
        /// The introducer's key.
        by: PublicKey,
        /// The introducer's version of the entry (newer replaces older; the same changes
        /// nothing).
        version: u64,
    },
}

impl Origin {
    /// Whether the user gave this node the peer (not an introduction).
    pub fn is_given(&self) -> bool {
        !matches!(self, Self::Introduced { .. })
    }

    /// The version an introduction of the peer by this node carries: when the user gave it
    /// (0 for the config's).
    pub fn version(&self) -> u64 {
        match *self {
            Self::Config => 0,
            Self::Added(t) | Self::Paired(t) => t,
            Self::Introduced { version, .. } => version,
        }
    }
}

/// A `[[peer]]` table of the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerEntry {
    /// The peer's name.
    pub name: String,
    /// Its Tox ID (76 hex digits).
    pub id: String,
    /// Whether it may use this node as its exit.
    pub exit: Option<bool>,
    /// Ports of this node's loopback it may reach (as `--share` takes them after the colon).
    pub share: Option<String>,
    /// Whether it is this node's introducer.
    pub introducer: Option<bool>,
}

/// Why a peer list is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    /// `--peer` without `=`.
    #[error("{0:?}: expected NAME=TOXID")]
    Form(String),
    /// A bad name.
    #[error("peer name {name:?}: {error}")]
    Name {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        error: NameError,
    },
    /// A bad Tox ID.
    #[error("{name}: {error}")]
    Id {
        /// The peer's name (or the value given, for `--exit`).
        name: String,
        /// What is wrong with its ID.
        error: IdError,
    },
    /// Two peers of one name (names ignore case).
    #[error("two peers are called {0}")]
    DuplicateName(PeerName),
    /// One peer under two names.
    #[error("peers {0} and {1} have the same key")]
    DuplicateKey(PeerName, PeerName),
    /// `--exit` names neither a Tox ID nor a known peer.
    #[error(
        "{value:?} is neither a Tox ID ({id_error}) nor the name of a peer (--peer NAME=TOXID)"
    )]
    Unknown {
        /// The value given.
        value: String,
        /// Why it is no Tox ID.
        id_error: IdError,
    },
}

/// The peers a node knows by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerTable {
    peers: Vec<KnownPeer>,
}

impl PeerTable {
    /// The table of `(name, id)` pairs, checked: valid, and unique by name and by key.
    pub fn new<'a>(
        entries: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, PeerError> {
        let mut peers: Vec<KnownPeer> = Vec::new();
        for (name, id) in entries {
            let name: PeerName = name.parse().map_err(|error| PeerError::Name {
                name: name.to_owned(),
                error,
            })?;
            let id: ToxId = id.trim().parse().map_err(|error| PeerError::Id {
                name: name.to_string(),
                error,
            })?;
            if let Some(other) = peers.iter().find(|p| p.name == name) {
                return Err(PeerError::DuplicateName(other.name.clone()));
            }
            if let Some(other) = peers.iter().find(|p| p.id.public_key() == id.public_key()) {
                return Err(PeerError::DuplicateKey(other.name.clone(), name));
            }
            peers.push(KnownPeer {
                name,
                id,
                origin: Origin::Config,
            });
        }
        Ok(Self { peers })
    }

    /// Adds a peer from the config, under the same rules as [`PeerTable::new`].
    pub fn add(&mut self, name: PeerName, id: ToxId) -> Result<(), PeerError> {
        self.add_from(name, id, Origin::Config)
    }

    /// Adds a peer learned of at `origin`, under the same rules as [`PeerTable::new`].
    pub fn add_from(&mut self, name: PeerName, id: ToxId, origin: Origin) -> Result<(), PeerError> {
        if let Some(other) = self.peers.iter().find(|p| p.name == name) {
            return Err(PeerError::DuplicateName(other.name.clone()));
        }
        if let Some(other) = self
            .peers
            .iter()
            .find(|p| p.id.public_key() == id.public_key())
        {
            return Err(PeerError::DuplicateKey(other.name.clone(), name));
        }
        self.peers.push(KnownPeer { name, id, origin });
        Ok(())
    }

    /// Removes the peer with key `pk`; returns it, if it was known.
    pub fn remove(&mut self, pk: &PublicKey) -> Option<KnownPeer> {
        let at = self.peers.iter().position(|p| &p.id.public_key() == pk)?;
        Some(self.peers.remove(at))
    }

    /// The peer with key `pk`, to change its ID or origin (never its name).
    pub fn by_key_mut(&mut self, pk: &PublicKey) -> Option<(&mut ToxId, &mut Origin)> {
        self.peers
            .iter_mut()
            .find(|p| &p.id.public_key() == pk)
            .map(|p| (&mut p.id, &mut p.origin))
    }

    /// A name for `pk` that no peer holds: `wanted` if free, else `peer-` and the key's
    /// first hex digits (8, 12, then 16 of them).
    pub fn free_name(&self, wanted: Option<&PeerName>, pk: &PublicKey) -> Option<PeerName> {
        let hex = pk.to_string().to_lowercase();
        wanted
            .cloned()
            .into_iter()
            .chain(
                (8..=16)
                    .step_by(4)
                    .filter_map(|n| format!("peer-{}", &hex[..n]).parse().ok()),
            )
            .find(|n| self.by_name(n).is_none())
    }

    /// The peer with key `pk`.
    pub fn by_key(&self, pk: &PublicKey) -> Option<&KnownPeer> {
        self.peers.iter().find(|p| &p.id.public_key() == pk)
    }

    /// Splits a `--peer NAME=TOXID` flag.
    pub fn split_flag(flag: &str) -> Result<(&str, &str), PeerError> {
        flag.split_once('=')
            .ok_or_else(|| PeerError::Form(flag.to_owned()))
    }

    /// The peer called `name`.
    pub fn by_name(&self, name: &PeerName) -> Option<&KnownPeer> {
        self.peers.iter().find(|p| &p.name == name)
    }

    /// The name of the peer with key `pk`.
    pub fn name_of(&self, pk: &PublicKey) -> Option<&PeerName> {
        self.peers
            .iter()
            .find(|p| &p.id.public_key() == pk)
            .map(|p| &p.name)
    }

    /// What `--exit VALUE` means: a Tox ID, or the ID of the peer of that name. What can be
    /// no name (too long, all digits, ...) is reported as the Tox ID it must have meant to be.
    pub fn resolve(&self, value: &str) -> Result<ToxId, PeerError> {
        let value = value.trim();
        let id_error = match value.parse::<ToxId>() {
            Ok(id) => return Ok(id),
            Err(e) => e,
        };
        match value.parse::<PeerName>() {
            Ok(name) => self
                .by_name(&name)
                .map(|p| p.id)
                .ok_or_else(|| PeerError::Unknown {
                    value: value.to_owned(),
                    id_error,
                }),
            Err(_) => Err(PeerError::Id {
                name: value.to_owned(),
                error: id_error,
            }),
        }
    }

    /// What `--allow VALUE` means: a Tox ID, a public key (64 hex digits), or the key of the
    /// peer of that name.
    pub fn resolve_key(&self, value: &str) -> Result<PublicKey, PeerError> {
        let value = value.trim();
        match value.parse::<fabric::id::PeerRef>() {
            Ok(peer) => Ok(peer.public_key()),
            Err(_) => self.resolve(value).map(|id| id.public_key()),
        }
    }

    /// Every known peer, in the order given.
    pub fn iter(&self) -> impl Iterator<Item = &KnownPeer> {
        self.peers.iter()
    }

    /// Whether no peer is known.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }
}

impl fmt::Display for PeerTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.peers.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{}={}", p.name, p.id.public_key().short())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(byte: u8) -> String {
        ToxId::new(PublicKey([byte; 32]), [0; 4]).to_string()
    }

    #[test]
    fn peers_are_checked_and_found_by_name_or_id() {
        let (a, b) = (id(1), id(2));
        let table = PeerTable::new([("NAS", a.as_str()), ("laptop", b.as_str())]).unwrap();
        assert_eq!(table.resolve("nas").unwrap().to_string(), a);
        assert_eq!(table.resolve("Laptop").unwrap().to_string(), b);
        assert_eq!(
            table.resolve(&a).unwrap().to_string(),
            a,
            "an ID stays an ID"
        );
        assert!(matches!(
            table.resolve("desktop"),
            Err(PeerError::Unknown { value, id_error: IdError::WrongLength { .. } })
                if value == "desktop"
        ));
        // What cannot be a name is a Tox ID with something wrong in it, and said so.
        assert!(matches!(
            table.resolve("1234"),
            Err(PeerError::Id {
                error: IdError::WrongLength { .. },
                ..
            })
        ));
        assert_eq!(
            table.name_of(&PublicKey([2; 32])).map(PeerName::as_str),
            Some("laptop")
        );
        assert_eq!(PeerTable::split_flag("nas=ABC").unwrap(), ("nas", "ABC"));
        assert!(matches!(
            PeerTable::split_flag("nas"),
            Err(PeerError::Form(_))
        ));
    }

    #[test]
    fn bad_or_ambiguous_peer_lists_are_refused() {
        let (a, b) = (id(1), id(2));
        assert!(matches!(
            PeerTable::new([("nas", a.as_str()), ("NAS", b.as_str())]),
            Err(PeerError::DuplicateName(_))
        ));
        assert!(matches!(
            PeerTable::new([("nas", a.as_str()), ("other", a.as_str())]),
            Err(PeerError::DuplicateKey(..))
        ));
        assert!(matches!(
            PeerTable::new([("-nas", a.as_str())]),
            Err(PeerError::Name { .. })
        ));
        assert!(matches!(
            PeerTable::new([("nas", "1234")]),
            Err(PeerError::Id { .. })
        ));
    }
}
