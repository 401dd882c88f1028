//! Keeping sockets this process did not create itself out of the TUN.
//!
//! With `--exit`, c-toxcore opens the Tox node's UDP and TCP sockets inside the C library:
//! there is no hook to give them `SO_MARK`, and unmarked they would follow the TUN routes
//! and loop back into the proxy. Instead the whole process moves into a cgroup v2 of its own
//! before the Tox node starts (a socket belongs to the cgroup of the task that created it),
//! and an nftables chain marks every packet of a socket in that cgroup:
//!
//! ```text
//!  table inet proxy_tun
//!    chain marking (type route, hook output)  socket cgroupv2 level L "<our cgroup>"
//!                                              meta mark set MARK    ─► re-routed: main table
//!                                              ct mark set MARK
//!                                              ct mark MARK ─► meta mark set MARK
//!                                              (packets the kernel sends for a connection
//!                                              with no full socket behind them: a closed
//!                                              TCP connection's FIN/RST from TIME_WAIT)
//!    chain masq    (type nat, hook postrouting)  marked, source = the TUN's own address
//!                                              ─► masquerade
//! ```
//!
//! A `type route` chain makes the kernel route the packet again once its mark changed, so
//! the routing rule for [`MARK`] sends it to `main`. The first lookup (unmarked) already
//! chose the TUN's address as the source of an unbound socket, and the second lookup keeps
//! it, hence the masquerade. Installing ends with a self-check: a datagram from a fresh
//! socket must hit the marking rule, or TUN mode refuses to start (inside a cgroup
//! namespace the level nftables needs cannot be known).
//!
//! nftables resolves the cgroup path under `/sys/fs/cgroup`, which is not the cgroup v2
//! hierarchy on hybrid hosts, nor mounted at all under `ip netns exec`: every step that
//! touches the hierarchy runs in a private mount namespace (`unshare --mount`) with cgroup2
//! freshly mounted at `/sys/fs/cgroup`, so the host's mounts are never changed.

use std::net::UdpSocket;
use std::process::Command;
use std::time::Duration;

use tracing::{debug, info};

use super::{MARK, TUN_V4, TUN_V6, TunError};

/// The nftables table (one per network namespace, as the routing tables).
const TABLE: &str = "proxy_tun";
/// Prefix of the cgroups this process creates (the pid follows).
const CGROUP_PREFIX: &str = "proxy-tun-";

/// The cgroup and the nftables table; dropping moves the process back and removes both.
#[derive(Debug)]
pub struct OwnSockets {
    parent: String,
    cgroup: String,
}

impl OwnSockets {
    /// Moves this process into a new cgroup and marks its sockets' packets with [`MARK`].
    /// Must run before the sockets to mark are created.
    pub fn install() -> Result<Self, TunError> {
        let parent = own_cgroup()?;
        remove_stale(&parent);
        let pid = std::process::id();
        let cgroup = child_path(&parent, &format!("{CGROUP_PREFIX}{pid}"));
        let level = cgroup.split('/').filter(|s| !s.is_empty()).count();
        in_cgroup_ns(&format!(
            "mkdir -p /sys/fs/cgroup{cgroup} && echo {pid} > /sys/fs/cgroup{cgroup}/cgroup.procs"
        ))?;
        // From here on the guard undoes what was done, also when a later step fails.
        let me = Self { parent, cgroup };
        let _ = exec("nft", &["delete", "table", "inet", TABLE]);
        let rules = format!(
            "table inet {TABLE} {{
                chain marking {{
                    type route hook output priority mangle; policy accept;
                    socket cgroupv2 level {level} \"{path}\" meta mark set {MARK:#x} ct mark set {MARK:#x} counter
                    ct mark {MARK:#x} meta mark set {MARK:#x}
                }}
                chain masq {{
                    type nat hook postrouting priority srcnat; policy accept;
                    meta mark {MARK:#x} ip saddr {v4} masquerade
                    meta mark {MARK:#x} ip6 saddr {v6} masquerade
                }}
            }}",
            path = me.cgroup.trim_start_matches('/'),
            v4 = TUN_V4.0,
            v6 = TUN_V6.0,
        );
        in_cgroup_ns(&format!("nft -f - <<'EOF'\n{rules}\nEOF"))?;
        me.check()?;
        info!(cgroup = %me.cgroup, "own sockets marked through cgroup and nftables");
        Ok(me)
    }

    /// Sends one datagram from a new socket to the discard port on loopback and checks that
    /// the marking rule counted it.
    fn check(&self) -> Result<(), TunError> {
        let fail = |message: String| TunError::Routing {
            command: "marking this process's sockets".into(),
            message,
        };
        let before = self.marked()?;
        let socket = UdpSocket::bind("127.0.0.1:0").map_err(|e| fail(e.to_string()))?;
        socket
            .send_to(b"mark check", "127.0.0.1:9")
            .map_err(|e| fail(e.to_string()))?;
        // The rule runs inside `send_to`; the counter is read by another process.
        for _ in 0..10 {
            if self.marked()? > before {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(fail(format!(
            "nftables did not see this process's packets in cgroup {} \
             (a cgroup namespace?)",
            self.cgroup
        )))
    }

    /// Packets the marking rule has counted.
    fn marked(&self) -> Result<u64, TunError> {
        let out = command("nft", &["list", "chain", "inet", TABLE, "marking"])?;
        Ok(packets(&out).unwrap_or(0))
    }
}

impl Drop for OwnSockets {
    fn drop(&mut self) {
        let _ = exec("nft", &["delete", "table", "inet", TABLE]);
        let pid = std::process::id();
        // The shell doing this was born in the cgroup too: it moves itself out first.
        let _ = in_cgroup_ns(&format!(
            "echo $$ > /sys/fs/cgroup{parent}/cgroup.procs; \
             echo {pid} > /sys/fs/cgroup{parent}/cgroup.procs; rmdir /sys/fs/cgroup{cgroup}",
            parent = if self.parent == "/" { "" } else { &self.parent },
            cgroup = self.cgroup,
        ));
        debug!(cgroup = %self.cgroup, "own-socket marking removed");
    }
}

/// This process's cgroup v2 path (`/` or `/a/b`), from `/proc/self/cgroup`.
fn own_cgroup() -> Result<String, TunError> {
    let text = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| TunError::Routing {
        command: "reading /proc/self/cgroup".into(),
        message: e.to_string(),
    })?;
    parse_cgroup(&text).ok_or_else(|| TunError::Routing {
        command: "reading /proc/self/cgroup".into(),
        message: "no cgroup v2 hierarchy".into(),
    })
}

/// The `0::PATH` line of a `/proc/PID/cgroup` text.
fn parse_cgroup(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim().to_owned())
        .filter(|p| p.starts_with('/'))
}

fn child_path(parent: &str, name: &str) -> String {
    format!("{}/{name}", parent.trim_end_matches('/'))
}

/// Removes empty cgroups left by runs that were killed hard (a cgroup with a live process
/// cannot be removed, so a running proxy keeps its own).
fn remove_stale(parent: &str) {
    let parent = parent.trim_end_matches('/');
    let _ = in_cgroup_ns(&format!(
        "for d in /sys/fs/cgroup{parent}/{CGROUP_PREFIX}*; do [ -d \"$d\" ] && rmdir \"$d\"; done; true"
    ));
}

/// The packet count in `nft list` output.
fn packets(out: &str) -> Option<u64> {
    out.split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
}

/// Runs `script` with `sh` in a private mount namespace where `/sys/fs/cgroup` is the cgroup
/// v2 hierarchy (as this process's cgroup namespace sees it).
fn in_cgroup_ns(script: &str) -> Result<String, TunError> {
    let full = format!("mount -t cgroup2 cgroup2 /sys/fs/cgroup && {{ {script}\n}}");
    command(
        "unshare",
        &["--mount", "--propagation", "private", "sh", "-c", &full],
    )
}

fn command(program: &str, args: &[&str]) -> Result<String, TunError> {
    exec(program, args).map_err(|message| TunError::Routing {
        command: format!("{program} {}", args.join(" ")),
        message,
    })
}

fn exec(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_line() {
        let text = "9:name=systemd:/\n4:memory:/x/y\n0::/user.slice/session-2.scope\n";
        assert_eq!(
            parse_cgroup(text).as_deref(),
            Some("/user.slice/session-2.scope")
        );
        assert_eq!(parse_cgroup("0::/\n").as_deref(), Some("/"));
        assert_eq!(parse_cgroup("4:memory:/x\n"), None);
        assert_eq!(parse_cgroup("0::garbage\n"), None);
    }

    #[test]
    fn child_paths_and_counters() {
        assert_eq!(child_path("/", "proxy-tun-7"), "/proxy-tun-7");
        assert_eq!(child_path("/a/b", "proxy-tun-7"), "/a/b/proxy-tun-7");
        let listing = "table inet proxy_tun {\n chain mark {\n socket cgroupv2 level 1 \
                       \"proxy-tun-7\" meta mark set 0x00007478 counter packets 12 bytes 480\n }\n}";
        assert_eq!(packets(listing), Some(12));
        assert_eq!(packets("counter"), None);
    }
}
