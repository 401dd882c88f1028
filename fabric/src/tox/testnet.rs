//! A private Tox network on 127.0.0.1 for tests and benches: several `tox-bootstrapd`
//! processes (Debian package `toxcore-utils`) that bootstrap off each other, with LAN discovery
//! and IPv6 off, each also serving as a TCP relay.
//!
//! Nothing here contacts the public network: the daemons know only each other, and
//! [`ToxNet::config`] gives nodes that know only the daemons. Every process is killed and the
//! scratch directory removed when the [`ToxNet`] is dropped, also while a test panics.

use std::fs;
use std::io;
use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::id::{BootstrapNode, PUBLIC_KEY_SIZE, PublicKey, ToxId};
use crate::tox::ToxConfig;

/// How long a daemon has to stop once its stdin closes.
const DAEMON_STOP_GRACE: Duration = Duration::from_secs(5);
/// How long one daemon may take to come up before we try other ports.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts per daemon (a port we picked may be taken by someone else meanwhile).
const START_ATTEMPTS: usize = 5;
/// Runs the daemon (`$0 "$@"`) under a shell that kills it when our end of its stdin closes,
/// which also happens when the test process dies without unwinding (killed by a harness
/// timeout, aborted): no daemon outlives the test. The shell exits with the daemon's status
/// when the daemon stops by itself, so an early failure (port taken) is seen at once.
/// (A background job's stdin is /dev/null in a non-interactive shell, hence the copy on fd 3.)
const SUPERVISOR: &str = r#"exec 3<&0
"$0" "$@" </dev/null 3<&- & p=$!
( read -r _ignored <&3; kill "$p" 2>/dev/null ) &
exec 3<&-
wait "$p""#;

/// A running private Tox network. Dropping it stops the daemons.
#[derive(Debug)]
pub struct ToxNet {
    dir: ScratchDir,
    daemons: Vec<Daemon>,
}

#[derive(Debug)]
struct Daemon {
    child: Child,
    udp: BootstrapNode,
    tcp: BootstrapNode,
}

impl ToxNet {
    /// Starts `n` bootstrap daemons (at least 1; use 4 or more for a DHT that finds friends
    /// quickly). Daemon `i` bootstraps off daemons `0..i`.
    pub fn start(n: usize) -> io::Result<Self> {
        let dir = ScratchDir::new("toxnet")?;
        let mut net = Self {
            dir,
            daemons: Vec::new(),
        };
        for i in 0..n.max(1) {
            let daemon = net.start_daemon(i)?;
            tracing::debug!(i, node = %daemon.udp, "tox-bootstrapd up");
            net.daemons.push(daemon);
        }
        Ok(net)
    }

    /// The daemons as DHT bootstrap nodes (UDP).
    pub fn nodes(&self) -> Vec<BootstrapNode> {
        self.daemons.iter().map(|d| d.udp.clone()).collect()
    }

    /// The daemons as TCP relays.
    pub fn tcp_relays(&self) -> Vec<BootstrapNode> {
        self.daemons.iter().map(|d| d.tcp.clone()).collect()
    }

    /// A node configuration that joins only this network: no public bootstrap, no LAN
    /// discovery, IPv4 only, the daemons as bootstrap nodes and TCP relays, identity in
    /// `data_dir`.
    pub fn config(&self, data_dir: impl Into<PathBuf>) -> ToxConfig {
        private_config(data_dir, self.nodes())
    }

    /// A fresh directory under this network's scratch directory (removed with it).
    pub fn scratch_dir(&self, name: &str) -> io::Result<PathBuf> {
        let d = self.dir.path.join(name);
        fs::create_dir_all(&d)?;
        Ok(d)
    }

    /// Starts a copy of the running executable as another peer on this network, with its
    /// identity in `name` under the scratch directory. The copy learns its role from
    /// [`child_config`]; it should print `id <TOXID>` on a line of its own once its node is up,
    /// and stop when its stdin closes ([`stdin_closed`]), which dropping the [`ChildPeer`] does.
    ///
    /// Benches put the two ends of a transfer in two processes as real peers are, so that
    /// neither process's scheduling or allocator hides the other's costs.
    pub fn spawn_child(&self, name: &str) -> io::Result<ChildPeer> {
        let nodes: Vec<String> = self.nodes().iter().map(|n| n.to_string()).collect();
        let mut child = Command::new(std::env::current_exe()?)
            .env(CHILD_DIR, self.scratch_dir(name)?)
            .env(CHILD_BOOTSTRAP, nodes.join(","))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| io::Error::other("child without stdout"))?;
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in io::BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Ok(ChildPeer { child, lines })
    }

    fn start_daemon(&self, i: usize) -> io::Result<Daemon> {
        let mut last_err = None;
        for attempt in 0..START_ATTEMPTS {
            let dir = self.dir.path.join(format!("bootstrapd{i}-{attempt}"));
            fs::create_dir_all(&dir)?;
            // One port for both, as public bootstrap nodes have: `--bootstrap PK@HOST:PORT`
            // then names the TCP relay too.
            let port = free_port()?;
            let (udp_port, tcp_port) = (port, port);
            match self.try_start(&dir, udp_port, tcp_port) {
                Ok(d) => return Ok(d),
                Err(e) => {
                    tracing::debug!(i, attempt, error = %e, "tox-bootstrapd did not start");
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.unwrap_or_else(|| io::Error::other("tox-bootstrapd did not start")))
    }

    fn try_start(&self, dir: &Path, udp_port: u16, tcp_port: u16) -> io::Result<Daemon> {
        let keys = dir.join("keys");
        let conf = dir.join("tox-bootstrapd.conf");
        fs::write(&conf, self.daemon_config(dir, &keys, udp_port, tcp_port))?;
        let log = fs::File::create(dir.join("log"))?;
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(SUPERVISOR)
            .arg("tox-bootstrapd")
            .arg(format!("--config={}", conf.display()))
            .arg("--foreground")
            .arg("--log-backend=stdout")
            .stdin(Stdio::piped())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let deadline = Instant::now() + START_TIMEOUT;
        let result = loop {
            if let Some(status) = child.try_wait()? {
                let log = fs::read_to_string(dir.join("log")).unwrap_or_default();
                if status.code() == Some(127) {
                    break Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        "tox-bootstrapd not found: install Debian package toxcore-utils",
                    ));
                }
                break Err(io::Error::other(format!(
                    "tox-bootstrapd exited with {status}: {}",
                    log.trim()
                )));
            }
            if let Some(pk) = read_key(&keys) {
                // The daemon writes its keys before binding its sockets: ready once both ports
                // are taken (and it is still alive, checked again on the next line).
                if port_taken_udp(udp_port) && port_taken_tcp(tcp_port) {
                    std::thread::sleep(Duration::from_millis(50));
                    if child.try_wait()?.is_none() {
                        break Ok(pk);
                    }
                    continue;
                }
            }
            if Instant::now() >= deadline {
                break Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "tox-bootstrapd did not come up in time",
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        match result {
            Ok(pk) => Ok(Daemon {
                child,
                udp: BootstrapNode::new(pk, "127.0.0.1", udp_port),
                tcp: BootstrapNode::new(pk, "127.0.0.1", tcp_port),
            }),
            Err(e) => {
                stop(&mut child, DAEMON_STOP_GRACE);
                Err(e)
            }
        }
    }

    fn daemon_config(&self, dir: &Path, keys: &Path, udp_port: u16, tcp_port: u16) -> String {
        let peers: Vec<String> = self
            .daemons
            .iter()
            .map(|d| {
                format!(
                    "  {{ address = \"127.0.0.1\"\n    port = {}\n    public_key = \"{}\" }}",
                    d.udp.port, d.udp.pk
                )
            })
            .collect();
        format!(
            "port = {udp_port}\n\
             keys_file_path = \"{keys}\"\n\
             pid_file_path = \"{pid}\"\n\
             enable_ipv6 = false\n\
             enable_ipv4_fallback = true\n\
             enable_lan_discovery = false\n\
             enable_tcp_relay = true\n\
             tcp_relay_ports = [{tcp_port}]\n\
             enable_motd = true\n\
             motd = \"fabric test network\"\n\
             bootstrap_nodes = (\n{peers}\n)\n",
            keys = keys.display(),
            pid = dir.join("pid").display(),
            peers = peers.join(",\n"),
        )
    }
}

impl Drop for ToxNet {
    fn drop(&mut self) {
        // Close every stdin first so the daemons stop in parallel.
        for d in &mut self.daemons {
            drop(d.child.stdin.take());
        }
        for d in &mut self.daemons {
            stop(&mut d.child, DAEMON_STOP_GRACE);
        }
    }
}

/// Where a [`ChildPeer`] keeps its identity.
const CHILD_DIR: &str = "TOXNET_CHILD_DIR";
/// The network's bootstrap nodes, comma-separated, for a [`ChildPeer`].
const CHILD_BOOTSTRAP: &str = "TOXNET_CHILD_BOOTSTRAP";

/// Another process on a [`ToxNet`] (see [`ToxNet::spawn_child`]). Dropping it closes the
/// child's stdin and waits for it to stop (killing it after 10 s).
#[derive(Debug)]
pub struct ChildPeer {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl ChildPeer {
    /// Waits up to `timeout` for the child's `id <TOXID>` line; lines before it are skipped.
    pub fn id(&self, timeout: Duration) -> io::Result<ToxId> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.lines.recv_timeout(left).map_err(|_| {
                io::Error::new(io::ErrorKind::TimedOut, "the child did not print its id")
            })?;
            if let Some(id) = line.strip_prefix("id ") {
                return id
                    .parse()
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e));
            }
        }
    }

    /// The child's further output, one line at a time, for a thread of the caller's (the
    /// child stays alive as long as this [`ChildPeer`]).
    pub fn take_lines(&mut self) -> std::sync::mpsc::Receiver<String> {
        std::mem::replace(&mut self.lines, std::sync::mpsc::channel().1)
    }
}

impl Drop for ChildPeer {
    fn drop(&mut self) {
        stop(&mut self.child, Duration::from_secs(10));
    }
}

/// In a process started by [`ToxNet::spawn_child`]: a node configuration for that network
/// (like [`ToxNet::config`]). `None` in any other process.
pub fn child_config() -> Option<ToxConfig> {
    let dir = std::env::var_os(CHILD_DIR)?;
    let nodes = std::env::var(CHILD_BOOTSTRAP)
        .unwrap_or_default()
        .split(',')
        .filter_map(|n| n.parse().ok())
        .collect();
    Some(private_config(dir, nodes))
}

/// A node that joins only `nodes`: no public bootstrap, no LAN discovery, IPv4 only. The
/// nodes are its TCP relays too, as `proxy --bootstrap` makes them (every daemon here serves
/// both on one port): a friend that learns our DHT key through the onion reaches us through
/// one of our relays at once, instead of waiting a second or two for the DHT to find our
/// address.
fn private_config(data_dir: impl Into<PathBuf>, nodes: Vec<BootstrapNode>) -> ToxConfig {
    let mut c = ToxConfig::new(data_dir);
    c.tcp_relays = nodes.clone();
    c.bootstrap = nodes;
    c.use_public_bootstrap = false;
    c.local_discovery = false;
    c.ipv6_enabled = false;
    c
}

/// In a child: completes when the parent closes the child's stdin (or dies).
pub fn stdin_closed() -> tokio::sync::oneshot::Receiver<()> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut sink = String::new();
        while io::stdin().read_line(&mut sink).is_ok_and(|n| n > 0) {
            sink.clear();
        }
        let _ = tx.send(());
    });
    rx
}

/// Stops a child that ends when its stdin closes (a supervised daemon, a [`ChildPeer`]); if it
/// is still there after `grace`, kills it.
fn stop(child: &mut Child, grace: Duration) {
    drop(child.stdin.take());
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return,
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A keys file is the daemon's public key (32 bytes) followed by its secret key (32 bytes).
fn read_key(path: &Path) -> Option<PublicKey> {
    let bytes = fs::read(path).ok()?;
    if bytes.len() != 2 * PUBLIC_KEY_SIZE {
        return None;
    }
    let mut pk = [0u8; PUBLIC_KEY_SIZE];
    pk.copy_from_slice(&bytes[..PUBLIC_KEY_SIZE]);
    Some(PublicKey(pk))
}

/// A port free for both UDP and TCP (on every address, as the daemons bind).
fn free_port() -> io::Result<u16> {
    for _ in 0..100 {
        let udp = UdpSocket::bind("0.0.0.0:0")?;
        let port = udp.local_addr()?.port();
        if TcpListener::bind(("0.0.0.0", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(io::Error::other("no port free for both UDP and TCP"))
}

// The daemons bind 0.0.0.0, so a bind on 127.0.0.1 conflicts with them.
fn port_taken_udp(port: u16) -> bool {
    UdpSocket::bind(("127.0.0.1", port)).is_err()
}

fn port_taken_tcp(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_err()
}

/// A directory under the system temp dir, removed on drop.
#[derive(Debug)]
struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    fn new(prefix: &str) -> io::Result<Self> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "{prefix}-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&path)?;
        Ok(Self { path })
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}
