//! `proxy` in direct mode (no `--exit`), driven by real clients: curl, Chromium, and a
//! hand-built SOCKS5 client where curl cannot show what we check (reply codes, UDP).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use tests::servers::{
    DnsServer, HttpServer, PAGE_RENDERED_TEXT, ProxyProcess, SocksUdp, check_big,
    chromium_dump_dom, http_get, proxy_bin, run_with_timeout,
};

const LIMIT: Duration = Duration::from_secs(60);

fn curl(args: &[&str]) -> std::process::Output {
    run_with_timeout(
        Command::new("curl")
            .args(["--silent", "--show-error", "--max-time", "30"])
            .args(args),
        LIMIT,
    )
    .expect("run curl (Debian package curl)")
}

/// Fetches `url` through the HTTP proxy `http`: the body, a newline, and the status code.
fn through_http_proxy(http: &str, url: &str) -> String {
    let out = curl(&["-x", http, "-w", "\n%{http_code}", url]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn curl_ok(args: &[&str]) -> Vec<u8> {
    let out = curl(args);
    assert!(
        out.status.success(),
        "curl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn socks5_hostname_get_small_and_large() {
    let server = HttpServer::start().unwrap();
    let proxy = ProxyProcess::start(&[]).unwrap();
    let socks = proxy.socks.unwrap().to_string();
    // A name, passed unresolved to the proxy (curl --socks5-hostname).
    let url = format!("http://localhost:{}/index.html", server.addr().port());
    let page = curl_ok(&["--socks5-hostname", &socks, &url]);
    assert!(String::from_utf8_lossy(&page).contains("<h1 id=\"t\">static text</h1>"));
    assert!(
        proxy
            .stderr()
            .contains(&format!("target=localhost:{}", server.addr().port())),
        "the proxy got the name, not an address:\n{}",
        proxy.stderr()
    );

    let n = 20 * 1024 * 1024 + 7;
    let body = curl_ok(&["--socks5", &socks, &server.url(&format!("/big/{n}"))]);
    check_big(&body, n);
}

#[test]
fn http_forward_get_post_headers_and_keep_alive() {
    let server = HttpServer::start().unwrap();
    let proxy = ProxyProcess::start(&[]).unwrap();
    let http = format!("http://{}", proxy.http.unwrap());

    let page = curl_ok(&["-x", &http, &server.url("/index.html")]);
    assert!(String::from_utf8_lossy(&page).contains("static text"));

    // POST with a body, fixed length and chunked.
    let echoed = curl_ok(&[
        "-x",
        &http,
        "--data-binary",
        "hello body",
        &server.url("/echo"),
    ]);
    assert_eq!(echoed, b"hello body");
    let echoed = curl_ok(&[
        "-x",
        &http,
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        "chunked body",
        &server.url("/echo"),
    ]);
    assert_eq!(echoed, b"chunked body");

    // Hop-by-hop headers do not reach the origin; end-to-end ones do.
    let headers = curl_ok(&[
        "-x",
        &http,
        "-H",
        "Proxy-Connection: keep-alive",
        "-H",
        "Proxy-Authorization: Basic eDp5",
        "-H",
        "Connection: keep-alive, X-Drop-Me",
        "-H",
        "X-Drop-Me: 1",
        "-H",
        "X-Keep-Me: 2",
        &server.url("/headers"),
    ]);
    let headers = String::from_utf8_lossy(&headers);
    assert!(headers.contains("x-keep-me: 2"), "{headers}");
    assert!(
        headers.contains(&format!("host: {}", server.addr())),
        "{headers}"
    );
    for gone in [
        "proxy-connection",
        "proxy-authorization",
        "x-drop-me",
        "keep-alive",
    ] {
        assert!(!headers.contains(gone), "{gone} leaked:\n{headers}");
    }

    // Three requests on one client connection, and a big body.
    let before = server.requests();
    let out = curl_ok(&[
        "-x",
        &http,
        "-w",
        "[%{num_connects}]",
        &server.url("/index.html"),
        &server.url("/index.html"),
        &server.url("/index.html"),
    ]);
    let out = String::from_utf8_lossy(&out);
    assert_eq!(out.matches("static text").count(), 3);
    assert_eq!(
        out.matches("[0]").count(),
        2,
        "curl reused its connection: {out}"
    );
    assert_eq!(server.requests() - before, 3);
    let n = 8 * 1024 * 1024;
    check_big(
        &curl_ok(&["-x", &http, &server.url(&format!("/big/{n}"))]),
        n,
    );

    // The proxy answers requests addressed to itself.
    let pac = curl_ok(&[&format!("{http}/proxy.pac")]);
    let pac = String::from_utf8_lossy(&pac);
    assert!(
        pac.contains(&format!("PROXY {}", proxy.http.unwrap())),
        "{pac}"
    );
    assert!(
        pac.contains(&format!("SOCKS5 {}", proxy.socks.unwrap())),
        "{pac}"
    );
    let out = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("{http}/other"),
    ]);
    assert_eq!(out.stdout, b"404");

    // An HTTP/1.0 request without Host, with userinfo in the URL: the origin gets a Host
    // header built from the URL, without the credentials.
    let mut s = TcpStream::connect(proxy.http.unwrap()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let port = server.addr().port();
    write!(
        s,
        "GET http://user:pw@127.0.0.1:{port}/headers HTTP/1.0\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.0 200"), "{resp}");
    assert!(
        resp.contains(&format!("host: 127.0.0.1:{port}\n")),
        "{resp}"
    );
    assert!(!resp.contains("pw"), "{resp}");
}

#[test]
fn http_connect_tunnel() {
    let server = HttpServer::start().unwrap();
    let proxy = ProxyProcess::start(&[]).unwrap();
    let http = format!("http://{}", proxy.http.unwrap());
    let page = curl_ok(&["-p", "-x", &http, &server.url("/index.html")]);
    assert!(String::from_utf8_lossy(&page).contains("static text"));
    let n = 16 * 1024 * 1024 + 1;
    check_big(
        &curl_ok(&["-p", "-x", &http, &server.url(&format!("/big/{n}"))]),
        n,
    );
    assert!(
        proxy
            .stderr()
            .contains(&format!("target={}", server.addr()))
    );
}

#[test]
fn socks5_username_password() {
    let server = HttpServer::start().unwrap();
    let proxy = ProxyProcess::start(&["--socks-user", "alice", "--socks-pass", "s3cret"]).unwrap();
    let socks = proxy.socks.unwrap().to_string();
    let url = server.url("/index.html");
    let page = curl_ok(&[
        "--socks5-hostname",
        &socks,
        "--proxy-user",
        "alice:s3cret",
        &url,
    ]);
    assert!(String::from_utf8_lossy(&page).contains("static text"));
    let wrong = curl(&[
        "--socks5-hostname",
        &socks,
        "--proxy-user",
        "alice:nope",
        &url,
    ]);
    assert!(!wrong.status.success());
    let none = curl(&["--socks5-hostname", &socks, &url]);
    assert!(!none.status.success());
    assert_eq!(server.requests(), 1);
}

/// Greets a SOCKS5 server without auth and sends a request; returns the reply and stream.
fn socks_request(proxy: SocketAddr, cmd: u8, target: SocketAddr) -> (TcpStream, Vec<u8>) {
    let mut s = TcpStream::connect(proxy).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(&[5, 1, 0]).unwrap();
    let mut m = [0; 2];
    s.read_exact(&mut m).unwrap();
    assert_eq!(m, [5, 0]);
    let SocketAddr::V4(v4) = target else {
        panic!("ipv4 only here")
    };
    let mut req = vec![5, cmd, 0, 1];
    req.extend_from_slice(&v4.ip().octets());
    req.extend_from_slice(&v4.port().to_be_bytes());
    s.write_all(&req).unwrap();
    let mut reply = vec![0; 10];
    s.read_exact(&mut reply).unwrap();
    (s, reply)
}

#[test]
fn socks5_udp_associate_carries_dns() {
    let dns = DnsServer::start(Ipv4Addr::new(10, 9, 8, 7)).unwrap();
    let proxy = ProxyProcess::start(&[]).unwrap();
    let udp = SocksUdp::associate(proxy.socks.unwrap()).expect("udp associate accepted");
    for (i, name) in ["example.test", "another.example.test"].iter().enumerate() {
        let id = 100 + i as u16;
        let answer = udp.dns_query(dns.addr(), id, name).expect("dns answer");
        assert_eq!(answer, (id, Ipv4Addr::new(10, 9, 8, 7)));
    }
}

#[test]
fn refusals_get_the_right_codes() {
    let server = HttpServer::start().unwrap();
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();

    // Nothing listening: SOCKS5 "connection refused" (5), HTTP 502 saying why.
    let proxy = ProxyProcess::start(&[]).unwrap();
    let (_s, reply) = socks_request(proxy.socks.unwrap(), 1, dead);
    assert_eq!(reply[1], 5);
    let http = format!("http://{}", proxy.http.unwrap());
    let out = through_http_proxy(&http, &format!("http://{dead}/"));
    assert!(out.ends_with("\n502"), "{out}");
    assert!(out.contains("connection refused"), "{out}");
    drop(proxy);

    // With the destination rules on, loopback is refused: SOCKS5 "not allowed" (2), HTTP 403.
    let proxy = ProxyProcess::start(&["--direct-policy"]).unwrap();
    let (_s, reply) = socks_request(proxy.socks.unwrap(), 1, server.addr());
    assert_eq!(reply[1], 2);
    let http = format!("http://{}", proxy.http.unwrap());
    let out = through_http_proxy(&http, &server.url("/index.html"));
    assert!(out.ends_with("\n403"), "{out}");
    assert!(out.contains("127.0.0.1 is a loopback address"), "{out}");
    let out = curl(&["-p", "-x", &http, &server.url("/index.html")]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("403"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A name is checked by what it resolves to.
    let url = format!("http://localhost:{}/", server.addr().port());
    assert!(through_http_proxy(&http, &url).ends_with("\n403"));
    assert_eq!(server.requests(), 0, "nothing reached the server");

    // With private destinations allowed but one port denied.
    let port = server.addr().port().to_string();
    let proxy =
        ProxyProcess::start(&["--direct-policy", "--allow-private", "--deny-port", &port]).unwrap();
    let (_s, reply) = socks_request(proxy.socks.unwrap(), 1, server.addr());
    assert_eq!(reply[1], 2);
    let (_s, reply) = socks_request(proxy.socks.unwrap(), 1, dead);
    assert_eq!(reply[1], 5, "other ports pass the policy");
}

#[test]
fn bad_settings_fail_clearly() {
    let dir = std::env::temp_dir().join(format!("proxy-direct-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases = [
        ("sockz = \"127.0.0.1:1\"\n", "unknown field `sockz`"),
        ("idle-timeout = \"never\"\n", "idle-timeout"),
        ("[policy]\ndeny-cidrs = [\"10.0.0.0/77\"]\n", "10.0.0.0/77"),
    ];
    for (i, (text, needle)) in cases.iter().enumerate() {
        let path = dir.join(format!("bad{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let out =
            run_with_timeout(Command::new(proxy_bin()).arg("--config").arg(&path), LIMIT).unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text}: {err}");
        assert!(err.contains(needle), "{text}: {err}");
        assert!(err.contains(&path.display().to_string()), "{err}");
    }
    let out = run_with_timeout(
        Command::new(proxy_bin()).args(["--config", "/nonexistent/proxy.toml"]),
        LIMIT,
    )
    .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read config file"));
    let _ = std::fs::remove_dir_all(&dir);

    // Bad values for the Tox roles are refused before any Tox node starts (so this never
    // touches a Tox network): exit code 2 and the parser's reason.
    for (args, needle) in [
        (
            &["--exit", "ABCD", "--no-public-bootstrap"][..],
            "wrong length",
        ),
        (
            &["exit", "--allow", "XYZ", "--no-public-bootstrap"],
            "--allow",
        ),
        (
            &["--share", "nas:80", "--no-public-bootstrap"],
            "--share \"nas:80\": no peer is called nas",
        ),
        (
            &["--peer", "nas=XYZ", "--no-public-bootstrap"],
            "wrong length",
        ),
        (
            &[
                "exit",
                "--allow-any",
                "--no-public-bootstrap",
                "--bootstrap",
                "nonsense",
            ],
            "--bootstrap",
        ),
    ] {
        let out = run_with_timeout(Command::new(proxy_bin()).args(args), LIMIT).unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }

    // A port already taken.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = run_with_timeout(
        Command::new(proxy_bin()).args(["--socks", &addr, "--http", "off"]),
        LIMIT,
    )
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("cannot listen on {addr}")));
}

#[test]
fn status_and_metrics_count_connections_and_failures() {
    let server = HttpServer::start().unwrap();
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = ProxyProcess::start(&["--metrics", "127.0.0.1:0"]).unwrap();
    let socks = proxy.socks.unwrap().to_string();
    let n = 1 << 20;
    let body = curl_ok(&[
        "--socks5-hostname",
        &socks,
        &server.url(&format!("/big/{n}")),
    ]);
    check_big(&body, n);
    let (refused, reply) = socks_request(proxy.socks.unwrap(), 1, dead);
    assert_eq!(reply[1], 5, "refused");
    drop(refused);

    // `proxy status` asks the metrics listener here (asking the HTTP listener works too, but
    // is itself a connection to the front-ends and would show in the counts).
    let metrics = proxy.metrics.expect("metrics listener");
    let from = metrics.to_string();
    let deadline = std::time::Instant::now() + LIMIT;
    let text = loop {
        let out = run_with_timeout(
            Command::new(proxy_bin()).args(["status", "--from", &from]),
            LIMIT,
        )
        .unwrap();
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        // The two connections have ended once both show as closed.
        if text.contains("0 open") || std::time::Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(text.starts_with("proxy direct (up "), "{text}");
    assert!(
        text.contains("0 open, 2 accepted, 1 dial failures"),
        "{text}"
    );
    assert!(text.contains("/ 1.0 MiB down"), "{text}");

    // The metrics listener: Prometheus text, and 404 elsewhere.
    let (code, prom) = http_get(metrics, "/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(
        prom.contains("proxy_frontend_connections_total 2"),
        "{prom}"
    );
    assert!(
        prom.contains("proxy_frontend_dial_failures_total 1"),
        "{prom}"
    );
    // The body and the origin's response head.
    let down: u64 = prom
        .lines()
        .find_map(|l| l.strip_prefix("proxy_frontend_bytes_total{direction=\"down\"} "))
        .and_then(|v| v.parse().ok())
        .expect("bytes down");
    assert!((n..n + 512).contains(&down), "{prom}");
    assert_eq!(http_get(metrics, "/nothing").unwrap().0, 404);
    // The HTTP listener answers /status addressed to itself.
    let (code, text) = http_get(proxy.http.unwrap(), "/status").unwrap();
    assert_eq!(code, 200);
    assert!(text.starts_with("proxy direct"), "{text}");

    // Nobody listening: a clear error, exit code 1.
    let out = run_with_timeout(
        Command::new(proxy_bin()).args(["status", "--from", &dead.to_string()]),
        LIMIT,
    )
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("asking the proxy at {dead}")),
        "{err}"
    );
}

#[test]
fn ctrl_c_shuts_down_cleanly() {
    let mut proxy = ProxyProcess::start(&[]).unwrap();
    // An idle client connection must not hold the shutdown past the grace period.
    let _idle = TcpStream::connect(proxy.http.unwrap()).unwrap();
    let status = proxy
        .interrupt(Duration::from_secs(15))
        .unwrap()
        .expect("exited");
    assert!(status.success(), "{status:?}\n{}", proxy.stderr());
}

#[test]
fn chromium_loads_a_page_through_both_listeners() {
    let server = HttpServer::start().unwrap();
    let proxy = ProxyProcess::start(&[]).unwrap();
    let url = server.url("/index.html");
    for scheme_addr in [
        format!("socks5://{}", proxy.socks.unwrap()),
        format!("http://{}", proxy.http.unwrap()),
    ] {
        let before = proxy
            .stderr()
            .matches(&format!("target={}", server.addr()))
            .count();
        let dom = chromium_dump_dom(&scheme_addr, &url);
        assert!(
            dom.contains(PAGE_RENDERED_TEXT),
            "{scheme_addr}: dom was:\n{dom}"
        );
        let after = proxy
            .stderr()
            .matches(&format!("target={}", server.addr()))
            .count();
        assert!(
            after > before,
            "{scheme_addr}: the page did not go through the proxy"
        );
    }
    // And without a proxy listening there, the page does not load: the flag is honoured.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let dom = chromium_dump_dom(&format!("http://{dead}"), &url);
    assert!(!dom.contains(PAGE_RENDERED_TEXT));
}

#[test]
fn ipv6_targets_through_both_listeners() {
    let Ok(server) = HttpServer::start_on("[::1]:0".parse().unwrap()) else {
        eprintln!("skipped: this host has no IPv6 loopback");
        return;
    };
    let proxy = ProxyProcess::start(&[]).unwrap();
    let url = server.url("/index.html");
    assert!(url.starts_with("http://[::1]:"));
    let socks = proxy.socks.unwrap().to_string();
    let http = format!("http://{}", proxy.http.unwrap());
    for args in [
        vec!["--socks5", socks.as_str(), url.as_str()],
        vec!["-x", http.as_str(), url.as_str()],
        vec!["-p", "-x", http.as_str(), url.as_str()],
    ] {
        let page = curl_ok(&args);
        assert!(
            String::from_utf8_lossy(&page).contains("static text"),
            "{args:?}"
        );
    }
    assert_eq!(server.requests(), 3);
}

#[test]
fn idle_relays_are_closed() {
    let server = HttpServer::start().unwrap();
    let proxy = ProxyProcess::start(&["--idle-timeout", "1"]).unwrap();
    let (mut s, reply) = socks_request(proxy.socks.unwrap(), 1, server.addr());
    assert_eq!(reply[1], 0);
    // Used, then left idle: the proxy closes it within 1 to 1.5 s of the last byte.
    s.write_all(b"GET /index.html HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut buf = vec![0; 4096];
    let n = s.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let start = std::time::Instant::now();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut rest = Vec::new();
    // EOF (Ok) once the relay ends; the remaining page bytes may come first.
    let _ = s.read_to_end(&mut rest);
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(500),
        "closed too early: {waited:?}"
    );
    assert!(waited < Duration::from_secs(5), "not closed: {waited:?}");
}

#[test]
fn connection_limit_holds_new_clients_back() {
    let proxy = ProxyProcess::start(&["--max-connections", "1"]).unwrap();
    let socks = proxy.socks.unwrap();
    let first = TcpStream::connect(socks).unwrap();
    // Give the proxy time to accept the first and take the only slot.
    std::thread::sleep(Duration::from_millis(200));
    let mut second = TcpStream::connect(socks).unwrap();
    second.write_all(&[5, 1, 0]).unwrap();
    second
        .set_read_timeout(Some(Duration::from_millis(700)))
        .unwrap();
    let mut m = [0; 2];
    assert!(
        second.read_exact(&mut m).is_err(),
        "second client served while the first holds the slot"
    );
    drop(first);
    second
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let res = second.read_exact(&mut m);
    assert!(res.is_ok(), "{res:?}\n{}", proxy.stderr());
    assert_eq!(m, [5, 0]);
}

#[test]
fn dial_timeouts_get_504_and_ttl_expired() {
    // A listener that never accepts: once its accept queue is full, Linux drops further SYNs
    // and a connect hangs — a destination that times out, on loopback.
    let blackhole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = blackhole.local_addr().unwrap();
    let mut fillers = Vec::new();
    let full =
        (0..1000).any(
            |_| match TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
                Ok(s) => {
                    fillers.push(s);
                    false
                }
                Err(_) => true,
            },
        );
    assert!(full, "accept queue never filled");

    let proxy = ProxyProcess::start(&["--connect-timeout", "1"]).unwrap();
    let (_s, reply) = socks_request(proxy.socks.unwrap(), 1, addr);
    assert_eq!(
        reply[1], 6,
        "ttl expired, the usual socks5 answer for a timeout"
    );
    let http = format!("http://{}", proxy.http.unwrap());
    let out = through_http_proxy(&http, &format!("http://{addr}/"));
    assert!(out.ends_with("\n504"), "{out}");
    assert!(out.contains("timed out"), "{out}");
}
