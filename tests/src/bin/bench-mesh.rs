//! What a peer's shared service costs over the mesh: goodput and one-byte round trips from
//! `laptop` (the client namespace, `proxy --tun --socks … --peer nas=ID`) to a server in
//! `nas`'s namespace (`proxy exit --peer laptop=ID --share laptop:5201`), three ways side by
//! side in one run:
//!
//! - **direct**: a plain TCP connection between the namespaces (the ceiling);
//! - **socks**: through laptop's SOCKS5 listener to `nas.tox:5201`;
//! - **tun**: to nas's overlay address, through laptop's TUN.
//!
//! Both overlay ways ride the session's punched UDP link (the rounds wait for it). The
//! topology is the TUN tests' (`Topology::routed`), with a route to the site's private
//! network on both ends so that the peers may punch; the TUN captures only the overlay (and
//! an unused test network), so the direct way stays direct. The goal: the overlay
//! at least 80 % of the ceiling's goodput, and under 1 ms more p99 round trip, at 0 % loss.
//!
//! `target/release/bench-mesh` as root, after `cargo build --release -p proxy -p tests`
//! (env: `PROXY_BIN` for the binary under test; `BENCH_ROUNDS`, default 3; `BENCH_SECS`,
//! seconds of goodput per way and round, default 5; `BENCH_RTTS`, round trips, default
//! 2000; `BENCH_RATE_MBIT`, to shape laptop's uplink with `tc tbf` to that rate, as a home
//! line is, instead of the bare veth; `PROXY_LOG`; `BENCH_VERBOSE=1` for the logs). Needs
//! `tox-bootstrapd`, `ip`, `tc`, `/dev/net/tun`.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::time::{Duration, Instant};

use tests::bench::{env_or, median, output, path_line, site_routes, tool};
use tests::netns::{ExitOverTox, Proc, Topology, unavailable};
use tests::servers::proxy_bin;

/// The client's status page and SOCKS listener, inside the client namespace.
const STATUS: &str = "127.0.0.1:8080";
const SOCKS: &str = "127.0.0.1:1080";
/// The bench server's port in nas's namespace (shared with laptop).
const PORT: &str = "5201";
/// How long to wait for the punched link.
const PUNCH_WAIT: Duration = Duration::from_secs(90);

/// One way's figures.
#[derive(Debug, Clone, Copy)]
struct Figures {
    mbps: f64,
    p50: f64,
    p99: f64,
}

impl Figures {
    /// Parses `goodput X Mbit/s p50 Y ms p99 Z ms`.
    fn parse(line: &str) -> Option<Self> {
        let w: Vec<&str> = line.split_whitespace().collect();
        let after =
            |k: &str| -> Option<f64> { w.get(w.iter().position(|x| *x == k)? + 1)?.parse().ok() };
        Some(Self {
            mbps: after("goodput")?,
            p50: after("p50")?,
            p99: after("p99")?,
        })
    }
}

fn main() {
    if let Some(why) = unavailable() {
        eprintln!("bench-mesh needs network namespaces: {why}");
        std::process::exit(2);
    }
    let rounds = env_or("BENCH_ROUNDS", 3).max(1);
    let secs = env_or("BENCH_SECS", 5).max(1).to_string();
    let rtts = env_or("BENCH_RTTS", 2000).max(10).to_string();
    let tool = tool();
    let bin = proxy_bin().to_string_lossy().into_owned();

    let topo = Topology::routed().expect("namespaces");
    site_routes(&topo);
    let rate = env_or("BENCH_RATE_MBIT", 0);
    if rate > 0 {
        // laptop's uplink, both ways of the measurement leave by it.
        let rate = format!("{rate}mbit");
        output(topo.in_client(&[
            "tc",
            "qdisc",
            "add",
            "dev",
            &topo.client_if,
            "root",
            "tbf",
            "rate",
            &rate,
            "burst",
            "256kb",
            "latency",
            "50ms",
        ]))
        .expect("tc tbf");
        println!("laptop's uplink shaped to {rate}");
    }
    let listen = format!("0.0.0.0:{PORT}");
    let _server = Proc::spawn(topo.in_server(&[&tool, "tcpbench-serve", &listen]), "ready");
    let net = ExitOverTox::start_mesh(&topo, &tool, PORT);
    let nas_id: fabric::id::ToxId = net.exit.ready_value("tox id:").parse().expect("nas's id");
    let mut args = vec![
        bin.as_str(),
        "--tun",
        // Only the overlay (always routed) and a test network nothing uses: the direct way
        // must not go through the TUN.
        "--tun-route",
        "192.0.2.0/24",
        "--socks",
        SOCKS,
        "--http",
        STATUS,
    ];
    args.extend(net.client_args());
    let started = Instant::now();
    let laptop = Proc::spawn(topo.in_client(&args), "tun mode up");

    // The session, then the punched link.
    loop {
        let probe = output(topo.in_client(&[
            &tool, "tcpbench", "nas.tox", PORT, "--socks", SOCKS, "0.1", "10",
        ]));
        if probe.is_ok() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "nas.tox not reached within 120 s: {probe:?}\n{}",
            laptop.stderr()
        );
    }
    let mut path = path_line(&topo, &bin, STATUS);
    while !path.contains("udp-punched") && started.elapsed() < PUNCH_WAIT {
        std::thread::sleep(Duration::from_millis(250));
        path = path_line(&topo, &bin, STATUS);
    }
    println!(
        "rounds start {:.1} s after laptop's start; {path}",
        started.elapsed().as_secs_f64()
    );

    let v4 = fabric::overlay::OverlayTable::new([nas_id.public_key()])
        .addrs(&nas_id.public_key())
        .and_then(|a| a.v4)
        .expect("an overlay address")
        .to_string();
    let server = topo.server_v4.clone();
    let ways: [(&str, Vec<&str>); 3] = [
        (
            "direct",
            vec![&tool, "tcpbench", &server, PORT, &secs, &rtts],
        ),
        (
            "socks",
            vec![
                &tool, "tcpbench", "nas.tox", PORT, "--socks", SOCKS, &secs, &rtts,
            ],
        ),
        ("tun", vec![&tool, "tcpbench", &v4, PORT, &secs, &rtts]),
    ];
    let mut all: Vec<Vec<Figures>> = vec![Vec::new(); ways.len()];
    for round in 0..rounds {
        for (i, (name, cmd)) in ways.iter().enumerate() {
            let line = output(topo.in_client(cmd))
                .unwrap_or_else(|e| panic!("{name}: {e}\n{}", laptop.stderr()));
            let f = Figures::parse(line.trim()).unwrap_or_else(|| panic!("cannot read {line:?}"));
            println!(
                "round {round} {name:<6} {:>8.1} Mbit/s  p50 {:>6.3} ms  p99 {:>6.3} ms",
                f.mbps, f.p50, f.p99
            );
            all[i].push(f);
        }
        println!("          {}", path_line(&topo, &bin, STATUS));
    }
    let med = |i: usize, f: fn(&Figures) -> f64| median(all[i].iter().map(f).collect());
    println!("medians over {rounds} rounds ({secs} s of goodput, {rtts} round trips each):");
    for (i, (name, _)) in ways.iter().enumerate() {
        println!(
            "  {name:<6} {:>8.1} Mbit/s ({:>5.1} % of direct)  p50 {:>6.3} ms  p99 {:>6.3} ms \
             (+{:.3} ms)",
            med(i, |f| f.mbps),
            med(i, |f| f.mbps) / med(0, |f| f.mbps) * 100.0,
            med(i, |f| f.p50),
            med(i, |f| f.p99),
            med(i, |f| f.p99) - med(0, |f| f.p99),
        );
    }
    if std::env::var_os("BENCH_VERBOSE").is_some() {
        eprintln!(
            "laptop log:\n{}\nnas log:\n{}",
            laptop.stderr(),
            net.exit.stderr()
        );
    }
}
