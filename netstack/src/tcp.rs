//! The application's side of a TCP flow: a pending connection to accept or refuse, then an
//! async byte stream reading and writing the smoltcp socket's buffers directly.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use smoltcp::socket::tcp::State;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::driver::Shared;
use crate::stack::{FlowId, FlowKey};

/// A connection the application opened through the TUN, waiting for an answer: dial the
/// destination, then [`accept`](Self::accept) (the handshake completes) or
/// [`reject`](Self::reject) (the application sees a refused connection). Dropping it rejects.
pub struct TcpRequest {
    shared: Arc<Shared>,
    key: FlowKey,
    answered: bool,
}

impl fmt::Debug for TcpRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpRequest")
            .field("key", &self.key)
            .finish()
    }
}

impl TcpRequest {
    pub(crate) fn new(shared: Arc<Shared>, key: FlowKey) -> Self {
        Self {
            shared,
            key,
            answered: false,
        }
    }

    /// The application's address.
    pub fn src(&self) -> SocketAddr {
        self.key.src
    }

    /// The destination the application asked for.
    pub fn dst(&self) -> SocketAddr {
        self.key.dst
    }

    /// Completes the handshake and returns the stream.
    pub fn accept(mut self) -> io::Result<TcpStream> {
        self.answered = true;
        let id = self
            .shared
            .lock()
            .accept(self.key)
            .map_err(|e| io::Error::new(io::ErrorKind::NotConnected, e))?;
        self.shared.wake();
        Ok(TcpStream {
            shared: self.shared.clone(),
            id,
            key: self.key,
        })
    }

    /// Refuses the connection (the application gets a RST).
    pub fn reject(mut self) {
        self.answered = true;
        self.shared.lock().reject(self.key);
        self.shared.wake();
    }
}

impl Drop for TcpRequest {
    fn drop(&mut self) {
        if !self.answered {
            self.shared.lock().reject(self.key);
            self.shared.wake();
        }
    }
}

/// One accepted TCP flow. Reads return what the application sent; writes go back to it.
/// `shutdown` sends a FIN while reads go on (half-close); dropping closes the flow.
pub struct TcpStream {
    shared: Arc<Shared>,
    id: FlowId,
    key: FlowKey,
}

impl fmt::Debug for TcpStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpStream").field("key", &self.key).finish()
    }
}

impl TcpStream {
    /// The application's address.
    pub fn src(&self) -> SocketAddr {
        self.key.src
    }

    /// The destination the application asked for.
    pub fn dst(&self) -> SocketAddr {
        self.key.dst
    }

    /// Resets the flow (the application sees the connection reset) instead of closing it.
    pub fn abort(self) {
        self.shared.lock().abort(self.id);
        self.shared.wake();
        // Drop then only detaches a socket that is already closed.
    }
}

/// Still completing the handshake: neither readable nor writable yet.
fn opening(state: State) -> bool {
    matches!(state, State::Listen | State::SynReceived)
}

impl AsyncRead for TcpStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut stack = self.shared.lock();
        let socket = stack.socket(self.id);
        if socket.can_recv() {
            let n = socket
                .recv_slice(buf.initialize_unfilled())
                .map_err(|e| io::Error::new(io::ErrorKind::ConnectionReset, e))?;
            buf.advance(n);
            drop(stack);
            // The window opened: the driver may have a window update to send.
            self.shared.wake();
            return Poll::Ready(Ok(()));
        }
        if opening(socket.state()) || socket.may_recv() {
            socket.register_recv_waker(cx.waker());
            return Poll::Pending;
        }
        // FIN received (or the flow is gone): end of stream.
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for TcpStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut stack = self.shared.lock();
        let socket = stack.socket(self.id);
        if opening(socket.state()) {
            socket.register_send_waker(cx.waker());
            return Poll::Pending;
        }
        if !socket.may_send() {
            let kind = if socket.state() == State::Closed {
                io::ErrorKind::ConnectionReset
            } else {
                io::ErrorKind::BrokenPipe
            };
            return Poll::Ready(Err(kind.into()));
        }
        if socket.can_send() {
            let n = socket
                .send_slice(data)
                .map_err(|e| io::Error::new(io::ErrorKind::BrokenPipe, e))?;
            drop(stack);
            self.shared.wake();
            return Poll::Ready(Ok(n));
        }
        socket.register_send_waker(cx.waker());
        Poll::Pending
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Everything written is in the socket's buffer; the driver sends it.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.shared.lock().socket(self.id).close();
        self.shared.wake();
        Poll::Ready(Ok(()))
    }
}

impl Drop for TcpStream {
    fn drop(&mut self) {
        self.shared.lock().detach(self.id);
        self.shared.wake();
    }
}
