//! Peer names, `.tox` host names, share specs and overlay-address lookups: any text is a
//! name, a share or an error, never a panic; what parses prints back the same; any address
//! looked up in a table of peers finds one of them or none.

#![no_main]

use std::net::IpAddr;

use fabric::id::PublicKey;
use fabric::overlay::{OverlayTable, PeerName, TargetName, is_overlay};
use libfuzzer_sys::fuzz_target;
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
});
