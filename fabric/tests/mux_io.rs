//! The tokio adapter of the mux over `tokio::io::duplex`.

#![cfg(feature = "tokio")]

use std::time::Duration;

use fabric::mux::io::{self, Handle, Stream, WriteTimeout};
use fabric::mux::{Config, StreamError};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;

type Driver = JoinHandle<Result<(), io::DriverError>>;

fn connected(config: Config) -> ((Handle, Driver), (Handle, Driver)) {
    let (left, right) = tokio::io::duplex(256 * 1024);
    (io::spawn(left, config.clone()), io::spawn(right, config))
}

fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    ChaCha20Rng::seed_from_u64(seed).fill(&mut data[..]);
    data
}

async fn read_to_end(stream: &mut Stream) -> Vec<u8> {
    let mut got = Vec::new();
    stream.read_to_end(&mut got).await.expect("read to end");
    got
}

/// 32 streams each send 1 MiB (seeded, different per stream) and the other side echoes it
/// back; both directions are checked with SHA-256.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_streams_move_megabytes_intact() {
    const STREAMS: u64 = 32;
    const LEN: usize = 1 << 20;
    let ((client, _c), (server, _s)) = connected(Config::default());
    let echo = tokio::spawn(async move {
        let mut tasks = Vec::new();
        for _ in 0..STREAMS {
            let stream = server.accept().await.expect("accept");
            tasks.push(tokio::spawn(async move {
                let (mut rd, mut wr) = tokio::io::split(stream);
                let mut hasher = Sha256::new();
                let mut buf = vec![0u8; 32 * 1024];
                loop {
                    let n = rd.read(&mut buf).await.expect("server read");
                    if n == 0 {
                        break;
                    }
                    hasher.update(&buf[..n]);
                    wr.write_all(&buf[..n]).await.expect("echo");
                }
                wr.shutdown().await.expect("fin");
                hasher.finalize()
            }));
        }
        let mut hashes = Vec::new();
        for task in tasks {
            hashes.push(task.await.expect("echo task"));
        }
        hashes
    });
    let mut tasks = Vec::new();
    for seed in 0..STREAMS {
        let stream = client.open().expect("open");
        tasks.push(tokio::spawn(async move {
            let data = payload(seed, LEN);
            let (mut rd, mut wr) = tokio::io::split(stream);
            let writer = async {
                wr.write_all(&data).await.expect("client write");
                wr.shutdown().await.expect("fin");
            };
            let reader = async {
                let mut echoed = Vec::new();
                rd.read_to_end(&mut echoed).await.expect("client read");
                echoed
            };
            let ((), echoed) = tokio::join!(writer, reader);
            assert_eq!(
                Sha256::digest(&echoed),
                Sha256::digest(&data),
                "stream {seed} echo"
            );
            Sha256::digest(&data)
        }));
    }
    let run = async {
        let mut sent = Vec::new();
        for task in tasks {
            sent.push(task.await.expect("client task"));
        }
        let mut received = echo.await.expect("echo");
        sent.sort();
        received.sort();
        assert_eq!(sent, received, "server saw every stream intact");
    };
    tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("transfer timed out");
}

#[tokio::test]
async fn half_close_in_both_directions() {
    let ((client, _c), (server, _s)) = connected(Config::default());
    let mut stream = client.open().unwrap();
    stream.write_all(b"request").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut peer = server.accept().await.unwrap();
    assert_eq!(read_to_end(&mut peer).await, b"request");
    // The peer's read side is over, its write side is not.
    peer.write_all(b"response").await.unwrap();
    peer.shutdown().await.unwrap();
    assert_eq!(read_to_end(&mut stream).await, b"response");
    let error = stream.write_all(b"late").await.unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::BrokenPipe, "{error}");
}

#[tokio::test(start_paused = true)]
async fn write_all_timeout_reports_exactly_what_was_handed_over() {
    let window = 64 * 1024;
    let ((client, _c), (server, _s)) = connected(Config {
        window,
        ..Config::default()
    });
    let mut stream = client.open().unwrap();
    let data = payload(7, 200 * 1024);
    let error = stream
        .write_all_timeout(&data, Duration::from_secs(1))
        .await
        .unwrap_err();
    let written = error.written();
    assert!(matches!(error, WriteTimeout::Elapsed { .. }));
    // Nobody reads on the other side, so exactly one window was accepted.
    assert_eq!(written, window as usize);
    // Every byte that was handed over arrives, and nothing else.
    stream.shutdown().await.unwrap();
    let mut peer = server.accept().await.unwrap();
    let got = read_to_end(&mut peer).await;
    assert_eq!(got, &data[..written]);

    // Resuming from `written` delivers the rest without duplicates.
    let mut stream = client.open().unwrap();
    let mut peer = server.accept().await.unwrap();
    let reader = tokio::spawn(async move { read_to_end(&mut peer).await });
    let first = stream
        .write_all_timeout(&data, Duration::from_millis(1))
        .await;
    let written = first.err().map_or(data.len(), |e| e.written());
    stream
        .write_all_timeout(&data[written..], Duration::from_secs(10))
        .await
        .unwrap();
    stream.shutdown().await.unwrap();
    assert_eq!(reader.await.unwrap(), data);
}

#[tokio::test]
async fn link_failure_reaches_every_stream() {
    let ((client, _c), (server, server_driver)) = connected(Config::default());
    let mut streams = Vec::new();
    for _ in 0..5 {
        let mut stream = client.open().unwrap();
        stream.write_all(b"hello").await.unwrap();
        streams.push(stream);
    }
    for _ in 0..5 {
        let mut peer = server.accept().await.unwrap();
        let mut buf = [0u8; 5];
        peer.read_exact(&mut buf).await.unwrap();
    }
    // The server side's link goes away.
    server_driver.abort();
    let _ = server_driver.await;
    let check = async {
        for stream in &mut streams {
            let mut buf = [0u8; 16];
            let error = stream.read(&mut buf).await.expect_err("read fails");
            assert_eq!(
                error.kind(),
                std::io::ErrorKind::ConnectionAborted,
                "{error}"
            );
            assert!(error.to_string().contains("link"), "{error}");
            let error = stream.write_all(b"more").await.expect_err("write fails");
            assert_eq!(error.kind(), std::io::ErrorKind::ConnectionAborted);
        }
        assert!(client.accept().await.is_none());
        assert!(client.open().is_err());
    };
    tokio::time::timeout(Duration::from_secs(10), check)
        .await
        .expect("errors arrive");
}

#[tokio::test]
async fn protocol_violation_fails_the_mux_with_a_clear_error() {
    let (left, mut right) = tokio::io::duplex(64 * 1024);
    let (client, driver) = io::spawn(left, Config::default());
    let mut stream = client.open().unwrap();
    // An unknown command byte from the "peer".
    right.write_all(&[0x42, 0, 1, 0, 0, 0, 0]).await.unwrap();
    let result = tokio::time::timeout(Duration::from_secs(10), driver)
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(result, Err(io::DriverError::Protocol(_))),
        "{result:?}"
    );
    let mut buf = [0u8; 4];
    let error = stream.read(&mut buf).await.unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::InvalidData);
    assert!(
        error.to_string().contains("unknown frame command 0x42"),
        "{error}"
    );
    let core: StreamError = StreamError::WouldBlock;
    assert_eq!(
        std::io::Error::from(core).kind(),
        std::io::ErrorKind::WouldBlock
    );
}

#[tokio::test]
async fn dropping_a_stream_closes_it_and_recycles_the_id() {
    let ((client, _c), (server, _s)) = connected(Config::default());
    let mut stream = client.open().unwrap();
    let id = stream.id();
    stream.write_all(b"bye").await.unwrap();
    drop(stream);
    let mut peer = server.accept().await.unwrap();
    assert_eq!(read_to_end(&mut peer).await, b"bye");
    drop(peer);
    let reused = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if client.stats().streams == 0 {
                return client.open().unwrap();
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("id released");
    assert_eq!(reused.id(), id);
}

#[tokio::test]
async fn verify_detects_a_mux_peer() {
    let ((client, _c), (server, _s)) = connected(Config::default());
    let check = async {
        client.verify(0xbeef, 0x1234_5678).await.unwrap();
        server.verify(1, 2).await.unwrap();
    };
    tokio::time::timeout(Duration::from_secs(10), check)
        .await
        .expect("verified");

    // A peer that is not a mux answers garbage: the mux fails with a clear error.
    let (left, mut right) = tokio::io::duplex(64 * 1024);
    let (client, _driver) = io::spawn(left, Config::default());
    let answer = tokio::spawn(async move {
        let mut challenge = [0u8; 7];
        right.read_exact(&mut challenge).await.unwrap();
        right.write_all(&[0x84, 0, 0, 0, 0, 0, 0]).await.unwrap();
        right
    });
    let error = client.verify(0xbeef, 0x1234_5678).await.unwrap_err();
    assert!(
        error.to_string().contains("wrong verification reply"),
        "{error}"
    );
    drop(answer.await);
}

#[test]
fn streams_and_handles_are_send_static_unpin() {
    fn check<T: Send + Sync + Unpin + 'static>() {}
    check::<Stream>();
    check::<Handle>();
}

/// Seed 004's first problem: a stream nobody reads must not block the others.
#[tokio::test]
async fn an_unread_stream_does_not_block_the_others() {
    let ((client, _c), (server, _s)) = connected(Config::default());
    let mut stuck = client.open().unwrap();
    let mut moving = client.open().unwrap();
    // Fill the first stream's window and more; nobody on the other side reads it.
    let blocked = tokio::spawn(async move {
        let data = vec![1u8; 4 << 20];
        let _ = stuck.write_all(&data).await;
    });
    let _unread = server.accept().await.unwrap();
    let data = payload(3, 8 << 20);
    let expected = Sha256::digest(&data);
    let writer = tokio::spawn(async move {
        moving.write_all(&data).await.unwrap();
        moving.shutdown().await.unwrap();
        moving
    });
    let check = async {
        let mut peer = server.accept().await.unwrap();
        let got = read_to_end(&mut peer).await;
        assert_eq!(Sha256::digest(&got), expected);
    };
    tokio::time::timeout(Duration::from_secs(30), check)
        .await
        .expect("second stream flowed");
    drop(writer.await);
    assert!(
        !blocked.is_finished(),
        "the unread stream is held back by its window"
    );
    blocked.abort();
}

/// Moves frames between two handles until neither has any to send: a link with no tasks,
/// so the order of everything below is the test's own.
fn pump(a: &Handle, b: &Handle) {
    let mut out = Vec::new();
    while a.has_transmit() || b.has_transmit() {
        out.clear();
        a.poll_transmit(usize::MAX, &mut out);
        b.handle_input(&out).expect("a's frames");
        out.clear();
        b.poll_transmit(usize::MAX, &mut out);
        a.handle_input(&out).expect("b's frames");
    }
}

/// Review B1: the peer releases an id and opens it again while our application still holds
/// its old stream there. The new stream waits in the core; dropping the old `Stream` lets it
/// in, and `accept` must see it at once, with no further link input to wake it.
#[tokio::test(start_paused = true)]
async fn a_reopened_id_is_accepted_once_the_holder_drops_its_stream() {
    let client = Handle::new(Config::default());
    let server = Handle::new(Config::default());

    let mut first = client.open().unwrap();
    first.write_all(b"request").await.unwrap();
    first.shutdown().await.unwrap();
    pump(&client, &server);
    let mut held = server.accept().await.expect("first stream");
    assert_eq!(read_to_end(&mut held).await, b"request");
    held.write_all(b"response").await.unwrap();
    held.shutdown().await.unwrap();
    pump(&client, &server);
    assert_eq!(read_to_end(&mut first).await, b"response");
    drop(first);
    pump(&client, &server);
    // Both FINs and every byte are confirmed: the client let the id go, the server's
    // application still holds it.
    assert_eq!(client.stats().streams, 0);

    let mut second = client.open().unwrap();
    assert_eq!(second.id(), held.id(), "the client reuses the id");
    second.write_all(b"again").await.unwrap();
    second.shutdown().await.unwrap();
    pump(&client, &server);

    // The exit's forwarder is already parked in `accept` when its relay task drops the
    // stream: poll once so this accept is asleep too, as there.
    let mut accepting = Box::pin(server.accept());
    std::future::poll_fn(|cx| {
        assert!(
            accepting.as_mut().poll(cx).is_pending(),
            "nothing to accept while the old stream is held"
        );
        std::task::Poll::Ready(())
    })
    .await;
    drop(held);
    let mut accepted = tokio::time::timeout(Duration::from_secs(10), accepting)
        .await
        .expect("accept returns once the holder dropped its stream")
        .expect("the mux is up");
    assert_eq!(accepted.id(), second.id());
    assert_eq!(read_to_end(&mut accepted).await, b"again");
}
