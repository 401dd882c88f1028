//! `proxy` through an exit peer, end to end: a private Tox network (tox-bootstrapd on
//! 127.0.0.1), `proxy exit` and a client `proxy --exit <id>` as real processes, curl through
//! the client's SOCKS5 and HTTP listeners to a local HTTP server, and the exit's policy.

use std::net::Ipv4Addr;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use tests::servers::{
    DnsServer, ExitProcess, HttpServer, PAGE, PAGE_RENDERED_TEXT, ProxyProcess, SocksUdp, big_byte,
    chromium_dump_dom, http_get, proxy_bin, run_with_timeout,
};
use tests::toxnet::ToxNet;

/// `proxy exit` on `net` with its data in `name`.
fn start_exit(net: &ToxNet, name: &str, extra: &[&str]) -> ExitProcess {
    let nodes: Vec<String> = net.nodes().iter().map(|n| n.to_string()).collect();
    let dir = net.scratch_dir(name).expect("scratch dir");
    ExitProcess::start(&nodes, &dir, extra).expect("proxy exit starts and prints its tox id")
}

fn client_with(net: &ToxNet, name: &str, exit: &ExitProcess, extra: &[&str]) -> ProxyProcess {
    let dir = net.scratch_dir(name).expect("scratch dir");
    let nodes: Vec<String> = net.nodes().iter().map(|n| n.to_string()).collect();
    ProxyProcess::client(&nodes, &dir, &exit.id, extra).expect("client proxy starts")
}

/// Runs the `proxy` binary to completion (at most 20 s).
fn run_proxy(args: &[&str]) -> std::process::Output {
    run_with_timeout(
        Command::new(proxy_bin()).args(args),
        Duration::from_secs(20),
    )
    .expect("run proxy")
}

fn curl(args: &[&str]) -> std::process::Output {
    run_with_timeout(
        Command::new("curl")
            .args(["--silent", "--show-error", "--max-time", "30"])
            .args(args),
        Duration::from_secs(40),
    )
    .expect("run curl (Debian package curl)")
}

/// Retries `args` until curl succeeds (the session to the exit takes a few seconds to come up).
fn curl_until_ok(args: &[&str], limit: Duration) -> Vec<u8> {
    let deadline = Instant::now() + limit;
    loop {
        let out = curl(args);
        if out.status.success() {
            return out.stdout;
        }
        assert!(
            Instant::now() < deadline,
            "curl {args:?} kept failing: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn curl_through_an_exit_over_tox() {
    let net = ToxNet::start(4).expect("private tox network");
    let origin = HttpServer::start().expect("origin");
    // The origin is on loopback, which an exit refuses unless told otherwise.
    let exit = start_exit(
        &net,
        "exit",
        &["--allow-any", "--allow-private", "--metrics", "127.0.0.1:0"],
    );
    // A generous connect timeout: the Tox session of two fresh nodes takes about 9 s to come
    // up, much longer on a loaded machine.
    let proxy = client_with(&net, "client", &exit, &["--connect-timeout", "90"]);
    let socks = proxy.socks.expect("socks").to_string();
    let http = format!("http://{}", proxy.http.expect("http"));

    // One request made the moment the proxy listens, before any session exists: it waits for
    // the tunnel instead of being refused.
    let started = Instant::now();
    let out = run_with_timeout(
        Command::new("curl")
            .args(["--silent", "--show-error", "--max-time", "100"])
            .args(["--socks5-hostname", &socks, &origin.url("/index.html")]),
        Duration::from_secs(110),
    )
    .expect("run curl");
    assert!(
        out.status.success(),
        "the first request was not held for the session: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        proxy.stderr()
    );
    assert_eq!(out.stdout, PAGE.as_bytes());
    eprintln!(
        "first request answered {:?} after the proxy started listening",
        started.elapsed()
    );

    // 8 MiB through the HTTP listener's forward proxy, checked byte for byte.
    let n = 8 << 20;
    let body = curl_until_ok(
        &["-x", &http, &origin.url(&format!("/big/{n}"))],
        Duration::from_secs(30),
    );
    assert_eq!(body.len(), n);
    assert!(
        body.iter()
            .enumerate()
            .all(|(i, &b)| b == big_byte(i as u64))
    );

    // UDP ASSOCIATE through the exit: DNS queries ride the session's datagrams, and the
    // relay names the DNS server as the source of each answer.
    let dns = DnsServer::start(Ipv4Addr::new(10, 9, 8, 7)).expect("dns server");
    let udp = SocksUdp::associate(proxy.socks.expect("socks")).expect("udp associate");
    for (i, name) in ["example.test", "another.example.test", "third.test"]
        .iter()
        .enumerate()
    {
        let id = 200 + i as u16;
        // Datagrams may be lost (they are UDP): a client retries, and so does this test.
        let answer = (0..5)
            .find_map(|_| udp.dns_query(dns.addr(), id, name).ok())
            .expect("a dns answer through the exit");
        assert_eq!(answer, (id, Ipv4Addr::new(10, 9, 8, 7)));
    }

    // Status on both sides: the client names its exit, the path and the session; the exit's
    // metrics show the client's session up with streams having moved bytes. Both processes
    // run on this host, so punching (`--path auto`, the default) finds a direct UDP path from
    // the interface addresses alone.
    let status = || {
        let out = run_proxy(&["status", "--from", &proxy.http.expect("http").to_string()]);
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut text = status();
    while !text.contains("path udp-punched") && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(200));
        text = status();
    }
    let exit_pk = &exit.id[..64];
    assert!(text.starts_with("proxy client"), "{text}");
    assert!(text.contains(&format!("exit {exit_pk}")), "{text}");
    assert!(text.contains("path udp-punched"), "{text}");
    assert!(text.contains("punching: direct udp link up to "), "{text}");
    assert!(text.contains("session conv "), "{text}");
    let (code, prom) = http_get(exit.metrics.expect("exit metrics"), "/metrics").expect("scrape");
    assert_eq!(code, 200);
    let up = prom
        .lines()
        .find(|l| l.starts_with("proxy_peer_session_up{"))
        .expect("a client in the exit's metrics");
    assert!(up.ends_with(" 1"), "{prom}");
    let received: f64 = prom
        .lines()
        .find_map(|l| {
            l.strip_prefix("proxy_peer_bytes_total{")
                .filter(|l| l.contains("direction=\"sent\""))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse().ok())
        })
        .expect("bytes sent to the client");
    assert!(received > n as f64, "the exit sent the 8 MiB: {prom}");

    // A CONNECT tunnel through the exit.
    let tunneled = curl_until_ok(
        &["-p", "-x", &http, &origin.url("/index.html")],
        Duration::from_secs(30),
    );
    assert_eq!(tunneled, PAGE.as_bytes());

    // A browser through both listeners: the page's script ran, and the origin saw the
    // requests (which only the exit can have made: the client sends everything there).
    for proxy_server in [format!("socks5://{socks}"), http.clone()] {
        let before = origin.requests();
        let dom = chromium_dump_dom(&proxy_server, &origin.url("/index.html"));
        assert!(
            dom.contains(PAGE_RENDERED_TEXT),
            "{proxy_server}: dom was:\n{dom}"
        );
        assert!(
            origin.requests() > before,
            "{proxy_server}: origin not reached"
        );
    }
}

#[test]
fn without_udp_the_session_rides_tox_tcp_relays() {
    let net = ToxNet::start(4).expect("private tox network");
    let origin = HttpServer::start().expect("origin");
    let exit = start_exit(
        &net,
        "exit",
        &["--allow-any", "--allow-private", "--tox-no-udp"],
    );
    // `--path tox`: no punched UDP either, so the session stays on the relays.
    let proxy = client_with(&net, "client", &exit, &["--tox-no-udp", "--path", "tox"]);
    let socks = proxy.socks.expect("socks").to_string();
    let n = 2 << 20;
    let body = curl_until_ok(
        &[
            "--socks5-hostname",
            &socks,
            &origin.url(&format!("/big/{n}")),
        ],
        Duration::from_secs(120),
    );
    assert_eq!(body.len(), n);
    assert!(
        body.iter()
            .enumerate()
            .all(|(i, &b)| b == big_byte(i as u64))
    );
    let out = run_proxy(&["status", "--from", &proxy.http.expect("http").to_string()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("path tox-tcp-relay"), "{text}");
}

#[test]
fn the_exit_policy_refuses_private_destinations() {
    let net = ToxNet::start(4).expect("private tox network");
    let origin = HttpServer::start().expect("origin");
    let exit = start_exit(&net, "exit", &["--allow-any"]);
    let proxy = client_with(&net, "client", &exit, &["--connect-timeout", "90"]);
    let http = format!("http://{}", proxy.http.expect("http"));
    // Made before the session is up: held for it, then refused by the exit's policy.
    let out = run_with_timeout(
        Command::new("curl")
            .args(["--silent", "--show-error", "--max-time", "100"])
            .args(["-x", &http, "-o", "/dev/null", "-w", "%{http_code}"])
            .arg(origin.url("/index.html")),
        Duration::from_secs(110),
    )
    .expect("run curl");
    let code = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(code, "403", "expected 403 from the exit's policy");
    assert_eq!(origin.requests(), 0, "the origin was never contacted");

    // UDP to a loopback DNS server is refused too: the query never reaches it.
    let dns = DnsServer::start(Ipv4Addr::new(10, 9, 8, 7)).expect("dns server");
    let udp = SocksUdp::associate(proxy.socks.expect("socks")).expect("udp associate");
    for id in 0..2 {
        assert!(udp.dns_query(dns.addr(), id, "example.test").is_err());
    }
    assert_eq!(dns.queries(), 0, "the dns server was never contacted");
}

#[test]
fn bad_tox_ids_on_the_command_line_are_clear_errors() {
    for (id, expect) in [
        ("1234", "wrong length"),
        (&"G".repeat(76)[..], "invalid hex"),
        (&"0".repeat(75)[..], "wrong length"),
    ] {
        let out = run_proxy(&["--exit", id, "--socks", "127.0.0.1:0", "--http", "off"]);
        assert_eq!(out.status.code(), Some(2), "{id}: exit code");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expect), "{id}: {err}");
    }
    // A one-digit typo in a real ID is caught by the checksum.
    let dir = std::env::temp_dir().join(format!("proxy-id-{}", std::process::id()));
    let dir_arg = dir.display().to_string();
    let out = run_proxy(&["id", "--data-dir", &dir_arg]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(id.len(), 76);
    let again = run_proxy(&["id", "--data-dir", &dir_arg]);
    assert_eq!(
        String::from_utf8_lossy(&again.stdout).trim(),
        id,
        "identity persists"
    );
    let mut typo = id.clone().into_bytes();
    typo[10] = if typo[10] == b'A' { b'B' } else { b'A' };
    let typo = String::from_utf8(typo).unwrap_or_default();
    let out = run_proxy(&["--exit", &typo, "--socks", "127.0.0.1:0", "--http", "off"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("checksum"));
    let _ = std::fs::remove_dir_all(dir);
}
