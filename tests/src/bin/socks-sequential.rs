//! Sequential SOCKS5 connections through the real binary and an exit, printed as figures.
//!
//! ```text
//!  this ─ SOCKS5 CONNECT ─► proxy --exit ─ Tox / punched link ─► proxy exit ─► echo server
//! ```
//!
//! `socks-sequential [N]` (default 5,000) starts a private Tox network on 127.0.0.1, `proxy
//! exit --allow-any --allow-private` and a client `proxy --exit <id>`, then makes N SOCKS5
//! connections one after the other to a local echo server: CONNECT, 32 bytes each way, close.
//! A connection with no answer within 10 s (the client-side timeout of issue 13, where 9 of
//! 5,000 hung) counts as hung and is given up. Prints connections per second, failures, hangs
//! and latency percentiles. Needs `PROXY_BIN` or builds `proxy` first.

#![forbid(unsafe_code)]
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tests::servers::{ProxyProcess, proxy_bin};
use tests::toxnet::ToxNet;

/// How long one connection may go without an answer before it counts as hung.
const HUNG_AFTER: Duration = Duration::from_secs(10);
/// The bytes each connection sends and expects back.
const PAYLOAD: &[u8; 32] = b"sequential socks connection ping";

fn main() -> Result<()> {
    let n: u64 = match std::env::args().nth(1) {
        Some(arg) => arg.parse().with_context(|| format!("bad count {arg:?}"))?,
        None => 5_000,
    };
    let net = ToxNet::start(4).context("private tox network")?;
    let nodes: Vec<String> = net.nodes().iter().map(ToString::to_string).collect();
    let echo = echo_server()?;
    let exit_dir = net.scratch_dir("exit")?.display().to_string();
    let mut exit_args = vec![
        "exit",
        "--data-dir",
        &exit_dir,
        "--no-public-bootstrap",
        "--no-public-stun",
        "--allow-any",
        "--allow-private",
    ];
    for node in &nodes {
        exit_args.extend(["--bootstrap", node]);
    }
    let (exit, exit_id) = start_exit(&exit_args)?;
    let _exit = KillOnDrop(exit);
    let client_dir = net.scratch_dir("client")?.display().to_string();
    let mut client_args = vec![
        "--exit",
        &exit_id,
        "--data-dir",
        &client_dir,
        "--no-public-bootstrap",
        "--no-public-stun",
    ];
    for node in &nodes {
        client_args.extend(["--bootstrap", node]);
    }
    let client = ProxyProcess::start(&client_args).context("client proxy")?;
    let socks = client.socks.context("no socks listener")?;

    // The first connection is held while the session comes up.
    let started = Instant::now();
    while let Err(error) = connection(socks, echo, Duration::from_secs(30)) {
        if started.elapsed() > Duration::from_secs(90) {
            bail!("no connection through the exit within 90 s: {error}");
        }
    }
    println!("session up after {:?}", started.elapsed());

    let (mut failed, mut hung) = (0u64, 0u64);
    let mut took = Vec::with_capacity(n as usize);
    let started = Instant::now();
    for i in 0..n {
        let one = Instant::now();
        match connection(socks, echo, HUNG_AFTER) {
            Ok(()) => took.push(one.elapsed()),
            Err(error) if is_timeout(&error) => {
                hung += 1;
                eprintln!("connection {i} hung: {error}");
            }
            Err(error) => {
                failed += 1;
                eprintln!("connection {i} failed: {error}");
            }
        }
    }
    let elapsed = started.elapsed();
    took.sort();
    let at = |q: f64| {
        took.get(((took.len() as f64 - 1.0) * q) as usize)
            .copied()
            .unwrap_or_default()
    };
    println!(
        "{n} sequential socks5 connections: {:.0} conn/s, {} ok, {failed} failed, {hung} hung; \
         p50 {:?}, p99 {:?}, max {:?}",
        n as f64 / elapsed.as_secs_f64(),
        took.len(),
        at(0.5),
        at(0.99),
        at(1.0),
    );
    if failed + hung > 0 {
        bail!("{failed} failed, {hung} hung");
    }
    Ok(())
}

fn is_timeout(error: &std::io::Error) -> bool {
    matches!(error.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock)
}

/// One SOCKS5 CONNECT to `target` through `socks`, 32 bytes echoed, then a clean close.
fn connection(socks: SocketAddr, target: SocketAddr, limit: Duration) -> std::io::Result<()> {
    let SocketAddr::V4(target) = target else {
        return Err(std::io::Error::other("the echo server is on IPv4"));
    };
    let mut s = TcpStream::connect_timeout(&socks, limit)?;
    s.set_read_timeout(Some(limit))?;
    s.set_write_timeout(Some(limit))?;
    s.set_nodelay(true)?;
    s.write_all(&[5, 1, 0])?;
    let mut method = [0u8; 2];
    s.read_exact(&mut method)?;
    if method != [5, 0] {
        return Err(std::io::Error::other(format!("method reply {method:?}")));
    }
    let mut request = vec![5, 1, 0, 1];
    request.extend(target.ip().octets());
    request.extend(target.port().to_be_bytes());
    s.write_all(&request)?;
    let mut head = [0u8; 4];
    s.read_exact(&mut head)?;
    if head[1] != 0 {
        return Err(std::io::Error::other(format!("connect reply {}", head[1])));
    }
    let rest = match head[3] {
        1 => 4 + 2,
        4 => 16 + 2,
        atyp => return Err(std::io::Error::other(format!("reply address type {atyp}"))),
    };
    let mut bound = [0u8; 18];
    s.read_exact(&mut bound[..rest])?;
    s.write_all(PAYLOAD)?;
    let mut echoed = [0u8; PAYLOAD.len()];
    s.read_exact(&mut echoed)?;
    if &echoed != PAYLOAD {
        return Err(std::io::Error::other("wrong echo"));
    }
    s.shutdown(Shutdown::Write)?;
    let mut tail = Vec::new();
    s.read_to_end(&mut tail)?;
    Ok(())
}

/// A TCP echo server on 127.0.0.1, one thread per connection.
fn echo_server() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            thread::spawn(move || {
                let mut reader = stream;
                let Ok(mut writer) = reader.try_clone() else {
                    return;
                };
                let _ = std::io::copy(&mut reader, &mut writer);
                let _ = writer.shutdown(Shutdown::Write);
            });
        }
    });
    Ok(addr)
}

/// Starts `proxy exit` and reads its Tox ID from stdout.
fn start_exit(args: &[&str]) -> Result<(Child, String)> {
    let mut child = Command::new(proxy_bin())
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("spawn proxy exit")?;
    let stdout = child.stdout.take().context("exit stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .context("proxy exit printed no tox id within 30 s")?;
        if let Some(id) = line.strip_prefix("tox id: ") {
            return Ok((child, id.to_owned()));
        }
    }
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
