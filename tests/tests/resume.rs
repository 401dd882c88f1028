//! Resuming without Tox: two fabrics that met once over a private Tox network remember where
//! each other's direct socket answered (the peer cache in the data dir), and a restarted
//! client opens its session there in one round trip, even when Tox cannot come online at
//! all. A stale cache costs nothing: the session comes over Tox as before.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use fabric::id::PublicKey;
use fabric::path::ActivePath;
use fabric::peer::{Fabric, FabricConfig};
use tests::init_tracing;
use tests::streams::{send_and_verify, serve_digests};
use tests::toxnet::ToxNet;
use tokio::time::timeout;

fn exit_config(net: &ToxNet, dir: &Path, client: PublicKey) -> FabricConfig {
    let mut tox = net.config(dir);
    tox.allow.keys.insert(client);
    FabricConfig::new(tox)
}

/// The hex form the cache file names a peer by.
fn hex(pk: &PublicKey) -> String {
    pk.0.iter().map(|b| format!("{b:02x}")).collect()
}

/// Waits until the cache in `dir` names `pk` (both sides write it once a probe is answered).
async fn cached(dir: &Path, pk: &PublicKey) -> Result<String> {
    let want = format!("peer {}", hex(pk));
    let file = dir.join("peers.cache");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(text) = std::fs::read_to_string(&file)
            && text.contains(&want)
        {
            return Ok(text);
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "{} never named the peer",
            file.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_client_resumes_directly_without_tox() -> Result<()> {
    init_tracing();
    let net = ToxNet::start(4).context("private tox network")?;
    let client_dir = net.scratch_dir("client")?;
    let client = Fabric::start(FabricConfig::new(net.config(&client_dir)))?;
    let client_pk = client.id().public_key();
    let exit_dir = net.scratch_dir("exit")?;
    let exit = Arc::new(Fabric::start(exit_config(&net, &exit_dir, client_pk))?);
    serve_digests(exit.clone());
    let exit_id = exit.id();

    // First contact: over Tox, and the two learn each other's direct endpoints.
    let peer = client.connect(exit_id).await.context("first connect")?;
    send_and_verify(&peer, 64 << 10, 1)
        .await
        .context("first stream")?;
    let text = cached(&client_dir, &exit_id.public_key()).await?;
    cached(&exit_dir, &client_pk).await?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(client_dir.join("peers.cache"))?
            .permissions()
            .mode();
        ensure!(
            mode & 0o077 == 0,
            "the cache is readable by others: {mode:o}"
        );
    }
    let port_line = text
        .lines()
        .find(|l| l.starts_with("port "))
        .context("no port line")?
        .to_owned();
    drop(peer);
    client.shutdown().await;
    drop(client);

    // The client again, with no way onto Tox at all (no bootstrap node): only the cache
    // can bring the session up.
    let mut tox = net.config(&client_dir);
    tox.bootstrap.clear();
    let client = Fabric::start(FabricConfig::new(tox))?;
    let started = std::time::Instant::now();
    let peer = timeout(Duration::from_secs(30), client.connect(exit_id))
        .await
        .context("resume took over 30 s")?
        .context("resume")?;
    let resumed_after = started.elapsed();
    send_and_verify(&peer, 256 << 10, 2)
        .await
        .context("stream after resume")?;
    tracing::info!(?resumed_after, "resumed without tox");
    let status = peer.status();
    ensure!(!status.online, "tox came online: the test proves nothing");
    ensure!(
        status.link.active == ActivePath::Udp,
        "the session is not on the direct link: {:?}",
        status.link
    );
    // The direct socket is back on the port of the last run.
    let text = std::fs::read_to_string(client_dir.join("peers.cache"))?;
    ensure!(text.contains(&port_line), "port moved: {text}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_cache_falls_back_to_tox() -> Result<()> {
    init_tracing();
    let net = ToxNet::start(4).context("private tox network")?;
    let client_dir = net.scratch_dir("client")?;
    let exit_dir = net.scratch_dir("exit")?;
    let client = Fabric::start(FabricConfig::new(net.config(&client_dir)))?;
    let exit = Arc::new(Fabric::start(exit_config(
        &net,
        &exit_dir,
        client.id().public_key(),
    ))?);
    serve_digests(exit.clone());
    let exit_id = exit.id();
    client.shutdown().await;
    drop(client);
    // The exit "moved": the cache names a port where nothing answers.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let cache = format!(
        "port 1\npeer {} 1 {}\n",
        hex(&exit_id.public_key()),
        silent.local_addr()?
    );
    std::fs::write(client_dir.join("peers.cache"), cache)?;
    let client = Fabric::start(FabricConfig::new(net.config(&client_dir)))?;
    let peer = timeout(Duration::from_secs(90), client.connect(exit_id))
        .await
        .context("connect took over 90 s")?
        .context("connect")?;
    send_and_verify(&peer, 64 << 10, 3).await?;
    ensure!(peer.status().online, "the session came without tox?");
    Ok(())
}
