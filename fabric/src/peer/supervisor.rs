//! The client side's session keeping: [`establish`] asks an exit for a session (or to resume
//! one) and starts it, and [`supervise`] keeps it up for as long as the [`Peer`] lives,
//! re-establishing after the session ends and resuming when the exit comes back online.
//!
//! [`Peer`]: super::Peer

use std::sync::{Arc, Weak};

use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use super::{ConnectError, OpenerInput, Shared, lock};
use crate::id::PublicKey;
use crate::session::ConvId;
use crate::session::control::{OpenOutcome, Opener};
use crate::time::{Duration, Instant};

/// Client side: asks `pk` for a session until it answers, and starts it.
pub(super) async fn establish(
    shared: &Arc<Shared>,
    pk: PublicKey,
    resume: Option<ConvId>,
) -> Result<ConvId, ConnectError> {
    if shared.is_forgotten(&pk) {
        return Err(ConnectError::Forgotten);
    }
    let timeout = shared.config.connect_timeout;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut online = shared.with_slot(pk, |slot| slot.online.subscribe());
    // With no session (at start, or after one ended) and endpoints where the exit answered
    // before, ask there at once, beside Tox (which may take seconds to come online):
    // whichever answers first carries the session. A resume of a session that still runs
    // goes by Tox alone: the session keeps the path it has (a direct link's answer would
    // take it off a punched round, TCP fallback and all).
    let direct = shared
        .direct
        .clone()
        .filter(|d| resume.is_none() && !d.cached(&pk).is_empty());
    if direct.is_none() {
        tokio::time::timeout_at(deadline, online.wait_for(|o| *o))
            .await
            .map_err(|_| ConnectError::TimedOut(timeout))?
            .map_err(|_| ConnectError::Shutdown)?;
    }
    let (tx, mut rx) = mpsc::channel(8);
    // In one step with the look at the slot: a session the peer opened while we waited (we
    // answered its Open, not opening yet) is the pair's session, and an Open of ours now
    // would replace it on both ends. Once the opener is set, a crossing Open meets the
    // tie-break instead.
    let running = shared.with_slot(pk, |slot| {
        let running = slot
            .session
            .as_ref()
            .map(|r| r.conv)
            .filter(|_| resume.is_none());
        if running.is_none() {
            slot.opener = Some(tx.clone());
        }
        running
    });
    if let Some(conv) = running {
        return Ok(conv);
    }
    // Cleared when this attempt ends, however it ends (a supervisor that stops drops it
    // mid-way): a slot left "opening" would ignore the peer's Opens for good.
    let _opening = OpeningGuard {
        shared: shared.clone(),
        pk,
        tx,
    };
    let now = Instant::now();
    let remaining = deadline.into_std().saturating_duration_since(now);
    // A join's Open is answered only once the inviter checked the request it carries: ask
    // again soon.
    let retry = if direct.as_ref().is_some_and(|d| d.is_joining(&pk)) {
        super::direct::JOIN_RETRY
    } else {
        Duration::from_secs(1)
    };
    let mut opener = Opener::new(now, shared.next_request(), resume, retry, remaining);
    let mut attempt = 0;
    let outcome = loop {
        let now = Instant::now();
        opener.handle_timeout(now);
        while let Some(msg) = opener.poll_transmit(now) {
            if let Some(direct) = &direct {
                direct.send_control(pk, msg, attempt);
                attempt += 1;
            }
            if *online.borrow() {
                shared.send_control(pk, msg);
            }
        }
        if let Some(outcome) = opener.outcome() {
            break outcome;
        }
        let wake = opener.poll_timeout().unwrap_or(now);
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(OpenerInput::Answer(msg)) => opener.handle_control(msg),
                Some(OpenerInput::OpenedByPeer(conv)) => opener.handle_opened_by_peer(conv),
                None => return Err(ConnectError::Shutdown),
            },
            () = tokio::time::sleep_until(tokio::time::Instant::from_std(wake)) => {}
        }
    };
    // The session starts before the slot stops "opening" (the guard's drop): the peer's
    // first packets may come before its answer did, and must never be taken for a session
    // unknown here.
    match outcome {
        OpenOutcome::Accepted(conv) => {
            let running = shared.with_slot(pk, |slot| slot.session.as_ref().map(|r| r.conv));
            if running != Some(conv) {
                shared.start_session(pk, conv, true);
            }
            Ok(conv)
        }
        // Started when we answered the peer's crossing Open.
        OpenOutcome::OpenedByPeer(conv) => Ok(conv),
        OpenOutcome::Rejected(reason) => Err(ConnectError::Rejected(reason)),
        OpenOutcome::TimedOut => Err(ConnectError::TimedOut(timeout)),
    }
}

/// Marks the slot of `pk` as opening while it lives.
struct OpeningGuard {
    shared: Arc<Shared>,
    pk: PublicKey,
    /// The opener's channel, to clear only our own mark.
    tx: mpsc::Sender<OpenerInput>,
}

impl Drop for OpeningGuard {
    fn drop(&mut self) {
        self.shared.with_slot(self.pk, |slot| {
            if slot
                .opener
                .as_ref()
                .is_some_and(|o| o.same_channel(&self.tx))
            {
                slot.opener = None;
            }
        });
    }
}

/// Client side: keeps a session to `pk` up until the [`Peer`](super::Peer) is dropped.
///
/// It re-establishes when the session ends, and asks to resume whenever the exit comes back
/// online, which keeps the conv (and the streams) when the exit still has the session and
/// starts afresh when it restarted.
pub(super) async fn supervise(
    shared: Weak<Shared>,
    pk: PublicKey,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(500);
    loop {
        let Some(s) = shared.upgrade() else { return };
        if s.is_forgotten(&pk) {
            return;
        }
        // The peer asks to resume the sessions it opened; we ask for ours.
        let (mut online, ended, conv) = s.with_slot(pk, |slot| {
            (
                slot.online.subscribe(),
                slot.session.as_ref().map(|r| r.ended.clone()),
                slot.session
                    .as_ref()
                    .filter(|r| r.opened_here)
                    .map(|r| r.conv),
            )
        });
        drop(s);
        // Only a session that still runs may be resumed: one that ended here may live on at
        // the exit, and a fresh KCP on its conv would be taken for duplicates there (B4).
        let mut resume = None;
        if let Some(mut ended) = ended {
            // Wait for the session to end, or for any change in how Tox sees the exit: a
            // `watch` keeps only the latest value, so offline-then-online may read as one
            // change to "online", and that must count as the exit coming back.
            online.mark_unchanged();
            let back_online = async {
                loop {
                    if online.changed().await.is_err() {
                        return;
                    }
                    if *online.borrow_and_update() {
                        return;
                    }
                }
            };
            tokio::select! {
                _ = stop.changed() => return,
                _ = ended.wait_for(|e| *e) => {}
                () = back_online, if conv.is_some() => resume = conv,
            }
        }
        let Some(s) = shared.upgrade() else { return };
        if s.is_forgotten(&pk) {
            return;
        }
        if resume.is_none() && s.with_slot(pk, |slot| slot.session.is_some()) {
            // The peer opened a session while ours ended: a pair holds one, keep it.
            continue;
        }
        let result = tokio::select! {
            _ = stop.changed() => return,
            r = establish(&s, pk, resume) => r,
        };
        match result {
            Ok(new) if Some(new) == resume => debug!(exit = %pk, conv = %new, "session resumed"),
            Ok(new) => {
                info!(exit = %pk, conv = %new, "session to exit re-established");
                backoff = Duration::from_millis(500);
            }
            Err(error) => {
                warn!(exit = %pk, %error, "reconnecting to exit failed");
                drop(s);
                tokio::select! {
                    _ = stop.changed() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

impl Shared {
    fn next_request(&self) -> u32 {
        let mut r = lock(&self.requests);
        *r = r.wrapping_add(1);
        // Mixed with the clock so that a restarted client does not reuse its requests.
        *r ^ (self.epoch.elapsed().as_nanos() as u32).rotate_left(16)
    }
}
