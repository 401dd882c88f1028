//! The NAT matrix with whole processes: `proxy exit` on side a and a client `proxy --exit` on
//! side b of a [`NatTopology`], the private Tox network and a coturn STUN server in the public
//! namespace. Each cell fetches 4 MiB from an HTTP server beside the exit through the client's
//! SOCKS5 listener (checked byte for byte) and asserts the path `proxy status` reports: the
//! session starts on Tox, both sides learn their candidates from STUN and exchange them over
//! Tox, and the session moves to punched UDP, punched TCP, or stays on Tox.
//!
//! Needs root, nftables and coturn; skips with a message where namespaces are impossible.

use std::process::Command;
use std::time::{Duration, Instant};

use tests::nat::{Nat, NatTopology, unavailable};
use tests::netns::{Proc, Scratch};
use tests::servers::{big_byte, proxy_bin, run_with_timeout};

const TOOL: &str = env!("CARGO_BIN_EXE_nst-tool");
/// The body fetched through the exit.
const BYTES: usize = 4 << 20;

/// Runs `args` in side `i`'s namespace to completion (at most 60 s).
fn run_in(topo: &NatTopology, i: usize, args: &[&str]) -> std::process::Output {
    let mut cmd: Command = topo.in_peer(i, args);
    run_with_timeout(&mut cmd, Duration::from_secs(60)).expect("run in namespace")
}

/// The NAT topology with the private Tox network (4 daemons) in its public namespace and the
/// origin server on the exit side's loopback: the topology, the Tox nodes as the peers reach
/// them (`PK@198.51.100.1:PORT`), and the processes to keep. `None` (said) where namespaces
/// are impossible.
fn lab(exit_side: Nat, client_side: Nat) -> Option<(NatTopology, Vec<String>, [Proc; 2])> {
    if let Some(why) = unavailable() {
        eprintln!("skipped: {why}");
        return None;
    }
    let topo = NatTopology::new(exit_side, client_side).expect("namespaces");
    let (toxnet, nodes) = topo.start_toxnet(TOOL);
    let origin = Proc::spawn(
        topo.in_peer(0, &[TOOL, "serve", "127.0.0.1:80", "--", "192.0.2.77"]),
        "ready",
    );
    Some((topo, nodes, [toxnet, origin]))
}

/// `curl` in the client's namespace (side 1) through its SOCKS5 listener, names resolved at
/// the exit, at most `max_secs`.
fn curl_socks(topo: &NatTopology, url: &str, max_secs: u32) -> std::process::Output {
    let max = max_secs.to_string();
    run_in(
        topo,
        1,
        &[
            "curl",
            "--silent",
            "--show-error",
            "--max-time",
            &max,
            "--socks5-hostname",
            "127.0.0.1:1080",
            url,
        ],
    )
}

fn cell(exit_side: Nat, client_side: Nat, want: &[&str]) {
    let Some((topo, nodes, _running)) = lab(exit_side, client_side) else {
        return;
    };
    let stun = topo.stun().to_string();
    let bin = proxy_bin().to_string_lossy().into_owned();
    let with_network = |mut args: Vec<String>| {
        args.extend([
            "--no-public-bootstrap".into(),
            "--stun".into(),
            stun.clone(),
        ]);
        for n in &nodes {
            args.extend(["--bootstrap".into(), n.clone()]);
        }
        args
    };

    let exit_dir = Scratch::new("exit");
    let exit_args = with_network(vec![
        bin.clone(),
        "exit".into(),
        "--allow-any".into(),
        // The origin is on the exit's loopback.
        "--allow-private".into(),
        "--data-dir".into(),
        exit_dir.path(),
    ]);
    let exit_args: Vec<&str> = exit_args.iter().map(String::as_str).collect();
    let exit = Proc::spawn(topo.in_peer(0, &exit_args), "tox id:");
    let exit_id = exit.ready_value("tox id:");

    let client_dir = Scratch::new("client");
    let client_args = with_network(vec![
        bin.clone(),
        "--exit".into(),
        exit_id,
        // The design card's line: `proxy --socks :1080 --exit <toxid>`.
        "--socks".into(),
        ":1080".into(),
        "--http".into(),
        ":8080".into(),
        "--data-dir".into(),
        client_dir.path(),
    ]);
    let client_args: Vec<&str> = client_args.iter().map(String::as_str).collect();
    let client = Proc::spawn(topo.in_peer(1, &client_args), "http listening on");

    // The session comes up over Tox (both nodes fresh), then the path settles.
    let url = format!("http://127.0.0.1/big/{BYTES}");
    let deadline = Instant::now() + Duration::from_secs(120);
    let body = loop {
        let out = curl_socks(&topo, &url, 40);
        if out.status.success() {
            break out.stdout;
        }
        assert!(
            Instant::now() < deadline,
            "no body through the exit within 120 s: {}\nclient:\n{}\nexit:\n{}",
            String::from_utf8_lossy(&out.stderr),
            client.stderr(),
            exit.stderr()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(body.len(), BYTES);
    assert!(
        body.iter()
            .enumerate()
            .all(|(i, &b)| b == big_byte(i as u64)),
        "the body differs"
    );

    let status = || {
        let out = run_in(&topo, 1, &[&bin, "status", "--from", "127.0.0.1:8080"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let settled = Instant::now() + Duration::from_secs(40);
    let mut text = status();
    while !want.iter().any(|w| text.contains(&format!("path {w} "))) && Instant::now() < settled {
        std::thread::sleep(Duration::from_millis(250));
        text = status();
    }
    assert!(
        want.iter().any(|w| text.contains(&format!("path {w} "))),
        "want path {want:?}:\n{text}\nclient:\n{}",
        client.stderr()
    );
}

#[test]
fn public_exit_and_client_behind_cone_nat_move_to_punched_udp() {
    cell(Nat::Public, Nat::Cone, &["udp-punched"]);
}

/// The client's NAT maps each destination to a new port, so its STUN address is useless;
/// the exit learns the mapping towards itself from the client's probes (peer-reflexive).
#[test]
fn public_exit_and_client_behind_symmetric_nat_move_to_punched_udp() {
    cell(Nat::Public, Nat::Symmetric, &["udp-punched"]);
}

#[test]
fn exit_without_udp_and_client_behind_cone_nat_move_to_punched_tcp() {
    cell(Nat::UdpBlocked, Nat::Cone, &["tcp-punched"]);
}

#[test]
fn both_behind_symmetric_nat_stay_on_tox() {
    cell(
        Nat::Symmetric,
        Nat::Symmetric,
        &["tox-udp", "tox-tcp-relay"],
    );
}

/// Resume at a cached endpoint with the exit behind a NAT: after a first session over Tox
/// (which teaches both sides where the other's direct socket answers), a killed and
/// restarted client, and then a killed and restarted exit, each get their next request
/// served through a session that a direct handshake opened (`proxy status` says so), with the
/// request made at once and held. Prints the times.
#[test]
fn exit_behind_cone_nat_resumes_directly_after_either_side_restarts() {
    let Some((topo, nodes, _running)) = lab(Nat::Cone, Nat::Cone) else {
        return;
    };
    let stun = topo.stun().to_string();
    let bin = proxy_bin().to_string_lossy().into_owned();
    let client_dir = Scratch::new("client");
    let exit_dir = Scratch::new("exit");
    let id = |dir: &Scratch| {
        let out = run_in(&topo, 1, &[&bin, "id", "--data-dir", &dir.path()]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let client_id = id(&client_dir);
    let mut common = vec!["--no-public-bootstrap".to_owned(), "--stun".into(), stun];
    for n in &nodes {
        common.extend(["--bootstrap".into(), n.clone()]);
    }
    let start_exit = || {
        let mut args = vec![
            bin.clone(),
            "exit".into(),
            "--allow".into(),
            client_id.clone(),
        ];
        args.extend([
            "--allow-private".into(),
            "--data-dir".into(),
            exit_dir.path(),
        ]);
        args.extend(common.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Proc::spawn(topo.in_peer(0, &args), "tox id:")
    };
    let mut exit = start_exit();
    let exit_id = exit.ready_value("tox id:");
    let start_client = || {
        // The exit by name, as a user who gave it one would write it.
        let peer = format!("home={exit_id}");
        let mut args = vec![
            bin.clone(),
            "--peer".into(),
            peer,
            "--exit".into(),
            "home".into(),
        ];
        args.extend([
            "--socks".into(),
            ":1080".into(),
            "--http".into(),
            ":8080".into(),
        ]);
        args.extend(["--connect-timeout".into(), "90".into()]);
        args.extend(["--data-dir".into(), client_dir.path()]);
        args.extend(common.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Proc::spawn(topo.in_peer(1, &args), "http listening on")
    };
    let fetch = |what: &str, client: &Proc, exit: &Proc| {
        let started = Instant::now();
        let out = curl_socks(&topo, "http://127.0.0.1/big/65536", 55);
        assert!(
            out.status.success() && out.stdout.len() == 65536,
            "{what}: {}\nclient:\n{}\nexit:\n{}",
            String::from_utf8_lossy(&out.stderr),
            client.stderr(),
            exit.stderr()
        );
        eprintln!("{what}: first request served after {:?}", started.elapsed());
    };
    let status = || {
        let out = run_in(&topo, 1, &[&bin, "status", "--from", "127.0.0.1:8080"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let resumed = "resumed at a cached endpoint";

    // First contact over Tox; then both caches learn the other's direct endpoint.
    let mut client = start_client();
    fetch("cold start", &client, &exit);
    let exit_pk = &exit_id[..64].to_ascii_lowercase();
    let cache = std::path::Path::new(&client_dir.path()).join("peers.cache");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&cache).is_ok_and(|t| t.contains(exit_pk)) {
        assert!(
            Instant::now() < deadline,
            "the client never cached the exit\nclient:\n{}\nexit:\n{}",
            client.stderr(),
            exit.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // The client killed and started again: the request made at once is served over a
    // session opened at the cached endpoint.
    drop(client);
    client = start_client();
    fetch("client restart", &client, &exit);
    let text = status();
    assert!(text.contains(resumed), "not resumed directly:\n{text}");

    // The exit killed and started again on its identity: it knocks at the client's
    // endpoint, and the client opens a new session there.
    drop(exit);
    exit = start_exit();
    fetch("exit restart", &client, &exit);
    let text = status();
    assert!(text.contains(resumed), "not resumed directly:\n{text}");
}
