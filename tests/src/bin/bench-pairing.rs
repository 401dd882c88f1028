//! How long pairing takes, as a user meets it: from `proxy join TICKET` on laptop to the
//! first byte of `nas.tox:PORT` through laptop's SOCKS5 listener, with the real binary on a
//! private Tox network on loopback (tox-bootstrapd). Two ways:
//!
//! - **with the ticket's direct endpoints**: laptop reaches nas's direct socket (the same
//!   host here, as on a LAN), so first contact skips Tox;
//! - **without**: laptop runs `--path tox` (no direct socket), so first contact waits for Tox
//!   to find nas, as when the endpoints cannot be reached.
//!
//! Each round uses fresh identities on both sides (a first pairing). Prints each round, then
//! medians and all values.
//!
//! `cargo build --release -p proxy -p tests && PROXY_BIN=target/release/proxy
//! target/release/bench-pairing` (env: `BENCH_ROUNDS`, default 3). Needs `tox-bootstrapd`
//! (Debian `toxcore-utils`) and `curl`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tests::netns::Scratch;
use tests::servers::{
    ExitProcess, HttpServer, ProxyProcess, curl_socks, proxy_bin, run_with_timeout,
};
use tests::toxnet::ToxNet;

fn proxy(args: &[&str], limit: Duration) -> std::process::Output {
    run_with_timeout(Command::new(proxy_bin()).args(args), limit).expect("run proxy")
}

/// One pairing: nas invites, laptop joins, laptop fetches `nas.tox:PORT`. Returns (join
/// returned, first byte), both from the start of `join`, and what join said.
fn round(nodes: &[String], service: &HttpServer, direct: bool) -> (Duration, Duration, String) {
    let nas_dir = Scratch::new("bench-pair-nas");
    let laptop_dir = Scratch::new("bench-pair-laptop");
    let _nas = ExitProcess::start(nodes, Path::new(&nas_dir.path()), &[]).expect("nas starts");
    let mut extra = vec!["--node"];
    if !direct {
        extra.extend(["--path", "tox"]);
    }
    let laptop =
        ProxyProcess::node(nodes, Path::new(&laptop_dir.path()), &extra).expect("laptop starts");
    let socks = laptop.socks.expect("socks").to_string();
    let port = service.addr().port().to_string();
    let nas_path = nas_dir.path();
    let out = proxy(
        &[
            "invite",
            "--data-dir",
            &nas_path,
            "--name",
            "nas",
            "--share",
            &port,
        ],
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "proxy invite: {out:?}");
    let ticket = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .expect("a ticket")
        .trim()
        .to_owned();
    let laptop_path = laptop_dir.path();
    let started = Instant::now();
    let out = proxy(
        &["join", &ticket, "--data-dir", &laptop_path, "--wait", "120"],
        Duration::from_secs(150),
    );
    let joined = started.elapsed();
    assert!(out.status.success(), "proxy join: {out:?}");
    let said = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let out = curl_socks(&socks, &format!("http://nas.tox:{port}/index.html"));
    let first_byte = started.elapsed();
    assert!(out.status.success(), "curl nas.tox: {out:?}");
    (joined, first_byte, said)
}

fn summary(name: &str, mut v: Vec<Duration>) {
    v.sort();
    let all: Vec<String> = v
        .iter()
        .map(|d| format!("{:.2}", d.as_secs_f64()))
        .collect();
    println!(
        "{name:<46} median {:>6.2} s   ({})",
        v[v.len() / 2].as_secs_f64(),
        all.join(", ")
    );
}

fn main() {
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let net = ToxNet::start(4).expect("private tox network");
    let nodes: Vec<String> = net.nodes().iter().map(|n| n.to_string()).collect();
    let service = HttpServer::start().expect("nas's service");
    for (direct, label) in [(true, "with direct endpoints"), (false, "over Tox only")] {
        let (mut joins, mut firsts) = (Vec::new(), Vec::new());
        for i in 0..rounds {
            let (joined, first, said) = round(&nodes, &service, direct);
            println!(
                "{label} round {}: join {:.2} s, first byte {:.2} s  [{said}]",
                i + 1,
                joined.as_secs_f64(),
                first.as_secs_f64()
            );
            joins.push(joined);
            firsts.push(first);
        }
        summary(&format!("{label}: join returned"), joins);
        summary(&format!("{label}: first byte by name"), firsts);
    }
}
