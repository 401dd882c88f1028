//! Control messages and the conv assignment of seed 000: the client asks, the exit assigns.
//!
//! Control messages travel over an authenticated, reliable side channel (Tox lossless
//! packets), never inside the KCP session they set up: a KCP session alone cannot time out a
//! connect attempt, and its conv must be known before its first segment is sent.
//!
//! ```text
//! open    1 | request u32 | resume conv u32 (0 = none)
//! accept  2 | request u32 | conv u32
//! reject  3 | request u32 | reason u8
//! close   4 | conv u32    | reason u8
//! ```
//! All integers are big-endian. Conv 0 is never assigned.

use thiserror::Error;

use super::ConvId;
use crate::time::{Duration, Instant};

/// Why a session ended or an open was refused, as carried on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseReason {
    /// The application closed it.
    Normal,
    /// Nothing was heard from the peer for the idle timeout.
    Timeout,
    /// The peer does not allow this client.
    NotAllowed,
    /// The peer has no room for another session.
    Busy,
    /// The peer broke the protocol.
    ProtocolError,
    /// The peer is shutting down.
    Shutdown,
    /// The peer has no session with that conv (it restarted, or timed the session out).
    UnknownSession,
    /// A reason this version does not know.
    Other(u8),
}

impl CloseReason {
    fn to_byte(self) -> u8 {
        match self {
            Self::Normal => 0,
            Self::Timeout => 1,
            Self::NotAllowed => 2,
            Self::Busy => 3,
            Self::ProtocolError => 4,
            Self::Shutdown => 5,
            Self::UnknownSession => 6,
            Self::Other(b) => b,
        }
    }

    fn from_byte(b: u8) -> Self {
        match b {
            0 => Self::Normal,
            1 => Self::Timeout,
            2 => Self::NotAllowed,
            3 => Self::Busy,
            4 => Self::ProtocolError,
            5 => Self::Shutdown,
            6 => Self::UnknownSession,
            b => Self::Other(b),
        }
    }
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Normal => f.write_str("closed"),
            Self::Timeout => f.write_str("peer timed out"),
            Self::NotAllowed => f.write_str("not allowed by the peer"),
            Self::Busy => f.write_str("peer is busy"),
            Self::ProtocolError => f.write_str("protocol error"),
            Self::Shutdown => f.write_str("peer shut down"),
            Self::UnknownSession => f.write_str("peer has no such session"),
            Self::Other(b) => write!(f, "unknown reason {b}"),
        }
    }
}

/// A control message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Control {
    /// The client asks for a session, optionally resuming an earlier conv.
    Open {
        /// Chosen by the client to match the answer to the question.
        request: u32,
        /// The conv of a session the client still holds, if any.
        resume: Option<ConvId>,
    },
    /// The exit assigns `conv` to the session asked for by `request`.
    Accept {
        /// The request answered.
        request: u32,
        /// The conversation id both ends use from now on.
        conv: ConvId,
    },
    /// The exit refuses the session.
    Reject {
        /// The request answered.
        request: u32,
        /// Why.
        reason: CloseReason,
    },
    /// Either end ends the session `conv`.
    Close {
        /// The session closed.
        conv: ConvId,
        /// Why.
        reason: CloseReason,
    },
}

/// A control message that could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ControlError {
    /// The message was shorter than its kind needs.
    #[error("control message truncated: {0} bytes")]
    Truncated(usize),
    /// The message was longer than its kind allows.
    #[error("control message has {0} trailing bytes")]
    Trailing(usize),
    /// The first byte names no known message.
    #[error("unknown control message kind {0}")]
    UnknownKind(u8),
    /// An accept assigned conv 0, which is reserved.
    #[error("conv 0 is reserved")]
    ZeroConv,
}

/// Bytes of the longest control message.
pub const MAX_CONTROL_LEN: usize = 9;

impl Control {
    /// Decodes one control message that fills all of `b`.
    pub fn parse(b: &[u8]) -> Result<Self, ControlError> {
        let (&kind, rest) = b.split_first().ok_or(ControlError::Truncated(0))?;
        let want = match kind {
            1 | 2 => 8,
            3 | 4 => 5,
            k => return Err(ControlError::UnknownKind(k)),
        };
        if rest.len() < want {
            return Err(ControlError::Truncated(b.len()));
        }
        if rest.len() > want {
            return Err(ControlError::Trailing(rest.len() - want));
        }
        let a = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
        Ok(match kind {
            1 | 2 => {
                let c = u32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]);
                if kind == 1 {
                    Self::Open {
                        request: a,
                        resume: (c != 0).then_some(ConvId(c)),
                    }
                } else if c == 0 {
                    return Err(ControlError::ZeroConv);
                } else {
                    Self::Accept {
                        request: a,
                        conv: ConvId(c),
                    }
                }
            }
            3 => Self::Reject {
                request: a,
                reason: CloseReason::from_byte(rest[4]),
            },
            _ => Self::Close {
                conv: ConvId(a),
                reason: CloseReason::from_byte(rest[4]),
            },
        })
    }

    /// Appends the encoded message to `out`.
    pub fn emit(&self, out: &mut Vec<u8>) {
        match *self {
            Self::Open { request, resume } => {
                out.push(1);
                out.extend_from_slice(&request.to_be_bytes());
                out.extend_from_slice(&resume.map_or(0, |c| c.0).to_be_bytes());
            }
            Self::Accept { request, conv } => {
                out.push(2);
                out.extend_from_slice(&request.to_be_bytes());
                out.extend_from_slice(&conv.0.to_be_bytes());
            }
            Self::Reject { request, reason } => {
                out.push(3);
                out.extend_from_slice(&request.to_be_bytes());
                out.push(reason.to_byte());
            }
            Self::Close { conv, reason } => {
                out.push(4);
                out.extend_from_slice(&conv.0.to_be_bytes());
                out.push(reason.to_byte());
            }
        }
    }

    /// The encoded message.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(MAX_CONTROL_LEN);
        self.emit(&mut v);
        v
    }
}

/// What became of an [`Opener`]'s request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenOutcome {
    /// The exit assigned this conv.
    Accepted(ConvId),
    /// The exit refused.
    Rejected(CloseReason),
    /// No answer came before the connect timeout.
    TimedOut,
    /// The peer's own Open crossed ours and this end answered it (see
    /// [`answers_crossed_open`]): the session it made, on this conv, is the one both ends use.
    OpenedByPeer(ConvId),
}

/// Both ends asked for a session at the same time (each has an [`Opener`] running, or a
/// session its Open made a moment ago, when the other's Open arrives): whether this end
/// answers the peer's Open, or leaves it unanswered and keeps its own.
///
/// Seed 003 leaves this open. Ours: **the Open of the end with the lower public key wins.** The
/// end with the higher key answers the Open it received, as it would any other, and takes
/// the session that answer made as the outcome of its own attempt
/// ([`Opener::handle_opened_by_peer`]); the lower end ignores the crossing Open, its own
/// being answered. The rule depends on nothing but the two keys, so the two ends always
/// agree, and a pair that opens at once ends with one session, not two that replace each
/// other.
pub fn answers_crossed_open(own_key: &[u8; 32], peer_key: &[u8; 32]) -> bool {
    own_key > peer_key
}

/// The client side of the conv assignment: asks until the exit answers or time runs out.
///
/// Sans-IO: after [`Opener::new`] and after every input or timeout, take messages with
/// [`Opener::poll_transmit`] until `None`, then check [`Opener::outcome`], then sleep until
/// [`Opener::poll_timeout`].
#[derive(Debug)]
pub struct Opener {
    request: u32,
    resume: Option<ConvId>,
    next_send: Option<Instant>,
    retry: Duration,
    deadline: Instant,
    outcome: Option<OpenOutcome>,
}

impl Opener {
    /// Starts asking at `now`. `request` should be fresh for each attempt (the caller's RNG or
    /// a counter); `timeout` bounds the whole attempt; the request is repeated every `retry`
    /// because the side channel may drop it while the peer is offline.
    pub fn new(
        now: Instant,
        request: u32,
        resume: Option<ConvId>,
        retry: Duration,
        timeout: Duration,
    ) -> Self {
        Self {
            request,
            resume,
            next_send: Some(now),
            retry,
            deadline: now + timeout,
            outcome: None,
        }
    }

    /// A control message to send now, if one is due.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Control> {
        if self.outcome.is_some() || self.next_send? > now {
            return None;
        }
        self.next_send = Some(now + self.retry);
        Some(Control::Open {
            request: self.request,
            resume: self.resume,
        })
    }

    /// Feeds a control message from the exit. Answers to other requests are ignored.
    pub fn handle_control(&mut self, msg: Control) {
        if self.outcome.is_some() {
            return;
        }
        match msg {
            Control::Accept { request, conv } if request == self.request => {
                self.outcome = Some(OpenOutcome::Accepted(conv));
            }
            Control::Reject { request, reason } if request == self.request => {
                self.outcome = Some(OpenOutcome::Rejected(reason));
            }
            _ => {}
        }
    }

    /// The peer's Open crossed ours and was answered here (this end has the higher key):
    /// the session on `conv` is the outcome of this attempt too.
    pub fn handle_opened_by_peer(&mut self, conv: ConvId) {
        if self.outcome.is_none() {
            self.outcome = Some(OpenOutcome::OpenedByPeer(conv));
        }
    }

    /// Advances time: past the deadline the attempt has timed out.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.outcome.is_none() && now >= self.deadline {
            self.outcome = Some(OpenOutcome::TimedOut);
        }
    }

    /// When to call [`Opener::handle_timeout`] and [`Opener::poll_transmit`] next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.outcome.is_some() {
            return None;
        }
        Some(
            self.next_send
                .map_or(self.deadline, |t| t.min(self.deadline)),
        )
    }

    /// The result, once there is one.
    pub fn outcome(&self) -> Option<OpenOutcome> {
        self.outcome
    }
}

/// The exit side of the conv assignment for one client.
///
/// Convs are `mix(epoch-relative time, client key, counter)`, as seed 000 derives them from
/// relative time and the client id, so that a packet of an earlier incarnation of a session
/// never matches a new one.
#[derive(Debug)]
pub struct Acceptor {
    epoch: Instant,
    salt: u64,
    counter: u32,
    current: Option<ConvId>,
    /// The request that was given `current`: the opener resends its request until an answer
    /// arrives, so a repeat of it must get the same conv, not replace the session the first
    /// answer (still on its way) started.
    current_request: Option<u32>,
}

impl Acceptor {
    /// An acceptor for the client whose public key is `client_key`.
    pub fn new(epoch: Instant, client_key: &[u8]) -> Self {
        // FNV-1a: a stable, dependency-free fold of the key into the salt.
        let salt = client_key.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
        Self {
            epoch,
            salt,
            counter: 0,
            current: None,
            current_request: None,
        }
    }

    /// Answers an `Open`. A request to resume the conv this client already holds keeps it,
    /// so its streams survive the client's reconnect, and a resent request gets the answer it
    /// got the first time; anything else gets a fresh conv.
    /// Returns the answer and whether it is a new session.
    pub fn handle_open(
        &mut self,
        now: Instant,
        request: u32,
        resume: Option<ConvId>,
    ) -> (Control, bool) {
        if let Some(have) = self.current
            && (resume == Some(have) || self.current_request == Some(request))
        {
            return (
                Control::Accept {
                    request,
                    conv: have,
                },
                false,
            );
        }
        let conv = self.fresh(now);
        self.current = Some(conv);
        self.current_request = Some(request);
        (Control::Accept { request, conv }, true)
    }

    /// The session `conv` ended; a later resume of it gets a fresh conv.
    pub fn forget(&mut self, conv: ConvId) {
        if self.current == Some(conv) {
            self.current = None;
            self.current_request = None;
        }
    }

    /// The conv currently assigned to this client.
    pub fn current(&self) -> Option<ConvId> {
        self.current
    }

    fn fresh(&mut self, now: Instant) -> ConvId {
        loop {
            self.counter = self.counter.wrapping_add(1);
            let t = now.saturating_duration_since(self.epoch).as_nanos() as u64;
            let mut x = self.salt ^ t.rotate_left(17) ^ u64::from(self.counter);
            // splitmix64 finaliser: spreads every input bit over the output.
            x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            x ^= x >> 31;
            let conv = x as u32 ^ (x >> 32) as u32;
            if conv != 0 && Some(ConvId(conv)) != self.current {
                return ConvId(conv);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Of two ends with different keys exactly one answers a crossed Open, whichever end
        /// asks.
        #[test]
        fn exactly_one_end_answers_a_crossed_open(a in any::<[u8; 32]>(), b in any::<[u8; 32]>()) {
            prop_assume!(a != b);
            prop_assert!(answers_crossed_open(&a, &b) != answers_crossed_open(&b, &a));
        }
    }

    #[test]
    fn the_lower_keys_open_wins() {
        let (low, high) = ([1u8; 32], [2u8; 32]);
        assert!(answers_crossed_open(&high, &low), "the higher end answers");
        assert!(
            !answers_crossed_open(&low, &high),
            "the lower end waits for its answer"
        );
    }

    #[test]
    fn an_opener_whose_peer_opened_first_ends_with_that_session() {
        let now = Instant::now();
        let mut opener = Opener::new(now, 7, None, Duration::from_secs(1), Duration::from_secs(5));
        assert!(opener.poll_transmit(now).is_some());
        opener.handle_opened_by_peer(ConvId(42));
        assert_eq!(
            opener.outcome(),
            Some(OpenOutcome::OpenedByPeer(ConvId(42)))
        );
        assert_eq!(
            opener.poll_transmit(now + Duration::from_secs(2)),
            None,
            "asks no more"
        );
        assert_eq!(opener.poll_timeout(), None);
        // A late answer to its own Open changes nothing.
        opener.handle_control(Control::Accept {
            request: 7,
            conv: ConvId(9),
        });
        assert_eq!(
            opener.outcome(),
            Some(OpenOutcome::OpenedByPeer(ConvId(42)))
        );
    }

    fn any_reason() -> impl Strategy<Value = CloseReason> {
        any::<u8>().prop_map(CloseReason::from_byte)
    }

    fn any_control() -> impl Strategy<Value = Control> {
        prop_oneof![
            (any::<u32>(), any::<u32>()).prop_map(|(request, c)| Control::Open {
                request,
                resume: (c != 0).then_some(ConvId(c)),
            }),
            (any::<u32>(), 1..=u32::MAX).prop_map(|(request, c)| Control::Accept {
                request,
                conv: ConvId(c),
            }),
            (any::<u32>(), any_reason())
                .prop_map(|(request, reason)| Control::Reject { request, reason }),
            (any::<u32>(), any_reason()).prop_map(|(c, reason)| Control::Close {
                conv: ConvId(c),
                reason,
            }),
        ]
    }

    proptest! {
        #[test]
        fn control_round_trips(msg in any_control()) {
            prop_assert_eq!(Control::parse(&msg.to_vec()), Ok(msg));
        }

        #[test]
        fn control_parse_never_panics(b in proptest::collection::vec(any::<u8>(), 0..16)) {
            let _ = Control::parse(&b);
        }
    }

    #[test]
    fn bad_control_messages() {
        assert_eq!(Control::parse(&[]), Err(ControlError::Truncated(0)));
        assert_eq!(Control::parse(&[9]), Err(ControlError::UnknownKind(9)));
        assert_eq!(Control::parse(&[1, 0, 0]), Err(ControlError::Truncated(3)));
        assert_eq!(
            Control::parse(&[4, 0, 0, 0, 1, 0, 7]),
            Err(ControlError::Trailing(1))
        );
        assert_eq!(
            Control::parse(&[2, 0, 0, 0, 1, 0, 0, 0, 0]),
            Err(ControlError::ZeroConv)
        );
    }

    #[test]
    fn opener_retries_until_answered() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut o = Opener::new(t0, 42, None, s, 10 * s);
        assert!(o.poll_transmit(t0).is_some());
        assert_eq!(o.poll_transmit(t0), None, "not again before the retry");
        assert_eq!(o.poll_timeout(), Some(t0 + s));
        assert!(o.poll_transmit(t0 + s).is_some());
        o.handle_control(Control::Accept {
            request: 41,
            conv: ConvId(5),
        });
        assert_eq!(o.outcome(), None, "answer to another request");
        o.handle_control(Control::Accept {
            request: 42,
            conv: ConvId(5),
        });
        assert_eq!(o.outcome(), Some(OpenOutcome::Accepted(ConvId(5))));
        assert_eq!(o.poll_timeout(), None);
    }

    #[test]
    fn opener_times_out_and_sees_rejects() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut o = Opener::new(t0, 1, None, s, 3 * s);
        o.handle_timeout(t0 + 2 * s);
        assert_eq!(o.outcome(), None);
        o.handle_timeout(t0 + 3 * s);
        assert_eq!(o.outcome(), Some(OpenOutcome::TimedOut));

        let mut o = Opener::new(t0, 1, None, s, 3 * s);
        o.handle_control(Control::Reject {
            request: 1,
            reason: CloseReason::NotAllowed,
        });
        assert_eq!(
            o.outcome(),
            Some(OpenOutcome::Rejected(CloseReason::NotAllowed))
        );
    }

    #[test]
    fn acceptor_resumes_only_the_current_conv() {
        let t0 = Instant::now();
        let mut a = Acceptor::new(t0, b"client key");
        let (Control::Accept { conv: c1, .. }, true) = a.handle_open(t0, 1, None) else {
            panic!("fresh session expected");
        };
        assert_ne!(c1.0, 0);
        let (msg, new) = a.handle_open(t0, 2, Some(c1));
        assert_eq!(
            (msg, new),
            (
                Control::Accept {
                    request: 2,
                    conv: c1
                },
                false
            )
        );
        let (Control::Accept { conv: c2, .. }, true) = a.handle_open(t0, 3, Some(ConvId(77)))
        else {
            panic!("unknown resume gets a fresh conv");
        };
        assert_ne!(c1, c2);
        a.forget(c2);
        let (Control::Accept { conv: c3, .. }, true) = a.handle_open(t0, 4, Some(c2)) else {
            panic!("forgotten conv is not resumed");
        };
        assert_ne!(c3, c2);
    }

    /// The opener resends until answered; when its first `Open` and a resend cross the
    /// first answer, both must name one conv (CI saw a client and an exit on two convs,
    /// each timing out after 40 s).
    #[test]
    fn acceptor_answers_a_resent_open_with_the_same_conv() {
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(1);
        let mut a = Acceptor::new(t0, b"client key");
        let (first, true) = a.handle_open(t0, 9, None) else {
            panic!("fresh session expected");
        };
        assert_eq!(a.handle_open(later, 9, None), (first, false));
        let (Control::Accept { conv: other, .. }, true) = a.handle_open(later, 10, None) else {
            panic!("a new request is a new session");
        };
        let Control::Accept { conv: first, .. } = first else {
            panic!("an accept expected");
        };
        assert_ne!(other, first);
        a.forget(other);
        let (_, fresh) = a.handle_open(later, 10, None);
        assert!(fresh, "a request whose session ended starts a new one");
    }
}
