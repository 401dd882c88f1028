//! Peer identities: Tox public keys, Tox IDs and bootstrap node addresses.
//!
//! A Tox ID is what a user hands to a peer: 38 bytes written as 76 hexadecimal digits,
//!
//! ```text
//!  [ public key: 32 bytes ][ nospam: 4 bytes ][ checksum: 2 bytes ]
//! ```
//!
//! The checksum is c-toxcore's: byte `i % 2` of the checksum is the XOR of every byte at an
//! index `i` of the first 36 bytes. The public key alone (64 hex digits) names a peer; the
//! nospam only gates friend requests, which is why allow lists take either form.

use std::fmt;
use std::str::FromStr;

/// Bytes in a public key.
pub const PUBLIC_KEY_SIZE: usize = 32;
/// Bytes in the nospam part of a Tox ID.
pub const NOSPAM_SIZE: usize = 4;
/// Bytes in a whole Tox ID (public key, nospam, checksum).
pub const TOX_ID_SIZE: usize = PUBLIC_KEY_SIZE + NOSPAM_SIZE + 2;

/// Why a Tox ID, public key or bootstrap node address did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    /// The text has the wrong number of hex digits for what was asked.
    #[error("wrong length: expected {expected}, got {got}")]
    WrongLength {
        /// What was expected, e.g. "76 hex digits".
        expected: &'static str,
        /// How many characters the text had.
        got: usize,
    },
    /// A character is not a hexadecimal digit.
    #[error("invalid hex digit {found:?} at position {position}")]
    InvalidHexDigit {
        /// The offending character.
        found: char,
        /// Its index (in characters) in the text.
        position: usize,
    },
    /// The two checksum bytes do not match the key and nospam: a typo in the ID.
    #[error("bad checksum: the tox id has a typo")]
    BadChecksum,
    /// A bootstrap node address is not `PK@HOST:PORT`.
    #[error("bad bootstrap node {0:?}: expected PK@HOST:PORT")]
    BadBootstrap(String),
    /// The port of a bootstrap node is not a number in 1..=65535.
    #[error("bad port {0:?}: expected a number in 1..=65535")]
    BadPort(String),
}

/// A peer's long-term Tox public key (32 bytes). Displayed as 64 uppercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; PUBLIC_KEY_SIZE]);

impl PublicKey {
    /// The raw key bytes.
    pub fn as_bytes(&self) -> &[u8; PUBLIC_KEY_SIZE] {
        &self.0
    }

    /// A short prefix for logs: enough to tell peers apart, and public information anyway.
    pub fn short(&self) -> String {
        encode_hex(&self.0[..4])
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&encode_hex(&self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.short())
    }
}

impl FromStr for PublicKey {
    type Err = IdError;

    /// Parses exactly 64 hex digits (either case).
    fn from_str(s: &str) -> Result<Self, IdError> {
        let mut key = [0u8; PUBLIC_KEY_SIZE];
        decode_hex(s.trim(), &mut key, "64 hex digits")?;
        Ok(Self(key))
    }
}

/// A Tox ID (also called a Tox address): public key, nospam and checksum.
/// Displayed as 76 uppercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ToxId([u8; TOX_ID_SIZE]);

impl ToxId {
    /// Builds an ID from a key and a nospam, computing the checksum.
    pub fn new(pk: PublicKey, nospam: [u8; NOSPAM_SIZE]) -> Self {
        let mut bytes = [0u8; TOX_ID_SIZE];
        bytes[..PUBLIC_KEY_SIZE].copy_from_slice(&pk.0);
        bytes[PUBLIC_KEY_SIZE..PUBLIC_KEY_SIZE + NOSPAM_SIZE].copy_from_slice(&nospam);
        let sum = checksum(&bytes[..PUBLIC_KEY_SIZE + NOSPAM_SIZE]);
        bytes[PUBLIC_KEY_SIZE + NOSPAM_SIZE..].copy_from_slice(&sum);
        Self(bytes)
    }

    /// Checks the checksum of 38 raw bytes, as c-toxcore hands them out.
    pub fn from_bytes(bytes: [u8; TOX_ID_SIZE]) -> Result<Self, IdError> {
        let sum = checksum(&bytes[..PUBLIC_KEY_SIZE + NOSPAM_SIZE]);
        if bytes[PUBLIC_KEY_SIZE + NOSPAM_SIZE..] != sum {
            return Err(IdError::BadChecksum);
        }
        Ok(Self(bytes))
    }

    /// The raw 38 bytes.
    pub fn as_bytes(&self) -> &[u8; TOX_ID_SIZE] {
        &self.0
    }

    /// The public key part, which names the peer.
    pub fn public_key(&self) -> PublicKey {
        let mut pk = [0u8; PUBLIC_KEY_SIZE];
        pk.copy_from_slice(&self.0[..PUBLIC_KEY_SIZE]);
        PublicKey(pk)
    }

    /// The nospam part: changing it invalidates old IDs for friend requests.
    pub fn nospam(&self) -> [u8; NOSPAM_SIZE] {
        let mut n = [0u8; NOSPAM_SIZE];
        n.copy_from_slice(&self.0[PUBLIC_KEY_SIZE..PUBLIC_KEY_SIZE + NOSPAM_SIZE]);
        n
    }
}

impl fmt::Display for ToxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&encode_hex(&self.0))
    }
}

impl fmt::Debug for ToxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ToxId({})", self)
    }
}

impl FromStr for ToxId {
    type Err = IdError;

    /// Parses exactly 76 hex digits (either case) and checks the checksum.
    fn from_str(s: &str) -> Result<Self, IdError> {
        let mut bytes = [0u8; TOX_ID_SIZE];
        decode_hex(s.trim(), &mut bytes, "76 hex digits")?;
        Self::from_bytes(bytes)
    }
}

/// A peer named either by a full Tox ID or by its bare public key, as `--allow` takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerRef {
    /// A full Tox ID (can send a friend request).
    Id(ToxId),
    /// Only the key (enough to recognise and accept the peer).
    Key(PublicKey),
}

impl PeerRef {
    /// The key that names the peer.
    pub fn public_key(&self) -> PublicKey {
        match self {
            Self::Id(id) => id.public_key(),
            Self::Key(pk) => *pk,
        }
    }
}

impl FromStr for PeerRef {
    type Err = IdError;

    /// 76 hex digits parse as a Tox ID, 64 as a public key; anything else is an error that
    /// names both accepted lengths.
    fn from_str(s: &str) -> Result<Self, IdError> {
        let t = s.trim();
        match t.chars().count() {
            n if n == TOX_ID_SIZE * 2 => t.parse().map(Self::Id),
            n if n == PUBLIC_KEY_SIZE * 2 => t.parse().map(Self::Key),
            got => Err(IdError::WrongLength {
                expected: "76 hex digits (tox id) or 64 (public key)",
                got,
            }),
        }
    }
}

impl fmt::Display for PeerRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Id(id) => id.fmt(f),
            Self::Key(pk) => pk.fmt(f),
        }
    }
}

/// A DHT bootstrap node (or TCP relay): its long-term key and where it listens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BootstrapNode {
    /// The node's long-term public key.
    pub pk: PublicKey,
    /// An IPv4/IPv6 address or a DNS name (IPv6 without brackets).
    pub host: String,
    /// UDP port for DHT bootstrap, TCP port for a relay.
    pub port: u16,
}

impl BootstrapNode {
    /// Convenience constructor.
    pub fn new(pk: PublicKey, host: impl Into<String>, port: u16) -> Self {
        Self {
            pk,
            host: host.into(),
            port,
        }
    }
}

impl FromStr for BootstrapNode {
    type Err = IdError;

    /// Parses `PK@HOST:PORT`; an IPv6 host goes in brackets: `PK@[::1]:33445`.
    fn from_str(s: &str) -> Result<Self, IdError> {
        let s = s.trim();
        let bad = || IdError::BadBootstrap(s.to_owned());
        let (pk, addr) = s.split_once('@').ok_or_else(bad)?;
        let pk: PublicKey = pk.parse()?;
        let (host, port) = if let Some(rest) = addr.strip_prefix('[') {
            let (host, after) = rest.split_once(']').ok_or_else(bad)?;
            let port = after.strip_prefix(':').ok_or_else(bad)?;
            (host, port)
        } else {
            let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
            // An unbracketed IPv6 address would be ambiguous with the port separator.
            if host.contains(':') {
                return Err(bad());
            }
            (host, port)
        };
        if host.is_empty() {
            return Err(bad());
        }
        let port = match port.parse::<u16>() {
            Ok(p) if p != 0 => p,
            _ => return Err(IdError::BadPort(port.to_owned())),
        };
        Ok(Self::new(pk, host, port))
    }
}

impl fmt::Display for BootstrapNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "{}@[{}]:{}", self.pk, self.host, self.port)
        } else {
            write!(f, "{}@{}:{}", self.pk, self.host, self.port)
        }
    }
}

/// A few public bootstrap nodes from the Tox wiki's node list (wiki.tox.chat/users/nodes).
///
/// They may go stale; any one reachable node is enough to join the DHT. They are contacted only
/// at run time when public bootstrap is on, never by tests.
pub fn public_bootstrap_nodes() -> Vec<BootstrapNode> {
    const NODES: &[(&str, &str, u16)] = &[
        (
            "144.217.167.73",
            "7E5668E0EE09E19F320AD47902419331FFEE147BB3606769CFBE921A2A2FD34C",
            33445,
        ),
        (
            "tox.abilinski.com",
            "10C00EB250C3233E343E2AEBA07115A5C28920E9C8D29492F6D00B29049EDC7E",
            33445,
        ),
        (
            "198.199.98.108",
            "BEF0CFB37AF874BD17B9A8F9FE64C75521DB95A37D33C5BDB00E9CF58659C04F",
            33445,
        ),
        (
            "tox.kurnevsky.net",
            "82EF82BA33445A1F91A7DB27189ECFC0C013E06E3DA71F588ED692BED625EC23",
            33445,
        ),
        (
            "tox2.abilinski.com",
            "7A6098B590BDC73F9723FC59F82B3F9085A64D1B213AAF8E610FD351930D052D",
            33445,
        ),
        (
            "46.101.197.175",
            "CD133B521159541FB1D326DE9850F5E56A6C724B5B8E5EB5CD8D950408E95707",
            33445,
        ),
        (
            "tox1.mf-net.eu",
            "B3E5FA80DC8EBD1149AD2AB35ED8B85BD546DEDE261CA593234C619249419506",
            33445,
        ),
        (
            "tox4.plastiras.org",
            "836D1DA2BE12FE0E669334E437BE3FB02806F1528C2B2782113E0910C7711409",
            33445,
        ),
    ];
    NODES
        .iter()
        .filter_map(|(host, pk, port)| Some(BootstrapNode::new(pk.parse().ok()?, *host, *port)))
        .collect()
}

/// c-toxcore's address checksum: two bytes, each the XOR of every other byte.
fn checksum(data: &[u8]) -> [u8; 2] {
    let mut sum = [0u8; 2];
    for (i, b) in data.iter().enumerate() {
        sum[i % 2] ^= b;
    }
    sum
}

/// Uppercase hex, as Tox clients print IDs.
pub(crate) fn encode_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

/// Decodes exactly `out.len() * 2` hex digits into `out`.
fn decode_hex(s: &str, out: &mut [u8], expected: &'static str) -> Result<(), IdError> {
    let got = s.chars().count();
    if got != out.len() * 2 {
        return Err(IdError::WrongLength { expected, got });
    }
    // Every char is checked before use, so a multi-byte char is reported, not split.
    let mut nibbles = s.chars().enumerate().map(|(position, c)| {
        c.to_digit(16)
            .map(|d| d as u8)
            .ok_or(IdError::InvalidHexDigit { found: c, position })
    });
    for byte in out.iter_mut() {
        let (Some(hi), Some(lo)) = (nibbles.next(), nibbles.next()) else {
            return Err(IdError::WrongLength { expected, got });
        };
        *byte = (hi? << 4) | lo?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // A Tox ID produced by c-toxcore 0.2.18 (tox_self_get_address) in a local test run.
    const REAL_ID: &str =
        "3DF905747792E84793F54192E93011AED4913767A909E2EA064ED421E4E19C1304A4077B8CF6";

    #[test]
    fn checksum_matches_definition() {
        let pk = PublicKey([0x11; 32]);
        let id = ToxId::new(pk, [1, 2, 3, 4]);
        // 16 even bytes of 0x11 cancel out, then 1 ^ 3 and 2 ^ 4.
        assert_eq!(&id.as_bytes()[36..], &[1 ^ 3, 2 ^ 4]);
        assert_eq!(id.public_key(), pk);
        assert_eq!(id.nospam(), [1, 2, 3, 4]);
    }

    #[test]
    fn parses_known_id() {
        let id: ToxId = REAL_ID.parse().unwrap();
        assert_eq!(id.to_string(), REAL_ID);
        assert_eq!(
            id.public_key().to_string(),
            "3DF905747792E84793F54192E93011AED4913767A909E2EA064ED421E4E19C13"
        );
        // Lowercase and surrounding whitespace are accepted.
        let lower: ToxId = format!(" {} ", REAL_ID.to_lowercase()).parse().unwrap();
        assert_eq!(lower, id);
    }

    #[test]
    fn wrong_length_is_clear() {
        let err = "ABCD".parse::<ToxId>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "wrong length: expected 76 hex digits, got 4"
        );
        let err = REAL_ID[..64].parse::<ToxId>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "wrong length: expected 76 hex digits, got 64"
        );
    }

    #[test]
    fn invalid_digit_is_clear() {
        let mut s = REAL_ID.to_owned();
        s.replace_range(10..11, "G");
        let err = s.parse::<ToxId>().unwrap_err();
        assert_eq!(
            err,
            IdError::InvalidHexDigit {
                found: 'G',
                position: 10
            }
        );
        assert!(err.to_string().starts_with("invalid hex digit"));
        // A multi-byte character counts as one character and is reported, never sliced.
        let mut s = REAL_ID.to_owned();
        s.replace_range(0..1, "é");
        let err = s.parse::<ToxId>().unwrap_err();
        assert_eq!(
            err,
            IdError::InvalidHexDigit {
                found: 'é',
                position: 0
            }
        );
    }

    #[test]
    fn bad_checksum_is_clear() {
        let mut s = REAL_ID.to_owned();
        // Flip one digit of the key: the checksum no longer matches.
        s.replace_range(0..1, "4");
        let err = s.parse::<ToxId>().unwrap_err();
        assert_eq!(err, IdError::BadChecksum);
        assert!(err.to_string().starts_with("bad checksum"));
    }

    #[test]
    fn peer_ref_takes_id_or_key() {
        let id: ToxId = REAL_ID.parse().unwrap();
        assert_eq!(REAL_ID.parse::<PeerRef>().unwrap(), PeerRef::Id(id));
        assert_eq!(
            REAL_ID[..64].parse::<PeerRef>().unwrap(),
            PeerRef::Key(id.public_key())
        );
        let err = REAL_ID[..70].parse::<PeerRef>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "wrong length: expected 76 hex digits (tox id) or 64 (public key), got 70"
        );
    }

    #[test]
    fn bootstrap_node_forms() {
        let pk = &REAL_ID[..64];
        let n: BootstrapNode = format!("{pk}@127.0.0.1:33445").parse().unwrap();
        assert_eq!(n.host, "127.0.0.1");
        assert_eq!(n.port, 33445);
        assert_eq!(n.to_string(), format!("{pk}@127.0.0.1:33445"));
        let n: BootstrapNode = format!("{pk}@[::1]:443").parse().unwrap();
        assert_eq!(n.host, "::1");
        assert_eq!(n.to_string(), format!("{pk}@[::1]:443"));
        let n: BootstrapNode = format!("{pk}@node.example:1").parse().unwrap();
        assert_eq!(n.host, "node.example");

        for bad in [
            format!("{pk}127.0.0.1:33445"),
            format!("{pk}@127.0.0.1"),
            format!("{pk}@::1:33445"),
            format!("{pk}@[::1]33445"),
            format!("{pk}@:33445"),
        ] {
            assert!(
                matches!(bad.parse::<BootstrapNode>(), Err(IdError::BadBootstrap(_))),
                "{bad}"
            );
        }
        assert_eq!(
            format!("{pk}@h:0").parse::<BootstrapNode>().unwrap_err(),
            IdError::BadPort("0".into())
        );
        assert_eq!(
            format!("{pk}@h:70000")
                .parse::<BootstrapNode>()
                .unwrap_err(),
            IdError::BadPort("70000".into())
        );
        assert!(matches!(
            "ABC@h:1".parse::<BootstrapNode>(),
            Err(IdError::WrongLength { .. })
        ));
    }

    #[test]
    fn public_nodes_all_parse() {
        assert_eq!(public_bootstrap_nodes().len(), 8);
    }

    proptest! {
        #[test]
        fn tox_id_round_trips(pk in any::<[u8; 32]>(), nospam in any::<[u8; 4]>()) {
            let id = ToxId::new(PublicKey(pk), nospam);
            let text = id.to_string();
            prop_assert_eq!(text.len(), 76);
            prop_assert_eq!(text.parse::<ToxId>().unwrap(), id);
            prop_assert_eq!(text.to_lowercase().parse::<ToxId>().unwrap(), id);
            prop_assert_eq!(id.public_key().to_string().parse::<PublicKey>().unwrap(), PublicKey(pk));
        }

        #[test]
        fn bootstrap_node_round_trips(pk in any::<[u8; 32]>(), port in 1u16..,
                                      v4 in any::<[u8; 4]>(), v6 in any::<[u16; 8]>(),
                                      name in "[a-z][a-z0-9-]{0,20}(\\.[a-z]{2,6}){0,2}",
                                      which in 0u8..3) {
            let host = match which {
                0 => std::net::Ipv4Addr::from(v4).to_string(),
                1 => std::net::Ipv6Addr::from(v6).to_string(),
                _ => name,
            };
            let node = BootstrapNode::new(PublicKey(pk), host, port);
            prop_assert_eq!(node.to_string().parse::<BootstrapNode>().unwrap(), node);
        }

        #[test]
        fn any_text_parses_or_errs(s in "\\PC{0,90}") {
            // Never panics, whatever the input.
            let _ = s.parse::<ToxId>();
            let _ = s.parse::<PeerRef>();
            let _ = s.parse::<BootstrapNode>();
        }

        #[test]
        fn single_digit_typo_is_caught(pk in any::<[u8; 32]>(), nospam in any::<[u8; 4]>(),
                                       pos in 0usize..72, delta in 1u8..16) {
            let text = ToxId::new(PublicKey(pk), nospam).to_string();
            let mut chars: Vec<char> = text.chars().collect();
            let d = chars[pos].to_digit(16).unwrap() as u8;
            chars[pos] = char::from_digit(u32::from((d + delta) % 16), 16).unwrap();
            let typo: String = chars.into_iter().collect();
            prop_assert_eq!(typo.parse::<ToxId>().unwrap_err(), IdError::BadChecksum);
        }
    }
}
