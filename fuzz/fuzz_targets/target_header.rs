//! The exit-request header, the UDP datagram header and the grants answer decoders: any bytes
//! give a target, a request for more, or an error; never a panic. What decodes re-encodes to
//! the same bytes.

#![no_main]

use fabric::target::{Grants, Target, UdpHeader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // A flow's end is exactly its six bytes, and never a data datagram.
    if let Some(flow) = UdpHeader::parse_end(data) {
        assert_eq!(&UdpHeader::end(flow)[..], data);
        assert!(UdpHeader::parse(data).is_err());
    }
    if let Ok(Some((target, used))) = Target::parse(data) {
        let mut again = Vec::new();
        target.emit(&mut again).expect("a decoded target encodes");
        assert_eq!(&again[..], &data[..used]);
    }
    if let Some(grants) = Grants::parse(data) {
        assert_eq!(grants.emit().as_deref(), Some(data));
    }
    if let Ok((header, payload)) = UdpHeader::parse(data) {
        let mut again = Vec::new();
        header.emit(&mut again).expect("a decoded header encodes");
        again.extend_from_slice(payload);
        assert_eq!(&again[..], data);
    }
});
