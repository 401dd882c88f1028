//! Pairing through the real binary on a private Tox network on loopback: `proxy invite` on
//! nas (a `proxy exit` that knows nobody) prints a ticket; `proxy join TICKET` on laptop (a
//! `proxy --node` that knows nobody) pairs them, and laptop reaches `nas.tox:PORT` at once,
//! with no restart and no other step. A reused, an expired, a revoked and a tampered ticket
//! are refused with a clear message, and change nothing on either side.

use std::process::Command;
use std::time::{Duration, Instant};

use tests::netns::Scratch;
use tests::servers::{
    ExitProcess, HttpServer, PAGE, ProxyProcess, curl_socks, proxy_bin, run_with_timeout,
};
use tests::toxnet::ToxNet;

fn run(args: &[&str], limit: Duration) -> std::process::Output {
    run_with_timeout(Command::new(proxy_bin()).args(args), limit).expect("run proxy")
}

/// A `proxy --node` with a SOCKS listener on `net`, data in `dir`.
fn node(net: &ToxNet, dir: &Scratch) -> ProxyProcess {
    let nodes: Vec<String> = net.nodes().iter().map(|n| n.to_string()).collect();
    ProxyProcess::node(&nodes, std::path::Path::new(&dir.path()), &["--node"]).expect("node starts")
}

/// The ticket: the last line `proxy invite` printed.
fn invite(dir: &Scratch, extra: &[&str]) -> String {
    let mut args = vec!["invite", "--data-dir"];
    let path = dir.path();
    args.push(&path);
    args.extend_from_slice(extra);
    let out = run(&args, Duration::from_secs(30));
    assert!(out.status.success(), "proxy invite: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines().last().expect("a ticket").trim().to_owned()
}

fn join(dir: &Scratch, ticket: &str, wait: &str) -> std::process::Output {
    let path = dir.path();
    run(
        &["join", ticket, "--data-dir", &path, "--wait", wait],
        Duration::from_secs(200),
    )
}

#[test]
fn one_ticket_pairs_two_nodes_and_bad_tickets_change_nothing() {
    let net = ToxNet::start(4).expect("private tox network");
    let nodes: Vec<String> = net.nodes().iter().map(|n| n.to_string()).collect();
    let service = HttpServer::start().expect("nas's service");
    let port = service.addr().port().to_string();
    let nas_dir = Scratch::new("pair-nas");
    let nas =
        ExitProcess::start(&nodes, std::path::Path::new(&nas_dir.path()), &[]).expect("nas starts");
    let laptop_dir = Scratch::new("pair-laptop");
    let laptop = node(&net, &laptop_dir);
    let socks = laptop.socks.expect("socks").to_string();

    // A tampered ticket: one character changed.
    let ticket = invite(
        &nas_dir,
        &["--name", "nas", "--share", &port, "--ttl", "10m"],
    );
    assert!(ticket.starts_with("proxy-ticket-"), "{ticket}");
    let mut tampered = ticket.clone().into_bytes();
    let at = tampered.len() - 6;
    tampered[at] = if tampered[at] == b'a' { b'b' } else { b'a' };
    let out = join(&laptop_dir, &String::from_utf8(tampered).unwrap(), "60");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("damaged"),
        "{out:?}"
    );

    // The ticket: joined, and the share is reached at once.
    let started = Instant::now();
    let out = join(&laptop_dir, &ticket, "150");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "proxy join: {out:?}\nlaptop:\n{}",
        laptop.stderr()
    );
    assert!(
        said.contains("joined nas: reachable as nas.tox ("),
        "{said}"
    );
    assert!(
        said.contains(&format!("reach its ports {port}/tcp")),
        "{said}"
    );
    eprintln!("join returned after {:?}", started.elapsed());
    let out = curl_socks(&socks, &format!("http://nas.tox:{port}/index.html"));
    assert!(out.status.success(), "curl nas.tox after join: {out:?}");
    assert_eq!(out.stdout, PAGE.as_bytes());
    eprintln!(
        "first byte by name {:?} after join started",
        started.elapsed()
    );
    // First contact went to the direct endpoint the ticket named, not through Tox.
    assert!(said.contains("without Tox"), "{said}");
    // Both sides keep the pairing.
    let kept = std::fs::read_to_string(std::path::Path::new(&laptop_dir.path()).join("peers.toml"))
        .expect("laptop's peers.toml");
    assert!(kept.contains("name = \"nas\""), "{kept}");
    let kept = std::fs::read_to_string(std::path::Path::new(&nas_dir.path()).join("peers.toml"))
        .expect("nas's peers.toml");
    assert!(kept.contains(&format!("share = \"{port}/tcp\"")), "{kept}");

    // The same ticket again, from another node: refused (used), nothing kept there.
    let other_dir = Scratch::new("pair-other");
    let other = node(&net, &other_dir);
    let out = join(&other_dir, &ticket, "20");
    assert!(!out.status.success(), "a used ticket paired again");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no answer from the inviter"),
        "{out:?}"
    );
    assert!(
        !std::path::Path::new(&other_dir.path())
            .join("peers.toml")
            .exists()
    );
    // An expired ticket: refused at once by the joiner.
    let short = invite(&nas_dir, &["--ttl", "1s"]);
    std::thread::sleep(Duration::from_millis(1100));
    let out = join(&other_dir, &short, "20");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("expired"),
        "{out:?}"
    );
    // A revoked one: listed, revoked, then refused by the inviter.
    let revoked = invite(&nas_dir, &["--exit"]);
    let path = nas_dir.path();
    let listed = run(
        &["invite", "--list", "--data-dir", &path],
        Duration::from_secs(30),
    );
    let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
    let id = listed
        .lines()
        .find(|l| l.contains("exit yes"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no open invitation with exit: {listed}"))
        .to_owned();
    let out = run(
        &["invite", "--revoke", &id, "--data-dir", &path],
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "{out:?}");
    let out = join(&other_dir, &revoked, "20");
    assert!(!out.status.success(), "a revoked ticket paired");
    // nas knows laptop only.
    let peers = run(&["peers", "--data-dir", &path], Duration::from_secs(30));
    let peers = String::from_utf8_lossy(&peers.stdout);
    assert_eq!(
        peers.matches("\npeer ").count() + usize::from(peers.starts_with("peer ")),
        1,
        "{peers}"
    );
    drop((nas, laptop, other));
}

/// `proxy invite` while no node runs on the data dir keeps the invitation there; the node
/// that starts later takes it, and the joiner pairs with no other step.
#[test]
fn an_invitation_made_while_no_node_runs_works_once_it_starts() {
    let net = ToxNet::start(4).expect("private tox network");
    let nodes: Vec<String> = net.nodes().iter().map(|n| n.to_string()).collect();
    let service = HttpServer::start().expect("nas's service");
    let port = service.addr().port().to_string();
    let nas_dir = Scratch::new("pair-offline-nas");
    let ticket = invite(&nas_dir, &["--name", "nas", "--share", &port]);
    assert!(ticket.starts_with("proxy-ticket-"), "{ticket}");
    let kept =
        std::fs::read_to_string(std::path::Path::new(&nas_dir.path()).join("invitations.toml"))
            .expect("invitations.toml");
    assert!(kept.contains("[[invitation]]"), "{kept}");
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(std::path::Path::new(&nas_dir.path()).join("invitations.toml"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o777,
        0o600,
        "the secrets' file is readable by others"
    );
    let listed = run(
        &["invite", "--list", "--data-dir", &nas_dir.path()],
        Duration::from_secs(30),
    );
    assert!(
        String::from_utf8_lossy(&listed.stdout).contains("s left"),
        "{listed:?}"
    );

    let _nas =
        ExitProcess::start(&nodes, std::path::Path::new(&nas_dir.path()), &[]).expect("nas starts");
    let laptop_dir = Scratch::new("pair-offline-laptop");
    // Joining needs the node that will hold the session: said plainly, nothing kept.
    let out = join(&laptop_dir, &ticket, "5");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no node runs"),
        "{out:?}"
    );
    let laptop = node(&net, &laptop_dir);
    let socks = laptop.socks.expect("socks").to_string();
    let out = join(&laptop_dir, &ticket, "150");
    assert!(
        out.status.success(),
        "proxy join: {out:?}\nlaptop:\n{}",
        laptop.stderr()
    );
    let out = curl_socks(&socks, &format!("http://nas.tox:{port}/index.html"));
    assert!(out.status.success(), "curl nas.tox after join: {out:?}");
    assert_eq!(out.stdout, PAGE.as_bytes());
}
