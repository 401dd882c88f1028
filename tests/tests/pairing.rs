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
