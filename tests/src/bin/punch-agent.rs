//! One end of a punched link, for the NAT matrix tests and the punched-link benchmark.
//!
//! ```text
//!  punch-agent forward   keys from --psk, the peer at a known address:
//!    TCP --listen ─► mux stream ─► KCP session ─► UdpLink (sealed UDP) ─► … ─► TCP --connect
//!  punch-agent nat       STUN ─► offer on stdout, the peer's offer on stdin ─► UDP and TCP
//!                        punching ─► "path udp|tcp|none" ─► a SHA-256-checked transfer
//! ```
//!
//! `forward` is a TCP port forward over `fabric::session` and the mux, carried by a punched UDP
//! link whose keys come from a pre-shared word on the command line (benchmarks only: the real
//! keys come over Tox). `nat` does what a peer does to bring a punched path up, with the
//! offers passed through the test harness instead of Tox.
//!
//! `echo` and `rr` measure 1-byte request/response latency over any of these (or plain TCP,
//! or kcptun): `rr` sends one byte, waits for it to come back, repeats for `--secs`, and
//! prints `rr N p50_ms p99_ms`.
//!
//! `nat` prints, one per line: `offer HEX` (our `link::signal` offer), `path udp|tcp|none`,
//! then for `--send N` `sent SHA256` and for the receiving side `received BYTES SHA256`.

#![forbid(unsafe_code)]
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use fabric::connection::mux_config;
use fabric::link::signal::{Candidate, CandidateKind, LinkOffer, Protocol, Signal};
use fabric::link::{LinkKeys, LinkSecret};
use fabric::mux::io::Handle;
use fabric::punch::driver::{LinkEvent, TrySendError, UdpLink, stun_tcp, stun_udp};
use fabric::punch::stun::TransactionConfig;
use fabric::punch::tcp::{TcpPunchConfig, TlsIdentity, punch_tcp};
use fabric::punch::udp::{PunchConfig, UdpPunch};
use fabric::session::{self, ConvId, Event, Session};
use fabric::time::Instant;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// Session packets on a punched link: a 1,500-byte MTU less IPv4 and UDP headers (28), the
/// link's seal (25) and its type byte (1), rounded down.
const LINK_MTU: usize = 1440;

fn usage() -> ! {
    eprintln!(
        "usage:\n  punch-agent forward --psk WORD --side a|b --bind ADDR --peer ADDR \
         (--listen ADDR | --connect ADDR)\n  punch-agent nat --stun ADDR [--no-udp] [--no-tcp] \
         [--send BYTES] [--timeout SECS]\n  punch-agent echo --listen ADDR\n  \
         punch-agent rr --connect ADDR [--secs SECS]"
    );
    std::process::exit(2)
}

struct Args(Vec<String>);

impl Args {
    fn value(&self, name: &str) -> Option<&str> {
        let i = self.0.iter().position(|a| a == name)?;
        self.0.get(i + 1).map(String::as_str)
    }
    fn flag(&self, name: &str) -> bool {
        self.0.iter().any(|a| a == name)
    }
    fn parse<T: std::str::FromStr>(&self, name: &str) -> Result<Option<T>>
    where
        T::Err: std::fmt::Display,
    {
        self.value(name)
            .map(|v| v.parse().map_err(|e| anyhow::anyhow!("{name} {v}: {e}")))
            .transpose()
    }
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args(std::env::args().skip(1).collect());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match args.0.first().map(String::as_str) {
        Some("forward") => runtime.block_on(forward(&args)),
        Some("nat") => runtime.block_on(nat(&args)),
        Some("echo") => runtime.block_on(echo(&args)),
        Some("rr") => runtime.block_on(rr(&args)),
        _ => usage(),
    }
}

/// The session settings on a punched link: the default session with the link's MTU.
fn session_config() -> session::Config {
    let mut config = session::Config::default();
    config.mtu = LINK_MTU;
    config
}

// ---------------------------------------------------------------------------------------
// forward

fn psk_secret(psk: &str, side: &str) -> LinkSecret {
    let mut h = Sha256::new();
    h.update(b"punch-agent psk ");
    h.update(side.as_bytes());
    h.update(b" ");
    h.update(psk.as_bytes());
    LinkSecret::from_random(h.finalize().into())
}

async fn forward(args: &Args) -> Result<()> {
    let psk = args.value("--psk").unwrap_or_else(|| usage());
    let side = args.value("--side").unwrap_or_else(|| usage());
    let other = match side {
        "a" => "b",
        "b" => "a",
        _ => usage(),
    };
    let bind: SocketAddr = args.parse("--bind")?.unwrap_or_else(|| usage());
    let peer: SocketAddr = args.parse("--peer")?.unwrap_or_else(|| usage());
    let listen: Option<SocketAddr> = args.parse("--listen")?;
    let connect: Option<SocketAddr> = args.parse("--connect")?;
    if listen.is_some() == connect.is_some() {
        usage();
    }
    let keys = psk_secret(psk, side)
        .derive(psk_secret(psk, other).public())
        .context("psk keys")?;
    let socket = Arc::new(UdpSocket::bind(bind).await?);
    let (link, remote) = punch_udp(socket, keys, &[peer], Duration::from_secs(30)).await?;
    eprintln!("punch-agent: udp link to {remote}");
    let handle = Handle::new(mux_config());
    let mut driver = tokio::spawn(drive(link, handle.clone()));
    if let Some(listen) = listen {
        let listener = TcpListener::bind(listen).await?;
        println!("listening {}", listener.local_addr()?);
        loop {
            tokio::select! {
                r = listener.accept() => {
                    let (mut tcp, _) = r?;
                    let _ = tcp.set_nodelay(true);
                    let mut stream = handle.open()?;
                    tokio::spawn(async move {
                        let _ = tokio::io::copy_bidirectional(&mut tcp, &mut stream).await;
                    });
                }
                r = &mut driver => return r.context("driver")?,
            }
        }
    }
    let target = connect.unwrap_or_else(|| usage());
    println!("forwarding to {target}");
    let accept = async {
        while let Some(mut stream) = handle.accept().await {
            tokio::spawn(async move {
                if let Ok(mut tcp) = TcpStream::connect(target).await {
                    let _ = tcp.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut tcp, &mut stream).await;
                }
            });
        }
    };
    tokio::select! {
        () = accept => Ok(()),
        r = driver => r.context("driver")?,
    }
}

/// Punches towards `remotes` and waits for the pair to be agreed.
async fn punch_udp(
    socket: Arc<UdpSocket>,
    keys: LinkKeys,
    remotes: &[SocketAddr],
    timeout: Duration,
) -> Result<(UdpLink, SocketAddr)> {
    let config = PunchConfig {
        punch_timeout: timeout,
        ..PunchConfig::default()
    };
    let mut link = UdpLink::spawn(socket, UdpPunch::new(Instant::now(), keys, remotes, config));
    match link.next_event().await {
        Some(LinkEvent::Connected { remote }) => Ok((link, remote)),
        other => bail!("udp punching failed: {other:?}"),
    }
}

/// Runs one KCP session with the mux over a punched UDP link until either ends: the
/// session driver of `fabric::peer`, with a `UdpLink` in place of Tox.
async fn drive(mut link: UdpLink, mut handle: Handle) -> Result<()> {
    let mut session = Session::new(ConvId(1), session_config(), Instant::now());
    let mut scratch = Vec::new();
    let mut buf = Vec::new();
    let mut events = Vec::new();
    loop {
        let now = Instant::now();
        let blocked = feed(&mut session, &mut handle, now, &mut scratch);
        while session.poll_transmit(now, &mut buf).is_some() {
            loop {
                match link.try_send(&buf) {
                    Ok(()) => break,
                    // The socket buffer is full: wait rather than drop what the pacer sent.
                    Err(TrySendError::Full) => link.writable().await?,
                    Err(e) => {
                        tracing::debug!(error = %e, "session packet not sent");
                        break;
                    }
                }
            }
        }
        if let Some(Event::Closed { reason, .. }) = session.poll_event() {
            handle.fail(format!("session ended: {reason}"));
            bail!("session ended: {reason}");
        }
        let deadline = session
            .poll_timeout()
            .unwrap_or(now + Duration::from_secs(1));
        tokio::select! {
            n = link.next_events(&mut events, 512) => {
                if n == 0 {
                    handle.fail("link ended");
                    bail!("link ended");
                }
                let now = Instant::now();
                for event in events.drain(..) {
                    match event {
                        LinkEvent::Data(p) => { let _ = session.handle_input(now, &p); }
                        LinkEvent::Dead | LinkEvent::Failed => {
                            handle.fail("link died");
                            bail!("punched link died");
                        }
                        _ => {}
                    }
                }
                scratch.clear();
                if session.recv(&mut scratch) > 0 && handle.handle_input(&scratch).is_err() {
                    session.close(session::CloseReason::ProtocolError);
                }
            }
            r = handle.transmit_ready(), if !blocked => {
                if r.is_err() {
                    session.close(session::CloseReason::ProtocolError);
                }
            }
            () = tokio::time::sleep_until(deadline.into()) => {
                session.handle_timeout(Instant::now());
            }
        }
    }
}

/// Moves mux frames into the session as far as its pacer and window admit (what
/// `fabric::connection::feed` does inside the crate); returns whether frames wait.
fn feed(session: &mut Session, handle: &mut Handle, now: Instant, scratch: &mut Vec<u8>) -> bool {
    while handle.has_transmit() {
        let capacity = session.send_capacity(now);
        if capacity == 0 {
            return true;
        }
        scratch.clear();
        if handle.poll_transmit(capacity, scratch) == 0 || session.send(scratch).is_err() {
            break;
        }
    }
    false
}

// ---------------------------------------------------------------------------------------
// echo and rr

async fn echo(args: &Args) -> Result<()> {
    let listen: SocketAddr = args.parse("--listen")?.unwrap_or_else(|| usage());
    let listener = TcpListener::bind(listen).await?;
    println!("listening {}", listener.local_addr()?);
    loop {
        let (mut tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok(n) = tcp.read(&mut buf).await {
                if n == 0 || tcp.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
    }
}

async fn rr(args: &Args) -> Result<()> {
    let connect: SocketAddr = args.parse("--connect")?.unwrap_or_else(|| usage());
    let secs: u64 = args.parse("--secs")?.unwrap_or(5);
    let mut tcp = TcpStream::connect(connect).await?;
    tcp.set_nodelay(true)?;
    let mut samples = Vec::new();
    let end = Instant::now() + Duration::from_secs(secs);
    let mut byte = [0u8; 1];
    while Instant::now() < end {
        let start = Instant::now();
        tcp.write_all(b"x").await?;
        tokio::time::timeout(Duration::from_secs(10), tcp.read_exact(&mut byte))
            .await
            .context("no answer within 10 s")??;
        samples.push(start.elapsed());
    }
    if samples.is_empty() {
        bail!("no round trips");
    }
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    println!(
        "rr {} {:.3} {:.3}",
        samples.len(),
        at(0.5).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// nat

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Result<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        bail!("odd hex length");
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).context("bad hex"))
        .collect()
}

/// The address of the interface that routes to `server`.
async fn host_ip(server: SocketAddr) -> Result<IpAddr> {
    let probe = UdpSocket::bind("0.0.0.0:0").await?;
    probe.connect(server).await?;
    Ok(probe.local_addr()?.ip())
}

fn data_byte(i: usize) -> u8 {
    // Not constant, so a misplaced or repeated chunk changes the digest.
    (i.wrapping_mul(2_654_435_761) >> 13) as u8
}

async fn nat(args: &Args) -> Result<()> {
    let stun: SocketAddr = args.parse("--stun")?.unwrap_or_else(|| usage());
    let use_udp = !args.flag("--no-udp");
    let use_tcp = !args.flag("--no-tcp");
    let send: Option<usize> = args.parse("--send")?;
    let timeout = Duration::from_secs(args.parse("--timeout")?.unwrap_or(10));
    let host = host_ip(stun).await?;
    // A STUN server on the test network answers in microseconds: give up after about 2 s
    // (where UDP is blocked) rather than RFC 8489's 39.5 s.
    let stun_config = TransactionConfig {
        rto: Duration::from_millis(200),
        max_sends: 3,
        rm: 4,
        reliable_timeout: Duration::from_secs(3),
    };

    // Candidates: host and server-reflexive, UDP and TCP.
    let socket = Arc::new(UdpSocket::bind((host, 0)).await?);
    let mut candidates = Vec::new();
    let udp_port = socket.local_addr()?.port();
    candidates.push(Candidate {
        kind: CandidateKind::Host,
        protocol: Protocol::Udp,
        addr: SocketAddr::new(host, udp_port),
    });
    if use_udp {
        match stun_udp(&socket, stun, stun_config).await {
            Ok(mapped) => candidates.push(Candidate {
                kind: CandidateKind::ServerReflexive,
                protocol: Protocol::Udp,
                addr: mapped,
            }),
            Err(e) => eprintln!("punch-agent: stun over udp: {e}"),
        }
    }
    let mut tcp_local = SocketAddr::new(host, 0);
    if use_tcp {
        match stun_tcp(tcp_local, stun, stun_config).await {
            Ok((local, mapped)) => {
                tcp_local = local;
                candidates.push(Candidate {
                    kind: CandidateKind::Host,
                    protocol: Protocol::Tcp,
                    addr: local,
                });
                candidates.push(Candidate {
                    kind: CandidateKind::ServerReflexive,
                    protocol: Protocol::Tcp,
                    addr: mapped,
                });
            }
            Err(e) => eprintln!("punch-agent: stun over tcp: {e}"),
        }
    }
    for c in &candidates {
        eprintln!(
            "punch-agent: candidate {:?} {:?} {}",
            c.protocol, c.kind, c.addr
        );
    }

    // The offer exchange (over Tox in proxy; through our stdin and stdout here).
    let secret = LinkSecret::from_random(rand::random());
    let identity = TlsIdentity::generate()?;
    let offer = Signal::Offer(LinkOffer {
        offer_id: rand::random(),
        x25519_public: secret.public(),
        tls_fingerprint: Some(identity.fingerprint()),
        candidates,
    });
    let mut wire = Vec::new();
    offer.emit(&mut wire)?;
    println!("offer {}", hex(&wire));
    // std's stdin on a blocking thread: tokio's needs a feature the workspace leaves off.
    let line = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).map(|_| line)
    })
    .await??;
    let line = line.trim_end();
    let body = line
        .strip_prefix("offer ")
        .context("expected `offer HEX`")?;
    let Signal::Offer(peer) = Signal::parse(&unhex(body)?)? else {
        bail!("expected an offer");
    };
    let keys = secret.derive(peer.x25519_public)?;
    let controlling = keys.controlling();
    let remotes = |p: Protocol| -> Vec<SocketAddr> {
        peer.candidates
            .iter()
            .filter(|c| c.protocol == p)
            .map(|c| c.addr)
            .collect()
    };

    // UDP first, TCP at the same time; UDP wins when both come up.
    let tcp = async {
        let fingerprint = peer.tls_fingerprint.context("peer offers no tcp")?;
        let remotes = remotes(Protocol::Tcp);
        if !use_tcp || remotes.is_empty() {
            bail!("no tcp candidates");
        }
        let config = TcpPunchConfig {
            punch_timeout: timeout,
            ..TcpPunchConfig::default()
        };
        Ok(punch_tcp(
            tcp_local,
            &remotes,
            controlling,
            &identity,
            fingerprint,
            config,
        )
        .await?)
    };
    let udp = async {
        let remotes = remotes(Protocol::Udp);
        if !use_udp || remotes.is_empty() {
            bail!("no udp candidates");
        }
        punch_udp(socket, keys, &remotes, timeout).await
    };
    let (udp, tcp) = tokio::join!(udp, tcp);
    match (udp, tcp) {
        (Ok((link, remote)), _) => {
            println!("path udp {remote}");
            transfer_udp(link, send).await
        }
        (Err(ue), Ok(stream)) => {
            eprintln!("punch-agent: {ue:#}");
            println!("path tcp");
            transfer_tcp(stream, send).await
        }
        (Err(ue), Err(te)) => {
            eprintln!("punch-agent: {ue:#}; tcp: {te:#}");
            println!("path none");
            Ok(())
        }
    }
}

/// Sends `send` bytes over a mux stream on the link, or receives one stream; prints the
/// digest either way.
async fn transfer_udp(link: UdpLink, send: Option<usize>) -> Result<()> {
    let handle = Handle::new(mux_config());
    let driver = tokio::spawn(drive(link, handle.clone()));
    let work = async {
        match send {
            Some(n) => {
                let mut stream = handle.open()?;
                let digest = write_data(&mut stream, n).await?;
                // Wait for the receiver's answer, so the session outlives our last bytes.
                let mut ack = Vec::new();
                stream.read_to_end(&mut ack).await?;
                println!("sent {digest}");
            }
            None => {
                let mut stream = handle.accept().await.context("no stream")?;
                let (n, digest) = read_data(&mut stream).await?;
                stream.write_all(b"ok").await?;
                stream.shutdown().await?;
                println!("received {n} {digest}");
                // Give the answer time to leave before the session goes away.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        anyhow::Ok(())
    };
    tokio::select! {
        r = work => r,
        r = driver => r.context("driver")?,
    }
}

async fn transfer_tcp(
    mut stream: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    send: Option<usize>,
) -> Result<()> {
    match send {
        Some(n) => {
            let digest = write_data(&mut stream, n).await?;
            let mut ack = Vec::new();
            stream.read_to_end(&mut ack).await?;
            println!("sent {digest}");
        }
        None => {
            let (n, digest) = read_data(&mut stream).await?;
            stream.write_all(b"ok").await?;
            stream.shutdown().await?;
            println!("received {n} {digest}");
        }
    }
    Ok(())
}

async fn write_data(stream: &mut (impl AsyncWriteExt + Unpin), n: usize) -> Result<String> {
    let mut hash = Sha256::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut done = 0;
    while done < n {
        let len = chunk.len().min(n - done);
        for (i, b) in chunk[..len].iter_mut().enumerate() {
            *b = data_byte(done + i);
        }
        hash.update(&chunk[..len]);
        stream.write_all(&chunk[..len]).await?;
        done += len;
    }
    stream.shutdown().await?;
    Ok(hex(&hash.finalize()))
}

async fn read_data(stream: &mut (impl AsyncReadExt + Unpin)) -> Result<(usize, String)> {
    let mut hash = Sha256::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut n = 0;
    loop {
        let got = stream.read(&mut chunk).await?;
        if got == 0 {
            break;
        }
        hash.update(&chunk[..got]);
        n += got;
    }
    Ok((n, hex(&hash.finalize())))
}
