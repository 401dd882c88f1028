//! The host's directly connected networks (its LAN), which TUN mode leaves outside the TUN
//! unless `--tun-lan` asks for them.
//!
//! A printer, a NAS or the router's own page sit on these networks; through an exit they would
//! be refused as private (or, with `--allow-private`, reach whatever host has that address in
//! the exit's LAN). They are read once, when TUN mode starts, from the interfaces' addresses
//! and masks: an interface that comes up later is captured like the Internet.

use std::io;
use std::net::IpAddr;

use crate::exit_policy::Cidr;

/// IPv4 masks shorter than this are not a LAN: they come from routing tricks (a VPN that
/// claims half the Internet with a /1), and leaving them out of the TUN would leave the
/// Internet out.
const MIN_PREFIX_V4: u8 = 8;
/// The same for IPv6 (a /32 is a whole provider).
const MIN_PREFIX_V6: u8 = 32;

/// The connected networks of `addrs` (`(interface, address, prefix length)`), each once, in
/// the order first seen. Left out: the TUN device itself (`tun`), loopback (the kernel's
/// `local` table serves it before any rule of ours), host routes (/32, /128: no neighbour),
/// masks too short to be a LAN, and IPv6 link-local networks (traffic to them is scoped to
/// its interface, so no route could move it into the TUN either way).
pub(crate) fn connected_networks(
    addrs: impl IntoIterator<Item = (String, IpAddr, u8)>,
    tun: &str,
) -> Vec<Cidr> {
    let mut nets: Vec<Cidr> = Vec::new();
    for (dev, ip, prefix) in addrs {
        if dev == tun || ip.is_loopback() {
            continue;
        }
        let net = match ip {
            IpAddr::V4(v4) => {
                if !(MIN_PREFIX_V4..32).contains(&prefix) {
                    continue;
                }
                let mask = u32::MAX << (32 - u32::from(prefix));
                Cidr::new(IpAddr::V4((v4.to_bits() & mask).into()), prefix)
            }
            IpAddr::V6(v6) => {
                if !(MIN_PREFIX_V6..128).contains(&prefix) || v6.is_unicast_link_local() {
                    continue;
                }
                let mask = u128::MAX << (128 - u32::from(prefix));
                Cidr::new(IpAddr::V6((v6.to_bits() & mask).into()), prefix)
            }
        };
        if let Some(net) = net
            && !nets.contains(&net)
        {
            nets.push(net);
        }
    }
    nets
}

/// This host's interface addresses as `(interface, address, prefix length)`.
pub(crate) fn interface_addresses() -> io::Result<Vec<(String, IpAddr, u8)>> {
    Ok(getifaddrs::getifaddrs()?
        .filter_map(|interface| {
            let ip = interface.address.ip_addr()?;
            let prefix = match interface.address.netmask() {
                Some(IpAddr::V4(mask)) => mask.to_bits().leading_ones() as u8,
                Some(IpAddr::V6(mask)) => mask.to_bits().leading_ones() as u8,
                // No mask known: the address alone.
                None => 128,
            };
            let prefix = prefix.min(if ip.is_ipv4() { 32 } else { 128 });
            Some((interface.name, ip, prefix))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(dev: &str, ip: &str, prefix: u8) -> (String, IpAddr, u8) {
        (dev.into(), ip.parse().unwrap(), prefix)
    }

    #[test]
    fn connected_networks_are_the_lans_of_the_other_interfaces() {
        let nets = connected_networks(
            [
                a("lo", "127.0.0.1", 8),
                a("lo", "::1", 128),
                a("eth0", "192.168.1.23", 24),
                a("eth0", "2001:db8:1:2:aaaa::5", 64),
                a("eth0", "fe80::1234", 64),
                // A second address in the same network: listed once.
                a("eth0", "192.168.1.99", 24),
                a("docker0", "172.17.0.1", 16),
                a("wg0", "10.9.0.2", 32),
                a("vpn0", "10.200.0.5", 1),
                a("vpn0", "2001:db8::7", 0),
                a("tun7", "172.19.0.1", 30),
                a("tun7", "fd00:7478::1", 126),
            ],
            "tun7",
        );
        let shown: Vec<String> = nets.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            ["192.168.1.0/24", "2001:db8:1:2::/64", "172.17.0.0/16"]
        );
    }
}
