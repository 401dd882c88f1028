//! The `--config` file and the settings the command line and the file resolve to.
//!
//! The file is TOML with the flags' names as keys; unknown keys are errors (a typo must not
//! silently leave a setting at its default), and every error names the file and the key.
//!
//! ```toml
//! socks = "127.0.0.1:1080"      # or "off"
//! http = "127.0.0.1:8080"       # or "off"
//! socks-user = "alice"
//! socks-pass = "secret"
//! exit = ["<76 hex digits>"]
//! tun = false
//! data-dir = "/var/lib/proxy"
//! bootstrap = ["<64 hex>@node.example:33445"]
//! public-bootstrap = true
//! metrics = "127.0.0.1:9100"    # serve /metrics and /status here
//! tox-lock-memory = false       # let c-toxcore mlock its buffers (slower)
//! tox-udp = true                # false: reach Tox through TCP relays only
//! tox-lan-discovery = false     # broadcast for Tox peers on the local network
//! path = "auto"                 # auto, tox, udp or tcp: which paths sessions use
//! stun = ["stun.example:3478"]  # STUN servers for punching (replace the public defaults)
//! public-stun = true            # false: no built-in public STUN servers
//! connect-timeout = 10          # seconds
//! idle-timeout = 300            # seconds, 0 = never
//! max-connections = 1024
//! direct-policy = false         # apply [policy] to direct dials too
//!
//! [policy]                      # destination rules (exit role, or direct-policy)
//! allow-private = false
//! allow-ports = [80, "443", "8000-8999"]
//! deny-ports = [25]
//! allow-cidrs = ["192.168.1.0/24"]
//! deny-cidrs = ["203.0.113.0/24"]
//!
//! [exit-role]                   # for `proxy exit`
//! allow = ["<Tox ID or public key>"]
//! allow-any = false
//! ```

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fabric::path::{PUBLIC_STUN_SERVERS, PathChoice, PathChoiceError};
use serde::Deserialize;

use crate::cli::{CommonArgs, ExitArgs, LimitArgs, Listen, PolicyArgs, RunArgs, StatusArgs};
use crate::exit_policy::{Cidr, ExitPolicy, PortRange};
use crate::socks::Credentials;

/// Default SOCKS5 listener.
pub const DEFAULT_SOCKS: &str = "127.0.0.1:1080";
/// Default HTTP listener.
pub const DEFAULT_HTTP: &str = "127.0.0.1:8080";

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
    socks_user: Option<String>,
    socks_pass: Option<String>,
    #[serde(default)]
    exit: Vec<String>,
    tun: Option<bool>,
    data_dir: Option<PathBuf>,
    #[serde(default)]
    bootstrap: Vec<String>,
    public_bootstrap: Option<bool>,
    metrics: Option<SocketAddr>,
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
}

/// `"127.0.0.1:1080"` or `"off"`.
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
    pub metrics: Option<SocketAddr>,
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
}

/// The client role's settings, resolved from flags over file over defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSettings {
    /// SOCKS5 listener (`None`: off).
    pub socks: Option<SocketAddr>,
    /// HTTP listener (`None`: off).
    pub http: Option<SocketAddr>,
    /// SOCKS5 credentials clients must present.
    pub socks_auth: Option<Credentials>,
    /// Exit peers' Tox IDs, unchecked (the Tox binding validates them).
    pub exits: Vec<String>,
    /// TUN mode.
    pub tun: bool,
    /// Apply `common.policy` to direct dials.
    pub direct_policy: bool,
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
    /// Fake-IP DNS.
    pub fake_ip: bool,
    /// Device name.
    pub name: Option<String>,
}

/// The exit role's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitSettings {
    /// Peers allowed to use this exit.
    pub allow: Vec<String>,
    /// Serve anyone.
    pub allow_any: bool,
    /// The rest.
    pub common: CommonSettings,
}

impl RunSettings {
    /// Resolves the client role's settings.
    pub fn resolve(args: &RunArgs) -> Result<Self, ConfigError> {
        let file = ConfigFile::load_opt(args.common.config.as_deref())?;
        let listen = |flag: Option<Listen>, file: Option<ListenValue>, default: &str| match flag
            .or(file.map(|v| v.0))
        {
            Some(Listen::Off) => None,
            Some(Listen::At(addr)) => Some(addr),
            None => default.parse().ok(),
        };
        let socks = listen(args.socks, file.socks, DEFAULT_SOCKS);
        let http = listen(args.http, file.http, DEFAULT_HTTP);
        if socks.is_none() && http.is_none() && !(args.tun || file.tun == Some(true)) {
            return Err(ConfigError::Invalid {
                key: "socks",
                message: "both listeners are off and TUN mode is not on: nothing to serve".into(),
            });
        }
        let user = args.socks_user.clone().or(file.socks_user.clone());
        let pass = args.socks_pass.clone().or(file.socks_pass.clone());
        let socks_auth = match (user, pass) {
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
        let exits = if args.exit.is_empty() {
            file.exit.clone()
        } else {
            args.exit.clone()
        };
        Ok(Self {
            socks,
            http,
            socks_auth,
            exits,
            tun: args.tun || file.tun.unwrap_or(false),
            direct_policy: args.direct_policy || file.direct_policy.unwrap_or(false),
            common: common(&args.common, &args.limits, &args.policy, &file)?,
            tun_options: TunOptions {
                route: args.tun_route.clone(),
                exclude: args.tun_exclude.clone(),
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
        let allow = if args.allow.is_empty() {
            file.exit_role.allow.clone()
        } else {
            args.allow.clone()
        };
        Ok(Self {
            allow,
            allow_any: args.allow_any || file.exit_role.allow_any.unwrap_or(false),
            common: common(&args.common, &args.limits, &args.policy, &file)?,
        })
    }
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
    if connect_timeout == 0 {
        return Err(ConfigError::Invalid {
            key: "connect-timeout",
            message: "must be at least 1 second".into(),
        });
    }
    let idle = limits.idle_timeout.or(file.idle_timeout).unwrap_or(300);
    let max_connections = limits
        .max_connections
        .or(file.max_connections)
        .unwrap_or(1024);
    if max_connections == 0 {
        return Err(ConfigError::Invalid {
            key: "max-connections",
            message: "must be at least 1".into(),
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
        data_dir: args.data_dir.clone().or(file.data_dir.clone()),
        bootstrap: if args.bootstrap.is_empty() {
            file.bootstrap.clone()
        } else {
            args.bootstrap.clone()
        },
        public_bootstrap: !args.no_public_bootstrap && file.public_bootstrap.unwrap_or(true),
        metrics: args.metrics.or(file.metrics),
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
    if let Some(addr) = file.metrics {
        return Ok(addr);
    }
    match file.http.map(|v| v.0) {
        Some(Listen::At(addr)) => Ok(addr),
        Some(Listen::Off) => Err(ConfigError::Invalid {
            key: "http",
            message: "the HTTP listener is off and no `metrics` address is set: pass --from".into(),
        }),
        None => Ok(DEFAULT_HTTP.parse().expect("the default is an address")),
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
        assert_eq!(s.socks, Some("127.0.0.1:1080".parse().unwrap()));
        assert_eq!(s.http, Some("127.0.0.1:8080".parse().unwrap()));
        assert_eq!(s.socks_auth, None);
        assert!(s.exits.is_empty() && !s.tun && !s.direct_policy);
        assert_eq!(s.common.connect_timeout, Duration::from_secs(10));
        assert_eq!(s.common.idle_timeout, Some(Duration::from_secs(300)));
        assert_eq!(s.common.max_connections, 1024);
        assert!(s.common.public_bootstrap);
        assert_eq!(s.common.policy, ExitPolicy::default());
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
            allow = ["PK"]
            "#,
        );
        let p = path.to_str().unwrap();
        let s = RunSettings::resolve(&run_args(&["--config", p])).unwrap();
        assert_eq!(s.socks, Some("127.0.0.1:1999".parse().unwrap()));
        assert_eq!(s.http, None);
        assert_eq!(s.socks_auth.as_ref().unwrap().user, "alice");
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
        assert_eq!(s.socks, Some("127.0.0.1:2000".parse().unwrap()));
        assert_eq!(s.http, Some("127.0.0.1:2001".parse().unwrap()));
        assert_eq!(s.common.idle_timeout, Some(Duration::from_secs(5)));
        assert_eq!(s.common.policy.deny_ports, vec!["22".parse().unwrap()]);

        let cli = Cli::try_parse_from(["proxy", "exit", "--config", p]).unwrap();
        let Some(Command::Exit(exit)) = cli.command else {
            panic!()
        };
        let e = ExitSettings::resolve(&exit).unwrap();
        assert_eq!(e.allow, ["PK"]);
        assert!(!e.allow_any);
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
}
