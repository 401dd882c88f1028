//! Copying bytes both ways between a client and the stream a dialer opened.
//!
//! `tokio::io::copy_bidirectional_with_sizes` already does the hard parts: half-close (EOF on
//! one side becomes a `shutdown` of the other while the reverse direction keeps flowing) and
//! big buffers, so a bulk transfer costs one read and one write system call per 256 KiB. What
//! it lacks is an idle timeout: here both streams count their traffic into one shared counter,
//! and a watchdog in the same task ends the relay when the counter stops moving.
//!
//! Between two TCP sockets on Linux, [`relay_tcp`] uses `splice` instead (see `splice.rs`).

#[cfg(target_os = "linux")]
mod splice;

#[cfg(target_os = "linux")]
use std::any::Any;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
#[cfg(target_os = "linux")]
use tracing::debug;

use crate::dialer::BoxedStream;

/// Buffer per direction. Loopback throughput rises steeply up to ~128 KiB and flattens after
/// 256 KiB; two buffers per connection is 512 KiB, fine for thousands of connections.
pub const BUF_SIZE: usize = 256 * 1024;

/// How a relay ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transferred {
    /// Bytes from the client to the target.
    pub up: u64,
    /// Bytes from the target to the client.
    pub down: u64,
}

/// Relays between a client socket and whatever a dialer opened. When both ends are TCP
/// sockets (direct mode), Linux moves the bytes with `splice` and they never enter this
/// process; otherwise (a mux stream, an upgraded HTTP connection) it copies through buffers.
pub async fn relay_tcp(
    client: &mut TcpStream,
    upstream: &mut BoxedStream,
    idle: Option<Duration>,
) -> io::Result<Transferred> {
    #[cfg(target_os = "linux")]
    {
        let any: &mut dyn Any = &mut **upstream;
        if let Some(tcp) = any.downcast_mut::<TcpStream>()
            && splice_enabled()
        {
            match splice::Pipes::new() {
                Ok(pipes) => {
                    let activity = AtomicU64::new(0);
                    let work = splice::relay(client, tcp, pipes, &activity);
                    return watch(work, &activity, idle).await;
                }
                Err(err) => debug!(%err, "no pipes for splice, copying instead"),
            }
        }
    }
    relay(client, upstream, idle).await
}

/// `PROXY_RELAY=copy` turns splicing off (for comparing the two in benchmarks).
#[cfg(target_os = "linux")]
fn splice_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("PROXY_RELAY").is_none_or(|v| v != "copy"))
}

/// Relays between `client` and `target` through user-space buffers until both directions
/// are closed, an error occurs, or nothing moved for `idle` (when `idle` is `Some`).
pub async fn relay<A, B>(
    client: &mut A,
    target: &mut B,
    idle: Option<Duration>,
) -> io::Result<Transferred>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    if idle.is_none() {
        let (up, down) =
            tokio::io::copy_bidirectional_with_sizes(client, target, BUF_SIZE, BUF_SIZE).await?;
        return Ok(Transferred { up, down });
    }
    let activity = Arc::new(AtomicU64::new(0));
    let mut client = Counted {
        inner: client,
        activity: activity.clone(),
    };
    let mut target = Counted {
        inner: target,
        activity: activity.clone(),
    };
    let copy = async {
        let (up, down) =
            tokio::io::copy_bidirectional_with_sizes(&mut client, &mut target, BUF_SIZE, BUF_SIZE)
                .await?;
        Ok(Transferred { up, down })
    };
    watch(copy, &activity, idle).await
}

/// Runs `work` and fails it with `TimedOut` once `activity` stopped changing for `idle`.
async fn watch<T>(
    work: impl Future<Output = io::Result<T>>,
    activity: &AtomicU64,
    idle: Option<Duration>,
) -> io::Result<T> {
    let Some(idle) = idle else {
        return work.await;
    };
    tokio::pin!(work);
    // Checking twice per period bounds the overshoot to half a period without waking often:
    // a relay ends between `idle` and 1.5 × `idle` after its last byte.
    let mut tick = tokio::time::interval(idle / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut seen = activity.load(Ordering::Relaxed);
    let mut quiet_ticks = 0;
    loop {
        tokio::select! {
            res = &mut work => return res,
            _ = tick.tick() => {
                let now = activity.load(Ordering::Relaxed);
                if now == seen {
                    quiet_ticks += 1;
                    if quiet_ticks >= 2 {
                        return Err(io::Error::new(io::ErrorKind::TimedOut, "idle timeout"));
                    }
                } else {
                    seen = now;
                    quiet_ticks = 0;
                }
            }
        }
    }
}

/// Counts successful reads and writes into a shared counter (a change is all the watchdog
/// needs; the counter is not a byte count).
struct Counted<'a, T: ?Sized> {
    inner: &'a mut T,
    activity: Arc<AtomicU64>,
}

impl<T: AsyncRead + Unpin + ?Sized> AsyncRead for Counted<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let res = Pin::new(&mut *self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = res {
            self.activity.fetch_add(1, Ordering::Relaxed);
        }
        res
    }
}

impl<T: AsyncWrite + Unpin + ?Sized> AsyncWrite for Counted<'_, T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut *self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(_)) = res {
            self.activity.fetch_add(1, Ordering::Relaxed);
        }
        res
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn relays_both_ways_with_half_close() {
        let (mut client, mut proxy_a) = tokio::io::duplex(1024);
        let (mut proxy_b, mut server) = tokio::io::duplex(1024);
        let relay = tokio::spawn(async move {
            relay(&mut proxy_a, &mut proxy_b, Some(Duration::from_secs(30))).await
        });
        client.write_all(b"request").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"request");
        // The other direction still flows after the client half-closed.
        server.write_all(b"response").await.unwrap();
        server.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"response");
        let t = relay.await.unwrap().unwrap();
        assert_eq!(t, Transferred { up: 7, down: 8 });
    }

    #[tokio::test(start_paused = true)]
    async fn idle_relay_times_out_and_busy_one_does_not() {
        let (mut client, mut proxy_a) = tokio::io::duplex(1024);
        let (mut proxy_b, mut server) = tokio::io::duplex(1024);
        let relay = tokio::spawn(async move {
            relay(&mut proxy_a, &mut proxy_b, Some(Duration::from_secs(10))).await
        });
        // Traffic every 4 s keeps it alive well past the 10 s limit.
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_secs(4)).await;
            client.write_all(b"x").await.unwrap();
            let mut b = [0; 1];
            server.read_exact(&mut b).await.unwrap();
        }
        assert!(!relay.is_finished());
        tokio::time::sleep(Duration::from_secs(16)).await;
        let err = relay.await.unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    /// A connected pair of loopback TCP sockets.
    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    #[tokio::test]
    async fn tcp_relay_moves_every_byte_and_half_closes() {
        let (mut client, mut proxy_client) = tcp_pair().await;
        let (proxy_up, mut server) = tcp_pair().await;
        let relay = tokio::spawn(async move {
            let mut up: BoxedStream = Box::new(proxy_up);
            relay_tcp(&mut proxy_client, &mut up, Some(Duration::from_secs(30))).await
        });
        let data: Vec<u8> = (0..8 * 1024 * 1024 + 3)
            .map(|i: u32| (i * 7 + i / 4099) as u8)
            .collect();
        let send = data.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&send).await.unwrap();
            client.shutdown().await.unwrap();
            client
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert!(
            got == data,
            "upload corrupted ({} of {} bytes)",
            got.len(),
            data.len()
        );
        let mut client = writer.await.unwrap();
        // After the client's EOF the server can still answer.
        server.write_all(&data[..1000]).await.unwrap();
        server.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, &data[..1000]);
        let t = relay.await.unwrap().unwrap();
        assert_eq!(
            t,
            Transferred {
                up: data.len() as u64,
                down: 1000
            }
        );
    }

    #[tokio::test]
    async fn tcp_relay_idle_timeout() {
        let (_client, mut proxy_client) = tcp_pair().await;
        let (proxy_up, _server) = tcp_pair().await;
        let mut up: BoxedStream = Box::new(proxy_up);
        let start = std::time::Instant::now();
        let err = relay_tcp(&mut proxy_client, &mut up, Some(Duration::from_millis(200)))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(start.elapsed() < Duration::from_secs(2));
    }
}
