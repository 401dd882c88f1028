use super::*;

fn syn_v4(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (IpAddr::V4(s), IpAddr::V4(d)) = (src.ip(), dst.ip()) else {
        panic!()
    };
    let mut p = vec![0u8; 44];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&44u16.to_be_bytes());
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&s.octets());
    p[16..20].copy_from_slice(&d.octets());
    p[20..22].copy_from_slice(&src.port().to_be_bytes());
    p[22..24].copy_from_slice(&dst.port().to_be_bytes());
    p[24..28].copy_from_slice(&1000u32.to_be_bytes());
    p[32] = 6 << 4;
    p[33] = 0x02;
    p[34..36].copy_from_slice(&65535u16.to_be_bytes());
    p[40..44].copy_from_slice(&[2, 4, 0x05, 0xb4]);
    p
}

fn input(s: &mut Stack, now: Instant, p: Vec<u8>) -> Input {
    let n = p.len();
    s.handle_input(now, p, 0, n)
}

fn config() -> StackConfig {
    StackConfig {
        offload: false,
        ..StackConfig::default()
    }
}

fn tcp_flags(p: &[u8]) -> u8 {
    p[33]
}

#[test]
fn syn_is_held_until_accepted_then_answered() {
    let now = Instant::from_secs(1);
    let mut s = Stack::new(config(), now);
    let src: SocketAddr = "10.0.0.2:40000".parse().unwrap();
    let dst: SocketAddr = "93.184.216.34:80".parse().unwrap();
    assert_eq!(input(&mut s, now, syn_v4(src, dst)), Input::Held);
    assert_eq!(s.poll_event(), Some(Event::TcpSyn(FlowKey { src, dst })));
    // A retransmitted SYN while dialing is dropped, not a second event.
    assert_eq!(input(&mut s, now, syn_v4(src, dst)), Input::Dropped);
    assert_eq!(s.poll_event(), None);
    s.poll(now);
    assert!(s.poll_transmit().is_none());
    s.accept(FlowKey { src, dst }).unwrap();
    s.poll(now);
    let synack = s.poll_transmit().expect("syn-ack");
    assert_eq!(tcp_flags(&synack) & 0x12, 0x12);
    // It comes from the original destination.
    assert_eq!(&synack[12..16], &[93, 184, 216, 34]);
    assert_eq!(s.tcp_flows(), 1);
}

#[test]
fn rejected_syn_gets_a_reset() {
    let now = Instant::from_secs(1);
    let mut s = Stack::new(config(), now);
    let src: SocketAddr = "10.0.0.2:40001".parse().unwrap();
    let dst: SocketAddr = "10.9.9.9:443".parse().unwrap();
    input(&mut s, now, syn_v4(src, dst));
    s.reject(FlowKey { src, dst });
    s.poll(now);
    let rst = s.poll_transmit().expect("rst");
    assert_eq!(tcp_flags(&rst) & 0x04, 0x04);
    assert_eq!(s.pending(), 0);
}

#[test]
fn detached_flows_are_reaped() {
    let now = Instant::from_secs(1);
    let mut s = Stack::new(config(), now);
    let src: SocketAddr = "10.0.0.2:40002".parse().unwrap();
    let dst: SocketAddr = "10.9.9.9:443".parse().unwrap();
    input(&mut s, now, syn_v4(src, dst));
    let id = s.accept(FlowKey { src, dst }).unwrap();
    s.poll(now);
    s.abort(id);
    s.poll(now);
    assert_eq!(s.tcp_flows(), 0);
}

#[test]
fn udp_datagrams_become_events_and_replies_are_well_formed() {
    let now = Instant::from_secs(1);
    let mut s = Stack::new(config(), now);
    let src: SocketAddr = "10.0.0.2:5353".parse().unwrap();
    let dst: SocketAddr = "10.0.0.1:53".parse().unwrap();
    let mut pkt = Vec::new();
    assert!(build_udp(&mut pkt, src, dst, b"query"));
    assert_eq!(input(&mut s, now, pkt), Input::Udp);
    let key = FlowKey { src, dst };
    assert_eq!(
        s.poll_event(),
        Some(Event::Udp {
            key,
            payload: b"query".to_vec()
        })
    );
    s.send_udp(key, b"answer");
    let mut replied = Vec::new();
    s.take_udp_replied(&mut replied);
    assert_eq!(replied, vec![src]);
    let reply = s.poll_transmit().unwrap();
    let info = offload::l4_info(&reply).unwrap();
    assert_eq!(info.protocol, 17);
    assert_eq!(&reply[12..16], &[10, 0, 0, 1]);
    assert_eq!(&reply[28..], b"answer");
    // The checksum verifies: summing the whole UDP part with the pseudo-header gives 0xffff.
    let pseudo = u32::from(offload::pseudo_header_sum(&reply, &info));
    assert_eq!(
        offload::fold(offload::sum_words(pseudo, &reply[20..])),
        0xffff
    );
    // IPv6 too.
    let src6: SocketAddr = "[fd00::2]:5353".parse().unwrap();
    let dst6: SocketAddr = "[fd00::1]:53".parse().unwrap();
    let mut pkt = Vec::new();
    assert!(build_udp(&mut pkt, src6, dst6, b"q6"));
    assert_eq!(input(&mut s, now, pkt), Input::Udp);
    assert!(matches!(s.poll_event(), Some(Event::Udp { key, .. }) if key.src == src6));
}

/// An echo request from `src` to `dst` with `data`, checksums right.
fn echo_request(src: IpAddr, dst: IpAddr, data: &[u8]) -> Vec<u8> {
    let request = EchoRequest {
        src: dst,
        dst: src,
        body: [&[0x12, 0x34, 0, 7][..], data].concat(),
    };
    // The reply builder makes a reply from `dst` to `src`; turning its type into a request's
    // gives a well-formed request.
    let mut p = Vec::new();
    assert!(build_echo_reply(&mut p, &request));
    let l4 = if src.is_ipv4() { 20 } else { 40 };
    p[l4] = if src.is_ipv4() { 8 } else { 128 };
    assert!(offload::fill_l4_checksum(&mut p));
    p
}

/// The ones'-complement sum of an ICMP message checks out (v6: with the pseudo-header).
fn checksum_ok(p: &[u8]) -> bool {
    let info = offload::l4_info(p).unwrap();
    let start = info.ip_hdr_len;
    let pseudo = if info.version == 4 {
        0
    } else {
        u32::from(offload::pseudo_header_sum(p, &info))
    };
    offload::fold(offload::sum_words(pseudo, &p[start..start + info.l4_len])) == 0xffff
}

#[test]
fn echo_requests_go_to_the_application_and_replies_come_from_the_address_pinged() {
    let now = Instant::from_secs(1);
    let mut s = Stack::new(config(), now);
    for (src, dst) in [("10.0.0.2", "100.90.1.2"), ("fd00::2", "fd74:6f78:7078::1")] {
        let (src, dst): (IpAddr, IpAddr) = (src.parse().unwrap(), dst.parse().unwrap());
        let request = echo_request(src, dst, b"ping data");
        assert!(checksum_ok(&request));
        assert_eq!(input(&mut s, now, request), Input::Echo);
        let Some(Event::Echo(echo)) = s.poll_event() else {
            panic!("no echo event")
        };
        assert_eq!((echo.src, echo.dst), (src, dst));
        assert_eq!(
            &echo.body[..4],
            &[0x12, 0x34, 0, 7],
            "identifier and sequence"
        );
        s.send_echo_reply(&echo);
        let reply = s.poll_transmit().expect("a reply");
        let l4 = if src.is_ipv4() { 20 } else { 40 };
        assert_eq!(reply[l4], if src.is_ipv4() { 0 } else { 129 }, "echo reply");
        assert!(checksum_ok(&reply), "reply checksum");
        assert_eq!(&reply[l4 + 4..], &echo.body[..]);
        let (from, to) = addresses(&reply, if src.is_ipv4() { 4 } else { 6 }).unwrap();
        assert_eq!((from, to), (dst, src));
    }
    // Not an echo request (an echo reply, a truncated one): left to smoltcp, no event.
    let mut reply = echo_request(
        "10.0.0.2".parse().unwrap(),
        "10.0.0.3".parse().unwrap(),
        b"",
    );
    reply[20] = 0;
    assert_eq!(input(&mut s, now, reply), Input::Queued);
    assert_eq!(s.poll_event(), None);
}
