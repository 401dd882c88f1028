//! The test protocol of the fabric suites: a client sends pseudo-random bytes on a stream, the
//! exit answers their SHA-256, the client compares.

use std::sync::Arc;

use anyhow::{Context, Result, ensure};
use fabric::peer::{Fabric, Peer};
use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The exit's side: read each stream to its end, answer its SHA-256.
pub fn serve_digests(exit: Arc<Fabric>) {
    tokio::spawn(async move {
        while let Some(incoming) = exit.accept().await {
            tokio::spawn(async move {
                let mut stream = incoming.stream;
                let mut hash = Sha256::new();
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(n) => hash.update(&buf[..n]),
                        Err(_) => return,
                    }
                }
                let _ = stream.write_all(&hash.finalize()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
}

/// Sends `len` pseudo-random bytes on a new stream and checks the digest the exit answers.
pub async fn send_and_verify(peer: &Peer, len: usize, seed: u64) -> Result<()> {
    let mut data = vec![0u8; len];
    rand_chacha::ChaCha20Rng::seed_from_u64(seed).fill_bytes(&mut data);
    let mut stream = peer.open().context("open")?;
    stream.write_all(&data).await.context("write")?;
    stream.shutdown().await.context("finish")?;
    let mut digest = Vec::new();
    stream
        .read_to_end(&mut digest)
        .await
        .context("read digest")?;
    ensure!(
        digest.as_slice() == Sha256::digest(&data).as_slice(),
        "stream {seed}: digest differs"
    );
    Ok(())
}

/// `futures::future::join_all` without the dependency: runs the futures concurrently.
pub async fn join_all<F: Future<Output = Result<()>> + Send + 'static>(
    futures: impl Iterator<Item = F>,
) -> Vec<Result<()>> {
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(
            h.await
                .unwrap_or_else(|e| Err(anyhow::anyhow!("task failed: {e}"))),
        );
    }
    out
}
