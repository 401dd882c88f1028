//! Introduction messages: any bytes are an introduction or an error, never a panic; what
//! parses encodes to bytes that parse to the same; the length prefix never admits more than
//! the largest body.

#![no_main]

use fabric::introduction::{MAX_BODY, body_len, emit, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(entries) = parse(data) {
        let wire = emit(&entries).expect("what parsed encodes");
        assert_eq!(parse(&wire[2..]), Ok(entries));
    }
    if let [a, b, ..] = data
        && let Some(len) = body_len([*a, *b])
    {
        assert!(len + 2 <= MAX_BODY);
    }
});
