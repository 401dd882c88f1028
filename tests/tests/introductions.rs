//! Introductions through the real binary on a private Tox network on loopback (issue
//! "Pairing", item 3). Four nodes:
//!
//! ```text
//!   a knows b and c;  b and c take a as their introducer;  a takes c as its introducer
//!   c knows a and d;  d takes c as its introducer
//! ```
//!
//! a introduces b and c to each other; c then reaches b's service only after b grants it. b
//! then takes c as its introducer too (at run time), so only the rule that introductions are
//! never forwarded keeps c from introducing b to d: d starts after c has learned b's choice,
//! and c introduces a and d to each other (both chose c) in one message that would carry b
//! if c forwarded it.

use std::process::Command;
use std::time::{Duration, Instant};

use tests::netns::Scratch;
use tests::servers::{
    ExitProcess, HttpServer, ProxyProcess, curl_socks, proxy_bin, run_with_timeout,
};
use tests::toxnet::ToxNet;

fn run(args: &[&str]) -> std::process::Output {
    run_with_timeout(
        Command::new(proxy_bin()).args(args),
        Duration::from_secs(60),
    )
    .expect("run proxy")
}

fn id_of(dir: &Scratch) -> String {
    let out = run(&["id", "--data-dir", &dir.path()]);
    assert!(out.status.success(), "proxy id: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// `proxy peers` of the node on `dir`.
fn peers(dir: &Scratch) -> String {
    let out = run(&["peers", "--data-dir", &dir.path()]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The block `proxy peers` prints for the peer called `name`, if any.
fn block<'a>(peers: &'a str, name: &str) -> Option<&'a str> {
    let head = format!("peer {name} ");
    let start = peers.find(&head)?;
    let rest = &peers[start..];
    let end = rest[1..].find("\npeer ").map_or(rest.len(), |i| i + 1);
    Some(&rest[..end])
}

/// Waits (at most `limit`) until the node on `dir` knows `name` as introduced by `by`;
/// returns its block.
fn await_introduced(dir: &Scratch, name: &str, by: &str, limit: Duration) -> String {
    let start = Instant::now();
    let want = format!("from: introduced by {by}");
    loop {
        let all = peers(dir);
        if let Some(b) = block(&all, name)
            && b.contains(&want)
        {
            return b.to_owned();
        }
        assert!(
            start.elapsed() < limit,
            "{name} was not introduced by {by} within {limit:?}:\n{all}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn strs(f: &[String]) -> Vec<&str> {
    f.iter().map(String::as_str).collect()
}

#[test]
fn an_introducer_introduces_its_peers_that_chose_it_once_and_never_onward() {
    let net = ToxNet::start(4).expect("private tox network");
    let nodes: Vec<String> = net.nodes().iter().map(|n| n.to_string()).collect();
    let dirs: Vec<Scratch> = ["a", "b", "c", "d"]
        .iter()
        .map(|n| Scratch::new(&format!("intro-{n}")))
        .collect();
    let ids: Vec<String> = dirs.iter().map(id_of).collect();
    let key = |i: usize| ids[i][..64].to_owned();
    let peer = |name: &str, i: usize| ["--peer".to_owned(), format!("{name}={}", ids[i])];
    let service = HttpServer::start().expect("b's service");
    let port = service.addr().port().to_string();

    let path = |i: usize| std::path::PathBuf::from(dirs[i].path());
    let flags = |list: Vec<[String; 2]>, introducer: &str| {
        let mut f: Vec<String> = list.into_iter().flatten().collect();
        f.extend(["--introducer".to_owned(), introducer.to_owned()]);
        f
    };
    let a_flags = flags(vec![peer("b", 1), peer("c", 2)], "c");
    let b_flags = flags(vec![peer("a", 0)], "a");
    let d_flags = flags(vec![peer("c", 2)], "c");
    let _a = ExitProcess::start(&nodes, &path(0), &strs(&a_flags)).expect("a starts");
    let _b = ExitProcess::start(&nodes, &path(1), &strs(&b_flags)).expect("b starts");
    let c_flags = flags(vec![peer("a", 0), peer("d", 3)], "a");
    let c = ProxyProcess::node(&nodes, &path(2), &strs(&c_flags)).expect("c starts");
    let socks = c.socks.expect("socks").to_string();

    // a introduces b and c to each other, by a's names for them.
    let limit = Duration::from_secs(180);
    let c_at_b = await_introduced(&dirs[1], "c", "a", limit);
    assert!(c_at_b.contains(&key(2)), "{c_at_b}");
    assert!(
        c_at_b.contains("may here: nothing"),
        "no rights come with it: {c_at_b}"
    );
    let b_at_c = await_introduced(&dirs[2], "b", "a", limit);
    assert!(b_at_c.contains(&key(1)), "{b_at_c}");

    // c reaches b only once b grants it a port.
    let url = format!("http://b.tox:{port}/index.html");
    let out = curl_socks(&socks, &url);
    assert!(!out.status.success(), "c reached b before any grant");
    assert_eq!(service.requests(), 0, "b dialed its service for c");
    let out = run(&[
        "peer",
        "grant",
        "c",
        "share",
        &port,
        "--data-dir",
        &dirs[1].path(),
    ]);
    assert!(out.status.success(), "proxy peer grant: {out:?}");
    let out = curl_socks(&socks, &url);
    assert!(
        out.status.success(),
        "c did not reach b after the grant: {}\nc:\n{}",
        String::from_utf8_lossy(&out.stderr),
        c.stderr()
    );
    assert_eq!(service.requests(), 1);

    // b takes c as its introducer too, at run time: c learns it (b tells c to ask again).
    let out = run(&[
        "peer",
        "grant",
        "c",
        "introducer",
        "--data-dir",
        &dirs[1].path(),
    ]);
    assert!(out.status.success(), "proxy peer grant: {out:?}");
    let start = Instant::now();
    loop {
        let all = peers(&dirs[2]);
        if block(&all, "b").is_some_and(|b| b.contains("introduce peers to it")) {
            break;
        }
        assert!(
            start.elapsed() < limit,
            "c never learned b's choice:\n{all}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }

    // Now d: c introduces a and d (both chose c), never b onward; a never passes d on to b.
    let _d = ExitProcess::start(&nodes, &path(3), &strs(&d_flags)).expect("d starts");
    await_introduced(&dirs[3], "a", "c", limit);
    await_introduced(&dirs[0], "d", "c", limit);
    let at_d = peers(&dirs[3]);
    assert!(!at_d.contains(&key(1)), "b was forwarded to d:\n{at_d}");
    let at_b = peers(&dirs[1]);
    assert!(!at_b.contains(&key(3)), "d was forwarded to b:\n{at_b}");
    // Kept in the data dirs, with where they came from.
    let kept = std::fs::read_to_string(path(1).join("peers.toml")).expect("b's peers.toml");
    assert!(
        kept.contains("origin = \"introduced\"")
            && kept.contains(&format!("introduced-by = \"{}\"", key(0))),
        "{kept}"
    );
}
