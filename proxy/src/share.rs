//! What a node shares with a peer (issue "Mesh"): ports of its own loopback that the peer may
//! reach as `NAME.tox:PORT`, written `--share NAME:PORTS` on the command line.
//!
//! ```text
//!  --share nas:8080            TCP port 8080 of this node, for the peer called nas
//!  --share nas:22,8000-8100    ports and ranges (TCP unless a suffix says otherwise)
//!  --share nas:53/udp          UDP
//!  --share nas:*               every port, TCP and UDP
//! ```
//!
//! A shared port is dialed on this node's loopback (`127.0.0.1`, `[::1]`), so a service bound
//! to localhost can be shared without opening it to the LAN; everything not shared is
//! refused.

use std::fmt;
use std::str::FromStr;

use fabric::overlay::{NameError, PeerName};

/// A transport protocol of a shared port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// TCP (streams).
    Tcp,
    /// UDP (datagrams).
    Udp,
}

/// A set of ports, per protocol: what one `--share` grants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortSet {
    /// Inclusive ranges, in the order given.
    ranges: Vec<(u16, u16, Option<Transport>)>,
}

/// Why a share did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ShareError {
    /// Not `NAME:PORTS`.
    #[error("a share is NAME:PORTS (e.g. nas:8080, nas:22,8000-8100/tcp, nas:53/udp, nas:*)")]
    Form,
    /// The peer's name.
    #[error("bad peer name: {0}")]
    Name(#[from] NameError),
    /// A port that is not a number in 1..=65535, or a range that runs backwards.
    #[error("bad port or range {0:?}: ports are 1-65535, ranges LOW-HIGH")]
    Port(String),
    /// A suffix other than `/tcp` or `/udp`.
    #[error("bad protocol {0:?}: /tcp or /udp")]
    Protocol(String),
}

/// Ranges one share may list: enough for any real use, and a bound on what a config file
/// can make a node hold.
pub const MAX_RANGES: usize = 64;

impl PortSet {
    /// Every port, both protocols.
    pub fn all() -> Self {
        Self {
            ranges: vec![(1, u16::MAX, None)],
        }
    }

    /// Whether `port` over `transport` is in the set.
    pub fn contains(&self, port: u16, transport: Transport) -> bool {
        self.ranges
            .iter()
            .any(|&(lo, hi, t)| (lo..=hi).contains(&port) && t.is_none_or(|t| t == transport))
    }

    /// Whether it grants nothing.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Adds `other`'s ports.
    pub fn extend(&mut self, other: &Self) {
        self.ranges.extend(other.ranges.iter().copied());
    }
}

impl FromStr for PortSet {
    type Err = ShareError;

    fn from_str(s: &str) -> Result<Self, ShareError> {
        if s.trim() == "*" {
            return Ok(Self::all());
        }
        let mut ranges = Vec::new();
        for item in s.split(',') {
            let item = item.trim();
            let (ports, transport) = match item.split_once('/') {
                Some((p, "tcp")) => (p, Some(Transport::Tcp)),
                Some((p, "udp")) => (p, Some(Transport::Udp)),
                Some((_, other)) => return Err(ShareError::Protocol(other.to_owned())),
                None => (item, Some(Transport::Tcp)),
            };
            let port = |p: &str| -> Result<u16, ShareError> {
                match p.parse::<u16>() {
                    Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => Ok(n),
                    _ => Err(ShareError::Port(item.to_owned())),
                }
            };
            let (lo, hi) = match ports.split_once('-') {
                Some((lo, hi)) => (port(lo)?, port(hi)?),
                None if ports == "*" => (1, u16::MAX),
                None => (port(ports)?, port(ports)?),
            };
            if lo > hi {
                return Err(ShareError::Port(item.to_owned()));
            }
            ranges.push((lo, hi, transport));
            if ranges.len() > MAX_RANGES {
                return Err(ShareError::Port(format!("more than {MAX_RANGES} ranges")));
            }
        }
        Ok(Self { ranges })
    }
}

impl fmt::Display for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, &(lo, hi, t)) in self.ranges.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            match (lo, hi) {
                (1, u16::MAX) => f.write_str("*")?,
                (lo, hi) if lo == hi => write!(f, "{lo}")?,
                (lo, hi) => write!(f, "{lo}-{hi}")?,
            }
            match t {
                Some(Transport::Tcp) => f.write_str("/tcp")?,
                Some(Transport::Udp) => f.write_str("/udp")?,
                None => {}
            }
        }
        Ok(())
    }
}

/// One `--share NAME:PORTS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    /// The peer it is for.
    pub peer: PeerName,
    /// What it may reach.
    pub ports: PortSet,
}

impl FromStr for Share {
    type Err = ShareError;

    fn from_str(s: &str) -> Result<Self, ShareError> {
        let (name, ports) = s.split_once(':').ok_or(ShareError::Form)?;
        if ports.is_empty() {
            return Err(ShareError::Form);
        }
        Ok(Self {
            peer: name.parse()?,
            ports: ports.parse()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn shares_read_as_the_flag_documents_them() {
        let s: Share = "NAS:22,8000-8100,53/udp".parse().unwrap();
        assert_eq!(s.peer.as_str(), "nas");
        assert!(s.ports.contains(22, Transport::Tcp));
        assert!(!s.ports.contains(22, Transport::Udp));
        assert!(s.ports.contains(8050, Transport::Tcp));
        assert!(!s.ports.contains(8101, Transport::Tcp));
        assert!(s.ports.contains(53, Transport::Udp));
        assert!(!s.ports.contains(53, Transport::Tcp));
        let all: Share = "nas:*".parse().unwrap();
        assert!(all.ports.contains(1, Transport::Udp) && all.ports.contains(65535, Transport::Tcp));
        assert_eq!(all.ports.to_string(), "*");
        assert_eq!(s.ports.to_string(), "22/tcp,8000-8100/tcp,53/udp");
    }

    #[test]
    fn bad_shares_say_what_is_wrong() {
        assert_eq!("nas".parse::<Share>(), Err(ShareError::Form));
        assert_eq!("nas:".parse::<Share>(), Err(ShareError::Form));
        assert!(matches!("-x:22".parse::<Share>(), Err(ShareError::Name(_))));
        assert_eq!("nas:0".parse::<Share>(), Err(ShareError::Port("0".into())));
        assert_eq!(
            "nas:70000".parse::<Share>(),
            Err(ShareError::Port("70000".into()))
        );
        assert_eq!(
            "nas:9-3".parse::<Share>(),
            Err(ShareError::Port("9-3".into()))
        );
        assert_eq!(
            "nas:+5".parse::<Share>(),
            Err(ShareError::Port("+5".into()))
        );
        assert_eq!(
            "nas:22/sctp".parse::<Share>(),
            Err(ShareError::Protocol("sctp".into()))
        );
        let many = vec!["1"; MAX_RANGES + 1].join(",");
        assert!(matches!(
            format!("nas:{many}").parse::<Share>(),
            Err(ShareError::Port(_))
        ));
    }

    proptest! {
        #[test]
        fn any_text_parses_or_errs_and_what_parses_prints_back(s in "\\PC{0,60}") {
            if let Ok(share) = s.parse::<Share>() {
                let again: PortSet = share.ports.to_string().parse().unwrap();
                prop_assert_eq!(again, share.ports);
            }
        }
    }
}
