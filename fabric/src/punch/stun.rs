//! STUN (RFC 8489, compatible with RFC 5389) Binding messages: just enough of the protocol to
//! learn our server-reflexive address from any public STUN server, and to answer such queries
//! in tests.
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |0 0|     STUN Message Type     |         Message Length        |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                  Magic Cookie = 0x2112A442                    |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                Transaction ID (96 bits)                       |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! | attributes: type u16 | length u16 | value, padded to 4 bytes   |
//! ```
//!
//! [`Packet`] is a zero-copy view over a buffer (checked once by [`Packet::new_checked`]);
//! [`Repr`] is the parsed, owned form with [`Repr::parse`] and [`Repr::emit`], as in smoltcp.
//! Over TCP (RFC 8489 §6.2.2) messages are sent back to back; [`frame_len`] tells where one
//! ends. [`Transaction`] is the sans-IO client side: the RFC retransmission schedule as
//! deadlines.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::time::{Duration, Instant};

/// The fixed value in every RFC 5389/8489 header.
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
/// Bytes of the fixed header.
pub const HEADER_LEN: usize = 20;
/// The method of Binding, the only one we speak.
pub const METHOD_BINDING: u16 = 0x001;

/// XORed into the CRC-32 of FINGERPRINT (RFC 8489 §14.7), "STUN" in ASCII.
const FINGERPRINT_XOR: u32 = 0x5354_554E;

/// Attribute types we know.
mod attr {
    pub(super) const MAPPED_ADDRESS: u16 = 0x0001;
    pub(super) const MESSAGE_INTEGRITY: u16 = 0x0008;
    pub(super) const ERROR_CODE: u16 = 0x0009;
    pub(super) const UNKNOWN_ATTRIBUTES: u16 = 0x000A;
    pub(super) const XOR_MAPPED_ADDRESS: u16 = 0x0020;
    pub(super) const MESSAGE_INTEGRITY_SHA256: u16 = 0x001C;
    pub(super) const SOFTWARE: u16 = 0x8022;
    pub(super) const FINGERPRINT: u16 = 0x8028;
}

/// Why bytes are not a STUN message we accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseError {
    /// Fewer bytes than the header or its length field say.
    #[error("truncated stun message")]
    Truncated,
    /// The first two bits are not zero or the magic cookie is wrong: not STUN.
    #[error("not a stun message")]
    NotStun,
    /// The length field is not a multiple of 4 or does not match the buffer.
    #[error("bad stun length {0}")]
    BadLength(usize),
    /// An attribute runs past the end of the message.
    #[error("truncated stun attribute {0:#06x}")]
    TruncatedAttribute(u16),
    /// An address attribute with an unknown family or a wrong length.
    #[error("malformed stun address attribute {0:#06x}")]
    BadAddress(u16),
    /// ERROR-CODE is malformed.
    #[error("malformed stun error-code")]
    BadErrorCode,
    /// FINGERPRINT does not match the message.
    #[error("stun fingerprint mismatch")]
    BadFingerprint,
    /// An attribute follows FINGERPRINT, which must be last.
    #[error("stun attribute after fingerprint")]
    AfterFingerprint,
}

/// The class of a message (RFC 8489 §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// A request; expects a success or error response.
    Request,
    /// An indication; expects nothing.
    Indication,
    /// A success response.
    Success,
    /// An error response.
    Error,
}

impl Class {
    fn bits(self) -> u16 {
        match self {
            Self::Request => 0x000,
            Self::Indication => 0x010,
            Self::Success => 0x100,
            Self::Error => 0x110,
        }
    }

    fn from_type(ty: u16) -> Self {
        match ty & 0x110 {
            0x000 => Self::Request,
            0x010 => Self::Indication,
            0x100 => Self::Success,
            _ => Self::Error,
        }
    }
}

/// The 96-bit transaction id that pairs a response with its request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TransactionId(pub [u8; 12]);

/// The message type field from a method and a class: the class bits are interleaved with the
/// method bits (RFC 8489 §5).
fn message_type(method: u16, class: Class) -> u16 {
    let m = method & 0x0FFF;
    ((m & 0x0F80) << 2) | ((m & 0x0070) << 1) | (m & 0x000F) | class.bits()
}

/// The method of a message type, undoing the interleaving of [`message_type`].
fn method_of(ty: u16) -> u16 {
    ((ty & 0x3E00) >> 2) | ((ty & 0x00E0) >> 1) | (ty & 0x000F)
}

/// How many bytes the STUN message at the start of `buf` occupies, once its header is there:
/// the framing of STUN over TCP. `None` until 20 bytes are available; an error if the header
/// is not STUN.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, ParseError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let packet = Packet::new_unchecked(buf);
    if buf[0] & 0xC0 != 0 || packet.magic_cookie() != MAGIC_COOKIE {
        return Err(ParseError::NotStun);
    }
    let len = usize::from(packet.length());
    if len % 4 != 0 {
        return Err(ParseError::BadLength(len));
    }
    Ok(Some(HEADER_LEN + len))
}

/// Whether `buf` looks like a STUN message: the first two bits clear and the magic cookie in
/// place. Used to tell STUN apart from link packets on a shared socket.
pub fn is_stun(buf: &[u8]) -> bool {
    buf.len() >= HEADER_LEN
        && buf[0] & 0xC0 == 0
        && buf[4..8] == MAGIC_COOKIE.to_be_bytes()
        && buf.len() == HEADER_LEN + usize::from(u16::from_be_bytes([buf[2], buf[3]]))
}

/// A read-only (or writable) view of a STUN message in a buffer.
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps `buffer` without checking it; accessors may panic on a short buffer.
    pub fn new_unchecked(buffer: T) -> Self {
        Self { buffer }
    }

    /// Wraps `buffer` after checking the header and that the length field matches the buffer,
    /// so the accessors below cannot panic.
    pub fn new_checked(buffer: T) -> Result<Self, ParseError> {
        let packet = Self::new_unchecked(buffer);
        packet.check_len()?;
        Ok(packet)
    }

    /// Checks the header: first bits, cookie, length.
    pub fn check_len(&self) -> Result<(), ParseError> {
        let buf = self.buffer.as_ref();
        let Some(len) = frame_len(buf)? else {
            return Err(ParseError::Truncated);
        };
        if buf.len() < len {
            return Err(ParseError::Truncated);
        }
        if buf.len() > len {
            return Err(ParseError::BadLength(buf.len() - HEADER_LEN));
        }
        Ok(())
    }

    /// The message type (method and class interleaved).
    pub fn message_type(&self) -> u16 {
        let b = self.buffer.as_ref();
        u16::from_be_bytes([b[0], b[1]])
    }

    /// The method (e.g. [`METHOD_BINDING`]).
    pub fn method(&self) -> u16 {
        method_of(self.message_type())
    }

    /// The class.
    pub fn class(&self) -> Class {
        Class::from_type(self.message_type())
    }

    /// The length field: bytes of attributes after the header.
    pub fn length(&self) -> u16 {
        let b = self.buffer.as_ref();
        u16::from_be_bytes([b[2], b[3]])
    }

    /// The magic cookie field.
    pub fn magic_cookie(&self) -> u32 {
        let b = self.buffer.as_ref();
        u32::from_be_bytes([b[4], b[5], b[6], b[7]])
    }

    /// The transaction id.
    pub fn transaction_id(&self) -> TransactionId {
        let b = self.buffer.as_ref();
        let mut id = [0; 12];
        id.copy_from_slice(&b[8..20]);
        TransactionId(id)
    }

    /// The attributes, in order, as `(type, value)` (value without padding).
    pub fn attributes(&self) -> Attributes<'_> {
        Attributes {
            buf: self.buffer.as_ref(),
            pos: HEADER_LEN,
        }
    }
}

/// An iterator over the attributes of a [`Packet`]: yields the byte offset, the type and the
/// value, or an error once for a truncated attribute.
#[derive(Debug)]
pub struct Attributes<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Iterator for Attributes<'a> {
    type Item = Result<(usize, u16, &'a [u8]), ParseError>;

    fn next(&mut self) -> Option<Self::Item> {
        let rest = self.buf.get(self.pos..)?;
        if rest.is_empty() {
            return None;
        }
        let at = self.pos;
        // Whatever happens below, never come back here.
        self.pos = self.buf.len();
        let [t0, t1, l0, l1, ..] = *rest else {
            return Some(Err(ParseError::TruncatedAttribute(0)));
        };
        let ty = u16::from_be_bytes([t0, t1]);
        let len = usize::from(u16::from_be_bytes([l0, l1]));
        let padded = (len + 3) & !3;
        let Some(value) = rest.get(4..4 + len) else {
            return Some(Err(ParseError::TruncatedAttribute(ty)));
        };
        if rest.len() < 4 + padded {
            return Some(Err(ParseError::TruncatedAttribute(ty)));
        }
        self.pos = at + 4 + padded;
        Some(Ok((at, ty, value)))
    }
}

/// An ERROR-CODE attribute: the code (300..=699) and a reason phrase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorCode {
    /// The numeric code, e.g. 400 or 420.
    pub code: u16,
    /// The reason phrase (UTF-8, at most 127 characters).
    pub reason: String,
}

/// A parsed STUN message: the fields of the attributes we understand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repr {
    /// The class.
    pub class: Class,
    /// The method (12 bits).
    pub method: u16,
    /// The transaction id.
    pub transaction_id: TransactionId,
    /// XOR-MAPPED-ADDRESS: the reflexive address the server saw.
    pub xor_mapped: Option<SocketAddr>,
    /// MAPPED-ADDRESS: the same, from old (RFC 3489) servers.
    pub mapped: Option<SocketAddr>,
    /// ERROR-CODE in an error response.
    pub error: Option<ErrorCode>,
    /// SOFTWARE, a description of the sender.
    pub software: Option<String>,
    /// UNKNOWN-ATTRIBUTES in a 420 response.
    pub unknown_attributes: Vec<u16>,
    /// Comprehension-required attributes (type < 0x8000) in the message we do not know.
    /// Parsing keeps them here so the caller can refuse the message (RFC 8489 §7.3).
    pub unknown_required: Vec<u16>,
    /// Whether the message carries (on parse: carried a valid) FINGERPRINT.
    pub fingerprint: bool,
}

impl Repr {
    /// A Binding request with only a FINGERPRINT.
    pub fn binding_request(transaction_id: TransactionId) -> Self {
        Self {
            class: Class::Request,
            method: METHOD_BINDING,
            transaction_id,
            xor_mapped: None,
            mapped: None,
            error: None,
            software: None,
            unknown_attributes: Vec::new(),
            unknown_required: Vec::new(),
            fingerprint: true,
        }
    }

    /// The success response a server sends to a Binding request from `from`.
    pub fn binding_success(transaction_id: TransactionId, from: SocketAddr) -> Self {
        Self {
            class: Class::Success,
            xor_mapped: Some(from),
            ..Self::binding_request(transaction_id)
        }
    }

    /// The reflexive address of a success response, preferring XOR-MAPPED-ADDRESS.
    pub fn reflexive(&self) -> Option<SocketAddr> {
        self.xor_mapped.or(self.mapped)
    }

    /// Parses a checked packet.
    pub fn parse<T: AsRef<[u8]>>(packet: &Packet<T>) -> Result<Self, ParseError> {
        packet.check_len()?;
        let transaction_id = packet.transaction_id();
        let mut repr = Self {
            class: packet.class(),
            method: packet.method(),
            fingerprint: false,
            ..Self::binding_request(transaction_id)
        };
        let buf = packet.buffer.as_ref();
        // Attributes after MESSAGE-INTEGRITY other than FINGERPRINT are ignored (§14.5).
        let mut after_integrity = false;
        for item in packet.attributes() {
            let (at, ty, value) = item?;
            if repr.fingerprint {
                return Err(ParseError::AfterFingerprint);
            }
            if ty == attr::FINGERPRINT {
                let want: [u8; 4] = value.try_into().map_err(|_| ParseError::BadFingerprint)?;
                if fingerprint_of(&buf[..at], buf.len()) != u32::from_be_bytes(want) {
                    return Err(ParseError::BadFingerprint);
                }
                repr.fingerprint = true;
                continue;
            }
            if after_integrity {
                continue;
            }
            match ty {
                attr::XOR_MAPPED_ADDRESS => {
                    let xored = parse_address(ty, value)?;
                    repr.xor_mapped
                        .get_or_insert(xor_address(xored, &transaction_id));
                }
                attr::MAPPED_ADDRESS => {
                    let addr = parse_address(ty, value)?;
                    repr.mapped.get_or_insert(addr);
                }
                attr::ERROR_CODE => repr.error = Some(parse_error_code(value)?),
                attr::SOFTWARE => {
                    repr.software = Some(String::from_utf8_lossy(value).into_owned());
                }
                attr::UNKNOWN_ATTRIBUTES => {
                    repr.unknown_attributes = value
                        .chunks_exact(2)
                        .map(|c| u16::from_be_bytes([c[0], c[1]]))
                        .collect();
                }
                attr::MESSAGE_INTEGRITY | attr::MESSAGE_INTEGRITY_SHA256 => {
                    // We never send credentials, so we cannot check it; what follows is not
                    // covered by it and is ignored, as the RFC says.
                    after_integrity = true;
                }
                ty if ty < 0x8000 => repr.unknown_required.push(ty),
                _ => {}
            }
        }
        Ok(repr)
    }

    /// Bytes [`Repr::emit`] appends.
    pub fn buffer_len(&self) -> usize {
        let addr_len = |a: &Option<SocketAddr>| match a {
            None => 0,
            Some(SocketAddr::V4(_)) => 4 + 8,
            Some(SocketAddr::V6(_)) => 4 + 20,
        };
        let padded = |n: usize| (n + 3) & !3;
        HEADER_LEN
            + addr_len(&self.xor_mapped)
            + addr_len(&self.mapped)
            + self
                .error
                .as_ref()
                .map_or(0, |e| 4 + padded(4 + e.reason.len()))
            + self.software.as_ref().map_or(0, |s| 4 + padded(s.len()))
            + if self.unknown_attributes.is_empty() {
                0
            } else {
                4 + padded(2 * self.unknown_attributes.len())
            }
            + if self.fingerprint { 8 } else { 0 }
    }

    /// Appends the message to `out`. `unknown_required` is not emitted (it names attributes we
    /// cannot write); over-long strings are truncated to what the format allows.
    pub fn emit(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&message_type(self.method, self.class).to_be_bytes());
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        out.extend_from_slice(&self.transaction_id.0);
        if let Some(addr) = self.xor_mapped {
            emit_address(
                out,
                attr::XOR_MAPPED_ADDRESS,
                xor_address(addr, &self.transaction_id),
            );
        }
        if let Some(addr) = self.mapped {
            emit_address(out, attr::MAPPED_ADDRESS, addr);
        }
        if let Some(error) = &self.error {
            let reason = truncate_utf8(&error.reason, 763);
            let mut value = vec![0, 0, (error.code / 100 % 8) as u8, (error.code % 100) as u8];
            value.extend_from_slice(reason.as_bytes());
            emit_attribute(out, attr::ERROR_CODE, &value);
        }
        if let Some(software) = &self.software {
            emit_attribute(out, attr::SOFTWARE, truncate_utf8(software, 763).as_bytes());
        }
        if !self.unknown_attributes.is_empty() {
            let value: Vec<u8> = self
                .unknown_attributes
                .iter()
                .flat_map(|t| t.to_be_bytes())
                .collect();
            emit_attribute(out, attr::UNKNOWN_ATTRIBUTES, &value);
        }
        let set_len = |out: &mut Vec<u8>, extra: usize| {
            let len = (out.len() - start - HEADER_LEN + extra) as u16;
            out[start + 2..start + 4].copy_from_slice(&len.to_be_bytes());
        };
        if self.fingerprint {
            // The length field covers FINGERPRINT while the CRC is computed (§14.7).
            set_len(out, 8);
            let crc = fingerprint_of(&out[start..], out.len() - start + 8);
            emit_attribute(out, attr::FINGERPRINT, &crc.to_be_bytes());
        }
        set_len(out, 0);
    }
}

/// The FINGERPRINT value of `prefix` (the message up to the attribute), as if the header's
/// length field said `total_len - 20`.
fn fingerprint_of(prefix: &[u8], total_len: usize) -> u32 {
    let mut header = [0u8; 4];
    header[..2].copy_from_slice(&prefix[..2]);
    header[2..].copy_from_slice(&((total_len - HEADER_LEN) as u16).to_be_bytes());
    let crc = crc32_update(crc32_update(!0, &header), &prefix[4..]);
    !crc ^ FINGERPRINT_XOR
}

/// The CRC-32 of ISO 3309 (as zlib's), bytewise; STUN messages are small.
fn crc32_update(mut crc: u32, data: &[u8]) -> u32 {
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
        }
    }
    crc
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn emit_attribute(out: &mut Vec<u8>, ty: u16, value: &[u8]) {
    out.extend_from_slice(&ty.to_be_bytes());
    out.extend_from_slice(&(value.len() as u16).to_be_bytes());
    out.extend_from_slice(value);
    out.resize(out.len() + ((4 - value.len() % 4) % 4), 0);
}

fn emit_address(out: &mut Vec<u8>, ty: u16, addr: SocketAddr) {
    let mut value = vec![0];
    match addr.ip() {
        IpAddr::V4(ip) => {
            value.push(0x01);
            value.extend_from_slice(&addr.port().to_be_bytes());
            value.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            value.push(0x02);
            value.extend_from_slice(&addr.port().to_be_bytes());
            value.extend_from_slice(&ip.octets());
        }
    }
    emit_attribute(out, ty, &value);
}

fn parse_address(ty: u16, value: &[u8]) -> Result<SocketAddr, ParseError> {
    let bad = || ParseError::BadAddress(ty);
    let [_, family, p0, p1, ip @ ..] = value else {
        return Err(bad());
    };
    let port = u16::from_be_bytes([*p0, *p1]);
    let ip = match (family, ip.len()) {
        (0x01, 4) => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(ip).map_err(|_| bad())?)),
        (0x02, 16) => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(ip).map_err(|_| bad())?)),
        _ => return Err(bad()),
    };
    Ok(SocketAddr::new(ip, port))
}

/// XORs an address with the cookie (and the transaction id for IPv6): its own inverse.
fn xor_address(addr: SocketAddr, id: &TransactionId) -> SocketAddr {
    let cookie = MAGIC_COOKIE.to_be_bytes();
    let port = addr.port() ^ (MAGIC_COOKIE >> 16) as u16;
    let ip = match addr.ip() {
        IpAddr::V4(ip) => {
            let mut o = ip.octets();
            o.iter_mut().zip(cookie).for_each(|(b, k)| *b ^= k);
            IpAddr::V4(o.into())
        }
        IpAddr::V6(ip) => {
            let mut o = ip.octets();
            let key = cookie.iter().chain(id.0.iter());
            o.iter_mut().zip(key).for_each(|(b, k)| *b ^= k);
            IpAddr::V6(o.into())
        }
    };
    SocketAddr::new(ip, port)
}

fn parse_error_code(value: &[u8]) -> Result<ErrorCode, ParseError> {
    let [_, _, class, number, reason @ ..] = value else {
        return Err(ParseError::BadErrorCode);
    };
    let (class, number) = (class & 0x07, *number);
    if !(3..=6).contains(&class) || number > 99 {
        return Err(ParseError::BadErrorCode);
    }
    Ok(ErrorCode {
        code: u16::from(class) * 100 + u16::from(number),
        reason: String::from_utf8_lossy(reason).into_owned(),
    })
}

/// How a [`Transaction`] ended badly.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum QueryError {
    /// No response after the whole retransmission schedule.
    #[error("stun server did not answer")]
    Timeout,
    /// The server answered with an error response.
    #[error("stun server refused: {code} {reason}")]
    Refused {
        /// The error code.
        code: u16,
        /// The reason phrase.
        reason: String,
    },
    /// A success response without a mapped address, or with comprehension-required
    /// attributes we do not know.
    #[error("unusable stun response")]
    BadResponse,
}

/// The retransmission parameters of RFC 8489 §6.2.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransactionConfig {
    /// The initial retransmission timeout (RTO), doubled after each send; default 500 ms.
    pub rto: Duration,
    /// Rc: how many requests to send in all over an unreliable transport; default 7.
    pub max_sends: u32,
    /// Rm: after the last request, wait `rm × rto` for the response; default 16.
    pub rm: u32,
    /// Ti: the whole wait over a reliable transport (TCP), default 39.5 s.
    pub reliable_timeout: Duration,
}

impl Default for TransactionConfig {
    fn default() -> Self {
        Self {
            rto: Duration::from_millis(500),
            max_sends: 7,
            rm: 16,
            reliable_timeout: Duration::from_millis(39_500),
        }
    }
}

/// One client Binding transaction, sans-IO: it says when to (re)send the request and turns
/// the matching response into a reflexive address.
///
/// Poll order: after [`Transaction::new`], [`handle_input`](Self::handle_input) and
/// [`handle_timeout`](Self::handle_timeout), drain [`poll_transmit`](Self::poll_transmit), then
/// look at [`poll_result`](Self::poll_result), then wait until
/// [`poll_timeout`](Self::poll_timeout).
#[derive(Debug)]
pub struct Transaction {
    id: TransactionId,
    request: Vec<u8>,
    config: TransactionConfig,
    reliable: bool,
    sends: u32,
    /// When the next request goes out, or when we give up once all are sent.
    deadline: Instant,
    /// The timeout after the current send.
    rto: Duration,
    transmit_due: bool,
    result: Option<Result<SocketAddr, QueryError>>,
}

impl Transaction {
    /// Starts a transaction with a fresh random `id` (the caller's randomness keeps the core
    /// deterministic). `reliable` is true over TCP: one send, one long timeout.
    pub fn new(now: Instant, id: TransactionId, reliable: bool, config: TransactionConfig) -> Self {
        let mut request = Vec::with_capacity(28);
        Repr::binding_request(id).emit(&mut request);
        Self {
            id,
            request,
            config,
            reliable,
            sends: 0,
            deadline: now,
            rto: config.rto,
            transmit_due: true,
            result: None,
        }
    }

    /// The transaction id.
    pub fn id(&self) -> TransactionId {
        self.id
    }

    /// Feeds a received message. Returns `false` (and changes nothing) if it is not the response
    /// to this transaction, so a driver can offer it elsewhere.
    pub fn handle_input(&mut self, _now: Instant, data: &[u8]) -> bool {
        if self.result.is_some() {
            return false;
        }
        let Ok(packet) = Packet::new_checked(data) else {
            return false;
        };
        if packet.transaction_id() != self.id || packet.method() != METHOD_BINDING {
            return false;
        }
        let Ok(repr) = Repr::parse(&packet) else {
            return false;
        };
        let result = match repr.class {
            Class::Request | Class::Indication => return false,
            _ if !repr.unknown_required.is_empty() => Err(QueryError::BadResponse),
            Class::Success => repr.reflexive().ok_or(QueryError::BadResponse),
            Class::Error => {
                let e = repr.error.unwrap_or(ErrorCode {
                    code: 0,
                    reason: String::new(),
                });
                Err(QueryError::Refused {
                    code: e.code,
                    reason: e.reason,
                })
            }
        };
        tracing::debug!(ok = result.is_ok(), "stun transaction done");
        self.result = Some(result);
        true
    }

    /// Advances the retransmission schedule.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.result.is_some() || self.transmit_due || now < self.deadline {
            return;
        }
        let limit = if self.reliable {
            1
        } else {
            self.config.max_sends
        };
        if self.sends >= limit {
            self.result = Some(Err(QueryError::Timeout));
        } else {
            self.transmit_due = true;
        }
    }

    /// The request to send now, if one is due.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<&[u8]> {
        if self.result.is_some() || !self.transmit_due {
            return None;
        }
        self.transmit_due = false;
        self.sends += 1;
        let limit = if self.reliable {
            1
        } else {
            self.config.max_sends
        };
        self.deadline = if self.reliable {
            now + self.config.reliable_timeout
        } else if self.sends >= limit {
            now + self.config.rto * self.config.rm
        } else {
            let wait = self.rto;
            self.rto *= 2;
            now + wait
        };
        tracing::trace!(sends = self.sends, "stun request");
        Some(&self.request)
    }

    /// When to call [`handle_timeout`](Self::handle_timeout) next; `None` once done.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.result.is_some() {
            return None;
        }
        Some(self.deadline)
    }

    /// The outcome, once there is one.
    pub fn poll_result(&mut self) -> Option<Result<SocketAddr, QueryError>> {
        self.result.clone()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// RFC 5769 §2.2: a sample IPv4 response (with MESSAGE-INTEGRITY, which we skip).
    const RFC5769_V4_RESPONSE: &[u8] = &[
        0x01, 0x01, 0x00, 0x3c, 0x21, 0x12, 0xa4, 0x42, 0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6,
        0x86, 0xfa, 0x87, 0xdf, 0xae, 0x80, 0x22, 0x00, 0x0b, 0x74, 0x65, 0x73, 0x74, 0x20, 0x76,
        0x65, 0x63, 0x74, 0x6f, 0x72, 0x20, 0x00, 0x20, 0x00, 0x08, 0x00, 0x01, 0xa1, 0x47, 0xe1,
        0x12, 0xa6, 0x43, 0x00, 0x08, 0x00, 0x14, 0x2b, 0x91, 0xf5, 0x99, 0xfd, 0x9e, 0x90, 0xc3,
        0x8c, 0x74, 0x89, 0xf9, 0x2a, 0xf9, 0xba, 0x53, 0xf0, 0x6b, 0xe7, 0xd7, 0x80, 0x28, 0x00,
        0x04, 0xc0, 0x7d, 0x4c, 0x96,
    ];

    /// RFC 5769 §2.3: the IPv6 response.
    const RFC5769_V6_RESPONSE: &[u8] = &[
        0x01, 0x01, 0x00, 0x48, 0x21, 0x12, 0xa4, 0x42, 0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6,
        0x86, 0xfa, 0x87, 0xdf, 0xae, 0x80, 0x22, 0x00, 0x0b, 0x74, 0x65, 0x73, 0x74, 0x20, 0x76,
        0x65, 0x63, 0x74, 0x6f, 0x72, 0x20, 0x00, 0x20, 0x00, 0x14, 0x00, 0x02, 0xa1, 0x47, 0x01,
        0x13, 0xa9, 0xfa, 0xa5, 0xd3, 0xf1, 0x79, 0xbc, 0x25, 0xf4, 0xb5, 0xbe, 0xd2, 0xb9, 0xd9,
        0x00, 0x08, 0x00, 0x14, 0xa3, 0x82, 0x95, 0x4e, 0x4b, 0xe6, 0x7b, 0xf1, 0x17, 0x84, 0xc9,
        0x7c, 0x82, 0x92, 0xc2, 0x75, 0xbf, 0xe3, 0xed, 0x41, 0x80, 0x28, 0x00, 0x04, 0xc8, 0xfb,
        0x0b, 0x4c,
    ];

    #[test]
    fn parses_rfc5769_ipv4_response() {
        let packet = Packet::new_checked(RFC5769_V4_RESPONSE).unwrap();
        let repr = Repr::parse(&packet).unwrap();
        assert_eq!(repr.class, Class::Success);
        assert_eq!(repr.method, METHOD_BINDING);
        assert_eq!(repr.xor_mapped, Some("192.0.2.1:32853".parse().unwrap()));
        assert_eq!(repr.software.as_deref(), Some("test vector"));
        assert!(repr.fingerprint, "the fingerprint must have been checked");
    }

    #[test]
    fn parses_rfc5769_ipv6_response() {
        let packet = Packet::new_checked(RFC5769_V6_RESPONSE).unwrap();
        let repr = Repr::parse(&packet).unwrap();
        assert_eq!(
            repr.xor_mapped,
            Some(
                "[2001:db8:1234:5678:11:2233:4455:6677]:32853"
                    .parse()
                    .unwrap()
            )
        );
        assert!(repr.fingerprint);
    }

    #[test]
    fn refuses_a_corrupted_fingerprint() {
        let mut bytes = RFC5769_V4_RESPONSE.to_vec();
        // Flip a bit of the software string: fingerprint no longer matches.
        bytes[25] ^= 1;
        let packet = Packet::new_checked(&bytes[..]).unwrap();
        assert_eq!(Repr::parse(&packet), Err(ParseError::BadFingerprint));
    }

    #[test]
    fn framing_and_classification() {
        let mut out = Vec::new();
        Repr::binding_request(TransactionId([7; 12])).emit(&mut out);
        assert_eq!(out.len(), 28);
        assert_eq!(frame_len(&out[..19]), Ok(None));
        assert_eq!(frame_len(&out), Ok(Some(28)));
        assert!(is_stun(&out));
        assert!(!is_stun(&out[..27]));
        assert_eq!(frame_len(&[0xF0; 20]), Err(ParseError::NotStun));
        assert_eq!(message_type(METHOD_BINDING, Class::Error), 0x0111);
        assert_eq!(message_type(METHOD_BINDING, Class::Success), 0x0101);
        assert_eq!(method_of(message_type(0xABC, Class::Indication)), 0xABC);
    }

    #[test]
    fn udp_schedule_follows_the_rfc() {
        let t0 = Instant::now();
        let mut tx = Transaction::new(
            t0,
            TransactionId([1; 12]),
            false,
            TransactionConfig::default(),
        );
        let mut now = t0;
        let mut sends = Vec::new();
        while tx.poll_result().is_none() {
            tx.handle_timeout(now);
            if tx.poll_transmit(now).is_some() {
                sends.push((now - t0).as_millis());
            }
            let Some(next) = tx.poll_timeout() else { break };
            now = next;
        }
        // RFC 8489 §6.2.1: 0, 500, 1500, 3500, 7500, 15500, 31500 ms, and give up at 39500.
        assert_eq!(sends, [0, 500, 1500, 3500, 7500, 15500, 31500]);
        assert_eq!((now - t0).as_millis(), 39500);
        assert_eq!(tx.poll_result(), Some(Err(QueryError::Timeout)));
    }

    #[test]
    fn reliable_transaction_sends_once() {
        let t0 = Instant::now();
        let mut tx = Transaction::new(t0, TransactionId([1; 12]), true, Default::default());
        assert!(tx.poll_transmit(t0).is_some());
        assert!(tx.poll_transmit(t0).is_none());
        let t = t0 + Duration::from_secs(39);
        tx.handle_timeout(t);
        assert!(tx.poll_transmit(t).is_none());
        assert_eq!(tx.poll_result(), None);
        tx.handle_timeout(t0 + Duration::from_millis(39_500));
        assert_eq!(tx.poll_result(), Some(Err(QueryError::Timeout)));
    }

    #[test]
    fn transaction_takes_only_its_response() {
        let t0 = Instant::now();
        let id = TransactionId([9; 12]);
        let mut tx = Transaction::new(t0, id, false, Default::default());
        let request = tx.poll_transmit(t0).unwrap().to_vec();
        let parsed = Repr::parse(&Packet::new_checked(&request[..]).unwrap()).unwrap();
        assert_eq!(parsed, Repr::binding_request(id));
        let from: SocketAddr = "203.0.113.5:4242".parse().unwrap();
        let mut other = Vec::new();
        Repr::binding_success(TransactionId([8; 12]), from).emit(&mut other);
        assert!(
            !tx.handle_input(t0, &other),
            "another transaction's response"
        );
        assert!(!tx.handle_input(t0, &request), "a request is no response");
        let mut ours = Vec::new();
        Repr::binding_success(id, from).emit(&mut ours);
        assert!(tx.handle_input(t0, &ours));
        assert_eq!(tx.poll_result(), Some(Ok(from)));
        assert_eq!(tx.poll_timeout(), None);
    }

    #[test]
    fn error_response_is_reported() {
        let t0 = Instant::now();
        let id = TransactionId([3; 12]);
        let mut tx = Transaction::new(t0, id, false, Default::default());
        let mut response = Repr::binding_request(id);
        response.class = Class::Error;
        response.error = Some(ErrorCode {
            code: 420,
            reason: "Unknown Attribute".into(),
        });
        response.unknown_attributes = vec![0x0042];
        let mut out = Vec::new();
        response.emit(&mut out);
        assert!(tx.handle_input(t0, &out));
        assert_eq!(
            tx.poll_result(),
            Some(Err(QueryError::Refused {
                code: 420,
                reason: "Unknown Attribute".into()
            }))
        );
    }

    fn arb_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::from((ip, p))),
            (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::from((ip, p))),
        ]
    }

    fn arb_repr() -> impl Strategy<Value = Repr> {
        (
            prop_oneof![
                Just(Class::Request),
                Just(Class::Indication),
                Just(Class::Success),
                Just(Class::Error),
            ],
            0u16..0x1000,
            any::<[u8; 12]>(),
            proptest::option::of(arb_addr()),
            proptest::option::of(arb_addr()),
            proptest::option::of((300u16..700, "[a-zA-Z ]{0,40}")),
            proptest::option::of("\\PC{0,30}"),
            proptest::collection::vec(any::<u16>(), 0..6),
            any::<bool>(),
        )
            .prop_map(
                |(class, method, id, xm, m, err, software, unknown, fingerprint)| Repr {
                    class,
                    method,
                    transaction_id: TransactionId(id),
                    xor_mapped: xm,
                    mapped: m,
                    error: err.map(|(code, reason)| ErrorCode { code, reason }),
                    software,
                    unknown_attributes: unknown,
                    unknown_required: Vec::new(),
                    fingerprint,
                },
            )
    }

    proptest! {
        #[test]
        fn round_trip(repr in arb_repr()) {
            let mut out = Vec::new();
            repr.emit(&mut out);
            prop_assert_eq!(out.len(), repr.buffer_len());
            prop_assert_eq!(frame_len(&out), Ok(Some(out.len())));
            let parsed = Repr::parse(&Packet::new_checked(&out[..]).unwrap()).unwrap();
            prop_assert_eq!(parsed, repr);
        }

        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(packet) = Packet::new_checked(&bytes[..]) {
                let _ = Repr::parse(&packet);
            }
        }
    }
}
