//! The whole fabric over a private Tox network (tox-bootstrapd daemons on 127.0.0.1): a
//! client dials an exit by Tox ID, streams carry tens of megabytes verified by SHA-256, an
//! exit refuses clients it does not allow, and a restarted exit is found again by itself.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use fabric::path::PathChoice;
use fabric::peer::{ConnectError, Fabric, FabricConfig};
use fabric::session::CloseReason;
use tests::init_tracing;
use tests::streams::{join_all, send_and_verify, serve_digests};
use tests::toxnet::ToxNet;
use tokio::time::timeout;

/// A fabric that stays on Tox (these tests are about the Tox path; `fabric_paths` punches).
fn tox_only(tox: fabric::tox::ToxConfig) -> FabricConfig {
    let mut config = FabricConfig::new(tox);
    config.path.choice = PathChoice::Tox;
    config
}

fn fabric(net: &ToxNet, name: &str, allow: &[&Fabric]) -> Result<Fabric> {
    let mut tox = net.config(net.scratch_dir(name)?);
    for peer in allow {
        tox.allow.keys.insert(peer.id().public_key());
    }
    Ok(Fabric::start(tox_only(tox))?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_over_tox_carry_tens_of_megabytes_intact() -> Result<()> {
    init_tracing();
    let net = ToxNet::start(4).context("private tox network")?;
    let client = fabric(&net, "client", &[])?;
    let exit = std::sync::Arc::new(fabric(&net, "exit", &[&client])?);
    serve_digests(exit.clone());
    let started = std::time::Instant::now();
    let peer = std::sync::Arc::new(client.connect(exit.id()).await.context("connect")?);
    tracing::info!(after = ?started.elapsed(), "session up");
    // Eight concurrent streams of 4 MiB: 32 MiB in all.
    let transfers = (0..8u64).map(|i| {
        let peer = peer.clone();
        async move { send_and_verify(&peer, 4 << 20, i).await }
    });
    let results = timeout(Duration::from_secs(240), join_all(transfers))
        .await
        .context("transfers took over 240 s")?;
    for r in results {
        r?;
    }
    let status = peer.status();
    tracing::info!(after = ?started.elapsed(), ?status, "all streams verified");
    ensure!(status.conv.is_some(), "status shows the session");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exit_refuses_a_client_it_does_not_allow() -> Result<()> {
    init_tracing();
    let net = ToxNet::start(4).context("private tox network")?;
    let stranger = fabric(&net, "stranger", &[])?;
    let exit = fabric(&net, "exit", &[])?;
    let mut config = tox_only(net.config(net.scratch_dir("stranger2")?));
    config.connect_timeout = Duration::from_secs(20);
    drop(stranger);
    let stranger = Fabric::start(config)?;
    match stranger.connect(exit.id()).await {
        Err(ConnectError::TimedOut(_)) | Err(ConnectError::Rejected(_)) => Ok(()),
        Ok(_) => bail!("a stranger got a session"),
        Err(other) => bail!("unexpected error: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_exit_is_found_again_and_new_streams_work() -> Result<()> {
    init_tracing();
    let net = ToxNet::start(4).context("private tox network")?;
    let client = fabric(&net, "client", &[])?;
    let exit_dir = net.scratch_dir("exit")?;
    let start_exit = |dir: &std::path::Path| -> Result<std::sync::Arc<Fabric>> {
        let mut tox = net.config(dir);
        tox.allow.keys.insert(client.id().public_key());
        let exit = std::sync::Arc::new(Fabric::start(tox_only(tox))?);
        serve_digests(exit.clone());
        Ok(exit)
    };
    let exit = start_exit(&exit_dir)?;
    let exit_id = exit.id();
    let peer = client.connect(exit_id).await.context("connect")?;
    send_and_verify(&peer, 256 << 10, 1)
        .await
        .context("before restart")?;
    let first_conv = peer.status().conv;

    let mut changes = client.session_changes();
    exit.shutdown().await;
    drop(exit);
    // The exit said it was going: the client's session ends on its word, not at the answer
    // timeout.
    timeout(
        Duration::from_secs(60),
        changes.wait_for(|_| peer.status().last_end.is_some()),
    )
    .await
    .context("the client's session never ended")??;
    assert_eq!(
        peer.status().last_end,
        Some((CloseReason::Shutdown, true)),
        "the session ended for another reason"
    );
    let exit = start_exit(&exit_dir)?;
    assert_eq!(exit.id(), exit_id, "same identity after restart");

    // The client notices and reconnects by itself; new streams then work.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        if peer.is_connected() && peer.status().conv != first_conv {
            match timeout(
                Duration::from_secs(20),
                send_and_verify(&peer, 256 << 10, 2),
            )
            .await
            {
                Ok(Ok(())) => break,
                Ok(Err(e)) => tracing::info!(%e, "not yet"),
                Err(_) => tracing::info!("stream timed out, retrying"),
            }
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "client did not reconnect within 120 s"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(())
}
