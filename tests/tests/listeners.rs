//! The local listeners as a stranger on the network meets them: the design card's
//! `--socks :1080`, listeners open to the LAN (`--allow-lan`, `0.0.0.0`) holding their clients
//! to the destination rules, credentials on both front-ends, and requests for the proxy's own
//! listeners refused however they are nested.
//!
//! The LAN tests run the proxy in one network namespace and the stranger in another (root);
//! they skip with a message where namespaces are impossible.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use tests::netns::{Proc, Topology, unavailable};
use tests::servers::{HttpServer, ProxyProcess, proxy_bin, run_with_timeout};

const TOOL: &str = env!("CARGO_BIN_EXE_nst-tool");

fn skip() -> bool {
    if let Some(why) = unavailable() {
        eprintln!("SKIPPED: LAN listener tests need network namespaces: {why}");
        return true;
    }
    false
}

fn run(mut cmd: Command) -> Output {
    run_with_timeout(&mut cmd, Duration::from_secs(60)).expect("run")
}

/// curl with a time limit and `-w` of the HTTP code, in `cmd`'s namespace.
fn curl(topo: &Topology, client_side: bool, args: &[&str]) -> Output {
    let mut full = vec!["curl", "--silent", "--show-error", "--max-time", "20"];
    full.extend_from_slice(args);
    run(if client_side {
        topo.in_client(&full)
    } else {
        topo.in_server(&full)
    })
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The proxy in the server namespace with `args`, once its listeners are up.
fn proxy_in_server(topo: &Topology, args: &[&str]) -> Proc {
    let bin = proxy_bin().to_string_lossy().into_owned();
    let mut full = vec![bin.as_str()];
    full.extend_from_slice(args);
    Proc::spawn(topo.in_server(&full), "http listening on")
}

#[test]
fn port_alone_listens_on_this_machine_only() {
    if skip() {
        return;
    }
    let topo = Topology::new().expect("namespaces");
    let s = topo.server_v4.clone();
    let _web = Proc::spawn(
        topo.in_server(&[TOOL, "serve", "127.0.0.1:8000", "--", "127.0.0.1"]),
        "ready",
    );
    // The design card's spelling, and the bare port.
    let proxy = proxy_in_server(&topo, &["--socks", ":1080", "--http", "8080"]);
    assert!(
        proxy.ready.contains("127.0.0.1:8080 and [::1]:8080"),
        "{}",
        proxy.ready
    );
    for socks in ["127.0.0.1:1080", "[::1]:1080"] {
        let out = curl(
            &topo,
            false,
            &["--socks5", socks, "http://127.0.0.1:8000/index.html"],
        );
        assert!(
            text(&out).contains("static text"),
            "from this host via {socks}: {}",
            text(&out)
        );
    }
    // From the other namespace the port is closed.
    let from_lan = curl(
        &topo,
        true,
        &[
            "--socks5",
            &format!("{s}:1080"),
            "http://127.0.0.1:8000/index.html",
        ],
    );
    assert!(!from_lan.status.success());
    assert!(
        text(&from_lan).contains("Failed to connect") || text(&from_lan).contains("refused"),
        "{}",
        text(&from_lan)
    );
    assert!(
        !proxy.stderr().contains("open to the network"),
        "{}",
        proxy.stderr()
    );
}

#[test]
fn lan_clients_are_held_to_the_destination_rules() {
    if skip() {
        return;
    }
    let topo = Topology::new().expect("namespaces");
    let s = topo.server_v4.clone();
    // A service on the proxy host's loopback (must stay private) and one on its LAN address
    // (allowed below by --allow-cidr, as a stand-in for a public destination).
    let _web = Proc::spawn(
        topo.in_server(&[
            TOOL,
            "serve",
            "127.0.0.1:8000",
            &format!("{s}:8001"),
            "--",
            "127.0.0.1",
        ]),
        "ready",
    );
    let allowed = format!("{s}/32");
    let proxy = proxy_in_server(
        &topo,
        &[
            "--socks",
            ":1080",
            "--http",
            ":8080",
            "--allow-lan",
            "--allow-cidr",
            &allowed,
        ],
    );
    assert!(
        proxy.wait_stderr(
            "is open to the network without credentials",
            Duration::from_secs(10)
        ),
        "one clear line at start:\n{}",
        proxy.stderr()
    );
    let socks = format!("{s}:1080");
    let http = format!("http://{s}:8080");
    for target in [
        "http://127.0.0.1:8000/index.html",
        "http://localhost:8000/index.html",
        "http://[::1]:8000/index.html",
        "http://169.254.169.254/latest/meta-data/",
    ] {
        let out = curl(&topo, true, &["--socks5-hostname", &socks, target]);
        assert!(!out.status.success(), "{target}: {}", text(&out));
        assert!(
            !text(&out).contains("static text"),
            "{target}: {}",
            text(&out)
        );
        let out = curl(&topo, true, &["-x", &http, "-w", "%{http_code}", target]);
        assert!(text(&out).ends_with("403"), "{target}: {}", text(&out));
        let out = curl(&topo, true, &["-p", "-x", &http, target]);
        assert!(!out.status.success(), "CONNECT {target}: {}", text(&out));
    }
    assert!(
        proxy.wait_stderr("destination refused by policy", Duration::from_secs(10)),
        "{}",
        proxy.stderr()
    );
    // The allowed destination works from the LAN, and everything still works from this host.
    let out = curl(
        &topo,
        true,
        &["--socks5", &socks, &format!("http://{s}:8001/index.html")],
    );
    assert!(text(&out).contains("static text"), "{}", text(&out));
    let out = curl(
        &topo,
        false,
        &[
            "--socks5",
            "127.0.0.1:1080",
            "http://127.0.0.1:8000/index.html",
        ],
    );
    assert!(text(&out).contains("static text"), "{}", text(&out));
    // The status of the node is not for strangers' keys, nor for pages of other sites.
    let out = curl(&topo, true, &[&format!("{http}/status")]);
    assert!(text(&out).starts_with("proxy direct"), "{}", text(&out));
    let out = curl(
        &topo,
        false,
        &[
            "-H",
            "Host: rebind.example:8080",
            "-w",
            "%{http_code}",
            "http://127.0.0.1:8080/status",
        ],
    );
    assert!(text(&out).ends_with("403"), "{}", text(&out));
}

#[test]
fn credentials_guard_both_front_ends() {
    if skip() {
        return;
    }
    let topo = Topology::new().expect("namespaces");
    let s = topo.server_v4.clone();
    let _web = Proc::spawn(
        topo.in_server(&[TOOL, "serve", &format!("{s}:8001"), "--", "127.0.0.1"]),
        "ready",
    );
    let allowed = format!("{s}/32");
    let bind_socks = format!("{s}:1080");
    let bind_http = format!("{s}:8080");
    let proxy = proxy_in_server(
        &topo,
        &[
            "--socks",
            &bind_socks,
            "--http",
            &bind_http,
            "--socks-user",
            "alice",
            "--socks-pass",
            "s3cret",
            "--allow-cidr",
            &allowed,
        ],
    );
    assert!(
        !proxy.stderr().contains("open to the network"),
        "{}",
        proxy.stderr()
    );
    let url = format!("http://{s}:8001/index.html");
    let http = format!("http://{bind_http}");
    let out = curl(&topo, true, &["-x", &http, "-w", "%{http_code}", &url]);
    assert!(text(&out).ends_with("407"), "{}", text(&out));
    let out = curl(&topo, true, &["-x", &http, "-D", "-", &url]);
    assert!(
        text(&out)
            .to_ascii_lowercase()
            .contains("proxy-authenticate: basic"),
        "{}",
        text(&out)
    );
    let out = curl(
        &topo,
        true,
        &[
            "-x",
            &http,
            "--proxy-user",
            "alice:wrong",
            "-w",
            "%{http_code}",
            &url,
        ],
    );
    assert!(text(&out).ends_with("407"), "{}", text(&out));
    let out = curl(
        &topo,
        true,
        &["-x", &http, "--proxy-user", "alice:s3cret", &url],
    );
    assert!(text(&out).contains("static text"), "{}", text(&out));
    let out = curl(
        &topo,
        true,
        &["-p", "-x", &http, "--proxy-user", "alice:s3cret", &url],
    );
    assert!(
        text(&out).contains("static text"),
        "CONNECT: {}",
        text(&out)
    );
    let out = curl(&topo, true, &["-p", "-x", &http, &url]);
    assert!(!out.status.success(), "CONNECT without: {}", text(&out));
    let out = curl(&topo, true, &["--socks5", &bind_socks, &url]);
    assert!(!out.status.success(), "{}", text(&out));
    let out = curl(
        &topo,
        true,
        &[
            "--socks5",
            &bind_socks,
            "--proxy-user",
            "alice:s3cret",
            &url,
        ],
    );
    assert!(text(&out).contains("static text"), "{}", text(&out));
    let status = curl(&topo, false, &[&format!("{http}/status")]);
    assert!(
        text(&status).contains("without valid credentials"),
        "{}",
        text(&status)
    );
}

/// One TCP write of many `CONNECT`s to the proxy's own HTTP listener: each is refused at
/// once, so they cannot nest into each other and use up the connection limit.
#[test]
fn pipelined_self_connects_do_not_starve_other_clients() {
    let server = HttpServer::start().unwrap();
    let proxy =
        ProxyProcess::start_raw(&["--socks", ":0", "--http", ":0", "--max-connections", "64"])
            .unwrap();
    let http = proxy.http.unwrap();
    let socks = proxy.socks.unwrap();
    let mut attack = TcpStream::connect(http).unwrap();
    let mut burst = Vec::new();
    for i in 0..1500 {
        // Every alias of the listeners: the address, localhost, the other listener.
        let target = match i % 4 {
            0 => http.to_string(),
            1 => format!("localhost:{}", http.port()),
            2 => socks.to_string(),
            _ => format!("[::]:{}", http.port()),
        };
        burst.extend_from_slice(
            format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes(),
        );
    }
    attack.write_all(&burst).unwrap();

    let started = Instant::now();
    let out = run_with_timeout(
        Command::new("curl").args([
            "--silent",
            "--show-error",
            "--max-time",
            "10",
            "-x",
            &format!("http://{http}"),
            &server.url("/index.html"),
        ]),
        Duration::from_secs(30),
    )
    .unwrap();
    let took = started.elapsed();
    println!("another client served {took:?} after 1,500 pipelined self-CONNECTs");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("static text"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The attacking connection got a refusal for each, in order.
    attack
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut answers = Vec::new();
    let mut buf = [0u8; 65536];
    while count(&answers, b"HTTP/1.1 403") < 1500 {
        let n = attack.read(&mut buf).expect("answers keep coming");
        assert!(n > 0, "closed after {}", count(&answers, b"HTTP/1.1 "));
        answers.extend_from_slice(&buf[..n]);
    }
    assert_eq!(count(&answers, b"HTTP/1.1 200"), 0);

    // SOCKS5 to itself is refused the same way (reply 2, not allowed).
    for target in [http, socks] {
        let reply = socks_connect(socks, target);
        assert_eq!(reply[1], 2, "SOCKS5 CONNECT {target}: {reply:?}");
    }
    let status = String::from_utf8_lossy(
        &run_with_timeout(
            Command::new("curl").args(["--silent", &format!("http://{http}/status")]),
            Duration::from_secs(30),
        )
        .unwrap()
        .stdout,
    )
    .into_owned();
    assert!(
        status.contains("1502 requests for this proxy's own listeners"),
        "{status}"
    );
}

fn count(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

fn socks_connect(proxy: SocketAddr, target: SocketAddr) -> Vec<u8> {
    let mut s = TcpStream::connect(proxy).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(&[5, 1, 0]).unwrap();
    let mut m = [0; 2];
    s.read_exact(&mut m).unwrap();
    let SocketAddr::V4(v4) = target else {
        panic!("ipv4 only here")
    };
    let mut req = vec![5, 1, 0, 1];
    req.extend_from_slice(&v4.ip().octets());
    req.extend_from_slice(&v4.port().to_be_bytes());
    s.write_all(&req).unwrap();
    let mut reply = vec![0; 10];
    s.read_exact(&mut reply).unwrap();
    reply
}
