//! The Linux TUN offload format: the `virtio_net_hdr` in front of every packet when the device
//! has `IFF_VNET_HDR`, and the checksum arithmetic it needs.
//!
//! With `TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6` the kernel hands us TCP segments of up to 64 KiB
//! whose checksum is only *partial* (the pseudo-header sum, `VIRTIO_NET_HDR_F_NEEDS_CSUM`); the
//! other way we write segments of up to 64 KiB with the same partial checksum and a GSO size,
//! and the kernel treats them as one coalesced (GRO) packet. Neither side ever sums 64 KiB of
//! payload in user space. This module is sans-IO: byte slices in, byte slices out.

/// Bytes of the `virtio_net_hdr` in front of each packet (the kernel's default size).
pub const VNET_HDR_LEN: usize = 10;
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the checksum at `csum_start + csum_offset` holds only the
/// pseudo-header sum; whoever consumes the packet completes or trusts it.
pub const F_NEEDS_CSUM: u8 = 1;
/// Not a GSO packet.
pub const GSO_NONE: u8 = 0;
/// A TCP/IPv4 segment to cut at `gso_size`.
pub const GSO_TCPV4: u8 = 1;
/// A TCP/IPv6 segment to cut at `gso_size`.
pub const GSO_TCPV6: u8 = 4;
/// Flag in `gso_type`: the segment carries ECN.
pub const GSO_ECN: u8 = 0x80;

const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const PROTO_ICMP: u8 = 1;
const PROTO_ICMPV6: u8 = 58;

/// The `virtio_net_hdr` (host byte order, as a TUN device without `TUNSETVNETLE` uses).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    /// `F_NEEDS_CSUM` or 0.
    pub flags: u8,
    /// `GSO_*`.
    pub gso_type: u8,
    /// Length of the IP and transport headers.
    pub hdr_len: u16,
    /// Payload bytes per segment when the packet is cut.
    pub gso_size: u16,
    /// Where the checksummed region starts (the transport header).
    pub csum_start: u16,
    /// Where the checksum sits, from `csum_start`.
    pub csum_offset: u16,
}

impl VnetHdr {
    /// Reads a header; `None` when `buf` is shorter than [`VNET_HDR_LEN`].
    pub fn parse(buf: &[u8]) -> Option<Self> {
        let b = buf.get(..VNET_HDR_LEN)?;
        let u16_at = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        Some(Self {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
        })
    }

    /// Writes the header into the first [`VNET_HDR_LEN`] bytes of `buf`.
    ///
    /// # Panics
    /// If `buf` is shorter than [`VNET_HDR_LEN`] (a caller bug: buffers reserve the room).
    pub fn emit(&self, buf: &mut [u8]) {
        buf[0] = self.flags;
        buf[1] = self.gso_type;
        buf[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        buf[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        buf[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        buf[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
    }
}

/// Adds `data` as big-endian 16-bit words to a 32-bit one's-complement accumulator.
pub fn sum_words(mut acc: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc = acc.wrapping_add(u32::from(u16::from_be_bytes([c[0], c[1]])));
        // Fold early enough that the accumulator cannot overflow.
        if acc > 0xffff_0000 {
            acc = (acc & 0xffff) + (acc >> 16);
        }
    }
    if let [last] = chunks.remainder() {
        acc = acc.wrapping_add(u32::from(*last) << 8);
    }
    acc
}

/// Folds a 32-bit accumulator into 16 bits (not complemented).
pub fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The transport-layer view of an IP packet: where the L4 header starts and which addresses
/// go into the pseudo-header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L4Info {
    /// 4 or 6.
    pub version: u8,
    /// IP header length (the L4 header's offset).
    pub ip_hdr_len: usize,
    /// The L4 protocol number.
    pub protocol: u8,
    /// Length of the L4 header plus payload, as the IP header says.
    pub l4_len: usize,
}

/// Locates the transport header of an IPv4 packet or of an IPv6 packet without extension
/// headers. `None` for anything else or anything truncated.
pub fn l4_info(packet: &[u8]) -> Option<L4Info> {
    let version = packet.first()? >> 4;
    match version {
        4 => {
            let ihl = usize::from(packet[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([*packet.get(2)?, *packet.get(3)?]));
            if ihl < 20 || total < ihl || total > packet.len() {
                return None;
            }
            // Fragments are not handled here: the kernel never fragments what it sends to a TUN
            // whose MTU the socket respects, and a fragment has no whole L4 header.
            let frag = u16::from_be_bytes([packet[6], packet[7]]);
            if frag & 0x3fff != 0 {
                return None;
            }
            Some(L4Info {
                version,
                ip_hdr_len: ihl,
                protocol: packet[9],
                l4_len: total - ihl,
            })
        }
        6 => {
            if packet.len() < 40 {
                return None;
            }
            let payload = usize::from(u16::from_be_bytes([packet[4], packet[5]]));
            if 40 + payload > packet.len() {
                return None;
            }
            Some(L4Info {
                version,
                ip_hdr_len: 40,
                protocol: packet[6],
                l4_len: payload,
            })
        }
        _ => None,
    }
}

/// The pseudo-header sum (RFC 793 / RFC 8200 §8.1) of `packet` for its L4 protocol, not
/// complemented: what a partial checksum field holds.
pub fn pseudo_header_sum(packet: &[u8], info: &L4Info) -> u16 {
    let addrs = match info.version {
        4 => &packet[12..20],
        _ => &packet[8..40],
    };
    let mut acc = sum_words(0, addrs);
    acc = acc.wrapping_add(u32::from(info.protocol));
    acc = acc.wrapping_add(info.l4_len as u32 & 0xffff);
    acc = acc.wrapping_add((info.l4_len as u32) >> 16);
    fold(acc)
}

/// Writes the full transport checksum of a UDP or TCP packet in place (for packets this crate
/// builds itself, such as UDP replies). Returns `false` when the packet is not one of those.
pub fn fill_l4_checksum(packet: &mut [u8]) -> bool {
    let Some(info) = l4_info(packet) else {
        return false;
    };
    let at = match info.protocol {
        PROTO_TCP => 16,
        PROTO_UDP => 6,
        PROTO_ICMP | PROTO_ICMPV6 => 2,
        _ => return false,
    };
    let start = info.ip_hdr_len;
    let end = start + info.l4_len;
    if info.l4_len < at + 2 {
        return false;
    }
    packet[start + at..start + at + 2].copy_from_slice(&[0, 0]);
    // ICMP for IPv4 sums the message alone; every other one the pseudo-header too.
    let pseudo = if info.protocol == PROTO_ICMP {
        0
    } else {
        u32::from(pseudo_header_sum(packet, &info))
    };
    let mut sum = !fold(sum_words(pseudo, &packet[start..end]));
    if info.protocol == PROTO_UDP && sum == 0 {
        // RFC 768: a computed zero is sent as all ones (zero means "no checksum").
        sum = 0xffff;
    }
    packet[start + at..start + at + 2].copy_from_slice(&sum.to_be_bytes());
    true
}

/// Prepares one packet the stack emitted for the kernel: `buf` is `VNET_HDR_LEN` bytes of room
/// followed by the IP packet. A TCP segment gets a partial checksum (the stack leaves the field
/// empty) and, when its payload is longer than what fits in `mtu`, a GSO header telling the
/// kernel the segment size; anything else gets an empty header (its checksums are complete).
pub fn prepare_tx(buf: &mut [u8], mtu: usize) {
    let (hdr, packet) = buf.split_at_mut(VNET_HDR_LEN);
    let mut vnet = VnetHdr::default();
    if let Some(info) = l4_info(packet)
        && info.protocol == PROTO_TCP
        && info.l4_len >= 20
    {
        let tcp = info.ip_hdr_len;
        let tcp_hdr_len = usize::from(packet[tcp + 12] >> 4) * 4;
        let pseudo = pseudo_header_sum(packet, &info);
        packet[tcp + 16..tcp + 18].copy_from_slice(&pseudo.to_be_bytes());
        vnet.flags = F_NEEDS_CSUM;
        vnet.csum_start = tcp as u16;
        vnet.csum_offset = 16;
        let headers = tcp + tcp_hdr_len;
        let payload = info.l4_len.saturating_sub(tcp_hdr_len);
        let seg = mtu.saturating_sub(headers);
        if payload > seg && seg > 0 {
            vnet.gso_type = if info.version == 4 {
                GSO_TCPV4
            } else {
                GSO_TCPV6
            };
            vnet.gso_size = seg as u16;
            vnet.hdr_len = headers as u16;
        }
    }
    vnet.emit(hdr);
}

/// Raises the MSS option of a TCP SYN to `mss`, in place. The stack then builds segments of
/// up to 64 KiB, which [`prepare_tx`] hands to the kernel as GSO packets cut at the real MSS.
/// The TCP checksum is not updated: packets from the kernel carry a partial checksum, which the
/// stack does not verify. Returns the MSS the SYN carried (`None`: no MSS option).
pub fn raise_syn_mss(packet: &mut [u8], mss: u16) -> Option<u16> {
    let info = l4_info(packet)?;
    if info.protocol != PROTO_TCP || info.l4_len < 20 {
        return None;
    }
    let tcp = info.ip_hdr_len;
    let hdr_len = usize::from(packet[tcp + 12] >> 4) * 4;
    if hdr_len < 20 || hdr_len > info.l4_len {
        return None;
    }
    let opts = &mut packet[tcp + 20..tcp + hdr_len];
    let mut i = 0;
    while i < opts.len() {
        match opts[i] {
            0 => return None,
            1 => i += 1,
            kind => {
                let len = usize::from(*opts.get(i + 1)?);
                if len < 2 || i + len > opts.len() {
                    return None;
                }
                if kind == 2 && len == 4 {
                    let old = u16::from_be_bytes([opts[i + 2], opts[i + 3]]);
                    if mss > old {
                        opts[i + 2..i + 4].copy_from_slice(&mss.to_be_bytes());
                    }
                    return Some(old);
                }
                i += len;
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipv4_tcp(payload: usize, opts: &[u8]) -> Vec<u8> {
        let tcp_len = 20 + opts.len() + payload;
        let total = 20 + tcp_len;
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[8] = 64;
        p[9] = PROTO_TCP;
        p[12..16].copy_from_slice(&[10, 0, 0, 1]);
        p[16..20].copy_from_slice(&[10, 0, 0, 2]);
        p[20..22].copy_from_slice(&1234u16.to_be_bytes());
        p[22..24].copy_from_slice(&80u16.to_be_bytes());
        p[32] = (((20 + opts.len()) / 4) as u8) << 4;
        p[33] = 0x02;
        p[40..40 + opts.len()].copy_from_slice(opts);
        for (i, b) in p[40 + opts.len()..].iter_mut().enumerate() {
            *b = i as u8;
        }
        p
    }

    #[test]
    fn header_round_trip() {
        let h = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV6,
            hdr_len: 60,
            gso_size: 1440,
            csum_start: 40,
            csum_offset: 16,
        };
        let mut b = [0u8; VNET_HDR_LEN];
        h.emit(&mut b);
        assert_eq!(VnetHdr::parse(&b), Some(h));
        assert_eq!(VnetHdr::parse(&b[..9]), None);
    }

    #[test]
    fn partial_checksum_completes_to_the_full_one() {
        let mut full = ipv4_tcp(1001, &[]);
        assert!(fill_l4_checksum(&mut full));
        let want = u16::from_be_bytes([full[36], full[37]]);

        let mut buf = vec![0u8; VNET_HDR_LEN];
        buf.extend_from_slice(&ipv4_tcp(1001, &[]));
        prepare_tx(&mut buf, 1500);
        let h = VnetHdr::parse(&buf).unwrap();
        assert_eq!(h.flags, F_NEEDS_CSUM);
        assert_eq!(h.gso_type, GSO_NONE);
        // What the kernel does with a partial checksum: sum from csum_start, complement.
        let p = &mut buf[VNET_HDR_LEN..];
        let start = usize::from(h.csum_start);
        let sum = !fold(sum_words(0, &p[start..]));
        assert_eq!(sum, want);
    }

    #[test]
    fn big_segments_become_gso() {
        let mut buf = vec![0u8; VNET_HDR_LEN];
        buf.extend_from_slice(&ipv4_tcp(60_000, &[]));
        prepare_tx(&mut buf, 1500);
        let h = VnetHdr::parse(&buf).unwrap();
        assert_eq!(h.gso_type, GSO_TCPV4);
        assert_eq!(h.gso_size, 1460);
        assert_eq!(h.hdr_len, 40);
    }

    #[test]
    fn syn_mss_is_raised_and_reported() {
        let mut p = ipv4_tcp(0, &[2, 4, 0x05, 0xb4, 1, 1, 4, 2]);
        assert_eq!(raise_syn_mss(&mut p, 65495), Some(1460));
        assert_eq!(&p[42..44], &65495u16.to_be_bytes());
        let mut none = ipv4_tcp(0, &[1, 1, 4, 2]);
        assert_eq!(raise_syn_mss(&mut none, 65495), None);
        let mut bad = ipv4_tcp(0, &[2, 9, 0, 0]);
        assert_eq!(raise_syn_mss(&mut bad, 65495), None);
    }

    #[test]
    fn l4_info_rejects_truncation() {
        let p = ipv4_tcp(10, &[]);
        assert!(l4_info(&p).is_some());
        assert!(l4_info(&p[..p.len() - 1]).is_none());
        assert!(l4_info(&[0x60; 39]).is_none());
        assert!(l4_info(&[]).is_none());
    }
}
