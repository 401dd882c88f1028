//! Local servers the end-to-end tests point real clients at, and the `proxy` process itself.
//!
//! Everything binds 127.0.0.1 port 0, runs on plain threads (the tests drive blocking
//! clients like curl and Chromium), and stops or is killed on `Drop`.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// The page the HTTP server serves at `/index.html`. Its script rewrites the heading, so a
/// DOM dump containing [`PAGE_RENDERED_TEXT`] proves a browser really ran the page.
pub const PAGE: &str = "<!doctype html><html><head><title>proxy test</title></head>\
<body><h1 id=\"t\">static text</h1>\
<script>document.getElementById('t').textContent = 'rendered ' + (6 * 7) + ' through proxy';</script>\
</body></html>";

/// What the page's script writes.
pub const PAGE_RENDERED_TEXT: &str = "rendered 42 through proxy";

/// The byte at offset `i` of `/big` bodies: a pattern a test can check without storing it.
pub fn big_byte(i: u64) -> u8 {
    (i.wrapping_mul(31) ^ (i >> 11)) as u8
}

/// A small HTTP/1.1 origin server with keep-alive:
///
/// - `GET /index.html`: [`PAGE`]
/// - `GET /big/N`: N bytes of [`big_byte`]
/// - `POST /echo` (Content-Length or chunked): the body back
/// - `GET /headers`: the request headers, one `name: value` per line, lowercase names
/// - anything else: 404
#[derive(Debug)]
pub struct HttpServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    requests: Arc<AtomicU64>,
}

impl HttpServer {
    /// Starts the server on 127.0.0.1, an ephemeral port.
    pub fn start() -> io::Result<Self> {
        Self::start_on("127.0.0.1:0".parse().map_err(io::Error::other)?)
    }

    /// Starts the server on `addr` (e.g. `[::1]:0`).
    pub fn start_on(addr: SocketAddr) -> io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicU64::new(0));
        let (stop2, requests2) = (stop.clone(), requests.clone());
        thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let requests = requests2.clone();
                thread::spawn(move || {
                    let _ = serve_http(conn, &requests);
                });
            }
        });
        Ok(Self {
            addr,
            stop,
            requests,
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT{path}` (or `http://[::1]:PORT{path}`).
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Requests served so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

fn serve_http(conn: TcpStream, requests: &AtomicU64) -> io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let _ = conn.set_nodelay(true);
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut out = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let (method, path) = match (parts.next(), parts.next()) {
            (Some(m), Some(p)) => (m.to_owned(), p.to_owned()),
            _ => return Ok(()),
        };
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            reader.read_line(&mut h)?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((name, value)) = h.split_once(':') {
                headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
            }
        }
        let header = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
        };
        let body = if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            read_chunked(&mut reader)?
        } else {
            let len: usize = header("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let mut body = vec![0; len];
            reader.read_exact(&mut body)?;
            body
        };
        requests.fetch_add(1, Ordering::Relaxed);
        let close = header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        match (method.as_str(), path.as_str()) {
            ("GET", "/index.html") => respond(&mut out, 200, "text/html", PAGE.as_bytes())?,
            ("GET", "/headers") => {
                let text: String = headers.iter().map(|(n, v)| format!("{n}: {v}\n")).collect();
                respond(&mut out, 200, "text/plain", text.as_bytes())?;
            }
            ("POST", "/echo") => respond(&mut out, 200, "application/octet-stream", &body)?,
            ("GET", p) if p.starts_with("/big/") => {
                let n: u64 = p[5..].parse().unwrap_or(0);
                write!(
                    out,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {n}\r\n\r\n"
                )?;
                let mut buf = vec![0u8; 256 * 1024];
                let mut sent = 0u64;
                while sent < n {
                    let chunk = (n - sent).min(buf.len() as u64) as usize;
                    for (i, b) in buf[..chunk].iter_mut().enumerate() {
                        *b = big_byte(sent + i as u64);
                    }
                    out.write_all(&buf[..chunk])?;
                    sent += chunk as u64;
                }
            }
            _ => respond(&mut out, 404, "text/plain", b"not found\n")?,
        }
        if close {
            return Ok(());
        }
    }
}

fn read_chunked(reader: &mut impl BufRead) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let mut size = String::new();
        reader.read_line(&mut size)?;
        let size = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        if size == 0 {
            // Trailers (none expected) end with an empty line.
            loop {
                let mut l = String::new();
                if reader.read_line(&mut l)? == 0 || l.trim().is_empty() {
                    return Ok(body);
                }
            }
        }
        let start = body.len();
        body.resize(start + size, 0);
        reader.read_exact(&mut body[start..])?;
        let mut crlf = [0; 2];
        reader.read_exact(&mut crlf)?;
    }
}

fn respond(out: &mut TcpStream, status: u16, ctype: &str, body: &[u8]) -> io::Result<()> {
    let reason = if status == 200 { "OK" } else { "Not Found" };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut msg = head.into_bytes();
    msg.extend_from_slice(body);
    out.write_all(&msg)
}

/// A UDP DNS responder: answers every A query with one record pointing at `answer`.
#[derive(Debug)]
pub struct DnsServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    queries: Arc<AtomicU64>,
}

impl DnsServer {
    /// Starts the responder on 127.0.0.1, an ephemeral port.
    pub fn start(answer: std::net::Ipv4Addr) -> io::Result<Self> {
        let socket = UdpSocket::bind("127.0.0.1:0")?;
        socket.set_read_timeout(Some(Duration::from_millis(200)))?;
        let addr = socket.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let queries = Arc::new(AtomicU64::new(0));
        let queries2 = queries.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 512];
            while !stop2.load(Ordering::Relaxed) {
                let Ok((n, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                queries2.fetch_add(1, Ordering::Relaxed);
                if let Some(reply) = dns_answer(&buf[..n], answer) {
                    let _ = socket.send_to(&reply, from);
                }
            }
        });
        Ok(Self {
            addr,
            stop,
            queries,
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Datagrams it has received.
    pub fn queries(&self) -> u64 {
        self.queries.load(Ordering::Relaxed)
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A DNS query for `name`'s A record (RFC 1035 §4), id `id`, recursion desired.
pub fn dns_query(id: u16, name: &str) -> Vec<u8> {
    dns_query_typed(id, name, 1)
}

/// A DNS query for `name` of type `qtype` (1 A, 28 AAAA, 65 HTTPS, ...), recursion desired.
pub fn dns_query_typed(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = Vec::with_capacity(32 + name.len());
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&[0, 1]);
    q
}

/// The answer to a single-question A query: the question echoed and one A record (TTL 60).
/// `None` if `query` is not one.
pub fn dns_answer(query: &[u8], ip: std::net::Ipv4Addr) -> Option<Vec<u8>> {
    if query.len() < 12 || query[4..6] != [0, 1] {
        return None;
    }
    // Walk the question name to find where the question ends.
    let mut i = 12;
    loop {
        let len = usize::from(*query.get(i)?);
        i += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None;
        }
        i += len;
    }
    let question_end = i + 4;
    let question = query.get(12..question_end)?;
    let mut r = Vec::with_capacity(question_end + 16);
    r.extend_from_slice(&query[..2]);
    r.extend_from_slice(&[0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0]);
    r.extend_from_slice(question);
    r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
    r.extend_from_slice(&ip.octets());
    Some(r)
}

/// The first A record of a DNS response, with the response id.
pub fn dns_parse_a(response: &[u8]) -> Option<(u16, std::net::Ipv4Addr)> {
    let id = u16::from_be_bytes([*response.first()?, *response.get(1)?]);
    if response.get(6..8)? == [0, 0] {
        return None;
    }
    // The last 4 bytes of a single-answer A response are the address.
    let n = response.len();
    let ip = response.get(n - 4..)?;
    Some((id, std::net::Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3])))
}

/// Panics unless `body` is the `n`-byte body of `/big/<n>` (see [`big_byte`]), naming the first
/// byte that differs.
pub fn check_big(body: &[u8], n: u64) {
    assert_eq!(body.len() as u64, n, "length");
    if let Some(i) = (0..n).find(|&i| body[i as usize] != big_byte(i)) {
        panic!("byte {i} differs");
    }
}

/// A SOCKS5 UDP association (RFC 1928 §7) held open by its control connection.
#[derive(Debug)]
pub struct SocksUdp {
    _control: TcpStream,
    relay: SocketAddr,
    socket: UdpSocket,
}

impl SocksUdp {
    /// Asks the SOCKS5 server at `proxy` (no auth) for a UDP association.
    pub fn associate(proxy: SocketAddr) -> io::Result<Self> {
        let mut control = TcpStream::connect(proxy)?;
        control.set_read_timeout(Some(Duration::from_secs(30)))?;
        control.write_all(&[5, 1, 0])?;
        let mut method = [0; 2];
        control.read_exact(&mut method)?;
        if method != [5, 0] {
            return Err(io::Error::other(format!("socks method {method:?}")));
        }
        control.write_all(&[5, 3, 0, 1, 0, 0, 0, 0, 0, 0])?;
        let mut reply = [0; 10];
        control.read_exact(&mut reply)?;
        if reply[..2] != [5, 0] || reply[3] != 1 {
            return Err(io::Error::other(format!(
                "udp associate refused: {reply:?}"
            )));
        }
        let relay = SocketAddr::new(
            std::net::Ipv4Addr::new(reply[4], reply[5], reply[6], reply[7]).into(),
            u16::from_be_bytes([reply[8], reply[9]]),
        );
        let socket = UdpSocket::bind("127.0.0.1:0")?;
        socket.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(Self {
            _control: control,
            relay,
            socket,
        })
    }

    /// Sends an A query for `name` with id `id` to the IPv4 DNS server `server` through the
    /// relay and returns the answer's id and address. Checks that the relay names `server`
    /// as the reply's source.
    pub fn dns_query(
        &self,
        server: SocketAddr,
        id: u16,
        name: &str,
    ) -> io::Result<(u16, std::net::Ipv4Addr)> {
        let SocketAddr::V4(v4) = server else {
            return Err(io::Error::other("ipv4 dns servers only"));
        };
        let mut datagram = vec![0, 0, 0, 1];
        datagram.extend_from_slice(&v4.ip().octets());
        datagram.extend_from_slice(&v4.port().to_be_bytes());
        datagram.extend_from_slice(&dns_query(id, name));
        self.socket.send_to(&datagram, self.relay)?;
        let mut buf = [0; 600];
        let (n, from) = self.socket.recv_from(&mut buf)?;
        if from != self.relay {
            return Err(io::Error::other(format!(
                "reply from {from}, not the relay"
            )));
        }
        if buf[..10] != datagram[..10] {
            return Err(io::Error::other(format!(
                "reply header {:?} does not name {server}",
                &buf[..10]
            )));
        }
        dns_parse_a(&buf[10..n]).ok_or_else(|| io::Error::other("not a dns answer"))
    }
}

/// A plain `GET path` to `addr`: the status code and body (at most 10 s).
pub fn http_get(addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    s.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| io::Error::other("not an HTTP response"))?;
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| io::Error::other(format!("bad status line in {head:?}")))?;
    Ok((code, body.to_owned()))
}

/// Reads `from` on a thread of its own, appending each line (newline-terminated) to `sink`
/// and, when given, sending it to `forward` too: a child's stderr kept for failure messages.
pub fn capture_lines(
    from: impl Read + Send + 'static,
    sink: Arc<Mutex<String>>,
    forward: Option<std::sync::mpsc::Sender<String>>,
) {
    thread::spawn(move || {
        for line in BufReader::new(from).lines().map_while(Result::ok) {
            if let Ok(mut s) = sink.lock() {
                s.push_str(&line);
                s.push('\n');
            }
            if let Some(tx) = &forward {
                let _ = tx.send(line);
            }
        }
    });
}

/// The `proxy` binary, built on first use so a test never runs a stale one. `PROXY_BIN`
/// overrides the path.
pub fn proxy_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(path) = std::env::var_os("PROXY_BIN") {
            return path.into();
        }
        // The test runs from <target>/<profile>/deps/<name>-<hash>.
        let exe = std::env::current_exe().expect("test executable path");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test executable in <target>/<profile>/deps");
        let target_dir = profile_dir.parent().expect("target dir");
        let status = Command::new(env!("CARGO"))
            .args([
                "build",
                "--quiet",
                "-p",
                "proxy",
                "--bin",
                "proxy",
                "--target-dir",
            ])
            .arg(target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build -p proxy");
        assert!(status.success(), "cargo build -p proxy failed");
        target_dir.join("debug").join("proxy")
    })
}

/// The lines `child` prints on stdout, read by a thread of their own.
fn stdout_lines(child: &mut Child) -> io::Result<std::sync::mpsc::Receiver<String>> {
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| io::Error::other("no stdout"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

/// A running `proxy` process, killed on drop. Listeners are started on port 0 and their
/// real addresses read from its stdout.
#[derive(Debug)]
pub struct ProxyProcess {
    child: Child,
    /// The SOCKS5 listener, if on.
    pub socks: Option<SocketAddr>,
    /// The HTTP listener, if on.
    pub http: Option<SocketAddr>,
    /// The `--metrics` listener, if asked for.
    pub metrics: Option<SocketAddr>,
    stderr: Arc<Mutex<String>>,
}

impl ProxyProcess {
    /// Starts `proxy --socks 127.0.0.1:0 --http 127.0.0.1:0 <extra>` with `RUST_LOG=debug` and
    /// waits until both listeners are up.
    pub fn start(extra: &[&str]) -> io::Result<Self> {
        let mut args = vec!["--socks", "127.0.0.1:0", "--http", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        Self::start_raw(&args)
    }

    /// Starts a client of the exit `exit_id` on a private Tox network (`nodes`), with its
    /// data in `dir` and no public bootstrap or STUN, plus `extra` flags.
    pub fn client(nodes: &[String], dir: &Path, exit_id: &str, extra: &[&str]) -> io::Result<Self> {
        let private = private_network(nodes, dir);
        let mut args = vec!["--exit", exit_id];
        args.extend(private.iter().map(String::as_str));
        args.extend_from_slice(extra);
        Self::start(&args)
    }

    /// A node in the default mode on the private Tox network `nodes` (no public bootstrap or
    /// STUN), its data in `dir`: SOCKS5 on an ephemeral loopback port, no HTTP listener, a
    /// connect timeout of 90 s (a fresh Tox session takes about 9 s, longer on a loaded
    /// machine), then `extra`.
    pub fn node(nodes: &[String], dir: &Path, extra: &[&str]) -> io::Result<Self> {
        let private = private_network(nodes, dir);
        let mut args = vec!["--socks", "127.0.0.1:0", "--http", "off"];
        args.extend(private.iter().map(String::as_str));
        args.extend(["--connect-timeout", "90"]);
        args.extend_from_slice(extra);
        Self::start_raw(&args)
    }

    /// Starts `proxy <args>` and waits for its "listening" lines (at most 10 s).
    pub fn start_raw(args: &[&str]) -> io::Result<Self> {
        let mut child = Command::new(proxy_bin())
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("PROXY_LOG").unwrap_or_else(|_| "proxy=debug".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let stderr = Arc::new(Mutex::new(String::new()));
        if let Some(err) = child.stderr.take() {
            capture_lines(err, stderr.clone(), None);
        }
        let rx = stdout_lines(&mut child)?;
        let mut me = Self {
            child,
            socks: None,
            http: None,
            metrics: None,
            stderr,
        };
        let want_socks = !args.windows(2).any(|w| w == ["--socks", "off"]);
        let want_http = !args.windows(2).any(|w| w == ["--http", "off"]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while (want_socks && me.socks.is_none()) || (want_http && me.http.is_none()) {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx.recv_timeout(left).map_err(|_| {
                io::Error::other(format!("proxy did not start; stderr:\n{}", me.stderr()))
            })?;
            let addr = |l: &str| l.split_whitespace().nth(3).and_then(|a| a.parse().ok());
            if line.starts_with("socks5 listening on ") {
                me.socks = addr(&line);
            } else if line.starts_with("http listening on ") {
                me.http = addr(&line);
            } else if line.starts_with("metrics listening on ") {
                me.metrics = addr(&line);
            }
        }
        Ok(me)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process logged so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Sends SIGINT (as Ctrl-C would) and waits up to `timeout` for the exit status.
    pub fn interrupt(&mut self, timeout: Duration) -> io::Result<Option<std::process::ExitStatus>> {
        Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()?;
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                return Ok(Some(status));
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(None)
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `proxy exit` process on a private Tox network, killed on drop.
#[derive(Debug)]
pub struct ExitProcess {
    child: Child,
    /// Its Tox ID.
    pub id: String,
    /// The `--metrics` listener, when asked for.
    pub metrics: Option<SocketAddr>,
}

impl ExitProcess {
    /// Starts `proxy exit` on `dir` (test defaults: the private network's nodes, no public
    /// bootstrap or STUN) with `extra` flags, and waits for its Tox ID (and metrics address).
    /// `RUST_LOG` comes from `PROXY_LOG` (default `proxy=debug,fabric=info`); its log goes to
    /// the file `PROXY_EXIT_LOG` names, or nowhere.
    pub fn start(nodes: &[String], dir: &Path, extra: &[&str]) -> io::Result<Self> {
        let mut args = vec!["exit".to_owned()];
        args.extend(private_network(nodes, dir));
        args.extend(extra.iter().map(|s| s.to_string()));
        let log = match std::env::var_os("PROXY_EXIT_LOG") {
            Some(path) => Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            ),
            None => Stdio::null(),
        };
        let mut child = Command::new(proxy_bin())
            .args(&args)
            .env(
                "RUST_LOG",
                std::env::var("PROXY_LOG").unwrap_or_else(|_| "proxy=debug,fabric=info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()?;
        let rx = stdout_lines(&mut child)?;
        let want_metrics = extra.contains(&"--metrics");
        let mut me = Self {
            child,
            id: String::new(),
            metrics: None,
        };
        while me.id.is_empty() || (want_metrics && me.metrics.is_none()) {
            let line = rx.recv_timeout(Duration::from_secs(30)).map_err(|_| {
                io::Error::other("proxy exit printed no tox id (and metrics address) in 30 s")
            })?;
            if let Some(rest) = line.strip_prefix("tox id: ") {
                me.id = rest.to_owned();
            } else if let Some(rest) = line.strip_prefix("metrics listening on ") {
                me.metrics = rest.split(' ').next().and_then(|a| a.parse().ok());
            }
        }
        if me.id.len() != 76 {
            return Err(io::Error::other(format!("not a Tox ID: {}", me.id)));
        }
        Ok(me)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ExitProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Opens a SOCKS5 CONNECT to the IPv4 `target` through `socks` (no authentication) and
/// returns the stream once the proxy said yes, everything bounded by `limit`.
pub fn socks5_connect(
    socks: SocketAddr,
    target: SocketAddr,
    limit: Duration,
) -> io::Result<TcpStream> {
    let SocketAddr::V4(target) = target else {
        return Err(io::Error::other("IPv4 targets only"));
    };
    let mut address = vec![1];
    address.extend(target.ip().octets());
    socks5_request(socks, &address, target.port(), limit)
}

/// [`socks5_connect`] to the name `host` (resolved by the proxy).
pub fn socks5_connect_name(
    socks: SocketAddr,
    host: &str,
    port: u16,
    limit: Duration,
) -> io::Result<TcpStream> {
    let len = u8::try_from(host.len()).map_err(|_| io::Error::other("name too long"))?;
    let mut address = vec![3, len];
    address.extend(host.as_bytes());
    socks5_request(socks, &address, port, limit)
}

/// A SOCKS5 CONNECT to `address` (type byte and address, as on the wire) and `port`.
fn socks5_request(
    socks: SocketAddr,
    address: &[u8],
    port: u16,
    limit: Duration,
) -> io::Result<TcpStream> {
    let mut s = TcpStream::connect_timeout(&socks, limit)?;
    s.set_read_timeout(Some(limit))?;
    s.set_write_timeout(Some(limit))?;
    s.set_nodelay(true)?;
    s.write_all(&[5, 1, 0])?;
    let mut method = [0u8; 2];
    s.read_exact(&mut method)?;
    if method != [5, 0] {
        return Err(io::Error::other(format!("method reply {method:?}")));
    }
    let mut request = vec![5, 1, 0];
    request.extend(address);
    request.extend(port.to_be_bytes());
    s.write_all(&request)?;
    let mut head = [0u8; 4];
    s.read_exact(&mut head)?;
    if head[1] != 0 {
        return Err(io::Error::other(format!("connect reply {}", head[1])));
    }
    let rest = match head[3] {
        1 => 4 + 2,
        4 => 16 + 2,
        atyp => return Err(io::Error::other(format!("reply address type {atyp}"))),
    };
    let mut bound = [0u8; 18];
    s.read_exact(&mut bound[..rest])?;
    Ok(s)
}

/// The flags of a node on the private Tox network `nodes` (its bootstrap nodes, never the
/// public ones; tests never reach the public STUN servers either), its data in `dir`.
pub fn private_network(nodes: &[String], dir: &Path) -> Vec<String> {
    let mut args: Vec<String> = [
        "--data-dir",
        &dir.display().to_string(),
        "--no-public-bootstrap",
        "--no-public-stun",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for n in nodes {
        args.extend(["--bootstrap".to_owned(), n.clone()]);
    }
    args
}

/// `curl URL` through the SOCKS5 proxy at `socks`, names resolved there
/// (`--socks5-hostname`), at most 100 s.
pub fn curl_socks(socks: &str, url: &str) -> std::process::Output {
    run_with_timeout(
        Command::new("curl")
            .args(["--silent", "--show-error", "--max-time", "100"])
            .args(["--socks5-hostname", socks, url]),
        Duration::from_secs(110),
    )
    .expect("run curl")
}

/// Resident set size of process `pid` in KiB (0 when unknown).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Runs `cmd` with a time limit, killing it when over; returns its output.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> io::Result<std::process::Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let drain = |r: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut v);
            }
            v
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{cmd:?} did not finish within {timeout:?}"),
            ));
        }
        thread::sleep(Duration::from_millis(20));
    };
    Ok(std::process::Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// Loads `url` in headless Chromium (Debian package `chromium`) through `proxy_server`
/// (`socks5://…` or `http://…`) and returns the DOM after scripts ran.
pub fn chromium_dump_dom(proxy_server: &str, url: &str) -> String {
    let profile = std::env::temp_dir().join(format!(
        "proxy-chromium-{}-{}",
        std::process::id(),
        proxy_server.replace([':', '/'], "_")
    ));
    let _ = std::fs::remove_dir_all(&profile);
    let out = run_with_timeout(
        Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
            ])
            .arg(format!("--proxy-server={proxy_server}"))
            // Chromium never proxies loopback unless told to.
            .arg("--proxy-bypass-list=<-loopback>")
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(["--dump-dom", url]),
        Duration::from_secs(90),
    )
    .expect("run chromium (Debian package chromium)");
    let _ = std::fs::remove_dir_all(&profile);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_round_trip() {
        let q = dns_query(0x1234, "example.test");
        let r = dns_answer(&q, "10.1.2.3".parse().unwrap()).unwrap();
        assert_eq!(dns_parse_a(&r), Some((0x1234, "10.1.2.3".parse().unwrap())));
        assert_eq!(dns_answer(&q[..5], "10.1.2.3".parse().unwrap()), None);
    }
}
