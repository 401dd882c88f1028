//! The NAT matrix: two peers in network namespaces behind NAT routers of different kinds
//! ([`tests::nat`]), each learning its candidates from a coturn STUN server in the "public"
//! namespace, exchanging link offers (here through the test, in proxy over Tox), punching UDP
//! and TCP at once, and moving 4 MB over the path they agree on, checked by SHA-256 on both
//! ends.
//!
//! | side a         | side b     | path  |
//! |----------------|------------|-------|
//! | public         | cone       | udp   |
//! | public         | symmetric  | udp   |
//! | cone           | cone       | udp   |
//! | cone           | symmetric  | none  |
//! | symmetric      | symmetric  | none  |
//! | udp blocked    | cone       | tcp   |
//! | udp blocked    | symmetric  | none  |
//!
//! "none" is where a session stays on Tox; these tests run the punching primitives only (the
//! `punch-agent nat` helper in both homes), so they check that both sides agree there is no
//! direct path. `nat_proxy` runs whole `proxy exit` / `proxy` processes on the same
//! topologies, with the private Tox network in the public namespace, and asserts the path
//! `proxy status` reports (punched UDP, punched TCP, Tox) after a fetch through the exit.
//!
//! Needs root, nftables and coturn; skips with a message where namespaces are impossible.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use tests::nat::{Nat, NatTopology, unavailable};

const AGENT: &str = env!("CARGO_BIN_EXE_punch-agent");
/// Bytes sent from a to b over the agreed path.
const BYTES: usize = 4_000_000;

/// A child killed on drop.
struct Agent {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Agent {
    fn spawn(topo: &NatTopology, side: usize, extra: &[&str]) -> Self {
        let stun = topo.stun().to_string();
        let mut args = vec![AGENT, "nat", "--stun", &stun, "--timeout", "8"];
        args.extend_from_slice(extra);
        let mut child = topo
            .in_peer(side, &args)
            .env("RUST_LOG", "fabric=info")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn punch-agent");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines }
    }

    /// The next line starting with `prefix` (others are skipped), within the deadline.
    fn expect(&self, prefix: &str, deadline: Instant) -> String {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return line,
                Ok(_) => {}
                Err(e) => panic!("no `{prefix}` line from punch-agent: {e}"),
            }
        }
    }

    fn send_line(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().expect("piped stdin");
        writeln!(stdin, "{line}").expect("write to punch-agent");
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs one cell; returns each side's `path` word. Where a path was made, also checks the
/// transfer's digests.
fn cell(a: Nat, b: Nat) -> Option<(String, String)> {
    if let Some(why) = unavailable() {
        eprintln!("skipping: {why}");
        return None;
    }
    tests::init_tracing();
    let topo = NatTopology::new(a, b).expect("build the NAT topology");
    let bytes = BYTES.to_string();
    let mut pa = Agent::spawn(&topo, 0, &["--send", &bytes]);
    let mut pb = Agent::spawn(&topo, 1, &[]);
    let deadline = Instant::now() + Duration::from_secs(90);
    // The offer exchange, which proxy does over Tox.
    let offer_a = pa.expect("offer ", deadline);
    let offer_b = pb.expect("offer ", deadline);
    pa.send_line(&offer_b);
    pb.send_line(&offer_a);
    let path_a = pa.expect("path ", deadline);
    let path_b = pb.expect("path ", deadline);
    let word = |l: &str| l.split_whitespace().nth(1).unwrap_or_default().to_owned();
    let (wa, wb) = (word(&path_a), word(&path_b));
    assert_eq!(wa, wb, "the sides disagree: {path_a:?} vs {path_b:?}");
    if wa != "none" {
        let sent = pa.expect("sent ", deadline);
        let received = pb.expect("received ", deadline);
        let digest_sent = sent.split_whitespace().nth(1).unwrap_or_default();
        let fields: Vec<&str> = received.split_whitespace().collect();
        assert_eq!(fields.get(1).copied(), Some(bytes.as_str()), "{received}");
        assert_eq!(fields.get(2).copied(), Some(digest_sent), "digests differ");
        assert_eq!(digest_sent.len(), 64, "{sent}");
    }
    Some((wa, wb))
}

fn expect_path(a: Nat, b: Nat, want: &str) {
    if let Some((path, _)) = cell(a, b) {
        assert_eq!(path, want, "{a:?} / {b:?}");
    }
}

#[test]
fn public_exit_and_client_behind_cone_nat_punch_udp() {
    expect_path(Nat::Public, Nat::Cone, "udp");
}

#[test]
fn public_exit_and_client_behind_symmetric_nat_punch_udp() {
    expect_path(Nat::Public, Nat::Symmetric, "udp");
}

#[test]
fn both_behind_cone_nat_punch_udp() {
    expect_path(Nat::Cone, Nat::Cone, "udp");
}

#[test]
fn cone_and_symmetric_nat_find_no_direct_path() {
    expect_path(Nat::Cone, Nat::Symmetric, "none");
}

#[test]
fn both_behind_symmetric_nat_find_no_direct_path() {
    expect_path(Nat::Symmetric, Nat::Symmetric, "none");
}

#[test]
fn udp_blocked_on_one_side_punches_tcp() {
    expect_path(Nat::UdpBlocked, Nat::Cone, "tcp");
}

#[test]
fn udp_blocked_and_symmetric_nat_find_no_direct_path() {
    expect_path(Nat::UdpBlocked, Nat::Symmetric, "none");
}
