//! Sequential SOCKS-like connections through a pair of `mux::io` handles: the client opens
//! a stream, sends a request, waits for the one-byte answer, sends a payload and its FIN,
//! reads the echo to the end and drops the stream; the exit's relay task answers, echoes,
//! finishes, and holds its stream for a moment before dropping it, as a relay tearing down
//! its target connection does. The client's next open reuses the id (lowest free first), so
//! with a hold the exit's core sees the id reopened while its application still holds it:
//! the path of review B1, where the new stream was never accepted.

use std::time::Duration;

use fabric::mux::io::{Handle, Stream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The request a client sends first, like a SOCKS CONNECT.
const REQUEST: &[u8] = b"CONNECT example.test:443";
/// The exit's answer: "connected".
const ANSWER: u8 = 0;
/// The bytes each connection carries each way after the answer.
const PAYLOAD: &[u8] = b"GET / HTTP/1.1\r\nHost: example.test\r\n\r\n";

/// What a run of sequential connections came to.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Outcome {
    /// Connections that completed, echo intact.
    pub(crate) ok: u64,
    /// Connections that failed with an error or a wrong echo.
    pub(crate) failed: u64,
    /// Connections that did not complete within the limit.
    pub(crate) hung: u64,
    /// The slowest connection that completed.
    pub(crate) slowest: Duration,
}

/// Runs the exit side on `handle` until its mux fails: one relay task per accepted stream,
/// which holds its stream for `hold` after finishing it.
pub(crate) fn serve(handle: Handle, hold: Duration) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(stream) = handle.accept().await {
            tokio::spawn(relay(stream, hold));
        }
    })
}

async fn relay(mut stream: Stream, hold: Duration) {
    let mut request = [0u8; REQUEST.len()];
    if stream.read_exact(&mut request).await.is_err() || request != REQUEST {
        return;
    }
    if stream.write_all(&[ANSWER]).await.is_err() {
        return;
    }
    let mut echo = Vec::new();
    if stream.read_to_end(&mut echo).await.is_err() {
        return;
    }
    if stream.write_all(&echo).await.is_err() || stream.shutdown().await.is_err() {
        return;
    }
    // Our FIN and the peer's are done in the core already: the client may release the id
    // and open it again while this task still holds the stream.
    if !hold.is_zero() {
        tokio::time::sleep(hold).await;
    }
    drop(stream);
}

/// Makes `n` connections one after the other, each given at most `limit`.
pub(crate) async fn sequential(client: &Handle, n: u64, limit: Duration) -> Outcome {
    let mut outcome = Outcome::default();
    for _ in 0..n {
        let started = Instant::now();
        match tokio::time::timeout(limit, connection(client)).await {
            Ok(Ok(())) => {
                outcome.ok += 1;
                outcome.slowest = outcome.slowest.max(started.elapsed());
            }
            Ok(Err(_)) => outcome.failed += 1,
            Err(_) => outcome.hung += 1,
        }
    }
    outcome
}

async fn connection(client: &Handle) -> std::io::Result<()> {
    let mut stream = client.open().map_err(std::io::Error::other)?;
    stream.write_all(REQUEST).await?;
    let mut answer = [0u8; 1];
    stream.read_exact(&mut answer).await?;
    if answer[0] != ANSWER {
        return Err(std::io::Error::other("wrong answer"));
    }
    stream.write_all(PAYLOAD).await?;
    stream.shutdown().await?;
    let mut echo = Vec::new();
    stream.read_to_end(&mut echo).await?;
    if echo != PAYLOAD {
        return Err(std::io::Error::other("wrong echo"));
    }
    Ok(())
}
