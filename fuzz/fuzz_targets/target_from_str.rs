//! `host:port` text as `proxy::dialer::Target` (the `--exit` side's targets in tests and
//! tools, and the shape every front-end's target takes): no panic, and what parses prints
//! back to text that parses to the same target.

#![no_main]

use libfuzzer_sys::fuzz_target;
use proxy::dialer::Target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(target) = text.parse::<Target>() else {
        return;
    };
    let again: Target = target
        .to_string()
        .parse()
        .expect("a target's text parses");
    assert_eq!(again, target);
});
