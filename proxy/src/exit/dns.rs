//! The exit's resolver service: a client's captured DNS queries answered where its traffic
//! leaves.
//!
//! ```text
//! client TUN ─ query to 192.168.1.1:53 ─► stream to Target::Resolver ─► exit ─► its --dns
//!                                          (DNS-over-TCP framing)               servers, or
//!                                                                               resolv.conf's
//! ```
//!
//! The query goes to the exit's own resolvers, never to the address the client's application
//! asked (a home router's or a corporate resolver's address means nothing at the exit, and
//! the exit's policy rightly refuses private destinations). Every query type travels as is
//! (A, AAAA, HTTPS/SVCB, MX, TXT, PTR, ...): the exit forwards the message, it does not
//! rebuild answers from `getaddrinfo`. A query that no resolver answers gets SERVFAIL, so the
//! application hears at once instead of timing out.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tracing::debug;

/// How long one resolver gets to answer one query before the next is asked.
const PER_SERVER: Duration = Duration::from_secs(3);
/// A resolver stream that carries no query for this long is closed.
const STREAM_IDLE: Duration = Duration::from_secs(30);
/// The DNS header: a message shorter than this is not a query.
const HEADER: usize = 12;

/// Where the exit sends the queries its clients' streams carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstreams {
    servers: Vec<SocketAddr>,
}

impl Upstreams {
    /// These servers, in order (`--dns`).
    pub fn new(servers: Vec<SocketAddr>) -> Self {
        Self { servers }
    }

    /// The system's resolvers: the `nameserver` lines of `/etc/resolv.conf` (with a local
    /// stub such as systemd-resolved's 127.0.0.53 that is the stub, which is right: it
    /// answers as this host would).
    pub fn system() -> io::Result<Self> {
        let text = std::fs::read_to_string("/etc/resolv.conf")?;
        let servers = nameservers(&text);
        if servers.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "/etc/resolv.conf names no nameserver",
            ));
        }
        Ok(Self { servers })
    }

    /// The servers asked, in order.
    pub fn servers(&self) -> &[SocketAddr] {
        &self.servers
    }

    /// The answer to `query` from the first server that gives one.
    pub async fn exchange(&self, query: &[u8]) -> io::Result<Vec<u8>> {
        let mut last = io::Error::new(io::ErrorKind::NotFound, "no resolver configured");
        for &server in &self.servers {
            match tokio::time::timeout(PER_SERVER, exchange_with(server, query)).await {
                Ok(Ok(answer)) => return Ok(answer),
                Ok(Err(err)) => last = err,
                Err(_) => last = io::Error::new(io::ErrorKind::TimedOut, "resolver timed out"),
            }
            debug!(%server, error = %last, "resolver did not answer");
        }
        Err(last)
    }
}

/// The `nameserver` addresses in resolv.conf text (port 53; a scope suffix such as
/// `fe80::1%eth0` is kept as the scope id when the interface index is numeric, else the
/// address is skipped: it cannot be reached without one).
pub fn nameservers(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver")).then(|| words.next())?
        })
        .filter_map(|addr| {
            let (ip, scope) = match addr.split_once('%') {
                Some((ip, scope)) => (ip, Some(scope)),
                None => (addr, None),
            };
            match (ip.parse::<IpAddr>().ok()?, scope) {
                (IpAddr::V6(v6), Some(scope)) => {
                    let scope = scope.parse().ok()?;
                    Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                        v6, 53, 0, scope,
                    )))
                }
                (ip, _) => Some(SocketAddr::new(ip, 53)),
            }
        })
        .collect()
}

/// One query to one server over UDP, again over TCP when the answer is truncated.
async fn exchange_with(server: SocketAddr, query: &[u8]) -> io::Result<Vec<u8>> {
    let local: SocketAddr = match server {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(server).await?;
    socket.send(query).await?;
    let mut buf = vec![0u8; 65_535];
    let answer = loop {
        let n = socket.recv(&mut buf).await?;
        // A stray or spoofed datagram with another id is not our answer.
        if n >= HEADER && buf[..2] == query[..2] && buf[2] & 0x80 != 0 {
            break &buf[..n];
        }
    };
    let truncated = answer[2] & 0x02 != 0;
    if !truncated {
        return Ok(answer.to_vec());
    }
    let mut tcp = TcpStream::connect(server).await?;
    write_framed(&mut tcp, query).await?;
    read_framed(&mut tcp)
        .await?
        .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "resolver closed"))
}

/// Serves one client stream to the resolver: DNS messages framed as over TCP, each answered
/// in turn, until the client closes it or leaves it idle.
pub async fn serve<R, W>(reader: &mut R, writer: &mut W, upstreams: &Upstreams) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut answered = 0;
    loop {
        let query = match tokio::time::timeout(STREAM_IDLE, read_framed(reader)).await {
            Err(_) | Ok(Ok(None)) => return Ok(answered),
            Ok(Err(err)) => return Err(err),
            Ok(Ok(Some(query))) => query,
        };
        if query.len() < HEADER {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a DNS message shorter than its header",
            ));
        }
        let answer = match upstreams.exchange(&query).await {
            Ok(answer) => answer,
            Err(err) => {
                debug!(%err, "no resolver answered: server failure");
                server_failure(&query)
            }
        };
        write_framed(writer, &answer).await?;
        answered += 1;
    }
}

/// A SERVFAIL answer to `query` (at least a header long): its id and question, no record.
pub fn server_failure(query: &[u8]) -> Vec<u8> {
    if let Ok(parsed) = netstack::dns::Query::parse(query) {
        return parsed.server_failure(query);
    }
    // A question the parser does not follow: the header alone says it.
    let mut out = query[..HEADER].to_vec();
    out[2] = 0x80 | (query[2] & 0x79);
    out[3] = 0x80 | 2;
    out[4..12].fill(0);
    out
}

/// Reads one framed message; `None` at a clean end of stream.
pub async fn read_framed<S: AsyncRead + Unpin>(stream: &mut S) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match stream.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut msg).await?;
    Ok(Some(msg))
}

/// Writes one framed message.
pub async fn write_framed<S: AsyncWrite + Unpin>(stream: &mut S, msg: &[u8]) -> io::Result<()> {
    stream.write_all(&framed(msg)?).await?;
    stream.flush().await
}

/// `msg` framed as over TCP: its length (two bytes, big-endian), then the message.
pub fn framed(msg: &[u8]) -> io::Result<Vec<u8>> {
    let len = u16::try_from(msg.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "DNS message over 64 KiB"))?;
    let mut framed = Vec::with_capacity(2 + msg.len());
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(msg);
    Ok(framed)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn serve_duplex(stream: tokio::io::DuplexStream, up: &Upstreams) -> io::Result<u64> {
        let (mut reader, mut writer) = tokio::io::split(stream);
        serve(&mut reader, &mut writer, up).await
    }

    #[test]
    fn resolv_conf() {
        let text = "# comment\nsearch example\nnameserver 192.168.1.1\nnameserver  ::1\n\
                    nameserver fe80::1%2\nnameserver fe80::2%eth0\nnameserver\noptions edns0\n\
                    nameserver bogus\n";
        assert_eq!(
            nameservers(text),
            vec![
                "192.168.1.1:53".parse().unwrap(),
                "[::1]:53".parse().unwrap(),
                SocketAddr::V6(std::net::SocketAddrV6::new(
                    "fe80::1".parse().unwrap(),
                    53,
                    0,
                    2
                )),
            ]
        );
    }

    fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
        let mut q = id.to_be_bytes().to_vec();
        q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
        for label in name.split('.') {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&1u16.to_be_bytes());
        q
    }

    /// A resolver on loopback that answers every query with its own bytes and the QR bit,
    /// truncated (TC) over UDP when `truncate`, and whole over TCP.
    async fn fake_resolver(truncate: bool) -> SocketAddr {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = udp.local_addr().unwrap();
        let tcp = tokio::net::TcpListener::bind(addr).await.unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            loop {
                let (n, from) = udp.recv_from(&mut buf).await.unwrap();
                let mut answer = buf[..n].to_vec();
                answer[2] |= 0x80;
                if truncate {
                    answer[2] |= 0x02;
                }
                // A datagram with a wrong id first: it must be ignored.
                let mut stray = answer.clone();
                stray[0] ^= 0xff;
                udp.send_to(&stray, from).await.unwrap();
                udp.send_to(&answer, from).await.unwrap();
            }
        });
        tokio::spawn(async move {
            loop {
                let (mut s, _) = tcp.accept().await.unwrap();
                tokio::spawn(async move {
                    while let Ok(Some(mut q)) = read_framed(&mut s).await {
                        q[2] |= 0x80;
                        q.extend_from_slice(b"via-tcp");
                        write_framed(&mut s, &q).await.unwrap();
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn queries_of_every_type_are_forwarded_and_truncation_goes_to_tcp() {
        let udp_only = fake_resolver(false).await;
        let up = Upstreams::new(vec![udp_only]);
        for qtype in [1, 28, 65, 15, 16, 12] {
            let q = query(7, "web.test", qtype);
            let a = up.exchange(&q).await.unwrap();
            assert_eq!(&a[..2], &q[..2]);
            assert_eq!(&a[3..], &q[3..], "type {qtype} forwarded as is");
        }
        let truncating = fake_resolver(true).await;
        let a = Upstreams::new(vec![truncating])
            .exchange(&query(9, "big.test", 16))
            .await
            .unwrap();
        assert!(a.ends_with(b"via-tcp"));
    }

    #[tokio::test]
    async fn a_dead_resolver_is_skipped_and_none_gives_servfail() {
        // A UDP port with no socket: the query is refused at once and the next server
        // answers.
        let dead_addr = {
            let dead = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            dead.local_addr().unwrap()
        };
        let live = fake_resolver(false).await;
        let up = Upstreams::new(vec![dead_addr, live]);
        let (mut client, server) = tokio::io::duplex(4096);
        let task = tokio::spawn(async move { serve_duplex(server, &up).await });
        let q = query(3, "web.test", 1);
        write_framed(&mut client, &q).await.unwrap();
        let a = read_framed(&mut client).await.unwrap().unwrap();
        assert_eq!(a[2] & 0x80, 0x80);
        assert_eq!(a[3] & 0x0f, 0);
        drop(client);
        assert_eq!(task.await.unwrap().unwrap(), 1);

        let none = Upstreams::new(vec![]);
        let (mut client, server) = tokio::io::duplex(4096);
        tokio::spawn(async move { serve_duplex(server, &none).await });
        write_framed(&mut client, &q).await.unwrap();
        let a = read_framed(&mut client).await.unwrap().unwrap();
        assert_eq!(&a[..2], &q[..2]);
        assert_eq!(a[3] & 0x0f, 2, "SERVFAIL");
    }

    #[test]
    fn servfail_for_a_question_the_parser_cannot_follow() {
        let mut q = query(5, "x.test", 1);
        q.truncate(HEADER + 2);
        let a = server_failure(&q);
        assert_eq!(a.len(), HEADER);
        assert_eq!(&a[..2], &q[..2]);
        assert_eq!(a[2] & 0x80, 0x80);
        assert_eq!(a[3] & 0x0f, 2);
    }

    #[tokio::test]
    async fn a_runt_message_ends_the_stream() {
        let up = Upstreams::new(vec![]);
        let (mut client, server) = tokio::io::duplex(64);
        let task = tokio::spawn(async move { serve_duplex(server, &up).await });
        write_framed(&mut client, &[1, 2, 3]).await.unwrap();
        assert!(task.await.unwrap().is_err());
    }
}
