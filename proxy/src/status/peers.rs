//! The peers part of status (issue "Mesh"): every peer this node knows, dials, serves or
//! holds a session with, by name, with its overlay addresses, what it may do here, what this
//! node served it, and its session. `proxy peers` prints it; `proxy status` ends with it.

use std::fmt::Write as _;
use std::sync::Arc;

use fabric::id::PublicKey;
use fabric::overlay::OverlayAddrs;
use fabric::peer::PeerStatus;

use super::{bytes, millis, path_name};
use crate::accounts::{Ledger, PeerAccounts, PeerCounts};
use crate::mesh::Mesh;
use crate::peers::{Origin, PeerTable};
use crate::rights::Rights;
use crate::route::Granted;
use fabric::target::Grants;

/// What the peers part reads from.
#[derive(Debug, Clone)]
pub struct MeshStatus {
    /// The peers: names, overlay addresses, what each may do here (as they are now).
    pub mesh: Arc<Mesh>,
    /// What was served for each.
    pub accounts: Arc<PeerAccounts>,
    /// The peers this node uses as exits.
    pub exits: Vec<PublicKey>,
    /// What each peer said this node may do there.
    pub granted: Granted,
}

/// One peer, as status shows it.
#[derive(Debug, Clone)]
pub struct PeerLine {
    /// Its public key in hex (cut short for clients that may not see keys).
    pub key: String,
    /// Its name here, if it has one.
    pub name: Option<String>,
    /// Where this node learned of it, in words (known peers).
    pub origin: Option<String>,
    /// Its overlay addresses in this node's table (known peers).
    pub overlay: Option<OverlayAddrs>,
    /// What it may do here.
    pub here: Rights,
    /// Whether this node uses it as an exit.
    pub our_exit: bool,
    /// What this node served it, used it for, and refused it.
    pub counts: PeerCounts,
    /// What it lets this node do, as it said (`None`: not asked yet, or no answer).
    pub gives: Option<Grants>,
    /// Its session, if it has a slot in the fabric.
    pub session: Option<PeerStatus>,
}

impl MeshStatus {
    /// A line per peer that is known, has a right, is an exit, was served or has a slot in
    /// the fabric (`sessions`), but was not removed, named peers first, by name, then by key.
    pub fn lines(&self, sessions: &[(PublicKey, PeerStatus)]) -> Vec<PeerLine> {
        let now = self.mesh.now();
        let peers = &now.peers;
        let mut keys: Vec<PublicKey> = peers
            .iter()
            .map(|p| p.id.public_key())
            .chain(now.rights.keys().copied())
            .chain(self.exits.iter().copied())
            .chain(self.accounts.all().into_iter().map(|(k, _)| k))
            .chain(sessions.iter().map(|(k, _)| *k))
            .collect();
        keys.sort();
        keys.dedup();
        // A peer removed at run time is gone from the list, whatever it was served before or
        // its last streams count as they end.
        keys.retain(|k| !now.removed.contains(k));
        let mut lines: Vec<PeerLine> = keys
            .into_iter()
            .map(|pk| PeerLine {
                key: pk.to_string(),
                name: peers.name_of(&pk).map(ToString::to_string),
                origin: peers.by_key(&pk).map(|p| origin_words(&p.origin, peers)),
                overlay: now.routes.overlay().addrs(&pk),
                here: now.rights.of(&pk),
                our_exit: self.exits.contains(&pk),
                counts: self.accounts.of(&pk),
                gives: self
                    .granted
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&pk)
                    .cloned(),
                session: sessions
                    .iter()
                    .find(|(k, _)| *k == pk)
                    .map(|(_, s)| s.clone()),
            })
            .collect();
        lines.sort_by(|a, b| match (&a.name, &b.name) {
            (Some(x), Some(y)) => x.cmp(y),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => a.key.cmp(&b.key),
        });
        lines
    }
}

/// Where a node learned of a peer, in words.
fn origin_words(origin: &Origin, peers: &PeerTable) -> String {
    match origin {
        Origin::Config => "the command line or config file".into(),
        Origin::Added(_) => "added (proxy peer add)".into(),
        Origin::Paired(_) => "paired (invite / join)".into(),
        Origin::Introduced { by, .. } => match peers.name_of(by) {
            Some(name) => format!("introduced by {name}"),
            None => format!("introduced by {}", by.short()),
        },
    }
}

/// What `rights` let a peer do here, in words ("nothing" for none).
pub fn may_here(rights: &Rights) -> String {
    let shares = rights.share.to_string();
    let shares = if rights.share.is_empty() { "" } else { &shares };
    in_words(
        [
            (rights.exit, "use this node as its exit"),
            (
                rights.introduce,
                "introduce its peers (it is this node's introducer)",
            ),
        ],
        shares,
        "reach shared ports",
    )
}

/// What a peer's `grants` let this node do there, in words ("nothing" for none).
pub fn gives(grants: &Grants) -> String {
    in_words(
        [
            (grants.exit, "use it as exit"),
            (grants.introducer, "introduce peers to it (its introducer)"),
        ],
        &grants.shares,
        "reach its ports",
    )
}

fn in_words(flags: [(bool, &str); 2], shares: &str, share_words: &str) -> String {
    let mut parts: Vec<String> = flags
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, words)| (*words).to_owned())
        .collect();
    if !shares.is_empty() {
        parts.push(format!("{share_words} {shares}"));
    }
    if parts.is_empty() {
        "nothing".into()
    } else {
        parts.join(", ")
    }
}

impl PeerLine {
    /// Appends this peer's lines to `out`.
    pub fn text(&self, out: &mut String) {
        let name = self.name.as_deref().unwrap_or("(no name)");
        let exit = if self.our_exit {
            "  (this node's exit)"
        } else {
            ""
        };
        let _ = writeln!(out, "peer {name} {}{exit}", self.key);
        if let Some(o) = &self.overlay {
            let v4 = o.v4.map_or_else(|| "none".into(), |a| a.to_string());
            let moved = if o.v4_choice > 0 {
                format!(" (choice {}: an earlier one was taken)", o.v4_choice)
            } else {
                String::new()
            };
            let _ = writeln!(out, "  overlay {}  {v4}{moved}", o.v6);
        }
        if let Some(origin) = &self.origin {
            let _ = writeln!(out, "  from: {origin}");
        }
        let _ = writeln!(out, "  may here: {}", may_here(&self.here));
        if let Some(g) = &self.gives {
            let _ = writeln!(out, "  gives this node: {}", gives(g));
        }
        let c = &self.counts;
        let ledger = |l: &Ledger| {
            format!(
                "as exit {} streams ({} up, {} down), shared ports {} streams ({} up, {} down)",
                l.exit_streams,
                bytes(l.exit_up),
                bytes(l.exit_down),
                l.share_streams,
                bytes(l.share_up),
                bytes(l.share_down),
            )
        };
        if !c.served.is_empty() || c.refused > 0 {
            let _ = writeln!(
                out,
                "  served: {}, refused {}",
                ledger(&c.served),
                c.refused
            );
        }
        if !c.used.is_empty() {
            let _ = writeln!(out, "  used: {}", ledger(&c.used));
        }
        match &self.session {
            Some(st) if st.conv.is_some() => {
                let _ = writeln!(
                    out,
                    "  session conv {}  path {}  rtt {}  streams {}",
                    st.conv.map(|c| c.to_string()).unwrap_or_default(),
                    path_name(st),
                    millis(st.session.srtt),
                    st.mux.streams
                );
            }
            Some(st) => {
                let _ = writeln!(out, "  session down  tox {}", path_name(st));
            }
            None => {
                let _ = writeln!(out, "  no session");
            }
        }
    }
}

/// The peers part as text.
pub fn text(lines: &[PeerLine]) -> String {
    let mut out = String::new();
    if lines.is_empty() {
        out.push_str("no peers\n");
    }
    for line in lines {
        line.text(&mut out);
    }
    out
}

/// Prometheus samples of what was served and used per peer.
pub fn prometheus(lines: &[PeerLine], out: &mut String) {
    let label = |l: &PeerLine| match &l.name {
        Some(n) => format!("peer=\"{}\",name=\"{n}\"", l.key),
        None => format!("peer=\"{}\"", l.key),
    };
    let sides = |l: &PeerLine| [("served", l.counts.served), ("used", l.counts.used)];
    let _ = writeln!(
        out,
        "# HELP proxy_peer_streams_total Streams with a peer: served (the peer asked) or used \
         (this node asked), by right.\n# TYPE proxy_peer_streams_total counter"
    );
    for l in lines {
        for (side, ledger) in sides(l) {
            for (right, n) in [
                ("exit", ledger.exit_streams),
                ("share", ledger.share_streams),
            ] {
                let _ = writeln!(
                    out,
                    "proxy_peer_streams_total{{{},side=\"{side}\",right=\"{right}\"}} {n}",
                    label(l)
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "# HELP proxy_peer_relayed_bytes_total Bytes of streams with a peer, by side, right and \
         direction (up: toward the target).\n# TYPE proxy_peer_relayed_bytes_total counter"
    );
    for l in lines {
        for (side, g) in sides(l) {
            for (right, dir, n) in [
                ("exit", "up", g.exit_up),
                ("exit", "down", g.exit_down),
                ("share", "up", g.share_up),
                ("share", "down", g.share_down),
            ] {
                let _ = writeln!(
                    out,
                    "proxy_peer_relayed_bytes_total{{{},side=\"{side}\",right=\"{right}\",\
                     direction=\"{dir}\"}} {n}",
                    label(l)
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "# HELP proxy_peer_refused_total Requests of a peer refused for want of a right.\n\
         # TYPE proxy_peer_refused_total counter"
    );
    for l in lines {
        let _ = writeln!(
            out,
            "proxy_peer_refused_total{{{}}} {}",
            label(l),
            l.counts.refused
        );
    }
}
