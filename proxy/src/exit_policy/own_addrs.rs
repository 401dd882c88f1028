//! The networks of this host's own interfaces, which an exit must not dial for its peers.
//!
//! A connection from a host to one of its own addresses goes over `lo`, past firewall rules
//! written for the outside interface: every service bound to `0.0.0.0`/`[::]` would be open
//! to the exit's clients. Tor refuses such destinations the same way
//! (`ExitPolicyRejectMyAddresses`).

use std::io;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::debug;

use super::cidr::Cidr;

/// How old a snapshot may be when a check uses it.
///
/// Re-read on demand rather than by a periodic task or a netlink subscription: the policy
/// layer then needs no task of its own and works wherever a [`PolicyDialer`] is built, an
/// idle exit reads nothing, and a busy one reads at most once a second (one `getifaddrs`,
/// tens of microseconds) instead of once per dial. The cost is that an address added to the
/// host is refused at most this long after it appears.
///
/// [`PolicyDialer`]: super::PolicyDialer
pub const MAX_AGE: Duration = Duration::from_secs(1);

/// IPv4 interface prefixes shorter than this are not taken as the host's neighbourhood, only
/// the address itself: such masks come from routing tricks (point-to-point setups with a
/// wide mask, a VPN that claims everything), and refusing them would refuse the Internet.
const MIN_PREFIX_V4: u8 = 8;
/// The same for IPv6 (a /32 is a whole provider).
const MIN_PREFIX_V6: u8 = 32;

/// The networks of this host's interfaces at one moment: each interface address with its
/// connected prefix (`203.0.113.5/24` stands for `203.0.113.0/24`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnNetworks {
    nets: Vec<Cidr>,
}

impl OwnNetworks {
    /// Networks from `(address, prefix length)` pairs.
    pub fn new(addrs: impl IntoIterator<Item = (IpAddr, u8)>) -> Self {
        let nets = addrs
            .into_iter()
            .filter_map(|(addr, prefix)| {
                let floor = if addr.is_ipv4() {
                    MIN_PREFIX_V4
                } else {
                    MIN_PREFIX_V6
                };
                let prefix = if prefix < floor {
                    if addr.is_ipv4() { 32 } else { 128 }
                } else {
                    prefix
                };
                Cidr::new(addr, prefix)
            })
            .collect();
        Self { nets }
    }

    /// Reads this host's interface addresses (every interface, up or not: an interface that
    /// comes up later brings its addresses with it).
    pub fn read() -> io::Result<Self> {
        let addrs = getifaddrs::getifaddrs()?.filter_map(|interface| {
            let ip = interface.address.ip_addr()?;
            let prefix = match interface.address.netmask() {
                Some(IpAddr::V4(mask)) => mask.to_bits().leading_ones() as u8,
                Some(IpAddr::V6(mask)) => mask.to_bits().leading_ones() as u8,
                // No mask known: the address alone.
                None => 128,
            };
            Some((ip, prefix.min(if ip.is_ipv4() { 32 } else { 128 })))
        });
        Ok(Self::new(addrs))
    }

    /// The first of these networks that contains `ip` (in any of its IPv6 forms, as
    /// [`Cidr::contains`] judges).
    pub fn find(&self, ip: IpAddr) -> Option<&Cidr> {
        self.nets.iter().find(|net| net.contains(ip))
    }
}

/// The host's own networks, re-read when a check finds the last reading older than
/// [`MAX_AGE`].
#[derive(Debug)]
pub struct OwnAddrs {
    source: Source,
    /// The last good reading and when it was taken. A std mutex: held only to swap the
    /// snapshot (and across one `getifaddrs`), never across an await.
    last: Mutex<Option<(Instant, Arc<OwnNetworks>)>>,
}

#[derive(Debug)]
enum Source {
    System,
    Fixed(Arc<OwnNetworks>),
}

/// The host's addresses could not be read, and no earlier reading exists.
#[derive(Debug, thiserror::Error)]
#[error("cannot read this host's own addresses: {0}")]
pub struct OwnAddrsError(#[source] io::Error);

impl OwnAddrs {
    /// This host's interfaces, as they change.
    pub fn system() -> Self {
        Self {
            source: Source::System,
            last: Mutex::new(None),
        }
    }

    /// Always `networks` (tests, and hosts where interfaces cannot be listed).
    pub fn fixed(networks: OwnNetworks) -> Self {
        Self {
            source: Source::Fixed(Arc::new(networks)),
            last: Mutex::new(None),
        }
    }

    /// The networks as of `now`, re-read if the last reading is older than [`MAX_AGE`]. A
    /// failed re-read keeps the previous reading (the addresses rarely change, and refusing
    /// every dial while file descriptors run out would help nobody); with no reading at all
    /// the check fails, so nothing is dialed unchecked.
    pub fn current(&self, now: Instant) -> Result<Arc<OwnNetworks>, OwnAddrsError> {
        if let Source::Fixed(nets) = &self.source {
            return Ok(nets.clone());
        }
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, nets)) = &*last
            && now.saturating_duration_since(*at) < MAX_AGE
        {
            return Ok(nets.clone());
        }
        match OwnNetworks::read() {
            Ok(nets) => {
                let nets = Arc::new(nets);
                *last = Some((now, nets.clone()));
                Ok(nets)
            }
            Err(err) => match &*last {
                Some((_, nets)) => {
                    debug!(%err, "cannot re-read this host's addresses, using the last reading");
                    Ok(nets.clone())
                }
                None => Err(OwnAddrsError(err)),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn interface_addresses_stand_for_their_connected_prefixes() {
        let own = OwnNetworks::new([
            (ip("203.0.113.5"), 24),
            (ip("2a01:4f8:1:2::5"), 64),
            // A point-to-point address with a wide mask: only the address itself.
            (ip("198.51.100.9"), 1),
            (ip("2a01:4f9::9"), 16),
        ]);
        for inside in [
            "203.0.113.5",
            "203.0.113.200",
            "64:ff9b::203.0.113.7",
            "2a01:4f8:1:2::1",
            "2a01:4f8:1:2:ffff::1",
            "198.51.100.9",
            "2a01:4f9::9",
        ] {
            assert!(own.find(ip(inside)).is_some(), "{inside}");
        }
        for outside in ["203.0.114.5", "2a01:4f8:1:3::1", "198.51.100.10", "1.1.1.1"] {
            assert!(own.find(ip(outside)).is_none(), "{outside}");
        }
        assert_eq!(
            own.find(ip("203.0.113.77")).map(ToString::to_string),
            Some("203.0.113.5/24".into())
        );
    }

    #[test]
    fn the_system_reading_has_this_hosts_addresses_and_is_reused_within_max_age() {
        let own = OwnAddrs::system();
        let t0 = Instant::now();
        let first = own.current(t0).unwrap();
        // Every host has loopback.
        assert!(first.find(ip("127.0.0.1")).is_some(), "{first:?}");
        let again = own.current(t0 + MAX_AGE / 2).unwrap();
        assert!(Arc::ptr_eq(&first, &again), "re-read within MAX_AGE");
        let later = own.current(t0 + MAX_AGE).unwrap();
        assert!(!Arc::ptr_eq(&first, &later), "not re-read after MAX_AGE");
    }
}
