//! Packets from the TUN device (what any application on the host can make the kernel send) fed
//! to `netstack::stack::Stack` with and without offload, accepting every SYN it reports and
//! answering every UDP datagram: never a panic. Also the `virtio_net_hdr` decoder and the SYN
//! MSS rewriter on the raw bytes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use netstack::offload::{self, VNET_HDR_LEN, VnetHdr};
use netstack::stack::{Event, Stack, StackConfig};
use smoltcp::time::Instant;

fuzz_target!(|data: &[u8]| {
    let _ = VnetHdr::parse(data);
    let mut copy = data.to_vec();
    let _ = offload::raise_syn_mss(&mut copy, 65495);
    let _ = offload::fill_l4_checksum(&mut copy);
    for offload_on in [false, true] {
        let mut stack = Stack::new(
            StackConfig {
                offload: offload_on,
                ..StackConfig::default()
            },
            Instant::from_secs(1),
        );
        // The same bytes as several packets: split at 0xff bytes, so one input can open a flow
        // and then send segments on it.
        for (i, packet) in data.split(|b| *b == 0xff).enumerate() {
            let now = Instant::from_millis(1000 + i as i64);
            let mut buf = Vec::new();
            let offset = if offload_on { VNET_HDR_LEN } else { 0 };
            buf.resize(offset, 0);
            buf.extend_from_slice(packet);
            let len = buf.len();
            stack.handle_input(now, buf, offset, len);
            while let Some(ev) = stack.poll_event() {
                match ev {
                    Event::TcpSyn(key) => {
                        let _ = stack.accept(key);
                    }
                    Event::Udp { key, payload } => stack.send_udp(key, &payload),
                    _ => {}
                }
            }
            stack.poll(now);
            while let Some(out) = stack.poll_transmit() {
                stack.recycle(out);
            }
        }
    }
});
