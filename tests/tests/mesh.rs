//! Mesh sessions over a private Tox network (tox-bootstrapd daemons on 127.0.0.1): two nodes
//! that each dial the other hold one session, whoever's Open wins, and both open streams on
//! it at once.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use fabric::path::PathChoice;
use fabric::peer::{Fabric, FabricConfig};
use tests::init_tracing;
use tests::streams::{join_all, send_and_verify, serve_digests};
use tests::toxnet::ToxNet;
use tokio::time::timeout;

/// A fabric on the private network that allows `peers` and stays on Tox (this is about the
/// sessions, not the paths).
fn node(net: &ToxNet, name: &str, peers: &[fabric::id::PublicKey]) -> Result<Fabric> {
    let mut tox = net.config(net.scratch_dir(name)?);
    tox.allow.keys.extend(peers.iter().copied());
    let mut config = FabricConfig::new(tox);
    config.path.choice = PathChoice::Tox;
    Ok(Fabric::start(config)?)
}

/// Both nodes dial each other at the same moment, again and again (each round a fresh
/// pair): the Opens cross, and the tie-break leaves one session that both ends use; streams
/// opened from both ends at once never collide.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_that_dial_each_other_at_once_hold_one_session() -> Result<()> {
    init_tracing();
    let net = ToxNet::start(4).context("private tox network")?;
    for round in 0..3 {
        let a_dir = net.scratch_dir(&format!("a{round}"))?;
        let b_dir = net.scratch_dir(&format!("b{round}"))?;
        // The identities first, so each can allow the other from its start.
        let a_id = fabric::tox::ToxNode::identity(&a_dir)?;
        let b_id = fabric::tox::ToxNode::identity(&b_dir)?;
        let a = Arc::new(node_in(&net, &a_dir, b_id.public_key())?);
        let b = Arc::new(node_in(&net, &b_dir, a_id.public_key())?);
        serve_digests(a.clone());
        serve_digests(b.clone());
        let (to_b, to_a) = timeout(
            Duration::from_secs(120),
            futures_join(a.connect(b_id), b.connect(a_id)),
        )
        .await
        .context("the sessions did not come up in 120 s")?;
        let (to_b, to_a) = (Arc::new(to_b?), Arc::new(to_a?));
        // Streams both ways at once, several each: they carry what they should, so the
        // session is one and its ids do not collide.
        let transfers = (0..4u64).flat_map(|i| {
            let (to_b, to_a) = (to_b.clone(), to_a.clone());
            [
                tokio::spawn(async move { send_and_verify(&to_b, 64 << 10, i).await }),
                tokio::spawn(async move { send_and_verify(&to_a, 64 << 10, 100 + i).await }),
            ]
        });
        for t in transfers.collect::<Vec<_>>() {
            timeout(Duration::from_secs(60), t)
                .await
                .context("a stream took over 60 s")???;
        }
        let (sa, sb) = (to_b.status(), to_a.status());
        ensure!(sa.conv.is_some(), "round {round}: a has no session");
        ensure!(
            sa.conv == sb.conv,
            "round {round}: two sessions ({:?} at a, {:?} at b)",
            sa.conv,
            sb.conv
        );
        ensure!(
            sa.last_end.is_none() && sb.last_end.is_none(),
            "round {round}: a session was replaced (a: {:?}, b: {:?})",
            sa.last_end,
            sb.last_end
        );
        a.shutdown().await;
        b.shutdown().await;
    }
    Ok(())
}

fn node_in(net: &ToxNet, dir: &std::path::Path, peer: fabric::id::PublicKey) -> Result<Fabric> {
    let mut tox = net.config(dir);
    tox.allow.keys.insert(peer);
    let mut config = FabricConfig::new(tox);
    config.path.choice = PathChoice::Tox;
    Ok(Fabric::start(config)?)
}

/// Both futures, polled together.
async fn futures_join<A: Future, B: Future>(a: A, b: B) -> (A::Output, B::Output) {
    tokio::join!(a, b)
}

/// A node that only answers (it dials nobody) still opens streams to a peer that dialed it:
/// the session is symmetric.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_that_answered_opens_streams_too() -> Result<()> {
    init_tracing();
    let net = ToxNet::start(4).context("private tox network")?;
    let dialer = Arc::new(node(&net, "dialer", &[])?);
    let answerer = Arc::new(node(&net, "answerer", &[dialer.id().public_key()])?);
    serve_digests(dialer.clone());
    serve_digests(answerer.clone());
    let to_answerer = timeout(Duration::from_secs(120), dialer.connect(answerer.id()))
        .await
        .context("no session in 120 s")??;
    send_and_verify(&to_answerer, 64 << 10, 1).await?;
    // The answerer reaches the dialer on the same session: connect finds it running.
    let to_dialer = timeout(Duration::from_secs(30), answerer.connect(dialer.id()))
        .await
        .context("connect on a running session took over 30 s")??;
    ensure!(
        to_dialer.status().conv == to_answerer.status().conv,
        "connect opened a second session"
    );
    let to_dialer = Arc::new(to_dialer);
    let results = join_all((0..4u64).map(|i| {
        let to_dialer = to_dialer.clone();
        async move { send_and_verify(&to_dialer, 64 << 10, 10 + i).await }
    }))
    .await;
    for r in results {
        r?;
    }
    ensure!(
        to_answerer.status().last_end.is_none(),
        "the session was replaced"
    );
    Ok(())
}
