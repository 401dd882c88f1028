//! The running node's control socket (issue "Pairing", live changes): `control.sock` in the
//! data dir, a Unix stream socket only the user who owns it may use. `--data-dir` is how the
//! commands that talk to a running node find it, whatever listeners it has (`proxy exit` has
//! none).
//!
//! ```text
//! client ─ one request line (at most 4 KiB) ─► node
//! client ◄─ the answer, then the node closes ─ node     ("error: …" first when refused)
//! ```
//!
//! Requests: `status` and `peers` (what `/status` and `/peers` answer). Who may ask is checked
//! twice: the socket is created mode 0600, and each connection's peer credentials must name
//! the socket's owner (so a socket made reachable by a careless `chmod` still refuses other
//! users).

use std::io;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::status::{Audience, Status};

/// The socket's file name in the data dir.
pub const SOCKET: &str = "control.sock";
/// The longest request line read.
const MAX_REQUEST: u64 = 4096;
/// How long a client has to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The control socket's path for the data dir `dir`.
pub fn socket_path(dir: &Path) -> PathBuf {
    dir.join(SOCKET)
}

/// Binds the control socket in `dir`, mode 0600. A socket file left by a node that is gone
/// is replaced; one a running node answers on is an error (two nodes on one data dir).
pub async fn bind(dir: &Path) -> io::Result<UnixListener> {
    let path = socket_path(dir);
    if path.exists() {
        if UnixStream::connect(&path).await.is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!(
                    "another proxy runs on {} (its control socket answers)",
                    dir.display()
                ),
            ));
        }
        std::fs::remove_file(&path)?;
    }
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Answers requests on `listener` until `stop`, then removes the socket file.
pub async fn serve(listener: UnixListener, status: Arc<Status>, stop: CancellationToken) {
    let path = listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(Path::to_path_buf));
    loop {
        let stream = tokio::select! {
            () = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(error) => {
                    debug!(%error, "control accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let owner = path
            .as_deref()
            .and_then(|p| std::fs::metadata(p).ok())
            .map(|m| m.uid());
        let status = status.clone();
        tokio::spawn(async move {
            if let Err(error) = answer(stream, owner, &status).await {
                debug!(%error, "control request failed");
            }
        });
    }
    if let Some(path) = path {
        let _ = std::fs::remove_file(path);
    }
}

async fn answer(mut stream: UnixStream, owner: Option<u32>, status: &Status) -> io::Result<()> {
    // The request is read whoever sent it (a client that has not finished writing it would
    // see a broken pipe rather than the refusal), and acted on only for the owner.
    let mut line = String::new();
    let mut reader = BufReader::new((&mut stream).take(MAX_REQUEST));
    tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no request"))??;
    let uid = stream.peer_cred()?.uid();
    if owner != Some(uid) {
        warn!(uid, "control connection from another user refused");
        stream
            .write_all(b"error: this node is another user's\n")
            .await?;
        return stream.shutdown().await;
    }
    let answer = match line.trim() {
        "status" => status.snapshot().for_audience(Audience::Trusted).text(),
        "peers" => status
            .snapshot()
            .for_audience(Audience::Trusted)
            .peers_text(),
        other => format!("error: unknown request {other:?} (status, peers)\n"),
    };
    stream.write_all(answer.as_bytes()).await?;
    stream.shutdown().await
}

/// Sends `request` to the node running on the data dir `dir` and returns its answer (an
/// answer starting with "error: " is returned as an error).
pub async fn request(dir: &Path, request: &str) -> io::Result<String> {
    let path = socket_path(dir);
    let mut stream = UnixStream::connect(&path).await.map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "no proxy answers on {} ({e}): is one running with this --data-dir?",
                path.display()
            ),
        )
    })?;
    stream.write_all(format!("{request}\n").as_bytes()).await?;
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_string(&mut answer))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the node did not answer"))??;
    match answer.strip_prefix("error: ") {
        Some(why) => Err(io::Error::other(why.trim().to_owned())),
        None => Ok(answer),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{Counters, Role};

    #[tokio::test]
    async fn the_owner_gets_status_and_peers_and_a_second_node_is_refused() {
        let dir = std::env::temp_dir().join(format!("proxy-control-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let listener = bind(&dir).await.unwrap();
        let mode = std::fs::metadata(socket_path(&dir)).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let status = Arc::new(Status::new(
            Role::Direct,
            None,
            Arc::new(Counters::default()),
        ));
        let stop = CancellationToken::new();
        let served = tokio::spawn(serve(listener, status, stop.clone()));
        let text = request(&dir, "status").await.unwrap();
        assert!(text.starts_with("proxy direct"), "{text}");
        assert_eq!(request(&dir, "peers").await.unwrap(), "no peers\n");
        let err = request(&dir, "launch").await.unwrap_err();
        assert!(err.to_string().contains("unknown request"), "{err}");
        // A second node on the same data dir finds the first one answering.
        let again = bind(&dir).await.unwrap_err();
        assert_eq!(again.kind(), io::ErrorKind::AddrInUse);
        stop.cancel();
        served.await.unwrap();
        assert!(!socket_path(&dir).exists(), "socket removed at the end");
        // A socket file left by a node that is gone is replaced.
        drop(std::os::unix::net::UnixListener::bind(socket_path(&dir)).unwrap());
        assert!(bind(&dir).await.is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
