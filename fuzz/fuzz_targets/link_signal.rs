//! The link signalling decoder (offers and trickled candidates from the peer over Tox): any
//! bytes give a message or an error, never a panic; what decodes re-encodes to the same bytes.

#![no_main]

use fabric::link::signal::Signal;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(signal) = Signal::parse(data) {
        let mut again = Vec::new();
        signal.emit(&mut again).expect("a decoded signal encodes");
        assert_eq!(&again[..], data);
    }
});
