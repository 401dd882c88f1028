//! A live session moving between paths: it starts on Tox (private network on 127.0.0.1), moves
//! to a punched UDP link, to punched TCP while the UDP link loses most packets, keeps going
//! (Tox carrying copies) when that TCP link is reset and punched again, and back to UDP when it
//! recovers, falls back to punched TCP and then to Tox as nftables blackholes each link, and
//! punches UDP again once it is allowed, while streams verified by SHA-256 keep
//! flowing through every move. `--path` choices that force one path are honoured.
//!
//! Both peers run in this process, so their candidates are this machine's own addresses:
//! punching works as between two hosts on one LAN. The NAT matrix (`nat_matrix`) covers the
//! rest.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use fabric::path::{ActivePath, PathChoice, PathStatus};
use fabric::peer::{Fabric, FabricConfig, Peer, PeerStatus};
use tests::init_tracing;
use tests::netns;
use tests::streams::{join_all, send_and_verify, serve_digests};
use tests::toxnet::ToxNet;
use tokio::time::timeout;

fn fabric(net: &ToxNet, name: &str, choice: PathChoice, allow: &[&Fabric]) -> Result<Fabric> {
    let mut tox = net.config(net.scratch_dir(name)?);
    for peer in allow {
        tox.allow.keys.insert(peer.id().public_key());
    }
    let mut config = FabricConfig::new(tox);
    config.path.choice = choice;
    // Keepalives every half second (2 s by default) so that a lossy link's measured loss
    // builds up, and clears, within seconds.
    config.path.punch.keepalive_interval = Duration::from_millis(500);
    Ok(Fabric::start(config)?)
}

/// The exit's view of its only client.
fn exit_view(exit: &Fabric) -> Option<PeerStatus> {
    exit.peers()
        .into_iter()
        .map(|(_, st)| st)
        .find(|st| st.conv.is_some())
}

/// Waits until both sides send on `want` (checking their status every 50 ms, at most
/// `limit`), returning how long that took and the client's path status at that moment: what
/// is asserted about the move is what the client said then, not after the streams finished.
async fn wait_for_path(
    peer: &Peer,
    exit: &Fabric,
    want: ActivePath,
    limit: Duration,
) -> Result<(Duration, PathStatus)> {
    let started = Instant::now();
    loop {
        let client = peer.status().link;
        let exit_side = exit_view(exit).map(|s| s.link);
        if client.active == want && exit_side.as_ref().is_some_and(|l| l.active == want) {
            return Ok((started.elapsed(), client));
        }
        if started.elapsed() > limit {
            bail!("not on {want} after {limit:?}: client {client:?}, exit {exit_side:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Streams of `len` bytes, `parallel` at a time, until `until` resolves; all must verify.
async fn traffic_during<T, F: Future<Output = Result<T>>>(
    peer: &Arc<Peer>,
    seed: u64,
    until: F,
) -> Result<T> {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // How long each 512 KiB stream took, logged (not asserted: timing is the bench's
    // business): the longest less the median is how long the move stalled the streams.
    let times = Arc::new(std::sync::Mutex::new(Vec::new()));
    let workers = (0..4u64).map(|w| {
        let (peer, stop, times) = (peer.clone(), stop.clone(), times.clone());
        async move {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let started = Instant::now();
                send_and_verify(&peer, 512 << 10, seed * 1000 + w * 100 + n)
                    .await
                    .with_context(|| format!("worker {w}, stream {n}"))?;
                times
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(started.elapsed());
                n += 1;
            }
            Ok(())
        }
    });
    let workers = tokio::spawn(join_all(workers.collect::<Vec<_>>().into_iter()));
    let result = until.await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in timeout(Duration::from_secs(120), workers)
        .await
        .context("streams did not finish within 120 s of the move")??
    {
        r?;
    }
    let mut times = std::mem::take(&mut *times.lock().unwrap_or_else(|e| e.into_inner()));
    times.sort();
    if let (Some(median), Some(longest)) = (times.get(times.len() / 2), times.last()) {
        let stall = longest.saturating_sub(*median);
        tracing::info!(
            streams = times.len(),
            ?median,
            ?longest,
            ?stall,
            "streams during this phase"
        );
    }
    result
}

/// Streams run (seeded by `seed`) until both sides send on `want`, at most `limit_secs`;
/// how long the move took, and the client's path status when it was done.
async fn moved(
    peer: &Arc<Peer>,
    exit: &Fabric,
    seed: u64,
    want: ActivePath,
    limit_secs: u64,
) -> Result<(Duration, PathStatus)> {
    let limit = Duration::from_secs(limit_secs);
    traffic_during(peer, seed, wait_for_path(peer, exit, want, limit)).await
}

/// An nftables table that drops one protocol to the given ports; removed on drop.
struct Blackhole {
    table: String,
}

impl Blackhole {
    /// Drops every packet, sent or received.
    fn new(tag: &str, protocol: &str, ports: &[u16]) -> Result<Self> {
        Self::install(tag, protocol, ports, &["input", "output"], "drop")
    }

    /// Answers every TCP segment to the ports with a reset, as they arrive: connections
    /// there die at once, and new ones cannot be made.
    fn reset(tag: &str, ports: &[u16]) -> Result<Self> {
        // Not the resets themselves: on loopback they pass the same rule on their way back.
        Self::install(
            tag,
            "tcp",
            ports,
            &["input"],
            "tcp flags & rst == 0 reject with tcp reset",
        )
    }

    /// Drops `percent` % of the packets as they arrive (once per direction on loopback).
    fn lossy(tag: &str, protocol: &str, ports: &[u16], percent: u8) -> Result<Self> {
        let verdict = format!("numgen random mod 100 < {percent} drop");
        Self::install(tag, protocol, ports, &["input"], &verdict)
    }

    fn install(
        tag: &str,
        protocol: &str,
        ports: &[u16],
        hooks: &[&str],
        verdict: &str,
    ) -> Result<Self> {
        let table = format!("fabricpaths{}{tag}", std::process::id());
        let ports = ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let chains: String = hooks
            .iter()
            .map(|hook| {
                format!(
                    " chain {hook} {{ type filter hook {hook} priority -10; \
                     {protocol} dport {{ {ports} }} {verdict}\n }}\n"
                )
            })
            .collect();
        let script = format!("table inet {table} {{\n{chains}}}\n");
        let path = std::env::temp_dir().join(format!("{table}.nft"));
        std::fs::write(&path, script)?;
        let out = netns::sh(&["nft", "-f", &path.display().to_string()]);
        let _ = std::fs::remove_file(&path);
        out?;
        Ok(Self { table })
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        let _ = netns::sh(&["nft", "delete", "table", "inet", &self.table]);
    }
}

fn ports(peer: &Peer, exit: &Fabric) -> Result<Vec<u16>> {
    let a = peer.status().link.remote;
    let b = exit_view(exit).and_then(|s| s.link.remote);
    match (a, b) {
        (Some(a), Some(b)) => Ok(vec![SocketAddr::port(&a), b.port()]),
        _ => bail!("no remote on the punched path: {a:?} {b:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_session_moves_between_punched_links_and_tox_without_losing_a_byte() -> Result<()> {
    init_tracing();
    if let Some(why) = netns::unavailable() {
        eprintln!("skipped: {why}");
        return Ok(());
    }
    let net = ToxNet::start(4).context("private tox network")?;
    let client = fabric(&net, "client", PathChoice::Auto, &[])?;
    let exit = Arc::new(fabric(&net, "exit", PathChoice::Auto, &[&client])?);
    serve_digests(exit.clone());
    let peer = Arc::new(client.connect(exit.id()).await.context("connect")?);
    // Streams start while the session is still on Tox and keep going through the move.
    let (took, _) = moved(&peer, &exit, 1, ActivePath::Udp, 30)
        .await
        .context("tox → udp")?;
    tracing::info!(?took, "session moved to punched udp");
    let conv = peer.status().conv;

    // A UDP link that loses most of its packets (60 % each way: UDP throttled) yields to the
    // TCP link punched beside it, once its keepalives show it, and takes over again when the
    // loss is gone.
    let lossy = Blackhole::lossy("l", "udp", &ports(&peer, &exit)?, 60)?;
    let (took, link) = moved(&peer, &exit, 5, ActivePath::Tcp, 30)
        .await
        .context("lossy udp → tcp")?;
    tracing::info!(?took, loss = ?link.loss, "session left the lossy udp link");
    ensure!(
        link.why.contains("loses half its keepalives"),
        "moved to tcp for another reason: {link:?}"
    );

    // The TCP link is reset while the UDP link is still lossy (review B3: the session then
    // stayed on the lossy link alone, and TCP was punched again only when the whole round
    // ended, which it never did). Now Tox carries copies beside the lossy link, and TCP is
    // punched again within the round: once the resets stop, the session is back on TCP.
    let tcp_remote = link.remote;
    let reset = Blackhole::reset("r", &ports(&peer, &exit)?)?;
    let (took, link) = moved(&peer, &exit, 7, ActivePath::Udp, 30)
        .await
        .context("tcp reset → lossy udp with tox copies")?;
    tracing::info!(?took, "tcp link reset, lossy udp with tox copies");
    ensure!(
        link.why.contains("tox carries copies"),
        "on the lossy udp link without tox copies: {link:?}"
    );
    drop(reset);
    let (took, link) = moved(&peer, &exit, 8, ActivePath::Tcp, 60)
        .await
        .context("tcp punched again within the round")?;
    tracing::info!(?took, "session on the tcp link punched again");
    ensure!(
        link.why.contains("loses half its keepalives"),
        "back on tcp for another reason: {link:?}"
    );
    // A new offer would have gathered new ports (the address may be another of the peer's
    // candidates: several of this machine's own).
    ensure!(
        link.remote.map(|r| r.port()) == tcp_remote.map(|r| r.port()),
        "the new tcp link is not between the round's ports: {tcp_remote:?} → {link:?}"
    );
    drop(lossy);
    let (took, _) = moved(&peer, &exit, 6, ActivePath::Udp, 30)
        .await
        .context("udp recovered → udp")?;
    tracing::info!(?took, "session back on the recovered udp link");

    // Blackhole the UDP link: the session goes to the TCP link punched beside it.
    let udp = Blackhole::new("u", "udp", &ports(&peer, &exit)?)?;
    let (took, _) = moved(&peer, &exit, 2, ActivePath::Tcp, 30)
        .await
        .context("udp → tcp")?;
    tracing::info!(?took, "session fell back to punched tcp");

    // Blackhole the TCP link too: back to Tox.
    let tcp = Blackhole::new("t", "tcp", &ports(&peer, &exit)?)?;
    let (took, _) = moved(&peer, &exit, 3, ActivePath::Tox, 30)
        .await
        .context("tcp → tox")?;
    tracing::info!(?took, "session fell back to tox");

    // Lift the blackholes: the client punches again (new ports) and the session returns to UDP.
    drop((udp, tcp));
    let (took, _) = moved(&peer, &exit, 4, ActivePath::Udp, 60)
        .await
        .context("tox → udp again")?;
    tracing::info!(?took, "session back on punched udp");
    ensure!(
        peer.status().conv == conv,
        "the conv survived every move: {:?} → {:?}",
        conv,
        peer.status().conv
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_paths_are_honoured() -> Result<()> {
    init_tracing();
    for (choice, want) in [
        (PathChoice::Tcp, ActivePath::Tcp),
        (PathChoice::Tox, ActivePath::Tox),
    ] {
        let net = ToxNet::start(4).context("private tox network")?;
        let client = fabric(&net, &format!("client-{choice}"), choice, &[])?;
        let exit = Arc::new(fabric(&net, &format!("exit-{choice}"), choice, &[&client])?);
        serve_digests(exit.clone());
        let peer = client.connect(exit.id()).await.context("connect")?;
        wait_for_path(&peer, &exit, want, Duration::from_secs(30)).await?;
        send_and_verify(&peer, 4 << 20, 7).await?;
        let status = peer.status();
        ensure!(status.link.active == want, "{choice}: {status:?}");
        if choice == PathChoice::Tox {
            ensure!(status.link.why.is_empty(), "--path tox never punches");
        }
        exit.shutdown().await;
        client.shutdown().await;
    }
    Ok(())
}
