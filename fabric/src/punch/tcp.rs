//! TCP hole punching (seed 002) and the TLS 1.3 link on top of it.
//!
//! ```text
//!  one local port P, SO_REUSEADDR + SO_REUSEPORT:
//!    P ── STUN over TCP ──► server-reflexive candidate (driver::stun_tcp)
//!    P ── listen ◄── peer's dials that get through
//!    P ── dial every remote candidate, again and again ──► simultaneous open through NATs
//!  every TCP connection made ─► TLS 1.3, both sides pin the certificate fingerprint the other
//!  sent in its LinkOffer over Tox
//!  controlling side: handshakes only; the punch loop takes the first one done, sends SELECT
//!  on it alone ─► that is the link
//!  controlled side: the connection on which SELECT arrives is the link; the rest are dropped
//! ```
//!
//! Both sides dial and listen, so two connections can come up at once (A's dial accepted by
//! B and B's dial accepted by A). The controlling side (lower X25519 key, see
//! [`crate::link::LinkKeys::controlling`]) is the TLS client on every connection and alone
//! chooses one; that makes both ends agree. Only the punch loop writes SELECT, once: if each
//! handshake wrote it, two finishing together would each send one, the controlled side could
//! keep another connection than the controlling side, and both links would die (review B2).
//! Certificates are self-signed (`rcgen`); trust comes only from the SHA-256 fingerprint
//! exchanged over the authenticated Tox channel.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_rustls::{TlsAcceptor, TlsConnector, TlsStream};

use super::driver::{canonical, reusable_tcp_socket, wire_addr};
use crate::time::Duration;

/// The byte the controlling side sends, inside TLS, on the connection it chose.
const SELECT: u8 = 0x5A;

/// Why TCP punching failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TcpPunchError {
    /// Binding or listening on the local port failed.
    #[error("tcp punch socket: {0}")]
    Io(#[from] io::Error),
    /// Making the certificate or the TLS configuration failed.
    #[error("tls setup: {0}")]
    Tls(#[from] rustls::Error),
    /// Generating the self-signed certificate failed.
    #[error("certificate generation: {0}")]
    Certificate(#[from] rcgen::Error),
    /// No connection completed the handshake in time.
    #[error("tcp punching timed out")]
    Timeout,
}

/// Timings of TCP punching.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpPunchConfig {
    /// The pause between two dials of one remote candidate.
    pub retry_interval: Duration,
    /// How long one dial may take.
    pub connect_timeout: Duration,
    /// Give up after this long.
    pub punch_timeout: Duration,
}

impl Default for TcpPunchConfig {
    fn default() -> Self {
        Self {
            retry_interval: Duration::from_millis(200),
            connect_timeout: Duration::from_secs(2),
            punch_timeout: Duration::from_secs(10),
        }
    }
}

/// TLS handshakes with connections the punch listener accepted that may run at once; more
/// connections are closed as soon as they are accepted. Two would do for the peer (its dials
/// to each of our candidates that reach us); the rest is slack for stray connections that
/// come first.
pub const MAX_ACCEPTED_HANDSHAKES: usize = 4;

/// Our self-signed certificate and key for punched TCP links.
pub struct TlsIdentity {
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
    fingerprint: [u8; 32],
}

impl core::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl TlsIdentity {
    /// Generates a fresh certificate and key (ECDSA P-256).
    pub fn generate() -> Result<Self, TcpPunchError> {
        let certified = rcgen::generate_simple_self_signed(vec!["proxy.invalid".to_owned()])?;
        let cert = certified.cert.der().clone();
        let key = PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der());
        Ok(Self {
            fingerprint: fingerprint(&cert),
            cert,
            key,
        })
    }

    /// The SHA-256 of our certificate, to send in [`crate::link::signal::LinkOffer`].
    pub fn fingerprint(&self) -> [u8; 32] {
        self.fingerprint
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }
}

fn fingerprint(cert: &CertificateDer<'_>) -> [u8; 32] {
    Sha256::digest(cert.as_ref()).into()
}

/// Accepts exactly one certificate: the one whose SHA-256 the peer sent over Tox. Used as the
/// server verifier on the client side and the client verifier on the server side.
#[derive(Debug)]
struct Pinned {
    fingerprint: [u8; 32],
    algorithms: WebPkiSupportedAlgorithms,
}

impl Pinned {
    fn check(&self, cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        if fingerprint(cert) == self.fingerprint {
            Ok(())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // The configs allow TLS 1.3 only.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

impl ClientCertVerifier for Pinned {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        ServerCertVerifier::verify_tls12_signature(self, message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        ServerCertVerifier::verify_tls13_signature(self, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        ServerCertVerifier::supported_verify_schemes(self)
    }
}

enum Tls {
    Client(TlsConnector),
    Server(TlsAcceptor),
}

fn tls(
    controlling: bool,
    identity: &TlsIdentity,
    peer_fingerprint: [u8; 32],
) -> Result<Tls, TcpPunchError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let pinned = Arc::new(Pinned {
        fingerprint: peer_fingerprint,
        algorithms: provider.signature_verification_algorithms,
    });
    let versions = &[&rustls::version::TLS13];
    let provider: Arc<CryptoProvider> = provider;
    Ok(if controlling {
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)?
            .dangerous()
            .with_custom_certificate_verifier(pinned)
            .with_client_auth_cert(vec![identity.cert.clone()], identity.key())?;
        Tls::Client(TlsConnector::from(Arc::new(config)))
    } else {
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)?
            .with_client_cert_verifier(pinned)
            .with_single_cert(vec![identity.cert.clone()], identity.key())?;
        // Nobody resumes a pinned punch session. Tickets would also be bytes the client never
        // reads on the connections it drops, and closing a socket with unread bytes sends a
        // reset instead of a FIN.
        config.send_tls13_tickets = 0;
        Tls::Server(TlsAcceptor::from(Arc::new(config)))
    })
}

/// Punches a TCP link from `local` (a port the caller may first have used for
/// [`super::driver::stun_tcp`]) to any of `remotes`, and secures it with TLS 1.3 pinned to
/// `peer_fingerprint`. `controlling` must be [`crate::link::LinkKeys::controlling`] of the same
/// offer exchange, so the two sides take opposite roles.
pub async fn punch_tcp(
    local: SocketAddr,
    remotes: &[SocketAddr],
    controlling: bool,
    identity: &TlsIdentity,
    peer_fingerprint: [u8; 32],
    config: TcpPunchConfig,
) -> Result<TlsStream<TcpStream>, TcpPunchError> {
    let tls = tls(controlling, identity, peer_fingerprint)?;
    let listener = reusable_tcp_socket(local)?.listen(16)?;
    let local = listener.local_addr()?;
    let span = tracing::debug_span!("tcp_punch", %local, controlling);
    let _enter = span.enter();
    // A connection and, for one we accepted, its place among the handshakes of strangers.
    let (conn_tx, mut conns) = mpsc::channel::<(TcpStream, Option<OwnedSemaphorePermit>)>(16);
    // Dialers and the acceptor only make TCP connections; dropping the set ends them.
    let mut makers = JoinSet::new();
    for &remote in remotes {
        let tx = conn_tx.clone();
        makers.spawn(dial(local, remote, config, tx));
    }
    // Anyone may connect to the listener while we punch, and each handshake costs a
    // signature: only a few at a time, the rest closed at once. (Our own dials are bounded by
    // the candidates, and need no place: strangers holding every place, even for the whole
    // punch, do not keep the peer out, which dials us and is dialled by us.) There is no
    // per-handshake timeout: on a loaded machine an honest handshake may take seconds.
    let accepting = Arc::new(Semaphore::new(MAX_ACCEPTED_HANDSHAKES));
    makers.spawn(async move {
        while let Ok((stream, from)) = listener.accept().await {
            let Ok(permit) = accepting.clone().try_acquire_owned() else {
                tracing::debug!(%from, "tcp punch: too many handshakes, connection closed");
                continue;
            };
            tracing::debug!(%from, "tcp punch accepted");
            if conn_tx.send((stream, Some(permit))).await.is_err() {
                return;
            }
        }
    });
    let mut handshakes: JoinSet<io::Result<Handshaken>> = JoinSet::new();
    let work = async {
        loop {
            tokio::select! {
                Some((stream, permit)) = conns.recv() => {
                    let _ = stream.set_nodelay(true);
                    match &tls {
                        Tls::Client(c) => {
                            let c = c.clone();
                            handshakes.spawn(async move {
                                let _permit = permit;
                                let name = ServerName::try_from("proxy.invalid")
                                    .map_err(io::Error::other)?;
                                // No SELECT here: the loop below sends it on one.
                                Ok(Handshaken::Unselected(c.connect(name, stream).await?))
                            });
                        }
                        Tls::Server(a) => {
                            let a = a.clone();
                            handshakes.spawn(async move {
                                let _permit = permit;
                                let mut s = a.accept(stream).await?;
                                let mut b = [0u8; 1];
                                s.read_exact(&mut b).await?;
                                if b[0] != SELECT {
                                    return Err(io::Error::new(
                                        io::ErrorKind::InvalidData,
                                        "bad select byte",
                                    ));
                                }
                                Ok(Handshaken::Selected(s.into()))
                            });
                        }
                    }
                }
                Some(done) = handshakes.join_next() => match done {
                    Ok(Ok(Handshaken::Selected(stream))) => return stream,
                    Ok(Ok(Handshaken::Unselected(mut stream))) => {
                        // The only SELECT this side sends; the other handshakes are dropped
                        // with the set when this returns.
                        let select = async {
                            stream.write_all(&[SELECT]).await?;
                            stream.flush().await
                        };
                        match select.await {
                            Ok(()) => return stream.into(),
                            Err(e) => tracing::debug!(error = %e, "tcp punch select failed"),
                        }
                    }
                    Ok(Err(e)) => tracing::debug!(error = %e, "tcp punch handshake failed"),
                    Err(e) => tracing::warn!(error = %e, "tcp punch handshake task"),
                },
            }
        }
    };
    let stream = tokio::time::timeout(config.punch_timeout, work)
        .await
        .map_err(|_| TcpPunchError::Timeout)?;
    if let Ok(peer) = stream.get_ref().0.peer_addr() {
        tracing::info!(peer = %canonical(peer), "punched tcp path connected");
    }
    Ok(stream)
}

/// A connection whose TLS handshake is done.
enum Handshaken {
    /// Controlling side: waits for the punch loop to choose it.
    Unselected(tokio_rustls::client::TlsStream<TcpStream>),
    /// Controlled side: the peer chose it.
    Selected(TlsStream<TcpStream>),
}

/// Dials `remote` from `local` until a connection is made or the receiver is gone.
async fn dial(
    local: SocketAddr,
    remote: SocketAddr,
    config: TcpPunchConfig,
    tx: mpsc::Sender<(TcpStream, Option<OwnedSemaphorePermit>)>,
) {
    loop {
        let attempt = async {
            let socket = reusable_tcp_socket(local)?;
            tokio::time::timeout(
                config.connect_timeout,
                socket.connect(wire_addr(local, remote)),
            )
            .await
            .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?
        };
        match attempt.await {
            Ok(stream) => {
                tracing::debug!(%remote, "tcp punch dialled");
                let _ = tx.send((stream, None)).await;
                return;
            }
            Err(e) => tracing::trace!(%remote, error = %e, "tcp punch dial"),
        }
        if tx.is_closed() {
            return;
        }
        tokio::time::sleep(config.retry_interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn free_port() -> SocketAddr {
        // Bind and drop: the port is free again (with reuse it can be bound at once).
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    }

    /// Punches from `pa` (controlling) to `ra` and from `pb` to `rb` with fresh identities,
    /// each pinning the other's; both must succeed within 15 s.
    async fn punch_pair(
        pa: SocketAddr,
        ra: Vec<SocketAddr>,
        pb: SocketAddr,
        rb: Vec<SocketAddr>,
    ) -> (TlsStream<TcpStream>, TlsStream<TcpStream>) {
        let (ia, ib) = (
            TlsIdentity::generate().unwrap(),
            TlsIdentity::generate().unwrap(),
        );
        let config = TcpPunchConfig::default();
        let (fa, fb) = (ia.fingerprint(), ib.fingerprint());
        let a = tokio::spawn(async move { punch_tcp(pa, &ra, true, &ia, fb, config).await });
        let b = tokio::spawn(async move { punch_tcp(pb, &rb, false, &ib, fa, config).await });
        let (a, b) = tokio::time::timeout(Duration::from_secs(15), async {
            (a.await.unwrap(), b.await.unwrap())
        })
        .await
        .unwrap();
        (a.unwrap(), b.unwrap())
    }

    #[tokio::test]
    async fn both_sides_agree_on_one_pinned_tls_link() {
        let (pa, pb) = (free_port().await, free_port().await);
        let unreachable: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let (mut a, mut b) = punch_pair(pa, vec![unreachable, pb], pb, vec![unreachable, pa]).await;
        // The same TCP connection on both ends.
        let (ta, tb) = (a.get_ref().0, b.get_ref().0);
        assert_eq!(ta.local_addr().unwrap(), tb.peer_addr().unwrap());
        assert_eq!(ta.peer_addr().unwrap(), tb.local_addr().unwrap());
        assert_eq!(
            a.get_ref().1.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        a.write_all(b"over the punched link").await.unwrap();
        a.flush().await.unwrap();
        let mut got = [0u8; 21];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"over the punched link");
        b.write_all(b"and back").await.unwrap();
        b.flush().await.unwrap();
        let mut back = [0u8; 8];
        a.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"and back");
    }

    /// Ports bound on `[::]` take both families: one side dials the other's IPv4 address,
    /// the other dials IPv6, and they agree on one link.
    #[tokio::test]
    async fn dual_stack_ports_punch_to_ipv4_and_ipv6_candidates() {
        if std::net::TcpListener::bind("[::1]:0").is_err() {
            tracing::warn!("skipped: no IPv6 loopback");
            return;
        }
        let free6 = || {
            let l = std::net::TcpListener::bind("[::]:0").unwrap();
            l.local_addr().unwrap()
        };
        let (pa, pb) = (free6(), free6());
        let b_v4 = SocketAddr::from(([127, 0, 0, 1], pb.port()));
        let a_v6 = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, pa.port()));
        let (mut a, mut b) = punch_pair(pa, vec![b_v4], pb, vec![a_v6]).await;
        let (ta, tb) = (a.get_ref().0, b.get_ref().0);
        assert_eq!(
            canonical(ta.local_addr().unwrap()),
            canonical(tb.peer_addr().unwrap())
        );
        a.write_all(b"both families").await.unwrap();
        a.flush().await.unwrap();
        let mut got = [0u8; 13];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"both families");
    }

    /// Runs the server side of one TLS handshake by hand up to its first flight, and returns
    /// that flight unsent, so a test decides when the client sees it.
    async fn server_flight(conn: &mut rustls::ServerConnection, tcp: &mut TcpStream) -> Vec<u8> {
        let mut buf = vec![0u8; 16 * 1024];
        while !conn.wants_write() {
            let n = tcp.read(&mut buf).await.unwrap();
            assert!(n > 0, "the client closed before its hello");
            conn.read_tls(&mut &buf[..n]).unwrap();
            conn.process_new_packets().unwrap();
        }
        let mut flight = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut flight).unwrap();
        }
        flight
    }

    /// The first application byte on a connection whose server flight was sent: `Some` byte,
    /// or `None` if the client closed (or reset) it without sending one.
    async fn first_byte(conn: &mut rustls::ServerConnection, tcp: &mut TcpStream) -> Option<u8> {
        use std::io::Read;
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let mut byte = [0u8; 1];
            match conn.reader().read(&mut byte) {
                Ok(1) => return Some(byte[0]),
                Ok(_) => return None,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return None,
            }
            let n = match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => n,
            };
            conn.read_tls(&mut &buf[..n]).unwrap();
            if conn.process_new_packets().is_err() {
                return None;
            }
            let mut out = Vec::new();
            while conn.wants_write() {
                conn.write_tls(&mut out).unwrap();
            }
            if tcp.write_all(&out).await.is_err() {
                return None;
            }
        }
    }

    /// Review B2: with two connections up, both handshakes may finish before the
    /// controlling side picks one. Here the test is the controlled side and lets both
    /// handshakes finish at the same moment (both server flights leave together): SELECT
    /// must arrive on exactly one connection, the one the controlling side returns.
    #[tokio::test]
    async fn the_controlling_side_selects_exactly_one_of_several_connections() {
        let (ia, ib) = (
            TlsIdentity::generate().unwrap(),
            TlsIdentity::generate().unwrap(),
        );
        let (fa, fb) = (ia.fingerprint(), ib.fingerprint());
        let Tls::Server(acceptor) = tls(false, &ib, fa).unwrap() else {
            unreachable!("the controlled side is the server");
        };
        let server_config = acceptor.config().clone();
        let ours = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pb = ours.local_addr().unwrap();
        let pa = free_port().await;
        let a = tokio::spawn(async move {
            punch_tcp(pa, &[pb], true, &ia, fb, TcpPunchConfig::default()).await
        });
        let connections = async {
            // One connection the controlling side dialled, one it accepted.
            let (dialled, _) = ours.accept().await.unwrap();
            let accepted = loop {
                match TcpStream::connect(pa).await {
                    Ok(s) => break s,
                    // Its listener is not up yet.
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            };
            let mut tcps = [dialled, accepted];
            let mut conns = [
                rustls::ServerConnection::new(server_config.clone()).unwrap(),
                rustls::ServerConnection::new(server_config.clone()).unwrap(),
            ];
            let mut flights = Vec::new();
            for (conn, tcp) in conns.iter_mut().zip(tcps.iter_mut()) {
                flights.push(server_flight(conn, tcp).await);
            }
            for (flight, tcp) in flights.iter().zip(tcps.iter_mut()) {
                tcp.write_all(flight).await.unwrap();
            }
            let [c0, c1] = &mut conns;
            let [t0, t1] = &mut tcps;
            let (b0, b1) = tokio::join!(first_byte(c0, t0), first_byte(c1, t1));
            (tcps, [b0, b1])
        };
        let (stream, (tcps, bytes)) = tokio::time::timeout(Duration::from_secs(30), async {
            let (tcps_bytes, stream) = tokio::join!(connections, a);
            (stream.unwrap().unwrap(), tcps_bytes)
        })
        .await
        .expect("punching and both handshakes finish");
        // Both connections have the controlling side's punch port as their local end.
        let chosen = stream.get_ref().0.peer_addr().unwrap();
        for (tcp, byte) in tcps.iter().zip(bytes) {
            if tcp.local_addr().unwrap() == chosen {
                assert_eq!(byte, Some(SELECT), "SELECT on the connection returned");
            } else {
                assert_eq!(byte, None, "nothing on the connection not chosen");
            }
        }
        assert_eq!(
            bytes.iter().filter(|b| b.is_some()).count(),
            1,
            "exactly one SELECT: {bytes:?}"
        );
    }

    #[tokio::test]
    async fn a_wrong_fingerprint_never_connects() {
        let (ia, ib) = (
            TlsIdentity::generate().unwrap(),
            TlsIdentity::generate().unwrap(),
        );
        let (pa, pb) = (free_port().await, free_port().await);
        let config = TcpPunchConfig {
            punch_timeout: Duration::from_secs(2),
            ..Default::default()
        };
        let fa = ia.fingerprint();
        // A pins a fingerprint B does not have.
        let a = tokio::spawn(async move { punch_tcp(pa, &[pb], true, &ia, [7; 32], config).await });
        let b = tokio::spawn(async move { punch_tcp(pb, &[pa], false, &ib, fa, config).await });
        assert!(matches!(a.await.unwrap(), Err(TcpPunchError::Timeout)));
        assert!(matches!(b.await.unwrap(), Err(TcpPunchError::Timeout)));
    }

    #[tokio::test]
    async fn strangers_get_a_few_handshakes_and_the_peer_still_gets_through() {
        // B12: every connection to the punch listener used to start a TLS handshake.
        let (pa, pb) = (free_port().await, free_port().await);
        let (ia, ib) = (
            TlsIdentity::generate().unwrap(),
            TlsIdentity::generate().unwrap(),
        );
        let (fa, fb) = (ia.fingerprint(), ib.fingerprint());
        let config = TcpPunchConfig {
            // The strangers' stalled handshakes hold their places throughout.
            punch_timeout: Duration::from_secs(60),
            ..TcpPunchConfig::default()
        };
        // `b` listens on `pb` and dials `pa`, where nobody listens yet.
        let b = tokio::spawn(async move { punch_tcp(pb, &[pa], false, &ib, fa, config).await });
        // Strangers connect and never say a word.
        let mut strangers = Vec::new();
        while strangers.len() < MAX_ACCEPTED_HANDSHAKES {
            match TcpStream::connect(pb).await {
                Ok(s) => strangers.push(s),
                // The listener is not up yet.
                Err(_) => tokio::task::yield_now().await,
            }
        }
        // The next ones are closed at once: they read EOF (or a reset), they do not wait.
        for _ in 0..3 {
            let mut extra = TcpStream::connect(pb).await.unwrap();
            let mut byte = [0u8; 1];
            let read = tokio::time::timeout(Duration::from_secs(30), extra.read(&mut byte))
                .await
                .expect("an extra connection was left waiting for a handshake");
            assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        }
        // The peer still gets through: `b`'s own dial to it needs no place among strangers.
        let a = tokio::spawn(async move { punch_tcp(pa, &[pb], true, &ia, fb, config).await });
        let (a, b) = tokio::time::timeout(Duration::from_secs(30), async {
            (a.await.unwrap(), b.await.unwrap())
        })
        .await
        .unwrap();
        let (mut a, mut b) = (a.unwrap(), b.unwrap());
        a.write_all(b"hi").await.unwrap();
        a.flush().await.unwrap();
        let mut got = [0u8; 2];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hi");
        drop(strangers);
    }
}
