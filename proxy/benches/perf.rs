//! End-to-end figures for direct mode on loopback: the real `proxy` binary as a child process,
//! blocking clients and servers on threads of this process.
//!
//! ```text
//! cargo bench -p proxy --bench perf            # everything
//! PERF_BYTES=268435456 PERF_CONNS=10000 cargo bench -p proxy --bench perf   # quicker
//! ```
//!
//! Prints: bulk download GB/s without a proxy, through SOCKS5 and through HTTP CONNECT;
//! median/p99 round trip of a small request/response through each vs direct; new SOCKS5
//! connections per second (one small exchange each); the proxy's RSS before and after many
//! sequential proxied connections.

#![allow(clippy::print_stdout, missing_docs)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

const BUF: usize = 256 * 1024;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Writes `bytes` zero bytes to every connection, then closes it.
fn bulk_server(bytes: u64) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            thread::spawn(move || {
                let buf = vec![0u8; BUF];
                let mut left = bytes;
                while left > 0 {
                    let n = left.min(BUF as u64) as usize;
                    if conn.write_all(&buf[..n]).is_err() {
                        return;
                    }
                    left -= n as u64;
                }
            });
        }
    });
    addr
}

/// Echoes every connection until EOF.
fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let _ = conn.set_nodelay(true);
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                loop {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if conn.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

/// Answers every HTTP/1.1 request on a connection with a 2-byte body (keep-alive).
fn tiny_http_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let _ = conn.set_nodelay(true);
            thread::spawn(move || {
                let mut out = conn.try_clone().unwrap();
                let mut r = BufReader::new(conn);
                let mut line = String::new();
                loop {
                    line.clear();
                    match r.read_line(&mut line) {
                        Ok(0) | Err(_) => return,
                        Ok(_) if line == "\r\n" => {
                            let resp = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                            if out.write_all(resp).is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                    }
                }
            });
        }
    });
    addr
}

struct ProxyChild {
    child: Child,
    socks: SocketAddr,
    http: SocketAddr,
}

impl ProxyChild {
    fn start() -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_proxy"))
            .args(["--socks", "127.0.0.1:0", "--http", "127.0.0.1:0"])
            .args(["--max-connections", "20000"])
            .env("RUST_LOG", "warn")
            // PROXY_RELAY=copy in the bench's environment reaches the child: compare relays.
            .stdout(Stdio::piped())
            .spawn()
            .expect("start proxy");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut addr = || {
            let line = lines.next().unwrap().unwrap();
            line.split_whitespace().nth(3).unwrap().parse().unwrap()
        };
        let socks = addr();
        let http = addr();
        Self { child, socks, http }
    }

    /// User + system CPU time the proxy used so far (from /proc, in clock ticks of 10 ms).
    fn cpu_secs(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // Fields after the command name, which is in parentheses and may hold spaces.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the line; `rest` starts at field 3.
        let tick = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        (tick(11) + tick(12)) as f64 / 100.0
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for ProxyChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Clone, Copy, Debug)]
enum Via {
    Direct,
    Socks(SocketAddr),
    Connect(SocketAddr),
}

impl Via {
    fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Socks(_) => "socks5",
            Self::Connect(_) => "http CONNECT",
        }
    }

    /// A connection to `target`, through the proxy if asked, ready for payload.
    fn open(self, target: SocketAddr) -> TcpStream {
        let s = match self {
            Self::Direct => TcpStream::connect(target).unwrap(),
            Self::Socks(proxy) => {
                let mut s = TcpStream::connect(proxy).unwrap();
                let std::net::IpAddr::V4(ip) = target.ip() else {
                    panic!()
                };
                let mut msg = vec![5, 1, 0, 5, 1, 0, 1];
                msg.extend_from_slice(&ip.octets());
                msg.extend_from_slice(&target.port().to_be_bytes());
                // Greeting and request in one write, as fast clients do.
                s.write_all(&msg).unwrap();
                let mut reply = [0u8; 12];
                s.read_exact(&mut reply).unwrap();
                assert_eq!(reply[3], 0, "socks5 connect failed: {reply:?}");
                s
            }
            Self::Connect(proxy) => {
                let mut s = TcpStream::connect(proxy).unwrap();
                write!(s, "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").unwrap();
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    s.read_exact(&mut b).unwrap();
                    head.push(b[0]);
                }
                assert!(
                    head.starts_with(b"HTTP/1.1 200"),
                    "{}",
                    String::from_utf8_lossy(&head)
                );
                s
            }
        };
        s.set_nodelay(true).unwrap();
        s
    }
}

fn download(via: Via, server: SocketAddr, bytes: u64) -> f64 {
    let mut s = via.open(server);
    let mut buf = vec![0u8; BUF];
    let start = Instant::now();
    let mut got = 0u64;
    loop {
        let n = s.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(got, bytes);
    bytes as f64 / secs / 1e9
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Round trips of a 64-byte message over one established connection.
fn ping_pong(mut s: TcpStream, rounds: usize) -> Vec<Duration> {
    let msg = [7u8; 64];
    let mut back = [0u8; 64];
    let mut times = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        s.write_all(&msg).unwrap();
        s.read_exact(&mut back).unwrap();
        times.push(t.elapsed());
    }
    times.sort();
    times
}

/// Round trips of a small keep-alive HTTP GET, to the server itself or through the proxy's
/// forwarding path.
fn http_gets(conn: SocketAddr, server: SocketAddr, rounds: usize, absolute: bool) -> Vec<Duration> {
    let s = TcpStream::connect(conn).unwrap();
    s.set_nodelay(true).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    let target = if absolute {
        format!("http://{server}/x")
    } else {
        "/x".to_owned()
    };
    let req = format!("GET {target} HTTP/1.1\r\nHost: {server}\r\n\r\n");
    let mut times = Vec::with_capacity(rounds);
    let mut line = String::new();
    for _ in 0..rounds {
        let t = Instant::now();
        w.write_all(req.as_bytes()).unwrap();
        let mut len = 0;
        loop {
            line.clear();
            r.read_line(&mut line).unwrap();
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap();
            }
            if line == "\r\n" {
                break;
            }
        }
        let mut body = vec![0; len];
        r.read_exact(&mut body).unwrap();
        times.push(t.elapsed());
    }
    times.sort();
    times
}

fn report_latency(name: &str, times: &[Duration], direct: &[Duration]) {
    let (m, p) = (percentile(times, 0.5), percentile(times, 0.99));
    let added = m.as_secs_f64() - percentile(direct, 0.5).as_secs_f64();
    println!(
        "  {name:<22} median {:>7.1} us  p99 {:>7.1} us  added (median) {:>6.1} us",
        m.as_secs_f64() * 1e6,
        p.as_secs_f64() * 1e6,
        added * 1e6
    );
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs this too: keep that quick.
    let quick = !std::env::args().any(|a| a == "--bench");
    let bytes = env_u64("PERF_BYTES", if quick { 1 << 24 } else { 1 << 30 });
    let conns = env_u64("PERF_CONNS", if quick { 200 } else { 100_000 });
    let rounds = env_u64("PERF_ROUNDS", if quick { 200 } else { 20_000 }) as usize;

    let proxy = ProxyChild::start();
    let bulk = bulk_server(bytes);
    let echo = echo_server();
    let tiny = tiny_http_server();
    let vias = [
        Via::Direct,
        Via::Socks(proxy.socks),
        Via::Connect(proxy.http),
    ];

    println!(
        "bulk download of {:.2} GiB, one connection:",
        bytes as f64 / (1u64 << 30) as f64
    );
    for via in vias {
        // Best of three: the machine is shared. The proxy's CPU time per GiB moved is the
        // steadier figure when other work competes for the cores.
        let cpu = proxy.cpu_secs();
        let best = (0..3)
            .map(|_| download(via, bulk, bytes))
            .fold(0.0, f64::max);
        let per_gib = (proxy.cpu_secs() - cpu) / (3.0 * bytes as f64 / (1u64 << 30) as f64);
        match via {
            Via::Direct => println!("  {:<22} {best:>6.2} GB/s", via.name()),
            _ => println!(
                "  {:<22} {best:>6.2} GB/s   proxy CPU {per_gib:.2} s per GiB",
                via.name()
            ),
        }
    }

    println!("round trip of 64 bytes over an open connection ({rounds} rounds):");
    let direct = ping_pong(Via::Direct.open(echo), rounds);
    for via in vias {
        report_latency(via.name(), &ping_pong(via.open(echo), rounds), &direct);
    }
    let direct_get = http_gets(tiny, tiny, rounds, false);
    report_latency("http GET direct", &direct_get, &direct_get);
    report_latency(
        "http GET forwarded",
        &http_gets(proxy.http, tiny, rounds, true),
        &direct_get,
    );

    let rate_conns = conns.min(20_000);
    for via in [Via::Direct, Via::Socks(proxy.socks)] {
        let start = Instant::now();
        for _ in 0..rate_conns {
            let mut s = via.open(echo);
            s.write_all(b"ping").unwrap();
            let mut b = [0u8; 4];
            s.read_exact(&mut b).unwrap();
        }
        let rate = rate_conns as f64 / start.elapsed().as_secs_f64();
        println!(
            "new connection + 4-byte exchange, sequential, {:<12} {rate:>8.0} /s",
            via.name()
        );
    }

    let before = proxy.rss_kib();
    let cpu_before = proxy.cpu_secs();
    let start = Instant::now();
    for i in 0..conns {
        let mut s = Via::Socks(proxy.socks).open(echo);
        s.write_all(b"ping").unwrap();
        let mut b = [0u8; 4];
        s.read_exact(&mut b).unwrap();
        if i == 1000 {
            // Past warm-up: allocator arenas and the runtime's worker state exist now.
            println!(
                "  proxy RSS after 1,000 connections: {} KiB",
                proxy.rss_kib()
            );
        }
    }
    // Let the proxy finish closing the last connections.
    thread::sleep(Duration::from_millis(300));
    let elapsed = start.elapsed().as_secs_f64();
    println!(
        "proxy RSS before / after {conns} sequential SOCKS5 connections: {before} KiB / {} KiB \
         ({:.0} conn/s, proxy CPU {:.0} us per connection)",
        proxy.rss_kib(),
        conns as f64 / elapsed,
        (proxy.cpu_secs() - cpu_before) / conns as f64 * 1e6,
    );
}
