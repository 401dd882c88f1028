//! The command line (the contract in ARCHITECTURE.md "Command line").
//!
//! ```text
//! proxy [--socks ADDR|off] [--http ADDR|off] [--exit TOXID]... [--tun] [--config FILE]
//!       [--data-dir DIR] [--bootstrap PK@HOST:PORT]... [--no-public-bootstrap] [...]
//! proxy exit [--allow TOXID|PK]... [--allow-any] [--allow-private] [...]
//! proxy id [--data-dir DIR]
//! ```
//! Every flag has a key of the same name in the `--config` file (see [`crate::config`]);
//! flags given on the command line win over the file.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

use clap::{ArgAction, Args, Parser, Subcommand};
use fabric::path::PathChoice;

use crate::exit_policy::{Cidr, PortRange};

/// Route your traffic through a peer you trust.
///
/// Without `--exit`, proxy is a plain local SOCKS5 and HTTP proxy whose connections leave
/// directly from this host.
#[derive(Debug, Parser)]
#[command(name = "proxy", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// Run an exit, or print this node's Tox ID.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// The client role (when no subcommand is given).
    #[command(flatten)]
    pub run: RunArgs,
    /// More logging: -v debug, -vv trace (RUST_LOG, when set, wins).
    #[arg(short, long, action = ArgAction::Count, global = true)]
    pub verbose: u8,
}

/// The subcommands.
// Parsed once per process: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve as an exit for the peers you allow.
    Exit(ExitArgs),
    /// Print this node's Tox ID (creating the identity if missing).
    Id(IdArgs),
    /// Show a running proxy's exits, paths, round-trip times, loss, streams and bytes.
    Status(StatusArgs),
    /// List a running proxy's peers: names, keys, overlay addresses, what each may do there,
    /// what it served them, their sessions.
    Peers(StatusArgs),
    /// Change the running proxy's peers and their rights at once (kept in its data dir).
    Peer(PeerArgs),
    /// Print a one-time ticket (its last line) that pairs another node with the running one.
    Invite(InviteArgs),
    /// Pair the running proxy with the node whose ticket this is.
    Join(JoinArgs),
}

/// `proxy invite`.
#[derive(Debug, Args, Clone)]
pub struct InviteArgs {
    /// The name this node suggests the joiner call it (NAME.tox there).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// The joiner may use this node as its exit.
    #[arg(long)]
    pub exit: bool,
    /// Ports of this host's loopback the joiner may reach: 8080, 22,8000-8100, *.
    #[arg(long, value_name = "PORTS")]
    pub share: Option<String>,
    /// How long the ticket is valid: 600, 90s, 10m, 2h [default: 10m].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub ttl: Option<u64>,
    /// List the open invitations instead.
    #[arg(long, conflicts_with_all = ["name", "exit", "share", "ttl", "revoke"])]
    pub list: bool,
    /// Revoke the invitation with this id instead.
    #[arg(long, value_name = "ID", conflicts_with_all = ["name", "exit", "share", "ttl"])]
    pub revoke: Option<String>,
    /// The running node's data dir [default: as `proxy id`'s].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Settings file (only its `data-dir` matters here).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// `proxy join`.
#[derive(Debug, Args, Clone)]
pub struct JoinArgs {
    /// The ticket `proxy invite` printed.
    pub ticket: String,
    /// What to call the inviter (NAME.tox) [default: the name the ticket suggests].
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// How long to wait for the inviter, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    pub wait: u64,
    /// The running node's data dir [default: as `proxy id`'s].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Settings file (only its `data-dir` matters here).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// Reads a duration in seconds: `600`, `90s`, `10m`, `2h`, `1d`.
pub fn parse_duration(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (number, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => text.split_at(at),
        None => (text, "s"),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?}: a number and s, m, h or d"))?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{text:?}: the unit is s, m, h or d")),
    };
    n.checked_mul(scale)
        .filter(|&s| s > 0)
        .ok_or_else(|| format!("{text:?}: out of range"))
}

/// `proxy peer`.
#[derive(Debug, Args, Clone)]
pub struct PeerArgs {
    /// The change.
    #[command(subcommand)]
    pub change: PeerChange,
    /// The running node's data dir [default: as `proxy id`'s].
    #[arg(long, value_name = "DIR", global = true)]
    pub data_dir: Option<PathBuf>,
    /// Settings file (only its `data-dir` matters here).
    #[arg(long, value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,
}

/// What `proxy peer` changes.
#[derive(Debug, Subcommand, Clone)]
pub enum PeerChange {
    /// Know a peer by name: it may hold a session and is reachable as NAME.tox (it may do
    /// nothing here until granted).
    Add {
        /// Its name (a DNS label).
        name: String,
        /// Its Tox ID.
        id: String,
    },
    /// Forget a peer: its rights go, its session and streams end at once, and it may hold
    /// no session here (kept so across restarts, even if the config file names it, until it
    /// is added again).
    Remove {
        /// Its name.
        name: String,
    },
    /// Give a peer a right: `exit` (it may use this node as its exit), `share PORTS`
    /// (it may reach these ports of this host's loopback) or `introducer` (it may introduce
    /// its peers that chose it too, and this node to them).
    Grant {
        /// The peer's name.
        name: String,
        /// `exit`, `share` or `introducer`.
        right: String,
        /// For `share`: 8080, 22,8000-8100, 53/udp, *.
        ports: Option<String>,
    },
    /// Take a right back: `exit`, `introducer`, or `share` (every shared port).
    Revoke {
        /// The peer's name.
        name: String,
        /// `exit`, `share` or `introducer`.
        right: String,
    },
}

impl PeerChange {
    /// The control socket's request line.
    pub fn request(&self) -> String {
        match self {
            Self::Add { name, id } => format!("peer add {name} {id}"),
            Self::Remove { name } => format!("peer remove {name}"),
            Self::Grant {
                name,
                right,
                ports: Some(ports),
            } => format!("peer grant {name} {right} {ports}"),
            Self::Grant { name, right, .. } => format!("peer grant {name} {right}"),
            Self::Revoke { name, right } => format!("peer revoke {name} {right}"),
        }
    }
}

/// Flags every role has.
#[derive(Debug, Args, Default, Clone)]
pub struct CommonArgs {
    /// TOML file holding any of these settings (flags win over it).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Where the identity (Tox savedata, mode 0600) lives.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// A peer known by name, usable wherever a Tox ID is (`--exit NAME`) and reachable as
    /// NAME.tox; repeatable.
    #[arg(long, value_name = "NAME=TOXID")]
    pub peer: Vec<String>,
    /// Let this peer use this node as its exit, by Tox ID, public key or name (repeatable).
    #[arg(long, value_name = "TOXID|PK|NAME")]
    pub allow: Vec<String>,
    /// Let the peer called NAME reach these ports of this host's loopback, as NAME.tox:PORT
    /// from its side: 8080, 22,8000-8100, 53/udp, or * (repeatable).
    #[arg(long, value_name = "NAME:PORTS")]
    pub share: Vec<String>,
    /// Take this peer as this node's introducer (repeatable): it may introduce its peers that
    /// chose it too, and this node to them (they get no rights by it).
    #[arg(long, value_name = "TOXID|PK|NAME")]
    pub introducer: Vec<String>,
    /// Extra Tox bootstrap node, as PK@HOST:PORT (repeatable).
    #[arg(long, value_name = "PK@HOST:PORT")]
    pub bootstrap: Vec<String>,
    /// Do not use the built-in public Tox bootstrap nodes.
    #[arg(long)]
    pub no_public_bootstrap: bool,
    /// Serve Prometheus metrics (`/metrics`) and status (`/status`) here: :PORT (this
    /// machine only) or IP:PORT.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<Listen>,
    /// Listeners given as :PORT or PORT take connections from the network too, not only
    /// from this machine (clients from elsewhere are held to the destination rules).
    #[arg(long)]
    pub allow_lan: bool,
    /// Let c-toxcore lock its crypto buffers in RAM (mlock) around every packet: keeps Tox
    /// secrets out of swap, at about half the throughput.
    #[arg(long)]
    pub tox_lock_memory: bool,
    /// Reach Tox through TCP relays only (no UDP: for networks that block it).
    #[arg(long)]
    pub tox_no_udp: bool,
    /// Look for Tox peers on the local network with broadcasts (off: a proxy node should not
    /// announce itself).
    #[arg(long)]
    pub tox_lan_discovery: bool,
    /// Which paths sessions use: auto (punched UDP, else punched TCP, else Tox), tox (never
    /// punch), udp or tcp (only that punched path) [default: auto].
    #[arg(long, value_name = "auto|tox|udp|tcp")]
    pub path: Option<PathChoice>,
    /// STUN server that tells this node its public address for punching, HOST:PORT
    /// (repeatable; replaces the built-in public ones).
    #[arg(long, value_name = "HOST:PORT")]
    pub stun: Vec<String>,
    /// Do not use the built-in public STUN servers (punching then offers only this host's
    /// own addresses, enough when the peer can reach them).
    #[arg(long)]
    pub no_public_stun: bool,
}

/// Timeouts and limits of relayed connections.
#[derive(Debug, Args, Default, Clone)]
pub struct LimitArgs {
    /// Give up a dial after this many seconds [default: 10].
    #[arg(long, value_name = "SECS")]
    pub connect_timeout: Option<u64>,
    /// Close relayed connections idle for this many seconds; 0 never [default: 300].
    #[arg(long, value_name = "SECS")]
    pub idle_timeout: Option<u64>,
    /// At most this many client connections at once [default: 1024].
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
}

/// Destination rules (see [`crate::exit_policy`]): always on for an exit, on for direct
/// dials with `--direct-policy`.
#[derive(Debug, Args, Default, Clone)]
pub struct PolicyArgs {
    /// Allow loopback, private, link-local, CGNAT and other special destinations.
    #[arg(long)]
    pub allow_private: bool,
    /// Only these destination ports (PORT or LOW-HIGH, repeatable).
    #[arg(long, value_name = "PORTS")]
    pub allow_port: Vec<PortRange>,
    /// Never these destination ports (repeatable).
    #[arg(long, value_name = "PORTS")]
    pub deny_port: Vec<PortRange>,
    /// Only these destination networks, special ones inside included (CIDR, repeatable).
    #[arg(long, value_name = "CIDR")]
    pub allow_cidr: Vec<Cidr>,
    /// Never these destination networks (CIDR, repeatable).
    #[arg(long, value_name = "CIDR")]
    pub deny_cidr: Vec<Cidr>,
}

/// The client role: local listeners, traffic out directly or through exit peers.
#[derive(Debug, Args, Default, Clone)]
pub struct RunArgs {
    /// SOCKS5 listener: :PORT (this machine only), IP:PORT, or `off` [default: :1080].
    #[arg(long, value_name = "ADDR|off")]
    pub socks: Option<Listen>,
    /// HTTP proxy listener: :PORT (this machine only), IP:PORT, or `off` [default: :8080].
    #[arg(long, value_name = "ADDR|off")]
    pub http: Option<Listen>,
    /// Require this user name from SOCKS5 and HTTP proxy clients (with --socks-pass).
    #[arg(long, value_name = "USER")]
    pub socks_user: Option<String>,
    /// Require this password from SOCKS5 and HTTP proxy clients (with --socks-user); better
    /// given in the environment or the config file than on a command line others can see.
    #[arg(
        long,
        value_name = "PASS",
        env = "PROXY_SOCKS_PASS",
        hide_env_values = true
    )]
    pub socks_pass: Option<String>,
    /// Send traffic through this exit peer, by its Tox ID or its name (`--peer`); repeatable.
    #[arg(long, value_name = "TOXID|NAME")]
    pub exit: Vec<String>,
    /// Capture all traffic of this host with a TUN device.
    #[arg(long)]
    pub tun: bool,
    /// Apply the destination rules to direct dials too (refuse private addresses, ...).
    #[arg(long)]
    pub direct_policy: bool,
    /// Run the Tox node even with no peer yet, so that `proxy invite` and `proxy join` can
    /// pair it (any --peer, --exit, --allow or --share runs it anyway).
    #[arg(long)]
    pub node: bool,
    /// Settings every role has.
    #[command(flatten)]
    pub common: CommonArgs,
    /// Timeouts and limits.
    #[command(flatten)]
    pub limits: LimitArgs,
    /// Destination rules.
    #[command(flatten)]
    pub policy: PolicyArgs,
    /// TUN mode: send only these networks through the TUN (repeatable; default: all).
    /// DNS (port 53) is captured whatever the routes.
    #[arg(long, value_name = "CIDR")]
    pub tun_route: Vec<Cidr>,
    /// TUN mode: keep these networks out of the TUN (repeatable).
    #[arg(long, value_name = "CIDR")]
    pub tun_exclude: Vec<Cidr>,
    /// TUN mode: capture this host's directly connected networks (its LAN) too; by default
    /// they stay outside the TUN.
    #[arg(long)]
    pub tun_lan: bool,
    /// TUN mode: answer DNS queries with fake addresses (198.18.0.0/15, fc00::/18) and send
    /// the names, not addresses, to the exit, which resolves them itself.
    #[arg(long)]
    pub fake_ip: bool,
    /// TUN mode: the device's name [default: the kernel's choice].
    #[arg(long, value_name = "NAME")]
    pub tun_name: Option<String>,
}

/// `proxy exit`.
#[derive(Debug, Args, Default, Clone)]
pub struct ExitArgs {
    /// Serve any peer that asks (an open exit: think twice).
    #[arg(long)]
    pub allow_any: bool,
    /// Answer clients' DNS queries (`proxy --tun --exit`) with this resolver, IP or IP:PORT
    /// (repeatable) [default: the nameservers of /etc/resolv.conf].
    #[arg(long, value_name = "ADDR")]
    pub dns: Vec<DnsServer>,
    /// Settings every role has.
    #[command(flatten)]
    pub common: CommonArgs,
    /// Timeouts and limits.
    #[command(flatten)]
    pub limits: LimitArgs,
    /// Destination rules.
    #[command(flatten)]
    pub policy: PolicyArgs,
}

/// `proxy id`.
#[derive(Debug, Args, Default, Clone)]
pub struct IdArgs {
    /// Settings file (only its `data-dir` matters here).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Where the identity lives.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

/// `proxy status`.
#[derive(Debug, Args, Default, Clone)]
pub struct StatusArgs {
    /// Where the running proxy answers: its HTTP listener, or its `--metrics` address
    /// [default: the HTTP listener of the config file, else 127.0.0.1:8080].
    #[arg(long, value_name = "ADDR")]
    pub from: Option<SocketAddr>,
    /// Settings file (only its `http` and `metrics` matter here).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Ask the node running on this data dir, by its control socket (works whatever
    /// listeners it has; only for the user who runs it).
    #[arg(long, value_name = "DIR", conflicts_with = "from")]
    pub data_dir: Option<PathBuf>,
}

/// A resolver address: `IP` (port 53) or `IP:PORT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DnsServer(pub SocketAddr);

/// Error parsing a [`DnsServer`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
#[error("expected IP or IP:PORT (e.g. 9.9.9.9, [2620:fe::fe]:53), got {0:?}")]
pub struct ParseDnsServerError(String);

impl FromStr for DnsServer {
    type Err = ParseDnsServerError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(ip) = s.parse::<std::net::IpAddr>() {
            return Ok(Self(SocketAddr::new(ip, 53)));
        }
        s.parse()
            .map(Self)
            .map_err(|_| ParseDnsServerError(s.to_owned()))
    }
}

/// A listener setting: `off`, a port on this machine only, or an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
    /// Do not run this listener.
    Off,
    /// `:PORT` or `PORT`: this machine only (127.0.0.1 and `[::1]`), every interface with
    /// `--allow-lan` (Clash's `mixed-port` with `allow-lan`).
    Port(u16),
    /// Listen on exactly this address.
    At(SocketAddr),
}

/// Error parsing a [`Listen`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
#[error(
    "expected :PORT or PORT (this machine only), IP:PORT (e.g. 0.0.0.0:1080, [::1]:1080) or \"off\", got {0:?}"
)]
pub struct ParseListenError(String);

impl FromStr for Listen {
    type Err = ParseListenError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("off") {
            return Ok(Self::Off);
        }
        let bad = || ParseListenError(s.to_owned());
        let port = s.strip_prefix(':').unwrap_or(s);
        if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) {
            return port.parse().map(Self::Port).map_err(|_| bad());
        }
        s.parse().map(Self::At).map_err(|_| bad())
    }
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Off => f.write_str("off"),
            Self::Port(port) => write!(f, ":{port}"),
            Self::At(addr) => addr.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_the_contract() {
        let cli = Cli::try_parse_from([
            "proxy",
            "--socks",
            "127.0.0.1:1081",
            "--http",
            "off",
            "--exit",
            "AAAA",
            "--exit",
            "BBBB",
            "--tun",
            "--config",
            "/tmp/c.toml",
            "--data-dir",
            "/tmp/d",
            "--bootstrap",
            "PK@host:33445",
            "--no-public-bootstrap",
            "-vv",
        ])
        .unwrap();
        assert!(cli.command.is_none());
        assert_eq!(
            cli.run.socks,
            Some(Listen::At("127.0.0.1:1081".parse().unwrap()))
        );
        assert_eq!(cli.run.http, Some(Listen::Off));
        assert_eq!(cli.run.exit, ["AAAA", "BBBB"]);
        assert!(cli.run.tun && cli.run.common.no_public_bootstrap);
        assert_eq!(cli.verbose, 2);

        let cli = Cli::try_parse_from([
            "proxy",
            "exit",
            "--allow",
            "PK1",
            "--allow-any",
            "--allow-private",
            "--deny-port",
            "25",
        ])
        .unwrap();
        let Some(Command::Exit(exit)) = cli.command else {
            panic!("not exit")
        };
        assert_eq!(exit.common.allow, ["PK1"]);
        assert!(exit.allow_any && exit.policy.allow_private);
        let cli = Cli::try_parse_from(["proxy", "exit", "--dns", "9.9.9.9", "--dns", "[::1]:5353"])
            .unwrap();
        let Some(Command::Exit(exit)) = cli.command else {
            panic!("not exit")
        };
        assert_eq!(
            exit.dns,
            [
                DnsServer("9.9.9.9:53".parse().unwrap()),
                DnsServer("[::1]:5353".parse().unwrap())
            ]
        );
        assert!(Cli::try_parse_from(["proxy", "exit", "--dns", "dns.example"]).is_err());

        let cli = Cli::try_parse_from(["proxy", "id", "--data-dir", "/x"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Id(_))));
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(Cli::try_parse_from(["proxy", "--socks", "localhost"]).is_err());
        assert!(Cli::try_parse_from(["proxy", "--deny-port", "x"]).is_err());
        assert!(Cli::try_parse_from(["proxy", "--allow-cidr", "10.0.0.0/40"]).is_err());
        // Client flags do not mix with a subcommand.
        assert!(Cli::try_parse_from(["proxy", "--tun", "id"]).is_err());
    }
}
