//! A TCP goodput and round-trip meter, run inside namespaces by `nst-tool tcpbench-serve` and
//! `nst-tool tcpbench` (the mesh benchmark's three ways to the same server: directly, through
//! a SOCKS5 proxy, through a TUN's overlay address).
//!
//! ```text
//! client ─ 'G' then bytes for S seconds, then FIN ─► server: the count, u64 BE
//! client ─ 'E' then one byte at a time ────────────► server: each byte back
//! ```

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::thread;
use std::time::{Duration, Instant};

/// Serves clients on `listener` until the process ends, a thread each.
pub fn serve(listener: TcpListener) {
    for conn in listener.incoming() {
        let Ok(mut c) = conn else { continue };
        thread::spawn(move || {
            let _ = c.set_nodelay(true);
            let mut mode = [0u8; 1];
            if c.read_exact(&mut mode).is_err() {
                return;
            }
            let mut buf = vec![0u8; 256 * 1024];
            match mode[0] {
                b'G' => {
                    let mut total = 0u64;
                    while let Ok(n) = c.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        total += n as u64;
                    }
                    let _ = c.write_all(&total.to_be_bytes());
                }
                b'E' => {
                    let mut one = [0u8; 1];
                    while c.read_exact(&mut one).is_ok() {
                        if c.write_all(&one).is_err() {
                            break;
                        }
                    }
                }
                _ => {}
            }
        });
    }
}

/// How to reach the server.
#[derive(Debug, Clone)]
pub enum Via {
    /// A plain TCP connection to `host:port`.
    Direct,
    /// Through the SOCKS5 proxy at this address (the host name sent as a name).
    Socks(SocketAddr),
}

/// Connects to `host:port` by `via`.
pub fn connect(host: &str, port: u16, via: &Via) -> io::Result<TcpStream> {
    let mut s = match via {
        Via::Direct => {
            let addr = (host, port)
                .to_socket_addrs()?
                .next()
                .ok_or_else(|| io::Error::other("no address"))?;
            TcpStream::connect_timeout(&addr, Duration::from_secs(30))?
        }
        Via::Socks(proxy) => socks5(*proxy, host, port)?,
    };
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    s.flush()?;
    Ok(s)
}

/// A SOCKS5 CONNECT (no authentication) to `host:port`, the host sent as a name unless it is
/// an address.
fn socks5(proxy: SocketAddr, host: &str, port: u16) -> io::Result<TcpStream> {
    let mut s = TcpStream::connect_timeout(&proxy, Duration::from_secs(30))?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    s.write_all(&[5, 1, 0])?;
    let mut hello = [0u8; 2];
    s.read_exact(&mut hello)?;
    if hello != [5, 0] {
        return Err(io::Error::other(format!("socks hello answered {hello:?}")));
    }
    let mut req = vec![5, 1, 0];
    match host.trim_matches(['[', ']']).parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(a)) => {
            req.push(1);
            req.extend_from_slice(&a.octets());
        }
        Ok(std::net::IpAddr::V6(a)) => {
            req.push(4);
            req.extend_from_slice(&a.octets());
        }
        Err(_) => {
            req.push(3);
            req.push(u8::try_from(host.len()).map_err(io::Error::other)?);
            req.extend_from_slice(host.as_bytes());
        }
    }
    req.extend_from_slice(&port.to_be_bytes());
    s.write_all(&req)?;
    let mut head = [0u8; 4];
    s.read_exact(&mut head)?;
    if head[1] != 0 {
        return Err(io::Error::other(format!(
            "socks connect refused: {}",
            head[1]
        )));
    }
    let rest = match head[3] {
        1 => 4 + 2,
        4 => 16 + 2,
        3 => {
            let mut n = [0u8; 1];
            s.read_exact(&mut n)?;
            usize::from(n[0]) + 2
        }
        other => return Err(io::Error::other(format!("socks address type {other}"))),
    };
    let mut skip = vec![0u8; rest];
    s.read_exact(&mut skip)?;
    Ok(s)
}

/// Sends for `secs` seconds and returns the goodput the server counted, in Mbit/s.
pub fn goodput(mut s: TcpStream, secs: f64) -> io::Result<f64> {
    s.write_all(b"G")?;
    let chunk = vec![0x5au8; 128 * 1024];
    let started = Instant::now();
    while started.elapsed().as_secs_f64() < secs {
        s.write_all(&chunk)?;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let mut count = [0u8; 8];
    s.read_exact(&mut count)?;
    let elapsed = started.elapsed().as_secs_f64();
    Ok(u64::from_be_bytes(count) as f64 * 8.0 / elapsed / 1e6)
}

/// `n` one-byte round trips after `warm` unmeasured ones: p50 and p99 in milliseconds.
pub fn round_trips(mut s: TcpStream, warm: usize, n: usize) -> io::Result<(f64, f64)> {
    s.write_all(b"E")?;
    let mut times = Vec::with_capacity(n);
    let mut one = [0u8; 1];
    for i in 0..warm + n {
        let t = Instant::now();
        s.write_all(&[i as u8])?;
        s.read_exact(&mut one)?;
        if i >= warm {
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    times.sort_by(f64::total_cmp);
    let at = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
    Ok((at(0.50), at(0.99)))
}
