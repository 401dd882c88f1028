//! Punched-link crypto and throughput, printed as figures (no criterion harness, like
//! `mux_pipe`).
//!
//! `cargo bench -p fabric --bench link_seal` prints:
//! - the seal and open rates of the sans-IO core (`link::Sealer` / `link::Opener`,
//!   ChaCha20-Poly1305, one packet at a time) for 64-byte and 1,200-byte session packets;
//! - the goodput of two `punch::driver::UdpLink`s punched to each other on 127.0.0.1: the
//!   sender pushes 1,200-byte packets for 3 s as fast as the socket takes them
//!   (`UdpLink::try_send`, waiting on `writable` when the send buffer is full); the receiver
//!   counts what arrives (UDP may drop on loopback when the receiver falls behind; the loss is
//!   printed too).

#![allow(clippy::print_stdout)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use fabric::link::LinkSecret;
use fabric::punch::driver::{LinkEvent, TrySendError, UdpLink};
use fabric::punch::udp::{PunchConfig, UdpPunch};
use tokio::net::UdpSocket;

fn keys() -> (fabric::link::LinkKeys, fabric::link::LinkKeys) {
    let a = LinkSecret::from_random(rand::random());
    let b = LinkSecret::from_random(rand::random());
    let (pa, pb) = (a.public(), b.public());
    (a.derive(pb).unwrap(), b.derive(pa).unwrap())
}

fn core(size: usize) {
    let (a, b) = keys();
    let (mut sealer, _) = a.split();
    let (_, mut opener) = b.split();
    let payload = vec![0x5au8; size];
    let n = (400 * 1024 * 1024 / size).min(2_000_000);
    let mut sealed = Vec::with_capacity(n);
    let start = Instant::now();
    for _ in 0..n {
        let mut out = Vec::with_capacity(size + fabric::link::OVERHEAD);
        sealer.seal(&payload, &mut out).unwrap();
        sealed.push(out);
    }
    let seal = start.elapsed();
    let start = Instant::now();
    for p in &mut sealed {
        let plain = opener.open(p).unwrap();
        assert_eq!(plain.len(), size);
    }
    let open = start.elapsed();
    let rate = |d: Duration| {
        (
            (n * size * 8) as f64 / d.as_secs_f64() / 1e6,
            n as f64 / d.as_secs_f64() / 1e3,
        )
    };
    let (sm, sk) = rate(seal);
    let (om, ok) = rate(open);
    println!(
        "core {size:>5} B packets: seal {sm:>7.0} Mbit/s ({sk:>6.0} kpkt/s)   open {om:>7.0} Mbit/s ({ok:>6.0} kpkt/s)"
    );
}

async fn loopback() {
    let sa = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let sb = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let (aa, ab) = (sa.local_addr().unwrap(), sb.local_addr().unwrap());
    let (ka, kb) = keys();
    let now = Instant::now();
    let config = PunchConfig::default();
    let mut la = UdpLink::spawn(sa, UdpPunch::new(now, ka, &[ab], config));
    let mut lb = UdpLink::spawn(sb, UdpPunch::new(now, kb, &[aa], config));
    assert!(matches!(
        la.next_event().await,
        Some(LinkEvent::Connected { .. })
    ));
    assert!(matches!(
        lb.next_event().await,
        Some(LinkEvent::Connected { .. })
    ));
    const SIZE: usize = 1200;
    let duration = Duration::from_secs(3);
    let receiver = tokio::spawn(async move {
        let mut bytes = 0usize;
        let mut first: Option<Instant> = None;
        let mut last = Instant::now();
        let mut events = Vec::new();
        loop {
            events.clear();
            match tokio::time::timeout(Duration::from_millis(500), lb.next_events(&mut events, 256))
                .await
            {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            for e in &events {
                if let LinkEvent::Data(d) = e {
                    first.get_or_insert_with(Instant::now);
                    last = Instant::now();
                    bytes += d.len();
                }
            }
        }
        (bytes, first.map_or(Duration::ZERO, |f| last - f))
    });
    let payload = vec![0x5au8; SIZE];
    let start = Instant::now();
    let mut sent = 0usize;
    while start.elapsed() < duration {
        match la.try_send(&payload) {
            Ok(()) => sent += SIZE,
            Err(TrySendError::Full) => la.writable().await.unwrap(),
            Err(e) => panic!("{e}"),
        }
    }
    let (received, span) = receiver.await.unwrap();
    let mbit = |b: usize, d: Duration| (b * 8) as f64 / d.as_secs_f64() / 1e6;
    println!(
        "udp link on loopback, {SIZE} B packets: offered {:.0} Mbit/s, goodput {:.0} Mbit/s, loss {:.1} %",
        mbit(sent, duration),
        mbit(received, span),
        100.0 * (1.0 - received as f64 / sent as f64)
    );
}

fn main() {
    core(64);
    core(1200);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(loopback());
}
