//! The running node's control socket through the real binary: `proxy exit` (no listeners at
//! all) answers `proxy status` and `proxy peers` given its `--data-dir`, and another user is
//! refused even when the socket has been made reachable to everyone.

use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::process::Command;
use std::time::Duration;

use tests::netns::Scratch;
use tests::servers::{ExitProcess, ProxyProcess, curl_socks, proxy_bin, run_with_timeout};
use tests::toxnet::ToxNet;

/// The unprivileged user the refusal is tried as (Debian's `nobody`).
const NOBODY: u32 = 65534;

fn run(cmd: &mut Command) -> std::process::Output {
    run_with_timeout(cmd, Duration::from_secs(30)).expect("run proxy")
}

#[test]
fn a_node_answers_its_owner_on_its_data_dir_and_refuses_other_users() {
    let net = ToxNet::start(4).expect("private tox network");
    let nodes: Vec<String> = net.nodes().iter().map(|n| n.to_string()).collect();
    let dir = Scratch::new("control-exit");
    let laptop = fabric::id::ToxId::new(fabric::id::PublicKey([3; 32]), [0; 4]).to_string();
    let exit = ExitProcess::start(
        &nodes,
        std::path::Path::new(&dir.path()),
        &[
            "--peer",
            &format!("laptop={laptop}"),
            "--share",
            "laptop:8080",
        ],
    )
    .expect("proxy exit starts");
    let bin = proxy_bin();

    let out = run(Command::new(bin).args(["peers", "--data-dir", &dir.path()]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "proxy peers: {out:?}");
    assert!(text.contains("peer laptop 0303"), "{text}");
    assert!(
        text.contains("may here: reach shared ports 8080/tcp"),
        "{text}"
    );
    let out = run(Command::new(bin).args(["status", "--data-dir", &dir.path()]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "proxy status: {out:?}");
    assert!(text.starts_with("proxy exit"), "{text}");
    assert!(text.contains(&format!("tox id: {}", exit.id)), "{text}");

    // Another user: the socket is 0600, and even opened to all, its credentials are refused.
    let socket = std::path::Path::new(&dir.path()).join("control.sock");
    let mode = std::fs::metadata(&socket)
        .expect("socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let bin_dir = Scratch::new("control-bin");
    let copy = std::path::Path::new(&bin_dir.path()).join("proxy");
    std::fs::copy(bin, &copy).expect("copy the binary");
    for path in [std::path::PathBuf::from(bin_dir.path()), copy.clone()] {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let as_nobody = || {
        let mut cmd = Command::new(&copy);
        cmd.args(["peers", "--data-dir", &dir.path()])
            .uid(NOBODY)
            .gid(NOBODY);
        run(&mut cmd)
    };
    let out = as_nobody();
    assert!(!out.status.success(), "another user was answered: {out:?}");
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let out = as_nobody();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "another user was answered: {out:?}");
    assert!(err.contains("another user's"), "{err}");
    drop(exit);
}

/// `proxy peer add|grant|revoke` on a running `proxy exit` that knew nobody: the peer it adds
/// and grants a share reaches the share at once (no restart on either side), the change is
/// kept in the data dir across a restart, and a revoke is refused at once.
#[test]
fn peers_changed_at_run_time_take_effect_at_once_and_are_kept() {
    let net = ToxNet::start(4).expect("private tox network");
    let nodes: Vec<String> = net.nodes().iter().map(|n| n.to_string()).collect();
    let service = tests::servers::HttpServer::start().expect("service");
    let port = service.addr().port().to_string();
    let nas_dir = Scratch::new("control-nas");
    let nas_path = std::path::PathBuf::from(nas_dir.path());
    let nas = ExitProcess::start(&nodes, &nas_path, &[]).expect("nas starts");
    let laptop_dir = Scratch::new("control-laptop");
    let bin = proxy_bin();
    let out = run(Command::new(bin).args(["id", "--data-dir", &laptop_dir.path()]));
    let laptop_id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let peer_nas = format!("nas={}", nas.id);
    let laptop = ProxyProcess::node(
        &nodes,
        std::path::Path::new(&laptop_dir.path()),
        &["--peer", &peer_nas],
    )
    .expect("laptop starts");
    let socks = laptop.socks.expect("socks").to_string();

    let peer = |change: &[&str]| {
        let mut cmd = Command::new(bin);
        cmd.arg("peer")
            .args(change)
            .args(["--data-dir", &nas_dir.path()]);
        let out = run(&mut cmd);
        assert!(out.status.success(), "proxy peer {change:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let said = peer(&["add", "laptop", &laptop_id]);
    assert!(said.contains("peer laptop added"), "{said}");
    let said = peer(&["grant", "laptop", "share", &port]);
    assert!(said.contains(&format!("ports {port}/tcp")), "{said}");
    let url = format!("http://nas.tox:{port}/index.html");
    let out = curl_socks(&socks, &url);
    assert!(
        out.status.success(),
        "the share granted at run time was not reached: {}\nlaptop:\n{}",
        String::from_utf8_lossy(&out.stderr),
        laptop.stderr()
    );
    let kept = std::fs::read_to_string(nas_path.join("peers.toml")).expect("peers.toml");
    assert!(
        kept.contains("name = \"laptop\"") && kept.contains(&format!("share = \"{port}/tcp\"")),
        "{kept}"
    );

    // A restarted nas knows laptop and its share from the data dir alone.
    drop(nas);
    let nas = ExitProcess::start(&nodes, &nas_path, &[]).expect("nas restarts");
    let out = curl_socks(&socks, &url);
    assert!(
        out.status.success(),
        "the kept share was not reached after nas restarted: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let served = service.requests();
    peer(&["revoke", "laptop", "share"]);
    let out = curl_socks(&socks, &url);
    assert!(!out.status.success(), "a revoked share was reached");
    assert_eq!(service.requests(), served, "a revoked share was dialed");
    // A bad change is refused with the reason, and changes nothing.
    let mut cmd = Command::new(bin);
    cmd.args([
        "peer",
        "grant",
        "desktop",
        "exit",
        "--data-dir",
        &nas_dir.path(),
    ]);
    let out = run(&mut cmd);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no peer is called desktop"));
    drop(nas);
}

/// `proxy peer remove` on a running node: the removed peer's open stream ends at once (the
/// service holds it open forever, so only the removal can end it), its next request is
/// refused, and it stays removed across a restart even though the command line names it.
#[test]
fn a_removed_peer_loses_its_session_and_streams_at_once() {
    use std::io::{self, Read as _, Write as _};

    let net = ToxNet::start(4).expect("private tox network");
    let nodes: Vec<String> = net.nodes().iter().map(|n| n.to_string()).collect();
    // A service that accepts and never closes, nor answers.
    let service = std::net::TcpListener::bind("127.0.0.1:0").expect("service");
    let port = service.local_addr().unwrap().port();
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = held.clone();
    std::thread::spawn(move || {
        for conn in service.incoming().flatten() {
            keep.lock().unwrap().push(conn);
        }
    });
    let bin = proxy_bin();
    let laptop_dir = Scratch::new("remove-laptop");
    let out = run(Command::new(bin).args(["id", "--data-dir", &laptop_dir.path()]));
    let laptop_id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let nas_dir = Scratch::new("remove-nas");
    let nas_path = std::path::PathBuf::from(nas_dir.path());
    let nas_flags = [
        "--peer".to_owned(),
        format!("laptop={laptop_id}"),
        "--share".into(),
        format!("laptop:{port}"),
    ];
    let nas_flags: Vec<&str> = nas_flags.iter().map(String::as_str).collect();
    let nas = ExitProcess::start(&nodes, &nas_path, &nas_flags).expect("nas starts");
    let peer_nas = format!("nas={}", nas.id);
    let laptop = ProxyProcess::node(
        &nodes,
        std::path::Path::new(&laptop_dir.path()),
        &["--peer", &peer_nas],
    )
    .expect("laptop starts");
    let socks = laptop.socks.expect("socks");

    let mut stream =
        tests::servers::socks5_connect_name(socks, "nas.tox", port, Duration::from_secs(100))
            .unwrap_or_else(|e| panic!("the share was not reached: {e}\n{}", laptop.stderr()));
    stream.write_all(b"hello").expect("write");
    // nas dialed the service for it.
    let dialed = std::time::Instant::now();
    while held.lock().unwrap().is_empty() {
        assert!(
            dialed.elapsed() < Duration::from_secs(30),
            "the service was never dialed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let out =
        run(Command::new(bin).args(["peer", "remove", "laptop", "--data-dir", &nas_dir.path()]));
    assert!(out.status.success(), "proxy peer remove: {out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("peer laptop removed"));
    // The stream ends: nothing else would end it within the read timeout (the service holds
    // it forever, the session's idle timeout is minutes).
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut buf = [0u8; 64];
    let removed = std::time::Instant::now();
    match stream.read(&mut buf) {
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            panic!("the removed peer's stream lives on: {e}")
        }
        Ok(0) | Err(_) => {}
        Ok(n) => panic!("the held service sent {n} bytes"),
    }
    println!("stream ended {:?} after the removal", removed.elapsed());
    let peers = run(Command::new(bin).args(["peers", "--data-dir", &nas_dir.path()]));
    let peers = String::from_utf8_lossy(&peers.stdout).into_owned();
    assert!(
        !peers.contains("laptop"),
        "nas still shows laptop:\n{peers}"
    );
    assert!(
        !peers.contains(&laptop_id[..64]),
        "nas still shows laptop's key:\n{peers}"
    );
    let kept = std::fs::read_to_string(nas_path.join("peers.toml")).expect("peers.toml");
    assert!(!kept.contains("name = \"laptop\""), "{kept}");
    // Its next request is refused (no session may be held, nothing is dialed).
    let before = held.lock().unwrap().len();
    let again =
        tests::servers::socks5_connect_name(socks, "nas.tox", port, Duration::from_secs(10));
    assert!(again.is_err(), "the removed peer reached the share again");
    assert_eq!(held.lock().unwrap().len(), before, "the share was dialed");

    // Restarted with the same flags, nas keeps laptop removed.
    drop(nas);
    let nas = ExitProcess::start(&nodes, &nas_path, &nas_flags).expect("nas restarts");
    let peers = run(Command::new(bin).args(["peers", "--data-dir", &nas_dir.path()]));
    let peers = String::from_utf8_lossy(&peers.stdout).into_owned();
    assert!(
        !peers.contains("laptop"),
        "laptop is back after a restart:\n{peers}"
    );
    drop(nas);
}
