//! The session control decoder (open / accept / reject / close from the peer over Tox): any
//! bytes give a message or an error, never a panic; what decodes re-encodes to the same bytes.

#![no_main]

use fabric::session::control::Control;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = Control::parse(data) {
        assert_eq!(&msg.to_vec()[..], data);
    }
});
