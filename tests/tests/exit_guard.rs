//! The exit guards its host, end to end: `proxy exit` with its default policy in a namespace
//! whose interface has a public-class address, a client `proxy --exit` beside it, a private
//! Tox network, and a web server in a second namespace. A client cannot reach the exit's own
//! address, its connected prefix or the NAT64 form of either; `--deny-cidr` holds for NAT64
//! and 6to4 forms; and with the exit's IPv6 blackholed a dual-stack name connects in about
//! the IPv4 connect time (the figure is printed, not asserted).
//!
//! ```text
//!   exit ns: exg0 192.88.99.1/24, 2a00:5eed:1::1/64        web ns: exg1 192.88.98.2/24,
//!            Tox daemons, proxy exit, proxy client,  ◄──►          2a00:5eed:2::2/64
//!            a service on 0.0.0.0:8081                             HTTP on port 80
//! ```
//!
//! The addresses are public-class on purpose (the policy refuses documentation and private
//! ranges anyway, which would hide the finding), and unrouted: the namespaces have no link
//! beyond the veth pair between them, so nothing leaves them. Needs root, `nft` and curl;
//! skips with a message where namespaces are impossible.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tests::netns::{Proc, Scratch, nft_counter_packets, sh};
use tests::servers::{PAGE, proxy_bin, run_with_timeout};

const TOOL: &str = env!("CARGO_BIN_EXE_nst-tool");
/// The exit host's address and its connected prefix.
const EXIT_V4: &str = "192.88.99.1";
const EXIT_V6: &str = "2a00:5eed:1::1";
/// The web server in the other namespace.
const WEB_V4: &str = "192.88.98.2";
const WEB_V6: &str = "2a00:5eed:2::2";
/// The service on the exit host, bound to 0.0.0.0.
const SERVICE_PORT: &str = "8081";
const SOCKS: &str = "127.0.0.1:1080";
const HTTP: &str = "http://127.0.0.1:8080";

/// Why these tests cannot run here, or `None`.
fn unavailable() -> Option<String> {
    if let Some(why) = tests::netns::unavailable() {
        return Some(why);
    }
    for tool in ["nft", "curl"] {
        if Command::new(tool).arg("--version").output().is_err() {
            return Some(format!("no `{tool}`"));
        }
    }
    None
}

/// The two namespaces and the veth pair between them; removed on drop, with
/// `/etc/netns/<exit ns>` (its hosts file).
struct Lab {
    exit_ns: String,
    web_ns: String,
}

impl Lab {
    fn new(hosts: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let id = format!(
            "{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let me = Self {
            exit_ns: format!("exg-e-{id}"),
            web_ns: format!("exg-w-{id}"),
        };
        let (e, w) = (me.exit_ns.as_str(), me.web_ns.as_str());
        // The hosts file first: `ip netns exec` mounts it when a process starts.
        let dir = std::path::Path::new("/etc/netns").join(e);
        std::fs::create_dir_all(&dir).expect("/etc/netns/NS");
        std::fs::write(dir.join("hosts"), format!("127.0.0.1 localhost\n{hosts}"))
            .expect("hosts file");
        for cmd in [
            vec!["ip", "netns", "add", e],
            vec!["ip", "netns", "add", w],
            vec!["ip", "-n", e, "link", "set", "lo", "up"],
            vec!["ip", "-n", w, "link", "set", "lo", "up"],
            vec![
                "ip", "link", "add", "exg0", "netns", e, "type", "veth", "peer", "name", "exg1",
                "netns", w,
            ],
            vec![
                "ip",
                "-n",
                e,
                "addr",
                "add",
                "192.88.99.1/24",
                "dev",
                "exg0",
            ],
            vec![
                "ip",
                "-n",
                e,
                "addr",
                "add",
                "2a00:5eed:1::1/64",
                "dev",
                "exg0",
                "nodad",
            ],
            vec![
                "ip",
                "-n",
                w,
                "addr",
                "add",
                "192.88.98.2/24",
                "dev",
                "exg1",
            ],
            vec![
                "ip",
                "-n",
                w,
                "addr",
                "add",
                "2a00:5eed:2::2/64",
                "dev",
                "exg1",
                "nodad",
            ],
            vec!["ip", "-n", e, "link", "set", "exg0", "up"],
            vec!["ip", "-n", w, "link", "set", "exg1", "up"],
            // Each side reaches the other's prefix directly over the link.
            vec![
                "ip",
                "-n",
                e,
                "route",
                "add",
                "192.88.98.0/24",
                "dev",
                "exg0",
            ],
            vec![
                "ip",
                "-n",
                w,
                "route",
                "add",
                "192.88.99.0/24",
                "dev",
                "exg1",
            ],
            vec![
                "ip",
                "-n",
                e,
                "-6",
                "route",
                "add",
                "2a00:5eed:2::/64",
                "dev",
                "exg0",
            ],
            vec![
                "ip",
                "-n",
                w,
                "-6",
                "route",
                "add",
                "2a00:5eed:1::/64",
                "dev",
                "exg1",
            ],
        ] {
            sh(&cmd).expect("namespace setup");
        }
        me
    }

    fn in_exit_ns(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.exit_ns]).args(args);
        cmd
    }

    fn in_web_ns(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.web_ns]).args(args);
        cmd
    }

    /// Loads an nftables script into the exit's namespace.
    fn nft(&self, script: &str) {
        let file = std::env::temp_dir().join(format!("{}.nft", self.exit_ns));
        std::fs::write(&file, script).expect("write nft rules");
        let file_s = file.to_string_lossy().into_owned();
        let r = sh(&["ip", "netns", "exec", &self.exit_ns, "nft", "-f", &file_s]);
        let _ = std::fs::remove_file(&file);
        r.expect("nft rules");
    }

    /// Packets counted by the named counter of table `inet exg` in the exit's namespace.
    fn counter(&self, name: &str) -> u64 {
        let out = sh(&[
            "ip",
            "netns",
            "exec",
            &self.exit_ns,
            "nft",
            "list",
            "counter",
            "inet",
            "exg",
            name,
        ])
        .expect("nft list counter");
        nft_counter_packets(&String::from_utf8_lossy(&out.stdout))
    }

    /// A curl run in the exit's namespace (at most 60 s: the hang guard).
    fn curl(&self, args: &[&str]) -> std::process::Output {
        let mut full = vec!["curl", "--silent", "--show-error", "--max-time", "60"];
        full.extend_from_slice(args);
        run_with_timeout(&mut self.in_exit_ns(&full), Duration::from_secs(70)).expect("curl")
    }

    /// The HTTP status the client's HTTP proxy gives for `url`.
    fn status_via_proxy(&self, url: &str) -> String {
        let out = self.curl(&["-x", HTTP, "-o", "/dev/null", "-w", "%{http_code}", url]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// curl through the client's SOCKS5 listener: its exit code and error text.
    fn via_socks(&self, url: &str) -> (Option<i32>, String) {
        let out = self.curl(&["--socks5-hostname", SOCKS, url]);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // The processes inside are killed by their own guards, dropped before the lab.
        tests::netns::delete(&[&self.exit_ns, &self.web_ns]);
        let _ = std::fs::remove_dir_all(std::path::Path::new("/etc/netns").join(&self.exit_ns));
    }
}

/// What runs in the lab: the web server, the Tox network, the exit and its client. Dropped
/// (killed) in reverse order of declaration, before the lab that holds them.
struct Running {
    client: Proc,
    exit: Proc,
    _toxnet: Proc,
    _web: Proc,
    _dirs: (Scratch, Scratch),
}

fn start(lab: &Lab, exit_extra: &[&str]) -> Running {
    let web4 = format!("{WEB_V4}:80");
    let web6 = format!("[{WEB_V6}]:80");
    let web = Proc::spawn(
        lab.in_web_ns(&[TOOL, "serve", &web4, &web6, "--", WEB_V4]),
        "ready",
    );
    let toxnet = Proc::spawn(lab.in_exit_ns(&[TOOL, "toxnet", "4"]), "ready");
    let nodes = toxnet.ready_list();
    assert_eq!(nodes.len(), 4, "{}", toxnet.ready);
    let bin = proxy_bin().to_string_lossy().into_owned();
    let with_network = |mut args: Vec<String>| {
        args.extend(["--no-public-bootstrap".into(), "--no-public-stun".into()]);
        for n in &nodes {
            args.extend(["--bootstrap".into(), n.clone()]);
        }
        args
    };
    let exit_dir = Scratch::new("exit");
    let mut exit_args = vec![
        bin.clone(),
        "exit".into(),
        "--allow-any".into(),
        "--data-dir".into(),
        exit_dir.path(),
    ];
    exit_args.extend(exit_extra.iter().map(|s| s.to_string()));
    let exit_args = with_network(exit_args);
    let exit_args: Vec<&str> = exit_args.iter().map(String::as_str).collect();
    let exit = Proc::spawn(lab.in_exit_ns(&exit_args), "tox id:");
    let exit_id = exit.ready_value("tox id:");

    let client_dir = Scratch::new("client");
    let client_args = with_network(vec![
        bin,
        "--exit".into(),
        exit_id,
        "--socks".into(),
        SOCKS.into(),
        "--http".into(),
        HTTP.trim_start_matches("http://").into(),
        "--data-dir".into(),
        client_dir.path(),
        // The first request is held while the session comes up (about 9 s on a quiet
        // machine): room for a loaded one, inside curl's own 60 s.
        "--connect-timeout".into(),
        "50".into(),
    ]);
    let client_args: Vec<&str> = client_args.iter().map(String::as_str).collect();
    let client = Proc::spawn(lab.in_exit_ns(&client_args), "http listening on");
    Running {
        client,
        exit,
        _toxnet: toxnet,
        _web: web,
        _dirs: (exit_dir, client_dir),
    }
}

/// The client's first request, made while its session to the exit is still coming up: the
/// client holds it for the session (up to its connect timeout) and it must get `want`.
fn first_status(lab: &Lab, run: &Running, url: &str, want: &str) {
    let got = lab.status_via_proxy(url);
    assert_eq!(
        got,
        want,
        "{url}\nclient:\n{}\nexit:\n{}",
        run.client.stderr(),
        run.exit.stderr()
    );
}

/// `url` is refused by the exit's policy through both front-ends: HTTP 403, and SOCKS5 reply 2
/// ("not allowed by ruleset", which curl shows in parentheses and exits 97 for).
fn assert_refused(lab: &Lab, run: &Running, url: &str) {
    assert_eq!(
        lab.status_via_proxy(url),
        "403",
        "{url}\nexit:\n{}",
        run.exit.stderr()
    );
    let (code, err) = lab.via_socks(url);
    assert_eq!(code, Some(97), "{url}: {err}");
    assert!(err.contains("(2)"), "{url}: {err}");
}

#[test]
fn the_exit_refuses_its_own_addresses_and_prefix() {
    if let Some(why) = unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    let lab = Lab::new(&format!("{EXIT_V4} self.test\n"));
    // Every packet to the service's port that reaches the exit host, loopback included.
    lab.nft(&format!(
        "add table inet exg\n\
         add counter inet exg service\n\
         add chain inet exg input {{ type filter hook input priority 0; }}\n\
         add rule inet exg input tcp dport {SERVICE_PORT} counter name service\n"
    ));
    let service_addr = format!("0.0.0.0:{SERVICE_PORT}");
    let _service = Proc::spawn(
        lab.in_exit_ns(&[TOOL, "serve", &service_addr, "--", WEB_V4]),
        "ready",
    );
    let run = start(&lab, &[]);
    // The web server is public and not the exit's: allowed by the default policy.
    first_status(&lab, &run, &format!("http://{WEB_V4}/index.html"), "200");

    let own = |host: &str| format!("http://{host}:{SERVICE_PORT}/index.html");
    for host in [
        EXIT_V4.to_owned(),
        // A neighbour in the exit's connected prefix (no host has it).
        "192.88.99.77".to_owned(),
        // The exit's address by name, and in NAT64 and IPv6 form.
        "self.test".to_owned(),
        "[64:ff9b::c058:6301]".to_owned(),
        format!("[{EXIT_V6}]"),
    ] {
        assert_refused(&lab, &run, &own(&host));
    }
    assert_eq!(
        lab.counter("service"),
        0,
        "the service on the exit host saw a connection"
    );
    // The service is really there, and counted: the host itself can reach it.
    let url = own(EXIT_V4);
    let out = lab.curl(&[url.as_str()]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), PAGE);
    assert!(lab.counter("service") > 0);
}

#[test]
fn deny_cidr_holds_for_nat64_and_6to4_forms() {
    if let Some(why) = unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    let lab = Lab::new("");
    let run = start(&lab, &["--deny-cidr", "192.88.98.0/24"]);
    first_status(&lab, &run, &format!("http://{WEB_V4}/index.html"), "403");
    // 192.88.98.2 in the NAT64 well-known and local-use prefixes, and in 6to4.
    for host in [
        "[64:ff9b::c058:6202]",
        "[64:ff9b:1::c058:6202]",
        "[2002:c058:6202::1]",
    ] {
        assert_refused(&lab, &run, &format!("http://{host}/index.html"));
    }
}

/// A measurement, not a speed test: prints how long a fetch of a dual-stack name takes
/// through an exit whose IPv6 packets are dropped, beside an IPv4-only name.
#[test]
fn dual_stack_name_with_blackholed_ipv6_prints_the_connect_time() {
    if let Some(why) = unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    let lab = Lab::new(&format!(
        "{WEB_V6} dual.test\n{WEB_V4} dual.test\n{WEB_V4} v4.test\n"
    ));
    // IPv6 to the web server vanishes without an answer, as on a VPS with broken IPv6.
    lab.nft(
        "add table inet exg\n\
         add chain inet exg output { type filter hook output priority 0; }\n\
         add rule inet exg output ip6 daddr 2a00:5eed:2::/64 drop\n",
    );
    let run = start(&lab, &[]);
    // The premise: IPv6 to the server does not connect, IPv4 does.
    let v6 = lab.curl(&["--connect-timeout", "2", &format!("http://[{WEB_V6}]/")]);
    assert_eq!(v6.status.code(), Some(28), "IPv6 is not blackholed: {v6:?}");
    first_status(&lab, &run, "http://v4.test/index.html", "200");

    let time = |name: &str| -> f64 {
        let out = lab.curl(&[
            "--socks5-hostname",
            SOCKS,
            "-o",
            "/dev/null",
            "-w",
            "%{time_total}",
            &format!("http://{name}/index.html"),
        ]);
        assert!(
            out.status.success(),
            "{name}: {}\nexit:\n{}",
            String::from_utf8_lossy(&out.stderr),
            run.exit.stderr()
        );
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("curl's time_total")
    };
    for round in 1..=3 {
        let v4 = time("v4.test");
        let dual = time("dual.test");
        eprintln!(
            "round {round}: fetch through the exit, IPv4-only name {:.0} ms, dual-stack name \
             with blackholed IPv6 {:.0} ms",
            v4 * 1000.0,
            dual * 1000.0
        );
    }
}
