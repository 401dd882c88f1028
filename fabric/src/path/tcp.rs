//! Session packets over a punched TCP link (TLS 1.3, see [`crate::punch::tcp`]).
//!
//! ```text
//!  frame      len u16 BE | session packet [len]
//!  keepalive  len = 0, sent after `keepalive` without any frame going out
//! ```
//!
//! Two tasks per link, a reader and a writer, so that a peer that stops reading can never
//! stop us from reading (a single task doing both could deadlock with a peer doing the same).
//! The link is dead when nothing arrived for `dead_after` (keepalives included), or when the
//! connection fails.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::punch::driver::{LinkEvent, LinkSendError};
use crate::time::Duration;

/// The largest packet a frame carries.
pub const MAX_FRAME: usize = u16::MAX as usize;

/// How many packets may wait for the writer.
const QUEUE: usize = 1024;

/// A running TCP link. Dropping it stops both tasks.
#[derive(Debug)]
pub struct TcpLink {
    sender: TcpLinkSender,
    events: mpsc::Receiver<LinkEvent>,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

/// Sends session packets on a [`TcpLink`].
#[derive(Debug, Clone)]
pub struct TcpLinkSender(mpsc::Sender<Vec<u8>>);

impl TcpLink {
    /// Runs the link on an established (TLS) stream.
    pub fn spawn<S>(stream: S, keepalive: Duration, dead_after: Duration) -> Self
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (read, write) = tokio::io::split(stream);
        let (sender, packets) = mpsc::channel(QUEUE);
        let (event_tx, events) = mpsc::channel(256);
        let dead_tx = event_tx.clone();
        let reader = tokio::spawn(read_frames(read, dead_after, event_tx));
        let writer = tokio::spawn(async move {
            if let Err(error) = write_frames(write, packets, keepalive).await {
                tracing::debug!(%error, "tcp link write failed");
                let _ = dead_tx.send(LinkEvent::Dead).await;
            }
        });
        Self {
            sender: TcpLinkSender(sender),
            events,
            reader,
            writer,
        }
    }

    /// A handle for sending session packets.
    pub fn sender(&self) -> TcpLinkSender {
        self.sender.clone()
    }

    /// The next event: [`LinkEvent::Data`] or [`LinkEvent::Dead`]; `None` once both tasks
    /// have ended.
    pub async fn next_event(&mut self) -> Option<LinkEvent> {
        self.events.recv().await
    }
}

impl Drop for TcpLink {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
    }
}

impl TcpLinkSender {
    /// Queues a session packet without waiting.
    pub fn try_send(&self, packet: impl AsRef<[u8]>) -> Result<(), LinkSendError> {
        let packet = packet.as_ref();
        if packet.len() > MAX_FRAME || packet.is_empty() {
            // Not a session packet; the session never makes these.
            return Ok(());
        }
        self.0.try_send(packet.to_vec()).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => LinkSendError::Full,
            mpsc::error::TrySendError::Closed(_) => LinkSendError::Closed,
        })
    }

    /// Queues a session packet, waiting while the writer is behind.
    pub async fn send(&self, packet: impl AsRef<[u8]>) -> Result<(), LinkSendError> {
        let packet = packet.as_ref();
        if packet.len() > MAX_FRAME || packet.is_empty() {
            return Ok(());
        }
        self.0
            .send(packet.to_vec())
            .await
            .map_err(|_| LinkSendError::Closed)
    }
}

async fn read_frames<R: AsyncRead + Unpin>(
    mut read: R,
    dead_after: Duration,
    events: mpsc::Sender<LinkEvent>,
) {
    let mut buf = vec![0u8; MAX_FRAME];
    loop {
        let frame = async {
            let len = usize::from(read.read_u16().await?);
            read.read_exact(&mut buf[..len]).await?;
            Ok::<usize, std::io::Error>(len)
        };
        let len = match tokio::time::timeout(dead_after, frame).await {
            Ok(Ok(len)) => len,
            Ok(Err(error)) => {
                tracing::debug!(%error, "tcp link read failed");
                break;
            }
            Err(_) => {
                tracing::debug!(?dead_after, "tcp link silent");
                break;
            }
        };
        if len > 0
            && events
                .send(LinkEvent::Data(buf[..len].to_vec()))
                .await
                .is_err()
        {
            return;
        }
    }
    let _ = events.send(LinkEvent::Dead).await;
}

async fn write_frames<W: AsyncWrite + Unpin>(
    write: W,
    mut packets: mpsc::Receiver<Vec<u8>>,
    keepalive: Duration,
) -> std::io::Result<()> {
    let mut write = BufWriter::with_capacity(64 * 1024, write);
    loop {
        let packet = match tokio::time::timeout(keepalive, packets.recv()).await {
            Ok(Some(packet)) => Some(packet),
            Ok(None) => return Ok(()),
            Err(_) => None,
        };
        match packet {
            Some(packet) => {
                put(&mut write, &packet).await?;
                // Take what else is queued, then flush once for the lot.
                while let Ok(packet) = packets.try_recv() {
                    put(&mut write, &packet).await?;
                }
            }
            None => write.write_u16(0).await?,
        }
        write.flush().await?;
    }
}

async fn put<W: AsyncWrite + Unpin>(write: &mut W, packet: &[u8]) -> std::io::Result<()> {
    // Senders refuse empty and oversized packets, so the length fits and is never 0.
    let len = u16::try_from(packet.len()).unwrap_or(u16::MAX);
    write.write_u16(len).await?;
    write.write_all(&packet[..usize::from(len)]).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn packets_cross_in_order_and_keepalives_hold_the_link() {
        let (a, b) = tokio::io::duplex(4096);
        let keep = Duration::from_millis(20);
        let dead = Duration::from_millis(200);
        let a = TcpLink::spawn(a, keep, dead);
        let mut b = TcpLink::spawn(b, keep, dead);
        let tx = a.sender();
        for i in 0..500u32 {
            let packet = vec![(i % 251) as u8; 1 + (i as usize * 7) % 1400];
            tx.send(packet).await.unwrap();
        }
        for i in 0..500u32 {
            let Some(LinkEvent::Data(p)) = b.next_event().await else {
                panic!("link ended early")
            };
            assert_eq!(p, vec![(i % 251) as u8; 1 + (i as usize * 7) % 1400]);
        }
        // Idle for longer than `dead_after`: keepalives keep both ends alive.
        let quiet = tokio::time::timeout(Duration::from_millis(500), b.next_event()).await;
        assert!(quiet.is_err(), "{quiet:?}");
        drop(a);
    }

    #[tokio::test]
    async fn a_closed_or_silent_peer_makes_the_link_dead() {
        let (a, b) = tokio::io::duplex(4096);
        let mut a = TcpLink::spawn(a, Duration::from_secs(10), Duration::from_secs(10));
        drop(b);
        assert_eq!(a.next_event().await, Some(LinkEvent::Dead));

        // A peer that says nothing at all (no keepalives) is dead after `dead_after`.
        let (a, _b) = tokio::io::duplex(4096);
        let mut a = TcpLink::spawn(a, Duration::from_secs(10), Duration::from_millis(50));
        let started = std::time::Instant::now();
        assert_eq!(a.next_event().await, Some(LinkEvent::Dead));
        assert!(started.elapsed() >= Duration::from_millis(50));
    }

    #[tokio::test]
    async fn garbage_lengths_never_panic() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut a = TcpLink::spawn(a, Duration::from_secs(10), Duration::from_millis(200));
        // A frame claiming 65,535 bytes and then closing: dead, no panic.
        b.write_all(&[0xff, 0xff, 1, 2, 3]).await.unwrap();
        drop(b);
        assert_eq!(a.next_event().await, Some(LinkEvent::Dead));
    }
}
