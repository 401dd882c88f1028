//! Linux network namespaces for the TUN tests: a client namespace and a server namespace joined
//! by a veth pair, or ([`Topology::routed`]) with a router namespace between them, with IPv4
//! and IPv6, removed on drop (deleting a namespace deletes its devices, routes and rules with
//! it).

use std::io::{self, BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::servers::{capture_lines, proxy_bin, run_with_timeout};

/// Why a namespace test cannot run here, or `None` when it can (root, `ip`, `/dev/net/tun`).
pub fn unavailable() -> Option<String> {
    if !Path::new("/dev/net/tun").exists() {
        return Some("no /dev/net/tun".into());
    }
    match Command::new("ip").args(["netns", "list"]).output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            return Some(format!(
                "`ip netns` failed (not root?): {}",
                String::from_utf8_lossy(&o.stderr)
            ));
        }
        Err(e) => return Some(format!("no `ip` command: {e}")),
    }
    static PROBE: AtomicU32 = AtomicU32::new(0);
    let probe = format!(
        "tun5-probe-{}-{}",
        std::process::id(),
        PROBE.fetch_add(1, Ordering::Relaxed)
    );
    let ok = Command::new("ip")
        .args(["netns", "add", &probe])
        .status()
        .is_ok_and(|s| s.success());
    let _ = Command::new("ip").args(["netns", "del", &probe]).status();
    if !ok {
        return Some("cannot create a network namespace (not root?)".into());
    }
    None
}

/// Runs a command, failing with its stderr when it exits non-zero.
pub fn sh(args: &[&str]) -> io::Result<Output> {
    let out = run_with_timeout(
        Command::new(args[0]).args(&args[1..]),
        Duration::from_secs(30),
    )?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(out)
}

/// Two namespaces: `client` (10.N.0.1, fdN::1) and `server` (10.N.0.2, fdN::2) on one veth
/// link; the client's default routes point at the server. Or, [`Topology::routed`], a real
/// machine's setup: the client's LAN holds only the router, and the server is beyond it.
#[derive(Debug)]
pub struct Topology {
    /// The client namespace's name.
    pub client: String,
    /// The server namespace's name.
    pub server: String,
    /// The client end of the veth pair.
    pub client_if: String,
    /// The server's IPv4 address.
    pub server_v4: String,
    /// The server's IPv6 address.
    pub server_v6: String,
    /// The router namespace between them ([`Topology::routed`] only).
    pub router: Option<String>,
    /// The router's IPv4 address on the client's LAN ([`Topology::routed`] only): a host on
    /// the client's connected network.
    pub router_lan_v4: Option<String>,
    /// The router's IPv6 address on the client's LAN ([`Topology::routed`] only).
    pub router_lan_v6: Option<String>,
    /// The router's interface on the client's LAN ([`Topology::routed`] only).
    pub router_lan_if: Option<String>,
}

impl Topology {
    /// Creates the namespaces (names start with `tun5-`, unique per process and call).
    pub fn new() -> io::Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}{}", std::process::id() % 100_000, n);
        // A subnet per topology so parallel tests never share addresses.
        let net = 200 + (std::process::id() + n) % 50;
        let me = Self {
            client: format!("tun5-c-{id}"),
            server: format!("tun5-s-{id}"),
            client_if: format!("nst{id}c"),
            server_v4: format!("10.{net}.0.2"),
            server_v6: format!("fd{net:02x}::2"),
            router: None,
            router_lan_v4: None,
            router_lan_v6: None,
            router_lan_if: None,
        };
        let server_if = format!("nst{id}s");
        sh(&["ip", "netns", "add", &me.client])?;
        sh(&["ip", "netns", "add", &me.server])?;
        let c = me.client.as_str();
        let s = me.server.as_str();
        let ci = me.client_if.as_str();
        let si = server_if.as_str();
        let c4 = format!("10.{net}.0.1/24");
        let s4 = format!("{}/24", me.server_v4);
        let c6 = format!("fd{net:02x}::1/64");
        let s6 = format!("{}/64", me.server_v6);
        for cmd in [
            vec![
                "ip", "link", "add", ci, "netns", c, "type", "veth", "peer", "name", si, "netns", s,
            ],
            vec!["ip", "-n", c, "addr", "add", &c4, "dev", ci],
            vec!["ip", "-n", s, "addr", "add", &s4, "dev", si],
            vec!["ip", "-n", c, "addr", "add", &c6, "dev", ci, "nodad"],
            vec!["ip", "-n", s, "addr", "add", &s6, "dev", si, "nodad"],
            vec!["ip", "-n", c, "link", "set", ci, "up"],
            vec!["ip", "-n", s, "link", "set", si, "up"],
            vec!["ip", "-n", c, "link", "set", "lo", "up"],
            vec!["ip", "-n", s, "link", "set", "lo", "up"],
            vec![
                "ip",
                "-n",
                c,
                "route",
                "add",
                "default",
                "via",
                &me.server_v4,
            ],
            vec![
                "ip",
                "-n",
                c,
                "-6",
                "route",
                "add",
                "default",
                "via",
                &me.server_v6,
            ],
        ] {
            sh(&cmd)?;
        }
        Ok(me)
    }

    /// Three namespaces: `client` (10.N.0.1/24, fdN::1/64, its LAN) whose default routes
    /// point at `router` (10.N.0.254, fdN::fe on the LAN; 10.N.1.1, fdN:1::1 beyond), which
    /// forwards to `server` (10.N.1.2, fdN:1::2). No NAT: the server sees the client's address.
    pub fn routed() -> io::Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}r{}", std::process::id() % 100_000, n);
        // Namespaces keep topologies apart; distinct subnets only make logs unambiguous.
        let net = 250 + std::process::id() % 5;
        let (lan, wan) = ((2 * n) % 256, (2 * n + 1) % 256);
        let lan4 = format!("10.{net}.{lan}");
        let wan4 = format!("10.{net}.{wan}");
        let lan6 = format!("fd{net:02x}:{lan:x}:");
        let wan6 = format!("fd{net:02x}:{wan:x}:");
        let me = Self {
            client: format!("tun5-c-{id}"),
            server: format!("tun5-s-{id}"),
            client_if: format!("nst{id}c"),
            server_v4: format!("{wan4}.2"),
            server_v6: canonical_v6(&format!("{wan6}:2")),
            router: Some(format!("tun5-r-{id}")),
            router_lan_v4: Some(format!("{lan4}.254")),
            router_lan_v6: Some(canonical_v6(&format!("{lan6}:fe"))),
            router_lan_if: Some(format!("nst{id}l")),
        };
        let router = me.router.clone().unwrap_or_default();
        let (c, r, s) = (me.client.as_str(), router.as_str(), me.server.as_str());
        // Each namespace is deleted on drop once created, also when a later step fails.
        sh(&["ip", "netns", "add", c])?;
        sh(&["ip", "netns", "add", r])?;
        sh(&["ip", "netns", "add", s])?;
        let ci = me.client_if.as_str();
        let rl = me.router_lan_if.clone().unwrap_or_default();
        let (rw, si) = (format!("nst{id}w"), format!("nst{id}s"));
        let rlan4 = format!("{lan4}.254");
        let rwan4 = format!("{wan4}.1");
        let rlan6 = format!("{lan6}:fe");
        let rwan6 = format!("{wan6}:1");
        let addr = |ns: &str, a: String, dev: &str| -> Vec<String> {
            let mut cmd = ["ip", "-n", ns, "addr", "add", &a, "dev", dev]
                .map(String::from)
                .to_vec();
            if a.contains(':') {
                // No duplicate address detection: the address works at once.
                cmd.push("nodad".into());
            }
            cmd
        };
        let up = |ns: &str, dev: &str| -> Vec<String> {
            ["ip", "-n", ns, "link", "set", dev, "up"]
                .map(String::from)
                .to_vec()
        };
        // Link-local addresses usable at once (no duplicate address detection): tests talk
        // to the router's link-local address, and a tentative source address cannot send.
        let no_dad = |ns: &str, dev: &str| -> Vec<String> {
            let script = format!("echo 0 > /proc/sys/net/ipv6/conf/{dev}/accept_dad");
            ["ip", "netns", "exec", ns, "sh", "-c", &script]
                .map(String::from)
                .to_vec()
        };
        let via = |ns: &str, fam: &str, gw: &str| -> Vec<String> {
            ["ip", "-n", ns, fam, "route", "add", "default", "via", gw]
                .map(String::from)
                .to_vec()
        };
        let cmds: Vec<Vec<String>> = vec![
            ["ip", "link", "add", ci, "netns", c, "type", "veth", "peer", "name", &rl, "netns", r]
                .map(String::from)
                .to_vec(),
            ["ip", "link", "add", &rw, "netns", r, "type", "veth", "peer", "name", &si, "netns", s]
                .map(String::from)
                .to_vec(),
            addr(c, format!("{lan4}.1/24"), ci),
            addr(c, format!("{lan6}:1/64"), ci),
            addr(r, format!("{rlan4}/24"), &rl),
            addr(r, format!("{rlan6}/64"), &rl),
            addr(r, format!("{rwan4}/24"), &rw),
            addr(r, format!("{rwan6}/64"), &rw),
            addr(s, format!("{}/24", me.server_v4), &si),
            addr(s, format!("{}/64", me.server_v6), &si),
            no_dad(c, ci),
            no_dad(r, &rl),
            up(c, ci),
            up(c, "lo"),
            up(r, &rl),
            up(r, &rw),
            up(r, "lo"),
            up(s, &si),
            up(s, "lo"),
            via(c, "-4", &rlan4),
            via(c, "-6", &rlan6),
            via(s, "-4", &rwan4),
            via(s, "-6", &rwan6),
            // /proc/sys/net belongs to the namespace of the process that writes it.
            ["ip", "netns", "exec", r, "sh", "-c",
             "echo 1 > /proc/sys/net/ipv4/ip_forward && echo 1 > /proc/sys/net/ipv6/conf/all/forwarding"]
                .map(String::from)
                .to_vec(),
        ];
        for cmd in &cmds {
            let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
            sh(&cmd)?;
        }
        Ok(me)
    }

    /// Runs `args` inside the router namespace ([`Topology::routed`] only).
    pub fn in_router(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.router.as_deref().unwrap_or("none")])
            .args(args);
        cmd
    }

    /// Runs `args` inside the client namespace.
    pub fn in_client(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.client]).args(args);
        cmd
    }

    /// Runs `args` inside the server namespace.
    pub fn in_server(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.server]).args(args);
        cmd
    }

    /// `ip -n client <args>` output as text.
    pub fn client_ip(&self, args: &[&str]) -> io::Result<String> {
        let mut full = vec!["ip", "-n", &self.client];
        full.extend_from_slice(args);
        Ok(String::from_utf8_lossy(&sh(&full)?.stdout).into_owned())
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Processes still inside keep a namespace's devices alive; they are the tests' children
        // and are killed by their own guards first.
        delete(&[&self.client, &self.server]);
        if let Some(router) = &self.router {
            delete(&[router]);
        }
    }
}

/// An IPv6 address as the tools print it (`fd01::2`, not `fd01:0::2`).
fn canonical_v6(addr: &str) -> String {
    addr.parse::<std::net::Ipv6Addr>()
        .map_or_else(|_| addr.to_owned(), |a| a.to_string())
}

/// The packet count in what `nft list counter ...` printed.
pub fn nft_counter_packets(listing: &str) -> u64 {
    listing
        .split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no packet count in {listing}"))
}

/// Deletes these network namespaces (with their devices, routes and rules), ignoring any
/// that is gone already.
pub fn delete(names: &[&str]) {
    for name in names {
        let _ = Command::new("ip").args(["netns", "del", name]).status();
    }
}

/// A child process killed on drop, its stderr collected (for tests that run processes inside
/// namespaces).
#[derive(Debug)]
pub struct Proc {
    /// The process.
    pub child: Child,
    stderr: Arc<Mutex<String>>,
    /// The line that said the process was ready.
    pub ready: String,
}

impl Proc {
    /// Spawns `cmd` and waits (at most 60 s) for a line of its output containing `ready`.
    /// Its `RUST_LOG` is `PROXY_LOG`, else `proxy=debug,netstack=debug,fabric=debug` (what
    /// the tests read, and what a failure needs shown).
    pub fn spawn(mut cmd: Command, ready: &str) -> Self {
        let log = std::env::var("PROXY_LOG")
            .unwrap_or_else(|_| "proxy=debug,netstack=debug,fabric=debug".into());
        let mut child = cmd
            .env("RUST_LOG", log)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let out = child.stdout.take().expect("stdout");
        let err = child.stderr.take().expect("stderr");
        let tx2 = tx.clone();
        thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        capture_lines(err, stderr.clone(), Some(tx2));
        let mut me = Self {
            child,
            stderr,
            ready: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.contains(ready) => {
                    me.ready = line;
                    return me;
                }
                Ok(_) => {}
                Err(_) => panic!("{ready:?} never came; stderr:\n{}", me.stderr()),
            }
        }
    }

    /// The ready line without `prefix` and surrounding blanks (`"tox id: ID"` → `ID`).
    pub fn ready_value(&self, prefix: &str) -> String {
        self.ready
            .trim()
            .trim_start_matches(prefix)
            .trim()
            .to_owned()
    }

    /// The words of the ready line after the first: the addresses `nst-tool toxnet` prints
    /// after "ready".
    pub fn ready_list(&self) -> Vec<String> {
        self.ready
            .split_whitespace()
            .skip(1)
            .map(String::from)
            .collect()
    }

    /// What it wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Waits (at most `limit`) until its stderr holds `needle`; `false` if it never did. The
    /// ready line comes by stdout, and a thread of its own reads stderr: a line written
    /// before the ready one may not have been read yet when `spawn` returns.
    pub fn wait_stderr(&self, needle: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if self.stderr().contains(needle) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGINT, then the exit status within `limit`.
    pub fn interrupt(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A scratch directory for one process's identity (`--data-dir`), removed on drop.
#[derive(Debug)]
pub struct Scratch(std::path::PathBuf);

impl Scratch {
    /// A fresh directory named after this test process, a counter (tests of one binary may
    /// run as threads of one process) and `name`.
    pub fn new(name: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("netns-{}-{n}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Self(dir)
    }

    /// The directory, as an argument.
    pub fn path(&self) -> String {
        self.0.to_string_lossy().into_owned()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A private Tox network of four daemons and a `proxy exit --allow-any` in the server
/// namespace (files in /etc/netns/SERVER must exist before this starts it), and the client
/// arguments that reach that exit over the veth link (which a looping Tox socket would
/// miss).
#[derive(Debug)]
pub struct ExitOverTox {
    _toxnet: Proc,
    /// The exit.
    pub exit: Proc,
    /// The daemons' ports.
    pub ports: Vec<u16>,
    client: Vec<String>,
    _dirs: (Scratch, Scratch),
}

impl ExitOverTox {
    /// Starts them; `tool` is the `nst-tool` binary (which runs the daemons), `exit_extra`
    /// more flags for the exit.
    pub fn start(topo: &Topology, tool: &str, exit_extra: &[&str]) -> Self {
        Self::start_as(topo, tool, exit_extra, None)
    }

    /// The same as mesh peers: the server-side node (`proxy exit`, called nas by the client,
    /// which it calls laptop) shares `share` (`PORTS`) of its loopback with the client and
    /// gives it no exit right; the client's arguments name it `--peer nas=ID`, not `--exit`.
    pub fn start_mesh(topo: &Topology, tool: &str, share: &str) -> Self {
        Self::start_as(topo, tool, &[], Some(share))
    }

    fn start_as(topo: &Topology, tool: &str, exit_extra: &[&str], share: Option<&str>) -> Self {
        let toxnet = Proc::spawn(topo.in_server(&[tool, "toxnet", "4"]), "ready");
        let nodes = toxnet.ready_list();
        assert_eq!(nodes.len(), 4, "{}", toxnet.ready);
        let ports = nodes
            .iter()
            .map(|n| {
                n.rsplit(':')
                    .next()
                    .and_then(|p| p.parse().ok())
                    .expect("port")
            })
            .collect();
        let bin = proxy_bin().to_string_lossy().into_owned();
        let exit_dir = Scratch::new("exit");
        let exit_data = exit_dir.path();
        let client_dir = Scratch::new("client");
        let mesh_args: Vec<String> = match share {
            Some(ports) => {
                let out = Command::new(&bin)
                    .args(["id", "--data-dir", &client_dir.path()])
                    .output()
                    .expect("proxy id");
                assert!(out.status.success(), "proxy id: {out:?}");
                let client_id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                vec![
                    "--peer".into(),
                    format!("laptop={client_id}"),
                    "--share".into(),
                    format!("laptop:{ports}"),
                ]
            }
            None => vec!["--allow-any".into()],
        };
        let mut exit_args = vec![bin.as_str(), "exit"];
        exit_args.extend(mesh_args.iter().map(String::as_str));
        exit_args.extend_from_slice(exit_extra);
        // Tests never reach the public bootstrap nodes or STUN servers.
        exit_args.extend([
            "--no-public-bootstrap",
            "--no-public-stun",
            "--data-dir",
            &exit_data,
        ]);
        // The exit, too, reaches the daemons at the server's address, not at 127.0.0.1: the
        // DHT then knows it by an address the client can reach, as a real exit's neighbours
        // know it, and Tox finds the direct UDP path between them at once. (Known by
        // 127.0.0.1, the exit was reached directly only once it had found the client itself,
        // so sessions rode a TCP relay for a while or for good.)
        let bootstrap: Vec<String> = nodes
            .iter()
            .map(|n| n.replace("127.0.0.1", &topo.server_v4))
            .collect();
        for n in &bootstrap {
            exit_args.extend(["--bootstrap", n.as_str()]);
        }
        let exit = Proc::spawn(topo.in_server(&exit_args), "tox id:");
        let exit_id = exit.ready_value("tox id:");
        let mut client = match share {
            Some(_) => vec!["--peer".to_owned(), format!("nas={exit_id}")],
            None => vec!["--exit".to_owned(), exit_id],
        };
        client.extend([
            "--no-public-bootstrap".into(),
            "--no-public-stun".into(),
            "--data-dir".into(),
            client_dir.path(),
            // Requests made while the session comes up (about 9 s on a quiet machine) are
            // held for it: room for a loaded machine.
            "--connect-timeout".into(),
            "90".into(),
        ]);
        for n in &nodes {
            client.extend([
                "--bootstrap".into(),
                n.replace("127.0.0.1", &topo.server_v4),
            ]);
        }
        Self {
            _toxnet: toxnet,
            exit,
            ports,
            client,
            _dirs: (exit_dir, client_dir),
        }
    }

    /// The client's flags: `--exit ID`, the bootstrap nodes, a private network only.
    pub fn client_args(&self) -> Vec<&str> {
        self.client.iter().map(String::as_str).collect()
    }
}

/// `/etc/netns/NS/FILE`, which `ip netns exec NS` shows as `/etc/FILE` (`resolv.conf`,
/// `hosts`); the namespace's directory is removed on drop.
#[derive(Debug)]
pub struct EtcFile(std::path::PathBuf);

impl EtcFile {
    /// Writes `contents` to `/etc/netns/NS/FILE`.
    pub fn new(ns: &str, file: &str, contents: &str) -> Self {
        let dir = Path::new("/etc/netns").join(ns);
        std::fs::create_dir_all(&dir).expect("/etc/netns/NS");
        std::fs::write(dir.join(file), contents).expect("/etc/netns/NS/FILE");
        Self(dir)
    }

    /// A `resolv.conf` naming one nameserver.
    pub fn resolv_conf(ns: &str, nameserver: &str) -> Self {
        Self::new(ns, "resolv.conf", &format!("nameserver {nameserver}\n"))
    }
}

impl Drop for EtcFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
