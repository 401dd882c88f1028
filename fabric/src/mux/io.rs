//! The tokio adapter of the mux: a shared [`Handle`], [`Stream`]s that are
//! `AsyncRead + AsyncWrite`, and a driver over any `AsyncRead + AsyncWrite` link.
//!
//! One `std::sync::Mutex` guards the [`Mux`] core and the stream wakers. It is never held
//! across an `.await` (every critical section is a few memcpys), which is why it is not a
//! tokio mutex. The driver side is public so that other drivers, such as the KCP session's,
//! can run the mux over their own link:
//!
//! ```text
//!  Stream::poll_write ─► Handle ─(transmit_ready)─► driver: poll_transmit ─► link
//!  Stream::poll_read  ◄─ Handle ◄─(wake readers)─── driver: handle_input  ◄─ link
//! ```
//!
//! A driver loops: wait for [`Handle::transmit_ready`], then [`Handle::poll_transmit`] into
//! its link; and feeds whatever the link delivers to [`Handle::handle_input`]; when the link
//! dies it calls [`Handle::fail`]. [`run`] does exactly that over an `AsyncRead + AsyncWrite`.

use std::collections::HashMap;
use std::fmt;
use std::future::poll_fn;
use std::io;
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::Notify;

use super::{
    Config, Event, Failure, Mux, OpenError, ProtocolError, Stats, StreamError, StreamId,
    VerifyError,
};

/// Bytes the ready-made driver reads from, and writes to, the link at once.
const LINK_BATCH: usize = 256 * 1024;

/// A shared handle to one mux: open and accept streams, and drive the link. Cheap to clone.
#[derive(Clone)]
pub struct Handle {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled when the core may have frames to transmit (or failed).
    transmit: Notify,
    /// Signalled when a stream arrives (or the mux failed).
    accept: Notify,
}

struct State {
    mux: Mux,
    /// Tasks blocked reading or writing, by stream id.
    wakers: HashMap<u16, Wakers>,
    /// Verification challenges sent, and answered (replies come in order).
    challenges_sent: u64,
    challenges_answered: u64,
}

#[derive(Default)]
struct Wakers {
    read: Option<Waker>,
    write: Option<Waker>,
}

impl State {
    /// Turns the core's events into wakeups, collected to run after the lock is released.
    fn dispatch(&mut self, wake: &mut Vec<Waker>, accept: &mut bool) {
        while let Some(event) = self.mux.poll_event() {
            match event {
                Event::Incoming(_) => *accept = true,
                Event::Readable(id) | Event::Finished(id) => {
                    if let Some(w) = self.wakers.get_mut(&id.0).and_then(|w| w.read.take()) {
                        wake.push(w);
                    }
                }
                Event::Writable(id) => {
                    if let Some(w) = self.wakers.get_mut(&id.0).and_then(|w| w.write.take()) {
                        wake.push(w);
                    }
                }
                // Wakers go with their `Stream` (see its `Drop`).
                Event::Released(_) => {}
                Event::Verified => {
                    self.challenges_answered += 1;
                    *accept = true;
                }
            }
        }
    }

    /// Every waiter, for when the mux failed.
    fn wake_all(&mut self, wake: &mut Vec<Waker>) {
        for (_, w) in self.wakers.drain() {
            wake.extend(w.read);
            wake.extend(w.write);
        }
    }
}

impl fmt::Debug for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handle")
            .field("stats", &self.stats())
            .finish()
    }
}

impl Handle {
    /// A handle around a new mux core.
    pub fn new(config: Config) -> Self {
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    mux: Mux::new(config),
                    wakers: HashMap::new(),
                    challenges_sent: 0,
                    challenges_answered: 0,
                }),
                transmit: Notify::new(),
                accept: Notify::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.shared)
    }

    /// Opens a stream. No round trip: its SYN leaves with the first data written.
    pub fn open(&self) -> Result<Stream, OpenError> {
        let id = self.shared.mutate(|state| state.mux.open())?;
        Ok(Stream {
            shared: self.shared.clone(),
            id,
        })
    }

    /// The next stream the peer opens; `None` once the mux failed.
    pub async fn accept(&self) -> Option<Stream> {
        loop {
            let mut notified = pin!(self.shared.accept.notified());
            notified.as_mut().enable();
            // Taking a stream grows its window, which queues a CFM: through `mutate`.
            let taken = self.shared.mutate(|state| match state.mux.accept() {
                Some(id) => Some(Some(id)),
                None if state.mux.failure().is_some() => Some(None),
                None => None,
            });
            if let Some(taken) = taken {
                return taken.map(|id| Stream {
                    shared: self.shared.clone(),
                    id,
                });
            }
            notified.await;
        }
    }

    /// Counters of the core.
    pub fn stats(&self) -> Stats {
        self.lock().mux.stats()
    }

    /// Why the mux failed, if it did.
    pub fn failure(&self) -> Option<Failure> {
        self.lock().mux.failure().cloned()
    }

    /// Checks that the peer speaks this protocol (seed 004's `IsSmux`): sends the challenge
    /// `(v1, v2)` (pass random values) and resolves when the peer answers it correctly. A
    /// wrong answer fails the mux. Wrap it in a timeout: a peer that ignores the challenge
    /// never answers.
    pub async fn verify(&self, v1: u16, v2: u32) -> Result<(), VerifyError> {
        let target = self.shared.mutate(|state| {
            state.mux.verify(v1, v2)?;
            state.challenges_sent += 1;
            Ok::<_, VerifyError>(state.challenges_sent)
        })?;
        loop {
            // Answers wake the acceptors' notifier too: both wait for "the peer said something".
            let mut notified = pin!(self.shared.accept.notified());
            notified.as_mut().enable();
            {
                let state = self.lock();
                if state.challenges_answered >= target {
                    return Ok(());
                }
                if let Some(failure) = state.mux.failure() {
                    return Err(VerifyError::MuxFailed(failure.clone()));
                }
            }
            notified.await;
        }
    }

    // ---- driver side -------------------------------------------------------------------

    /// Feeds bytes from the link and wakes the streams they concern. An error is fatal: the
    /// mux fails and every stream reports it.
    pub fn handle_input(&self, data: &[u8]) -> Result<(), ProtocolError> {
        let result = self.shared.mutate(|state| state.mux.handle_input(data));
        if result.is_err() {
            self.wake_everyone();
        }
        result
    }

    /// Appends frames for the link (see [`Mux::poll_transmit`]) and wakes whoever that
    /// unblocked. Returns the bytes appended.
    pub fn poll_transmit(&self, budget: usize, out: &mut Vec<u8>) -> usize {
        self.shared
            .mutate(|state| state.mux.poll_transmit(budget, out))
    }

    /// Whether frames are waiting for [`Handle::poll_transmit`].
    pub fn has_transmit(&self) -> bool {
        self.lock().mux.has_transmit()
    }

    /// Resolves when there is something to transmit, or with the failure once the mux failed.
    pub async fn transmit_ready(&self) -> Result<(), Failure> {
        loop {
            let mut notified = pin!(self.shared.transmit.notified());
            notified.as_mut().enable();
            {
                let state = self.lock();
                if let Some(failure) = state.mux.failure() {
                    return Err(failure.clone());
                }
                if state.mux.has_transmit() {
                    return Ok(());
                }
            }
            notified.await;
        }
    }

    /// The link died (or the mux is being shut down): every stream gets an error carrying
    /// `reason`, after the bytes it already received.
    pub fn fail(&self, reason: impl fmt::Display) {
        self.shared
            .mutate(|state| state.mux.fail(Failure::link(reason)));
        self.wake_everyone();
    }

    /// Wakes every stream, acceptor and the driver: the mux failed, each reports it.
    fn wake_everyone(&self) {
        let mut wake = Vec::new();
        self.lock().wake_all(&mut wake);
        wake.into_iter().for_each(Waker::wake);
        self.shared.accept.notify_waiters();
        self.shared.transmit.notify_waiters();
    }
}

impl Shared {
    /// Runs `f` on the core, then turns whatever events it made into wakeups, after the lock
    /// is released. Every core mutation goes through here: an event left in the core wakes
    /// nobody until the next link input, which may never come (review B1: a stream the peer
    /// reopened on an id we held stayed unaccepted once our `Stream` dropped).
    fn mutate<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let mut wake = Vec::new();
        let mut accept = false;
        let (result, transmit) = {
            let mut state = lock(self);
            let result = f(&mut state);
            state.dispatch(&mut wake, &mut accept);
            (result, state.mux.has_transmit())
        };
        wake.into_iter().for_each(Waker::wake);
        if accept {
            self.accept.notify_waiters();
        }
        if transmit {
            self.transmit.notify_one();
        }
        result
    }
}

fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    // A panic while holding the lock leaves the core consistent enough to report errors; do
    // not cascade it into every stream.
    shared
        .state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Why [`run`] stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DriverError {
    /// Reading or writing the link failed.
    #[error("link i/o failed: {0}")]
    Io(#[from] io::Error),
    /// The peer broke the protocol.
    #[error("protocol violation: {0}")]
    Protocol(#[from] ProtocolError),
    /// The mux was failed from outside ([`Handle::fail`]).
    #[error("{0}")]
    Failed(Failure),
}

/// Runs the mux of `handle` over `io` until the link closes or fails. Reads and writes in
/// batches of up to 256 KiB. A clean end of the link returns `Ok`; either way every stream
/// still open then fails with the reason.
pub async fn run<T>(io: T, handle: Handle) -> Result<(), DriverError>
where
    T: AsyncRead + AsyncWrite,
{
    let (mut rd, mut wr) = tokio::io::split(io);
    let reader = async {
        let mut buf = vec![0u8; LINK_BATCH];
        loop {
            let n = rd.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, DriverError>(());
            }
            handle.handle_input(&buf[..n])?;
        }
    };
    let writer = async {
        let mut out = Vec::with_capacity(LINK_BATCH);
        loop {
            if let Err(failure) = handle.transmit_ready().await {
                // Failed from outside: close our sending side so the peer notices.
                let _ = wr.shutdown().await;
                return Err(DriverError::Failed(failure));
            }
            out.clear();
            handle.poll_transmit(LINK_BATCH, &mut out);
            wr.write_all(&out).await?;
        }
    };
    let result = tokio::select! {
        result = reader => result,
        result = writer => result,
    };
    match &result {
        Ok(()) => handle.fail("link closed by peer"),
        Err(error) => handle.fail(error),
    }
    result
}

/// Starts [`run`] over `io` on a new task and returns the handle and the task. The task ends
/// when the link closes or fails, or after [`Handle::fail`]; it holds a handle itself, so
/// dropping the returned one does not stop it.
pub fn spawn<T>(io: T, config: Config) -> (Handle, tokio::task::JoinHandle<Result<(), DriverError>>)
where
    T: AsyncRead + AsyncWrite + Send + 'static,
{
    let handle = Handle::new(config);
    let task = tokio::spawn(run(io, handle.clone()));
    (handle, task)
}

/// One stream of the mux. Reading returns EOF after the peer's FIN; `shutdown` sends our FIN
/// (half close: reading goes on); dropping closes the stream.
pub struct Stream {
    shared: Arc<Shared>,
    id: StreamId,
}

impl fmt::Debug for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stream").field("id", &self.id).finish()
    }
}

/// [`Stream::write_all_timeout`] stopped early; `written` bytes were handed to the mux and
/// will be delivered, the rest was not.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WriteTimeout {
    /// The time ran out.
    #[error("write timed out after {written} bytes were handed to the mux")]
    Elapsed {
        /// Bytes handed to the mux.
        written: usize,
    },
    /// The stream failed.
    #[error("write failed after {written} bytes were handed to the mux: {source}")]
    Failed {
        /// Bytes handed to the mux.
        written: usize,
        /// Why.
        source: StreamError,
    },
}

impl WriteTimeout {
    /// Bytes handed to the mux before the write stopped.
    pub fn written(&self) -> usize {
        match self {
            Self::Elapsed { written } | Self::Failed { written, .. } => *written,
        }
    }
}

impl Stream {
    /// The stream's id.
    pub fn id(&self) -> StreamId {
        self.id
    }

    /// Writes all of `buf` unless `timeout` passes first. On timeout the error tells exactly
    /// how many bytes were handed to the mux (those will be delivered), so the application
    /// can resume without duplicating data (seed 004).
    pub async fn write_all_timeout(
        &mut self,
        buf: &[u8],
        timeout: Duration,
    ) -> Result<(), WriteTimeout> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut written = 0;
        while written < buf.len() {
            let rest = &buf[written..];
            // A write future cancelled by the timeout has handed nothing over: the core takes
            // bytes only in the poll that returns `Ready`.
            let write = poll_fn(|cx| self.poll_write_mux(cx, rest));
            match tokio::time::timeout_at(deadline, write).await {
                Err(_) => return Err(WriteTimeout::Elapsed { written }),
                Ok(Err(source)) => return Err(WriteTimeout::Failed { written, source }),
                Ok(Ok(n)) => written += n,
            }
        }
        Ok(())
    }

    fn poll_write_mux(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<Result<usize, StreamError>> {
        self.shared.mutate(|state| {
            let n = state.mux.write(self.id, buf)?;
            if n == 0 && !buf.is_empty() {
                state.wakers.entry(self.id.0).or_default().write = Some(cx.waker().clone());
                return Poll::Pending;
            }
            Poll::Ready(Ok(n))
        })
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // Reading may make a CFM due: `mutate` tells the driver.
        self.shared.mutate(
            |state| match state.mux.read(self.id, buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    Poll::Ready(Ok(()))
                }
                Err(StreamError::WouldBlock) => {
                    state.wakers.entry(self.id.0).or_default().read = Some(cx.waker().clone());
                    Poll::Pending
                }
                Err(error) => Poll::Ready(Err(error.into())),
            },
        )
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_mux(cx, buf).map_err(io::Error::from)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Bytes the mux accepted are on their way; there is no further buffer to push.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.shared.mutate(|state| state.mux.finish(self.id))?;
        Poll::Ready(Ok(()))
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        // Closing can release the id and let in a stream the peer reopened on it: its
        // `Incoming` must reach the acceptor. Our wakers go first so that events for that
        // successor (same id) never wake this dead stream's tasks.
        self.shared.mutate(|state| {
            state.wakers.remove(&self.id.0);
            state.mux.close(self.id);
        });
    }
}
