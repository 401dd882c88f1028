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
//! Requests: `status` and `peers` (what `/status` and `/peers` answer), and the live changes
//! `peer add NAME TOXID`, `peer grant NAME exit`, `peer grant NAME share PORTS`,
//! `peer revoke NAME exit`, `peer revoke NAME share`, `peer grant|revoke NAME introducer`,
//! `peer remove NAME` (what `proxy peer …` sends; kept in the
//! data dir, see [`crate::mesh`]), and pairing: `invite [name=N] [exit] [share=PORTS]
//! [ttl=SECS]`, `invites`, `invite-revoke ID`, `join TICKET [name=N] [wait=SECS]`. Who may
//! ask is checked
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

use fabric::overlay::PeerName;

use crate::dialer::BoxFuture;
use crate::mesh::Change;
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

/// Whether a node runs on the data dir `dir` (its control socket answers).
pub async fn node_runs(dir: &Path) -> bool {
    UnixStream::connect(socket_path(dir)).await.is_ok()
}

/// Binds the control socket in `dir`, mode 0600. A socket file left by a node that is gone
/// is replaced; one a running node answers on is an error (two nodes on one data dir).
pub async fn bind(dir: &Path) -> io::Result<UnixListener> {
    let path = socket_path(dir);
    if path.exists() {
        if node_runs(dir).await {
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

/// What makes a live change on the running node (the peer table, the fabric that must allow
/// and dial a new peer): `Ok` with what to tell the user, or why not.
pub trait Changes: Send + Sync + std::fmt::Debug {
    /// Makes `change`.
    fn apply(&self, change: Change) -> BoxFuture<'_, Result<String, String>>;

    /// Answers a pairing request line: `invite …`, `invites`, `invite-revoke ID`,
    /// `join TICKET …`.
    fn pairing(&self, line: &str) -> BoxFuture<'_, Result<String, String>>;
}

/// What the control socket serves: status, and live changes when the node takes them.
#[derive(Debug, Clone)]
pub struct Node {
    /// Status and peers.
    pub status: Arc<Status>,
    /// Live changes.
    pub changes: Option<Arc<dyn Changes>>,
}

/// Reads a `peer …` request line into a change.
pub fn parse_change(line: &str) -> Result<Change, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let name = |w: &str| -> Result<PeerName, String> {
        w.parse().map_err(|e| format!("peer name {w:?}: {e}"))
    };
    match words.as_slice() {
        ["peer", "add", n, id] => Ok(Change::Add(
            name(n)?,
            id.parse().map_err(|e| format!("{id:?}: {e}"))?,
        )),
        ["peer", "grant", n, "exit"] => Ok(Change::GrantExit(name(n)?)),
        ["peer", "grant", n, "share", ports] => Ok(Change::GrantShare(
            name(n)?,
            ports.parse().map_err(|e| format!("{ports:?}: {e}"))?,
        )),
        ["peer", "revoke", n, "exit"] => Ok(Change::RevokeExit(name(n)?)),
        ["peer", "revoke", n, "share"] => Ok(Change::RevokeShares(name(n)?)),
        ["peer", "grant", n, "introducer"] => Ok(Change::GrantIntroducer(name(n)?)),
        ["peer", "revoke", n, "introducer"] => Ok(Change::RevokeIntroducer(name(n)?)),
        ["peer", "remove", n] => Ok(Change::Remove(name(n)?)),
        _ => Err(format!(
            "unknown request {line:?} (peer add NAME TOXID, peer remove NAME, \
             peer grant NAME exit|introducer|share PORTS, peer revoke NAME exit|introducer|share)"
        )),
    }
}

/// Answers requests on `listener` until `stop`, then removes the socket file.
pub async fn serve(listener: UnixListener, node: Node, stop: CancellationToken) {
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
        let node = node.clone();
        tokio::spawn(async move {
            if let Err(error) = answer(stream, owner, &node).await {
                debug!(%error, "control request failed");
            }
        });
    }
    if let Some(path) = path {
        let _ = std::fs::remove_file(path);
    }
}

async fn answer(mut stream: UnixStream, owner: Option<u32>, node: &Node) -> io::Result<()> {
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
    let status = &node.status;
    let answer = match line.trim() {
        "status" => status.snapshot().for_audience(Audience::Trusted).text(),
        "peers" => status
            .snapshot()
            .for_audience(Audience::Trusted)
            .peers_text(),
        other if other.starts_with("peer ") => match (parse_change(other), &node.changes) {
            (Err(why), _) => format!("error: {why}\n"),
            (Ok(_), None) => "error: this node takes no changes\n".into(),
            (Ok(change), Some(changes)) => match changes.apply(change).await {
                Ok(done) => format!("{done}\n"),
                Err(why) => format!("error: {why}\n"),
            },
        },
        other
            if ["invite", "invites", "invite-revoke", "join"]
                .contains(&other.split_whitespace().next().unwrap_or_default()) =>
        {
            match &node.changes {
                None => "error: this node takes no changes\n".into(),
                Some(changes) => match changes.pairing(other).await {
                    Ok(done) => format!("{done}\n"),
                    Err(why) => format!("error: {why}\n"),
                },
            }
        }
        other => {
            format!("error: unknown request {other:?} (status, peers, peer …, invite …, join …)\n")
        }
    };
    stream.write_all(answer.as_bytes()).await?;
    stream.shutdown().await
}

/// Sends `request` to the node running on the data dir `dir` and returns its answer (an
/// answer starting with "error: " is returned as an error).
pub async fn request(dir: &Path, request: &str) -> io::Result<String> {
    request_within(dir, request, Duration::from_secs(30)).await
}

/// [`request`], waiting at most `limit` for the answer (a join waits for the inviter).
pub async fn request_within(dir: &Path, request: &str, limit: Duration) -> io::Result<String> {
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
    tokio::time::timeout(limit, stream.read_to_string(&mut answer))
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

    #[test]
    fn peer_requests_read_as_changes_or_say_why_not() {
        let id = fabric::id::ToxId::new(fabric::id::PublicKey([1; 32]), [0; 4]);
        assert_eq!(
            parse_change(&format!("peer add nas {id}")),
            Ok(Change::Add("nas".parse().unwrap(), id))
        );
        assert_eq!(
            parse_change("peer grant nas share 22,8080"),
            Ok(Change::GrantShare(
                "nas".parse().unwrap(),
                "22,8080".parse().unwrap()
            ))
        );
        assert_eq!(
            parse_change("peer revoke NAS exit"),
            Ok(Change::RevokeExit("nas".parse().unwrap()))
        );
        for bad in [
            "peer add -x 00",
            "peer add nas 1234",
            "peer grant nas share 0",
            "peer fly",
        ] {
            assert!(parse_change(bad).is_err(), "{bad}");
        }
    }
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
        let node = Node {
            status,
            changes: None,
        };
        let served = tokio::spawn(serve(listener, node, stop.clone()));
        let text = request(&dir, "status").await.unwrap();
        assert!(text.starts_with("proxy direct"), "{text}");
        assert_eq!(request(&dir, "peers").await.unwrap(), "no peers\n");
        let err = request(&dir, "launch").await.unwrap_err();
        assert!(err.to_string().contains("unknown request"), "{err}");
        let err = request(&dir, "peer grant nas exit").await.unwrap_err();
        assert!(err.to_string().contains("takes no changes"), "{err}");
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
