//! What this node did with each peer, both ways (issue "Mesh", accounting): the streams and
//! bytes it **served** a peer (as its exit, to its shared ports) and those it **used** the
//! peer for (as its own exit, to the peer's shared ports), and what it refused the peer.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use fabric::id::PublicKey;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::relay::Transferred;

/// Which right a stream used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Right {
    /// An exit request (an address, a name, the resolver).
    Exit,
    /// A shared port.
    Share,
}

/// Which way a stream went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The peer asked, this node served.
    Served,
    /// This node asked, the peer served.
    Used,
}

/// Streams and bytes of one side, by right. "Up" is toward the target: from the peer for
/// what this node served, from this node's applications for what it used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ledger {
    /// Exit streams.
    pub exit_streams: u64,
    /// Exit bytes toward the targets.
    pub exit_up: u64,
    /// Exit bytes back.
    pub exit_down: u64,
    /// Streams to shared ports.
    pub share_streams: u64,
    /// Bytes toward the shared ports.
    pub share_up: u64,
    /// Bytes back from them.
    pub share_down: u64,
}

impl Ledger {
    /// Whether nothing was counted.
    pub fn is_empty(&self) -> bool {
        self.exit_streams + self.share_streams == 0
    }
}

/// One peer's figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerCounts {
    /// What this node served the peer.
    pub served: Ledger,
    /// What this node used the peer for.
    pub used: Ledger,
    /// The peer's requests refused for want of a right.
    pub refused: u64,
}

/// Every peer's [`PeerCounts`].
#[derive(Debug, Default)]
pub struct PeerAccounts {
    by_peer: Mutex<HashMap<PublicKey, PeerCounts>>,
}

/// Peers counted at most: beyond this many the figures of new ones are dropped rather than
/// let strangers (refused ones, say) grow the table.
const MAX_PEERS: usize = 4096;

impl PeerAccounts {
    fn with(&self, pk: PublicKey, f: impl FnOnce(&mut PeerCounts)) {
        let mut map = self.by_peer.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_PEERS && !map.contains_key(&pk) {
            return;
        }
        f(map.entry(pk).or_default());
    }

    fn ledger(counts: &mut PeerCounts, side: Side) -> &mut Ledger {
        match side {
            Side::Served => &mut counts.served,
            Side::Used => &mut counts.used,
        }
    }

    /// A stream with `pk` started, on `side`, under `right`.
    pub fn opened(&self, pk: PublicKey, side: Side, right: Right) {
        self.with(pk, |c| {
            let l = Self::ledger(c, side);
            match right {
                Right::Exit => l.exit_streams += 1,
                Right::Share => l.share_streams += 1,
            }
        });
    }

    /// A stream with `pk`, on `side` under `right`, ended having moved `t`.
    pub fn relayed(&self, pk: PublicKey, side: Side, right: Right, t: Transferred) {
        self.with(pk, |c| {
            let l = Self::ledger(c, side);
            match right {
                Right::Exit => {
                    l.exit_up += t.up;
                    l.exit_down += t.down;
                }
                Right::Share => {
                    l.share_up += t.up;
                    l.share_down += t.down;
                }
            }
        });
    }

    /// A request of `pk` was refused for want of a right.
    pub fn refused(&self, pk: PublicKey) {
        self.with(pk, |c| c.refused += 1);
    }

    /// The figures of `pk`.
    pub fn of(&self, pk: &PublicKey) -> PeerCounts {
        let map = self.by_peer.lock().unwrap_or_else(|e| e.into_inner());
        map.get(pk).copied().unwrap_or_default()
    }

    /// Every counted peer's figures.
    pub fn all(&self) -> Vec<(PublicKey, PeerCounts)> {
        let map = self.by_peer.lock().unwrap_or_else(|e| e.into_inner());
        map.iter().map(|(k, v)| (*k, *v)).collect()
    }
}

/// A stream this node opened through a peer, counted into its accounts as used when it is
/// dropped: bytes written go up (toward the target), bytes read come down.
#[derive(Debug)]
pub struct Counted {
    inner: crate::dialer::BoxedStream,
    moved: Transferred,
    books: Arc<PeerAccounts>,
    peer: PublicKey,
    right: Right,
}

impl Counted {
    /// Counts `inner`, a stream to `peer` under `right` (the stream counts as opened now).
    pub fn new(
        inner: crate::dialer::BoxedStream,
        books: Arc<PeerAccounts>,
        peer: PublicKey,
        right: Right,
    ) -> Self {
        books.opened(peer, Side::Used, right);
        Self {
            inner,
            moved: Transferred::default(),
            books,
            peer,
            right,
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.books
            .relayed(self.peer, Side::Used, self.right, self.moved);
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.moved.down += (buf.filled().len() - before) as u64;
        r
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.moved.up += n as u64;
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_peer_side_and_right() {
        let (a, b) = (PublicKey([1; 32]), PublicKey([2; 32]));
        let accounts = PeerAccounts::default();
        accounts.opened(a, Side::Served, Right::Exit);
        accounts.relayed(
            a,
            Side::Served,
            Right::Exit,
            Transferred { up: 10, down: 20 },
        );
        accounts.opened(a, Side::Used, Right::Share);
        accounts.relayed(a, Side::Used, Right::Share, Transferred { up: 1, down: 2 });
        accounts.refused(b);
        let got = accounts.of(&a);
        assert_eq!(
            got.served,
            Ledger {
                exit_streams: 1,
                exit_up: 10,
                exit_down: 20,
                ..Ledger::default()
            }
        );
        assert_eq!(
            got.used,
            Ledger {
                share_streams: 1,
                share_up: 1,
                share_down: 2,
                ..Ledger::default()
            }
        );
        assert_eq!(got.refused, 0);
        assert_eq!(accounts.of(&b).refused, 1);
        assert_eq!(accounts.all().len(), 2);
    }
}
