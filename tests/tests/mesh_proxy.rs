//! The mesh through the real binary, on a private Tox network on loopback: three nodes in the
//! default mode, each known to the others by name.
//!
//! ```text
//!  laptop ── --peer nas ──────────────► nas: shares its loopback port P with laptop, uses
//!    │  --allow nas (nas may use         laptop as its exit (--exit laptop); knows c
//!    │  laptop as its exit)
//!  c ─────── --peer nas ──────────────► nas: shares nothing with c
//! ```
//!
//! laptop reaches `nas.tox:P` (a server bound to nas's 127.0.0.1) by SOCKS and by HTTP, by
//! name and by nas's overlay address, while nas uses laptop as its exit over the same pair of
//! nodes; an unshared port of nas and any request of c are refused, and nothing is dialed
//! for them.

use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use fabric::id::ToxId;
use tests::servers::{HttpServer, PAGE, ProxyProcess, proxy_bin, run_with_timeout};
use tests::toxnet::ToxNet;

/// The Tox ID of the identity in `dir` (made if missing), as `proxy id` prints it.
fn id_of(dir: &std::path::Path) -> String {
    let out = run_with_timeout(
        Command::new(proxy_bin()).args(["id", "--data-dir", &dir.display().to_string()]),
        Duration::from_secs(20),
    )
    .expect("proxy id");
    assert!(out.status.success(), "proxy id: {out:?}");
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_owned()
}

/// A node in the default mode on `net`, with its data in `dir`, listeners on loopback.
fn node(net: &ToxNet, dir: &std::path::Path, extra: &[&str]) -> ProxyProcess {
    let nodes: Vec<String> = net.nodes().iter().map(|n| n.to_string()).collect();
    let private = tests::servers::private_network(&nodes, dir);
    let mut args = vec!["--socks", "127.0.0.1:0", "--http", "127.0.0.1:0"];
    args.extend(private.iter().map(String::as_str));
    // The Tox session of fresh nodes takes about 9 s; longer on a loaded machine.
    args.extend(["--connect-timeout", "90"]);
    args.extend_from_slice(extra);
    ProxyProcess::start_raw(&args).expect("node starts")
}

fn curl(args: &[&str]) -> std::process::Output {
    run_with_timeout(
        Command::new("curl")
            .args(["--silent", "--show-error", "--max-time", "100"])
            .args(args),
        Duration::from_secs(110),
    )
    .expect("run curl (Debian package curl)")
}

fn ok(out: &std::process::Output, what: &str, node: &ProxyProcess) -> Vec<u8> {
    assert!(
        out.status.success(),
        "{what}: {}\n--- node log ---\n{}",
        String::from_utf8_lossy(&out.stderr),
        node.stderr()
    );
    out.stdout.clone()
}

/// Waits (bounded) until `node`'s log has `needle`.
fn wait_log(node: &ProxyProcess, needle: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    while !node.stderr().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in the log:\n{}",
            node.stderr()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn peers_reach_shared_ports_by_name_and_overlay_address_and_nothing_else() {
    let net = ToxNet::start(4).expect("private tox network");
    let (laptop_dir, nas_dir, c_dir) = (
        net.scratch_dir("laptop").unwrap(),
        net.scratch_dir("nas").unwrap(),
        net.scratch_dir("c").unwrap(),
    );
    let (laptop_id, nas_id, c_id) = (id_of(&laptop_dir), id_of(&nas_dir), id_of(&c_dir));
    // nas's services, on its own loopback: one shared, one not.
    let shared = HttpServer::start().expect("shared service");
    let unshared = HttpServer::start().expect("unshared service");
    // The origin nas reaches through laptop as its exit (on loopback here, so laptop's exit
    // policy allows that one address for this test of the exit right).
    let origin = HttpServer::start().expect("origin");
    let port = shared.addr().port().to_string();

    let laptop = node(
        &net,
        &laptop_dir,
        &[
            "--peer",
            &format!("nas={nas_id}"),
            "--allow",
            "nas",
            // The exit policy's default, but for the one origin (on this host's loopback).
            "--allow-cidr",
            "127.0.0.1/32",
        ],
    );
    let nas = node(
        &net,
        &nas_dir,
        &[
            "--peer",
            &format!("laptop={laptop_id}"),
            "--peer",
            &format!("c={c_id}"),
            "--share",
            &format!("laptop:{port}"),
            "--exit",
            "laptop",
        ],
    );
    let c = node(&net, &c_dir, &["--peer", &format!("nas={nas_id}")]);
    let socks = laptop.socks.expect("socks").to_string();
    let http = format!("http://{}", laptop.http.expect("http"));

    // By name through SOCKS (the name travels to the proxy): made at once, it waits for the
    // session.
    let url = format!("http://nas.tox:{port}/index.html");
    let started = Instant::now();
    let body = ok(
        &curl(&["--socks5-hostname", &socks, &url]),
        "nas.tox by socks",
        &laptop,
    );
    assert_eq!(body, PAGE.as_bytes());
    eprintln!(
        "first request by name answered after {:?}",
        started.elapsed()
    );
    // By name through the HTTP proxy, forward and CONNECT.
    let body = ok(&curl(&["-x", &http, &url]), "nas.tox by http", &laptop);
    assert_eq!(body, PAGE.as_bytes());
    let body = ok(
        &curl(&["-p", "-x", &http, &url]),
        "nas.tox by http connect",
        &laptop,
    );
    assert_eq!(body, PAGE.as_bytes());
    // By nas's key, and by its overlay addresses (computed from its ID, as anyone can).
    let nas_key = nas_id.parse::<ToxId>().unwrap().public_key();
    let by_key = format!("http://{nas_id}.tox:{port}/index.html");
    let body = ok(
        &curl(&["--socks5-hostname", &socks, &by_key]),
        "<id>.tox",
        &laptop,
    );
    assert_eq!(body, PAGE.as_bytes());
    let v6 = fabric::overlay::overlay_v6(&nas_key);
    let by_v6 = format!("http://[{v6}]:{port}/index.html");
    let body = ok(
        &curl(&["--socks5", &socks, &by_v6]),
        "overlay v6 by socks",
        &laptop,
    );
    assert_eq!(body, PAGE.as_bytes());
    let served = shared.requests();
    assert_eq!(served, 5, "each request reached the shared service once");

    // nas uses laptop as its exit, on the same pair of nodes.
    let nas_socks = nas.socks.expect("nas socks").to_string();
    let body = ok(
        &curl(&["--socks5-hostname", &nas_socks, &origin.url("/index.html")]),
        "nas through laptop as exit",
        &nas,
    );
    assert_eq!(body, PAGE.as_bytes());

    // An unshared port of nas: refused by nas, never dialed.
    let unshared_url = format!("http://nas.tox:{}/index.html", unshared.addr().port());
    let out = curl(&["--socks5-hostname", &socks, &unshared_url]);
    assert!(!out.status.success(), "an unshared port answered");
    wait_log(
        &nas,
        "is not shared with this peer",
        Duration::from_secs(30),
    );
    assert_eq!(unshared.requests(), 0, "the unshared port was dialed");

    // c knows nas, but nas shares nothing with c: refused, nothing dialed.
    let c_socks = c.socks.expect("c socks").to_string();
    let out = curl(&["--socks5-hostname", &c_socks, &url]);
    assert!(
        !out.status.success(),
        "c reached a port nas does not share with it"
    );
    assert_eq!(shared.requests(), served, "c's request was dialed");
    // c may not use nas as an exit either (nas did not --allow it), whatever c asks.
    assert_eq!(unshared.requests(), 0);

    // Both nodes list their peers by name, with what each may do and what was served.
    let peers_of = |node: &ProxyProcess| {
        let out = run_with_timeout(
            Command::new(proxy_bin()).args([
                "peers",
                "--from",
                &node.http.expect("http").to_string(),
            ]),
            Duration::from_secs(20),
        )
        .expect("proxy peers");
        assert!(out.status.success(), "proxy peers: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // Each side also shows what the other gives it (asked of the peer on each session).
    let listing_with = |node: &ProxyProcess, needle: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let listed = peers_of(node);
            if listed.contains(needle) {
                return listed;
            }
            assert!(Instant::now() < deadline, "no {needle:?} in:\n{listed}");
            thread::sleep(Duration::from_millis(100));
        }
    };
    let listed = listing_with(
        &laptop,
        &format!("gives this node: reach its ports {port}/tcp"),
    );
    eprintln!("laptop's peers:\n{listed}");
    assert!(listed.contains(&format!("peer nas {nas_key}")), "{listed}");
    assert!(listed.contains(&format!("overlay {v6}")), "{listed}");
    assert!(
        listed.contains("may here: use this node as its exit"),
        "{listed}"
    );
    assert!(listed.contains("served: as exit 1 streams"), "{listed}");
    // Counted when opened (the bytes when each stream ends).
    assert!(
        listed.contains("used: as exit 0 streams (0 B up, 0 B down), shared ports 5 streams"),
        "{listed}"
    );
    let listed = listing_with(&nas, "gives this node: use it as exit");
    eprintln!("nas's peers:\n{listed}");
    listing_with(&c, "gives this node: nothing");
    let laptop_key = laptop_id.parse::<ToxId>().unwrap().public_key();
    assert!(
        listed.contains(&format!("peer laptop {laptop_key}  (this node's exit)")),
        "{listed}"
    );
    assert!(
        listed.contains(&format!("may here: reach shared ports {port}/tcp")),
        "{listed}"
    );
    assert!(
        listed.contains("shared ports 5 streams") && listed.contains("refused 1"),
        "laptop: 5 shared streams and the unshared port refused: {listed}"
    );
    assert!(
        listed.contains("used: as exit 1 streams"),
        "nas used laptop as its exit once: {listed}"
    );
    let c_key = c_id.parse::<ToxId>().unwrap().public_key();
    let c_part = &listed[listed.find(&format!("peer c {c_key}")).expect("c listed")..];
    assert!(
        c_part.contains("may here: nothing") && c_part.contains("refused 1"),
        "{listed}"
    );

    // A name under .tox that names no peer is refused by the asking node, never asked of DNS
    // or an exit.
    let out = curl(&[
        "--socks5-hostname",
        &socks,
        "http://desktop.tox:80/index.html",
    ]);
    assert!(!out.status.success(), "an unknown peer name answered");
    wait_log(
        &laptop,
        "no peer is called desktop",
        Duration::from_secs(10),
    );
}
