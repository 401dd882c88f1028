//! The direct handshake and the peer cache: any bytes given as a HELLO or a WELCOME are an
//! error or a message that really authenticates, never a panic; any text as a cache file
//! parses to entries that write back and parse the same.

#![no_main]

use std::sync::OnceLock;

use fabric::resume::cache::PeerCache;
use fabric::resume::handshake::{Identity, PendingHello, Responder, hello, hello_sender};
use libfuzzer_sys::fuzz_target;

const NOW: u64 = 1_800_000_000_000;

/// The two identities and a HELLO of ours waiting for its WELCOME: made once, as key
/// generation would otherwise dominate every run.
fn setup() -> &'static (Identity, Identity, PendingHello) {
    static SETUP: OnceLock<(Identity, Identity, PendingHello)> = OnceLock::new();
    SETUP.get_or_init(|| {
        let initiator = Identity::from_secret([1; 32]);
        let responder = Identity::from_secret([2; 32]);
        let mut buf = Vec::new();
        let pending = hello(&initiator, responder.public(), [7; 32], NOW, 1, b"x", &mut buf)
            .expect("a hello");
        (initiator, responder, pending)
    })
}

fuzz_target!(|data: &[u8]| {
    let (initiator_id, responder_id, pending) = setup();
    let now = NOW;
    // As a HELLO: a forgery under keys nobody else has can only fail.
    let opened = Responder::default().open_hello(responder_id, data, now);
    if let Ok(h) = &opened {
        assert_eq!(Some(h.hello.peer), hello_sender(data));
    }
    // As a WELCOME to a HELLO of ours.
    let _ = pending.open_welcome(initiator_id, data);
    // As a cache file.
    if let Ok(text) = std::str::from_utf8(data) {
        let (cache, _) = PeerCache::parse(text);
        assert_eq!(PeerCache::parse(&cache.emit()), (cache, 0));
    }
});
