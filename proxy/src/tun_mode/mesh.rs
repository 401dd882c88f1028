//! The peers in TUN mode (issue "Mesh", seed 001): their overlay addresses are routed into
//! the TUN whatever `--tun-route` says, and the TUN's DNS answers `NAME.tox` with them (A and
//! AAAA) without asking any resolver. A flow to an overlay address then reaches the proxy's
//! dialer, which sends it to that peer as a share request (`crate::route`).

use fabric::overlay::{OVERLAY_V6_PREFIX, TargetName};
use netstack::dns::Query;

use crate::route::PeerRoutes;

/// How long applications may keep an overlay address: it never changes while the peer list
/// does not.
const TTL: u32 = 60;

/// The prefixes to route into the TUN for the peers: the project's IPv6 /48 (when the TUN
/// has IPv6) and each known peer's IPv4 address (only those: the rest of 100.64.0.0/10 may
/// be the carrier's or another overlay's).
pub(super) fn overlay_routes(routes: &PeerRoutes, ipv6: bool) -> Vec<String> {
    let mut out: Vec<String> = routes
        .peers()
        .iter()
        .filter_map(|p| routes.overlay().addrs(&p.id.public_key()))
        .filter_map(|a| a.v4)
        .map(|v4| format!("{v4}/32"))
        .collect();
    if ipv6 {
        let mut net = [0u8; 16];
        net[..6].copy_from_slice(&OVERLAY_V6_PREFIX);
        out.push(format!("{}/48", std::net::Ipv6Addr::from(net)));
    }
    out
}

/// What turns the routes `old` into `new`: the prefixes to add, and those to remove (never
/// one of `kept`, the `--tun-route` networks, which stay routed into the TUN anyway).
pub(super) fn route_changes(
    old: &[String],
    new: &[String],
    kept: &[String],
) -> (Vec<String>, Vec<String>) {
    let add = new.iter().filter(|r| !old.contains(r)).cloned().collect();
    let remove = old
        .iter()
        .filter(|r| !new.contains(r) && !kept.contains(r))
        .cloned()
        .collect();
    (add, remove)
}

/// The answer to a DNS query for a name under `.tox`: the peer's overlay addresses for A
/// and AAAA (AAAA only when the TUN has IPv6), "no such name" for a name no known peer has.
/// `None` for any other name (it goes to the resolver as before) or what is no query.
pub(super) fn answer(routes: &PeerRoutes, msg: &[u8], ipv6: bool) -> Option<Vec<u8>> {
    let query = Query::parse(msg).ok()?;
    let peer = match TargetName::parse(&query.name)? {
        Ok(TargetName::Name(name)) => routes.peers().by_name(&name).map(|p| p.id.public_key()),
        Ok(TargetName::Key(pk)) => routes.peers().name_of(&pk).map(|_| pk),
        Err(_) => None,
    };
    let Some(addrs) = peer.and_then(|pk| routes.overlay().addrs(&pk)) else {
        return Some(query.name_error(msg));
    };
    let mut records = Vec::new();
    if let Some(v4) = addrs.v4 {
        records.push(std::net::IpAddr::V4(v4));
    }
    if ipv6 {
        records.push(std::net::IpAddr::V6(addrs.v6));
    }
    Some(query.answer(msg, &records, TTL))
}

#[cfg(test)]
mod tests {
    use fabric::id::{PublicKey, ToxId};
    use netstack::dns::{TYPE_A, TYPE_AAAA};

    use super::*;
    use crate::peers::PeerTable;

    fn query(name: &str, qtype: u16) -> Vec<u8> {
        netstack::dns::query(0x1234, name, qtype)
    }

    fn routes() -> (PeerRoutes, PublicKey) {
        let nas = PublicKey([5; 32]);
        let id = ToxId::new(nas, [0; 4]).to_string();
        let table = PeerTable::new([("nas", id.as_str())]).unwrap();
        (PeerRoutes::new(table, PublicKey([6; 32])), nas)
    }

    /// The addresses of the answer records, in order.
    fn records(answer: &[u8], question_len: usize) -> Vec<Vec<u8>> {
        let count = u16::from_be_bytes([answer[6], answer[7]]);
        let mut at = question_len;
        let mut out = Vec::new();
        for _ in 0..count {
            let len = usize::from(u16::from_be_bytes([answer[at + 10], answer[at + 11]]));
            out.push(answer[at + 12..at + 12 + len].to_vec());
            at += 12 + len;
        }
        out
    }

    #[test]
    fn a_peer_name_gets_its_overlay_addresses_and_an_unknown_one_no_such_name() {
        let (r, nas) = routes();
        let addrs = r.overlay().addrs(&nas).unwrap();
        let q = query("NAS.tox", TYPE_A);
        let a = answer(&r, &q, true).unwrap();
        assert_eq!(a[3] & 0x0f, 0);
        assert_eq!(
            records(&a, q.len()),
            vec![addrs.v4.unwrap().octets().to_vec()]
        );
        let q = query("nas.tox", TYPE_AAAA);
        let a = answer(&r, &q, true).unwrap();
        assert_eq!(records(&a, q.len()), vec![addrs.v6.octets().to_vec()]);
        let a = answer(&r, &q, false).unwrap();
        assert!(
            records(&a, q.len()).is_empty(),
            "no AAAA without IPv6 on the TUN"
        );
        // A key (64 hex digits) or an ID (76) is longer than a DNS label may be (63): such
        // names reach peers by SOCKS and HTTP only, never by a lookup.
        let q = query(&format!("{nas}.tox"), TYPE_A);
        assert!(answer(&r, &q, true).is_none());
        for unknown in ["desktop.tox", "x-.tox"] {
            let a = answer(&r, &query(unknown, TYPE_A), true).unwrap();
            assert_eq!(a[3] & 0x0f, 3, "{unknown}: NXDOMAIN");
        }
        assert!(answer(&r, &query("example.com", TYPE_A), true).is_none());
        assert!(answer(&r, b"not dns", true).is_none());
    }

    #[test]
    fn routes_hold_each_peers_v4_and_the_v6_prefix() {
        let (r, nas) = routes();
        let v4 = r.overlay().addrs(&nas).unwrap().v4.unwrap();
        assert_eq!(
            overlay_routes(&r, true),
            vec![format!("{v4}/32"), "fd74:6f78:7078::/48".to_owned()]
        );
        assert_eq!(overlay_routes(&r, false), vec![format!("{v4}/32")]);
    }

    #[test]
    fn routes_follow_the_peers_and_keep_the_users_networks() {
        let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
        let old = s(&["100.64.0.1/32", "100.64.0.2/32", "fd74:6f78:7078::/48"]);
        let new = s(&["100.64.0.2/32", "100.64.0.3/32", "fd74:6f78:7078::/48"]);
        assert_eq!(
            route_changes(&old, &new, &[]),
            (s(&["100.64.0.3/32"]), s(&["100.64.0.1/32"]))
        );
        // A peer's address that --tun-route names too stays routed when the peer goes.
        assert_eq!(
            route_changes(&old, &new, &s(&["100.64.0.1/32"])),
            (s(&["100.64.0.3/32"]), Vec::new())
        );
        assert_eq!(route_changes(&new, &new, &[]), (Vec::new(), Vec::new()));
    }
}
