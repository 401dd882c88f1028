//! NAT topologies in network namespaces, for the NAT-matrix tests: two "home" networks, each
//! behind its own NAT router, joined by a "public" namespace that routes between the routers
//! and holds a STUN server (coturn's `turnserver` in STUN-only mode).
//!
//! ```text
//!             public ns: STUN 198.51.100.1:3478 (coturn), forwards between the routers
//!        203.0.113.1/30 │                                   │ 203.0.113.5/30
//!   router a: wan 203.0.113.2  nft NAT            router b: wan 203.0.113.6  nft NAT
//!        192.168.1.1/24 │                                   │ 192.168.2.1/24
//!   home a: 192.168.1.2, default via the router   home b: 192.168.2.2, default via the router
//! ```
//!
//! The mesh tests add a third side, c, wired the same way: 203.0.113.9/30, 192.168.3.0/24.
//!
//! Each side's [`Nat`] decides its router's nftables rules:
//! - [`Nat::Public`]: no NAT and no firewall; the peer runs on the router itself, which has
//!   the public address (a host on the open internet).
//! - [`Nat::Cone`]: `masquerade` (Linux keeps the source port when it can: an
//!   endpoint-independent mapping, port-restricted filtering).
//! - [`Nat::Symmetric`]: `masquerade random,fully-random`: a new random port for every new
//!   destination (endpoint-dependent mapping).
//! - [`Nat::UdpBlocked`]: like `Cone`, and the router drops every UDP packet leaving the home.
//!
//! Every NAT router also drops unsolicited packets arriving on its WAN side (`ct state new`),
//! as home routers do. Besides being realistic this matters for punching: an unanswered inbound
//! probe that the router kept in conntrack would make the router pick another port for our
//! own outgoing mapping to the same peer (a tuple clash), turning a cone NAT symmetric.
//!
//! Everything is removed on drop (also when a test panics): the STUN server is killed and the
//! namespaces deleted, which deletes their links, addresses and nftables rules with them.
//! Every command runs under a timeout.

use std::io;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::netns::{Proc, sh};

/// What kind of NAT a home sits behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    /// No NAT: the peer has a public address.
    Public,
    /// Endpoint-independent mapping (`masquerade`).
    Cone,
    /// A random port per destination (`masquerade random,fully-random`).
    Symmetric,
    /// `Cone`, and all UDP from the home dropped.
    UdpBlocked,
}

/// The STUN server's address in the public namespace.
pub const STUN: &str = "198.51.100.1:3478";

/// Why NAT tests cannot run here, or `None` when they can (root, `ip netns`, `nft`,
/// coturn's `turnserver`).
pub fn unavailable() -> Option<String> {
    for tool in ["nft", "turnserver"] {
        if which(tool).is_none() {
            return Some(format!(
                "no `{tool}` (scripts/setup installs nftables and coturn)"
            ));
        }
    }
    static PROBE: AtomicU32 = AtomicU32::new(0);
    let probe = format!(
        "nat6-probe-{}-{}",
        std::process::id(),
        PROBE.fetch_add(1, Ordering::Relaxed)
    );
    if sh(&["ip", "netns", "add", &probe]).is_err() {
        return Some("cannot create a network namespace (not root?)".into());
    }
    let _ = sh(&["ip", "netns", "del", &probe]);
    None
}

fn which(tool: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// A public namespace, a router and a home per side (two, or more for the mesh); see the
/// module docs. Side `i` is wired as sides a and b are, with `i + 1` where they have 1 and 2.
#[derive(Debug)]
pub struct NatTopology {
    /// The public namespace (STUN server; the place for Tox bootstrap nodes).
    pub public: String,
    routers: Vec<String>,
    homes: Vec<String>,
    kinds: Vec<Nat>,
    stun_server: Option<Child>,
}

impl NatTopology {
    /// Builds the namespaces for sides a and b and starts the STUN server. Names start with
    /// `nat6-` and are unique per process and call.
    pub fn new(a: Nat, b: Nat) -> io::Result<Self> {
        Self::with_sides(&[a, b])
    }

    /// The same with one side per entry of `kinds` (at most 60).
    pub fn with_sides(kinds: &[Nat]) -> io::Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let id = format!(
            "{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let side = |i: usize| char::from(b'a' + i as u8);
        let mut me = Self {
            public: format!("nat6-p-{id}"),
            routers: (0..kinds.len())
                .map(|i| format!("nat6-r{}-{id}", side(i)))
                .collect(),
            homes: (0..kinds.len())
                .map(|i| format!("nat6-h{}-{id}", side(i)))
                .collect(),
            kinds: kinds.to_vec(),
            stun_server: None,
        };
        // From here on, drop removes whatever was made, also on an early return.
        for ns in me.all() {
            sh(&["ip", "netns", "add", &ns])?;
            sh(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        }
        let p = me.public.clone();
        sh(&[
            "ip",
            "-n",
            &p,
            "addr",
            "add",
            "198.51.100.1/32",
            "dev",
            "lo",
        ])?;
        forward(&p)?;
        for i in 0..me.kinds.len() {
            me.side(i)?;
        }
        me.start_stun()?;
        Ok(me)
    }

    fn all(&self) -> Vec<String> {
        let mut v = vec![self.public.clone()];
        v.extend(self.routers.iter().cloned());
        v.extend(self.homes.iter().cloned());
        v
    }

    /// Wires router and home of side `i` (0: a, 1: b) and sets up its NAT.
    fn side(&self, i: usize) -> io::Result<()> {
        let (p, r, h) = (&self.public, &self.routers[i], &self.homes[i]);
        let n = i + 1;
        let wan_p = format!("wan{n}");
        let pub_ip = format!("203.0.113.{}/30", 4 * i + 1);
        let gw = format!("203.0.113.{}", 4 * i + 1);
        let wan_ip = format!("203.0.113.{}/30", 4 * i + 2);
        let lan_ip = format!("192.168.{n}.1/24");
        let lan_gw = format!("192.168.{n}.1");
        let home_ip = format!("192.168.{n}.2/24");
        sh(&[
            "ip", "link", "add", &wan_p, "netns", p, "type", "veth", "peer", "name", "wan",
            "netns", r,
        ])?;
        sh(&["ip", "-n", p, "addr", "add", &pub_ip, "dev", &wan_p])?;
        sh(&["ip", "-n", p, "link", "set", &wan_p, "up"])?;
        sh(&["ip", "-n", r, "addr", "add", &wan_ip, "dev", "wan"])?;
        sh(&["ip", "-n", r, "link", "set", "wan", "up"])?;
        sh(&["ip", "-n", r, "route", "add", "default", "via", &gw])?;
        sh(&[
            "ip", "link", "add", "lan", "netns", r, "type", "veth", "peer", "name", "eth0",
            "netns", h,
        ])?;
        sh(&["ip", "-n", r, "addr", "add", &lan_ip, "dev", "lan"])?;
        sh(&["ip", "-n", r, "link", "set", "lan", "up"])?;
        sh(&["ip", "-n", h, "addr", "add", &home_ip, "dev", "eth0"])?;
        sh(&["ip", "-n", h, "link", "set", "eth0", "up"])?;
        sh(&["ip", "-n", h, "route", "add", "default", "via", &lan_gw])?;
        forward(r)?;
        let masquerade = match self.kinds[i] {
            Nat::Public => return Ok(()),
            Nat::Cone | Nat::UdpBlocked => "masquerade",
            Nat::Symmetric => "masquerade random,fully-random",
        };
        let mut rules = format!(
            "add table ip nat6\n\
             add chain ip nat6 post {{ type nat hook postrouting priority 100; }}\n\
             add rule ip nat6 post oifname wan {masquerade}\n\
             add table inet nat6f\n\
             add chain inet nat6f input {{ type filter hook input priority 0; }}\n\
             add rule inet nat6f input iifname wan ct state new drop\n"
        );
        if self.kinds[i] == Nat::UdpBlocked {
            rules.push_str(
                "add chain inet nat6f forward { type filter hook forward priority 0; }\n\
                 add rule inet nat6f forward iifname lan meta l4proto udp drop\n",
            );
        }
        nft(r, &rules)
    }

    fn start_stun(&mut self) -> io::Result<()> {
        let log = std::env::temp_dir().join(format!("{}.turn.log", self.public));
        let child = Command::new("ip")
            .args(["netns", "exec", &self.public, "turnserver", "--stun-only"])
            .args(["--no-cli", "--no-tls", "--no-dtls", "--simple-log"])
            .args(["-L", "198.51.100.1", "-p", "3478", "--log-file"])
            .arg(&log)
            .arg("--pidfile")
            .arg(std::env::temp_dir().join(format!("{}.turn.pid", self.public)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        self.stun_server = Some(child);
        // Ready once it listens on TCP 3478 (it opens UDP and TCP together).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = sh(&[
                "ip",
                "netns",
                "exec",
                &self.public,
                "ss",
                "-Htln",
                "sport = :3478",
            ])?;
            if !out.stdout.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(io::Error::other("turnserver did not start within 10 s"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The STUN server's address.
    pub fn stun(&self) -> SocketAddr {
        STUN.parse()
            .unwrap_or_else(|_| unreachable!("a valid address"))
    }

    /// The namespace where side `i`'s peer runs: its home, or its router when it is public.
    pub fn peer_ns(&self, i: usize) -> &str {
        match self.kinds[i] {
            Nat::Public => &self.routers[i],
            _ => &self.homes[i],
        }
    }

    /// `args` as a command inside side `i`'s peer namespace.
    pub fn in_peer(&self, i: usize, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.peer_ns(i)]).args(args);
        cmd
    }

    /// A private Tox network of four daemons in the public namespace (`tool` is `nst-tool`):
    /// the process to keep, and the nodes as the homes reach them (`PK@198.51.100.1:PORT`).
    pub fn start_toxnet(&self, tool: &str) -> (Proc, Vec<String>) {
        let toxnet = Proc::spawn(self.in_public(&[tool, "toxnet", "4"]), "ready");
        let public = STUN.split(':').next().unwrap_or_default();
        let nodes: Vec<String> = toxnet
            .ready_list()
            .iter()
            .map(|n| n.replace("127.0.0.1", public))
            .collect();
        assert_eq!(nodes.len(), 4, "{}", toxnet.ready);
        (toxnet, nodes)
    }

    /// `args` as a command inside the public namespace.
    pub fn in_public(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.public]).args(args);
        cmd
    }
}

impl Drop for NatTopology {
    fn drop(&mut self) {
        if let Some(mut child) = self.stun_server.take() {
            // `ip netns exec` execs turnserver, so this is its pid.
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in self.all() {
            let _ = sh(&["ip", "netns", "del", &ns]);
        }
    }
}

fn forward(ns: &str) -> io::Result<()> {
    sh(&[
        "ip",
        "netns",
        "exec",
        ns,
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=1",
    ])
    .map(drop)
}

/// Loads an nftables script into `ns`.
fn nft(ns: &str, script: &str) -> io::Result<()> {
    let file = std::env::temp_dir().join(format!("{ns}.nft"));
    std::fs::write(&file, script)?;
    let file_s = file.to_string_lossy().into_owned();
    let r = sh(&["ip", "netns", "exec", ns, "nft", "-f", &file_s]).map(drop);
    let _ = std::fs::remove_file(&file);
    r
}
