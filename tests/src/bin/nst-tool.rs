//! A helper the TUN tests run inside network namespaces (where the test process is not):
//!
//! - `nst-tool serve HTTP_ADDR... -- DNS_ANSWER`: the test HTTP server on each address, a DNS
//!   responder on UDP and TCP port 53 of the same IPs answering every A query with
//!   `DNS_ANSWER`, and a UDP echo on port 7; prints `ready` and serves until killed.
//! - `nst-tool dns SERVER:PORT NAME [udp|tcp] [TYPE]`: one A query, prints the answer's
//!   address; with another TYPE (28, 65, ...) prints `rcode R answers N` of the response.
//! - `nst-tool stub LISTEN UPSTREAM`: a forwarding DNS stub on UDP LISTEN (as
//!   systemd-resolved's 127.0.0.53 is), each query sent on to UPSTREAM from a socket of its
//!   own; prints `ready`.
//! - `nst-tool echo SERVER:PORT TEXT`: one UDP datagram, prints the echo.
//! - `nst-tool sink ADDR`: accepts TCP connections and holds them open (no thread each);
//!   prints `ready`.
//! - `nst-tool hold SERVER:PORT N SECONDS`: opens N connections, prints `held N`, keeps them
//!   open SECONDS, then exits.
//! - `nst-tool toxnet N`: a private Tox network of N daemons inside this namespace; prints
//!   `ready PK@127.0.0.1:PORT...` and runs until killed (the daemons stop with it).

#![forbid(unsafe_code)]
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::ExitCode;
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
        Some("echo") => echo(&args[1..]),
        Some("sink") => sink(&args[1..]),
        Some("hold") => hold(&args[1..]),
        Some("toxnet") => toxnet(&args[1..]),
        _ => Err("usage: nst-tool serve|dns|stub|echo|sink|hold|toxnet ...".into()),
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

fn serve(args: &[String]) -> Res {
    let split = args.iter().position(|a| a == "--").ok_or("missing --")?;
    let answer: Ipv4Addr = args
        .get(split + 1)
        .ok_or("missing DNS answer")?
        .parse()
        .map_err(|e| format!("{e}"))?;
    let mut keep = Vec::new();
    for a in &args[..split] {
        let addr: SocketAddr = a.parse().map_err(|e| format!("{a}: {e}"))?;
        keep.push(HttpServer::start_on(addr).map_err(|e| format!("http {addr}: {e}"))?);
        let dns = SocketAddr::new(addr.ip(), 53);
        let udp = UdpSocket::bind(dns).map_err(|e| format!("dns {dns}: {e}"))?;
        thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while let Ok((n, from)) = udp.recv_from(&mut buf) {
                if let Some(r) = dns_answer(&buf[..n], answer) {
                    let _ = udp.send_to(&r, from);
                }
            }
        });
        let tcp = TcpListener::bind(dns).map_err(|e| format!("dns/tcp {dns}: {e}"))?;
        thread::spawn(move || {
            for conn in tcp.incoming() {
                let Ok(mut c) = conn else { continue };
                thread::spawn(move || {
                    let mut len = [0u8; 2];
                    if c.read_exact(&mut len).is_err() {
                        return;
                    }
                    let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
                    if c.read_exact(&mut q).is_err() {
                        return;
                    }
                    if let Some(r) = dns_answer(&q, answer) {
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

fn dns(args: &[String]) -> Res {
    let server: SocketAddr = args
        .first()
        .ok_or("server")?
        .parse()
        .map_err(|e| format!("{e}"))?;
    let name = args.get(1).ok_or("name")?;
    let qtype: u16 = match args.get(3) {
        Some(t) => t.parse().map_err(|e| format!("type {t}: {e}"))?,
        None => 1,
    };
    let q = dns_query_typed(0x4242, name, qtype);
    let resp = if args.get(2).map(String::as_str) == Some("tcp") {
        let mut c = TcpStream::connect_timeout(&server, Duration::from_secs(5))
            .map_err(|e| e.to_string())?;
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
        let s = UdpSocket::bind(bind).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .map_err(|e| e.to_string())?;
        let mut buf = [0u8; 1500];
        let mut got = None;
        for _ in 0..3 {
            s.send_to(&q, server).map_err(|e| e.to_string())?;
            if let Ok((n, _)) = s.recv_from(&mut buf) {
                got = Some(buf[..n].to_vec());
                break;
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

fn stub(args: &[String]) -> Res {
    let listen: SocketAddr = args
        .first()
        .ok_or("listen")?
        .parse()
        .map_err(|e| format!("{e}"))?;
    let upstream: SocketAddr = args
        .get(1)
        .ok_or("upstream")?
        .parse()
        .map_err(|e| format!("{e}"))?;
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
    let server: SocketAddr = args
        .first()
        .ok_or("server")?
        .parse()
        .map_err(|e| format!("{e}"))?;
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

fn sink(args: &[String]) -> Res {
    let addr: SocketAddr = args
        .first()
        .ok_or("addr")?
        .parse()
        .map_err(|e| format!("{e}"))?;
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
    let server: SocketAddr = args
        .first()
        .ok_or("server")?
        .parse()
        .map_err(|e| format!("{e}"))?;
    let n: usize = args
        .get(1)
        .ok_or("n")?
        .parse()
        .map_err(|e| format!("{e}"))?;
    let secs: u64 = args
        .get(2)
        .ok_or("seconds")?
        .parse()
        .map_err(|e| format!("{e}"))?;
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
