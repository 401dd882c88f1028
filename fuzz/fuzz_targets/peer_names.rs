//! Peer names, `.tox` host names, share specs and overlay-address lookups: any text is a
//! name, a share or an error, never a panic; what parses prints back the same; any address
//! looked up in a table of peers finds one of them or none, and so does any name or address
//! a front-end is asked for (`proxy::route`).

#![no_main]

use std::net::IpAddr;

use fabric::id::PublicKey;
use fabric::overlay::{OverlayTable, PeerName, TargetName, is_overlay};
use libfuzzer_sys::fuzz_target;
use proxy::dialer::Target;
use proxy::peers::PeerTable;
use proxy::route::{PeerRoutes, Route};
use proxy::share::{PortSet, Share};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = TargetName::parse(text);
        if let Ok(name) = text.parse::<PeerName>() {
            assert_eq!(name.as_str().parse::<PeerName>().as_ref(), Ok(&name));
        }
        if let Ok(share) = text.parse::<Share>() {
            let again: PortSet = share.ports.to_string().parse().expect("printed ports parse");
            assert_eq!(again, share.ports);
        }
    }
    // The first bytes as keys of a table, the rest as an address to look up.
    let keys: Vec<PublicKey> = data
        .chunks_exact(32)
        .take(8)
        .map(|c| PublicKey(c.try_into().expect("32 bytes")))
        .collect();
    let table = OverlayTable::new(keys.iter().copied());
    let tail = &data[(keys.len() * 32).min(data.len())..];
    let ip = match tail.len() {
        n if n >= 16 => Some(IpAddr::from(<[u8; 16]>::try_from(&tail[..16]).expect("16"))),
        n if n >= 4 => Some(IpAddr::from(<[u8; 4]>::try_from(&tail[..4]).expect("4"))),
        _ => None,
    };
    if let Some(ip) = ip
        && let Some(pk) = table.peer_of(ip)
    {
        assert!(is_overlay(ip));
        assert!(keys.contains(&pk));
    }
    // The same keys as named peers: whatever a front-end is asked for goes to one of them, is
    // refused, or goes on.
    let mut unique = keys.clone();
    unique.sort();
    unique.dedup();
    let ids: Vec<String> = unique
        .iter()
        .map(|pk| fabric::id::ToxId::new(*pk, [0; 4]).to_string())
        .collect();
    let names: Vec<String> = (0..ids.len()).map(|i| format!("p{i}")).collect();
    let peers = PeerTable::new(names.iter().map(String::as_str).zip(ids.iter().map(String::as_str)))
        .expect("distinct keys and names");
    let routes = PeerRoutes::new(peers, PublicKey([0xff; 32]));
    let mut asked = Vec::new();
    if let Some(ip) = ip {
        asked.push(Target::Ip(std::net::SocketAddr::new(ip, 80)));
    }
    if let Ok(text) = std::str::from_utf8(tail) {
        asked.push(Target::Domain(text.to_owned(), 80));
    }
    for target in asked {
        if let Route::Peer(pk, port) = routes.route(&target) {
            assert!(unique.contains(&pk));
            assert_eq!(port, 80);
        }
    }
});
