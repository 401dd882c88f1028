//! Introductions (seed 003's route table by name): a node tells a peer about its other peers,
//! so they can know each other without pasting IDs. Sans-IO: the message and its checks.
//!
//! It travels as the body of a stream request of kind 21 ([`crate::target::Target::Introduce`]):
//!
//! ```text
//! body     length u16 BE | count u8 | count × entry
//! entry    Tox ID, 38 bytes (key, nospam, checksum) | version u64 BE | name length u8 | name
//! answer   the request's reply byte: 0 taken, 2 not allowed (the receiver does not take this
//!          peer as its introducer)
//! ```
//!
//! What it may say is bounded ([`MAX_ENTRIES`], names as [`PeerName`] takes them), and whatever
//! does not decode is refused whole. The rules of what a receiver does with an entry (never a
//! right, never a user's name overridden, never forwarded) are the application's.

use crate::id::{TOX_ID_SIZE, ToxId};
use crate::overlay::PeerName;

/// The most peers one introduction names.
pub const MAX_ENTRIES: usize = 64;

/// The longest body, length prefix included.
pub const MAX_BODY: usize = 2 + 1 + MAX_ENTRIES * (TOX_ID_SIZE + 8 + 1 + 63);

/// One introduced peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Introduced {
    /// Its Tox ID.
    pub id: ToxId,
    /// The introducer's version of what it knows of the peer: a receiver takes a newer one
    /// and ignores the same or an older one.
    pub version: u64,
    /// What the introducer calls it (a suggestion: the receiver's names win).
    pub name: PeerName,
}

/// Why an introduction was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IntroductionError {
    /// Cut short, or longer than its length says.
    #[error("an introduction of the wrong length")]
    Length,
    /// More than [`MAX_ENTRIES`] peers.
    #[error("an introduction of {0} peers (at most {MAX_ENTRIES})")]
    TooMany(usize),
    /// A Tox ID whose checksum is wrong.
    #[error("an introduced peer's Tox ID is damaged")]
    Id,
    /// A name that is no peer name.
    #[error("an introduced peer's name is not a name")]
    Name,
}

/// Encodes `entries` (at most [`MAX_ENTRIES`]; more are an error), length prefix included.
pub fn emit(entries: &[Introduced]) -> Result<Vec<u8>, IntroductionError> {
    let count = u8::try_from(entries.len())
        .ok()
        .filter(|&n| usize::from(n) <= MAX_ENTRIES)
        .ok_or(IntroductionError::TooMany(entries.len()))?;
    let mut body = vec![count];
    for e in entries {
        body.extend_from_slice(e.id.as_bytes());
        body.extend_from_slice(&e.version.to_be_bytes());
        let name = e.name.as_str().as_bytes();
        // A PeerName is a DNS label: at most 63 bytes.
        body.push(u8::try_from(name.len()).map_err(|_| IntroductionError::Name)?);
        body.extend_from_slice(name);
    }
    let len = u16::try_from(body.len()).map_err(|_| IntroductionError::Length)?;
    let mut out = len.to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    Ok(out)
}

/// The body's length, from its first two bytes; `None` if over [`MAX_BODY`].
pub fn body_len(prefix: [u8; 2]) -> Option<usize> {
    let len = usize::from(u16::from_be_bytes(prefix));
    (len + 2 <= MAX_BODY).then_some(len)
}

/// Decodes a body (what follows the length prefix), whole.
pub fn parse(body: &[u8]) -> Result<Vec<Introduced>, IntroductionError> {
    let (&count, mut rest) = body.split_first().ok_or(IntroductionError::Length)?;
    let count = usize::from(count);
    if count > MAX_ENTRIES {
        return Err(IntroductionError::TooMany(count));
    }
    let mut entries = Vec::with_capacity(count);
    for _ in 0..count {
        let fixed = TOX_ID_SIZE + 8 + 1;
        if rest.len() < fixed {
            return Err(IntroductionError::Length);
        }
        let mut id = [0u8; TOX_ID_SIZE];
        id.copy_from_slice(&rest[..TOX_ID_SIZE]);
        let id = ToxId::from_bytes(id).map_err(|_| IntroductionError::Id)?;
        let mut version = [0u8; 8];
        version.copy_from_slice(&rest[TOX_ID_SIZE..TOX_ID_SIZE + 8]);
        let name_len = usize::from(rest[fixed - 1]);
        let name = rest
            .get(fixed..fixed + name_len)
            .ok_or(IntroductionError::Length)?;
        let name = std::str::from_utf8(name)
            .ok()
            .and_then(|n| n.parse::<PeerName>().ok())
            .ok_or(IntroductionError::Name)?;
        entries.push(Introduced {
            id,
            version: u64::from_be_bytes(version),
            name,
        });
        rest = &rest[fixed + name_len..];
    }
    if !rest.is_empty() {
        return Err(IntroductionError::Length);
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::id::PublicKey;

    fn entry(b: u8, name: &str) -> Introduced {
        Introduced {
            id: ToxId::new(PublicKey([b; 32]), [b; 4]),
            version: u64::from(b) << 33,
            name: name.parse().unwrap(),
        }
    }

    #[test]
    fn an_introduction_round_trips_and_bad_ones_are_refused() {
        let entries = vec![entry(1, "nas"), entry(2, "desk-top")];
        let wire = emit(&entries).unwrap();
        let len = body_len([wire[0], wire[1]]).unwrap();
        assert_eq!(len, wire.len() - 2);
        assert_eq!(parse(&wire[2..]), Ok(entries.clone()));
        assert_eq!(
            parse(&wire[2..wire.len() - 1]),
            Err(IntroductionError::Length)
        );
        let mut longer = wire[2..].to_vec();
        longer.push(0);
        assert_eq!(parse(&longer), Err(IntroductionError::Length));
        let mut damaged = wire[2..].to_vec();
        damaged[1 + TOX_ID_SIZE - 1] ^= 1;
        assert_eq!(parse(&damaged), Err(IntroductionError::Id));
        let mut bad_name = wire[2..].to_vec();
        bad_name[1 + TOX_ID_SIZE + 8 + 1] = b'.';
        assert_eq!(parse(&bad_name), Err(IntroductionError::Name));
        assert_eq!(parse(&[65]), Err(IntroductionError::TooMany(65)));
        assert_eq!(parse(&[]), Err(IntroductionError::Length));
        let too_many: Vec<Introduced> = (0..65).map(|i| entry(i, "a")).collect();
        assert_eq!(emit(&too_many), Err(IntroductionError::TooMany(65)));
        let most: Vec<Introduced> = (0..64)
            .map(|i| entry(i, &format!("a{}", "b".repeat(62))))
            .collect();
        let wire = emit(&most).unwrap();
        assert_eq!(wire.len(), MAX_BODY);
        assert!(body_len([wire[0], wire[1]]).is_some());
        assert_eq!(body_len([0xff, 0xff]), None);
    }

    proptest! {
        #[test]
        fn any_bytes_parse_or_are_refused_and_what_parses_round_trips(
            body in proptest::collection::vec(any::<u8>(), 0..600)
        ) {
            if let Ok(entries) = parse(&body) {
                let wire = emit(&entries).unwrap();
                prop_assert_eq!(parse(&wire[2..]), Ok(entries));
            }
        }
    }
}
