//! A running node's live side: the peers it befriends at run time, the invitations it
//! hands out and redeems, the tickets it joins with, and the changes the control socket asks
//! for. The wiring of a node at start (listeners, serving, status) is in the binary.

use std::sync::Arc;
use std::time::Duration;

use fabric::id::ToxId;
use fabric::overlay::PeerName;
use fabric::peer::Fabric;

use crate::exit::FabricDialer;
use crate::mesh::{Change, Mesh, unix_now};

/// Keeps trying to reach `id` until it answers, then hands its session to the dialers that
/// use it (the exits', the peers by name; the session then reconnects by itself).
pub async fn connect_peer(
    fabric: Arc<Fabric>,
    exits: Option<FabricDialer>,
    mesh: crate::route::MeshDialer,
    id: ToxId,
) {
    let mut backoff = Duration::from_secs(1);
    loop {
        match fabric.connect(id).await {
            Ok(peer) => {
                tracing::info!(peer = %id.public_key(), "connected to peer");
                let peer = Arc::new(peer);
                if let Some(exits) = &exits {
                    exits.add_peer(peer.clone());
                }
                mesh.add_peer(peer);
                return;
            }
            Err(fabric::peer::ConnectError::Forgotten) => {
                tracing::debug!(peer = %id.public_key(), "peer removed: not dialed");
                return;
            }
            Err(err) => {
                tracing::warn!(peer = %id.public_key(), %err, "peer not reached yet, retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(60));
            }
        }
    }
}

/// A node's live side, for the control socket: its peers and rights, the fabric that allows
/// and dials a new peer, and the dialers that use the sessions.
#[derive(Debug)]
pub struct Live {
    mesh: Arc<Mesh>,
    fabric: Arc<Fabric>,
    dialer: crate::route::MeshDialer,
    exits: Option<FabricDialer>,
    invitations: crate::pairing::Invitations,
}

impl Live {
    /// The live side of a node whose peers and rights are `mesh`, whose sessions `dialer`
    /// (peers by name) and `exits` (the `--exit` peers) use.
    pub fn new(
        mesh: Arc<Mesh>,
        fabric: Arc<Fabric>,
        dialer: crate::route::MeshDialer,
        exits: Option<FabricDialer>,
        invitations: crate::pairing::Invitations,
    ) -> Self {
        let live = Self {
            mesh,
            fabric,
            dialer,
            exits,
            invitations,
        };
        // Invitations made earlier (or while no node ran) still let their joiners knock at
        // the direct socket.
        live.expect_joins(unix_now());
        live
    }

    /// Opens the direct socket to joiners' hellos for as long as an invitation is open at
    /// `now` (Unix seconds).
    fn expect_joins(&self, now: u64) {
        if let Some(until) = self.invitations.open_until(now) {
            let left = Duration::from_secs(until.saturating_sub(now));
            self.fabric
                .expect_joins_until(std::time::Instant::now() + left);
        }
    }
}

/// This host's name as a peer name, when it is one (what a joiner suggests the inviter call
/// it).
fn host_peer_name() -> Option<PeerName> {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    host.trim().split('.').next()?.parse().ok()
}

/// How long `join` waits for the inviter to say what it gave, once the session is up.
const GRANTS_WAIT: Duration = Duration::from_secs(20);

impl Live {
    /// Lets the peer `id` hold sessions here (a Tox friend, its request accepted) and dials
    /// it: its session comes up from whichever side is first.
    async fn befriend(&self, id: ToxId) -> Result<(), fabric::tox::ToxError> {
        self.fabric.allow(id.public_key()).await?;
        tokio::spawn(connect_peer(
            self.fabric.clone(),
            self.exits.clone(),
            self.dialer.clone(),
            id,
        ));
        Ok(())
    }

    /// `peer remove NAME`: the peer and its rights are gone (kept so in the data dir), and
    /// its session and streams end at once. An `--exit` of the command line stays: the
    /// dialer through it is fixed at start.
    async fn remove(&self, name: &PeerName) -> Result<String, String> {
        let tables = self.mesh.now();
        let pk = tables
            .peers
            .by_name(name)
            .map(|p| p.id.public_key())
            .ok_or_else(|| format!("no peer is called {name}"))?;
        if self.exits.as_ref().is_some_and(|e| e.dials(&pk)) {
            return Err(format!(
                "{name} is an exit of this node (--exit): restart without it to remove it"
            ));
        }
        self.mesh
            .change(Change::Remove(name.clone()))
            .map_err(|e| e.to_string())?;
        self.dialer.remove_peer(&pk);
        self.fabric.forget(pk).await;
        Ok(done(&Change::Remove(name.clone())))
    }

    /// `join TICKET [name=N] [wait=SECS]`: pairs with the inviter; answers once its session
    /// is up and it said what it gives this node.
    async fn join(&self, words: &[&str]) -> Result<String, String> {
        let (text, rest) = words.split_first().ok_or("join: no ticket")?;
        let ticket = fabric::pairing::Ticket::parse(text).map_err(|e| e.to_string())?;
        let (mut name, mut wait) = (ticket.name.clone(), Duration::from_secs(120));
        for w in rest {
            match w.split_once('=') {
                Some(("name", n)) => {
                    name = Some(n.parse().map_err(|e| format!("name {n:?}: {e}"))?)
                }
                Some(("wait", t)) => {
                    wait = Duration::from_secs(t.parse().map_err(|e| format!("wait {t:?}: {e}"))?)
                }
                _ => return Err(format!("join: unknown word {w:?}")),
            }
        }
        let now = unix_now();
        if ticket.expires <= now {
            return Err(format!(
                "the ticket expired {} s ago: ask the inviter for a new one",
                now - ticket.expires
            ));
        }
        let pk = ticket.inviter.public_key();
        if pk == self.fabric.id().public_key() {
            return Err("this is this node's own ticket".into());
        }
        let tables = self.mesh.now();
        if let Some(known) = tables.peers.name_of(&pk) {
            return Err(format!("already paired: the inviter is your peer {known}"));
        }
        let name = tables
            .peers
            .free_name(name.as_ref(), &pk)
            .filter(|n| Some(n) == name.as_ref() || name.is_none())
            .ok_or_else(|| {
                format!(
                    "a peer is called {} already: join with --name OTHER",
                    name.as_ref().map_or("that", PeerName::as_str)
                )
            })?;
        let request =
            fabric::pairing::JoinRequest::new(&ticket, &self.fabric.id(), host_peer_name());
        // Its session must be let in before it answers (it dials back as soon as it accepts).
        self.fabric.allow_sessions(pk);
        // Beside Tox, at the inviter's direct endpoints (if the ticket names any).
        self.fabric
            .join_directly(pk, ticket.endpoints.clone(), &request);
        let asked = self
            .fabric
            .tox()
            .add_friend(ticket.inviter, request.encode().as_bytes())
            .await;
        let connected = match asked {
            Ok(()) => tokio::time::timeout(wait, self.fabric.connect(ticket.inviter))
                .await
                .ok()
                .and_then(Result::ok),
            Err(e) => {
                tracing::debug!(%e, "pairing request not sent");
                None
            }
        };
        let Some(peer) = connected else {
            // Nothing kept: the ticket was refused, or no answer came.
            self.fabric.disallow_sessions(&pk);
            let _ = self.fabric.tox().remove_friend(pk).await;
            return Err(format!(
                "no answer from the inviter within {} s: the ticket was used, revoked or had \
                 expired there, or the inviter is offline",
                wait.as_secs()
            ));
        };
        self.mesh
            .change(Change::Pair(name.clone(), ticket.inviter))
            .map_err(|e| e.to_string())?;
        let contact = match peer.status().opened_direct {
            Some(at) => format!("first contact at its direct endpoint {at}, without Tox"),
            None => "first contact over Tox".to_owned(),
        };
        self.dialer.add_peer(Arc::new(peer));
        // What it gave us, as it says on the session.
        let gives = match tokio::time::timeout(GRANTS_WAIT, self.dialer.grants(pk)).await {
            Ok(Ok(grants)) => crate::status::peers::gives(&grants),
            _ => "(not said yet: see proxy peers)".to_owned(),
        };
        Ok(format!(
            "joined {name}: reachable as {name}.tox ({contact}); it gives this node: {gives}"
        ))
    }
}

/// Accepts pairing requests that redeem one of `live`'s invitations: the joiner becomes a
/// peer (by the name it suggested, when free) with the rights offered, allowed and dialed.
pub async fn accept_joins(live: Arc<Live>) {
    while let Some((pk, request)) = live.fabric.next_join_request().await {
        if live.mesh.now().peers.by_key(&pk).is_some() {
            // Paired already: the same request by the other way (Tox and a direct hello both
            // carry it), or an old ticket of a peer we know.
            tracing::debug!(peer = %pk, "pairing request from a known peer ignored");
            continue;
        }
        let own = live.fabric.id().public_key();
        let offer = match live.invitations.redeem(&request, &pk, &own, unix_now()) {
            Ok(offer) => offer,
            Err(why) => {
                tracing::info!(peer = %pk, %why, "pairing request refused");
                continue;
            }
        };
        let id = ToxId::new(pk, request.nospam);
        let Some(name) = live.mesh.now().peers.free_name(request.name.as_ref(), &pk) else {
            tracing::warn!(peer = %pk, "no free name for a joiner");
            continue;
        };
        if let Err(e) = live.mesh.change(Change::Pair(name.clone(), id)) {
            tracing::warn!(peer = %pk, %e, "joiner not added");
            continue;
        }
        let mut changes = Vec::new();
        if offer.exit {
            changes.push(Change::GrantExit(name.clone()));
        }
        if !offer.share.is_empty() {
            changes.push(Change::GrantShare(name.clone(), offer.share.clone()));
        }
        for change in changes {
            if let Err(e) = live.mesh.change(change) {
                tracing::warn!(peer = %pk, %e, "joiner's right not given");
            }
        }
        match live.befriend(id).await {
            Ok(()) => tracing::info!(peer = %pk, %name, "paired"),
            Err(e) => tracing::warn!(peer = %pk, %e, "joiner not befriended"),
        }
    }
}

/// What `change` did, in the words `proxy peer` prints.
fn done(change: &Change) -> String {
    match change {
        Change::Add(name, _) => format!("peer {name} added: reachable as {name}.tox"),
        Change::Pair(name, _) => format!("peer {name} paired: reachable as {name}.tox"),
        Change::Remove(name) => {
            format!("peer {name} removed: its session and streams ended, and it may hold none here")
        }
        Change::GrantExit(name) => format!("{name} may use this node as its exit"),
        Change::GrantShare(name, ports) => {
            format!("{name} may reach ports {ports} of this host's loopback")
        }
        Change::RevokeExit(name) => format!("{name} may no longer use this node as its exit"),
        Change::RevokeShares(name) => format!("{name} may reach no port of this host"),
        Change::GrantIntroducer(name) => format!(
            "{name} is this node's introducer: it introduces its peers that chose it too (they \
             may do nothing here until granted)"
        ),
        Change::RevokeIntroducer(name) => format!("{name} is no longer this node's introducer"),
    }
}

impl crate::control::Changes for Live {
    fn apply(&self, change: Change) -> crate::dialer::BoxFuture<'_, Result<String, String>> {
        Box::pin(async move {
            if let Change::Remove(name) = &change {
                return self.remove(name).await;
            }
            self.mesh
                .change(change.clone())
                .map_err(|e| e.to_string())?;
            match &change {
                Change::Add(name, id) => {
                    self.befriend(*id)
                        .await
                        .map_err(|e| format!("peer {name} added, but Tox refused it: {e}"))?;
                }
                Change::GrantExit(name)
                | Change::GrantShare(name, _)
                | Change::RevokeExit(name)
                | Change::RevokeShares(name)
                | Change::GrantIntroducer(name)
                | Change::RevokeIntroducer(name) => {
                    // The peer shows what it may do here, and an introducer acts on it.
                    if let Some(p) = self.mesh.now().peers.by_name(name) {
                        let (dialer, pk) = (self.dialer.clone(), p.id.public_key());
                        tokio::spawn(async move {
                            if let Err(e) = dialer.grants_changed(pk).await {
                                tracing::debug!(peer = %pk, %e, "peer not told of its grants");
                            }
                        });
                    }
                }
                Change::Pair(..) | Change::Remove(_) => {}
            }
            Ok(done(&change))
        })
    }

    fn pairing(&self, line: &str) -> crate::dialer::BoxFuture<'_, Result<String, String>> {
        let words: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
        let line = line.to_owned();
        Box::pin(async move {
            let words: Vec<&str> = words.iter().map(String::as_str).collect();
            let endpoints = self.fabric.direct_endpoints(fabric::pairing::MAX_ENDPOINTS);
            let now = unix_now();
            if let Some(answer) = self
                .invitations
                .answer(&words, self.fabric.id(), endpoints, now)
            {
                // A new invitation's joiner may knock at the direct socket before Tox finds us.
                self.expect_joins(now);
                return answer;
            }
            match words.split_first() {
                Some((&"join", rest)) => self.join(rest).await,
                _ => Err(format!("cannot read {line:?}")),
            }
        })
    }
}

/// Introductions, both ways (see [`crate::introduce`]), from what peers told this node
/// (`news`, from the serving side): befriends the peers introduced to it, asks again what a
/// peer gives it when the peer says that changed, and introduces its peers to each other
/// whenever a peer said what it gives (each peer is sent its list when the list changed).
pub async fn introductions(
    live: Arc<Live>,
    mut news: tokio::sync::mpsc::Receiver<crate::exit::PeerNews>,
) {
    let listening = live.clone();
    tokio::spawn(async move {
        // Each piece of news costs one request back at most (no amplification): a peer that
        // repeats it pays as much as this node.
        while let Some(heard) = news.recv().await {
            tokio::spawn(act_on(listening.clone(), heard));
        }
    });
    let mut learned = live.dialer.grants_learned();
    let mut sent: std::collections::HashMap<
        fabric::id::PublicKey,
        Vec<fabric::introduction::Introduced>,
    > = std::collections::HashMap::new();
    while learned.changed().await.is_ok() {
        let tables = live.mesh.now();
        let granted = live.dialer.granted();
        let due: Vec<_> = {
            let granted = granted.lock().unwrap_or_else(|e| e.into_inner());
            tables
                .peers
                .iter()
                .map(|p| p.id.public_key())
                .map(|to| {
                    (
                        to,
                        crate::introduce::introductions_for(&tables, &granted, &to),
                    )
                })
                .filter(|(to, list)| !list.is_empty() && sent.get(to) != Some(list))
                .collect()
        };
        // All at once: a peer whose session is down must not hold up the others.
        let mut sending = tokio::task::JoinSet::new();
        for (to, list) in due {
            let dialer = live.dialer.clone();
            sending.spawn(async move {
                let outcome = tokio::time::timeout(GRANTS_WAIT, dialer.introduce(to, &list)).await;
                (to, list, outcome)
            });
        }
        while let Some(Ok((to, list, outcome))) = sending.join_next().await {
            match outcome {
                Ok(Ok(())) => {
                    tracing::info!(peer = %to, introduced = list.len(), "peers introduced");
                    sent.insert(to, list);
                }
                Ok(Err(e)) => tracing::debug!(peer = %to, %e, "introduction not taken"),
                Err(_) => tracing::debug!(peer = %to, "introduction not answered"),
            }
        }
    }
}

/// Acts on one piece of news from a peer (see [`introductions`]).
async fn act_on(live: Arc<Live>, heard: crate::exit::PeerNews) {
    match heard {
        crate::exit::PeerNews::Introduced(id) => match live.befriend(id).await {
            Ok(()) => tracing::info!(peer = %id.public_key(), "introduced peer befriended"),
            Err(e) => tracing::warn!(peer = %id.public_key(), %e, "introduced peer not befriended"),
        },
        crate::exit::PeerNews::GrantsChanged(pk) => {
            let asked = tokio::time::timeout(GRANTS_WAIT, live.dialer.grants(pk)).await;
            if !matches!(asked, Ok(Ok(_))) {
                tracing::debug!(peer = %pk, "changed grants not asked");
            }
        }
    }
}
