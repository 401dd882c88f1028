//! How fast DNS answers come through whole-system mode: distinct lookups asked in a client
//! namespace whose traffic `proxy --tun --exit ID` captures, each answered by the exit's
//! resolver over the session, against the same lookups asked of that resolver directly in
//! the exit's namespace. The topology is the TUN tests' (`Topology::routed`: client, router,
//! server namespaces; a private Tox network of `tox-bootstrapd` daemons and the exit in the
//! server namespace). Nothing leaves the namespaces it creates.
//!
//! The rounds start once the session left Tox's TCP relay for a direct path (at most 60 s;
//! c-toxcore begins every friend connection on a relay). Each round runs `nst-tool lookups` (every lookup from a new socket, as resolvers send
//! them, 8 at a time) through the TUN and then directly, and prints both with the session's
//! path and smoothed RTT from `proxy status`. The end prints the medians over the rounds,
//! then single lookups made after half a second of quiet (what a lookup on an idle session
//! costs).
//! The figure: through TUN + exit at least 500 lookups/s, and the p99 within 5 ms of
//! the path RTT plus the resolver's own time (the direct p99).
//!
//! `target/release/bench-dns` as root, after `cargo build --release -p proxy -p tests`
//! (env: `PROXY_BIN` for the binary under test, else the debug one is built and used;
//! `BENCH_ROUNDS`, default 5; `BENCH_LOOKUPS`, default 1000; `BENCH_THREADS`, default 8;
//! `PROXY_LOG` for the processes' `RUST_LOG`; `BENCH_VERBOSE=1` to print the client's and
//! the exit's logs at the end; `BENCH_SITE_ROUTE=1` to give both ends a route to the site's
//! private /16 through the router, as an office or a VPN has, so that the session may ride a
//! punched link instead of Tox). Needs `tox-bootstrapd` (Debian `toxcore-utils`), `ip` and
//! `/dev/net/tun`.

use std::process::Command;
use std::time::{Duration, Instant};

use tests::bench::{env_or, median, output, path_line, site_routes, tool};
use tests::netns::{EtcFile, ExitOverTox, Proc, Topology, unavailable};
use tests::servers::proxy_bin;

/// Any address on port 53 is captured and answered by the exit's resolver.
const ASKED: &str = "192.168.77.1:53";
/// How long to wait for the session to leave a Tox TCP relay before the rounds.
const DIRECT_PATH_WAIT: Duration = Duration::from_secs(60);
/// Single lookups on a quiet session, and the pause before each.
const IDLE_LOOKUPS: usize = 15;
const IDLE_GAP: Duration = Duration::from_millis(500);
/// Where the client's status page listens, inside the client namespace.
const STATUS: &str = "127.0.0.1:8080";

/// What one `nst-tool lookups` run printed.
#[derive(Debug, Clone, Copy)]
struct Run {
    answered: usize,
    per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
}

impl Run {
    /// Parses `answered A of N in S s: R/s, p50 X ms, p99 Y ms`.
    fn parse(line: &str) -> Option<Self> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let num = |after: &str| -> Option<f64> {
            let at = words.iter().position(|w| *w == after)?;
            words
                .get(at + 1)?
                .trim_end_matches(['/', 's', ','])
                .parse()
                .ok()
        };
        Some(Self {
            answered: num("answered")? as usize,
            per_sec: words
                .iter()
                .find(|w| w.ends_with("/s,"))?
                .trim_end_matches("/s,")
                .parse()
                .ok()?,
            p50_ms: num("p50")?,
            p99_ms: num("p99")?,
        })
    }
}

/// One lookup run in a namespace (`ns` builds its command).
fn lookups(
    ns: impl Fn(&[&str]) -> Command,
    tool: &str,
    server: &str,
    n: &str,
    threads: &str,
) -> Run {
    let line = output(ns(&[tool, "lookups", server, n, threads])).expect("nst-tool lookups");
    Run::parse(line.trim()).unwrap_or_else(|| panic!("cannot read {line:?}"))
}

fn summary(name: &str, runs: &[Run]) {
    let all = |f: fn(&Run) -> f64| -> String {
        runs.iter()
            .map(|r| format!("{:.0}", f(r)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "{name:<20} median {:>6.0}/s  p50 {:>7.2} ms  p99 {:>7.2} ms   (rates {}; p99s {})",
        median(runs.iter().map(|r| r.per_sec).collect()),
        median(runs.iter().map(|r| r.p50_ms).collect()),
        median(runs.iter().map(|r| r.p99_ms).collect()),
        all(|r| r.per_sec),
        runs.iter()
            .map(|r| format!("{:.1}", r.p99_ms))
            .collect::<Vec<_>>()
            .join(", "),
    );
}

fn main() {
    if let Some(why) = unavailable() {
        eprintln!("bench-dns needs network namespaces: {why}");
        std::process::exit(2);
    }
    let rounds = env_or("BENCH_ROUNDS", 5).max(1);
    let n = env_or("BENCH_LOOKUPS", 1000).to_string();
    let threads = env_or("BENCH_THREADS", 8).to_string();
    let tool = tool();
    let bin = proxy_bin().to_string_lossy().into_owned();

    let topo = Topology::routed().expect("namespaces");
    if std::env::var_os("BENCH_SITE_ROUTE").is_some() {
        site_routes(&topo);
    }
    // The resolver: every name is answered with the server's address.
    let http4 = format!("{}:80", topo.server_v4);
    let _servers = Proc::spawn(
        topo.in_server(&[&tool, "serve", &http4, "--", &topo.server_v4]),
        "ready",
    );
    // Written before the exit starts: `ip netns exec` mounts it at start.
    let _resolv = EtcFile::resolv_conf(&topo.server, &topo.server_v4);
    let web_only = format!("{}/32", topo.server_v4);
    let net = ExitOverTox::start(&topo, &tool, &["--allow-cidr", &web_only]);
    let mut args = vec![bin.as_str(), "--tun", "--socks", "off", "--http", STATUS];
    args.extend(net.client_args());
    let started = Instant::now();
    let client = Proc::spawn(topo.in_client(&args), "tun mode up");

    // The session: a lookup answered (each try waits up to 5 s for its answer).
    loop {
        let asked = output(topo.in_client(&[&tool, "dns", ASKED, "warm.bench.test"]));
        if asked.is_ok_and(|a| a.trim() == topo.server_v4) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no lookup answered within 120 s of the client's start; client:\n{}",
            client.stderr()
        );
    }
    println!(
        "session up {:.1} s after the client's start; {}",
        started.elapsed().as_secs_f64(),
        path_line(&topo, &bin, STATUS)
    );
    // c-toxcore starts a friend connection on a TCP relay and moves it to UDP once it found
    // the peer's address; the figure is the steady state's, so wait for a direct path
    // (bounded: on a relay the rounds run anyway, and say so).
    let waited = Instant::now();
    let mut path = path_line(&topo, &bin, STATUS);
    while path.contains("relay") && waited.elapsed() < DIRECT_PATH_WAIT {
        std::thread::sleep(Duration::from_millis(250));
        path = path_line(&topo, &bin, STATUS);
    }
    println!(
        "rounds start {:.1} s after the client's start; {path}",
        started.elapsed().as_secs_f64()
    );

    let resolver = format!("{}:53", topo.server_v4);
    let (mut through, mut direct) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let t = lookups(|a| topo.in_client(a), &tool, ASKED, &n, &threads);
        let d = lookups(|a| topo.in_server(a), &tool, &resolver, &n, &threads);
        println!(
            "round {round}: through tun + exit {} of {n}, {:.0}/s, p50 {:.2} ms, p99 {:.2} ms; \
             directly at the exit {:.0}/s, p50 {:.2} ms, p99 {:.2} ms; {}",
            t.answered,
            t.per_sec,
            t.p50_ms,
            t.p99_ms,
            d.per_sec,
            d.p50_ms,
            d.p99_ms,
            path_line(&topo, &bin, STATUS),
        );
        through.push(t);
        direct.push(d);
    }
    summary("through tun + exit", &through);
    summary("directly at the exit", &direct);

    // A lookup on a quiet session, as a browser's first after a pause: one at a time, each
    // after longer than the Tox thread keeps its busy pace once packets stop.
    let mut idle = Vec::new();
    for _ in 0..IDLE_LOOKUPS {
        std::thread::sleep(IDLE_GAP);
        let one = lookups(|a| topo.in_client(a), &tool, ASKED, "1", "1");
        if one.answered == 1 {
            idle.push(one.p50_ms);
        }
    }
    idle.sort_by(f64::total_cmp);
    println!(
        "after {} ms idle      {} of {IDLE_LOOKUPS} answered, median {:.2} ms, max {:.2} ms   ({})",
        IDLE_GAP.as_millis(),
        idle.len(),
        idle.get(idle.len() / 2).copied().unwrap_or(f64::NAN),
        idle.last().copied().unwrap_or(f64::NAN),
        idle.iter()
            .map(|t| format!("{t:.1}"))
            .collect::<Vec<_>>()
            .join(", "),
    );
    if std::env::var_os("BENCH_VERBOSE").is_some() {
        eprintln!(
            "client log:\n{}\nexit log:\n{}",
            client.stderr(),
            net.exit.stderr()
        );
    }
}
