//! How fast and how steadily a client reaches the Internet through an exit, with the real
//! binary on a private Tox network on loopback (tox-bootstrapd), measured the way a user
//! meets it:
//!
//! - **cold start**: a request made the moment a new client starts (fresh data dir) is held
//!   until the session is up; time from the client's start to the first byte of the answer;
//! - **client restart**: the same client stopped and started again on its data dir;
//! - **exit kill -9 + restart**: the exit killed and started again on its identity while the
//!   client runs; time from the exit's new start until a request is served (requests retried
//!   with a 5 s limit each, as a browser's reload would);
//! - **sequential connections**: N connections one after another through SOCKS5 and the exit
//!   (each a small HTTP exchange with a 10 s limit): failures, hangs, connections per second and
//!   the growth of both processes' RSS.
//!
//! The exit allows the client by its ID (`--allow`), as the design card has it;
//! `BENCH_ALLOW_ANY=1` runs it with `--allow-any` instead, where the exit forgets the client
//! (a stranger) when it restarts and waits for its friend request again.
//!
//! `cargo run --release -p tests --bin bench-connect` (env: `BENCH_ROUNDS`, default 5;
//! `BENCH_SEQUENTIAL`, default 5,000; `PROXY_BIN` for the binary under test; `PROXY_LOG` for
//! both processes' RUST_LOG, `BENCH_EXIT_LOG=FILE` to keep the exits' logs, `BENCH_VERBOSE=1` to
//! print the client's log of the cold start). Prints medians
//! and ranges. Needs `tox-bootstrapd` (Debian `toxcore-utils`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use tests::servers::{HttpServer, ProxyProcess, proxy_bin};
use tests::toxnet::ToxNet;

/// A `proxy exit` process, killed on drop.
struct Exit {
    child: Child,
    id: String,
}

impl Exit {
    /// An exit that allows `client` (or anyone, when `None`: the client is then a stranger
    /// that the exit forgets when it restarts).
    fn start(net: &ToxNet, dir: &str, client: Option<&str>) -> Exit {
        let mut args = vec![
            "exit".to_owned(),
            "--data-dir".to_owned(),
            dir.to_owned(),
            "--no-public-bootstrap".to_owned(),
            "--no-public-stun".to_owned(),
            "--allow-private".to_owned(),
        ];
        match client {
            Some(id) => args.extend(["--allow".to_owned(), id.to_owned()]),
            None => args.push("--allow-any".to_owned()),
        }
        for node in net.nodes() {
            args.push("--bootstrap".into());
            args.push(node.to_string());
        }
        // BENCH_EXIT_LOG=FILE keeps the exits' logs (RUST_LOG from PROXY_LOG).
        let log = match std::env::var_os("BENCH_EXIT_LOG") {
            Some(path) => Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .expect("exit log file"),
            ),
            None => Stdio::null(),
        };
        let mut child = Command::new(proxy_bin())
            .args(&args)
            .env(
                "RUST_LOG",
                std::env::var("PROXY_LOG").unwrap_or_else(|_| "proxy=debug".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn proxy exit");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        loop {
            let line = rx
                .recv_timeout(Duration::from_secs(20))
                .expect("proxy exit prints its tox id");
            if let Some(id) = line.strip_prefix("tox id: ") {
                return Exit {
                    child,
                    id: id.to_owned(),
                };
            }
        }
    }

    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Exit {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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

fn start_client(net: &ToxNet, dir: &str, exit: &str) -> ProxyProcess {
    let nodes: Vec<String> = net.nodes().iter().map(|n| n.to_string()).collect();
    let mut args = vec![
        "--exit",
        exit,
        "--data-dir",
        dir,
        "--no-public-bootstrap",
        "--no-public-stun",
        "--connect-timeout",
        "90",
    ];
    for n in &nodes {
        args.push("--bootstrap");
        args.push(n);
    }
    ProxyProcess::start(&args).expect("client starts")
}

/// One HTTP/1.0 exchange with `target` through the SOCKS5 proxy at `socks`; returns when the
/// first byte of the answer arrives (and reads the rest).
fn fetch(socks: SocketAddr, target: SocketAddr, limit: Duration) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    let mut s = TcpStream::connect_timeout(&socks, limit).map_err(|e| format!("connect: {e}"))?;
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    s.set_read_timeout(Some(left()))
        .map_err(|e| e.to_string())?;
    let SocketAddr::V4(v4) = target else {
        return Err("IPv4 targets only".into());
    };
    let mut req = vec![5, 1, 0, 5, 1, 0, 1];
    req.extend_from_slice(&v4.ip().octets());
    req.extend_from_slice(&v4.port().to_be_bytes());
    req.extend_from_slice(b"GET /index.html HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n");
    s.write_all(&req).map_err(|e| format!("write: {e}"))?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head)
        .map_err(|e| format!("socks reply: {e}"))?;
    if head[..2] != [5, 0] || head[3] != 0 {
        return Err(format!("socks refused: reply {}", head[3]));
    }
    let mut first = [0u8; 1];
    s.set_read_timeout(Some(left()))
        .map_err(|e| e.to_string())?;
    s.read_exact(&mut first)
        .map_err(|e| format!("answer: {e}"))?;
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    Ok(())
}

/// Resident set size of `pid` in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
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
    let sequential = env_or("BENCH_SEQUENTIAL", 5000);
    let allow_any = std::env::var_os("BENCH_ALLOW_ANY").is_some();
    let net = ToxNet::start(4).expect("private tox network (tox-bootstrapd)");
    let web = HttpServer::start().expect("http server");
    let target = web.addr();
    let (mut cold, mut restart, mut exit_back) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let exit_dir = net.scratch_dir(&format!("exit{round}")).expect("dir");
        let exit_dir = exit_dir.display().to_string();
        let client_dir = net.scratch_dir(&format!("client{round}")).expect("dir");
        let client_dir = client_dir.display().to_string();
        let client_id = (!allow_any).then(|| identity(&client_dir));
        let mut exit = Exit::start(&net, &exit_dir, client_id.as_deref());
        let id = exit.id.clone();

        let started = Instant::now();
        let client = start_client(&net, &client_dir, &id);
        let socks = client.socks.expect("socks");
        fetch(socks, target, Duration::from_secs(90)).expect("cold request held and served");
        cold.push(started.elapsed());
        if std::env::var_os("BENCH_VERBOSE").is_some() {
            eprintln!("client log:\n{}", client.stderr());
        }
        drop(client);

        let started = Instant::now();
        let client = start_client(&net, &client_dir, &id);
        let socks = client.socks.expect("socks");
        fetch(socks, target, Duration::from_secs(90)).expect("request after a client restart");
        restart.push(started.elapsed());

        exit.kill();
        let started = Instant::now();
        exit = Exit::start(&net, &exit_dir, client_id.as_deref());
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

        if round + 1 == rounds && sequential > 0 {
            let pids = (client.pid(), exit.child.id());
            // Warm up the allocators before the first reading.
            for _ in 0..100 {
                let _ = fetch(socks, target, Duration::from_secs(10));
            }
            let before = (rss_kib(pids.0), rss_kib(pids.1));
            let (mut failed, mut hung) = (0, 0);
            let t = Instant::now();
            for _ in 0..sequential {
                match fetch(socks, target, Duration::from_secs(10)) {
                    Ok(()) => {}
                    Err(e) if e.contains("timed out") || e.contains("WouldBlock") => hung += 1,
                    Err(e) if e.contains("Resource temporarily unavailable") => hung += 1,
                    Err(_) => failed += 1,
                }
            }
            let secs = t.elapsed().as_secs_f64();
            let after = (rss_kib(pids.0), rss_kib(pids.1));
            println!(
                "{sequential} sequential connections: {failed} failed, {hung} hung (no answer in 10 s), \
                 {:.0} connections/s; RSS client {} -> {} KiB ({:+}), exit {} -> {} KiB ({:+})",
                sequential as f64 / secs,
                before.0,
                after.0,
                after.0 as i64 - before.0 as i64,
                before.1,
                after.1,
                after.1 as i64 - before.1 as i64,
            );
        }
    }
    summary("cold start to first byte", cold);
    summary("client restart to first byte", restart);
    summary("exit kill -9 + restart to served", exit_back);
}
