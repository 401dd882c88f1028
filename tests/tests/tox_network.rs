//! Two fabric Tox nodes on a private network of tox-bootstrapd daemons (127.0.0.1 only):
//! finding each other by Tox ID, the exit's allow list, packets both ways, restart.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use fabric::id::PublicKey;
use fabric::tox::{Connection, ToxConfig, ToxError, ToxEvent, ToxHandle, ToxNode};
use tests::init_tracing;
use tests::toxnet::ToxNet;
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};
use tracing::info;

/// Upper bound for any one wait on the network.
const WAIT: Duration = Duration::from_secs(60);

struct Peer {
    name: &'static str,
    handle: ToxHandle,
    events: mpsc::Receiver<ToxEvent>,
}

impl Peer {
    fn spawn(name: &'static str, config: ToxConfig) -> Result<Self> {
        let (handle, events) = ToxNode::spawn(config).context("spawning tox node")?;
        info!(name, id = %handle.id(), "node up");
        Ok(Self {
            name,
            handle,
            events,
        })
    }

    fn pk(&self) -> PublicKey {
        self.handle.public_key()
    }

    /// Waits (at most `limit`) for the first event `f` accepts, discarding others.
    async fn wait_for<T>(
        &mut self,
        what: &str,
        limit: Duration,
        mut f: impl FnMut(&ToxEvent) -> Option<T>,
    ) -> Result<T> {
        let deadline = Instant::now() + limit;
        loop {
            let ev = match timeout(deadline - Instant::now(), self.events.recv()).await {
                Ok(Some(ev)) => ev,
                Ok(None) => bail!("{}: node stopped while waiting for {what}", self.name),
                Err(_) => bail!(
                    "{}: timed out after {limit:?} waiting for {what}",
                    self.name
                ),
            };
            if let Some(t) = f(&ev) {
                return Ok(t);
            }
        }
    }

    async fn wait_online(&mut self, friend: PublicKey) -> Result<()> {
        let start = Instant::now();
        self.wait_for("friend online", WAIT, |ev| match ev {
            ToxEvent::FriendConnection { pk, status } if *pk == friend && status.is_online() => {
                Some(())
            }
            _ => None,
        })
        .await?;
        info!(name = self.name, after = ?start.elapsed(), "friend online");
        Ok(())
    }

    /// Sends a lossless packet, retrying while c-toxcore still considers the friend offline
    /// (both sides must see each other online before it accepts custom packets).
    async fn send_lossless_retrying(&self, to: PublicKey, data: Bytes) -> Result<()> {
        let deadline = Instant::now() + WAIT;
        loop {
            match self.handle.send_lossless(to, data.clone()).await {
                Ok(()) => return Ok(()),
                Err(ToxError::FriendNotConnected(_) | ToxError::SendQueueFull(_))
                    if Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e).context("send_lossless"),
            }
        }
    }

    async fn recv_lossless(&mut self, from: PublicKey) -> Result<Bytes> {
        self.wait_for("lossless packet", WAIT, |ev| match ev {
            ToxEvent::Lossless { pk, data } if *pk == from => Some(data.clone()),
            _ => None,
        })
        .await
    }
}

fn start_net() -> Result<ToxNet> {
    let net = ToxNet::start(4).context("starting tox-bootstrapd network")?;
    for n in net.nodes() {
        info!(%n, "bootstrap daemon");
    }
    Ok(net)
}

fn data_dir(net: &ToxNet, name: &str) -> Result<PathBuf> {
    Ok(net.scratch_dir(name)?)
}

/// A lossless packet carrying `tag`, first byte 170.
fn lossless(tag: &str) -> Bytes {
    let mut v = vec![170u8];
    v.extend_from_slice(tag.as_bytes());
    Bytes::from(v)
}

/// Lossy packet `seq`: id byte 200, the sequence number, then 1,000 bytes derived from it, so
/// a corrupted or foreign packet is recognised.
fn lossy(seq: u32) -> Bytes {
    let mut v = vec![200u8];
    v.extend_from_slice(&seq.to_be_bytes());
    v.extend((0..1000u32).map(|i| (i.wrapping_mul(31) ^ seq) as u8));
    Bytes::from(v)
}

fn check_lossy(data: &[u8]) -> Option<u32> {
    let seq = u32::from_be_bytes(data.get(1..5)?.try_into().ok()?);
    (lossy(seq) == data).then_some(seq)
}

/// Sends `count` lossy packets from `a` to `b` and checks what arrives: intact, no strangers,
/// and (on loopback) nearly all of them.
async fn lossy_one_way(a: &Peer, b: &mut Peer, count: u32) -> Result<()> {
    for seq in 0..count {
        a.handle.send_lossy(b.pk(), lossy(seq)).await?;
        // Pace to ~2 MB/s: this checks delivery and integrity, not throughput (the bench does
        // that), and must not overrun a receiver starved of CPU on a busy CI machine.
        if seq % 10 == 9 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let from = a.pk();
    let mut seen = HashSet::new();
    let quiet = Duration::from_secs(3);
    loop {
        match timeout(quiet, b.events.recv()).await {
            Ok(Some(ToxEvent::Lossy { pk, data })) if pk == from => {
                let seq = check_lossy(&data).context("lossy packet corrupted")?;
                seen.insert(seq);
                if seen.len() == count as usize {
                    break;
                }
            }
            Ok(Some(_)) => {}
            Ok(None) => bail!("node stopped"),
            Err(_) => break,
        }
    }
    info!(
        from = a.name,
        to = b.name,
        received = seen.len(),
        count,
        "lossy packets"
    );
    // Loopback drops nothing in practice; allow a little for a loaded CI machine.
    if seen.len() < (count as usize) * 9 / 10 {
        bail!("only {} of {count} lossy packets arrived", seen.len());
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn friends_by_id_exchange_lossless_and_lossy() -> Result<()> {
    init_tracing();
    let net = start_net()?;
    let mut client = Peer::spawn("client", net.config(data_dir(&net, "client")?))?;
    let mut exit_cfg = net.config(data_dir(&net, "exit")?);
    exit_cfg.allow.keys.insert(client.pk());
    let mut exit = Peer::spawn("exit", exit_cfg)?;

    client
        .handle
        .add_friend(exit.handle.id(), b"proxy client")
        .await?;
    client.wait_online(exit.pk()).await?;
    exit.wait_online(client.pk()).await?;

    client
        .send_lossless_retrying(exit.pk(), lossless("ping"))
        .await?;
    assert_eq!(exit.recv_lossless(client.pk()).await?, lossless("ping"));
    exit.send_lossless_retrying(client.pk(), lossless("pong"))
        .await?;
    assert_eq!(client.recv_lossless(exit.pk()).await?, lossless("pong"));

    // Several in a row arrive in order.
    for i in 0..20 {
        client
            .send_lossless_retrying(exit.pk(), lossless(&format!("m{i}")))
            .await?;
    }
    for i in 0..20 {
        assert_eq!(
            exit.recv_lossless(client.pk()).await?,
            lossless(&format!("m{i}"))
        );
    }

    lossy_one_way(&client, &mut exit, 200).await?;
    lossy_one_way(&exit, &mut client, 200).await?;

    let status = client.handle.status().await?;
    assert_eq!(status.friends.len(), 1);
    assert_eq!(status.friends[0].pk, exit.pk());
    assert!(status.friends[0].connection.is_online());
    assert!(status.lossy_sent >= 200);
    assert!(status.lossless_received >= 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_any_accepts_friend_request() -> Result<()> {
    init_tracing();
    let net = start_net()?;
    let mut client = Peer::spawn("client", net.config(data_dir(&net, "client")?))?;
    let mut exit_cfg = net.config(data_dir(&net, "exit")?);
    exit_cfg.allow.allow_any = true;
    let mut exit = Peer::spawn("exit", exit_cfg)?;

    client
        .handle
        .add_friend(exit.handle.id(), b"let me in")
        .await?;
    let client_pk = client.pk();
    exit.wait_for("friend request", WAIT, |ev| match ev {
        ToxEvent::FriendRequest { pk } if *pk == client_pk => Some(()),
        _ => None,
    })
    .await?;
    exit.wait_online(client.pk()).await?;
    client.wait_online(exit.pk()).await?;
    exit.send_lossless_retrying(client.pk(), lossless("welcome"))
        .await?;
    assert_eq!(client.recv_lossless(exit.pk()).await?, lossless("welcome"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_refuses_client_not_on_allow_list() -> Result<()> {
    init_tracing();
    let net = start_net()?;
    let mut stranger = Peer::spawn("stranger", net.config(data_dir(&net, "stranger")?))?;
    let mut exit_cfg = net.config(data_dir(&net, "exit")?);
    // Someone else is allowed; the stranger is not.
    exit_cfg.allow.keys.insert(PublicKey([0x42; 32]));
    let mut exit = Peer::spawn("exit", exit_cfg)?;

    // Both must be on the DHT for the request to have had a chance to arrive.
    for p in [&mut stranger, &mut exit] {
        p.wait_for("dht connection", WAIT, |ev| match ev {
            ToxEvent::SelfConnection(c) if c.is_online() => Some(()),
            _ => None,
        })
        .await?;
    }
    stranger
        .handle
        .add_friend(exit.handle.id(), b"let me in")
        .await?;

    // A friend request crosses a 4-node DHT in well under 20 s (see the other tests); the
    // exit must neither accept it nor ever appear online to the stranger.
    let refused = Duration::from_secs(20);
    let stranger_pk = stranger.pk();
    let exit_pk = exit.pk();
    let (on_exit, on_stranger) = tokio::join!(
        exit.wait_for("any sign of the stranger", refused, |ev| match ev {
            ToxEvent::FriendRequest { pk } | ToxEvent::FriendConnection { pk, .. }
                if *pk == stranger_pk =>
            {
                Some(ev.clone())
            }
            _ => None,
        }),
        stranger.wait_for("exit online", refused, |ev| match ev {
            ToxEvent::FriendConnection { pk, status } if *pk == exit_pk && status.is_online() => {
                Some(())
            }
            _ => None,
        }),
    );
    assert!(on_exit.is_err(), "exit saw the stranger: {on_exit:?}");
    assert!(
        on_stranger.is_err(),
        "the exit came online for the stranger"
    );
    let status = exit.handle.status().await?;
    assert!(status.friends.iter().all(|f| f.pk != stranger_pk));
    let err = stranger
        .handle
        .send_lossless(exit_pk, lossless("hello?"))
        .await
        .unwrap_err();
    assert!(matches!(err, ToxError::FriendNotConnected(_)), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_exit_keeps_id_and_allowed_friend_but_forgets_strangers() -> Result<()> {
    init_tracing();
    let net = start_net()?;
    let mut client = Peer::spawn("client", net.config(data_dir(&net, "client")?))?;
    let mut stranger = Peer::spawn("stranger", net.config(data_dir(&net, "stranger")?))?;
    let exit_dir = data_dir(&net, "exit")?;
    // The client is allowed by key; the stranger gets in only because anyone may (B9).
    let mut exit_cfg = net.config(&exit_dir);
    exit_cfg.allow.allow_any = true;
    exit_cfg.allow.keys.insert(client.pk());
    let exit = Peer::spawn("exit", exit_cfg)?;
    let exit_id = exit.handle.id();

    client.handle.add_friend(exit_id, b"hi").await?;
    stranger.handle.add_friend(exit_id, b"me too").await?;
    client.wait_online(exit.pk()).await?;
    stranger.wait_online(exit.pk()).await?;
    let friends: Vec<PublicKey> = exit
        .handle
        .status()
        .await?
        .friends
        .iter()
        .map(|f| f.pk)
        .collect();
    assert!(friends.contains(&client.pk()) && friends.contains(&stranger.pk()));

    exit.handle.shutdown().await;
    drop(exit);
    info!("exit stopped");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(exit_dir.join("tox.save"))?
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "tox.save must be private");
    }

    // Restart with nobody allowed: the client must come back as a saved friend, not through
    // a new request; the stranger was never saved.
    let mut exit = Peer::spawn("exit", net.config(&exit_dir))?;
    assert_eq!(exit.handle.id(), exit_id, "same data dir, same tox id");
    let friends: Vec<PublicKey> = exit
        .handle
        .status()
        .await?
        .friends
        .iter()
        .map(|f| f.pk)
        .collect();
    assert_eq!(friends, vec![client.pk()], "the saved friend list");
    exit.wait_online(client.pk()).await?;
    exit.send_lossless_retrying(client.pk(), lossless("back"))
        .await?;
    assert_eq!(client.recv_lossless(exit.pk()).await?, lossless("back"));

    // Accepting anyone again, the exit gets the stranger back: its node, which once had the
    // request accepted, asks again when the exit stays offline to it.
    exit.handle.shutdown().await;
    drop(exit);
    let mut exit_cfg = net.config(&exit_dir);
    exit_cfg.allow.allow_any = true;
    let mut exit = Peer::spawn("exit", exit_cfg)?;
    let stranger_pk = stranger.pk();
    exit.wait_for("the stranger's new request", 2 * WAIT, |ev| match ev {
        ToxEvent::FriendRequest { pk } if *pk == stranger_pk => Some(()),
        _ => None,
    })
    .await?;
    stranger.wait_online(exit.pk()).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_only_client_connects_through_relay() -> Result<()> {
    init_tracing();
    let net = start_net()?;
    let mut client_cfg = net.config(data_dir(&net, "client")?);
    // As behind a UDP-blocking firewall: everything goes through the daemons' TCP relays.
    client_cfg.udp_enabled = false;
    client_cfg.tcp_relays = net.tcp_relays();
    let mut client = Peer::spawn("client", client_cfg)?;
    let mut exit_cfg = net.config(data_dir(&net, "exit")?);
    exit_cfg.allow.keys.insert(client.pk());
    let mut exit = Peer::spawn("exit", exit_cfg)?;

    client
        .handle
        .add_friend(exit.handle.id(), b"via relay")
        .await?;
    let exit_pk = exit.pk();
    let status = client
        .wait_for("exit online", WAIT, |ev| match ev {
            ToxEvent::FriendConnection { pk, status } if *pk == exit_pk && status.is_online() => {
                Some(*status)
            }
            _ => None,
        })
        .await?;
    assert_eq!(
        status,
        Connection::Tcp,
        "udp is off, so the friend must be reached over tcp"
    );
    exit.wait_online(client.pk()).await?;
    client
        .send_lossless_retrying(exit.pk(), lossless("relayed"))
        .await?;
    assert_eq!(exit.recv_lossless(client.pk()).await?, lossless("relayed"));
    lossy_one_way(&exit, &mut client, 100).await?;
    Ok(())
}
