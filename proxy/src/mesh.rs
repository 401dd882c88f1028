//! The node's peers and rights as they live (issue "Pairing", live changes): what the flags
//! and the config file gave at start, changed at run time through the control socket
//! (`proxy peer add|grant|revoke`), and kept in `peers.toml` in the data dir so that the
//! next start finds them.
//!
//! ```toml
//! # peers.toml: written by proxy (mode 0600, atomically) at every change
//! [[peer]]
//! name = "laptop"
//! id = "<76 hex digits>"
//! exit = true
//! share = "22/tcp,8080/tcp"
//! introducer = true           # it may introduce its peers here (and this node to them)
//! origin = "paired"           # config, added, paired or introduced
//! since = 1796000000          # when it was added or paired (the version it is introduced at)
//! introduced-by = "<64 hex>"  # for origin = "introduced": who, and its version
//! version = 1795000000
//!
//! removed = ["<64 hex>"]      # (at the top) peers removed at run time
//! ```
//!
//! At start the file is read after the flags and the config file: a peer it names (same name,
//! same ID) takes the file's rights, which are the newer; a peer only it knows is added; an
//! entry that clashes with the config (one name, two IDs) is skipped with a warning. A peer
//! removed at run time (`proxy peer remove`) stays removed, even if the config names it, until
//! it is added again.
//!
//! Readers take a snapshot ([`Mesh::now`]): a table, its rights and its routes that never
//! change under them; a change builds the next snapshot and swaps it in.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use fabric::id::{PublicKey, ToxId};
use fabric::overlay::PeerName;
use serde::Deserialize;
use tracing::warn;

use crate::peers::{Origin, PeerError, PeerTable};
use crate::rights::RightsTable;
use crate::route::PeerRoutes;
use crate::share::PortSet;

/// The file's name in the data dir.
pub const STORE: &str = "peers.toml";

/// One moment's peers, rights and routes.
#[derive(Debug, Clone)]
pub struct Tables {
    /// The peers by name.
    pub peers: PeerTable,
    /// What each may do here.
    pub rights: RightsTable,
    /// Names and overlay addresses.
    pub routes: Arc<PeerRoutes>,
    /// Peers removed at run time (kept out even if the config names them).
    pub removed: Vec<PublicKey>,
}

/// A change asked for at run time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A new peer (`proxy peer add`).
    Add(PeerName, ToxId),
    /// A new peer by pairing.
    Pair(PeerName, ToxId),
    /// A peer and its rights gone.
    Remove(PeerName),
    /// The peer is this node's introducer.
    GrantIntroducer(PeerName),
    /// The peer is no longer this node's introducer.
    RevokeIntroducer(PeerName),
    /// The exit right.
    GrantExit(PeerName),
    /// Shared ports (added to those it has).
    GrantShare(PeerName, PortSet),
    /// No exit right any more.
    RevokeExit(PeerName),
    /// No shared ports any more.
    RevokeShares(PeerName),
}

/// Why a change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChangeError {
    /// The peer table refused it.
    #[error(transparent)]
    Peer(#[from] PeerError),
    /// No peer of that name.
    #[error("no peer is called {0}")]
    Unknown(PeerName),
    /// An introduction from a peer this node does not take as its introducer.
    #[error("not an introducer of this node")]
    NotIntroducer,
    /// The change could not be kept in the data dir (it was not made).
    #[error("cannot write {0}")]
    Store(String),
}

/// The node's live peers and rights.
#[derive(Debug)]
pub struct Mesh {
    now: RwLock<Arc<Tables>>,
    own: PublicKey,
    /// `peers.toml`, when the node has a data dir.
    store: Option<PathBuf>,
    /// Bumped at every change made at run time.
    changed: tokio::sync::watch::Sender<u64>,
}

impl Default for Mesh {
    /// No peers, no rights, nothing kept: a node that serves nobody.
    fn default() -> Self {
        Self::new(
            PeerTable::default(),
            RightsTable::default(),
            PublicKey([0; 32]),
            None,
        )
    }
}

impl Mesh {
    /// The tables `peers` and `rights` of node `own`, kept in `store` when changed.
    pub fn new(
        peers: PeerTable,
        rights: RightsTable,
        own: PublicKey,
        store: Option<PathBuf>,
    ) -> Self {
        let routes = Arc::new(PeerRoutes::new(peers.clone(), own));
        Self {
            now: RwLock::new(Arc::new(Tables {
                peers,
                rights,
                routes,
                removed: Vec::new(),
            })),
            own,
            store,
            changed: tokio::sync::watch::channel(0).0,
        }
    }

    /// Changes whenever a change made at run time took effect (subscribe, then read
    /// [`Mesh::now`]: no change is missed in between).
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The tables now.
    pub fn now(&self) -> Arc<Tables> {
        self.now.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Adds what `dir`'s `peers.toml` holds to the tables (see the module docs), without
    /// writing it back.
    pub fn load(&self, dir: &Path) -> io::Result<()> {
        let path = dir.join(STORE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            #[serde(default)]
            removed: Vec<String>,
            #[serde(default)]
            peer: Vec<StoredPeer>,
        }
        let file: File = toml::from_str(&text).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {}", path.display(), e.to_string().trim_end()),
            )
        })?;
        let mut lock = self.now.write().unwrap_or_else(|e| e.into_inner());
        let mut tables = (**lock).clone();
        for key in &file.removed {
            let Ok(pk) = key.parse::<PublicKey>() else {
                warn!(%key, "{}: a bad removed key skipped", path.display());
                continue;
            };
            if let Some(p) = tables.peers.remove(&pk) {
                warn!(name = %p.name, "removed at run time (proxy peer remove): not used; \
                    proxy peer add brings it back");
            }
            tables.rights.remove(&pk);
            tables.removed.push(pk);
        }
        for entry in file.peer {
            let parsed = entry
                .name
                .parse::<PeerName>()
                .ok()
                .zip(entry.id.parse::<ToxId>().ok());
            let Some((name, id)) = parsed else {
                warn!(name = %entry.name, "{}: a bad entry skipped", path.display());
                continue;
            };
            let pk = id.public_key();
            let origin = entry.origin();
            match tables.peers.by_name(&name) {
                Some(p) if p.id.public_key() == pk => {}
                Some(_) => {
                    warn!(%name, "{}: another ID than the config's; skipped", path.display());
                    continue;
                }
                None => {
                    if let Err(e) = tables.peers.add_from(name.clone(), id, origin) {
                        warn!(%name, %e, "{}: skipped", path.display());
                        continue;
                    }
                }
            }
            // The file's rights are the newer.
            tables.rights.remove(&pk);
            if entry.exit == Some(true) {
                tables.rights.grant_exit(pk);
            }
            if entry.introducer == Some(true) {
                tables.rights.grant_introduce(pk);
            }
            if let Some(ports) = entry
                .share
                .as_deref()
                .and_then(|p| p.parse::<PortSet>().ok())
            {
                tables.rights.grant_share(pk, &ports);
            }
        }
        tables.routes = Arc::new(PeerRoutes::new(tables.peers.clone(), self.own));
        *lock = Arc::new(tables);
        Ok(())
    }

    /// Makes `change`, keeps the result in the data dir, and returns the new tables. A
    /// change that cannot be kept is not made.
    pub fn change(&self, change: Change) -> Result<Arc<Tables>, ChangeError> {
        let mut lock = self.now.write().unwrap_or_else(|e| e.into_inner());
        let mut tables = (**lock).clone();
        let key_of = |t: &Tables, name: &PeerName| {
            t.peers
                .by_name(name)
                .map(|p| p.id.public_key())
                .ok_or_else(|| ChangeError::Unknown(name.clone()))
        };
        match &change {
            Change::Add(name, id) | Change::Pair(name, id) => {
                let now = unix_now();
                let origin = if matches!(change, Change::Add(..)) {
                    Origin::Added(now)
                } else {
                    Origin::Paired(now)
                };
                tables.peers.add_from(name.clone(), *id, origin)?;
                tables.removed.retain(|k| *k != id.public_key());
            }
            Change::Remove(name) => {
                let pk = key_of(&tables, name)?;
                tables.peers.remove(&pk);
                tables.rights.remove(&pk);
                tables.removed.push(pk);
            }
            Change::GrantIntroducer(name) => {
                let pk = key_of(&tables, name)?;
                tables.rights.grant_introduce(pk);
            }
            Change::RevokeIntroducer(name) => {
                let pk = key_of(&tables, name)?;
                tables.rights.revoke_introduce(&pk);
            }
            Change::GrantExit(name) => {
                let pk = key_of(&tables, name)?;
                tables.rights.grant_exit(pk);
            }
            Change::GrantShare(name, ports) => {
                let pk = key_of(&tables, name)?;
                tables.rights.grant_share(pk, ports);
            }
            Change::RevokeExit(name) => {
                let pk = key_of(&tables, name)?;
                tables.rights.revoke_exit(&pk);
            }
            Change::RevokeShares(name) => {
                let pk = key_of(&tables, name)?;
                tables.rights.revoke_shares(&pk);
            }
        }
        self.commit(&mut lock, tables)
    }

    /// Takes an introduction by `by` (see [`crate::introduce`]); refused unless `by` is this
    /// node's introducer. Returns the peers new to this node.
    pub fn introduce(
        &self,
        by: PublicKey,
        entries: &[fabric::introduction::Introduced],
    ) -> Result<Vec<ToxId>, ChangeError> {
        let mut lock = self.now.write().unwrap_or_else(|e| e.into_inner());
        if !lock.rights.may_introduce(&by) {
            return Err(ChangeError::NotIntroducer);
        }
        let mut tables = (**lock).clone();
        let applied = crate::introduce::apply(&mut tables, &self.own, by, entries);
        if applied.changed {
            self.commit(&mut lock, tables)?;
        }
        Ok(applied.added)
    }

    /// Swaps `tables` in (with fresh routes) once kept in the data dir.
    fn commit(
        &self,
        now: &mut Arc<Tables>,
        mut tables: Tables,
    ) -> Result<Arc<Tables>, ChangeError> {
        tables.routes = Arc::new(PeerRoutes::new(tables.peers.clone(), self.own));
        if let Some(path) = &self.store {
            write_store(path, &tables)
                .map_err(|e| ChangeError::Store(format!("{}: {e}", path.display())))?;
        }
        let tables = Arc::new(tables);
        *now = tables.clone();
        self.changed.send_modify(|n| *n += 1);
        Ok(tables)
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A `[[peer]]` table of `peers.toml`: a config file's, and where the peer came from.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct StoredPeer {
    name: String,
    id: String,
    exit: Option<bool>,
    share: Option<String>,
    introducer: Option<bool>,
    origin: Option<String>,
    since: Option<u64>,
    introduced_by: Option<String>,
    version: Option<u64>,
}

impl StoredPeer {
    fn origin(&self) -> Origin {
        let since = self.since.unwrap_or(0);
        match self.origin.as_deref() {
            Some("added") => Origin::Added(since),
            Some("paired") => Origin::Paired(since),
            Some("introduced") => match self.introduced_by.as_deref().map(str::parse) {
                Some(Ok(by)) => Origin::Introduced {
                    by,
                    version: self.version.unwrap_or(0),
                },
                _ => Origin::Config,
            },
            _ => Origin::Config,
        }
    }
}

/// Writes the tables to `path` atomically, mode 0600.
fn write_store(path: &Path, tables: &Tables) -> io::Result<()> {
    let mut text = String::from(
        "# Written by proxy: its peers as last changed at run time (proxy peer ...).\n",
    );
    if !tables.removed.is_empty() {
        let keys: Vec<String> = tables.removed.iter().map(|k| format!("\"{k}\"")).collect();
        text.push_str(&format!("removed = [{}]\n", keys.join(", ")));
    }
    for p in tables.peers.iter() {
        let rights = tables.rights.of(&p.id.public_key());
        text.push_str(&format!(
            "\n[[peer]]\nname = \"{}\"\nid = \"{}\"\n",
            p.name, p.id
        ));
        if rights.exit {
            text.push_str("exit = true\n");
        }
        if !rights.share.is_empty() {
            text.push_str(&format!("share = \"{}\"\n", rights.share));
        }
        if rights.introduce {
            text.push_str("introducer = true\n");
        }
        match p.origin {
            Origin::Config => {}
            Origin::Added(t) => text.push_str(&format!("origin = \"added\"\nsince = {t}\n")),
            Origin::Paired(t) => text.push_str(&format!("origin = \"paired\"\nsince = {t}\n")),
            Origin::Introduced { by, version } => text.push_str(&format!(
                "origin = \"introduced\"\nintroduced-by = \"{by}\"\nversion = {version}\n"
            )),
        }
    }
    fabric::tox::write_private(path, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use crate::share::Transport;

    use super::*;

    fn id(b: u8) -> ToxId {
        ToxId::new(PublicKey([b; 32]), [0; 4])
    }

    /// A fresh data dir (its `peers.toml` path) and the config's tables: peer nas (key
    /// `[1; 32]`) with the exit right.
    fn fixture(tag: &str) -> (PathBuf, PathBuf, PeerTable, RightsTable) {
        let dir = std::env::temp_dir().join(format!("proxy-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let store = dir.join(STORE);
        let _ = std::fs::remove_file(&store);
        let nas = id(1).to_string();
        let config = PeerTable::new([("nas", nas.as_str())]).unwrap();
        let mut rights = RightsTable::default();
        rights.grant_exit(PublicKey([1; 32]));
        (dir, store, config, rights)
    }

    #[test]
    fn changes_are_kept_and_read_back_over_the_config() {
        let (dir, store, config, rights) = fixture("mesh");
        let mesh = Mesh::new(
            config.clone(),
            rights.clone(),
            PublicKey([9; 32]),
            Some(store.clone()),
        );
        let laptop: PeerName = "laptop".parse().unwrap();
        mesh.change(Change::Add(laptop.clone(), id(2))).unwrap();
        mesh.change(Change::GrantShare(laptop.clone(), "8080".parse().unwrap()))
            .unwrap();
        mesh.change(Change::RevokeExit("nas".parse().unwrap()))
            .unwrap();
        let now = mesh.now();
        assert!(
            now.rights
                .may_reach(&PublicKey([2; 32]), 8080, Transport::Tcp)
        );
        assert!(now.routes.overlay().addrs(&PublicKey([2; 32])).is_some());
        assert_eq!(
            mesh.change(Change::GrantExit("desktop".parse().unwrap()))
                .unwrap_err(),
            ChangeError::Unknown("desktop".parse().unwrap())
        );
        assert!(matches!(
            mesh.change(Change::Add("other".parse().unwrap(), id(2))),
            Err(ChangeError::Peer(PeerError::DuplicateKey(..)))
        ));
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            std::fs::metadata(&store).unwrap().permissions().mode() & 0o777,
            0o600
        );

        // The next start: the config again, then the file, which wins for the rights.
        let again = Mesh::new(config, rights, PublicKey([9; 32]), Some(store.clone()));
        again.load(&dir).unwrap();
        let now = again.now();
        assert!(now.peers.by_name(&laptop).is_some());
        assert!(
            now.rights
                .may_reach(&PublicKey([2; 32]), 8080, Transport::Tcp)
        );
        assert!(
            !now.rights.may_exit(&PublicKey([1; 32])),
            "the revoke was kept"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_removed_peer_stays_removed_over_the_config_until_added_again() {
        let (dir, store, config, rights) = fixture("mesh-rm");
        let start = || {
            let m = Mesh::new(
                config.clone(),
                rights.clone(),
                PublicKey([9; 32]),
                Some(store.clone()),
            );
            m.load(&dir).unwrap();
            m
        };
        let mesh = start();
        let laptop: PeerName = "laptop".parse().unwrap();
        mesh.change(Change::Pair(laptop.clone(), id(2))).unwrap();
        mesh.change(Change::GrantIntroducer(laptop.clone()))
            .unwrap();
        mesh.change(Change::Remove("nas".parse().unwrap())).unwrap();
        let now = mesh.now();
        assert!(now.peers.by_key(&PublicKey([1; 32])).is_none());
        assert!(!now.rights.may_exit(&PublicKey([1; 32])));

        let again = start();
        let now = again.now();
        assert!(
            now.peers.by_key(&PublicKey([1; 32])).is_none(),
            "nas is back"
        );
        assert!(
            !now.rights.may_exit(&PublicKey([1; 32])),
            "nas's right is back"
        );
        let kept = now.peers.by_key(&PublicKey([2; 32])).unwrap();
        assert!(
            matches!(kept.origin, Origin::Paired(t) if t > 0),
            "{kept:?}"
        );
        assert!(now.rights.may_introduce(&PublicKey([2; 32])));

        // Added again by hand: back, and kept so.
        again
            .change(Change::Add("nas".parse().unwrap(), id(1)))
            .unwrap();
        let third = start();
        assert!(third.now().peers.by_key(&PublicKey([1; 32])).is_some());
        assert!(third.now().removed.is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
