//! The STUN decoder: any bytes give a message or an error, never a panic; the TCP framer
//! agrees with the packet check; what parses re-encodes to a message that parses the same;
//! a client transaction fed the bytes never panics.

#![no_main]

use fabric::punch::stun::{Packet, Repr, Transaction, TransactionId, frame_len, is_stun};
use fabric::time::Instant;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let framed = frame_len(data);
    let checked = Packet::new_checked(data);
    if checked.is_ok() {
        assert_eq!(framed, Ok(Some(data.len())));
        assert!(is_stun(data));
    }
    if let Ok(packet) = checked
        && let Ok(mut repr) = Repr::parse(&packet)
    {
        let fits = |s: &Option<String>| s.as_ref().is_none_or(|s| s.len() <= 763);
        let reason = repr.error.as_ref().map(|e| e.reason.clone());
        if fits(&repr.software) && fits(&reason) {
            let mut out = Vec::new();
            repr.emit(&mut out);
            assert_eq!(out.len(), repr.buffer_len());
            let again = Repr::parse(&Packet::new_checked(&out[..]).expect("emitted checks"))
                .expect("emitted parses");
            // Unknown comprehension-required attributes are reported, never re-emitted.
            repr.unknown_required.clear();
            // Strings went through lossy UTF-8 once; emitting them is then exact.
            assert_eq!(again, repr);
        }
    }
    let now = Instant::now();
    let id = TransactionId(data.get(8..20).and_then(|s| s.try_into().ok()).unwrap_or([0; 12]));
    let mut tx = Transaction::new(now, id, false, Default::default());
    let _ = tx.poll_transmit(now);
    tx.handle_input(now, data);
    let _ = tx.poll_result();
});
