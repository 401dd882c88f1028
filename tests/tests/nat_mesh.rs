//! The mesh with whole processes, each node behind its own NAT (a [`NatTopology`] with three
//! cone-NAT sides), the private Tox network and a STUN server in the public namespace:
//!
//! ```text
//!  side a: laptop  proxy --tun --peer nas=B --allow nas        (nas may use laptop as exit)
//!  side b: nas     proxy --peer laptop=A --peer c=C --share laptop:8080 --exit laptop
//!                  a web service on its own 127.0.0.1:8080
//!  side c: c       proxy --peer nas=B                           (nas shares nothing with c)
//! ```
//!
//! laptop reaches nas's service by `nas.tox` through SOCKS, through HTTP and through its TUN
//! (by name, resolved by the TUN's DNS, and by overlay address), while nas uses laptop as its
//! exit over the same session pair; an unshared port of nas and every request of c are
//! refused by nas and nothing is dialed for them.
//!
//! Needs root, nftables and coturn; skips with a message where namespaces are impossible.

use std::process::Command;
use std::time::{Duration, Instant};

use fabric::id::ToxId;
use tests::nat::{Nat, NatTopology, unavailable};
use tests::netns::{EtcFile, Proc, Scratch};
use tests::servers::{proxy_bin, run_with_timeout};

const TOOL: &str = env!("CARGO_BIN_EXE_nst-tool");
/// The web server nas reaches through laptop, in the public namespace.
const ORIGIN: &str = "198.51.100.1:80";

/// Runs `args` in side `i`'s namespace to completion (at most 120 s).
fn run_in(topo: &NatTopology, i: usize, args: &[&str]) -> std::process::Output {
    let mut cmd: Command = topo.in_peer(i, args);
    run_with_timeout(&mut cmd, Duration::from_secs(120)).expect("run in namespace")
}

/// curl in side `i` with `args`, at most 100 s.
fn curl(topo: &NatTopology, i: usize, args: &[&str]) -> std::process::Output {
    let mut all = vec!["curl", "--silent", "--show-error", "--max-time", "100"];
    all.extend_from_slice(args);
    run_in(topo, i, &all)
}

/// The page of `nst-tool serve`, fetched: its text must be there.
fn assert_page(out: &std::process::Output, what: &str, node: &Proc) {
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("static text"),
        "{what}: {}\n--- node log ---\n{}",
        String::from_utf8_lossy(&out.stderr),
        node.stderr()
    );
}

/// The Tox ID of the identity in `dir` (made if missing).
fn id_of(dir: &Scratch) -> String {
    let out = Command::new(proxy_bin())
        .args(["id", "--data-dir", &dir.path()])
        .output()
        .expect("proxy id");
    assert!(out.status.success(), "proxy id: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The conv of the session `listing` (a `proxy peers` output) shows for the peer `name`.
fn conv_of(listing: &str, name: &str) -> Option<String> {
    let part = &listing[listing.find(&format!("peer {name} "))?..];
    let at = part.find("session conv ")? + "session conv ".len();
    part[at..].split_whitespace().next().map(str::to_owned)
}

#[test]
fn three_nodes_behind_nats_share_by_name_use_each_other_as_exit_and_refuse_the_rest() {
    if let Some(why) = unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    let topo = NatTopology::with_sides(&[Nat::Cone, Nat::Cone, Nat::Cone]).expect("namespaces");
    let (_toxnet, nodes) = topo.start_toxnet(TOOL);
    // nas's service on its own loopback; the origin nas reaches through laptop as its exit, a
    // web server in the public namespace (beside STUN and the Tox daemons).
    let _service = Proc::spawn(
        topo.in_peer(1, &[TOOL, "serve", "127.0.0.1:8080", "--", "192.0.2.1"]),
        "ready",
    );
    let _origin = Proc::spawn(
        topo.in_public(&[TOOL, "serve", ORIGIN, "--", "192.0.2.77"]),
        "ready",
    );
    // laptop's applications resolve names with a resolver across the NAT: the TUN captures
    // the queries.
    let _resolv = EtcFile::resolv_conf(topo.peer_ns(0), "192.0.2.53");

    let dirs = [
        Scratch::new("laptop"),
        Scratch::new("nas"),
        Scratch::new("c"),
    ];
    let [laptop_id, nas_id, c_id] = [&dirs[0], &dirs[1], &dirs[2]].map(id_of);
    let bin = proxy_bin().to_string_lossy().into_owned();
    let stun = topo.stun().to_string();
    let start = |side: usize, dir: &Scratch, ready: &str, args: &[String]| {
        let mut all = vec![bin.clone()];
        all.extend(args.iter().cloned());
        all.extend([
            "--data-dir".into(),
            dir.path(),
            "--no-public-bootstrap".into(),
            "--stun".into(),
            stun.clone(),
            // Fresh nodes take about 9 s to meet over Tox; more on a loaded machine.
            "--connect-timeout".into(),
            "90".into(),
        ]);
        for n in &nodes {
            all.extend(["--bootstrap".into(), n.clone()]);
        }
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        Proc::spawn(topo.in_peer(side, &all), ready)
    };
    let s = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    let laptop = start(
        0,
        &dirs[0],
        "tun mode up",
        &s(&[
            "--tun",
            "--socks",
            ":1080",
            "--http",
            ":8080",
            "--peer",
            &format!("nas={nas_id}"),
            "--allow",
            "nas",
            // The exit policy's default, but for the one origin: the test addresses are all
            // documentation ranges, which an exit refuses.
            "--allow-cidr",
            "198.51.100.1/32",
        ]),
    );
    let nas = start(
        1,
        &dirs[1],
        "socks5 listening on",
        &s(&[
            "--socks",
            ":1080",
            "--http",
            "off",
            "--metrics",
            "127.0.0.1:9100",
            "--peer",
            &format!("laptop={laptop_id}"),
            "--peer",
            &format!("c={c_id}"),
            "--share",
            "laptop:8080",
            "--exit",
            "laptop",
        ]),
    );
    let c = start(
        2,
        &dirs[2],
        "socks5 listening on",
        &s(&[
            "--socks",
            ":1080",
            "--http",
            "off",
            "--peer",
            &format!("nas={nas_id}"),
        ]),
    );

    // laptop → nas.tox:8080 through SOCKS: made at once, held until the session is up.
    let url = "http://nas.tox:8080/index.html";
    let started = Instant::now();
    let out = curl(&topo, 0, &["--socks5-hostname", "127.0.0.1:1080", url]);
    assert_page(&out, "nas.tox by socks", &laptop);
    eprintln!(
        "first request by name answered after {:?}",
        started.elapsed()
    );
    let out = curl(&topo, 0, &["-x", "http://127.0.0.1:8080", url]);
    assert_page(&out, "nas.tox by http", &laptop);
    // Through the TUN: the name by the system resolver, then the overlay address.
    let out = curl(&topo, 0, &[url]);
    assert_page(&out, "nas.tox through the tun", &laptop);
    let nas_key = nas_id.parse::<ToxId>().expect("nas id").public_key();
    let lookup = run_in(&topo, 0, &["getent", "ahostsv4", "nas.tox"]);
    let v4 = String::from_utf8_lossy(&lookup.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_else(|| panic!("nas.tox does not resolve: {lookup:?}"))
        .to_owned();
    let out = curl(&topo, 0, &[&format!("http://{v4}:8080/index.html")]);
    assert_page(&out, "nas's overlay address through the tun", &laptop);
    let v6 = fabric::overlay::overlay_v6(&nas_key);
    let out = curl(
        &topo,
        0,
        &[
            "--socks5",
            "127.0.0.1:1080",
            &format!("http://[{v6}]:8080/index.html"),
        ],
    );
    assert_page(&out, "nas's overlay IPv6 address by socks", &laptop);

    // nas uses laptop as its exit, on the same pair of nodes.
    let out = curl(
        &topo,
        1,
        &[
            "--socks5-hostname",
            "127.0.0.1:1080",
            &format!("http://{ORIGIN}/index.html"),
        ],
    );
    assert_page(&out, "nas through laptop as its exit", &nas);

    // An unshared port of nas: refused by nas, nothing dialed.
    let out = curl(
        &topo,
        0,
        &[
            "--socks5-hostname",
            "127.0.0.1:1080",
            "http://nas.tox:9999/index.html",
        ],
    );
    assert!(!out.status.success(), "an unshared port answered");
    assert!(
        nas.wait_stderr(
            "port 9999 is not shared with this peer",
            Duration::from_secs(30)
        ),
        "nas did not refuse the unshared port:\n{}",
        nas.stderr()
    );
    // c knows nas, and nas knows c, but shares nothing with it.
    let out = curl(&topo, 2, &["--socks5-hostname", "127.0.0.1:1080", url]);
    assert!(
        !out.status.success(),
        "c reached a port nas shares with laptop only:\n{}",
        c.stderr()
    );

    // The books: nas counts what it served and refused per peer; laptop and nas name the
    // same session (one per pair, whoever dialed).
    let peers_of = |side: usize, from: &str| {
        let out = run_in(&topo, side, &[&bin, "peers", "--from", from]);
        assert!(out.status.success(), "proxy peers: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let at_nas = peers_of(1, "127.0.0.1:9100");
    let at_laptop = peers_of(0, "127.0.0.1:8080");
    eprintln!("nas's peers:\n{at_nas}\nlaptop's peers:\n{at_laptop}");
    let c_part = &at_nas[at_nas.find("peer c ").expect("c listed")..];
    assert!(
        c_part.contains("may here: nothing") && c_part.contains("refused 1"),
        "{at_nas}"
    );
    let laptop_part = &at_nas[at_nas.find("peer laptop ").expect("laptop listed")..];
    assert!(laptop_part.contains("shared ports 5 streams"), "{at_nas}");
    assert!(laptop_part.contains("refused 1"), "{at_nas}");
    let nas_part = &at_laptop[at_laptop.find("peer nas ").expect("nas listed")..];
    assert!(
        nas_part.contains("served: as exit 1 streams"),
        "{at_laptop}"
    );
    let (conv_at_nas, conv_at_laptop) = (conv_of(&at_nas, "laptop"), conv_of(&at_laptop, "nas"));
    assert!(conv_at_nas.is_some(), "{at_nas}");
    assert_eq!(conv_at_nas, conv_at_laptop, "two sessions for one pair");
    drop((laptop, nas, c));
}
