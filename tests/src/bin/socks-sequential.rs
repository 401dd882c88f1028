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
//! and latency percentiles, and both processes' RSS growth over the run. Needs `PROXY_BIN` or
//! builds `proxy` first.

#![forbid(unsafe_code)]
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tests::servers::{ExitProcess, ProxyProcess, rss_kib, socks5_connect};
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
    let exit = ExitProcess::start(
        &nodes,
        &net.scratch_dir("exit")?,
        &["--allow-any", "--allow-private"],
    )
    .context("proxy exit")?;
    let client = ProxyProcess::client(&nodes, &net.scratch_dir("client")?, &exit.id, &[])
        .context("client proxy")?;
    let socks = client.socks.context("no socks listener")?;

    // The first connection is held while the session comes up.
    let started = Instant::now();
    while let Err(error) = connection(socks, echo, Duration::from_secs(30)) {
        if started.elapsed() > Duration::from_secs(90) {
            bail!("no connection through the exit within 90 s: {error}");
        }
    }
    println!("session up after {:?}", started.elapsed());
    // Warm up the allocators before the first RSS reading.
    for _ in 0..100 {
        connection(socks, echo, HUNG_AFTER)?;
    }
    let rss_before = (rss_kib(client.pid()), rss_kib(exit.pid()));

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
    let rss_after = (rss_kib(client.pid()), rss_kib(exit.pid()));
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
    println!(
        "RSS: client {} -> {} KiB ({:+}), exit {} -> {} KiB ({:+})",
        rss_before.0,
        rss_after.0,
        rss_after.0 as i64 - rss_before.0 as i64,
        rss_before.1,
        rss_after.1,
        rss_after.1 as i64 - rss_before.1 as i64,
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
    let mut s = socks5_connect(socks, target, limit)?;
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
