//! Just enough DNS for fake-IP mode: read the question of a standard query and build the
//! answer to it. Names are returned as lowercase text without the final dot; anything that is
//! not a plain query for one name (responses, other opcodes, compression pointers in the
//! question, labels with characters no host name has) is refused, never guessed at.
//!
//! Sans-IO: bytes in, bytes out.

use std::net::IpAddr;

/// Record type A (an IPv4 address).
pub const TYPE_A: u16 = 1;
/// Record type AAAA (an IPv6 address).
pub const TYPE_AAAA: u16 = 28;
/// Class IN.
const CLASS_IN: u16 = 1;
/// Longest name on the wire (RFC 1035 §2.3.4).
const MAX_NAME: usize = 255;
const HEADER: usize = 12;

/// Why a datagram is not a query this module answers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DnsError {
    /// Shorter than its header or question says.
    #[error("truncated dns message")]
    Truncated,
    /// A response, another opcode, or not exactly one question.
    #[error("not a standard query for one name")]
    NotAQuery,
    /// A compression pointer, an over-long name, or a byte no host name has.
    #[error("unusable name in dns question")]
    BadName,
    /// A class other than IN.
    #[error("dns class {0} is not IN")]
    Class(u16),
}

/// The question of a standard query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// The query id, echoed in the answer.
    pub id: u16,
    /// Whether the client asked for recursion (echoed).
    pub recursion_desired: bool,
    /// The name asked for, lowercase, without the final dot (empty for the root).
    pub name: String,
    /// The record type asked for.
    pub qtype: u16,
    /// Where the question ends in the message (the answer copies it verbatim).
    question_end: usize,
}

impl Query {
    /// Parses a query; additional records (EDNS) after the question are ignored.
    pub fn parse(msg: &[u8]) -> Result<Self, DnsError> {
        let header = msg.get(..HEADER).ok_or(DnsError::Truncated)?;
        let id = u16::from_be_bytes([header[0], header[1]]);
        let flags = u16::from_be_bytes([header[2], header[3]]);
        let qdcount = u16::from_be_bytes([header[4], header[5]]);
        let response = flags & 0x8000 != 0;
        let opcode = (flags >> 11) & 0xf;
        if response || opcode != 0 || qdcount != 1 {
            return Err(DnsError::NotAQuery);
        }
        let mut name = String::new();
        let mut at = HEADER;
        loop {
            let len = usize::from(*msg.get(at).ok_or(DnsError::Truncated)?);
            at += 1;
            if len == 0 {
                break;
            }
            // 0xc0: a compression pointer, 0x40/0x80: reserved label types.
            if len > 63 {
                return Err(DnsError::BadName);
            }
            let label = msg.get(at..at + len).ok_or(DnsError::Truncated)?;
            if at + len - HEADER > MAX_NAME {
                return Err(DnsError::BadName);
            }
            if !name.is_empty() {
                name.push('.');
            }
            for &b in label {
                if !(b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
                    return Err(DnsError::BadName);
                }
                name.push(char::from(b.to_ascii_lowercase()));
            }
            at += len;
        }
        let tail = msg.get(at..at + 4).ok_or(DnsError::Truncated)?;
        let qtype = u16::from_be_bytes([tail[0], tail[1]]);
        let class = u16::from_be_bytes([tail[2], tail[3]]);
        if class != CLASS_IN {
            return Err(DnsError::Class(class));
        }
        Ok(Self {
            id,
            recursion_desired: flags & 0x0100 != 0,
            name,
            qtype,
            question_end: at + 4,
        })
    }

    /// A "server failure" answer to this query (parsed from `msg`): no record; resolvers
    /// and applications try again later or elsewhere.
    pub fn server_failure(&self, msg: &[u8]) -> Vec<u8> {
        let mut out = self.answer(msg, &[], 0);
        // RCODE 2 (SERVFAIL) in the low bits of the flags' second byte; not authoritative.
        out[2] &= !0x04;
        out[3] = (out[3] & 0xf0) | 2;
        out
    }

    /// A "no such name" answer (NXDOMAIN) to this query (parsed from `msg`): the name does
    /// not exist, and resolvers need not ask elsewhere.
    pub fn name_error(&self, msg: &[u8]) -> Vec<u8> {
        let mut out = self.answer(msg, &[], 0);
        // RCODE 3 (NXDOMAIN); authoritative (AA is set by `answer`).
        out[3] = (out[3] & 0xf0) | 3;
        out
    }

    /// The answer to this query (parsed from `msg`): one record per address of the asked
    /// type with `ttl` seconds, or no record at all (a "no data" answer) when none fits.
    pub fn answer(&self, msg: &[u8], addrs: &[IpAddr], ttl: u32) -> Vec<u8> {
        let records: Vec<&IpAddr> = addrs
            .iter()
            .filter(|a| match a {
                IpAddr::V4(_) => self.qtype == TYPE_A,
                IpAddr::V6(_) => self.qtype == TYPE_AAAA,
            })
            .collect();
        let mut out = Vec::with_capacity(self.question_end + records.len() * 28);
        out.extend_from_slice(&self.id.to_be_bytes());
        // QR, AA (this is the authority for its made-up names), RD as asked, RA.
        let mut flags: u16 = 0x8000 | 0x0400 | 0x0080;
        if self.recursion_desired {
            flags |= 0x0100;
        }
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&1u16.to_be_bytes());
        out.extend_from_slice(&(records.len() as u16).to_be_bytes());
        out.extend_from_slice(&[0, 0, 0, 0]);
        out.extend_from_slice(&msg[HEADER..self.question_end]);
        for addr in records {
            // The name: a pointer to the question's.
            out.extend_from_slice(&[0xc0, HEADER as u8]);
            let (qtype, rdata): (u16, Vec<u8>) = match addr {
                IpAddr::V4(a) => (TYPE_A, a.octets().to_vec()),
                IpAddr::V6(a) => (TYPE_AAAA, a.octets().to_vec()),
            };
            out.extend_from_slice(&qtype.to_be_bytes());
            out.extend_from_slice(&CLASS_IN.to_be_bytes());
            out.extend_from_slice(&ttl.to_be_bytes());
            out.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
            out.extend_from_slice(&rdata);
        }
        out
    }
}

/// A standard query for `name` (dots between labels; a final dot or none) of type `qtype`,
/// recursion desired, as a stub resolver sends it.
pub fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = Vec::with_capacity(HEADER + name.len() + 6);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.').filter(|l| !l.is_empty()) {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&CLASS_IN.to_be_bytes());
    q
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    /// A query with an EDNS OPT record after the question (ignored by the parser).
    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut q = super::query(0xabcd, name, qtype);
        // The header's ARCOUNT: one additional record, the OPT.
        q[11] = 1;
        q.extend_from_slice(&[0, 0, 41, 0x10, 0, 0, 0, 0, 0, 0, 0]);
        q
    }

    #[test]
    fn parses_a_query() {
        let msg = query("Web.Example.TEST.", TYPE_A);
        let q = Query::parse(&msg).unwrap();
        assert_eq!(q.id, 0xabcd);
        assert_eq!(q.name, "web.example.test");
        assert_eq!(q.qtype, TYPE_A);
        assert!(q.recursion_desired);
    }

    #[test]
    fn server_failure_keeps_the_question_and_says_so() {
        let msg = query("a.test", TYPE_A);
        let q = Query::parse(&msg).unwrap();
        let fail = q.server_failure(&msg);
        assert_eq!(&fail[..2], &[0xab, 0xcd]);
        assert_eq!(fail[2] & 0x80, 0x80, "a response");
        assert_eq!(fail[2] & 0x04, 0, "not authoritative");
        assert_eq!(fail[3] & 0x0f, 2, "rcode SERVFAIL");
        let none = q.name_error(&msg);
        assert_eq!(none[3] & 0x0f, 3, "rcode NXDOMAIN");
        assert_eq!(none[2] & 0x04, 0x04, "authoritative");
        assert_eq!(&none[6..8], &[0, 0], "no answer record");
        assert_eq!(u16::from_be_bytes([fail[6], fail[7]]), 0, "no answer");
        let mut back = fail.clone();
        back[2] &= 0x7f;
        assert_eq!(Query::parse(&back).unwrap().name, "a.test");
    }

    #[test]
    fn answers_the_asked_family_only() {
        let msg = query("a.test", TYPE_AAAA);
        let q = Query::parse(&msg).unwrap();
        let v4 = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 20));
        let v6 = IpAddr::V6(Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 20));
        let ans = q.answer(&msg, &[v4, v6], 60);
        assert_eq!(&ans[..2], &[0xab, 0xcd]);
        assert_eq!(ans[2] & 0x80, 0x80, "a response");
        assert_eq!(u16::from_be_bytes([ans[6], ans[7]]), 1, "one answer");
        assert_eq!(&ans[ans.len() - 16..], &v6_octets(v6));
        // No A record for an AAAA question when only IPv4 exists: no data, not an error.
        let none = q.answer(&msg, &[v4], 60);
        assert_eq!(u16::from_be_bytes([none[6], none[7]]), 0);
        assert_eq!(none[3] & 0x0f, 0, "rcode NOERROR");
    }

    fn v6_octets(a: IpAddr) -> [u8; 16] {
        match a {
            IpAddr::V6(a) => a.octets(),
            IpAddr::V4(_) => unreachable!(),
        }
    }

    #[test]
    fn refuses_what_it_cannot_answer() {
        assert_eq!(Query::parse(&[0; 5]), Err(DnsError::Truncated));
        let mut resp = query("a.test", TYPE_A);
        resp[2] |= 0x80;
        assert_eq!(Query::parse(&resp), Err(DnsError::NotAQuery));
        let mut two = query("a.test", TYPE_A);
        two[5] = 2;
        assert_eq!(Query::parse(&two), Err(DnsError::NotAQuery));
        let mut pointer = query("a.test", TYPE_A);
        pointer[12] = 0xc0;
        assert_eq!(Query::parse(&pointer), Err(DnsError::BadName));
        let odd = query("a b.test", TYPE_A);
        assert_eq!(Query::parse(&odd), Err(DnsError::BadName));
        let long = query(&vec!["x".repeat(63); 5].join("."), TYPE_A);
        assert_eq!(Query::parse(&long), Err(DnsError::BadName));
        let cut = query("a.test", TYPE_A);
        assert_eq!(Query::parse(&cut[..16]), Err(DnsError::Truncated));
        let mut chaos = query("a.test", TYPE_A);
        chaos[12 + 8 + 3] = 3;
        assert_eq!(Query::parse(&chaos), Err(DnsError::Class(3)));
    }

    #[test]
    fn the_answer_parses_as_a_message_with_the_same_question() {
        let msg = query("x.test", TYPE_A);
        let q = Query::parse(&msg).unwrap();
        let ans = q.answer(&msg, &[IpAddr::V4(Ipv4Addr::new(198, 18, 0, 99))], 30);
        // Flip it back into a query: the question section is intact.
        let mut back = ans.clone();
        back[2] &= 0x7f;
        back[7] = 0;
        let again = Query::parse(&back).unwrap();
        assert_eq!(again.name, "x.test");
        assert_eq!(&ans[ans.len() - 4..], &[198, 18, 0, 99]);
    }
}
