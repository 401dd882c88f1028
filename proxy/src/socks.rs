//! The SOCKS5 front-end (RFC 1928, RFC 1929 username/password).
//!
//! fast-socks5's `Socks5ServerProtocol` does the handshake: method negotiation, optional
//! username/password, reading the command. We then dial through our own
//! [`Dialer`](crate::dialer::Dialer) (never fast-socks5's resolver, so names stay unresolved
//! until the exit) and answer with the reply code that says why a dial failed. UDP ASSOCIATE
//! relays datagrams through the dialer's [`UdpFlow`], parsing their headers with [`udp`].

pub mod udp;

use std::io;
use std::net::{IpAddr, SocketAddr};

use fast_socks5::server::{Socks5ServerProtocol, SocksServerError};
use fast_socks5::util::target_addr::TargetAddr;
use fast_socks5::{ReplyError, Socks5Command};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tracing::{debug, trace};

use crate::dialer::{DialError, Target, UdpFlow};
use crate::relay::relay_tcp;
use crate::server::{Shared, accept_loop};

/// Username and password a client must present (RFC 1929).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user name.
    pub user: String,
    /// The password.
    pub pass: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never log the password.
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// Whether `user` and `pass` are these credentials (in constant time).
    pub fn matches(&self, user: &str, pass: &str) -> bool {
        // Compare without an early exit so response time does not reveal a matching prefix.
        let eq = |a: &[u8], b: &[u8]| {
            a.len() == b.len() && a.iter().zip(b).fold(0, |acc, (x, y)| acc | (x ^ y)) == 0
        };
        eq(self.user.as_bytes(), user.as_bytes()) & eq(self.pass.as_bytes(), pass.as_bytes())
    }
}

/// Why a SOCKS5 session ended early (logged, never shown to anyone else).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SocksError {
    /// The handshake failed: malformed request, wrong version, rejected credentials.
    #[error("handshake: {0}")]
    Handshake(#[from] SocksServerError),
    /// The client took longer than the handshake timeout.
    #[error("handshake timed out")]
    HandshakeTimeout,
    /// The dial for the client failed (the client got a reply code saying why).
    #[error("dial {target}: {err}")]
    Dial {
        /// Where the client wanted to go.
        target: Target,
        /// Why it failed.
        err: DialError,
    },
    /// The relay ended with an error.
    #[error("relay: {0}")]
    Relay(#[from] io::Error),
}

/// Serves SOCKS5 on `listener` until `shared.shutdown` is cancelled, asking clients for
/// `shared.auth` when set.
pub async fn serve(listener: TcpListener, shared: Shared) {
    let shared2 = shared.clone();
    accept_loop(listener, shared, "socks5", move |stream, peer| {
        let shared = shared2.clone();
        async move {
            let auth = shared.auth.clone();
            match handle(stream, peer, &shared, auth.as_deref()).await {
                Ok(()) => debug!("closed"),
                Err(err) => debug!(%err, "closed"),
            }
        }
    })
    .await;
}

/// Runs one SOCKS5 client connection.
pub async fn handle(
    stream: TcpStream,
    peer: SocketAddr,
    shared: &Shared,
    auth: Option<&Credentials>,
) -> Result<(), SocksError> {
    // Replies are small writes the client waits for: do not let Nagle hold them.
    let _ = stream.set_nodelay(true);
    let local = stream.local_addr()?;
    let handshake = async {
        let proto = match auth {
            None => Socks5ServerProtocol::accept_no_auth(stream).await?,
            Some(creds) => {
                let check = |user: String, pass: String| {
                    let ok = creds.matches(&user, &pass);
                    if !ok {
                        shared.counters.auth_failed();
                    }
                    ok
                };
                Socks5ServerProtocol::accept_password_auth(stream, check)
                    .await?
                    .0
            }
        };
        proto.read_command().await
    };
    let (proto, cmd, target) = tokio::time::timeout(shared.handshake_timeout, handshake)
        .await
        .map_err(|_| SocksError::HandshakeTimeout)??;
    let target = match target {
        TargetAddr::Ip(addr) => Target::Ip(addr),
        TargetAddr::Domain(name, port) => Target::from_host_port(&name, port),
    };
    match cmd {
        Socks5Command::TCPConnect => {
            debug!(%target, "connect");
            let mut upstream = match shared.dialer_for(peer).connect(target.clone()).await {
                Ok(stream) => stream,
                Err(err) => {
                    shared.counters.dial_failed();
                    let _ = proto.reply_error(&reply_for(&err)).await;
                    return Err(SocksError::Dial { target, err });
                }
            };
            // The bound address of the far side is not ours to know (it may be a mux stream
            // at an exit); clients ignore it for CONNECT.
            let unspecified = SocketAddr::new(IpAddr::from([0, 0, 0, 0]), 0);
            let mut client = proto.reply_success(unspecified).await?;
            let t = relay_tcp(&mut client, &mut upstream, shared.idle_timeout).await?;
            shared.counters.relayed(t);
            debug!(up = t.up, down = t.down, "relay done");
            Ok(())
        }
        Socks5Command::UDPAssociate => {
            let flow = match shared.dialer_for(peer).udp_associate().await {
                Ok(flow) => flow,
                Err(err) => {
                    let _ = proto.reply_error(&reply_for(&err)).await;
                    return Err(SocksError::Dial { target, err });
                }
            };
            // The relay socket listens where the client reached us, so it is reachable the
            // same way (loopback stays loopback).
            let socket = UdpSocket::bind(SocketAddr::new(local.ip(), 0)).await?;
            let relay_addr = socket.local_addr()?;
            debug!(%relay_addr, "udp associate");
            let mut control = proto.reply_success(relay_addr).await?;
            let client_hint = match target {
                Target::Ip(addr) if !addr.ip().is_unspecified() && addr.port() != 0 => Some(addr),
                _ => None,
            };
            udp_relay(&mut control, socket, flow, peer.ip(), client_hint, shared).await?;
            Ok(())
        }
        Socks5Command::TCPBind => {
            let _ = proto.reply_error(&ReplyError::CommandNotSupported).await;
            Ok(())
        }
    }
}

fn reply_for(err: &DialError) -> ReplyError {
    match err.socks_reply() {
        0x02 => ReplyError::ConnectionNotAllowed,
        0x03 => ReplyError::NetworkUnreachable,
        0x04 => ReplyError::HostUnreachable,
        0x05 => ReplyError::ConnectionRefused,
        0x06 => ReplyError::TtlExpired,
        _ => ReplyError::GeneralFailure,
    }
}

/// Largest datagram we relay (the UDP maximum).
const MAX_DATAGRAM: usize = 65_535;

/// Relays one UDP association until its control connection closes (RFC 1928 §7) or it is
/// idle for the idle timeout. Only datagrams from the client's IP are accepted, and the
/// client's UDP port is learnt from its first datagram (or taken from its request).
async fn udp_relay(
    control: &mut TcpStream,
    socket: UdpSocket,
    flow: Box<dyn UdpFlow>,
    client_ip: IpAddr,
    hint: Option<SocketAddr>,
    shared: &Shared,
) -> io::Result<()> {
    let mut client_addr = hint;
    let mut up = vec![0u8; MAX_DATAGRAM];
    // Room for the longest header in front of the payload, so replies go out in one send.
    let mut down = vec![0u8; udp::MAX_EMIT_LEN + MAX_DATAGRAM];
    let mut ctl = [0u8; 64];
    let idle = shared.idle_timeout.unwrap_or(std::time::Duration::MAX / 4);
    loop {
        let deadline = tokio::time::sleep(idle);
        tokio::select! {
            res = control.read(&mut ctl) => match res {
                Ok(0) | Err(_) => return Ok(()),
                // RFC 1928 gives the control connection no further messages; ignore noise.
                Ok(_) => continue,
            },
            res = socket.recv_from(&mut up) => {
                let (n, from) = res?;
                if from.ip().to_canonical() != client_ip.to_canonical()
                    || client_addr.is_some_and(|c| c != from)
                {
                    trace!(%from, "udp datagram from a stranger dropped");
                    continue;
                }
                client_addr = Some(from);
                match udp::parse(&up[..n]) {
                    Ok((target, payload)) => {
                        if let Err(err) = flow.send_to(payload, &target).await {
                            debug!(%target, %err, "udp send failed");
                        }
                    }
                    Err(err) => debug!(%err, "bad udp datagram from client"),
                }
            }
            res = flow.recv_from(&mut down[udp::MAX_EMIT_LEN..]) => {
                let (n, source) = res?;
                let Some(client) = client_addr else { continue };
                let hlen = udp::header_len(source);
                let start = udp::MAX_EMIT_LEN - hlen;
                udp::emit(source, &mut down[start..udp::MAX_EMIT_LEN]);
                if let Err(err) = socket.send_to(&down[start..udp::MAX_EMIT_LEN + n], client).await {
                    debug!(%err, "udp send to client failed");
                }
            }
            () = deadline => {
                debug!("udp association idle");
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    use crate::dialer::DirectDialer;
    use crate::exit_policy::{ExitPolicy, PolicyDialer};
    use crate::guard::Dialers;

    async fn start(
        dialer: Arc<dyn crate::dialer::Dialer>,
        auth: Option<Credentials>,
    ) -> (SocketAddr, Shared) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let dialers = Dialers::direct(
            dialer,
            DirectDialer::new(Duration::from_secs(5)),
            &ExitPolicy::default(),
        );
        let mut shared = Shared::new(dialers, Some(Duration::from_secs(30)), 16);
        shared.auth = auth.map(Arc::new);
        tokio::spawn(serve(listener, shared.clone()));
        (addr, shared)
    }

    async fn connect_request(proxy: SocketAddr, target: SocketAddr) -> (TcpStream, [u8; 10]) {
        let mut s = TcpStream::connect(proxy).await.unwrap();
        s.write_all(&[5, 1, 0]).await.unwrap();
        let mut m = [0; 2];
        s.read_exact(&mut m).await.unwrap();
        assert_eq!(m, [5, 0]);
        let SocketAddr::V4(v4) = target else { panic!() };
        let mut req = vec![5, 1, 0, 1];
        req.extend_from_slice(&v4.ip().octets());
        req.extend_from_slice(&v4.port().to_be_bytes());
        s.write_all(&req).await.unwrap();
        let mut reply = [0; 10];
        s.read_exact(&mut reply).await.unwrap();
        (s, reply)
    }

    #[tokio::test]
    async fn connect_relays_and_refusals_get_their_codes() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = echo.accept().await.unwrap();
            let mut b = [0; 5];
            s.read_exact(&mut b).await.unwrap();
            s.write_all(&b).await.unwrap();
        });
        let dialer = Arc::new(DirectDialer::new(Duration::from_secs(5)));
        let (proxy, _shared) = start(dialer, None).await;
        let (mut s, reply) = connect_request(proxy, echo_addr).await;
        assert_eq!(reply[1], 0);
        s.write_all(b"hello").await.unwrap();
        let mut b = [0; 5];
        s.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"hello");

        let dead = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let (_s, reply) = connect_request(proxy, dead).await;
        assert_eq!(reply[1], 5, "connection refused");

        let policy = Arc::new(PolicyDialer::new(
            DirectDialer::new(Duration::from_secs(5)),
            ExitPolicy::default(),
        ));
        let (proxy, _shared) = start(policy, None).await;
        let (_s, reply) = connect_request(proxy, echo_addr).await;
        assert_eq!(reply[1], 2, "not allowed by ruleset");
    }

    #[tokio::test]
    async fn password_auth() {
        let creds = Credentials {
            user: "u".into(),
            pass: "p".into(),
        };
        let dialer = Arc::new(DirectDialer::new(Duration::from_secs(5)));
        let (proxy, _shared) = start(dialer, Some(creds)).await;
        for (pass, status) in [(&b"p"[..], 0u8), (b"x", 1)] {
            let mut s = TcpStream::connect(proxy).await.unwrap();
            s.write_all(&[5, 1, 2]).await.unwrap();
            let mut m = [0; 2];
            s.read_exact(&mut m).await.unwrap();
            assert_eq!(m, [5, 2]);
            let mut req = vec![1, 1, b'u', pass.len() as u8];
            req.extend_from_slice(pass);
            s.write_all(&req).await.unwrap();
            s.read_exact(&mut m).await.unwrap();
            assert_eq!(m[1] != 0, status != 0, "{m:?}");
        }
        // A client offering no password method is told no method is acceptable.
        let mut s = TcpStream::connect(proxy).await.unwrap();
        s.write_all(&[5, 1, 0]).await.unwrap();
        let mut m = [0; 2];
        s.read_exact(&mut m).await.unwrap();
        assert_eq!(m, [5, 0xff]);
    }

    #[test]
    fn credentials_compare() {
        let c = Credentials {
            user: "alice".into(),
            pass: "secret".into(),
        };
        assert!(c.matches("alice", "secret"));
        assert!(!c.matches("alice", "secreT"));
        assert!(!c.matches("alic", "secret"));
        assert!(!format!("{c:?}").contains("secret"));
    }
}
