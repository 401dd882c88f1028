//! The `--config` file and the settings the command line and the file resolve to.
//!
//! The file is TOML with the flags' names as keys; unknown keys are errors (a typo must not
//! silently leave a setting at its default), and every error names the file and the key.
//!
//! ```toml
//! socks = ":1080"              # this machine only; "0.0.0.0:1080", or "off"
//! http = ":8080"                # this machine only; an address, or "off"
//! allow-lan = false             # true: ":PORT" listeners take clients from the network
//! socks-user = "alice"          # SOCKS5 and HTTP proxy clients must log in
//! socks-pass = "secret"
//! exit = ["<76 hex digits>"]      # or a peer's name
//! tun = false
//! tun-lan = false               # true: the TUN captures the LAN (connected networks) too
//! data-dir = "/var/lib/proxy"
//! bootstrap = ["<64 hex>@node.example:33445"]
//! public-bootstrap = true
//! metrics = ":9100"            # serve /metrics and /status here
//! tox-lock-memory = false       # let c-toxcore mlock its buffers (slower)
//! tox-udp = true                # false: reach Tox through TCP relays only
//! tox-lan-discovery = false     # broadcast for Tox peers on the local network
//! path = "auto"                 # auto, tox, udp or tcp: which paths sessions use
//! stun = ["stun.example:3478"]  # STUN servers for punching (replace the public defaults)
//! public-stun = true            # false: no built-in public STUN servers
//! connect-timeout = 10          # seconds, 1 to 3600
//! idle-timeout = 300            # seconds, 0 = never, at most 30 days
//! max-connections = 1024        # 1 to 1,000,000
//! direct-policy = false         # apply [policy] to direct dials too
//! node = false                  # run the Tox node with no peer yet (to invite or join)
//!
//! allow = ["<Tox ID, public key or name>"]  # peers that may use this node as their exit
//! share = ["laptop:22,8080"]    # ports of this host's loopback a peer may reach
//! introducer = ["hub"]          # peers that may introduce their peers here (and this node)
//!
//! [[peer]]                      # a peer known by name (repeat the table for more)
//! name = "home"
//! id = "<76 hex digits>"
//! exit = false                  # true: it may use this node as its exit
//! share = "22,8080"             # ports of this host's loopback it may reach
//! introducer = true             # it may introduce its peers here (and this node to them)
//! [policy]                      # destination rules (exit role, or direct-policy)
//! allow-private = false
//! allow-ports = [80, "443", "8000-8999"]
//! deny-ports = [25]
//! allow-cidrs = ["192.168.1.0/24"]
//! deny-cidrs = ["203.0.113.0/24"]
//!
//! [exit-role]                   # for `proxy exit`
//! allow = ["<Tox ID or public key>"]  # as the top-level allow
//! allow-any = false
//! dns = ["9.9.9.9"]             # clients' DNS goes here (default: /etc/resolv.conf's)
//! ```

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fabric::id::ToxId;
use fabric::path::{PUBLIC_STUN_SERVERS, PathChoice, PathChoiceError};
use serde::Deserialize;

use crate::cli::{
    CommonArgs, DnsServer, ExitArgs, LimitArgs, Listen, PolicyArgs, RunArgs, StatusArgs,
};
use crate::exit_policy::{Cidr, ExitPolicy, PortRange};
use crate::peers::{PeerEntry, PeerTable};
use crate::rights::RightsTable;
use crate::share::{PortSet, Share, ShareError};
use crate::socks::Credentials;

/// Default SOCKS5 listener port (this machine only).
pub const DEFAULT_SOCKS_PORT: u16 = 1080;
/// Default HTTP listener port (this machine only).
pub const DEFAULT_HTTP_PORT: u16 = 8080;
/// Largest `connect-timeout`, in seconds: an hour is already far past any real dial.
pub const MAX_CONNECT_TIMEOUT: u64 = 3600;
/// Largest `idle-timeout`, in seconds (30 days; 0 means never).
pub const MAX_IDLE_TIMEOUT: u64 = 30 * 24 * 3600;
/// Largest `max-connections`: each connection needs several file descriptors, so more than
/// this is a typo, not a setting.
pub const MAX_CONNECTIONS: usize = 1_000_000;

/// Where a listener binds, resolved from a [`Listen`] and `allow-lan`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenAddr {
    /// 127.0.0.1 and `[::1]` (where the host has IPv6) on this port.
    Loopback(u16),
    /// Every interface, IPv4 and IPv6, on this port (`:PORT` with `allow-lan`).
    AllInterfaces(u16),
    /// Exactly this address.
    At(SocketAddr),
}

impl ListenAddr {
    fn resolve(listen: Listen, allow_lan: bool) -> Option<Self> {
        match listen {
            Listen::Off => None,
            Listen::Port(port) if allow_lan => Some(Self::AllInterfaces(port)),
            Listen::Port(port) => Some(Self::Loopback(port)),
            Listen::At(addr) => Some(Self::At(addr)),
        }
    }

    /// Whether hosts other than this one can connect.
    pub fn is_open_to_network(&self) -> bool {
        match self {
            Self::Loopback(_) => false,
            Self::AllInterfaces(_) => true,
            Self::At(addr) => !addr.ip().is_loopback(),
        }
    }

    /// An address where a program on this host reaches the listener.
    pub fn local(&self) -> SocketAddr {
        match *self {
            Self::Loopback(port) | Self::AllInterfaces(port) => {
                SocketAddr::from(([127, 0, 0, 1], port))
            }
            Self::At(addr) if addr.ip().is_unspecified() => {
                let ip = match addr {
                    SocketAddr::V4(_) => std::net::IpAddr::from([127, 0, 0, 1]),
                    SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
                };
                SocketAddr::new(ip, addr.port())
            }
            Self::At(addr) => addr,
        }
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Loopback(port) => write!(f, "127.0.0.1:{port} and [::1]:{port}"),
            Self::AllInterfaces(port) => write!(f, "[::]:{port} (every interface)"),
            Self::At(addr) => addr.fmt(f),
        }
    }
}

/// Why the settings are unusable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown key, or a value of the wrong type.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, naming the key and line.
        message: String,
    },
    /// A setting's value is not acceptable.
    #[error("setting `{key}`: {message}")]
    Invalid {
        /// The flag or key.
        key: &'static str,
        /// Why.
        message: String,
    },
}

/// The file's contents. Every field is optional: absent means "flag or default".
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ConfigFile {
    socks: Option<ListenValue>,
    http: Option<ListenValue>,
    allow_lan: Option<bool>,
    socks_user: Option<String>,
    socks_pass: Option<String>,
    #[serde(default)]
    exit: Vec<String>,
    #[serde(default)]
    peer: Vec<PeerEntry>,
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    share: Vec<String>,
    #[serde(default)]
    introducer: Vec<String>,
    tun: Option<bool>,
    tun_lan: Option<bool>,
    data_dir: Option<PathBuf>,
    #[serde(default)]
    bootstrap: Vec<String>,
    public_bootstrap: Option<bool>,
    metrics: Option<ListenValue>,
    tox_lock_memory: Option<bool>,
    tox_udp: Option<bool>,
    tox_lan_discovery: Option<bool>,
    path: Option<String>,
    #[serde(default)]
    stun: Vec<String>,
    public_stun: Option<bool>,
    connect_timeout: Option<u64>,
    idle_timeout: Option<u64>,
    max_connections: Option<usize>,
    direct_policy: Option<bool>,
    node: Option<bool>,
    #[serde(default)]
    policy: PolicySection,
    #[serde(default)]
    exit_role: ExitSection,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct PolicySection {
    allow_private: Option<bool>,
    #[serde(default)]
    allow_ports: Vec<PortValue>,
    #[serde(default)]
    deny_ports: Vec<PortValue>,
    #[serde(default)]
    allow_cidrs: Vec<Cidr>,
    #[serde(default)]
    deny_cidrs: Vec<Cidr>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ExitSection {
    #[serde(default)]
    allow: Vec<String>,
    allow_any: Option<bool>,
    #[serde(default)]
    dns: Vec<DnsValue>,
}

/// `"9.9.9.9"` or `"[::1]:5353"`.
#[derive(Debug, Clone, Copy)]
struct DnsValue(DnsServer);

impl<'de> Deserialize<'de> for DnsValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map(DnsValue).map_err(serde::de::Error::custom)
    }
}

/// `":1080"`, `"1080"`, `"127.0.0.1:1080"` or `"off"`.
#[derive(Debug, Clone, Copy)]
struct ListenValue(Listen);

impl<'de> Deserialize<'de> for ListenValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map(ListenValue).map_err(serde::de::Error::custom)
    }
}

/// A port as a number (`25`) or a string (`"25"`, `"8000-8999"`).
#[derive(Debug, Clone, Copy)]
struct PortValue(PortRange);

impl<'de> Deserialize<'de> for PortValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = PortValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number or a range like \"8000-8999\"")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<PortValue, E> {
                self.visit_str(&v.to_string())
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<PortValue, E> {
                self.visit_str(&v.to_string())
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<PortValue, E> {
                v.parse().map(PortValue).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

impl ConfigFile {
    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses `text`; `path` only names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|err| ConfigError::Parse {
            path: path.to_owned(),
            message: err.to_string().trim_end().to_owned(),
        })
    }

    fn load_opt(path: Option<&Path>) -> Result<Self, ConfigError> {
        path.map_or_else(|| Ok(Self::default()), Self::load)
    }
}

/// Settings every role has, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommonSettings {
    /// Identity directory (`None`: the platform default, chosen by the Tox binding).
    pub data_dir: Option<PathBuf>,
    /// Extra bootstrap nodes.
    pub bootstrap: Vec<String>,
    /// Whether to use the built-in public bootstrap nodes.
    pub public_bootstrap: bool,
    /// Dial timeout.
    pub connect_timeout: Duration,
    /// Idle timeout of relayed connections (`None`: never).
    pub idle_timeout: Option<Duration>,
    /// Concurrent client connection cap.
    pub max_connections: usize,
    /// Destination rules.
    pub policy: ExitPolicy,
    /// Where to serve `/metrics` and `/status`, if anywhere.
    pub metrics: Option<ListenAddr>,
    /// `:PORT` listeners take clients from the network too.
    pub allow_lan: bool,
    /// Let c-toxcore `mlock` its buffers.
    pub tox_lock_memory: bool,
    /// Use UDP for Tox (else TCP relays only).
    pub tox_udp: bool,
    /// Tox LAN discovery broadcasts.
    pub tox_lan_discovery: bool,
    /// Which paths sessions use.
    pub path: PathChoice,
    /// STUN servers (`host:port`) for punching: the configured ones, else the public
    /// defaults unless turned off.
    pub stun: Vec<String>,
    /// The peers known by name (`--peer`, else the file's `[[peer]]` tables).
    pub peers: PeerTable,
    /// What each peer may do here (`--allow`, `--share`, the peers' tables).
    pub rights: RightsTable,
}

/// The client role's settings, resolved from flags over file over defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSettings {
    /// SOCKS5 listener (`None`: off).
    pub socks: Option<ListenAddr>,
    /// HTTP listener (`None`: off).
    pub http: Option<ListenAddr>,
    /// Credentials SOCKS5 and HTTP proxy clients must present.
    pub auth: Option<Credentials>,
    /// Exit peers' Tox IDs, unchecked (the Tox binding validates them).
    pub exits: Vec<ToxId>,
    /// TUN mode.
    pub tun: bool,
    /// Apply `common.policy` to direct dials.
    pub direct_policy: bool,
    /// Run the Tox node even with no peer yet (`--node`).
    pub node: bool,
    /// The rest.
    pub common: CommonSettings,
    /// TUN mode's routing and DNS options.
    pub tun_options: TunOptions,
}

/// TUN mode's options (flags only for now).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TunOptions {
    /// Route only these networks through the TUN (empty: everything).
    pub route: Vec<Cidr>,
    /// Keep these networks out of the TUN.
    pub exclude: Vec<Cidr>,
    /// Capture the host's directly connected networks too (by default they stay local).
    pub lan: bool,
    /// Fake-IP DNS.
    pub fake_ip: bool,
    /// Device name.
    pub name: Option<String>,
}

/// The exit role's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitSettings {
    /// Resolvers for the clients' DNS (empty: the system's).
    pub dns: Vec<SocketAddr>,
    /// The rest.
    pub common: CommonSettings,
}

impl RunSettings {
    /// Resolves the client role's settings.
    pub fn resolve(args: &RunArgs) -> Result<Self, ConfigError> {
        let file = ConfigFile::load_opt(args.common.config.as_deref())?;
        let allow_lan = args.common.allow_lan || file.allow_lan.unwrap_or(false);
        let listen = |flag: Option<Listen>, file: Option<ListenValue>, default: u16| {
            let listen = flag.or(file.map(|v| v.0)).unwrap_or(Listen::Port(default));
            ListenAddr::resolve(listen, allow_lan)
        };
        let socks = listen(args.socks, file.socks, DEFAULT_SOCKS_PORT);
        let http = listen(args.http, file.http, DEFAULT_HTTP_PORT);
        if socks.is_none() && http.is_none() && !(args.tun || file.tun == Some(true)) {
            return Err(ConfigError::Invalid {
                key: "socks",
                message: "both listeners are off and TUN mode is not on: nothing to serve".into(),
            });
        }
        let user = args.socks_user.clone().or(file.socks_user.clone());
        let pass = args.socks_pass.clone().or(file.socks_pass.clone());
        let auth = match (user, pass) {
            (None, None) => None,
            (Some(user), Some(pass)) => {
                if user.is_empty() || user.len() > 255 || pass.is_empty() || pass.len() > 255 {
                    return Err(ConfigError::Invalid {
                        key: "socks-user",
                        message: "user name and password must be 1 to 255 bytes (RFC 1929)".into(),
                    });
                }
                Some(Credentials { user, pass })
            }
            (Some(_), None) => return Err(missing("socks-pass", "socks-user")),
            (None, Some(_)) => return Err(missing("socks-user", "socks-pass")),
        };
        let common = common(&args.common, &args.limits, &args.policy, &file)?;
        let exits = if args.exit.is_empty() {
            &file.exit
        } else {
            &args.exit
        };
        // A name the flags and the config file do not know may be a peer kept in the data
        // dir (paired, added or introduced at run time).
        let kept = std::cell::OnceCell::new();
        let exits = exits
            .iter()
            .map(|e| match common.peers.resolve(e) {
                Err(crate::peers::PeerError::Unknown { .. }) => kept
                    .get_or_init(|| kept_peers(common.data_dir.as_deref()))
                    .resolve(e),
                other => other,
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ConfigError::Invalid {
                key: "exit",
                message: e.to_string(),
            })?;
        let tun = args.tun || file.tun.unwrap_or(false);
        let tun_lan = args.tun_lan || file.tun_lan.unwrap_or(false);
        // TUN options without TUN mode would be accepted and do nothing.
        let tun_only = [
            ("tun-lan", tun_lan),
            ("tun-route", !args.tun_route.is_empty()),
            ("tun-exclude", !args.tun_exclude.is_empty()),
            ("tun-name", args.tun_name.is_some()),
            ("fake-ip", args.fake_ip),
        ];
        if !tun && let Some((key, _)) = tun_only.iter().find(|(_, given)| *given) {
            return Err(ConfigError::Invalid {
                key,
                message: "only means something with --tun (or tun = true)".into(),
            });
        }
        Ok(Self {
            socks,
            http,
            auth,
            exits,
            tun,
            direct_policy: args.direct_policy || file.direct_policy.unwrap_or(false),
            node: args.node || file.node.unwrap_or(false),
            common,
            tun_options: TunOptions {
                route: args.tun_route.clone(),
                exclude: args.tun_exclude.clone(),
                lan: tun_lan,
                fake_ip: args.fake_ip,
                name: args.tun_name.clone(),
            },
        })
    }
}

impl ExitSettings {
    /// Resolves the exit role's settings.
    pub fn resolve(args: &ExitArgs) -> Result<Self, ConfigError> {
        let file = ConfigFile::load_opt(args.common.config.as_deref())?;
        let mut common = common(&args.common, &args.limits, &args.policy, &file)?;
        if args.common.allow.is_empty() {
            for value in &file.exit_role.allow {
                let pk = common
                    .peers
                    .resolve_key(value)
                    .map_err(|e| ConfigError::Invalid {
                        key: "allow",
                        message: e.to_string(),
                    })?;
                common.rights.grant_exit(pk);
            }
        }
        if args.allow_any || file.exit_role.allow_any.unwrap_or(false) {
            common.rights.allow_any_exit();
        }
        Ok(Self {
            dns: if args.dns.is_empty() {
                file.exit_role.dns.iter().map(|d| d.0.0).collect()
            } else {
                args.dns.iter().map(|d| d.0).collect()
            },
            common,
        })
    }
}

/// The peers' rights: `--allow` and `--share` (else the file's `allow` and `share`), and the
/// `exit` and `share` of each `[[peer]]` table (when the file's peers are the ones in use).
fn rights(
    args: &CommonArgs,
    file: &ConfigFile,
    peers: &PeerTable,
) -> Result<RightsTable, ConfigError> {
    let mut rights = RightsTable::default();
    // A bad value names the flag it came by, or the file's key (which the error names).
    let (allow, by) = if args.allow.is_empty() {
        (&file.allow, "")
    } else {
        (&args.allow, "--allow ")
    };
    for value in allow {
        let pk = peers.resolve_key(value).map_err(|e| ConfigError::Invalid {
            key: "allow",
            message: format!("{by}{e}"),
        })?;
        rights.grant_exit(pk);
    }
    let (shares, by) = if args.share.is_empty() {
        (&file.share, "")
    } else {
        (&args.share, "--share ")
    };
    let bad_share = |message: String| ConfigError::Invalid {
        key: "share",
        message: format!("{by}{message}"),
    };
    for value in shares {
        let share: Share = value
            .parse()
            .map_err(|e: ShareError| bad_share(format!("{value:?}: {e}")))?;
        let peer = peers.by_name(&share.peer).ok_or_else(|| {
            bad_share(format!(
                "{value:?}: no peer is called {} (add it with --peer {}=TOXID)",
                share.peer, share.peer
            ))
        })?;
        rights.grant_share(peer.id.public_key(), &share.ports);
    }
    let (introducers, by) = if args.introducer.is_empty() {
        (&file.introducer, "")
    } else {
        (&args.introducer, "--introducer ")
    };
    for value in introducers {
        let pk = peers.resolve_key(value).map_err(|e| ConfigError::Invalid {
            key: "introducer",
            message: format!("{by}{e}"),
        })?;
        rights.grant_introduce(pk);
    }
    if args.peer.is_empty() {
        for entry in &file.peer {
            let Some(peer) = entry.name.parse().ok().and_then(|n| peers.by_name(&n)) else {
                continue;
            };
            let pk = peer.id.public_key();
            if entry.exit == Some(true) {
                rights.grant_exit(pk);
            }
            if entry.introducer == Some(true) {
                rights.grant_introduce(pk);
            }
            if let Some(ports) = &entry.share {
                let ports: PortSet = ports.parse().map_err(|e: ShareError| {
                    bad_share(format!("peer {}: {ports:?}: {e}", peer.name))
                })?;
                rights.grant_share(pk, &ports);
            }
        }
    }
    Ok(rights)
}

/// The data dir: the one given, else `$XDG_DATA_HOME/proxy` or `~/.local/share/proxy`.
pub fn default_data_dir(configured: Option<&Path>) -> Option<PathBuf> {
    if let Some(dir) = configured {
        return Some(dir.to_path_buf());
    }
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".local/share")))?;
    Some(base.join("proxy"))
}

/// The peers kept in the data dir's `peers.toml` (none when it cannot be read).
fn kept_peers(configured: Option<&Path>) -> PeerTable {
    let Some(dir) = default_data_dir(configured) else {
        return PeerTable::default();
    };
    let mesh = crate::mesh::Mesh::default();
    if mesh.load(&dir).is_err() {
        return PeerTable::default();
    }
    mesh.now().peers.clone()
}

fn missing(key: &'static str, other: &str) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: format!("required when `{other}` is given"),
    }
}

fn common(
    args: &CommonArgs,
    limits: &LimitArgs,
    policy: &PolicyArgs,
    file: &ConfigFile,
) -> Result<CommonSettings, ConfigError> {
    let connect_timeout = limits
        .connect_timeout
        .or(file.connect_timeout)
        .unwrap_or(10);
    if !(1..=MAX_CONNECT_TIMEOUT).contains(&connect_timeout) {
        return Err(ConfigError::Invalid {
            key: "connect-timeout",
            message: format!("must be 1 to {MAX_CONNECT_TIMEOUT} seconds, got {connect_timeout}"),
        });
    }
    let idle = limits.idle_timeout.or(file.idle_timeout).unwrap_or(300);
    if idle > MAX_IDLE_TIMEOUT {
        return Err(ConfigError::Invalid {
            key: "idle-timeout",
            message: format!("must be at most {MAX_IDLE_TIMEOUT} seconds (0: never), got {idle}"),
        });
    }
    let max_connections = limits
        .max_connections
        .or(file.max_connections)
        .unwrap_or(1024);
    if !(1..=MAX_CONNECTIONS).contains(&max_connections) {
        return Err(ConfigError::Invalid {
            key: "max-connections",
            message: format!("must be 1 to {MAX_CONNECTIONS}, got {max_connections}"),
        });
    }
    let pick = |flag: &[PortRange], file: &[PortValue]| -> Vec<PortRange> {
        if flag.is_empty() {
            file.iter().map(|p| p.0).collect()
        } else {
            flag.to_vec()
        }
    };
    let pick_cidr = |flag: &[Cidr], file: &[Cidr]| -> Vec<Cidr> {
        if flag.is_empty() {
            file.to_vec()
        } else {
            flag.to_vec()
        }
    };
    let fp = &file.policy;
    let allow_lan = args.allow_lan || file.allow_lan.unwrap_or(false);
    let peers = if args.peer.is_empty() {
        PeerTable::new(file.peer.iter().map(|p| (p.name.as_str(), p.id.as_str())))
    } else {
        args.peer
            .iter()
            .map(|f| PeerTable::split_flag(f))
            .collect::<Result<Vec<_>, _>>()
            .and_then(PeerTable::new)
    }
    .map_err(|e| ConfigError::Invalid {
        key: "peer",
        message: e.to_string(),
    })?;
    let rights = rights(args, file, &peers)?;
    let path = match (args.path, &file.path) {
        (Some(path), _) => path,
        (None, Some(text)) => text
            .parse()
            .map_err(|e: PathChoiceError| ConfigError::Invalid {
                key: "path",
                message: e.to_string(),
            })?,
        (None, None) => PathChoice::Auto,
    };
    let stun = if !args.stun.is_empty() {
        args.stun.clone()
    } else if !file.stun.is_empty() {
        file.stun.clone()
    } else if !args.no_public_stun && file.public_stun.unwrap_or(true) {
        PUBLIC_STUN_SERVERS
            .iter()
            .map(|s| (*s).to_owned())
            .collect()
    } else {
        Vec::new()
    };
    Ok(CommonSettings {
        path,
        stun,
        peers,
        rights,
        data_dir: args.data_dir.clone().or(file.data_dir.clone()),
        bootstrap: if args.bootstrap.is_empty() {
            file.bootstrap.clone()
        } else {
            args.bootstrap.clone()
        },
        public_bootstrap: !args.no_public_bootstrap && file.public_bootstrap.unwrap_or(true),
        metrics: args
            .metrics
            .or(file.metrics.map(|v| v.0))
            .and_then(|m| ListenAddr::resolve(m, allow_lan)),
        allow_lan,
        tox_lock_memory: args.tox_lock_memory || file.tox_lock_memory.unwrap_or(false),
        tox_udp: !args.tox_no_udp && file.tox_udp.unwrap_or(true),
        tox_lan_discovery: args.tox_lan_discovery || file.tox_lan_discovery.unwrap_or(false),
        connect_timeout: Duration::from_secs(connect_timeout),
        idle_timeout: (idle > 0).then(|| Duration::from_secs(idle)),
        max_connections,
        policy: ExitPolicy {
            allow_private: policy.allow_private || fp.allow_private.unwrap_or(false),
            allow_ports: pick(&policy.allow_port, &fp.allow_ports),
            deny_ports: pick(&policy.deny_port, &fp.deny_ports),
            allow_cidrs: pick_cidr(&policy.allow_cidr, &fp.allow_cidrs),
            deny_cidrs: pick_cidr(&policy.deny_cidr, &fp.deny_cidrs),
        },
    })
}

/// The `data-dir` for `proxy id`: flag, else file.
pub fn id_data_dir(
    config: Option<&Path>,
    data_dir: Option<&Path>,
) -> Result<Option<PathBuf>, ConfigError> {
    if let Some(dir) = data_dir {
        return Ok(Some(dir.to_owned()));
    }
    Ok(ConfigFile::load_opt(config)?.data_dir)
}

/// Where `proxy status` asks: `--from`, else the file's `metrics`, else its HTTP listener,
/// else the default HTTP listener.
pub fn status_addr(args: &StatusArgs) -> Result<SocketAddr, ConfigError> {
    if let Some(addr) = args.from {
        return Ok(addr);
    }
    let file = ConfigFile::load_opt(args.config.as_deref())?;
    let local = |listen| ListenAddr::resolve(listen, false).map(|l| l.local());
    if let Some(addr) = file.metrics.and_then(|v| local(v.0)) {
        return Ok(addr);
    }
    match file.http.map(|v| v.0) {
        Some(listen) => local(listen).ok_or_else(|| ConfigError::Invalid {
            key: "http",
            message: "the HTTP listener is off and no `metrics` address is set: pass --from".into(),
        }),
        None => Ok(SocketAddr::from(([127, 0, 0, 1], DEFAULT_HTTP_PORT))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    use crate::cli::{Cli, Command};

    fn run_args(argv: &[&str]) -> RunArgs {
        let mut full = vec!["proxy"];
        full.extend_from_slice(argv);
        Cli::try_parse_from(full).unwrap().run
    }

    fn write(text: &str) -> (tempdir::Dir, PathBuf) {
        let dir = tempdir::Dir::new();
        let path = dir.0.join("proxy.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    /// A throwaway directory removed on drop (no crate needed for this much).
    mod tempdir {
        use std::path::PathBuf;
        use std::sync::atomic::{AtomicU32, Ordering};

        pub(super) struct Dir(pub(super) PathBuf);
        impl Dir {
            pub(super) fn new() -> Self {
                static N: AtomicU32 = AtomicU32::new(0);
                let p = std::env::temp_dir().join(format!(
                    "proxy-config-test-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&p).unwrap();
                Self(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn defaults() {
        let s = RunSettings::resolve(&run_args(&[])).unwrap();
        assert_eq!(s.socks, Some(ListenAddr::Loopback(1080)));
        assert_eq!(s.http, Some(ListenAddr::Loopback(8080)));
        assert!(!s.socks.unwrap().is_open_to_network());
        assert_eq!(s.auth, None);
        assert!(s.exits.is_empty() && !s.tun && !s.direct_policy);
        assert_eq!(s.common.connect_timeout, Duration::from_secs(10));
        assert_eq!(s.common.idle_timeout, Some(Duration::from_secs(300)));
        assert_eq!(s.common.max_connections, 1024);
        assert!(s.common.public_bootstrap);
        assert_eq!(s.common.policy, ExitPolicy::default());
    }

    #[test]
    fn the_lan_stays_local_unless_asked_by_flag_or_file() {
        let s = RunSettings::resolve(&run_args(&["--tun"])).unwrap();
        assert!(!s.tun_options.lan);
        let s = RunSettings::resolve(&run_args(&["--tun", "--tun-lan"])).unwrap();
        assert!(s.tun_options.lan);
        let (_dir, path) = write("tun = true\ntun-lan = true\n");
        let s = RunSettings::resolve(&run_args(&["--config", path.to_str().unwrap()])).unwrap();
        assert!(s.tun && s.tun_options.lan);
        // Without TUN mode it would do nothing: refused, flag or file.
        for argv in [
            &["--tun-lan"][..],
            &["--fake-ip"],
            &["--tun-exclude", "10.0.0.0/8"],
        ] {
            let err = RunSettings::resolve(&run_args(argv))
                .unwrap_err()
                .to_string();
            assert!(err.contains("only means something with --tun"), "{err}");
        }
        let (_dir, path) = write("tun-lan = true\n");
        let err = RunSettings::resolve(&run_args(&["--config", path.to_str().unwrap()]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("tun-lan"), "{err}");
        let (_dir, path) = write("tun-lan = \"yes\"\n");
        let err = RunSettings::resolve(&run_args(&["--config", path.to_str().unwrap()]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("tun-lan"), "{err}");
    }

    #[test]
    fn exits_are_named_by_peers_of_the_file_or_the_flags() {
        let nas = ToxId::new(fabric::id::PublicKey([1; 32]), [0; 4]).to_string();
        let pc = ToxId::new(fabric::id::PublicKey([2; 32]), [0; 4]).to_string();
        let (_dir, path) = write(&format!(
            "exit = [\"NAS\"]\n[[peer]]\nname = \"nas\"\nid = \"{nas}\"\n"
        ));
        let p = path.to_str().unwrap();
        let s = RunSettings::resolve(&run_args(&["--config", p])).unwrap();
        assert_eq!(s.exits.len(), 1);
        assert_eq!(s.exits[0].to_string(), nas);
        // Flags replace the file's peers: "nas" is no longer known.
        let peer = format!("pc={pc}");
        let err = RunSettings::resolve(&run_args(&["--config", p, "--peer", &peer]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"NAS\" is neither"), "{err}");
        let s = RunSettings::resolve(&run_args(&["--peer", &peer, "--exit", "PC"])).unwrap();
        assert_eq!(s.exits[0].to_string(), pc);
        // Two names for one key, or a bad table, are errors at start.
        let twice = format!("other={pc}");
        let err = RunSettings::resolve(&run_args(&["--peer", &peer, "--peer", &twice]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("same key"), "{err}");
        let (_dir, path) = write("[[peer]]\nname = \"x\"\n");
        assert!(RunSettings::resolve(&run_args(&["--config", path.to_str().unwrap()])).is_err());
    }

    #[test]
    fn file_then_flags_win() {
        let (_dir, path) = write(
            r#"
            socks = "127.0.0.1:1999"
            http = "off"
            socks-user = "alice"
            socks-pass = "pw"
            idle-timeout = 0
            public-bootstrap = false
            direct-policy = true
            [policy]
            deny-ports = [25, "6000-6010"]
            deny-cidrs = ["10.0.0.0/8"]
            [exit-role]
            allow = ["0101010101010101010101010101010101010101010101010101010101010101"]
            dns = ["10.0.0.53", "[::1]:5353"]
            "#,
        );
        let p = path.to_str().unwrap();
        let s = RunSettings::resolve(&run_args(&["--config", p])).unwrap();
        assert_eq!(
            s.socks,
            Some(ListenAddr::At("127.0.0.1:1999".parse().unwrap()))
        );
        assert_eq!(s.http, None);
        assert_eq!(s.auth.as_ref().unwrap().user, "alice");
        assert_eq!(s.common.idle_timeout, None);
        assert!(!s.common.public_bootstrap && s.direct_policy);
        assert_eq!(s.common.policy.deny_ports.len(), 2);
        assert!(s.common.policy.deny_ports[1].contains(6005));
        assert_eq!(s.common.policy.deny_cidrs.len(), 1);

        let s = RunSettings::resolve(&run_args(&[
            "--config",
            p,
            "--socks",
            "127.0.0.1:2000",
            "--http",
            "127.0.0.1:2001",
            "--idle-timeout",
            "5",
            "--deny-port",
            "22",
        ]))
        .unwrap();
        assert_eq!(
            s.socks,
            Some(ListenAddr::At("127.0.0.1:2000".parse().unwrap()))
        );
        assert_eq!(
            s.http,
            Some(ListenAddr::At("127.0.0.1:2001".parse().unwrap()))
        );
        assert_eq!(s.common.idle_timeout, Some(Duration::from_secs(5)));
        assert_eq!(s.common.policy.deny_ports, vec!["22".parse().unwrap()]);

        let cli = Cli::try_parse_from(["proxy", "exit", "--config", p]).unwrap();
        let Some(Command::Exit(exit)) = cli.command else {
            panic!()
        };
        let e = ExitSettings::resolve(&exit).unwrap();
        let allowed = fabric::id::PublicKey([1; 32]);
        assert!(e.common.rights.may_exit(&allowed));
        assert!(!e.common.rights.any_exit());
        assert_eq!(
            e.dns,
            vec![
                "10.0.0.53:53".parse::<SocketAddr>().unwrap(),
                "[::1]:5353".parse().unwrap()
            ]
        );
    }

    #[test]
    fn errors_name_the_key() {
        for (text, key) in [
            ("sockss = \"127.0.0.1:1\"", "sockss"),
            ("socks = \"localhost:1\"", "socks"),
            ("idle-timeout = \"soon\"", "idle-timeout"),
            ("[policy]\ndeny-ports = [\"x\"]", "deny-ports"),
            ("[policy]\ndeny-cidrs = [\"10.0.0.0/99\"]", "deny-cidrs"),
            ("[policy]\nallow-everything = true", "allow-everything"),
        ] {
            let (_dir, path) = write(text);
            let err = RunSettings::resolve(&run_args(&["--config", path.to_str().unwrap()]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{text}: {err}");
            assert!(err.contains("proxy.toml"), "{text}: {err}");
        }
        let err = RunSettings::resolve(&run_args(&["--config", "/nonexistent/p.toml"]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cannot read config file /nonexistent/p.toml"),
            "{err}"
        );
    }

    #[test]
    fn inconsistent_settings() {
        let err = RunSettings::resolve(&run_args(&["--socks-user", "a"])).unwrap_err();
        assert!(err.to_string().contains("socks-pass"), "{err}");
        let err =
            RunSettings::resolve(&run_args(&["--socks", "off", "--http", "off"])).unwrap_err();
        assert!(err.to_string().contains("nothing to serve"), "{err}");
        let err = RunSettings::resolve(&run_args(&["--max-connections", "0"])).unwrap_err();
        assert!(err.to_string().contains("max-connections"), "{err}");
    }

    #[test]
    fn numbers_have_upper_bounds() {
        // Each of these used to reach a panic (tokio's semaphore, Duration or Instant
        // overflow) instead of a clear error.
        for (flag, value) in [
            ("--max-connections", "2305843009213693952"),
            ("--max-connections", "1000001"),
            ("--connect-timeout", "18446744073709551615"),
            ("--connect-timeout", "3601"),
            ("--idle-timeout", "18446744073709551615"),
        ] {
            let err = RunSettings::resolve(&run_args(&[flag, value])).unwrap_err();
            assert!(
                err.to_string().contains(&flag[2..]),
                "{flag} {value}: {err}"
            );
        }
        let s = RunSettings::resolve(&run_args(&[
            "--max-connections",
            "1000000",
            "--connect-timeout",
            "3600",
            "--idle-timeout",
            "2592000",
        ]))
        .unwrap();
        assert_eq!(s.common.max_connections, 1_000_000);
    }

    #[test]
    fn port_alone_means_this_machine_and_allow_lan_opens_it() {
        for spelling in [":1080", "1080"] {
            let s =
                RunSettings::resolve(&run_args(&["--socks", spelling, "--http", ":0"])).unwrap();
            assert_eq!(s.socks, Some(ListenAddr::Loopback(1080)), "{spelling}");
            assert_eq!(s.http, Some(ListenAddr::Loopback(0)));
        }
        let s = RunSettings::resolve(&run_args(&["--socks", ":1080", "--allow-lan"])).unwrap();
        assert_eq!(s.socks, Some(ListenAddr::AllInterfaces(1080)));
        assert!(s.socks.unwrap().is_open_to_network());
        // The default listeners follow allow-lan too; explicit addresses do not.
        assert_eq!(s.http, Some(ListenAddr::AllInterfaces(8080)));
        let s = RunSettings::resolve(&run_args(&["--http", "127.0.0.1:9", "--allow-lan"])).unwrap();
        assert_eq!(s.http, Some(ListenAddr::At("127.0.0.1:9".parse().unwrap())));
        let s = RunSettings::resolve(&run_args(&["--socks", "0.0.0.0:1080"])).unwrap();
        assert!(s.socks.unwrap().is_open_to_network());
        assert_eq!(s.socks.unwrap().local(), "127.0.0.1:1080".parse().unwrap());

        let (_dir, path) = write("socks = \":1999\"\nmetrics = \"9100\"\nallow-lan = true\n");
        let s = RunSettings::resolve(&run_args(&["--config", path.to_str().unwrap()])).unwrap();
        assert_eq!(s.socks, Some(ListenAddr::AllInterfaces(1999)));
        assert_eq!(s.common.metrics, Some(ListenAddr::AllInterfaces(9100)));
        for bad in [":", ":65536", "1080x", ":-1"] {
            assert!(run_args_err(&["--socks", bad]), "{bad}");
        }
    }

    #[test]
    fn an_exit_named_only_in_the_data_dir_is_found_there() {
        let dir = tempdir::Dir::new();
        let id = ToxId::new(fabric::id::PublicKey([5; 32]), [1; 4]);
        std::fs::write(
            dir.0.join(crate::mesh::STORE),
            format!("[[peer]]\nname = \"home\"\nid = \"{id}\"\norigin = \"paired\"\nsince = 9\n"),
        )
        .unwrap();
        let data = dir.0.display().to_string();
        let s = RunSettings::resolve(&run_args(&["--exit", "home", "--data-dir", &data])).unwrap();
        assert_eq!(s.exits, vec![id]);
        let err = RunSettings::resolve(&run_args(&["--exit", "away", "--data-dir", &data]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("away"), "{err}");
    }

    fn run_args_err(argv: &[&str]) -> bool {
        let mut full = vec!["proxy"];
        full.extend_from_slice(argv);
        Cli::try_parse_from(full).is_err()
    }
}
