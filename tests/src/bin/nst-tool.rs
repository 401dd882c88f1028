//! A helper the TUN tests run inside network namespaces (where the test process is not):
//!
//! - `nst-tool serve HTTP_ADDR... -- DNS_ANSWER[,DNS_ANSWER...]`: the test HTTP server on each
//!   address, a DNS responder on UDP and TCP port 53 of the same IPs answering every A query
//!   with `DNS_ANSWER` (several: each query the next, as a CDN's rotating answers), and a UDP
//!   echo on port 7; prints `ready` and serves until killed.
//! - `nst-tool dns [--dev IFACE] SERVER:PORT NAME [udp|tcp] [TYPE]`: one A query, prints the
//!   answer's address; with another TYPE (28, 65, ...) prints `rcode R answers N` of the
//!   response. `--dev` binds the socket to IFACE (`SO_BINDTODEVICE`, as resolvers with
//!   per-link servers do) and gives a link-local IPv6 SERVER that interface's scope.
//! - `nst-tool lookups SERVER:PORT N THREADS`: N distinct A queries (`nK.bench.test`), each
//!   from a socket of its own as resolvers send them, THREADS at a time; prints
//!   `answered A of N in S s: R/s, p50 X ms, p99 Y ms` (an unanswered query waits 5 s).
//! - `nst-tool stub LISTEN UPSTREAM`: a forwarding DNS stub on UDP LISTEN (as
//!   systemd-resolved's 127.0.0.53 is), each query sent on to UPSTREAM from a socket of its
//!   own; prints `ready`.
//! - `nst-tool echo SERVER:PORT TEXT`: one UDP datagram, prints the echo.
//! - `nst-tool blast SERVER:PORT N`: N datagrams from one socket, half a millisecond apart.
//! - `nst-tool sink ADDR`: accepts TCP connections and holds them open (no thread each);
//!   prints `ready`.
//! - `nst-tool hold SERVER:PORT N SECONDS`: opens N connections, prints `held N`, keeps them
//!   open SECONDS, then exits.
//! - `nst-tool tcpbench-serve ADDR`: the server of `tests::tcpbench`; prints `ready`.
//! - `nst-tool tcpbench HOST PORT [--socks PROXY] SECONDS ROUND_TRIPS`: goodput for SECONDS,
//!   then ROUND_TRIPS one-byte round trips, to a `tcpbench-serve`, directly or through a
//!   SOCKS5 proxy; prints `goodput X Mbit/s p50 Y ms p99 Z ms`.
//! - `nst-tool toxnet N`: a private Tox network of N daemons inside this namespace; prints
//!   `ready PK@127.0.0.1:PORT...` and runs until killed (the daemons stop with it).

#![forbid(unsafe_code)]
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

use tests::servers::{HttpServer, dns_answer, dns_parse_a, dns_query_typed};
use tests::toxnet::ToxNet;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("serve") => serve(&args[1..]),
        Some("dns") => dns(&args[1..]),
        Some("stub") => stub(&args[1..]),
        Some("lookups") => lookups(&args[1..]),
        Some("echo") => echo(&args[1..]),
        Some("blast") => blast(&args[1..]),
        Some("sink") => sink(&args[1..]),
        Some("hold") => hold(&args[1..]),
        Some("toxnet") => toxnet(&args[1..]),
        Some("tcpbench-serve") => tcpbench_serve(&args[1..]),
        Some("tcpbench") => tcpbench(&args[1..]),
        _ => Err("usage: nst-tool serve|dns|lookups|stub|echo|blast|sink|hold|toxnet ...".into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nst-tool: {e}");
            ExitCode::FAILURE
        }
    }
}

type Res = Result<(), String>;

/// Argument `i`, named `name` in the error when it is missing or does not parse.
fn arg<T: std::str::FromStr>(args: &[String], i: usize, name: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    let text = args.get(i).ok_or(name)?;
    text.parse().map_err(|e| format!("{name} {text:?}: {e}"))
}

fn serve(args: &[String]) -> Res {
    let split = args.iter().position(|a| a == "--").ok_or("missing --")?;
    let answers: Vec<Ipv4Addr> = args
        .get(split + 1)
        .ok_or("DNS answer")?
        .split(',')
        .map(|a| a.parse().map_err(|e| format!("DNS answer {a:?}: {e}")))
        .collect::<Result<_, String>>()?;
    let queries = Arc::new(AtomicUsize::new(0));
    // Each A query the next answer, whichever socket it came by (other types, such as the
    // AAAA query a resolver sends beside the A, take the current one and do not advance).
    let next_answer = move |query: &[u8]| {
        let step = usize::from(question_type(query) == Some(1));
        answers[queries.fetch_add(step, Ordering::Relaxed) % answers.len()]
    };
    let mut keep = Vec::new();
    for a in &args[..split] {
        let addr: SocketAddr = a.parse().map_err(|e| format!("{a}: {e}"))?;
        keep.push(HttpServer::start_on(addr).map_err(|e| format!("http {addr}: {e}"))?);
        let dns = SocketAddr::new(addr.ip(), 53);
        let udp = UdpSocket::bind(dns).map_err(|e| format!("dns {dns}: {e}"))?;
        let next = next_answer.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while let Ok((n, from)) = udp.recv_from(&mut buf) {
                if let Some(r) = dns_answer(&buf[..n], next(&buf[..n])) {
                    let _ = udp.send_to(&r, from);
                }
            }
        });
        let tcp = TcpListener::bind(dns).map_err(|e| format!("dns/tcp {dns}: {e}"))?;
        let next = next_answer.clone();
        thread::spawn(move || {
            for conn in tcp.incoming() {
                let Ok(mut c) = conn else { continue };
                let next = next.clone();
                thread::spawn(move || {
                    let mut len = [0u8; 2];
                    if c.read_exact(&mut len).is_err() {
                        return;
                    }
                    let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
                    if c.read_exact(&mut q).is_err() {
                        return;
                    }
                    if let Some(r) = dns_answer(&q, next(&q)) {
                        let mut msg = (r.len() as u16).to_be_bytes().to_vec();
                        msg.extend_from_slice(&r);
                        let _ = c.write_all(&msg);
                    }
                });
            }
        });
        let echo = UdpSocket::bind(SocketAddr::new(addr.ip(), 7)).map_err(|e| e.to_string())?;
        thread::spawn(move || {
            let mut buf = [0u8; 65535];
            while let Ok((n, from)) = echo.recv_from(&mut buf) {
                let _ = echo.send_to(&buf[..n], from);
            }
        });
    }
    println!("ready");
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    loop {
        thread::sleep(Duration::from_secs(3600));
    }
}

/// `--dev IFACE` taken out of `args`.
fn device_flag(args: &[String]) -> Result<(Option<String>, Vec<String>), String> {
    let Some(i) = args.iter().position(|a| a == "--dev") else {
        return Ok((None, args.to_vec()));
    };
    let dev = args.get(i + 1).ok_or("--dev needs an interface")?.clone();
    let mut rest = args.to_vec();
    rest.drain(i..i + 2);
    Ok((Some(dev), rest))
}

/// A socket of `ty` for `server`, bound to interface `dev` if given; a link-local IPv6
/// `server` gets `dev`'s scope.
fn socket_for(
    server: &mut SocketAddr,
    dev: Option<&str>,
    ty: socket2::Type,
) -> Result<socket2::Socket, String> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(*server), ty, None)
        .map_err(|e| e.to_string())?;
    if let Some(dev) = dev {
        socket
            .bind_device(Some(dev.as_bytes()))
            .map_err(|e| format!("SO_BINDTODEVICE {dev}: {e}"))?;
        if let SocketAddr::V6(v6) = server
            && v6.ip().is_unicast_link_local()
        {
            // `ip netns exec` mounts the namespace's own /sys.
            let index = std::fs::read_to_string(format!("/sys/class/net/{dev}/ifindex"))
                .map_err(|e| format!("{dev}: {e}"))?;
            v6.set_scope_id(index.trim().parse().map_err(|_| "ifindex")?);
        }
    }
    Ok(socket)
}

fn dns(args: &[String]) -> Res {
    let (dev, args) = device_flag(args)?;
    let args = &args[..];
    let mut server: SocketAddr = arg(args, 0, "server")?;
    let name = args.get(1).ok_or("name")?;
    let qtype: u16 = if args.len() > 3 {
        arg(args, 3, "type")?
    } else {
        1
    };
    let q = dns_query_typed(0x4242, name, qtype);
    let resp = if args.get(2).map(String::as_str) == Some("tcp") {
        let socket = socket_for(&mut server, dev.as_deref(), socket2::Type::STREAM)?;
        socket
            .connect_timeout(&server.into(), Duration::from_secs(5))
            .map_err(|e| e.to_string())?;
        let mut c = TcpStream::from(socket);
        c.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        let mut msg = (q.len() as u16).to_be_bytes().to_vec();
        msg.extend_from_slice(&q);
        c.write_all(&msg).map_err(|e| e.to_string())?;
        let mut len = [0u8; 2];
        c.read_exact(&mut len).map_err(|e| e.to_string())?;
        let mut r = vec![0u8; usize::from(u16::from_be_bytes(len))];
        c.read_exact(&mut r).map_err(|e| e.to_string())?;
        r
    } else {
        let bind: SocketAddr = if server.is_ipv4() {
            "0.0.0.0:0".parse().map_err(|_| "bind")?
        } else {
            "[::]:0".parse().map_err(|_| "bind")?
        };
        let socket = socket_for(&mut server, dev.as_deref(), socket2::Type::DGRAM)?;
        socket.bind(&bind.into()).map_err(|e| e.to_string())?;
        let s = UdpSocket::from(socket);
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .map_err(|e| e.to_string())?;
        if dev.is_some() {
            // Connected, a refusal (ICMP unreachable) ends the query at once instead of after
            // every retry's time limit.
            s.connect(server).map_err(|e| e.to_string())?;
        }
        let mut buf = [0u8; 1500];
        let mut got = None;
        for _ in 0..3 {
            s.send_to(&q, server).map_err(|e| e.to_string())?;
            match s.recv_from(&mut buf) {
                Ok((n, _)) => {
                    got = Some(buf[..n].to_vec());
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    return Err(format!("refused: {e}"));
                }
                Err(_) => {}
            }
        }
        got.ok_or("no DNS answer")?
    };
    if qtype != 1 {
        if resp.len() < 12 || resp[..2] != [0x42, 0x42] || resp[2] & 0x80 == 0 {
            return Err("not an answer to this query".into());
        }
        let answers = u16::from_be_bytes([resp[6], resp[7]]);
        println!("rcode {} answers {answers}", resp[3] & 0x0f);
        return Ok(());
    }
    let (id, ip) = dns_parse_a(&resp).ok_or("bad DNS answer")?;
    if id != 0x4242 {
        return Err(format!("wrong id {id:#x}"));
    }
    println!("{ip}");
    Ok(())
}

fn lookups(args: &[String]) -> Res {
    let server: SocketAddr = arg(args, 0, "server")?;
    let n: usize = arg(args, 1, "n")?;
    let threads: usize = arg(args, 2, "threads")?;
    let next = Arc::new(AtomicUsize::new(0));
    let started = std::time::Instant::now();
    let workers: Vec<_> = (0..threads.max(1))
        .map(|_| {
            let next = next.clone();
            thread::spawn(move || {
                let mut times = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return times;
                    }
                    let asked = std::time::Instant::now();
                    let Ok(s) = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)) else {
                        continue;
                    };
                    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                    let id = (i % 65_536) as u16;
                    let q = dns_query_typed(id, &format!("n{i}.bench.test"), 1);
                    let mut buf = [0u8; 1500];
                    if s.send_to(&q, server).is_ok()
                        && let Ok((len, _)) = s.recv_from(&mut buf)
                        && dns_parse_a(&buf[..len]).is_some_and(|(got, _)| got == id)
                    {
                        times.push(asked.elapsed());
                    }
                }
            })
        })
        .collect();
    let mut times: Vec<Duration> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap_or_default())
        .collect();
    let took = started.elapsed();
    times.sort();
    let pct = |p: usize| {
        times
            .get((times.len() * p / 100).min(times.len().saturating_sub(1)))
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
    };
    println!(
        "answered {} of {n} in {:.2} s: {:.0}/s, p50 {:.2} ms, p99 {:.2} ms",
        times.len(),
        took.as_secs_f64(),
        times.len() as f64 / took.as_secs_f64(),
        pct(50),
        pct(99)
    );
    Ok(())
}

fn stub(args: &[String]) -> Res {
    let listen: SocketAddr = arg(args, 0, "listen")?;
    let upstream: SocketAddr = arg(args, 1, "upstream")?;
    let socket = UdpSocket::bind(listen).map_err(|e| format!("{listen}: {e}"))?;
    println!("ready");
    let mut buf = [0u8; 65535];
    loop {
        let (n, from) = socket.recv_from(&mut buf).map_err(|e| e.to_string())?;
        let query = buf[..n].to_vec();
        let socket = socket.try_clone().map_err(|e| e.to_string())?;
        thread::spawn(move || {
            let bind: SocketAddr = if upstream.is_ipv4() {
                (Ipv4Addr::UNSPECIFIED, 0).into()
            } else {
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
            };
            let Ok(up) = UdpSocket::bind(bind) else {
                return;
            };
            let _ = up.set_read_timeout(Some(Duration::from_secs(5)));
            let mut answer = [0u8; 65535];
            if up.send_to(&query, upstream).is_ok()
                && let Ok((m, _)) = up.recv_from(&mut answer)
            {
                let _ = socket.send_to(&answer[..m], from);
            }
        });
    }
}

fn echo(args: &[String]) -> Res {
    let server: SocketAddr = arg(args, 0, "server")?;
    let text = args.get(1).ok_or("text")?;
    let bind: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0".parse().map_err(|_| "bind")?
    } else {
        "[::]:0".parse().map_err(|_| "bind")?
    };
    let s = UdpSocket::bind(bind).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 65535];
    for _ in 0..3 {
        s.send_to(text.as_bytes(), server)
            .map_err(|e| e.to_string())?;
        if let Ok((n, from)) = s.recv_from(&mut buf) {
            println!("{} from {from}", String::from_utf8_lossy(&buf[..n]));
            return Ok(());
        }
    }
    Err("no echo".into())
}

/// The type of a DNS query's (first) question.
fn question_type(query: &[u8]) -> Option<u16> {
    let mut i = 12;
    loop {
        let len = usize::from(*query.get(i)?);
        i += 1 + len;
        if len == 0 {
            break;
        }
    }
    Some(u16::from_be_bytes([*query.get(i)?, *query.get(i + 1)?]))
}

fn blast(args: &[String]) -> Res {
    let server: SocketAddr = arg(args, 0, "server")?;
    let n: u32 = arg(args, 1, "count")?;
    let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    for i in 0..n {
        s.send_to(&i.to_be_bytes(), server)
            .map_err(|e| format!("datagram {i}: {e}"))?;
        thread::sleep(Duration::from_micros(500));
    }
    println!("sent {n}");
    Ok(())
}

fn sink(args: &[String]) -> Res {
    let addr: SocketAddr = arg(args, 0, "addr")?;
    let listener = TcpListener::bind(addr).map_err(|e| e.to_string())?;
    println!("ready");
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    let mut held = Vec::new();
    for conn in listener.incoming() {
        match conn {
            Ok(c) => held.push(c),
            Err(e) => eprintln!("nst-tool: accept: {e}"),
        }
    }
    Ok(())
}

fn hold(args: &[String]) -> Res {
    let server: SocketAddr = arg(args, 0, "server")?;
    let n: usize = arg(args, 1, "n")?;
    let secs: u64 = arg(args, 2, "seconds")?;
    let mut held = Vec::with_capacity(n);
    for i in 0..n {
        let c = TcpStream::connect_timeout(&server, Duration::from_secs(10))
            .map_err(|e| format!("connection {i}: {e}"))?;
        held.push(c);
    }
    println!("held {n}");
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    thread::sleep(Duration::from_secs(secs));
    Ok(())
}

fn tcpbench_serve(args: &[String]) -> Res {
    let addr: SocketAddr = arg(args, 0, "addr")?;
    let listener = TcpListener::bind(addr).map_err(|e| format!("{addr}: {e}"))?;
    println!("ready");
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    tests::tcpbench::serve(listener);
    Ok(())
}

fn tcpbench(args: &[String]) -> Res {
    use tests::tcpbench::{Via, connect, goodput, round_trips};
    let host = args.first().ok_or("host")?;
    let port: u16 = arg(args, 1, "port")?;
    let (via, rest) = match args.get(2).map(String::as_str) {
        Some("--socks") => (Via::Socks(arg(args, 3, "proxy")?), &args[4..]),
        _ => (Via::Direct, &args[2..]),
    };
    let secs: f64 = arg(rest, 0, "seconds")?;
    let n: usize = arg(rest, 1, "round trips")?;
    let open = || connect(host, port, &via).map_err(|e| format!("connect: {e}"));
    let mbps = goodput(open()?, secs).map_err(|e| format!("goodput: {e}"))?;
    let (p50, p99) = round_trips(open()?, 50, n).map_err(|e| format!("round trips: {e}"))?;
    println!("goodput {mbps:.1} Mbit/s p50 {p50:.3} ms p99 {p99:.3} ms");
    Ok(())
}

fn toxnet(args: &[String]) -> Res {
    let n: usize = args
        .first()
        .ok_or("missing N")?
        .parse()
        .map_err(|e| format!("N: {e}"))?;
    // Dropped (daemons stopped) only if this process is asked to end nicely; when it is
    // killed, the daemons see their stdin close and stop by themselves.
    let net = ToxNet::start(n).map_err(|e| format!("tox network: {e}"))?;
    let nodes: Vec<String> = net.nodes().iter().map(ToString::to_string).collect();
    println!("ready {}", nodes.join(" "));
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    loop {
        thread::sleep(Duration::from_secs(3600));
    }
}
