//! Raw mux throughput over an in-memory pipe, printed as figures (no criterion harness: one
//! transfer of hundreds of megabytes is the measurement).
//!
//! `cargo bench -p fabric --bench mux_pipe` prints, for the sans-IO core alone (two `Mux`es
//! pumping into each other's input on one thread) and for the tokio adapter over
//! `tokio::io::duplex`, the goodput of 1 and of 8 concurrent streams.

#![allow(clippy::print_stdout)]

use std::time::Instant;

use fabric::mux::io::{self, Handle};
use fabric::mux::{Config, Mux};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CHUNK: usize = 64 * 1024;

/// The core alone: write into `a`, transmit, feed `b`, read from `b`, return CFMs.
fn core(streams: usize, total: usize) -> f64 {
    let mut a = Mux::new(Config::default());
    let mut b = Mux::new(Config::default());
    let ids: Vec<_> = (0..streams).map(|_| a.open().unwrap()).collect();
    let data = vec![0x5au8; CHUNK];
    let mut buf = vec![0u8; CHUNK];
    let mut wire = Vec::with_capacity(1 << 20);
    let per_stream = total / streams;
    let mut sent = vec![0usize; streams];
    let mut received = 0;
    let start = Instant::now();
    while received < per_stream * streams {
        for (i, &id) in ids.iter().enumerate() {
            if sent[i] < per_stream {
                sent[i] += a
                    .write(id, &data[..CHUNK.min(per_stream - sent[i])])
                    .unwrap();
            }
        }
        wire.clear();
        a.poll_transmit(256 * 1024, &mut wire);
        b.handle_input(&wire).unwrap();
        while b.accept().is_some() {}
        while b.poll_event().is_some() {}
        for &id in &ids {
            while let Ok(n) = b.read(id, &mut buf) {
                if n == 0 {
                    break;
                }
                received += n;
            }
        }
        wire.clear();
        b.poll_transmit(256 * 1024, &mut wire);
        a.handle_input(&wire).unwrap();
        while a.poll_event().is_some() {}
    }
    received as f64 / start.elapsed().as_secs_f64()
}

/// The tokio adapter over a duplex pipe, both ends' drivers and the application tasks on a
/// two-worker runtime.
fn piped(streams: usize, total: usize) -> f64 {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let (left, right) = tokio::io::duplex(1 << 20);
        let (client, _c) = io::spawn(left, Config::default());
        let (server, _s) = io::spawn(right, Config::default());
        let per_stream = total / streams;
        let start = Instant::now();
        let sink = tokio::spawn(sink(server, streams));
        let mut writers = Vec::new();
        for _ in 0..streams {
            let mut stream = client.open().unwrap();
            writers.push(tokio::spawn(async move {
                let data = vec![0x5au8; CHUNK];
                let mut left = per_stream;
                while left > 0 {
                    let n = left.min(CHUNK);
                    stream.write_all(&data[..n]).await.unwrap();
                    left -= n;
                }
                stream.shutdown().await.unwrap();
                // Keep the stream until the peer finishes, so the id handshake completes.
                let mut rest = Vec::new();
                stream.read_to_end(&mut rest).await.unwrap();
            }));
        }
        let received = sink.await.unwrap();
        let elapsed = start.elapsed();
        for writer in writers {
            writer.await.unwrap();
        }
        assert_eq!(received, per_stream * streams);
        received as f64 / elapsed.as_secs_f64()
    })
}

async fn sink(server: Handle, streams: usize) -> usize {
    let mut tasks = Vec::new();
    for _ in 0..streams {
        let mut stream = server.accept().await.unwrap();
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 256 * 1024];
            let mut got = 0;
            loop {
                let n = stream.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                got += n;
            }
            stream.shutdown().await.unwrap();
            got
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await.unwrap();
    }
    total
}

/// CPU time of the whole process so far, from `/proc/self/stat` (utime + stime, in the
/// kernel's 100 Hz clock ticks). The box is shared, so wall-clock rates understate the code:
/// the rate per CPU-second is the figure that does not depend on the neighbours.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

fn report(name: &str, mut run: impl FnMut() -> f64) {
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    if !filters.is_empty() && !filters.iter().any(|f| name.contains(f.as_str())) {
        return;
    }
    const RUNS: usize = 5;
    let cpu_before = cpu_seconds();
    let mut rates: Vec<f64> = (0..RUNS).map(|_| run()).collect();
    let bytes: f64 = rates.iter().map(|_| 1.0).sum::<f64>() * total_bytes();
    rates.sort_by(f64::total_cmp);
    let per_cpu = match (cpu_before, cpu_seconds()) {
        (Some(before), Some(after)) if after > before => {
            format!("{:>6.2} GB per CPU-second", bytes / (after - before) / 1e9)
        }
        _ => "cpu time unavailable".to_string(),
    };
    println!(
        "{name:<26} median {:>6.2} GB/s   best {:>6.2} GB/s   {per_cpu}",
        rates[rates.len() / 2] / 1e9,
        rates[rates.len() - 1] / 1e9
    );
}

/// Bytes moved per run. `cargo test --benches` runs bench binaries without `--bench`: keep
/// that quick.
fn total_bytes() -> f64 {
    if std::env::args().any(|a| a == "--bench") {
        (1u64 << 30) as f64
    } else {
        (8u64 << 20) as f64
    }
}

fn main() {
    let total = total_bytes() as usize;
    report("core, 1 stream", || core(1, total));
    report("core, 8 streams", || core(8, total));
    report("tokio duplex, 1 stream", || piped(1, total));
    report("tokio duplex, 8 streams", || piped(8, total));
}
