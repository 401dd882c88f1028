//! Memory per idle stream, measured with a counting global allocator: 10,000 open, idle
//! streams on both ends of a mux pair must cost under 4 KiB each.

// Counting allocations needs an `unsafe impl GlobalAlloc`; it only forwards to `System`.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use fabric::mux::{Config, Mux};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every method forwards to `System` with the caller's arguments unchanged and only
// adds bookkeeping on the side.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded contract.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const STREAMS: usize = 10_000;
/// The budget per idle stream and end.
const LIMIT: usize = 4096;

fn pump(a: &mut Mux, b: &mut Mux) {
    let mut wire = Vec::new();
    loop {
        wire.clear();
        let ab = a.poll_transmit(1 << 20, &mut wire);
        b.handle_input(&wire).unwrap();
        wire.clear();
        let ba = b.poll_transmit(1 << 20, &mut wire);
        a.handle_input(&wire).unwrap();
        if ab + ba == 0 {
            return;
        }
    }
}

// One test in this binary: the allocator counts every thread, and a second test running in
// parallel would disturb the figure.
#[test]
fn ten_thousand_idle_streams_cost_under_4_kib_each() {
    // Idle streams are what is measured here: allow the peer this many (each is granted its
    // initial credit, which the default budget has room for 1,024 times only).
    let config = Config {
        accept_backlog: STREAMS,
        budget: STREAMS * fabric::mux::INITIAL_WINDOW as usize,
        ..Config::default()
    };
    let mut a = Mux::new(config.clone());
    let mut b = Mux::new(config);
    let before = LIVE.load(Ordering::Relaxed);
    let mut ids = Vec::with_capacity(STREAMS);
    for _ in 0..STREAMS {
        ids.push(a.open().unwrap());
    }
    pump(&mut a, &mut b);
    let mut accepted = Vec::with_capacity(STREAMS);
    while let Some(id) = b.accept() {
        accepted.push(id);
    }
    while b.poll_event().is_some() {}
    assert_eq!(accepted.len(), STREAMS);
    // Streams that carried a little data and went idle again must shrink back.
    let mut buf = [0u8; 256];
    for &id in ids.iter().step_by(10) {
        a.write(id, &[1u8; 200]).unwrap();
    }
    pump(&mut a, &mut b);
    for &id in accepted.iter().step_by(10) {
        assert_eq!(b.read(id, &mut buf).unwrap(), 200);
    }
    pump(&mut a, &mut b);
    let ids_vec = (ids.capacity() + accepted.capacity()) * size_of::<fabric::mux::StreamId>();
    let used = LIVE.load(Ordering::Relaxed) - before - ids_vec;
    let per_stream = used / (2 * STREAMS);
    eprintln!(
        "mux memory: {used} bytes for {STREAMS} idle streams on each of two ends = {per_stream} \
         bytes per stream and end (limit {LIMIT})"
    );
    assert!(per_stream < LIMIT, "{per_stream} bytes per idle stream");
    assert_eq!(a.stats().streams, STREAMS);

    // Every stream now holds 100 unread bytes at the receiver: small first chunks, not 16 KiB.
    for &id in &ids {
        a.write(id, &[2u8; 100]).unwrap();
    }
    pump(&mut a, &mut b);
    assert_eq!(b.stats().recv_buffered, 100 * STREAMS);
    let used = LIVE.load(Ordering::Relaxed) - before - ids_vec;
    let per_stream = used / (2 * STREAMS);
    eprintln!(
        "mux memory: {used} bytes with 100 unread bytes on each stream = {per_stream} bytes per \
         stream and end"
    );
    assert!(
        per_stream < LIMIT,
        "{per_stream} bytes per stream with a little unread data"
    );
}
