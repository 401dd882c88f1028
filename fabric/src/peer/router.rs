//! The router: one task takes every Tox event and hands it on. Session packets go to their
//! session's driver (or, for a session this exit does not know, earn the client a Close),
//! control messages to the opener or the acceptor, punched-link signals to the path agent, and
//! friend connection changes to the peer's slot.

use std::sync::{Arc, Weak};

use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::{debug, info};

use super::paths::{AgentInput, Via};
use super::{
    CONTROL_PACKET_ID, Input, OpenerInput, SESSION_PACKET_ID, SIGNAL_PACKET_ID, Shared, lock,
};
use crate::id::PublicKey;
use crate::link::signal::Signal;
use crate::pairing::JoinRequest;
use crate::session::control::{Acceptor, answers_crossed_open};
use crate::session::{self, CloseReason, Control, ConvId};
use crate::time::{Duration, Instant};
use crate::tox::ToxEvent;

/// How long after a session this end opened started an Open from the peer is still taken for
/// one that crossed ours (sent before its sender saw our answer): a few round trips, even
/// through a Tox relay.
const CROSSED_OPEN_WINDOW: Duration = Duration::from_secs(3);

/// Routes Tox events to sessions and control handlers until the node or the fabric is gone.
pub(super) async fn route(shared: Weak<Shared>, mut events: mpsc::Receiver<ToxEvent>) {
    while let Some(event) = events.recv().await {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        match event {
            ToxEvent::Lossy { pk, data } if data.first() == Some(&SESSION_PACKET_ID) => {
                shared.handle_session_packet(pk, data.slice(1..), Via::Tox);
            }
            ToxEvent::Lossless { pk, data } if data.first() == Some(&SIGNAL_PACKET_ID) => {
                match Signal::parse(&data[1..]) {
                    Ok(signal) => shared.handle_signal(pk, signal),
                    Err(error) => debug!(peer = %pk, %error, "bad link signal"),
                }
            }
            ToxEvent::Lossless { pk, data } if data.first() == Some(&CONTROL_PACKET_ID) => {
                match Control::parse(&data[1..]) {
                    Ok(msg) => shared.handle_control(pk, msg),
                    Err(error) => debug!(peer = %pk, %error, "bad control message"),
                }
            }
            ToxEvent::JoinRequest { pk, message } => {
                match JoinRequest::from_message(&message) {
                    // Full: dropped; the joiner's node asks again.
                    Some(request) => drop(shared.joins.try_send((pk, request))),
                    None => debug!(peer = %pk, "malformed pairing request"),
                }
            }
            ToxEvent::FriendConnection { pk, status } => {
                debug!(peer = %pk, ?status, "friend connection");
                shared.with_slot(pk, |slot| {
                    slot.online.send_replace(status.is_online());
                    let mut st = lock(&slot.status);
                    st.online = status.is_online();
                    st.path = status;
                });
            }
            _ => {}
        }
    }
}

impl Shared {
    fn handle_control(self: &Arc<Self>, pk: PublicKey, msg: Control) {
        match msg {
            Control::Open { request, resume } => {
                if let Some(answer) = self.answer_open(pk, request, resume) {
                    self.send_control(pk, answer);
                }
            }
            Control::Accept { .. } | Control::Reject { .. } => self.deliver_answer(pk, msg),
            Control::Close { conv, reason } => {
                let input = self.with_slot(pk, |slot| {
                    slot.session
                        .as_ref()
                        .filter(|r| r.conv == conv)
                        .map(|r| r.input.clone())
                });
                if let Some(input) = input {
                    let _ = input.try_send(Input::PeerClose(reason));
                }
            }
        }
    }

    /// Answers a peer's Open (come by Tox or by a direct handshake): refused unless the peer
    /// is allowed, else the acceptor's conv, whose session starts here and now. `None` when
    /// the Open crossed one of ours that wins the tie-break
    /// ([`answers_crossed_open`]): the peer takes the answer to ours instead.
    pub(super) fn answer_open(
        self: &Arc<Self>,
        pk: PublicKey,
        request: u32,
        resume: Option<ConvId>,
    ) -> Option<Control> {
        if !self.allows(&pk) {
            debug!(peer = %pk, "session refused: not allowed");
            return Some(Control::Reject {
                request,
                reason: CloseReason::NotAllowed,
            });
        }
        let now = Instant::now();
        let epoch = self.epoch;
        let answers_crossed = answers_crossed_open(&self.own_key.0, &pk.0);
        let answered = self.with_slot(pk, |slot| {
            // An Open of ours is in flight, or was answered so recently that a crossing Open of
            // the peer's may still be on its way: the tie-break holds for both. Later, an Open
            // from the peer means it lost the session (it restarted): answered, replacing ours.
            let ours = slot.opener.is_some()
                || slot.session.as_ref().is_some_and(|r| {
                    r.opened_here && now.saturating_duration_since(r.started) < CROSSED_OPEN_WINDOW
                });
            if ours && !answers_crossed {
                return None;
            }
            let acceptor = slot
                .acceptor
                .get_or_insert_with(|| Acceptor::new(epoch, &pk.0));
            let (answer, _) = acceptor.handle_open(now, request, resume);
            Some((
                answer,
                slot.session.as_ref().map(|r| r.conv),
                slot.opener.clone(),
            ))
        });
        let Some((answer, running_conv, opener)) = answered else {
            debug!(peer = %pk, "crossed open left unanswered: ours wins");
            return None;
        };
        if let Control::Accept { conv, .. } = answer {
            if running_conv != Some(conv) {
                info!(peer = %pk, %conv, "session accepted");
                self.start_session(pk, conv, false);
            }
            if let Some(opener) = opener {
                debug!(peer = %pk, %conv, "crossed open answered: its session is ours too");
                let _ = opener.try_send(OpenerInput::OpenedByPeer(conv));
            }
        }
        Some(answer)
    }

    /// A peer's answer to our Open, for the opener waiting for it.
    pub(super) fn deliver_answer(&self, pk: PublicKey, msg: Control) {
        let opener = self.with_slot(pk, |slot| slot.opener.clone());
        if let Some(tx) = opener {
            let _ = tx.try_send(OpenerInput::Answer(msg));
        }
    }

    /// A punched-link signal from `pk`: for its path agent, which runs while a session does
    /// (signals from anyone else are dropped).
    fn handle_signal(self: &Arc<Self>, pk: PublicKey, signal: Signal) {
        let (has_session, inbox) =
            self.with_slot(pk, |slot| (slot.session.is_some(), slot.paths.clone()));
        if !has_session {
            debug!(peer = %pk, "link signal without a session dropped");
            return;
        }
        if let Signal::Direct { candidates } = &signal {
            self.on_direct_candidates(pk, candidates);
            return;
        }
        if let Some(inbox) = inbox {
            let _ = inbox.try_send(AgentInput::Signal(signal));
        }
    }

    /// A session packet (without any path's framing) from `pk`, from Tox or a punched link.
    pub(super) fn handle_session_packet(self: &Arc<Self>, pk: PublicKey, data: Bytes, via: Via) {
        let now = Instant::now();
        let conv = session::conv_of(&data);
        let (input, answer_unknown) = self.with_slot(pk, |slot| {
            if let Some(r) = &slot.session
                && conv == Some(r.conv)
            {
                return (Some(r.input.clone()), false);
            }
            // Only an end that answers this peer's Opens (it holds an acceptor for it, or
            // allows it) tells the peer its session is gone; others ignore strays. A packet
            // of another conv than the running one is answered too: a peer that took an
            // answer we have since replaced learns in a round trip, not after the idle
            // timeout. Never while our own Open waits for its answer: the peer's first
            // packets of the session it is granting us may arrive before the answer does.
            let due = slot
                .last_unknown
                .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1));
            let exit_side = slot.acceptor.is_some() || self.allows(&pk);
            if due && exit_side && slot.opener.is_none() {
                slot.last_unknown = Some(now);
                return (None, true);
            }
            (None, false)
        });
        if let Some(input) = input {
            // A full queue drops the packet: it is lossy, KCP retransmits.
            let _ = input.try_send(Input::Packet(data, via));
        } else if answer_unknown && let Some(conv) = conv {
            debug!(peer = %pk, %conv, "packets for an unknown session");
            self.send_control(
                pk,
                Control::Close {
                    conv,
                    reason: CloseReason::UnknownSession,
                },
            );
        }
    }
}
