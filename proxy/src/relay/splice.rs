//! Linux zero-copy relay between two TCP sockets: `splice(2)` moves data socket → pipe →
//! socket inside the kernel, so the bytes never cross into this process (the copying relay
//! reads every byte into a user buffer and writes it back out: two more copies per byte).
//!
//! The system calls come from `nix`, whose wrappers are safe (this crate forbids `unsafe`).
//! Readiness comes from tokio: `try_io` runs the non-blocking splice and clears the readiness
//! tokio cached when the kernel says `EAGAIN`, exactly as tokio's own reads and writes do.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::Transferred;

/// Bytes a pipe may hold. The default 64 KiB caps each splice at 64 KiB; 256 KiB matches the
/// copying relay's buffers. Enlarging may fail (per-user pipe page limits): then the default
/// size is used, which works, only with more system calls.
const PIPE_SIZE: usize = 256 * 1024;

/// One pipe per direction.
#[derive(Debug)]
pub(super) struct Pipes {
    up: (OwnedFd, OwnedFd),
    down: (OwnedFd, OwnedFd),
}

impl Pipes {
    /// Creates the two pipes (fails when out of file descriptors: the caller then copies).
    pub(super) fn new() -> io::Result<Self> {
        Ok(Self {
            up: pipe()?,
            down: pipe()?,
        })
    }
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
    let _ = fcntl(&w, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as i32));
    Ok((r, w))
}

/// Relays both ways until both directions reached EOF (each EOF is passed on as a shutdown
/// of the other socket's write side) or an error occurs.
pub(super) async fn relay(
    a: &TcpStream,
    b: &TcpStream,
    pipes: Pipes,
    activity: &AtomicU64,
) -> io::Result<Transferred> {
    let (up, down) = tokio::try_join!(
        one_way(a, b, &pipes.up, activity),
        one_way(b, a, &pipes.down, activity),
    )?;
    Ok(Transferred { up, down })
}

async fn one_way(
    src: &TcpStream,
    dst: &TcpStream,
    (pipe_r, pipe_w): &(OwnedFd, OwnedFd),
    activity: &AtomicU64,
) -> io::Result<u64> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    let mut total = 0u64;
    loop {
        // Fill the pipe from the source. The pipe is empty here (drained below), so EAGAIN
        // can only mean the socket has nothing to read.
        let n = loop {
            src.readable().await?;
            match src.try_io(Interest::READABLE, || {
                splice(src, None, pipe_w, None, PIPE_SIZE, flags).map_err(io::Error::from)
            }) {
                Ok(n) => break n,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
                Err(err) => return Err(err),
            }
        };
        if n == 0 {
            socket2::SockRef::from(dst).shutdown(std::net::Shutdown::Write)?;
            return Ok(total);
        }
        // Drain all of it into the destination.
        let mut left = n;
        while left > 0 {
            dst.writable().await?;
            match dst.try_io(Interest::WRITABLE, || {
                splice(pipe_r, None, dst, None, left, flags).map_err(io::Error::from)
            }) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(m) => left -= m,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
                Err(err) => return Err(err),
            }
        }
        total += n as u64;
        activity.fetch_add(1, Ordering::Relaxed);
    }
}
