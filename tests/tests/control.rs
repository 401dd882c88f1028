//! The running node's control socket through the real binary: `proxy exit` (no listeners at
//! all) answers `proxy status` and `proxy peers` given its `--data-dir`, and another user is
//! refused even when the socket has been made reachable to everyone.

use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::process::Command;
use std::time::Duration;

use tests::netns::Scratch;
use tests::servers::{ExitProcess, proxy_bin, run_with_timeout};
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
