//! The exit-request header decoder: any bytes give a target, a request for more, or an
//! error; never a panic. What decodes re-encodes to the same bytes.

#![no_main]

use fabric::target::Target;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((target, used))) = Target::parse(data) {
        let mut again = Vec::new();
        target.emit(&mut again).expect("a decoded target encodes");
        assert_eq!(&again[..], &data[..used]);
    }
});
