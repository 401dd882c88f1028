//! `proxy --tun` in network namespaces, laid out as a real machine's: a client namespace whose
//! default routes (IPv4 and IPv6) are captured by the TUN of `proxy --tun`, its LAN holding a
//! router namespace, and beyond the router a server namespace with HTTP, DNS and UDP echo
//! servers (`nst-tool serve`). The LAN stays outside the TUN unless `--tun-lan`; the Internet
//! (the server) is captured. Real clients (curl, `nst-tool dns|echo`) run in the client
//! namespace; nft counters prove DNS leaves only through the proxy; after SIGINT no device,
//! route, rule or nftables table is left.
//!
//! Needs root (network namespaces, TUN); skips with a message where namespaces are impossible.

use std::process::Command;
use std::time::{Duration, Instant};

use tests::netns::{
    EtcFile, ExitOverTox, Proc, Scratch, Topology, nft_counter_packets, unavailable,
};
use tests::servers::{check_big, proxy_bin, run_with_timeout};

const TOOL: &str = env!("CARGO_BIN_EXE_nst-tool");
const MARK: &str = "0x00007478";

fn run_ok(mut cmd: Command) -> String {
    let out = run_with_timeout(&mut cmd, Duration::from_secs(60)).expect("run");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn skip() -> bool {
    if let Some(why) = unavailable() {
        eprintln!("SKIPPED: TUN tests need network namespaces: {why}");
        return true;
    }
    false
}

/// Starts the servers in the server namespace; its DNS answers every name with 192.0.2.77.
fn servers(topo: &Topology) -> Proc {
    servers_answering(topo, "192.0.2.77")
}

/// The same, its DNS answering every name with `answer`.
fn servers_answering(topo: &Topology, answer: &str) -> Proc {
    let http4 = format!("{}:80", topo.server_v4);
    let http6 = format!("[{}]:80", topo.server_v6);
    Proc::spawn(
        topo.in_server(&[TOOL, "serve", &http4, &http6, "--", answer]),
        "ready",
    )
}

fn start_proxy(topo: &Topology, extra: &[&str]) -> Proc {
    let bin = proxy_bin().to_string_lossy().into_owned();
    let mut args = vec![bin.as_str(), "--tun", "--socks", "off", "--http", "off"];
    args.extend_from_slice(extra);
    Proc::spawn(topo.in_client(&args), "tun mode up")
}

/// Counters of DNS packets leaving the client namespace by its real link: marked (sent by the
/// proxy itself) and unmarked (a leak).
fn install_dns_counters(topo: &Topology) {
    let rules = format!(
        "table inet nstleak {{
            counter leak {{ }}
            counter proxied {{ }}
            chain out {{
                type filter hook postrouting priority 0; policy accept;
                oifname \"{i}\" meta l4proto {{ tcp, udp }} th dport 53 meta mark != {MARK} counter name \"leak\"
                oifname \"{i}\" meta l4proto {{ tcp, udp }} th dport 53 meta mark {MARK} counter name \"proxied\"
            }}
        }}",
        i = topo.client_if
    );
    let path = std::env::temp_dir().join(format!("{}.nft", topo.client));
    std::fs::write(&path, rules).expect("write nft rules");
    run_ok(topo.in_client(&["nft", "-f", &path.to_string_lossy()]));
    let _ = std::fs::remove_file(path);
}

fn counter(topo: &Topology, name: &str) -> u64 {
    table_counter(topo, "nstleak", name)
}

/// `proc`'s stderr once `what` holds for it (at most 30 s; then as it is, for the assertion
/// that follows to show). A flow's line is logged when the proxy's relay ends, which may be
/// after the client got its answer, and is read by another thread: never check it at once.
fn log_once(proc: &Proc, what: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = proc.stderr();
        if what(&log) || Instant::now() > deadline {
            return log;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn curl(topo: &Topology, url: &str) -> Vec<u8> {
    let mut cmd = topo.in_client(&["curl", "--silent", "--show-error", "--max-time", "30", url]);
    let out = run_with_timeout(&mut cmd, Duration::from_secs(60)).expect("curl");
    assert!(
        out.status.success(),
        "curl {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Routes and rules this process's TUN mode leaves behind in the client namespace.
/// Stops `proxy` as Ctrl-C would and checks that it exited with success within 15 s and left
/// no rule, route or nft table behind.
fn stop_cleanly(proxy: &mut Proc, topo: &Topology) {
    let status = proxy
        .interrupt(Duration::from_secs(15))
        .expect("the proxy exits within 15 s of SIGINT");
    assert!(status.success(), "exit status {status:?}");
    let left = leftovers(topo);
    assert!(left.is_empty(), "{left:#?}");
}

fn leftovers(topo: &Topology) -> Vec<String> {
    let mut left = Vec::new();
    for fam in ["-4", "-6"] {
        let rules = topo.client_ip(&[fam, "rule"]).unwrap_or_default();
        left.extend(
            rules
                .lines()
                .filter(|l| l.contains("2981") || l.contains("0x7478"))
                .map(|l| format!("rule {fam}: {l}")),
        );
        for table in ["29816", "29817"] {
            let routes = topo
                .client_ip(&[fam, "route", "show", "table", table])
                .unwrap_or_default();
            left.extend(routes.lines().map(|l| format!("route {fam} {table}: {l}")));
        }
    }
    let links = topo.client_ip(&["link"]).unwrap_or_default();
    left.extend(
        links
            .lines()
            .filter(|l| l.contains(": tun"))
            .map(|l| format!("link: {l}")),
    );
    let tables = run_ok(topo.in_client(&["nft", "list", "tables"]));
    left.extend(
        tables
            .lines()
            .filter(|l| l.contains("proxy_tun"))
            .map(|l| format!("nft: {l}")),
    );
    left
}

#[test]
fn tun_direct_http_dns_udp_ipv4_ipv6_and_cleanup() {
    if skip() {
        return;
    }
    let topo = Topology::routed().expect("namespaces");
    let _servers = servers(&topo);
    install_dns_counters(&topo);

    // Control: without the proxy, a query leaves unmarked and the leak counter sees it.
    let dns4 = format!("{}:53", topo.server_v4);
    let dns6 = format!("[{}]:53", topo.server_v6);
    let got = run_ok(topo.in_client(&[TOOL, "dns", &dns4, "control.test"]));
    assert_eq!(got.trim(), "192.0.2.77");
    assert!(counter(&topo, "leak") >= 1, "the leak counter counts leaks");
    run_ok(topo.in_client(&["nft", "reset", "counters", "table", "inet", "nstleak"]));

    let mut proxy = start_proxy(&topo, &[]);
    let links = topo.client_ip(&["-s", "link", "show"]).unwrap();
    assert!(links.contains(": tun"), "no tun device:\n{links}");

    // HTTP over IPv4 and IPv6, small and large, content checked.
    let page = curl(&topo, &format!("http://{}/index.html", topo.server_v4));
    assert!(String::from_utf8_lossy(&page).contains("static text"));
    let n = 8 * 1024 * 1024 + 3;
    check_big(
        &curl(&topo, &format!("http://{}/big/{n}", topo.server_v4)),
        n,
    );
    check_big(
        &curl(&topo, &format!("http://[{}]/big/{n}", topo.server_v6)),
        n,
    );
    let (v4, v6) = (
        format!("dst={}:80", topo.server_v4),
        format!("dst=[{}]:80", topo.server_v6),
    );
    let log = log_once(&proxy, |l| l.contains(&v4) && l.contains(&v6));
    assert!(
        log.contains(&v4) && log.contains(&v6),
        "the flows did not go through the tun:\n{log}"
    );

    // DNS to the server's address, UDP and TCP, IPv4 and IPv6: answered, and only the proxy's
    // own (marked) packets left by the real link.
    for (server, proto) in [
        (&dns4, "udp"),
        (&dns4, "tcp"),
        (&dns6, "udp"),
        (&dns6, "tcp"),
    ] {
        let got = run_ok(topo.in_client(&[TOOL, "dns", server, "leak.test", proto]));
        assert_eq!(got.trim(), "192.0.2.77", "{server} {proto}");
    }
    assert_eq!(counter(&topo, "leak"), 0, "DNS leaked around the tun");
    assert!(
        counter(&topo, "proxied") >= 4,
        "DNS did not go out through the proxy"
    );

    // UDP round trips, IPv4 and IPv6; replies come from the address the client sent to.
    let echo4 = format!("{}:7", topo.server_v4);
    let echo6 = format!("[{}]:7", topo.server_v6);
    let got = run_ok(topo.in_client(&[TOOL, "echo", &echo4, "hello-v4"]));
    assert_eq!(got.trim(), format!("hello-v4 from {echo4}"));
    let got = run_ok(topo.in_client(&[TOOL, "echo", &echo6, "hello-v6"]));
    assert_eq!(got.trim(), format!("hello-v6 from {echo6}"));

    // Ctrl-C: a clean exit, and nothing left behind.
    assert!(leftovers(&topo).len() >= 4, "routing was not installed");
    let status = proxy
        .interrupt(Duration::from_secs(15))
        .expect("proxy exits");
    assert!(status.success(), "exit status {status:?}");
    let left = leftovers(&topo);
    assert!(left.is_empty(), "left behind after SIGINT: {left:#?}");
}

#[test]
fn tun_route_only_and_exclude() {
    if skip() {
        return;
    }
    let topo = Topology::routed().expect("namespaces");
    let _servers = servers(&topo);
    let mut proxy = start_proxy(&topo, &["--tun-exclude", &format!("{}/32", topo.server_v4)]);
    // Excluded: goes straight out, the proxy never sees the flow.
    let page = curl(&topo, &format!("http://{}/index.html", topo.server_v4));
    assert!(String::from_utf8_lossy(&page).contains("static text"));
    let log = proxy.stderr();
    assert!(
        !log.contains(&format!("dst={}:80", topo.server_v4)),
        "excluded network went through the tun:\n{log}"
    );
    // IPv6 is not excluded: through the tun.
    let page = curl(&topo, &format!("http://[{}]/index.html", topo.server_v6));
    assert!(String::from_utf8_lossy(&page).contains("static text"));
    let v6 = format!("dst=[{}]:80", topo.server_v6);
    assert!(log_once(&proxy, |l| l.contains(&v6)).contains(&v6));
    stop_cleanly(&mut proxy, &topo);

    // Route only the IPv6 server network: IPv4 traffic goes straight out, DNS is still captured.
    install_dns_counters(&topo);
    let v6net = format!("{}/64", topo.server_v6.trim_end_matches('2'));
    let mut proxy = start_proxy(&topo, &["--tun-route", &v6net]);
    let page = curl(&topo, &format!("http://{}/index.html", topo.server_v4));
    assert!(String::from_utf8_lossy(&page).contains("static text"));
    assert!(
        !proxy
            .stderr()
            .contains(&format!("dst={}:80", topo.server_v4))
    );
    let page = curl(&topo, &format!("http://[{}]/index.html", topo.server_v6));
    assert!(String::from_utf8_lossy(&page).contains("static text"));
    let v6 = format!("dst=[{}]:80", topo.server_v6);
    assert!(log_once(&proxy, |l| l.contains(&v6)).contains(&v6));
    let dns4 = format!("{}:53", topo.server_v4);
    let got = run_ok(topo.in_client(&[TOOL, "dns", &dns4, "routed.test"]));
    assert_eq!(got.trim(), "192.0.2.77");
    assert_eq!(counter(&topo, "leak"), 0, "DNS escaped a route-only tun");
    stop_cleanly(&mut proxy, &topo);
}

/// Counters in the client namespace for the Tox traffic to the private network's ports: by
/// the real link (`tox_out`) or anywhere else, i.e. into the TUN (`tox_looped`).
fn install_tox_counters(topo: &Topology, ports: &[u16]) {
    let ports = ports
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let rules = format!(
        "table inet nsttox {{
            counter tox_out {{ }}
            counter tox_looped {{ }}
            chain out {{
                type filter hook postrouting priority 0; policy accept;
                oifname \"{i}\" meta l4proto {{ tcp, udp }} th dport {{ {ports} }} counter name \"tox_out\"
                oifname != \"{i}\" oifname != \"lo\" meta l4proto {{ tcp, udp }} th dport {{ {ports} }} counter name \"tox_looped\"
            }}
        }}",
        i = topo.client_if
    );
    let path = std::env::temp_dir().join(format!("{}.tox.nft", topo.client));
    std::fs::write(&path, rules).expect("write nft rules");
    run_ok(topo.in_client(&["nft", "-f", &path.to_string_lossy()]));
    let _ = std::fs::remove_file(path);
}

fn table_counter(topo: &Topology, table: &str, name: &str) -> u64 {
    nft_counter_packets(&run_ok(
        topo.in_client(&["nft", "list", "counter", "inet", table, name]),
    ))
}

/// A request made right after the client starts, while its session to the exit is still
/// coming up: the client holds it (up to the connect timeout `ExitOverTox` gives it) instead
/// of refusing it, so one try must do. (Also for transfers through Tox that may be slow.)
fn curl_first(topo: &Topology, url: &str, proxy: &Proc) -> Vec<u8> {
    let mut cmd = topo.in_client(&["curl", "--silent", "--show-error", "--max-time", "100", url]);
    let out = run_with_timeout(&mut cmd, Duration::from_secs(110)).expect("curl");
    assert!(
        out.status.success(),
        "curl {url} was not held for the session: {}\nproxy:\n{}",
        String::from_utf8_lossy(&out.stderr),
        proxy.stderr()
    );
    out.stdout
}

/// The first request through an exit, the server's page by address: held until the session
/// is up, then served whole.
fn first_page_by_address(topo: &Topology, proxy: &Proc) {
    let page = curl_first(
        topo,
        &format!("http://{}/index.html", topo.server_v4),
        proxy,
    );
    assert!(String::from_utf8_lossy(&page).contains("static text"));
}

/// The cgroups named after `pid` in the cgroup v2 hierarchy, seen from a private mount.
fn cgroups_of(pid: u32) -> String {
    let script = format!(
        "mount -t cgroup2 cgroup2 /sys/fs/cgroup && find /sys/fs/cgroup -maxdepth 3 -name 'proxy-tun-{pid}'"
    );
    run_ok({
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "sh", "-c", &script]);
        cmd
    })
}

#[test]
fn tun_through_an_exit_over_tox() {
    if skip() {
        return;
    }
    let topo = Topology::routed().expect("namespaces");
    let _servers = servers(&topo);
    // `ip netns exec` mounts /etc/netns/NS/hosts over /etc/hosts when the exit starts; the
    // fake-IP part below needs the exit to resolve web.test.
    let _hosts = EtcFile::new(
        &topo.server,
        "hosts",
        &format!("127.0.0.1 localhost\n{} web.test\n", topo.server_v4),
    );
    // The exit answers its clients' DNS with the server's resolver (never the machine's own).
    let exit_dns = topo.server_v4.clone();
    let net = ExitOverTox::start(&topo, TOOL, &["--allow-private", "--dns", &exit_dns]);
    install_dns_counters(&topo);
    install_tox_counters(&topo, &net.ports);
    let extra = net.client_args();
    let mut proxy = start_proxy(&topo, &extra);
    let pid = proxy.child.id();
    assert!(
        cgroups_of(pid).contains(&format!("proxy-tun-{pid}")),
        "the proxy has no cgroup of its own"
    );

    // HTTP through the TUN and the exit, small and large, content checked.
    first_page_by_address(&topo, &proxy);
    // Bulk speed over Tox is the fabric benches' business; this checks the content.
    let n = 512 * 1024 + 5;
    let started = Instant::now();
    // The held request's time limit: on a loaded machine, beside other Tox tests, half a MiB
    // through Tox may take longer than an ordinary request's 30 s.
    check_big(
        &curl_first(&topo, &format!("http://{}/big/{n}", topo.server_v4), &proxy),
        n,
    );
    eprintln!("{n} bytes through the exit in {:?}", started.elapsed());

    // DNS, UDP and TCP: answered by the exit's resolver, so no port-53 packet leaves the
    // client namespace at all, marked or not.
    let dns4 = format!("{}:53", topo.server_v4);
    for proto in ["udp", "tcp"] {
        let got = run_ok(topo.in_client(&[TOOL, "dns", &dns4, "exit.test", proto]));
        assert_eq!(got.trim(), "192.0.2.77", "{proto}");
    }
    assert_eq!(counter(&topo, "leak"), 0, "DNS leaked around the tun");
    assert_eq!(
        counter(&topo, "proxied"),
        0,
        "DNS left the client namespace instead of going through the exit"
    );
    // UDP round trip through the exit.
    let echo4 = format!("{}:7", topo.server_v4);
    let got = run_ok(topo.in_client(&[TOOL, "echo", &echo4, "hello-exit"]));
    assert_eq!(got.trim(), format!("hello-exit from {echo4}"));

    // c-toxcore's own sockets went out by the real link, never into the TUN.
    assert!(
        table_counter(&topo, "nsttox", "tox_out") > 0,
        "no Tox traffic seen"
    );
    assert_eq!(
        table_counter(&topo, "nsttox", "tox_looped"),
        0,
        "Tox traffic looped into the tun"
    );

    // Ctrl-C: a clean exit; no route, rule, device, nftables table or cgroup left.
    let status = proxy
        .interrupt(Duration::from_secs(20))
        .expect("proxy exits");
    assert!(
        status.success(),
        "exit status {status:?}\n{}",
        proxy.stderr()
    );
    let left = leftovers(&topo);
    assert!(left.is_empty(), "left behind after SIGINT: {left:#?}");
    let tables = run_ok(topo.in_client(&["nft", "list", "tables"]));
    assert!(!tables.contains("proxy_tun"), "nft table left: {tables}");
    assert!(cgroups_of(pid).trim().is_empty(), "cgroup left behind");

    // Fake-IP through the exit: the client answers the lookup with a fake address and sends
    // the name; the exit resolves it itself (its hosts file, made before it started, knows
    // web.test; the client's world does not).
    let _resolv = EtcFile::resolv_conf(&topo.client, &topo.server_v4);
    let mut fake_args = extra.clone();
    fake_args.push("--fake-ip");
    let mut proxy = start_proxy(&topo, &fake_args);
    let n = 256 * 1024 + 3;
    let url = format!("http://web.test/big/{n}");
    let page = std::panic::catch_unwind(|| curl_first(&topo, &url, &proxy)).unwrap_or_else(|_| {
        panic!(
            "no fake-IP fetch through the exit\nproxy:\n{}\nexit:\n{}",
            proxy.stderr(),
            net.exit.stderr()
        )
    });
    check_big(&page, n);
    let log = log_once(&proxy, |l| l.contains("fake address"));
    assert!(
        log.contains("fake address"),
        "the lookup was not answered with a fake address:\n{log}"
    );
    let exit_log = log_once(&net.exit, |l| l.contains("web.test:80"));
    assert!(
        exit_log.contains("web.test:80"),
        "the exit was not given the name:\n{exit_log}"
    );
    assert_eq!(counter(&topo, "leak"), 0, "DNS leaked around the tun");
    let status = proxy
        .interrupt(Duration::from_secs(20))
        .expect("proxy exits");
    assert!(status.success(), "exit status {status:?}");
    assert!(leftovers(&topo).is_empty());
    drop(net);
}

#[test]
fn tun_fake_ip_dials_names() {
    if skip() {
        return;
    }
    let topo = Topology::routed().expect("namespaces");
    // The server's DNS answers every name with the server's own address.
    let _servers = servers_answering(&topo, &topo.server_v4);
    let _resolv = EtcFile::resolv_conf(&topo.client, &topo.server_v4);
    install_dns_counters(&topo);
    let mut proxy = start_proxy(&topo, &["--fake-ip"]);

    // A lookup in the client namespace gets a fake address, the same one every time.
    let dns4 = format!("{}:53", topo.server_v4);
    let first = run_ok(topo.in_client(&[TOOL, "dns", &dns4, "web.test"]));
    let fake: std::net::Ipv4Addr = first.trim().parse().expect("an IPv4 answer");
    assert_eq!(fake.octets()[..2], [198, 18], "not a fake address: {fake}");
    let again = run_ok(topo.in_client(&[TOOL, "dns", &dns4, "WEB.test"]));
    assert_eq!(again.trim(), first.trim(), "names are case-insensitive");
    let other = run_ok(topo.in_client(&[TOOL, "dns", &dns4, "other.test"]));
    assert_ne!(other.trim(), first.trim());
    assert_eq!(
        counter(&topo, "leak") + counter(&topo, "proxied"),
        0,
        "fake answers need no resolver"
    );

    // curl by name: the system resolver gets the fake address, the proxy dials the name
    // (resolving it itself, through its marked sockets) and the content arrives.
    let page = curl(&topo, "http://web.test/index.html");
    assert!(String::from_utf8_lossy(&page).contains("static text"));
    let n = 1024 * 1024 + 7;
    check_big(&curl(&topo, &format!("http://web.test/big/{n}")), n);
    // curl may take the A or the AAAA answer.
    let fake6 = "[fc00::10]:80";
    let went_fake = |log: &str| {
        (log.contains(&format!("dst={fake}:80")) || log.contains(&format!("dst={fake6}")))
            && log.contains("fake address")
    };
    let log = log_once(&proxy, went_fake);
    assert!(
        went_fake(&log),
        "the flow did not go to a fake address:\n{log}"
    );
    assert_eq!(counter(&topo, "leak"), 0, "the proxy's own lookup leaked");
    assert!(
        counter(&topo, "proxied") >= 1,
        "the proxy did not resolve the name itself"
    );

    // A fake address nobody was given: refused, not dialed.
    let mut cmd = topo.in_client(&[
        "curl",
        "--silent",
        "--max-time",
        "10",
        "http://198.19.200.200/",
    ]);
    let out = run_with_timeout(&mut cmd, Duration::from_secs(30)).expect("curl");
    assert!(!out.status.success(), "an unknown fake address was dialed");

    stop_cleanly(&mut proxy, &topo);
    let pid = proxy.child.id();
    assert!(cgroups_of(pid).trim().is_empty(), "cgroup left behind");
}

/// `proxy --tun --exit` on an ordinary machine: the client's resolver is a private address
/// (a home router's) that means nothing at the exit, and the exit keeps its default policy
/// (private destinations refused; only the web server is allowed by `--allow-cidr`). Every
/// captured query, whatever its type, is answered by the exit's own resolver (its
/// resolv.conf), also when it comes from a local stub on 127.0.0.53, and no port-53 packet
/// leaves the client's uplink.
#[test]
fn tun_exit_answers_dns_with_its_own_resolver() {
    if skip() {
        return;
    }
    let topo = Topology::routed().expect("namespaces");
    // The web server; its DNS, the exit's resolver, answers every name with its address.
    let _servers = servers_answering(&topo, &topo.server_v4);
    // Written before the processes start: `ip netns exec` mounts them at start.
    let _exit_resolv = EtcFile::resolv_conf(&topo.server, &topo.server_v4);
    let home_router = "192.168.77.1";
    let _client_resolv = EtcFile::resolv_conf(&topo.client, home_router);

    let web_only = format!("{}/32", topo.server_v4);
    let net = ExitOverTox::start(&topo, TOOL, &["--allow-cidr", &web_only]);
    install_dns_counters(&topo);
    let extra = net.client_args();
    let proxy = start_proxy(&topo, &extra);

    // The first request, by address, waits for the session. (A lookup made before the
    // session is up is given up after the resolver's own few seconds, as resolvers do.)
    first_page_by_address(&topo, &proxy);
    // By name, through the system resolver of the client namespace (the home router).
    let page = curl_first(&topo, "http://web.test/index.html", &proxy);
    assert!(String::from_utf8_lossy(&page).contains("static text"));

    let router = format!("{home_router}:53");
    for proto in ["udp", "tcp"] {
        let got = run_ok(topo.in_client(&[TOOL, "dns", &router, "web.test", proto]));
        assert_eq!(got.trim(), topo.server_v4, "{proto}");
    }
    // AAAA and HTTPS (type 65, which every browser asks) come back answered too.
    for qtype in ["28", "65", "15"] {
        let got = run_ok(topo.in_client(&[TOOL, "dns", &router, "web.test", "udp", qtype]));
        assert_eq!(got.trim(), "rcode 0 answers 1", "type {qtype}");
    }
    // A local stub resolver (as systemd-resolved on 127.0.0.53) whose upstream is the router.
    let _stub = Proc::spawn(
        topo.in_client(&[TOOL, "stub", "127.0.0.53:53", &router]),
        "ready",
    );
    let got = run_ok(topo.in_client(&[TOOL, "dns", "127.0.0.53:53", "stub.web.test"]));
    assert_eq!(got.trim(), topo.server_v4);

    // 1,000 distinct lookups, each from a new socket as resolvers send them: every one is
    // answered (no UDP flow at the exit per lookup, nothing to run out of). The rate is
    // printed, against the same lookups asked of the resolver directly in the exit's
    // namespace; speed goals are the benchmark's business, not this test's.
    let through = run_ok(topo.in_client(&[TOOL, "lookups", &router, "1000", "8"]));
    eprintln!("through tun + exit: {through}");
    assert!(through.starts_with("answered 1000 of 1000"), "{through}");
    let resolver = format!("{}:53", topo.server_v4);
    let direct = run_ok(topo.in_server(&[TOOL, "lookups", &resolver, "1000", "8"]));
    eprintln!("directly at the exit: {direct}");

    assert_eq!(counter(&topo, "leak"), 0, "DNS leaked around the tun");
    assert_eq!(
        counter(&topo, "proxied"),
        0,
        "DNS left the client namespace instead of going through the exit"
    );
    assert!(
        !net.exit.stderr().contains(home_router),
        "the exit was asked for the home router:\n{}",
        net.exit.stderr()
    );
}

/// Packets a server-namespace nft counter saw, from the table `nstudp`.
fn server_counter(topo: &Topology, name: &str) -> u64 {
    nft_counter_packets(&run_ok(
        topo.in_server(&["nft", "list", "counter", "inet", "nstudp", name]),
    ))
}

/// A UDP flow to a fake address (a QUIC connection, say) reaches one server for its whole
/// life, although the exit's resolver gives a different address for every query, as a CDN's
/// rotating answers do: the exit resolves the name once per flow, not per datagram.
#[test]
fn tun_fake_ip_udp_flow_keeps_one_server_address() {
    if skip() {
        return;
    }
    let topo = Topology::routed().expect("namespaces");
    let second = topo
        .server_v4
        .rsplit_once('.')
        .map(|(net, _)| format!("{net}.3"))
        .expect("an IPv4 server address");
    run_ok(topo.in_server(&["ip", "addr", "add", &format!("{second}/32"), "dev", "lo"]));
    // The exit's resolver answers the two addresses in turn.
    let _servers = servers_answering(&topo, &format!("{},{second}", topo.server_v4));
    let _exit_resolv = EtcFile::resolv_conf(&topo.server, &topo.server_v4);
    let home_router = "192.168.77.1";
    let _client_resolv = EtcFile::resolv_conf(&topo.client, home_router);
    // Datagrams to either address on port 4433 are counted and dropped (no port unreachable
    // comes back to disturb the flow).
    let rules = format!(
        "table inet nstudp {{
            counter first {{ }}
            counter second {{ }}
            chain input {{
                type filter hook input priority 0; policy accept;
                ip daddr {} udp dport 4433 counter name \"first\" drop
                ip daddr {second} udp dport 4433 counter name \"second\" drop
            }}
        }}",
        topo.server_v4
    );
    run_ok(topo.in_server(&["nft", &rules]));

    let wan = format!("{}/24", topo.server_v4);
    let net = ExitOverTox::start(&topo, TOOL, &["--allow-cidr", &wan]);
    let mut extra = net.client_args();
    extra.push("--fake-ip");
    let proxy = start_proxy(&topo, &extra);
    // Wait for the session: the first request by address is held until it is up.
    first_page_by_address(&topo, &proxy);

    let router = format!("{home_router}:53");
    let fake = run_ok(topo.in_client(&[TOOL, "dns", &router, "quic.test"]));
    let fake = fake.trim();
    assert!(fake.starts_with("198.1"), "not a fake address: {fake}");
    let sent = run_ok(topo.in_client(&[TOOL, "blast", &format!("{fake}:4433"), "10000"]));
    assert_eq!(sent.trim(), "sent 10000");
    // Datagrams may be lost on the way (UDP, and a datagram queue that drops when full);
    // every one that arrives must arrive at the one address.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (first, second) = loop {
        let counts = (
            server_counter(&topo, "first"),
            server_counter(&topo, "second"),
        );
        if counts.0 + counts.1 >= 9_000 || Instant::now() > deadline {
            break counts;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("datagrams at the first address: {first}, at the second: {second}");
    assert!(
        (first == 0) != (second == 0),
        "the flow's datagrams went to both addresses (or none): {first} and {second}\nexit:\n{}",
        net.exit.stderr()
    );
    assert!(
        first + second > 0,
        "no datagram arrived:\n{}",
        proxy.stderr()
    );
}

/// A flow to the TUN's own prefix would be dialed with the mark, routed by `main`'s connected
/// route back into the TUN, and become a new flow again and again until file descriptors run
/// out: it is refused at once, and the proxy holds no more descriptors after a burst of them.
#[test]
fn tun_refuses_flows_to_its_own_prefix() {
    if skip() {
        return;
    }
    let topo = Topology::routed().expect("namespaces");
    let _servers = servers(&topo);
    let proxy = start_proxy(&topo, &[]);
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", proxy.child.id()))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    let before = fds();
    for _ in 0..20 {
        let mut cmd =
            topo.in_client(&["curl", "--silent", "--max-time", "5", "http://172.19.0.2/"]);
        let out = run_with_timeout(&mut cmd, Duration::from_secs(30)).expect("curl");
        assert!(!out.status.success(), "172.19.0.2 answered");
    }
    // A datagram (the echo tool waits 6 s for an answer that must not come).
    let mut cmd = topo.in_client(&[TOOL, "echo", "172.19.0.2:7", "loop"]);
    let out = run_with_timeout(&mut cmd, Duration::from_secs(30)).expect("echo");
    assert!(!out.status.success(), "172.19.0.2 echoed");
    let after = fds();
    assert!(
        after <= before + 4,
        "descriptors grew from {before} to {after}"
    );
    let log = log_once(&proxy, |l| l.contains("the tun's own prefix"));
    assert!(log.contains("the tun's own prefix"), "{log}");
    // The tunnel still works.
    let page = curl(&topo, &format!("http://{}/index.html", topo.server_v4));
    assert!(String::from_utf8_lossy(&page).contains("static text"));
}

/// With an exit, a TUN that cannot get IPv6 on a host that has IPv6 would let all IPv6 go
/// around the exit: the proxy refuses to start, saying why.
#[test]
fn tun_with_an_exit_and_no_ipv6_on_the_tun_refuses_to_start() {
    if skip() {
        return;
    }
    let topo = Topology::routed().expect("namespaces");
    // New interfaces get no IPv6; the uplink keeps its IPv6 address.
    // (/proc/sys/net belongs to the namespace of the process that writes it.)
    run_ok(topo.in_client(&[
        "sh",
        "-c",
        "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6",
    ]));
    assert!(topo.client_ip(&["-6", "addr"]).unwrap().contains("fd"));
    let bin = proxy_bin().to_string_lossy().into_owned();
    let exit_dir = Scratch::new("exit");
    let exit_id = run_ok({
        let mut cmd = Command::new(&bin);
        cmd.args(["id", "--data-dir", &exit_dir.path()]);
        cmd
    });
    let client_dir = Scratch::new("client");
    let mut cmd = topo.in_client(&[
        bin.as_str(),
        "--tun",
        "--socks",
        "off",
        "--http",
        "off",
        "--exit",
        exit_id.trim(),
        "--no-public-bootstrap",
        "--no-public-stun",
        "--data-dir",
        &client_dir.path(),
    ]);
    let out = run_with_timeout(&mut cmd, Duration::from_secs(60)).expect("proxy");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot get IPv6"), "{stderr}");
    assert!(leftovers(&topo).is_empty(), "{:?}", leftovers(&topo));
}

/// `--tun` is one node with the listeners, status and metrics of the default mode, not a mode
/// that silently drops them.
#[test]
fn tun_mode_runs_the_listeners_status_and_metrics() {
    if skip() {
        return;
    }
    let topo = Topology::routed().expect("namespaces");
    let _servers = servers(&topo);
    let bin = proxy_bin().to_string_lossy().into_owned();
    let proxy = Proc::spawn(
        topo.in_client(&[
            bin.as_str(),
            "--tun",
            "--socks",
            ":1080",
            "--http",
            ":8080",
            "--metrics",
            ":9100",
        ]),
        "tun mode up",
    );
    let url = format!("http://{}/index.html", topo.server_v4);
    let page = run_ok(topo.in_client(&[
        "curl",
        "--silent",
        "--max-time",
        "20",
        "--socks5",
        "127.0.0.1:1080",
        &url,
    ]));
    assert!(page.contains("static text"), "{page}");
    let page = run_ok(topo.in_client(&[
        "curl",
        "--silent",
        "--max-time",
        "20",
        "-x",
        "http://[::1]:8080",
        &url,
    ]));
    assert!(page.contains("static text"), "{page}");
    let status = run_ok(topo.in_client(&[bin.as_str(), "status", "--from", "127.0.0.1:8080"]));
    assert!(status.starts_with("proxy direct"), "{status}");
    assert!(status.contains("accepted"), "{status}");
    let metrics = run_ok(topo.in_client(&[
        "curl",
        "--silent",
        "--max-time",
        "20",
        "http://127.0.0.1:9100/metrics",
    ]));
    assert!(
        metrics.contains("proxy_frontend_connections_total 3"),
        "{metrics}\n{}",
        proxy.stderr()
    );
}

/// TUN flows are bounded: beyond `--max-connections` TCP flows a new one is reset at once,
/// and `proxy status` counts it.
#[test]
fn tun_tcp_flows_are_bounded_and_refusals_counted() {
    if skip() {
        return;
    }
    let topo = Topology::routed().expect("namespaces");
    let _servers = servers(&topo);
    let sink = format!("{}:9000", topo.server_v4);
    let _sink = Proc::spawn(topo.in_server(&[TOOL, "sink", &sink]), "ready");
    let bin = proxy_bin().to_string_lossy().into_owned();
    let _proxy = Proc::spawn(
        topo.in_client(&[
            bin.as_str(),
            "--tun",
            "--socks",
            "off",
            "--http",
            ":8080",
            "--max-connections",
            "2",
        ]),
        "tun mode up",
    );
    let _held = Proc::spawn(topo.in_client(&[TOOL, "hold", &sink, "2", "60"]), "held 2");
    let url = format!("http://{}/index.html", topo.server_v4);
    let mut cmd = topo.in_client(&["curl", "--silent", "--max-time", "20", &url]);
    let out = run_with_timeout(&mut cmd, Duration::from_secs(30)).expect("curl");
    assert!(!out.status.success(), "a third flow got through");
    let status = run_ok(topo.in_client(&[bin.as_str(), "status", "--from", "127.0.0.1:8080"]));
    assert!(status.contains("TUN flows refused"), "{status}");
}

/// Counters of TCP packets to `dst` port 80 leaving the client namespace by its real link:
/// with the proxy's mark (the proxy dialed it: the flow went through the TUN) or without
/// (the application's own packets: the flow went directly).
fn install_web_counters(topo: &Topology, dst4: &str, dst6: &str) {
    let rules = format!(
        "table inet nstlan {{
            counter direct {{ }}
            counter proxied {{ }}
            chain out {{
                type filter hook postrouting priority 0; policy accept;
                oifname \"{i}\" ip daddr {dst4} tcp dport 80 meta mark != {MARK} counter name \"direct\"
                oifname \"{i}\" ip6 daddr {dst6} tcp dport 80 meta mark != {MARK} counter name \"direct\"
                oifname \"{i}\" ip daddr {dst4} tcp dport 80 meta mark {MARK} counter name \"proxied\"
                oifname \"{i}\" ip6 daddr {dst6} tcp dport 80 meta mark {MARK} counter name \"proxied\"
            }}
        }}",
        i = topo.client_if
    );
    let path = std::env::temp_dir().join(format!("{}.lan.nft", topo.client));
    std::fs::write(&path, rules).expect("write nft rules");
    run_ok(topo.in_client(&["nft", "-f", &path.to_string_lossy()]));
    let _ = std::fs::remove_file(path);
}

/// The proxy with its HTTP listener on 127.0.0.1:8080, for `proxy status`.
fn start_proxy_with_status(topo: &Topology, extra: &[&str]) -> Proc {
    let bin = proxy_bin().to_string_lossy().into_owned();
    let mut args = vec![bin.as_str(), "--tun", "--socks", "off", "--http", ":8080"];
    args.extend_from_slice(extra);
    Proc::spawn(topo.in_client(&args), "tun mode up")
}

fn proxy_status(topo: &Topology) -> String {
    let bin = proxy_bin().to_string_lossy().into_owned();
    run_ok(topo.in_client(&[bin.as_str(), "status", "--from", "127.0.0.1:8080"]))
}

/// The client's connected networks (its LAN, where the router is) stay outside the TUN: a
/// flow to the router goes out directly, unmarked, and the proxy never sees it, while the
/// server beyond the router is captured. `--tun-lan` captures the LAN too. `proxy status`
/// says which.
#[test]
fn tun_keeps_the_lan_local_unless_tun_lan() {
    if skip() {
        return;
    }
    let topo = Topology::routed().expect("namespaces");
    let _servers = servers(&topo);
    let router4 = topo.router_lan_v4.clone().expect("routed");
    let router6 = topo.router_lan_v6.clone().expect("routed");
    // A web server on the LAN: the router's own page.
    let _lan_web = Proc::spawn(
        topo.in_router(&[
            TOOL,
            "serve",
            &format!("{router4}:80"),
            &format!("[{router6}]:80"),
            "--",
            "192.0.2.77",
        ]),
        "ready",
    );
    install_web_counters(&topo, &router4, &router6);
    let lan4 = format!("{}.0/24", router4.rsplit_once('.').expect("v4").0);
    let lan6: std::net::Ipv6Addr = router6.parse().expect("v6");
    let lan6 = format!(
        "{}/64",
        std::net::Ipv6Addr::from_bits(lan6.to_bits() & (u128::MAX << 64))
    );

    let mut proxy = start_proxy_with_status(&topo, &[]);
    for url in [
        format!("http://{router4}/index.html"),
        format!("http://[{router6}]/index.html"),
    ] {
        let page = curl(&topo, &url);
        assert!(String::from_utf8_lossy(&page).contains("static text"));
    }
    // The Internet still goes through the TUN.
    let page = curl(&topo, &format!("http://{}/index.html", topo.server_v4));
    assert!(String::from_utf8_lossy(&page).contains("static text"));
    let internet = format!("dst={}:80", topo.server_v4);
    let log = log_once(&proxy, |l| l.contains(&internet));
    assert!(
        log.contains(&internet),
        "the Internet was not captured:\n{log}"
    );
    assert!(
        !log.contains(&format!("dst={router4}:80"))
            && !log.contains(&format!("dst=[{router6}]:80")),
        "the LAN went through the tun:\n{log}"
    );
    assert!(
        table_counter(&topo, "nstlan", "direct") > 0,
        "no direct LAN packet seen"
    );
    assert_eq!(
        table_counter(&topo, "nstlan", "proxied"),
        0,
        "the proxy dialed the LAN"
    );
    let status = proxy_status(&topo);
    for line in [
        "captured: 0.0.0.0/0, ::/0".to_owned(),
        format!("LAN, kept local (--tun-lan captures it): {lan4}, {lan6}"),
        "the tun's own prefixes, flows to them refused: 172.19.0.0/30, fd00:7478::/126".into(),
        "strict route: off".into(),
    ] {
        assert!(status.contains(&line), "{line:?} missing:\n{status}");
    }
    stop_cleanly(&mut proxy, &topo);

    // --tun-lan: the LAN is captured and dialed by the proxy.
    run_ok(topo.in_client(&["nft", "reset", "counters", "table", "inet", "nstlan"]));
    let mut proxy = start_proxy_with_status(&topo, &["--tun-lan"]);
    let status = proxy_status(&topo);
    assert!(
        status.contains(&format!("LAN, captured (--tun-lan): {lan4}, {lan6}")),
        "{status}"
    );
    for url in [
        format!("http://{router4}/index.html"),
        format!("http://[{router6}]/index.html"),
    ] {
        let page = curl(&topo, &url);
        assert!(String::from_utf8_lossy(&page).contains("static text"));
    }
    let (lan_v4, lan_v6) = (format!("dst={router4}:80"), format!("dst=[{router6}]:80"));
    let log = log_once(&proxy, |l| l.contains(&lan_v4) && l.contains(&lan_v6));
    assert!(
        log.contains(&lan_v4) && log.contains(&lan_v6),
        "--tun-lan did not capture the LAN:\n{log}"
    );
    assert_eq!(
        table_counter(&topo, "nstlan", "direct"),
        0,
        "a LAN flow went around the tun"
    );
    assert!(
        table_counter(&topo, "nstlan", "proxied") > 0,
        "the proxy did not dial the LAN"
    );
    stop_cleanly(&mut proxy, &topo);
}

/// The router's link-local IPv6 address on the client's LAN.
fn router_link_local(topo: &Topology) -> String {
    let dev = topo.router_lan_if.clone().expect("routed");
    let out = run_ok(topo.in_router(&[
        "ip", "-6", "-o", "addr", "show", "dev", &dev, "scope", "link",
    ]));
    out.split_whitespace()
        .skip_while(|w| *w != "inet6")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .unwrap_or_else(|| panic!("no link-local address in {out}"))
        .to_owned()
}

/// Runs `nst-tool dns --dev UPLINK SERVER NAME PROTO` in the client namespace; its answer, or
/// `None` if it got none.
fn bound_query(topo: &Topology, server: &str, proto: &str) -> Option<String> {
    let mut cmd = topo.in_client(&[
        TOOL,
        "dns",
        "--dev",
        &topo.client_if,
        server,
        "bound.test",
        proto,
    ]);
    let out = run_with_timeout(&mut cmd, Duration::from_secs(60)).expect("nst-tool dns");
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Strict route: resolvers bound to the uplink (`SO_BINDTODEVICE`, as systemd-resolved's
/// per-link servers) and link-local IPv6 resolvers match no route into the TUN. With an exit
/// their queries are rejected instead of leaving by the uplink, while unbound queries to the
/// same resolver are captured and answered through the exit. Direct, they are left alone.
#[test]
fn tun_strict_route_rejects_queries_bound_to_the_uplink() {
    if skip() {
        return;
    }
    let topo = Topology::routed().expect("namespaces");
    // The server's DNS is the exit's resolver.
    let _servers = servers(&topo);
    let router4 = topo.router_lan_v4.clone().expect("routed");
    // A resolver on the LAN, as a home router is.
    let _resolver = Proc::spawn(
        topo.in_router(&[TOOL, "serve", &format!("{router4}:80"), "--", "192.0.2.66"]),
        "ready",
    );
    let dns4 = format!("{router4}:53");
    let link_local = format!("[{}]:53", router_link_local(&topo));
    install_dns_counters(&topo);

    // Control: without the proxy, the bound queries leave by the uplink and the counter sees
    // them (the link-local one gets no answer: nothing listens there).
    assert_eq!(
        bound_query(&topo, &dns4, "udp").as_deref(),
        Some("192.0.2.66")
    );
    let _ = bound_query(&topo, &link_local, "udp");
    assert!(
        counter(&topo, "leak") >= 2,
        "the leak counter counts bound queries"
    );
    run_ok(topo.in_client(&["nft", "reset", "counters", "table", "inet", "nstleak"]));

    // Direct: a bound query leaves by the uplink, as the proxy would send it.
    let mut proxy = start_proxy(&topo, &[]);
    assert_eq!(
        bound_query(&topo, &dns4, "udp").as_deref(),
        Some("192.0.2.66")
    );
    stop_cleanly(&mut proxy, &topo);
    run_ok(topo.in_client(&["nft", "reset", "counters", "table", "inet", "nstleak"]));

    // Through an exit: rejected, UDP and TCP, never out by the uplink.
    let web_only = format!("{}/32", topo.server_v4);
    let net = ExitOverTox::start(
        &topo,
        TOOL,
        &["--allow-cidr", &web_only, "--dns", &topo.server_v4],
    );
    let extra = net.client_args();
    let mut proxy = start_proxy(&topo, &extra);
    // The first request waits for the session to the exit.
    first_page_by_address(&topo, &proxy);
    for (server, proto) in [
        (&dns4, "udp"),
        (&dns4, "tcp"),
        (&link_local, "udp"),
        (&link_local, "tcp"),
    ] {
        assert_eq!(
            bound_query(&topo, server, proto),
            None,
            "{server} {proto} answered around the tun"
        );
    }
    assert_eq!(
        counter(&topo, "leak"),
        0,
        "a bound query left by the uplink"
    );
    // The same resolver, unbound: captured and answered by the exit's resolver.
    for proto in ["udp", "tcp"] {
        let got = run_ok(topo.in_client(&[TOOL, "dns", &dns4, "unbound.test", proto]));
        assert_eq!(got.trim(), "192.0.2.77", "{proto}");
    }
    assert_eq!(counter(&topo, "leak"), 0);
    assert_eq!(counter(&topo, "proxied"), 0, "DNS left by the uplink");
    let status = proxy
        .interrupt(Duration::from_secs(20))
        .expect("proxy exits");
    assert!(status.success(), "exit status {status:?}");
    assert!(leftovers(&topo).is_empty(), "{:#?}", leftovers(&topo));
}

/// A peer reached through the TUN, as an ordinary machine's applications reach it: `nas`
/// (in the server namespace) shares port 8080 of its own loopback with `laptop` (the client
/// namespace, `proxy --tun --peer nas=ID`). Applications look the name up with the system's
/// resolver (the TUN answers `nas.tox` with nas's overlay addresses; no query leaves), and
/// reach it by name and by either overlay address; `ping` of nas's address is answered
/// through nas, a ping of an address no peer has is not.
#[test]
fn tun_reaches_a_peer_by_name_and_overlay_address_and_pings_it() {
    if skip() {
        return;
    }
    let topo = Topology::routed().expect("namespaces");
    // nas's service on its own loopback (its DNS and echo sockets come with it, unused).
    let _service = Proc::spawn(
        topo.in_server(&[TOOL, "serve", "127.0.0.1:8080", "--", "192.0.2.1"]),
        "ready",
    );
    let net = ExitOverTox::start_mesh(&topo, TOOL, "8080");
    let _resolv = EtcFile::resolv_conf(&topo.client, &topo.server_v4);
    install_dns_counters(&topo);
    let mut proxy = start_proxy(&topo, &net.client_args());
    let nas_id: fabric::id::ToxId = net
        .exit
        .ready_value("tox id:")
        .parse()
        .expect("nas's tox id");
    let nas = nas_id.public_key();

    // By name, resolved by the system resolver through the TUN: held until the session is up.
    let page = curl_first(&topo, "http://nas.tox:8080/index.html", &proxy);
    assert!(String::from_utf8_lossy(&page).contains("static text"));
    let lookup = run_ok(topo.in_client(&["getent", "ahosts", "nas.tox"]));
    let v6 = fabric::overlay::overlay_v6(&nas);
    assert!(lookup.contains(&v6.to_string()), "{lookup}");
    let v4 = lookup
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .find(|a| a.starts_with("100."))
        .unwrap_or_else(|| panic!("no overlay IPv4 address for nas.tox: {lookup}"))
        .to_owned();
    // By either overlay address.
    for url in [
        format!("http://{v4}:8080/index.html"),
        format!("http://[{v6}]:8080/index.html"),
    ] {
        let page = curl(&topo, &url);
        assert!(
            String::from_utf8_lossy(&page).contains("static text"),
            "{url}"
        );
    }
    assert_eq!(
        counter(&topo, "leak"),
        0,
        "a lookup of nas.tox left the host"
    );
    assert_eq!(
        counter(&topo, "proxied"),
        0,
        "a lookup of nas.tox left the host"
    );
    // A name under .tox that no peer has: no such name, and no query leaves either.
    let out = run_with_timeout(
        &mut topo.in_client(&["getent", "hosts", "desktop.tox"]),
        Duration::from_secs(30),
    )
    .expect("getent");
    assert!(!out.status.success(), "desktop.tox resolved");
    assert_eq!(counter(&topo, "leak") + counter(&topo, "proxied"), 0);

    // Ping: nas's addresses answer (through nas), an address no peer has does not.
    for addr in [v4.clone(), v6.to_string()] {
        run_ok(topo.in_client(&["ping", "-c", "2", "-W", "10", &addr]));
    }
    let stranger = fabric::overlay::overlay_v6(&fabric::id::PublicKey([1; 32]));
    let out = run_with_timeout(
        &mut topo.in_client(&["ping", "-c", "1", "-W", "2", &stranger.to_string()]),
        Duration::from_secs(30),
    )
    .expect("ping");
    assert!(
        !out.status.success(),
        "an address no peer has answered a ping"
    );

    // A peer added while the TUN runs has its IPv4 address routed into the TUN at once, and
    // no more once it is removed.
    let args = net.client_args();
    let dir = args
        .windows(2)
        .find(|w| w[0] == "--data-dir")
        .map(|w| w[1].to_owned())
        .expect("the client's data dir");
    let other = fabric::id::ToxId::new(fabric::id::PublicKey([7; 32]), [0; 4]).to_string();
    let bin = proxy_bin().to_string_lossy().into_owned();
    run_ok(topo.in_client(&[&bin, "peer", "add", "other", &other, "--data-dir", &dir]));
    let peers = run_ok(topo.in_client(&[&bin, "peers", "--data-dir", &dir]));
    let other_v4 = peers
        .split("peer other ")
        .nth(1)
        .and_then(|b| b.lines().nth(1))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap_or_else(|| panic!("no overlay IPv4 for other:\n{peers}"))
        .to_owned();
    // The TUN's routing table (proxy::tun_mode::TABLE).
    let table = "0x7478";
    let routed = |want: bool| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let routes = run_ok(topo.in_client(&["ip", "-4", "route", "show", "table", table]));
            if routes.contains(&other_v4) == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "other's {other_v4} routed: {}, wanted {want}:\n{routes}",
                !want
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    routed(true);
    run_ok(topo.in_client(&[&bin, "peer", "remove", "other", "--data-dir", &dir]));
    routed(false);

    stop_cleanly(&mut proxy, &topo);
    drop(net);
}
