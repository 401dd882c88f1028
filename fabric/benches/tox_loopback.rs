//! Figures for the Tox binding on loopback, over a private tox-bootstrapd network:
//! connect time, raw lossy and lossless throughput, and the idle CPU of two connected nodes.
//!
//! Run: `cargo bench -p fabric --features tox,test-util --bench tox_loopback`
//! (`TOX_BENCH_SECS` sets each throughput phase, default 5; `TOX_IDLE_SECS` the idle CPU
//! window, default 20).

#![allow(clippy::print_stdout)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use fabric::tox::testnet::{self, ToxNet};
use fabric::tox::{MAX_CUSTOM_PACKET, ToxError, ToxEvent, ToxHandle, ToxNode};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(60);

fn env_secs(name: &str, default: u64) -> Duration {
    Duration::from_secs(
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default),
    )
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Some(config) = testnet::child_config() {
        rt.block_on(child_exit(config));
    } else {
        rt.block_on(run());
    }
}

#[derive(Default)]
struct Counters {
    lossy_packets: AtomicU64,
    lossy_bytes: AtomicU64,
    lossless_packets: AtomicU64,
    lossless_bytes: AtomicU64,
}

async fn run() {
    let phase = env_secs("TOX_BENCH_SECS", 5);
    let idle = env_secs("TOX_IDLE_SECS", 20);
    let net = ToxNet::start(4).expect("tox-bootstrapd network (Debian toxcore-utils)");
    let (client, mut client_ev) =
        ToxNode::spawn(net.config(net.scratch_dir("client").expect("dir"))).expect("client");
    let mut exit_cfg = net.config(net.scratch_dir("exit").expect("dir"));
    exit_cfg.allow.keys.insert(client.public_key());
    let (exit, mut exit_ev) = ToxNode::spawn(exit_cfg).expect("exit");
    let exit_pk = exit.public_key();
    let client_pk = client.public_key();

    // Connect: add_friend → both online → first lossless packet through.
    let t0 = Instant::now();
    client
        .add_friend(exit.id(), b"bench")
        .await
        .expect("add_friend");
    wait_online(&mut client_ev, exit_pk).await;
    let t_client_online = t0.elapsed();
    wait_online(&mut exit_ev, client_pk).await;
    let t_both_online = t0.elapsed();
    let ping = Bytes::from_static(&[170, b'p', b'i', b'n', b'g']);
    loop {
        match client.send_lossless(exit_pk, ping.clone()).await {
            Ok(()) => break,
            Err(ToxError::FriendNotConnected(_)) if t0.elapsed() < WAIT => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(e) => panic!("first lossless packet: {e}"),
        }
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, exit_ev.recv()).await {
            Ok(Some(ToxEvent::Lossless { data, .. })) if data == ping => break,
            Ok(Some(_)) => {}
            _ => panic!("first lossless packet never arrived"),
        }
    }
    let t_first = t0.elapsed();
    println!("connect: client sees exit online after {t_client_online:.2?}");
    println!("connect: both online after {t_both_online:.2?}");
    println!("connect: first lossless packet received after {t_first:.2?}");

    let counters = Arc::new(Counters::default());
    let c = counters.clone();
    let counter_task = tokio::spawn(async move {
        while let Some(ev) = exit_ev.recv().await {
            match ev {
                ToxEvent::Lossy { data, .. } => {
                    c.lossy_packets.fetch_add(1, Ordering::Relaxed);
                    c.lossy_bytes
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                ToxEvent::Lossless { data, .. } => {
                    c.lossless_packets.fetch_add(1, Ordering::Relaxed);
                    c.lossless_bytes
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                _ => {}
            }
        }
    });
    // Keep the client's events drained so its channel never fills.
    let client_drain = tokio::spawn(async move { while client_ev.recv().await.is_some() {} });

    println!("-- both nodes in this process");
    lossy_phase(&client, Some(&exit), exit_pk, &counters, phase, None).await;
    lossy_phase(&client, Some(&exit), exit_pk, &counters, phase, Some(25.0)).await;
    lossless_phase(&client, exit_pk, &counters, phase).await;

    // Idle CPU of this process (two connected nodes, one tokio runtime, nothing to do).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (cpu0, w0) = (cpu_time(), Instant::now());
    tokio::time::sleep(idle).await;
    let (cpu1, wall) = (cpu_time(), w0.elapsed());
    let pct = (cpu1 - cpu0).as_secs_f64() / wall.as_secs_f64() * 100.0;
    println!(
        "idle: two connected nodes used {:.2?} cpu in {wall:.2?} = {pct:.2} % of one core",
        cpu1 - cpu0
    );

    client.shutdown().await;
    exit.shutdown().await;
    let _ = counter_task.await;
    let _ = client_drain.await;

    drop(net);
    two_processes(phase).await;
}

/// Lossy throughput with the exit in a child process. c-toxcore 0.2.18 mlocks and madvises a
/// temporary buffer around every packet it encrypts or decrypts; with both nodes in one process
/// those calls contend on one address space, which real peers (two machines) never do.
///
/// It gets a network of its own: peers that just left leave DHT entries behind (same address,
/// old key) that slow down finding a new peer for a couple of minutes.
async fn two_processes(phase: Duration) {
    println!("-- exit in a child process");
    let net = &ToxNet::start(4).expect("tox-bootstrapd network");
    let mut child = net.spawn_child("exit2").expect("spawn exit process");
    let exit_id = child.id(WAIT).expect("child reports its tox id");
    let counters = Arc::new(Counters::default());
    let c = counters.clone();
    let lines = child.take_lines();
    std::thread::spawn(move || {
        while let Ok(line) = lines.recv() {
            if let Some(rest) = line.strip_prefix("rx ") {
                let v: Vec<u64> = rest.split(' ').filter_map(|x| x.parse().ok()).collect();
                if let [a, b, c2, d] = v[..] {
                    c.lossy_packets.store(a, Ordering::Relaxed);
                    c.lossy_bytes.store(b, Ordering::Relaxed);
                    c.lossless_packets.store(c2, Ordering::Relaxed);
                    c.lossless_bytes.store(d, Ordering::Relaxed);
                }
            }
        }
    });
    let (client, mut client_ev) =
        ToxNode::spawn(net.config(net.scratch_dir("client2").expect("dir"))).expect("client");
    let t0 = Instant::now();
    client
        .add_friend(exit_id, b"bench")
        .await
        .expect("add_friend");
    wait_online(&mut client_ev, exit_id.public_key()).await;
    println!(
        "connect (two processes): exit online after {:.2?}",
        t0.elapsed()
    );
    let client_drain = tokio::spawn(async move { while client_ev.recv().await.is_some() {} });
    let to = exit_id.public_key();
    lossy_phase(&client, None, to, &counters, phase, None).await;
    lossy_phase(&client, None, to, &counters, phase, Some(25.0)).await;
    client.shutdown().await;
    let _ = client_drain.await;
    // Dropping the child closes its stdin, which stops it.
    drop(child);
}

/// The child side of [`two_processes`]: accepts any friend, counts what arrives and prints the
/// counters every 100 ms; stops when stdin closes.
async fn child_exit(mut cfg: fabric::tox::ToxConfig) {
    cfg.allow.allow_any = true;
    let (h, mut ev) = ToxNode::spawn(cfg).expect("exit node");
    println!("id {}", h.id());
    let mut eof_rx = testnet::stdin_closed();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let (mut a, mut b, mut c, mut d) = (0u64, 0u64, 0u64, 0u64);
    loop {
        tokio::select! {
            e = ev.recv() => match e {
                Some(ToxEvent::Lossy { data, .. }) => {
                    a += 1;
                    b += data.len() as u64;
                }
                Some(ToxEvent::Lossless { data, .. }) => {
                    c += 1;
                    d += data.len() as u64;
                }
                Some(_) => {}
                None => break,
            },
            _ = tick.tick() => println!("rx {a} {b} {c} {d}"),
            _ = &mut eof_rx => break,
        }
    }
    h.shutdown().await;
}

async fn wait_online(ev: &mut mpsc::Receiver<ToxEvent>, friend: fabric::id::PublicKey) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, ev.recv()).await {
            Ok(Some(ToxEvent::FriendConnection { pk, status }))
                if pk == friend && status.is_online() =>
            {
                return;
            }
            Ok(Some(_)) => {}
            _ => panic!("friend never came online"),
        }
    }
}

/// Full-size lossy packets client → exit for `secs`, unpaced or paced at `rate_mb` MB/s.
async fn lossy_phase(
    client: &ToxHandle,
    exit: Option<&ToxHandle>,
    to: fabric::id::PublicKey,
    counters: &Counters,
    secs: Duration,
    rate_mb: Option<f64>,
) {
    let before_rx = counters.lossy_packets.load(Ordering::Relaxed);
    let before_bytes = counters.lossy_bytes.load(Ordering::Relaxed);
    let before_tx = client.status().await.expect("status");
    let before_exit = match exit {
        Some(e) => e.status().await.expect("status").lossy_dropped,
        None => 0,
    };
    let mut block = BytesMut::new();
    let cpu_start = cpu_time();
    let start = Instant::now();
    let mut sent = 0u64;
    let per_packet = MAX_CUSTOM_PACKET as f64;
    while start.elapsed() < secs {
        if let Some(rate) = rate_mb {
            let due = (start.elapsed().as_secs_f64() * rate * 1e6 / per_packet) as u64;
            if sent >= due {
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
        }
        // Packets are cut from 1 MiB blocks: no allocation per packet.
        if block.capacity() < MAX_CUSTOM_PACKET {
            block.reserve(1 << 20);
        }
        block.resize(MAX_CUSTOM_PACKET, 0);
        block[0] = 200;
        block[1..9].copy_from_slice(&sent.to_be_bytes());
        client
            .send_lossy(to, block.split().freeze())
            .await
            .expect("send_lossy");
        sent += 1;
    }
    let elapsed = start.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cpu = cpu_time() - cpu_start;
    let rx = counters.lossy_packets.load(Ordering::Relaxed) - before_rx;
    let rx_bytes = counters.lossy_bytes.load(Ordering::Relaxed) - before_bytes;
    let after_tx = client.status().await.expect("status");
    let after_exit = match exit {
        Some(e) => e.status().await.expect("status").lossy_dropped,
        None => 0,
    };
    let handed = after_tx.lossy_sent - before_tx.lossy_sent;
    let failed = after_tx.lossy_send_failed - before_tx.lossy_send_failed;
    let dropped_rx = after_exit - before_exit;
    let label = match rate_mb {
        Some(r) => format!("lossy paced at {r} MB/s"),
        None => "lossy unpaced".to_owned(),
    };
    println!(
        "{label}: sent {sent} packets ({:.1} MB/s offered, {handed} handed to toxcore, \
         {failed} refused), received {rx} ({:.1} MB/s), loss {:.2} %, dropped at full \
         event channel {dropped_rx}; this process's cpu {:.1} ms per MB received",
        sent as f64 * per_packet / elapsed.as_secs_f64() / 1e6,
        rx_bytes as f64 / elapsed.as_secs_f64() / 1e6,
        if sent == 0 {
            0.0
        } else {
            100.0 * (sent.saturating_sub(rx)) as f64 / sent as f64
        },
        cpu.as_secs_f64() * 1e3 / (rx_bytes as f64 / 1e6).max(1e-9),
    );
}

/// Full-size lossless packets for `secs` from `SENDERS` concurrent tasks (a lone sender waits
/// one iteration whenever c-toxcore's congestion budget runs out, which would understate it).
async fn lossless_phase(
    client: &ToxHandle,
    to: fabric::id::PublicKey,
    counters: &Counters,
    secs: Duration,
) {
    const SENDERS: usize = 8;
    let before = counters.lossless_bytes.load(Ordering::Relaxed);
    let before_n = counters.lossless_packets.load(Ordering::Relaxed);
    let payload = Bytes::from(vec![171u8; MAX_CUSTOM_PACKET]);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..SENDERS {
        let (client, payload) = (client.clone(), payload.clone());
        tasks.push(tokio::spawn(async move {
            let (mut sent, mut full) = (0u64, 0u64);
            while start.elapsed() < secs {
                match client.send_lossless(to, payload.clone()).await {
                    Ok(()) => sent += 1,
                    Err(ToxError::SendQueueFull(_)) => {
                        full += 1;
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    Err(e) => panic!("send_lossless: {e}"),
                }
            }
            (sent, full)
        }));
    }
    let (mut sent, mut full) = (0u64, 0u64);
    for t in tasks {
        let (s, f) = t.await.expect("sender task");
        sent += s;
        full += f;
    }
    // Lossless: wait (bounded) for everything queued to arrive.
    let drain_deadline = Instant::now() + Duration::from_secs(30);
    while counters.lossless_packets.load(Ordering::Relaxed) - before_n < sent
        && Instant::now() < drain_deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let elapsed = start.elapsed();
    let rx = counters.lossless_packets.load(Ordering::Relaxed) - before_n;
    let bytes = counters.lossless_bytes.load(Ordering::Relaxed) - before;
    println!(
        "lossless ({SENDERS} senders): {sent} packets queued ({full} queue-full errors), {rx} \
         received in {elapsed:.2?} = {:.2} MB/s",
        bytes as f64 / elapsed.as_secs_f64() / 1e6
    );
}

/// This process's user + system CPU time, from /proc/self/stat (Linux).
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields
        .get(11..13)
        .map(|f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum())
        .unwrap_or(0);
    // USER_HZ is 100 on Linux.
    Duration::from_millis(ticks * 10)
}
