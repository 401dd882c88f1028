//! How fast and how steadily a client reaches the Internet through an exit, with the real
//! binary on a private Tox network on loopback (tox-bootstrapd), measured the way a user
//! meets it:
//!
//! - **cold start**: a request made the moment a new client starts (fresh data dir) is held
//!   until the session is up; time from the client's start to the first byte of the answer;
//! - **client restart**: the same client stopped and started again on its data dir;
//! - **exit kill -9 + restart**: the exit killed and started again on its identity while the
//!   client runs; time from the exit's new start until a request is served (requests retried
//!   with a 5 s limit each, as a browser's reload would).
//!
//! `socks-sequential` measures the steady state: many connections one after another.
//!
//! The exit allows the client by its ID (`--allow`), as the design card has it;
//! `BENCH_ALLOW_ANY=1` runs it with `--allow-any` instead, where the exit forgets the client
//! (a stranger) when it restarts and waits for its friend request again.
//!
//! `cargo run --release -p tests --bin bench-connect` (env: `BENCH_ROUNDS`, default 5;
//! `PROXY_BIN` for the binary under test; `PROXY_LOG` for both processes' `RUST_LOG`,
//! `PROXY_EXIT_LOG=FILE` to keep the exits' logs, `BENCH_VERBOSE=1` to print the client's log
//! of each cold start). Prints each round, then medians and all values. Needs `tox-bootstrapd`
//! (Debian `toxcore-utils`).

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tests::servers::{ExitProcess, HttpServer, ProxyProcess, proxy_bin, socks5_connect};
use tests::toxnet::ToxNet;

/// An exit that allows `client` (or anyone, when `None`: the client is then a stranger that
/// the exit forgets when it restarts).
fn start_exit(nodes: &[String], dir: &str, client: Option<&str>) -> ExitProcess {
    let mut extra = vec!["--allow-private"];
    match client {
        Some(id) => extra.extend(["--allow", id]),
        None => extra.push("--allow-any"),
    }
    ExitProcess::start(nodes, Path::new(dir), &extra).expect("proxy exit starts")
}

/// The Tox ID of the identity in `dir` (created if missing).
fn identity(dir: &str) -> String {
    let out = Command::new(proxy_bin())
        .args(["id", "--data-dir", dir])
        .output()
        .expect("proxy id");
    assert!(out.status.success(), "proxy id failed");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn start_client(nodes: &[String], dir: &str, exit: &str) -> ProxyProcess {
    ProxyProcess::client(nodes, Path::new(dir), exit, &["--connect-timeout", "90"])
        .expect("client starts")
}

/// One HTTP exchange with `target` through the SOCKS5 proxy at `socks`, within `limit`.
fn fetch(socks: SocketAddr, target: SocketAddr, limit: Duration) -> Result<(), String> {
    let mut s = socks5_connect(socks, target, limit).map_err(|e| format!("socks: {e}"))?;
    s.write_all(b"GET /index.html HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer)
        .map_err(|e| format!("answer: {e}"))?;
    if !answer.starts_with(b"HTTP/1.1 200") {
        return Err("no 200 answer".into());
    }
    Ok(())
}

fn summary(name: &str, mut v: Vec<Duration>) {
    v.sort();
    let secs: Vec<String> = v
        .iter()
        .map(|d| format!("{:.2}", d.as_secs_f64()))
        .collect();
    println!(
        "{name:<34} median {:>6.2} s   ({})",
        v[v.len() / 2].as_secs_f64(),
        secs.join(", ")
    );
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let rounds = env_or("BENCH_ROUNDS", 5);
    let allow_any = std::env::var_os("BENCH_ALLOW_ANY").is_some();
    let net = ToxNet::start(4).expect("private tox network (tox-bootstrapd)");
    let nodes: Vec<String> = net.nodes().iter().map(|n| n.to_string()).collect();
    let web = HttpServer::start().expect("http server");
    let target = web.addr();
    let (mut cold, mut restart, mut exit_back) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let exit_dir = net.scratch_dir(&format!("exit{round}")).expect("dir");
        let exit_dir = exit_dir.display().to_string();
        let client_dir = net.scratch_dir(&format!("client{round}")).expect("dir");
        let client_dir = client_dir.display().to_string();
        let client_id = (!allow_any).then(|| identity(&client_dir));
        let mut exit = start_exit(&nodes, &exit_dir, client_id.as_deref());
        let id = exit.id.clone();

        let started = Instant::now();
        let client = start_client(&nodes, &client_dir, &id);
        let socks = client.socks.expect("socks");
        fetch(socks, target, Duration::from_secs(90)).expect("cold request held and served");
        cold.push(started.elapsed());
        if std::env::var_os("BENCH_VERBOSE").is_some() {
            eprintln!("client log:\n{}", client.stderr());
        }
        drop(client);

        let started = Instant::now();
        let client = start_client(&nodes, &client_dir, &id);
        let socks = client.socks.expect("socks");
        fetch(socks, target, Duration::from_secs(90)).expect("request after a client restart");
        restart.push(started.elapsed());

        drop(exit);
        let started = Instant::now();
        exit = start_exit(&nodes, &exit_dir, client_id.as_deref());
        loop {
            match fetch(socks, target, Duration::from_secs(5)) {
                Ok(()) => break,
                Err(_) if started.elapsed() < Duration::from_secs(120) => {}
                Err(e) => panic!("no request served within 120 s of the exit's restart: {e}"),
            }
        }
        exit_back.push(started.elapsed());
        println!(
            "round {round}: cold {:.2} s, client restart {:.2} s, exit restart {:.2} s",
            cold[round].as_secs_f64(),
            restart[round].as_secs_f64(),
            exit_back[round].as_secs_f64()
        );
    }
    summary("cold start to first byte", cold);
    summary("client restart to first byte", restart);
    summary("exit kill -9 + restart to served", exit_back);
}
