//! c-toxcore's UDP socket, so that the tox thread can wait on it.
//!
//! c-toxcore reads its socket only inside `tox_iterate`, and between iterations the thread
//! sleeps for c-toxcore's interval (50 ms when nothing is going on). A packet that arrives on
//! a quiet session therefore waited up to that long on each side: a request and its answer up
//! to 100 ms on a path whose round trip is 2 ms. c-toxcore does not hand out the socket, so
//! the thread finds it itself: the file descriptor of this process whose socket inode
//! `/proc/net/udp6` (or `udp`) lists on the node's UDP port. It only watches the socket for
//! readability (c-toxcore still does all the reading); where it cannot be found (no `/proc`,
//! another system) the thread keeps the interval alone.

use std::os::fd::{AsRawFd, RawFd};

/// A file descriptor c-toxcore owns, watched but never closed by us. It must not outlive the
/// instance that owns it (see `ffi::Instance::watch_udp`).
#[derive(Debug)]
pub(crate) struct Watched(RawFd);

impl AsRawFd for Watched {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// This process's UDP socket bound to `port` (any local address), if `/proc` shows one.
pub(super) fn udp_socket(port: u16) -> Option<Watched> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/udp6", "/proc/net/udp"] {
        if let Ok(text) = std::fs::read_to_string(table) {
            inodes.extend(inodes_on_port(&text, port));
        }
    }
    if inodes.is_empty() {
        return None;
    }
    std::fs::read_dir("/proc/self/fd")
        .ok()?
        .filter_map(Result::ok)
        .find_map(|entry| {
            let fd: RawFd = entry.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(entry.path()).ok()?;
            let inode = socket_inode(target.to_str()?)?;
            inodes.contains(&inode).then_some(Watched(fd))
        })
}

/// The inodes of the sockets of a `/proc/net/udp{,6}` table bound to local port `port`
/// (`sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout
/// inode ...`, the local address as `HEXADDR:HEXPORT`).
fn inodes_on_port(table: &str, port: u16) -> Vec<u64> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (_, local_port) = fields.get(1)?.rsplit_once(':')?;
            let local_port = u16::from_str_radix(local_port, 16).ok()?;
            let inode = fields.get(9)?.parse().ok()?;
            (local_port == port && inode != 0).then_some(inode)
        })
        .collect()
}

/// The inode in a `/proc/self/fd` link target of a socket (`socket:[12345]`).
fn socket_inode(target: &str) -> Option<u64> {
    target
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_socket_on_the_port_is_found_by_its_inode() {
        let udp6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  711: 00000000000000000000000000000000:82A5 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 4711 2 0000000000000000 0
  712: 00000000000000000000000000000000:9C40 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 4712 2 0000000000000000 0
";
        assert_eq!(inodes_on_port(udp6, 33445), vec![4711]);
        assert_eq!(inodes_on_port(udp6, 40000), vec![4712]);
        assert!(inodes_on_port(udp6, 53).is_empty());
        assert!(inodes_on_port("", 33445).is_empty());
        assert_eq!(socket_inode("socket:[4711]"), Some(4711));
        assert_eq!(socket_inode("/dev/null"), None);
        assert_eq!(socket_inode("anon_inode:[eventpoll]"), None);
    }

    #[test]
    fn a_socket_of_this_process_is_found() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = socket.local_addr().unwrap().port();
        if !std::path::Path::new("/proc/net/udp").exists() {
            return;
        }
        let found = udp_socket(port).expect("found through /proc");
        assert_eq!(found.as_raw_fd(), socket.as_raw_fd());
    }
}
