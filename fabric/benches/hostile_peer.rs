//! What a hostile peer can make one session hold: memory figures, printed (no criterion
//! harness; the measurement is a resident set size).
//!
//! `cargo bench -p fabric --bench hostile_peer` starts this binary again as a victim process
//! (`--victim client` or `--victim exit`) running one [`Connection`] with the production
//! settings of that role, and talks to it over a pipe as the peer. The peer
//!
//! 1. opens 1,024 streams and writes into each, never reading, until no stream takes more
//!    (at most the 4 MiB window per stream; it stops on a stream the victim refused);
//! 2. sends, on 15 further KCP lanes (16 with lane 0), 4,095 out-of-order full segments each
//!    (segment 0 of each lane never comes, so nothing is delivered).
//!
//! It prints the victim's VmRSS (from `/proc/<pid>/status`) before, after step 1 and after
//! step 2. The exit role accepts the streams (and, like an exit whose target is slow, never
//! reads them); the client role never accepts any.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::io::{BufReader, BufWriter, Read, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use fabric::connection::{Connection, Endpoint, mux_config, mux_config_for};
use fabric::session::{self, ConvId};

const CONV: ConvId = ConvId(0x5eed_0001);
const STREAMS: usize = 1024;
/// Most a peer writes on one stream: the window over sessions.
const PER_STREAM: usize = 4 << 20;
/// Lanes the peer asks for besides lane 0.
const EXTRA_LANES: u8 = 15;
/// Out-of-order segments per lane: the receive window less the missing first one.
const SEGMENTS: u32 = 4095;
/// A full segment's payload with the default 1,372-byte MTU (less lane prefix and KCP header).
const SEGMENT_PAYLOAD: usize = 1372 - 2 - 24;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--victim") {
        victim(args.get(i + 1).map_or("client", String::as_str));
        return;
    }
    println!(
        "hostile peer: {STREAMS} streams written until blocked, then {EXTRA_LANES} extra lanes x {SEGMENTS} out-of-order segments"
    );
    for role in ["client", "exit"] {
        attack(role);
    }
}

fn write_frame(w: &mut impl Write, data: &[u8]) -> std::io::Result<()> {
    w.write_all(&(data.len() as u32).to_be_bytes())?;
    w.write_all(data)
}

fn read_frame(r: &mut impl Read) -> Option<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).ok()?;
    let mut data = vec![0u8; u32::from_be_bytes(len) as usize];
    r.read_exact(&mut data).ok()?;
    Some(data)
}

/// Reads frames from `r` on a thread of their own.
fn frames_from(r: impl Read + Send + 'static) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut r = BufReader::with_capacity(1 << 20, r);
        while let Some(frame) = read_frame(&mut r) {
            if tx.send(frame).is_err() {
                return;
            }
        }
    });
    rx
}

/// The victim: one connection with its role's settings, packets in on stdin, out on stdout.
fn victim(role: &str) {
    let accepts = role == "exit";
    let mut conn = Connection::new(
        CONV,
        session::Config::default(),
        mux_config_for(accepts),
        Instant::now(),
    );
    let input = frames_from(std::io::stdin());
    let mut out = BufWriter::with_capacity(1 << 20, std::io::stdout().lock());
    let mut buf = Vec::new();
    loop {
        let now = Instant::now();
        let wait = conn
            .poll_timeout()
            .map_or(Duration::from_millis(10), |t| {
                t.saturating_duration_since(now)
            })
            .min(Duration::from_millis(10));
        match input.recv_timeout(wait) {
            Ok(packet) => {
                let _ = conn.handle_input(Instant::now(), &packet);
                while let Ok(packet) = input.try_recv() {
                    let _ = conn.handle_input(Instant::now(), &packet);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let session = conn.session().stats();
                let mux = conn.mux().stats();
                eprintln!(
                    "  victim ({role}): {} lanes open, {} packets refused, session closed: {}, \
                     mux: {} streams, {:.1} MiB unread",
                    session.lanes,
                    session.invalid_packets,
                    conn.session().is_closed(),
                    mux.streams,
                    mux.recv_buffered as f64 / (1 << 20) as f64,
                );
                return;
            }
        }
        conn.handle_timeout(Instant::now());
        if accepts {
            // Accepted, never read: an exit whose targets do not take the data.
            while conn.mux().accept().is_some() {}
        }
        while conn.mux().poll_event().is_some() {}
        while let Some(n) = conn.poll_transmit(Instant::now(), &mut buf) {
            if write_frame(&mut out, &buf[..n]).is_err() {
                return;
            }
        }
        if out.flush().is_err() {
            return;
        }
    }
}

/// The victim's resident set in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The peer's side of the pipe.
struct Link {
    conn: Connection,
    to_victim: BufWriter<std::process::ChildStdin>,
    from_victim: mpsc::Receiver<Vec<u8>>,
    buf: Vec<u8>,
}

impl Link {
    /// Moves packets both ways once; returns how many came back.
    fn pump(&mut self) -> usize {
        let mut got = 0;
        while let Ok(packet) = self.from_victim.try_recv() {
            let _ = self.conn.handle_input(Instant::now(), &packet);
            got += 1;
        }
        self.conn.handle_timeout(Instant::now());
        while let Some(n) = self.conn.poll_transmit(Instant::now(), &mut self.buf) {
            write_frame(&mut self.to_victim, &self.buf[..n]).expect("victim gone");
        }
        self.to_victim.flush().expect("victim gone");
        if got == 0 {
            // Nothing came back: wait a little for the victim rather than spin.
            if let Ok(packet) = self.from_victim.recv_timeout(Duration::from_millis(2)) {
                let _ = self.conn.handle_input(Instant::now(), &packet);
                got += 1;
            }
        }
        got
    }
}

/// Starts a victim of `role` and makes a first exchange with it, so that its session is up
/// when the baseline is taken.
fn start_victim(role: &str) -> (std::process::Child, Link) {
    let mut child = Command::new(std::env::current_exe().expect("own path"))
        .args(["--victim", role])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("victim process");
    let mut link = Link {
        conn: Connection::new(
            CONV,
            session::Config::default(),
            mux_config(),
            Instant::now(),
        ),
        to_victim: BufWriter::with_capacity(1 << 20, child.stdin.take().expect("stdin")),
        from_victim: frames_from(child.stdout.take().expect("stdout")),
        buf: Vec::new(),
    };
    let hello = link.conn.mux().open().expect("stream");
    link.conn.mux().write(hello, b"hello").expect("write");
    let start = Instant::now();
    while link.conn.session().stats().acks_received == 0
        && start.elapsed() < Duration::from_secs(10)
    {
        link.pump();
    }
    (child, link)
}

/// Closes the victim's input (it reports its counters on stderr and exits) and waits for it.
fn stop_victim(mut child: std::process::Child, link: Link) {
    drop(link);
    let _ = child.wait();
}

/// Pumps until the victim has taken in what was sent: its answers stop and its size holds
/// still (at most 30 s).
fn until_still(link: &mut Link, pid: u32) -> u64 {
    let mut last = 0;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        let quiet = Instant::now();
        while quiet.elapsed() < Duration::from_millis(500) {
            link.pump();
        }
        let now = rss_kib(pid);
        if now == last {
            break;
        }
        last = now;
    }
    rss_kib(pid)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn attack(role: &str) {
    // 1. Streams written into until nothing more goes.
    let (child, mut link) = start_victim(role);
    let pid = child.id();
    let before = rss_kib(pid);
    let ids: Vec<_> = (0..STREAMS)
        .map(|_| link.conn.mux().open().expect("stream"))
        .collect();
    let mut written = vec![0usize; STREAMS];
    let mut refused = vec![false; STREAMS];
    let chunk = vec![0x5au8; 64 * 1024];
    let mut last_progress = Instant::now();
    let mut scratch = [0u8; 64];
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(300) {
        let mut progress = false;
        for (i, &id) in ids.iter().enumerate() {
            if refused[i] || written[i] >= PER_STREAM {
                continue;
            }
            if matches!(link.conn.mux().read(id, &mut scratch), Ok(0)) {
                // The victim refused it (FIN): a peer would not bother.
                refused[i] = true;
                continue;
            }
            let want = (PER_STREAM - written[i]).min(chunk.len());
            if let Ok(n) = link.conn.mux().write(id, &chunk[..want])
                && n > 0
            {
                written[i] += n;
                progress = true;
            }
        }
        while link.conn.mux().poll_event().is_some() {}
        link.pump();
        if progress {
            last_progress = Instant::now();
        }
        let settled =
            link.conn.session().stats().waiting_segments == 0 && !link.conn.mux().has_transmit();
        if settled && last_progress.elapsed() > Duration::from_secs(2) {
            break;
        }
    }
    let total: usize = written.iter().sum();
    let refused_count = refused.iter().filter(|&&r| r).count();
    let after_streams = until_still(&mut link, pid);
    stop_victim(child, link);
    println!(
        "{role:>6} role, streams: victim VmRSS {:>7.1} MiB before, {:>7.1} MiB after \
         ({:.1} MiB written, {refused_count} of {STREAMS} streams refused)",
        mib(before),
        mib(after_streams),
        total as f64 / (1 << 20) as f64,
    );

    // 2. Out-of-order segments on lanes the peer chose (fresh lanes of a fresh victim: on a
    // lane the peer already used, these numbers would be old and dropped).
    let (child, mut link) = start_victim(role);
    let pid = child.id();
    let before = rss_kib(pid);
    let payload = vec![0xabu8; SEGMENT_PAYLOAD];
    for lane in 1..=EXTRA_LANES {
        for sn in 1..=SEGMENTS {
            let mut packet = vec![b'L', lane];
            packet.extend_from_slice(&CONV.0.to_le_bytes());
            // PUSH, no fragment, window 1, then ts 0, sn, una 0, length.
            packet.extend_from_slice(&[81, 0, 1, 0]);
            packet.extend_from_slice(&0u32.to_le_bytes());
            packet.extend_from_slice(&sn.to_le_bytes());
            packet.extend_from_slice(&0u32.to_le_bytes());
            packet.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            packet.extend_from_slice(&payload);
            write_frame(&mut link.to_victim, &packet).expect("victim gone");
        }
        link.pump();
    }
    let after_lanes = until_still(&mut link, pid);
    stop_victim(child, link);
    println!(
        "{role:>6} role, lanes:   victim VmRSS {:>7.1} MiB before, {:>7.1} MiB after \
         ({EXTRA_LANES} extra lanes x {SEGMENTS} out-of-order segments sent)",
        mib(before),
        mib(after_lanes),
    );
}
