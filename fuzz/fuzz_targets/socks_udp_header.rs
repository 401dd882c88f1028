//! The SOCKS5 UDP request header a local client puts in front of every datagram
//! (`proxy::socks::udp::parse`): any bytes give a target and the payload, or an error; never a
//! panic. The payload is the datagram's tail, and an address target re-emits to a header that
//! parses back to the same target.

#![no_main]

use libfuzzer_sys::fuzz_target;
use proxy::dialer::Target;
use proxy::socks::udp;

fuzz_target!(|data: &[u8]| {
    let Ok((target, payload)) = udp::parse(data) else {
        return;
    };
    assert!(data.ends_with(payload));
    assert!(data.len() - payload.len() >= 4 + 2);
    if let Target::Ip(addr) = target {
        let mut header = vec![0u8; udp::header_len(addr)];
        udp::emit(addr, &mut header);
        header.extend_from_slice(payload);
        let (again, again_payload) = udp::parse(&header).expect("what we emit parses");
        assert_eq!(again_payload, payload);
        match again {
            Target::Ip(a) => {
                assert_eq!(a.port(), addr.port());
                assert_eq!(a.ip().to_canonical(), addr.ip().to_canonical());
            }
            Target::Domain(..) => panic!("an address came back as a name"),
        }
    }
});
