//! Session settings and the KCP mode presets.

use crate::time::Duration;

/// How aggressively KCP retransmits, as kcptun names its presets.
///
/// Every preset turns KCP's congestion window off (`nc = 1`), as kcptun's do: the session
/// bounds what is in flight with its send window instead, sized to the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum KcpMode {
    /// `nodelay 0, interval 40 ms, resend 2`.
    Normal,
    /// `nodelay 0, interval 30 ms, resend 2`.
    Fast,
    /// `nodelay 1, interval 20 ms, resend 2`.
    Fast2,
    /// `nodelay 1, interval 10 ms, resend 2`: the default.
    Fast3,
    /// Explicit settings.
    Manual {
        /// KCP's `nodelay`: minimum RTO 30 ms instead of 100 ms, gentler RTO backoff.
        nodelay: bool,
        /// Flush interval in milliseconds (10..=5000).
        interval_ms: u32,
        /// Fast retransmit after this many later segments were acknowledged (0 = off).
        resend: u32,
        /// Disable the congestion window.
        no_cwnd: bool,
    },
}

impl KcpMode {
    /// `(nodelay, interval_ms, resend, no_cwnd)`.
    pub(crate) fn params(self) -> (bool, u32, u32, bool) {
        match self {
            Self::Normal => (false, 40, 2, true),
            Self::Fast => (false, 30, 2, true),
            Self::Fast2 => (true, 20, 2, true),
            Self::Fast3 => (true, 10, 2, true),
            Self::Manual {
                nodelay,
                interval_ms,
                resend,
                no_cwnd,
            } => (nodelay, interval_ms.clamp(10, 5000), resend, no_cwnd),
        }
    }
}

impl std::str::FromStr for KcpMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "normal" => Ok(Self::Normal),
            "fast" => Ok(Self::Fast),
            "fast2" => Ok(Self::Fast2),
            "fast3" => Ok(Self::Fast3),
            other => Err(format!(
                "unknown KCP mode {other:?}: expected normal, fast, fast2 or fast3"
            )),
        }
    }
}

/// Settings of one session.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Config {
    /// Largest session packet the path carries (a Tox custom packet holds 1,373 bytes with
    /// its id byte, so 1,372 there).
    pub mtu: usize,
    /// Retransmission behaviour.
    pub mode: KcpMode,
    /// Segments KCP may have in flight. Must cover about twice the bandwidth-delay product
    /// for full speed under loss: 2,048 × 1.3 KB ≈ 2.7 MB, enough for 100 Mbit/s at 100 ms.
    pub send_window: u16,
    /// Segments KCP accepts ahead of the next in-order one, on each lane: the per-lane cap on
    /// out-of-order buffering.
    pub recv_window: u16,
    /// Smallest retransmission timeout; `None` keeps the mode's (30 ms with nodelay).
    pub min_rto: Option<Duration>,
    /// A ping goes out when nothing was sent for this long, holding NAT mappings open and
    /// proving the peer alive.
    pub keepalive: Duration,
    /// The session is dead when nothing valid arrived for this long.
    pub idle_timeout: Duration,
    /// The session is dead when something sent that asks for an answer (data, a ping) went
    /// this long without any valid packet back. While it waits, the session probes with a
    /// ping every round trip (100 to 500 ms), so a live peer on a lossy path answers several
    /// times over; a peer that is gone (killed, cut off) is noticed in this time
    /// rather than after [`Config::idle_timeout`].
    pub answer_timeout: Duration,
    /// Outgoing datagrams held while the path is busy; more are dropped (they are
    /// unreliable by contract, and a growing queue would only add latency).
    pub datagram_queue: usize,
    /// Received datagrams held for the application; more are dropped.
    pub datagram_recv_queue: usize,
    /// KCP conversations (lanes) this end spreads its flows over, 1 to 16, so that one
    /// flow's losses do not hold up another's bytes (see [`Session::send_flow`]). It is also
    /// the most this end accepts: packets of higher lanes are refused (counted in
    /// [`Stats::invalid_packets`]), so **the peer must not use more**. Each lane buffers at
    /// most `recv_window` out-of-order segments, so a peer can make a session hold about
    /// `lanes × recv_window × mtu` (4 × 4,096 × 1,372 B ≈ 22 MB by default) plus a partial
    /// record of at most [`MAX_RECORD`] per lane.
    ///
    /// [`Stats::invalid_packets`]: super::Stats::invalid_packets
    /// [`MAX_RECORD`]: super::MAX_RECORD
    ///
    /// [`Session::send_flow`]: super::Session::send_flow
    pub lanes: u8,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            mtu: 1372,
            mode: KcpMode::Fast3,
            send_window: 4096,
            recv_window: 4096,
            min_rto: None,
            keepalive: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(40),
            answer_timeout: Duration::from_secs(5),
            datagram_queue: 256,
            datagram_recv_queue: 1024,
            lanes: 4,
        }
    }
}

impl Config {
    /// The largest payload a session with this configuration takes as one datagram.
    pub fn max_datagram(&self) -> usize {
        self.mtu.saturating_sub(super::packet::DATAGRAM_OVERHEAD)
    }
}
