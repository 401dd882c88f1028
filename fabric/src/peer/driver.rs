//! The per-session task: [`Shared::start_session`] installs a session in the peer's slot and
//! spawns its driver, which moves packets from any path into the session, mux frames through
//! it, and packets out on the path the agent chose (with Tox copies beside a suspect punched
//! link), and publishes the session's counters to the peer's [`PeerStatus`].

use std::sync::{Arc, Mutex, Weak};

use bytes::{BufMut, BytesMut};
use tokio::sync::{mpsc, watch};
use tracing::{Instrument as _, info, warn};

use super::paths::{Carrier, LinkWatch, Role, suspect_after};
use super::{Incoming, Input, PeerStatus, Running, SESSION_PACKET_ID, Shared, lock};
use crate::connection::{feed, mux_config};
use crate::id::PublicKey;
use crate::mux::io::Handle;
use crate::mux::{self, StreamIds};
use crate::session::{CloseReason, Control, ConvId, Event, Session};
use crate::time::{Duration, Instant};
use crate::tox::ToxError;

impl Shared {
    /// Starts a session with `pk` on `conv`, replacing any other, and its path agent.
    /// `opened_here`: this end asked for it (it then opens odd stream ids and offers links);
    /// else it answered the peer's Open (even ids, answers offers). Either end opens streams
    /// and takes the peer's, which go to [`Fabric::accept`](super::Fabric::accept).
    pub(super) fn start_session(
        self: &Arc<Self>,
        pk: PublicKey,
        conv: ConvId,
        opened_here: bool,
    ) -> Handle {
        let handle = Handle::new(mux::Config {
            shared_budget: Some(self.mux_budget.clone()),
            stream_ids: if opened_here {
                StreamIds::Odd
            } else {
                StreamIds::Even
            },
            ..mux_config()
        });
        let (input_tx, input_rx) = mpsc::channel(4096);
        let (ended_tx, ended_rx) = watch::channel(false);
        let (status, carrier) = self.with_slot(pk, |slot| {
            // Dropping the old session's input ends its driver.
            slot.session = Some(Running {
                conv,
                opened_here,
                started: Instant::now(),
                input: input_tx,
                handle: handle.clone(),
                ended: ended_rx,
            });
            (slot.status.clone(), slot.carrier.subscribe())
        });
        self.sessions.send_modify(|n| *n += 1);
        let session = Session::new(conv, self.config.session.clone(), Instant::now());
        let span = tracing::info_span!("session", peer = %pk, %conv);
        tokio::spawn(
            drive(
                Arc::downgrade(self),
                pk,
                session,
                handle.clone(),
                Wiring {
                    input: input_rx,
                    carrier,
                    ended: ended_tx,
                    status,
                },
            )
            .instrument(span),
        );
        tokio::spawn({
            let handle = handle.clone();
            let incoming = self.incoming.clone();
            async move {
                while let Some(stream) = handle.accept().await {
                    if incoming.send(Incoming { peer: pk, stream }).await.is_err() {
                        break;
                    }
                }
            }
        });
        self.start_paths(
            pk,
            if opened_here {
                Role::Client
            } else {
                Role::Exit
            },
        );
        handle
    }
}

/// How often a busy session driver refreshes its [`PeerStatus`].
const STATUS_EVERY: Duration = Duration::from_millis(20);

/// What connects a session driver to the rest of the fabric.
struct Wiring {
    /// Packets (from any path), peer closes and datagrams to send.
    input: mpsc::Receiver<Input>,
    /// The path to send on, set by the path agent.
    carrier: watch::Receiver<Carrier>,
    /// Set when the session has ended.
    ended: watch::Sender<bool>,
    /// Where the driver publishes its counters.
    status: Arc<Mutex<PeerStatus>>,
}

/// Runs one session: packets from any path in, mux frames through, packets out on the path
/// the agent chose.
async fn drive(
    shared: Weak<Shared>,
    pk: PublicKey,
    mut session: Session,
    mut handle: Handle,
    wiring: Wiring,
) {
    let Wiring {
        mut input,
        mut carrier,
        ended,
        status,
    } = wiring;
    let Some((tox, datagrams)) = shared
        .upgrade()
        .map(|s| (s.tox.clone(), s.datagrams.clone()))
    else {
        return;
    };
    let conv = session.conv();
    let mut scratch = Vec::new();
    let mut buf = Vec::new();
    let mut dropped = 0u64;
    let mut last_status = Instant::now() - Duration::from_secs(1);
    let mut path = carrier.borrow_and_update().clone();
    let mut watch = LinkWatch::new(Instant::now());
    let mut was_suspect = false;
    let (reason, by_peer) = 'run: loop {
        let now = Instant::now();
        // Mux frames into the session, as much as its pacer and window admit.
        let blocked = feed(&mut session, &mut handle, now, &mut scratch);
        if carrier.has_changed().unwrap_or(false) {
            path = carrier.borrow_and_update().clone();
            watch.on_carrier(now, path.is_punched());
            session.on_path_change(now);
        }
        // A punched link that went silent while we wait for acknowledgements (or while the
        // peer already turned to Tox) gets Tox beside it until it speaks again: a stall of
        // about a second instead of the link's dead timeout.
        let also_tox = path.is_punched()
            && watch.suspect(now, suspect_after(session.srtt()), || {
                session.waiting_segments() > 0
            });
        if also_tox && !was_suspect && session.waiting_segments() > 0 {
            // What went out on the silent link is presumed lost: send it again on Tox now.
            // Only data: an idle link turns suspect whenever the peer's keepalive came by
            // Tox, and restarting the pacer then would only slow the next transfer.
            session.on_path_change(now);
        }
        was_suspect = also_tox;
        while session.poll_transmit(now, &mut buf).is_some() {
            if also_tox {
                let mut packet = BytesMut::with_capacity(buf.len() + 1);
                packet.put_u8(SESSION_PACKET_ID);
                packet.extend_from_slice(&buf);
                // A duplicate: dropped when the Tox queue is full.
                let _ = tox.try_send_lossy(pk, packet.freeze());
            }
            if path.send(&buf, also_tox).await {
                continue;
            }
            // Tox, or a punched link that just closed (the agent moves us back to Tox).
            let mut packet = BytesMut::with_capacity(buf.len() + 1);
            packet.put_u8(SESSION_PACKET_ID);
            packet.extend_from_slice(&buf);
            let packet = packet.freeze();
            if let Err(ToxError::QueueFull) = tox.try_send_lossy(pk, packet.clone()) {
                // The Tox thread is behind: wait for it rather than drop what KCP paced.
                if tox.send_lossy(pk, packet).await.is_err() {
                    dropped += 1;
                }
            }
        }
        if let Some(Event::Closed { reason, by_peer }) = session.poll_event() {
            if !by_peer && let Some(s) = shared.upgrade() {
                s.send_control(pk, Control::Close { conv, reason });
            }
            break 'run (reason, by_peer);
        }
        let deadline = session
            .poll_timeout()
            .unwrap_or(now + Duration::from_secs(1));
        // Status at most every 20 ms while busy, and whenever the session goes quiet, so
        // what it shows is never more than 20 ms old.
        let quiet = deadline.saturating_duration_since(now) >= STATUS_EVERY;
        if quiet || now.saturating_duration_since(last_status) >= STATUS_EVERY {
            last_status = now;
            let mut st = lock(&status);
            st.conv = Some(conv);
            st.session = session.stats();
            st.mux = handle.stats();
            st.dropped_packets = dropped;
        }
        tokio::select! {
            msg = input.recv() => match msg {
                Some(Input::Packet(p, via)) => {
                    let now = Instant::now();
                    watch.on_input(now, via);
                    let _ = session.handle_input(now, &p);
                    // Take whatever else has arrived before answering: one flush of
                    // acknowledgements for the lot.
                    let mut more = 0;
                    while more < 256 {
                        match input.try_recv() {
                            Ok(Input::Packet(p, via)) => {
                                watch.on_input(now, via);
                                let _ = session.handle_input(now, &p);
                            }
                            Ok(Input::PeerClose(reason)) => session.handle_peer_close(reason),
                            Ok(Input::Datagram(d)) => { session.send_datagram(&d); }
                            Err(_) => break,
                        }
                        more += 1;
                    }
                    while let Some(d) = session.recv_datagram() {
                        // Full means the application is behind: drop, as UDP would.
                        let _ = datagrams.try_send((pk, d));
                    }
                    scratch.clear();
                    if session.recv(&mut scratch) > 0
                        && let Err(error) = handle.handle_input(&scratch)
                    {
                        warn!(peer = %pk, %conv, %error, "mux protocol error");
                        session.close(CloseReason::ProtocolError);
                    }
                }
                Some(Input::PeerClose(reason)) => session.handle_peer_close(reason),
                Some(Input::Datagram(d)) => { session.send_datagram(&d); }
                // Replaced by a newer session, or the fabric is gone.
                None => break 'run (CloseReason::Normal, false),
            },
            r = handle.transmit_ready(), if !blocked => {
                if r.is_err() {
                    session.close(CloseReason::ProtocolError);
                }
            }
            () = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)) => {
                session.handle_timeout(Instant::now());
            }
        }
    };
    info!(peer = %pk, %conv, %reason, by_peer, "session ended");
    handle.fail(format!("session ended: {reason}"));
    if let Some(s) = shared.upgrade() {
        s.with_slot(pk, |slot| {
            if slot.session.as_ref().is_some_and(|r| r.conv == conv) {
                slot.session = None;
            }
            if let Some(a) = slot.acceptor.as_mut() {
                a.forget(conv);
            }
            let mut st = lock(&slot.status);
            st.conv = None;
            st.last_end = Some((reason, by_peer));
            st.opened_direct = None;
        });
        s.sessions.send_modify(|n| *n += 1);
    }
    ended.send_replace(true);
}
