//! Pairing at the fabric's level, over a private Tox network (tox-bootstrapd daemons on
//! 127.0.0.1): a node that allows nobody hands an invitation's ticket to a joiner; the
//! joiner's friend request carries the proof; the inviter's application checks it and
//! allows the joiner, whose session then comes up. A forged proof for the same invitation
//! (the invitation's id is no secret) is checked, refused, and never gets a session.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use fabric::pairing::{JoinRequest, SECRET_LEN, Secret, Ticket};
use fabric::path::PathChoice;
use fabric::peer::{ConnectError, Fabric, FabricConfig};
use tests::init_tracing;
use tests::streams::{send_and_verify, serve_digests};
use tests::toxnet::ToxNet;
use tokio::time::timeout;

fn node(net: &ToxNet, name: &str, connect_timeout: Duration) -> Result<Fabric> {
    let mut config = FabricConfig::new(net.config(net.scratch_dir(name)?));
    config.path.choice = PathChoice::Tox;
    config.connect_timeout = connect_timeout;
    Ok(Fabric::start(config)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_proof_is_allowed_and_a_forged_one_never_gets_a_session() -> Result<()> {
    init_tracing();
    let net = ToxNet::start(4).context("private tox network")?;
    let inviter = Arc::new(node(&net, "inviter", Duration::from_secs(60))?);
    serve_digests(inviter.clone());
    let secret = Secret(rand::random::<[u8; SECRET_LEN]>());
    let ticket = Ticket {
        inviter: inviter.id(),
        secret: secret.clone(),
        expires: u64::MAX,
        name: Some("nas".parse()?),
        endpoints: Vec::new(),
    }
    .encode();

    // The joiner has the ticket; the forger knows the invitation's id but not the secret.
    let joiner = node(&net, "joiner", Duration::from_secs(120))?;
    let forger = node(&net, "forger", Duration::from_secs(20))?;
    let parsed = Ticket::parse(&ticket)?;
    let request = JoinRequest::new(&parsed, &joiner.id(), Some("laptop".parse()?));
    joiner
        .tox()
        .add_friend(parsed.inviter, request.encode().as_bytes())
        .await?;
    let forged = JoinRequest {
        invitation: secret.invitation_id(),
        proof: [0x42; 32],
        nospam: [0; 4],
        name: None,
    };
    forger
        .tox()
        .add_friend(parsed.inviter, forged.encode().as_bytes())
        .await?;

    // The inviter's application: each request checked against the invitation's secret.
    let me = inviter.id().public_key();
    let (mut allowed, mut refused) = (false, false);
    while !(allowed && refused) {
        let (pk, req) = timeout(Duration::from_secs(120), inviter.next_join_request())
            .await
            .context("no pairing request within 120 s")?
            .context("fabric gone")?;
        let valid = req.invitation == secret.invitation_id() && secret.verify(&req.proof, &pk, &me);
        if pk == joiner.id().public_key() {
            ensure!(valid, "the joiner's proof did not verify");
            assert_eq!(req.name.as_ref().map(|n| n.as_str()), Some("laptop"));
            if !allowed {
                inviter.allow(pk).await?;
                allowed = true;
            }
        } else if pk == forger.id().public_key() {
            ensure!(!valid, "a forged proof verified");
            refused = true;
        }
    }

    // The joiner's session comes up and carries streams.
    let peer = timeout(Duration::from_secs(120), joiner.connect(parsed.inviter))
        .await
        .context("no session for the joiner within 120 s")??;
    send_and_verify(&peer, 64 << 10, 7).await?;
    // The forger never gets one.
    match forger.connect(parsed.inviter).await {
        Err(ConnectError::TimedOut(_) | ConnectError::Rejected(_)) => {}
        Ok(_) => anyhow::bail!("the forger got a session"),
        Err(other) => anyhow::bail!("unexpected error: {other}"),
    }
    Ok(())
}

/// Pairing without Tox: the ticket names the inviter's direct endpoints, and a joiner that
/// cannot reach Tox at all (no bootstrap node) still pairs there, its request riding the
/// direct HELLO. A forger at the same endpoints, with the invitation's id but not its secret,
/// is checked, refused and never answered; a node with no open invitation does not even open
/// a stranger's HELLO.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_with_direct_endpoints_pairs_without_tox() -> Result<()> {
    init_tracing();
    let net = ToxNet::start(4).context("private tox network")?;
    let direct_node = |name: &str, timeout: Duration, tox: bool| -> Result<Fabric> {
        let mut tox_config = net.config(net.scratch_dir(name)?);
        if !tox {
            tox_config.bootstrap.clear();
        }
        let mut config = FabricConfig::new(tox_config);
        config.path.choice = PathChoice::Udp;
        config.connect_timeout = timeout;
        Ok(Fabric::start(config)?)
    };
    let inviter = Arc::new(direct_node("d-inviter", Duration::from_secs(60), true)?);
    serve_digests(inviter.clone());
    let endpoints = inviter.direct_endpoints(fabric::pairing::MAX_ENDPOINTS);
    ensure!(!endpoints.is_empty(), "the inviter has no direct endpoint");
    let secret = Secret(rand::random::<[u8; SECRET_LEN]>());
    let ticket = Ticket {
        inviter: inviter.id(),
        secret: secret.clone(),
        expires: u64::MAX,
        name: None,
        endpoints,
    };
    let me = inviter.id().public_key();

    // No invitation open yet: a stranger's join hello is not even opened.
    let early = direct_node("d-early", Duration::from_secs(3), false)?;
    let request = JoinRequest::new(&ticket, &early.id(), None);
    early.allow_sessions(me);
    early.join_directly(me, ticket.endpoints.clone(), &request);
    ensure!(
        early.connect(ticket.inviter).await.is_err(),
        "a join hello was answered with no invitation open"
    );
    ensure!(
        timeout(Duration::from_millis(500), inviter.next_join_request())
            .await
            .is_err(),
        "a stranger's hello was opened with no invitation open"
    );

    inviter.expect_joins_until(std::time::Instant::now() + Duration::from_secs(600));
    let joiner = direct_node("d-joiner", Duration::from_secs(30), false)?;
    let forger = direct_node("d-forger", Duration::from_secs(5), false)?;
    let request = JoinRequest::new(&ticket, &joiner.id(), None);
    joiner.allow_sessions(me);
    joiner.join_directly(me, ticket.endpoints.clone(), &request);
    let forged = JoinRequest {
        invitation: secret.invitation_id(),
        proof: [0x42; 32],
        nospam: [0; 4],
        name: None,
    };
    forger.allow_sessions(me);
    forger.join_directly(me, ticket.endpoints.clone(), &forged);
    let started = std::time::Instant::now();
    let joining = tokio::spawn(async move {
        let peer = joiner.connect(ticket.inviter).await;
        (joiner, peer)
    });
    let forging = tokio::spawn(async move { forger.connect(ticket.inviter).await.is_ok() });

    // The inviter's application: each request checked against the invitation's secret.
    let (mut allowed, mut refused) = (false, false);
    while !(allowed && refused) {
        let (pk, req) = timeout(Duration::from_secs(30), inviter.next_join_request())
            .await
            .context("no pairing request within 30 s")?
            .context("fabric gone")?;
        let valid = req.invitation == secret.invitation_id() && secret.verify(&req.proof, &pk, &me);
        if valid {
            if !allowed {
                inviter.allow(pk).await?;
                allowed = true;
            }
        } else {
            refused = true;
        }
    }
    let (joiner, peer) = joining.await?;
    let peer = peer.context("the joiner got no session")?;
    tracing::info!(after = ?started.elapsed(), "paired without tox");
    ensure!(
        !peer.status().online,
        "tox came online: the test proves nothing"
    );
    send_and_verify(&peer, 64 << 10, 9).await?;
    ensure!(!forging.await?, "the forger got a session");
    drop(joiner);
    Ok(())
}
