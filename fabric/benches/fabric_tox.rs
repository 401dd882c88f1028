//! The whole fabric over Tox on loopback: connect time (from a fresh client's start to the
//! first byte back through a fresh exit, median of several) and bulk throughput of one and of
//! eight streams, mux over KCP over Tox lossy packets. The exit runs in a child process, as
//! real peers run on two machines. Private tox-bootstrapd network on 127.0.0.1 only.
//!
//! Each connect prints its timeline, both processes' steps on one wall clock: the client's
//! start is 0; the exit was started just before it (its `id` line is awaited first). Most of
//! the time is c-toxcore's onion layer coming up on both fresh nodes: its timers count whole
//! seconds of the monotonic clock, it announces nothing during its first three, and it reports
//! itself connected only after three more seconds of being announced (6–7 s here, depending
//! on where in its second the node started). Then the client's friend request reaches the
//! exit within ~0.2 s, the client sends its DHT key through the onion at c-toxcore's next
//! second, and the exit reaches it through a TCP relay (~0.25 s) before the DHT finds its
//! address (a second later), so friends come online ~1.25 s after the onion; session and
//! first byte take ~0.15 s more.
//!
//! `cargo bench -p fabric --features tox,test-util --bench fabric_tox`
//! (`FABRIC_BENCH_MB` sets the megabytes per bulk run, default 64; `FABRIC_BENCH_CONNECTS`
//! the number of fresh exits to time, default 3; `FABRIC_BENCH_PATH` the path, default `tox`
//! (`auto` measures the punched link the session moves to); `RUST_LOG` turns on both
//! processes' logs, with c-toxcore's under the target `toxcore`).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fabric::path::PathChoice;
use fabric::peer::{Fabric, FabricConfig, Peer};
use fabric::tox::testnet::{self, ToxNet};
use fabric::tox::{Connection, ToxConfig, ToxHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(90);
/// How often the timeline watchers sample a node's status while it connects.
const WATCH_EVERY: Duration = Duration::from_millis(10);

fn main() {
    if std::env::var_os("RUST_LOG").is_some() {
        // Both processes log to stderr with wall-clock times, so their lines interleave in
        // order; c-toxcore's own log arrives under the target `toxcore`.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    if let Some(config) = testnet::child_config() {
        rt.block_on(child_exit(config));
    } else {
        rt.block_on(parent());
    }
}

/// The path the sessions may take: `FABRIC_BENCH_PATH` (default `tox`: the figures are
/// those of KCP over Tox; `auto` lets the session move to a punched link as the proxy does).
fn bench_path() -> PathChoice {
    std::env::var("FABRIC_BENCH_PATH")
        .ok()
        .map_or(PathChoice::Tox, |p| {
            p.parse().expect("FABRIC_BENCH_PATH: auto|tox|udp|tcp")
        })
}

fn fabric_config(tox: ToxConfig) -> FabricConfig {
    let mut config = FabricConfig::new(tox);
    config.path.choice = bench_path();
    config
}

async fn parent() {
    let mb: usize = std::env::var("FABRIC_BENCH_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let rounds: usize = std::env::var("FABRIC_BENCH_CONNECTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    let net = ToxNet::start(4).expect("tox-bootstrapd network");
    println!("fabric over Tox, loopback, exit in a child process");
    // Each round: a fresh exit process and a fresh client, timed from the client's start
    // to the first byte back through the exit. The last pair carries the bulk runs.
    let mut connects = Vec::new();
    let mut last = None;
    for round in 0..rounds {
        // c-toxcore's timers tick at whole seconds of the monotonic clock, and where in its
        // second a pair starts moves its connect time by up to a second. Rounds that follow
        // each other would start at the same point of the second (each begins right after the
        // previous first byte, itself a fixed time after a tick), so spread the starts evenly
        // over the second: the median is then that of a start at a random time.
        tokio::time::sleep(Duration::from_millis((round * 1000 / rounds) as u64)).await;
        let mut child = net
            .spawn_child(&format!("exit{round}"))
            .expect("spawn exit");
        let exit_id = child.id(WAIT).expect("exit reports its id");
        let exit_lines = child.take_lines();
        let config = net.config(net.scratch_dir(&format!("client{round}")).expect("dir"));
        let t0 = Instant::now();
        let t0_wall = unix_micros();
        let client = Fabric::start(fabric_config(config)).expect("client fabric");
        let watcher = tokio::spawn(watch(client.tox().clone()));
        let peer = std::sync::Arc::new(
            tokio::time::timeout(WAIT, client.connect(exit_id))
                .await
                .expect("connect in time")
                .expect("connect"),
        );
        let session_at = t0.elapsed();
        assert_eq!(send_counted(&peer, 1, 1).await, 1);
        let first_byte = t0.elapsed();
        println!(
            "connect {}: session after {session_at:.2?}, first byte back after {first_byte:.2?}",
            round + 1
        );
        let mut steps: Vec<(i64, String)> = watcher
            .await
            .expect("watcher")
            .into_iter()
            .map(|(at, what)| (at - t0_wall, format!("client {what}")))
            .collect();
        steps.extend(exit_lines.try_iter().filter_map(|line| {
            let (at, what) = line.strip_prefix("at ")?.split_once(' ')?;
            Some((at.parse::<i64>().ok()? - t0_wall, format!("exit   {what}")))
        }));
        steps.sort();
        for (at, what) in steps {
            println!("  {:>7.2} s  {what}", at as f64 / 1e6);
        }
        connects.push(first_byte);
        if let Some((old_client, old_peer, old_child)) = last.replace((client, peer, child)) {
            drop(old_peer);
            Fabric::shutdown(&old_client).await;
            drop(old_child);
        }
    }
    connects.sort();
    println!(
        "connect: median {:.2?} over {rounds} fresh exits (min {:.2?}, max {:.2?})",
        connects[connects.len() / 2],
        connects[0],
        connects[connects.len() - 1]
    );
    let (client, peer, child) = last.expect("at least one round");
    // The bulk runs measure a settled pair: on the direct UDP path, which c-toxcore finds a
    // DHT round or two after the friend came online through a TCP relay.
    let settling = Instant::now();
    while peer.status().path != Connection::Udp && settling.elapsed() < WAIT {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "path {:?} {:.2?} after the last first byte",
        peer.status().path,
        settling.elapsed()
    );
    for streams in [1usize, 8] {
        let per_stream = mb * 1024 * 1024 / streams;
        let start = Instant::now();
        let tasks: Vec<_> = (0..streams)
            .map(|_| {
                let p = peer.clone();
                tokio::spawn(async move { send_counted(&p, per_stream, 256 * 1024).await })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.expect("stream task"), per_stream);
        }
        let took = start.elapsed();
        let total = (per_stream * streams) as f64;
        let status = peer.status();
        println!(
            "bulk over {}, {streams} stream(s): {:.1} MB in {:.2?} = {:.1} MB/s  (srtt {:?}, retransmits {} of {} segments, pacer {:.1} MB/s)",
            status.link.active,
            total / 1e6,
            took,
            total / 1e6 / took.as_secs_f64(),
            status.session.srtt,
            status.session.retransmits,
            status.session.segments_sent,
            status.session.pacing_rate / 1e6,
        );
    }
    drop(peer);
    client.shutdown().await;
    // Dropping the child closes its stdin, which stops it.
    drop(child);
}

/// Sends `len` bytes on a new stream in `chunk`-sized writes; returns the count the exit
/// read, once it has read them all.
async fn send_counted(peer: &Peer, len: usize, chunk: usize) -> usize {
    let mut stream = peer.open().expect("open");
    let buf = vec![0xA5u8; chunk.min(len).max(1)];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len());
        stream.write_all(&buf[..n]).await.expect("write");
        left -= n;
    }
    stream.shutdown().await.expect("finish");
    let mut count = [0u8; 8];
    stream.read_exact(&mut count).await.expect("count back");
    u64::from_be_bytes(count) as usize
}

/// Samples a node's status until its first friend is online (or [`WAIT`] passes) and returns
/// when each step happened (wall clock in µs, comparable across the two processes): our own
/// onion/DHT connection, the friend added (request sent or accepted), the friend online.
async fn watch(tox: ToxHandle) -> Vec<(i64, String)> {
    let mut steps = Vec::new();
    let mut own = Connection::None;
    let mut friends = 0;
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        let Ok(st) = tox.status().await else { break };
        let at = unix_micros();
        if steps.is_empty() {
            steps.push((at, format!("node up, udp port {:?}", st.udp_port)));
        }
        if st.connection != own {
            own = st.connection;
            steps.push((at, format!("self connection {own:?}")));
        }
        if st.friends.len() != friends {
            friends = st.friends.len();
            steps.push((at, "friend added".to_owned()));
        }
        if let Some(f) = st.friends.iter().find(|f| f.connection.is_online()) {
            steps.push((at, format!("friend online ({:?})", f.connection)));
            break;
        }
        tokio::time::sleep(WATCH_EVERY).await;
    }
    steps
}

fn unix_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// The exit: counts each stream's bytes and answers the count at its end; stops when stdin
/// closes.
async fn child_exit(mut tox: ToxConfig) {
    tox.allow.allow_any = true;
    let exit = std::sync::Arc::new(Fabric::start(fabric_config(tox)).expect("exit fabric"));
    let started = unix_micros();
    println!("id {}", exit.id());
    println!("at {started} node started");
    let tox = exit.tox().clone();
    tokio::spawn(async move {
        for (at, what) in watch(tox).await {
            println!("at {at} {what}");
        }
    });
    let eof_rx = testnet::stdin_closed();
    let server = exit.clone();
    tokio::spawn(async move {
        while let Some(incoming) = server.accept().await {
            tokio::spawn(async move {
                let mut s = incoming.stream;
                let mut buf = vec![0u8; 256 * 1024];
                let mut n = 0u64;
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(k) => n += k as u64,
                        Err(_) => return,
                    }
                }
                let _ = s.write_all(&n.to_be_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    let _ = eof_rx.await;
    exit.shutdown().await;
}
