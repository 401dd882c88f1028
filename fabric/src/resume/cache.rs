//! What a node remembers about its peers between runs: the direct endpoints where each
//! answered a handshake last, and the port of our own direct socket (so that a restarted node
//! is found where it was). Nothing secret: the keys that authenticate a resume are the Tox
//! identities. The file is a cache: losing it, or finding it stale, only costs a start over
//! Tox.
//!
//! ```text
//! # proxy peer cache (direct endpoints that worked); safe to delete
//! port 40123
//! peer <64 hex digits of the public key> <unix seconds of the last success> <addr>...
//! ```
//!
//! Parsing keeps what it understands and skips the rest: a damaged line costs that peer's
//! entry, never the start.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;

use crate::id::PublicKey;

/// Endpoints kept per peer, newest first.
pub const MAX_ENDPOINTS: usize = 4;
/// Peers kept; beyond, the least recently successful are forgotten.
pub const MAX_PEERS: usize = 1024;

/// One peer's entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Entry {
    /// When a handshake with it last succeeded, Unix seconds.
    pub seen: u64,
    /// Where, newest first.
    pub endpoints: Vec<SocketAddr>,
}

/// The whole cache.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerCache {
    /// Our direct socket's port in the last run.
    pub port: Option<u16>,
    /// Per peer.
    pub peers: BTreeMap<PublicKey, Entry>,
}

impl PeerCache {
    /// Reads a cache file's text; returns it and how many lines were skipped.
    pub fn parse(text: &str) -> (Self, usize) {
        let mut cache = Self::default();
        let mut skipped = 0;
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut words = line.split_ascii_whitespace();
            let ok = match words.next() {
                Some("port") => match words.next().and_then(|p| p.parse().ok()) {
                    Some(p) if p != 0 && words.next().is_none() => {
                        cache.port = Some(p);
                        true
                    }
                    _ => false,
                },
                Some("peer") => match parse_peer(words) {
                    Some((pk, entry)) if cache.peers.len() < MAX_PEERS => {
                        cache.peers.insert(pk, entry);
                        true
                    }
                    _ => false,
                },
                _ => false,
            };
            if !ok {
                skipped += 1;
            }
        }
        (cache, skipped)
    }

    /// The file's text.
    pub fn emit(&self) -> String {
        let mut out =
            String::from("# proxy peer cache (direct endpoints that worked); safe to delete\n");
        if let Some(port) = self.port {
            let _ = writeln!(out, "port {port}");
        }
        for (pk, entry) in &self.peers {
            let _ = write!(out, "peer {} {}", hex(&pk.0), entry.seen);
            for e in &entry.endpoints {
                let _ = write!(out, " {e}");
            }
            out.push('\n');
        }
        out
    }

    /// Records that `pk` answered at `endpoint` at `now` (Unix seconds); `true` if anything
    /// changed that is worth writing.
    pub fn record(&mut self, pk: PublicKey, endpoint: SocketAddr, now: u64) -> bool {
        let entry = self.peers.entry(pk).or_default();
        let changed = entry.endpoints.first() != Some(&endpoint);
        entry.endpoints.retain(|e| *e != endpoint);
        entry.endpoints.insert(0, endpoint);
        entry.endpoints.truncate(MAX_ENDPOINTS);
        // A minute's precision is plenty for "when did this last work", and spares a write
        // for every keepalive.
        let stale = now.saturating_sub(entry.seen) >= 60;
        entry.seen = entry.seen.max(now);
        if self.peers.len() > MAX_PEERS
            && let Some(oldest) = self
                .peers
                .iter()
                .filter(|(k, _)| **k != pk)
                .min_by_key(|(_, e)| e.seen)
                .map(|(k, _)| *k)
        {
            self.peers.remove(&oldest);
        }
        changed || stale
    }

    /// The endpoints to try for `pk`, newest first.
    pub fn endpoints(&self, pk: &PublicKey) -> &[SocketAddr] {
        self.peers.get(pk).map_or(&[], |e| &e.endpoints)
    }
}

fn parse_peer<'a>(mut words: impl Iterator<Item = &'a str>) -> Option<(PublicKey, Entry)> {
    let pk = unhex(words.next()?)?;
    let seen = words.next()?.parse().ok()?;
    let mut endpoints = Vec::new();
    for w in words {
        let addr: SocketAddr = w.parse().ok()?;
        if addr.port() == 0 || addr.ip().is_unspecified() || endpoints.contains(&addr) {
            return None;
        }
        endpoints.push(addr);
    }
    if endpoints.is_empty() || endpoints.len() > MAX_ENDPOINTS {
        return None;
    }
    Some((PublicKey(pk), Entry { seen, endpoints }))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_cache_reads_back_what_it_wrote_and_skips_damaged_lines() {
        let mut c = PeerCache {
            port: Some(40123),
            ..PeerCache::default()
        };
        let a = PublicKey([0xab; 32]);
        assert!(c.record(a, "192.0.2.7:4000".parse().unwrap(), 1000));
        assert!(c.record(a, "[2001:db8::1]:4001".parse().unwrap(), 1001));
        // The same first endpoint within the minute: nothing worth writing.
        assert!(!c.record(a, "[2001:db8::1]:4001".parse().unwrap(), 1030));
        let text = c.emit();
        assert_eq!(PeerCache::parse(&text), (c.clone(), 0));
        assert_eq!(
            c.endpoints(&a),
            [
                "[2001:db8::1]:4001".parse().unwrap(),
                "192.0.2.7:4000".parse().unwrap()
            ]
        );
        let damaged = format!(
            "{text}peer zz 1 1.2.3.4:5\nport 0\nport x\nnonsense\npeer {} 5\n",
            hex(&[1; 32])
        );
        assert_eq!(PeerCache::parse(&damaged), (c, 5));
    }

    #[test]
    fn endpoints_are_bounded_newest_first() {
        let mut c = PeerCache::default();
        let a = PublicKey([1; 32]);
        for port in 1..=10u16 {
            c.record(a, SocketAddr::from(([192, 0, 2, 1], port)), u64::from(port));
        }
        let ports: Vec<u16> = c.endpoints(&a).iter().map(SocketAddr::port).collect();
        assert_eq!(ports, [10, 9, 8, 7]);
    }

    proptest! {
        #[test]
        fn parsing_any_text_never_panics(text in ".{0,400}") {
            let (c, _) = PeerCache::parse(&text);
            prop_assert!(c.peers.len() <= MAX_PEERS);
            // What parsed re-parses the same.
            prop_assert_eq!(PeerCache::parse(&c.emit()), (c, 0));
        }
    }
}
