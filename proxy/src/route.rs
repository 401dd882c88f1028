//! Where a front-end's request goes when it names a peer (issue "Mesh"): `NAME.tox:PORT`,
//! `<76 hex>.tox:PORT`, or a peer's overlay address. Such a request becomes a share request
//! on that peer's session, never a request to an exit or a DNS query; anything else goes on
//! to the mode's dialer (direct, or through exits).
//!
//! ```text
//!  front-end ─► MeshDialer ─┬─ names a known peer ───► that peer's session: Share(port)
//!                           ├─ .tox / fd74:6f78:7078:: but no known peer ─► refused here
//!                           └─ anything else ─────────► the mode's dialer
//! ```
//!
//! `100.64.0.0/10` addresses that are no known peer's pass on: the block is also carrier NAT
//! and other overlays' (Tailscale's), so only our peers' own addresses in it are ours. The
//! project's IPv6 prefix is ours alone: an address in it that is no known peer's is refused.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use fabric::id::PublicKey;
use fabric::overlay::{OverlayTable, TargetName, is_overlay};
use fabric::peer::{Fabric, Peer};
use fabric::target::Grants;
use tokio_util::sync::CancellationToken;

use crate::accounts::PeerAccounts;
use crate::dialer::{BoxFuture, BoxedStream, DialError, Dialer, Target, UdpFlow};
use crate::exit::FabricDialer;
use crate::mesh::Mesh;
use crate::peers::PeerTable;

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// To this known peer's shared port.
    Peer(PublicKey, u16),
    /// Nowhere: it names a peer this node does not know (the reason says which).
    Refused(String),
    /// On to the mode's dialer.
    Onward,
}

/// The peers this node knows, by name, key and overlay address.
#[derive(Debug, Clone)]
pub struct PeerRoutes {
    peers: PeerTable,
    overlay: OverlayTable,
}

impl PeerRoutes {
    /// The routes to the peers of `peers`; `own` is this node's key (its overlay addresses
    /// take part in collisions, as every node's table holds itself).
    pub fn new(peers: PeerTable, own: PublicKey) -> Self {
        let overlay = OverlayTable::new(
            peers
                .iter()
                .map(|p| p.id.public_key())
                .chain(std::iter::once(own)),
        );
        Self { peers, overlay }
    }

    /// Where `target` goes.
    pub fn route(&self, target: &Target) -> Route {
        match target {
            Target::Domain(host, port) => match TargetName::parse(host) {
                None => Route::Onward,
                Some(Err(e)) => Route::Refused(format!("{host}: {e}")),
                Some(Ok(TargetName::Name(name))) => match self.peers.by_name(&name) {
                    Some(p) => Route::Peer(p.id.public_key(), *port),
                    None => Route::Refused(format!(
                        "{host}: no peer is called {name} (add it with --peer {name}=TOXID)"
                    )),
                },
                Some(Ok(TargetName::Key(pk))) => {
                    if self.peers.name_of(&pk).is_some() {
                        Route::Peer(pk, *port)
                    } else {
                        Route::Refused(format!("{host}: not a known peer (--peer NAME=TOXID)"))
                    }
                }
            },
            Target::Ip(addr) => self.route_addr(*addr),
        }
    }

    fn route_addr(&self, addr: SocketAddr) -> Route {
        let ip = match addr.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr.ip(), IpAddr::V4),
            v4 => v4,
        };
        match self.overlay.peer_of(ip) {
            Some(pk) if self.peers.name_of(&pk).is_some() => Route::Peer(pk, addr.port()),
            Some(_) => Route::Refused(format!("{ip} is this node's own overlay address")),
            None if ip.is_ipv6() && is_overlay(ip) => {
                Route::Refused(format!("{ip} is no known peer's overlay address"))
            }
            None => Route::Onward,
        }
    }

    /// The known peers.
    pub fn peers(&self) -> &PeerTable {
        &self.peers
    }

    /// The overlay addresses of this node and its peers.
    pub fn overlay(&self) -> &OverlayTable {
        &self.overlay
    }
}

/// Sends requests that name a peer to that peer's session, the rest to `onward`. Clones share
/// the peers' sessions. The peers are the node's live [`Mesh`]: one added at run time is
/// reachable at once.
#[derive(Debug, Clone)]
pub struct MeshDialer {
    mesh: Arc<Mesh>,
    /// One dialer per known peer, made when first needed: it holds a request while the
    /// peer's session comes up.
    links: Arc<std::sync::Mutex<HashMap<PublicKey, (FabricDialer, CancellationToken)>>>,
    onward: Arc<dyn Dialer>,
    /// What each peer said this node may do there (asked on each new session).
    granted: Granted,
    /// Bumped whenever a peer said it.
    learned: Arc<tokio::sync::watch::Sender<u64>>,
    fabric: Arc<Fabric>,
    connect_timeout: std::time::Duration,
    books: Arc<PeerAccounts>,
}

/// What each peer lets this node do there, as it last said.
pub type Granted = Arc<std::sync::Mutex<HashMap<PublicKey, Grants>>>;

/// Keeps what `pk` said it gives this node, and wakes whoever follows that.
fn learn(
    granted: &Granted,
    learned: &tokio::sync::watch::Sender<u64>,
    pk: PublicKey,
    grants: Grants,
) {
    lock(granted).insert(pk, grants);
    learned.send_modify(|n| *n += 1);
}

impl MeshDialer {
    /// A dialer over `mesh`'s peers, through `fabric`'s sessions (hand each over with
    /// [`MeshDialer::add_peer`] when it comes up), in front of `onward`; streams to the peers
    /// are counted in `books`.
    pub fn new(
        mesh: Arc<Mesh>,
        fabric: Arc<Fabric>,
        connect_timeout: std::time::Duration,
        onward: Arc<dyn Dialer>,
        books: Arc<PeerAccounts>,
    ) -> Self {
        let me = Self {
            mesh,
            links: Arc::default(),
            onward,
            granted: Granted::default(),
            learned: Arc::new(tokio::sync::watch::channel(0).0),
            fabric,
            connect_timeout,
            books,
        };
        for p in me.mesh.now().peers.iter() {
            me.link(p.id.public_key());
        }
        me
    }

    /// The dialer for `pk`, made (following the fabric's sessions and asking the peer's
    /// grants on each) if it is the first time.
    fn link(&self, pk: PublicKey) -> FabricDialer {
        let mut links = lock(&self.links);
        if let Some((link, _)) = links.get(&pk) {
            return link.clone();
        }
        let link = FabricDialer::new(self.connect_timeout, [pk]).with_accounts(self.books.clone());
        // Its tasks end when the peer is removed.
        let stop = CancellationToken::new();
        links.insert(pk, (link.clone(), stop.clone()));
        tokio::spawn(
            stop.clone()
                .run_until_cancelled_owned(link.follow_sessions(&self.fabric)),
        );
        let (granted, asker, learned) = (self.granted.clone(), link.clone(), self.learned.clone());
        let mut changes = self.fabric.session_changes();
        tokio::spawn(stop.run_until_cancelled_owned(async move {
            loop {
                // Held until the session is up (bounded by the connect timeout).
                match asker.grants().await {
                    Ok(g) => learn(&granted, &learned, pk, g),
                    Err(err) => tracing::debug!(peer = %pk, %err, "no grants"),
                }
                if changes.changed().await.is_err() {
                    return;
                }
            }
        }));
        link
    }

    /// Forgets the peer `pk` (removed): its dialer, and what it said it gives.
    pub fn remove_peer(&self, pk: &PublicKey) {
        if let Some((_, stop)) = lock(&self.links).remove(pk) {
            stop.cancel();
        }
        lock(&self.granted).remove(pk);
    }

    /// What `pk` lets this node do there, asked now (once its session is up), and kept with
    /// what the others said.
    pub async fn grants(&self, pk: PublicKey) -> Result<Grants, DialError> {
        let grants = self.link(pk).grants().await?;
        learn(&self.granted, &self.learned, pk, grants.clone());
        Ok(grants)
    }

    /// What each peer said this node may do there.
    pub fn granted(&self) -> Granted {
        self.granted.clone()
    }

    /// Changes whenever a peer said what it gives this node.
    pub fn grants_learned(&self) -> tokio::sync::watch::Receiver<u64> {
        self.learned.subscribe()
    }

    /// Tells the peer `pk` that what this node grants it changed (it asks again), once its
    /// session is up.
    pub async fn grants_changed(&self, pk: PublicKey) -> Result<(), DialError> {
        self.link(pk).grants_changed().await
    }

    /// Introduces `entries` to the peer `to` (see [`crate::introduce`]), once its session
    /// is up.
    pub async fn introduce(
        &self,
        to: PublicKey,
        entries: &[fabric::introduction::Introduced],
    ) -> Result<(), DialError> {
        self.link(to).introduce(entries).await
    }

    /// The same peers in front of another dialer (the listeners' dialer for clients from
    /// elsewhere, the TUN's).
    pub fn in_front_of(&self, onward: Arc<dyn Dialer>) -> Self {
        Self {
            onward,
            ..self.clone()
        }
    }

    /// Makes the session to `peer` carry requests for it.
    pub fn add_peer(&self, peer: Arc<Peer>) {
        self.link(peer.public_key()).add_peer(peer);
    }

    /// A round trip to the peer whose overlay address is `ip`; `None` when `ip` is no known
    /// peer's.
    pub async fn ping(&self, ip: IpAddr) -> Option<Result<(), DialError>> {
        let route = self
            .mesh
            .now()
            .routes
            .route(&Target::Ip(SocketAddr::new(ip, 0)));
        let Route::Peer(pk, _) = route else {
            return None;
        };
        Some(self.link(pk).ping().await)
    }

    /// The peers it follows.
    pub fn mesh(&self) -> &Arc<Mesh> {
        &self.mesh
    }
}

impl Dialer for MeshDialer {
    fn connect(&self, target: Target) -> BoxFuture<'_, Result<BoxedStream, DialError>> {
        match self.mesh.now().routes.route(&target) {
            Route::Onward => self.onward.connect(target),
            Route::Refused(why) => Box::pin(async move { Err(DialError::Resolve(why)) }),
            Route::Peer(pk, port) => {
                let link = self.link(pk);
                Box::pin(async move { link.open_share(port).await })
            }
        }
    }

    fn udp_associate(&self) -> BoxFuture<'_, Result<Box<dyn UdpFlow>, DialError>> {
        Box::pin(async {
            let inner = self.onward.udp_associate().await?;
            Ok(Box::new(MeshUdpFlow {
                mesh: self.mesh.clone(),
                inner,
            }) as Box<dyn UdpFlow>)
        })
    }

    fn resolver(&self) -> Option<BoxFuture<'_, Result<BoxedStream, DialError>>> {
        self.onward.resolver()
    }

    fn resolver_with(
        &self,
        first: Vec<u8>,
    ) -> Option<BoxFuture<'_, Result<BoxedStream, DialError>>> {
        self.onward.resolver_with(first)
    }
}

/// A UDP flow that never sends a datagram meant for a peer onward (to an exit or the
/// Internet): UDP shares are not carried yet, so such datagrams are dropped here.
#[derive(Debug)]
struct MeshUdpFlow {
    mesh: Arc<Mesh>,
    inner: Box<dyn UdpFlow>,
}

impl UdpFlow for MeshUdpFlow {
    fn send_to<'a>(
        &'a self,
        payload: &'a [u8],
        target: &'a Target,
    ) -> BoxFuture<'a, Result<(), DialError>> {
        match self.mesh.now().routes.route(target) {
            Route::Onward => self.inner.send_to(payload, target),
            Route::Refused(why) => Box::pin(async move { Err(DialError::Resolve(why)) }),
            Route::Peer(..) => Box::pin(async move {
                Err(DialError::PolicyDenied(format!(
                    "{target}: UDP to peers is not carried (TCP shares only)"
                )))
            }),
        }
    }

    fn recv_from<'a>(
        &'a self,
        buf: &'a mut [u8],
    ) -> BoxFuture<'a, std::io::Result<(usize, SocketAddr)>> {
        self.inner.recv_from(buf)
    }
}

#[cfg(test)]
mod tests {
    use fabric::id::ToxId;
    use fabric::overlay::overlay_v6;

    use super::*;

    fn routes() -> (PeerRoutes, PublicKey, PublicKey) {
        let (nas, own) = (PublicKey([7; 32]), PublicKey([9; 32]));
        let id = ToxId::new(nas, [0; 4]).to_string();
        let peers = PeerTable::new([("nas", id.as_str())]).unwrap();
        (PeerRoutes::new(peers, own), nas, own)
    }

    #[test]
    fn names_and_overlay_addresses_of_known_peers_go_to_them() {
        let (r, nas, _) = routes();
        let by_name = Target::Domain("NAS.tox".into(), 8080);
        assert_eq!(r.route(&by_name), Route::Peer(nas, 8080));
        let by_key = Target::Domain(format!("{nas}.tox"), 22);
        assert_eq!(r.route(&by_key), Route::Peer(nas, 22));
        let v6 = SocketAddr::new(overlay_v6(&nas).into(), 80);
        assert_eq!(r.route(&Target::Ip(v6)), Route::Peer(nas, 80));
        let v4 = r.overlay().addrs(&nas).unwrap().v4.unwrap();
        assert_eq!(
            r.route(&Target::Ip(SocketAddr::new(v4.into(), 443))),
            Route::Peer(nas, 443)
        );
    }

    #[test]
    fn unknown_peers_are_refused_here_and_the_rest_goes_on() {
        let (r, _, own) = routes();
        for host in ["desktop.tox", "-bad.tox", "desktop.tox."] {
            assert!(
                matches!(r.route(&Target::Domain(host.into(), 80)), Route::Refused(_)),
                "{host}"
            );
        }
        let stranger = SocketAddr::new(overlay_v6(&PublicKey([1; 32])).into(), 80);
        assert!(matches!(r.route(&Target::Ip(stranger)), Route::Refused(_)));
        let me = SocketAddr::new(overlay_v6(&own).into(), 80);
        assert!(matches!(r.route(&Target::Ip(me)), Route::Refused(_)));
        for onward in [
            Target::Domain("example.com".into(), 443),
            Target::Domain("tox.example".into(), 443),
            Target::Ip("100.64.0.1:80".parse().unwrap()),
            Target::Ip("192.0.2.1:80".parse().unwrap()),
        ] {
            assert_eq!(r.route(&onward), Route::Onward, "{onward:?}");
        }
    }
}
