//! Invitations (issue "Pairing"): what `proxy invite` offers and what the node checks a
//! joiner's request against. The ticket and the request themselves are `fabric::pairing`.
//!
//! An invitation holds its secret, when it expires, and the rights it offers. It is valid
//! once: the first request with a valid proof, before the expiry, redeems it; any other
//! (another proof, the same ticket again, too late, a revoked invitation) changes nothing.
//! Invitations live in the running node only: a restart revokes them all.

use std::sync::Mutex;
use std::time::Duration;

use fabric::id::PublicKey;
use fabric::overlay::PeerName;
use fabric::pairing::{JoinRequest, Secret};

use crate::rights::Rights;

/// One open invitation.
#[derive(Debug, Clone)]
struct Invitation {
    secret: Secret,
    /// Seconds since the Unix epoch.
    expires: u64,
    offer: Rights,
    /// The name the inviter suggests for itself, shown in the list.
    name: Option<PeerName>,
    used: bool,
}

/// Why a request was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// No such invitation (never made, revoked, or made before a restart).
    #[error("no such invitation (revoked, or never made here)")]
    Unknown,
    /// Past its expiry.
    #[error("the invitation expired")]
    Expired,
    /// Redeemed already.
    #[error("the invitation was used already")]
    Used,
    /// The proof does not match the secret.
    #[error("the proof does not match the invitation's secret")]
    BadProof,
}

/// Invitations at most open at once (each is a few dozen bytes; the bound keeps a script in a
/// loop from growing the node).
pub const MAX_INVITATIONS: usize = 256;

/// The node's open invitations.
#[derive(Debug, Default)]
pub struct Invitations {
    list: Mutex<Vec<Invitation>>,
}

/// One invitation as `proxy invite --list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// Its id (16 hex digits), what `--revoke` takes.
    pub id: String,
    /// What it offers.
    pub offer: Rights,
    /// When it expires (Unix seconds).
    pub expires: u64,
    /// Whether it was redeemed.
    pub used: bool,
}

fn hex(id: [u8; 8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

impl Invitations {
    /// A new invitation offering `offer`, valid for `ttl` from `now` (Unix seconds): its
    /// secret and expiry, for the ticket. Expired and used invitations are dropped first;
    /// `None` when [`MAX_INVITATIONS`] are still open.
    pub fn create(
        &self,
        now: u64,
        ttl: Duration,
        offer: Rights,
        name: Option<PeerName>,
    ) -> Option<(Secret, u64)> {
        let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        list.retain(|i| !i.used && i.expires > now);
        if list.len() >= MAX_INVITATIONS {
            return None;
        }
        let secret = Secret::random();
        let expires = now.saturating_add(ttl.as_secs());
        list.push(Invitation {
            secret: secret.clone(),
            expires,
            offer,
            name,
            used: false,
        });
        Some((secret, expires))
    }

    /// Checks `request`, from `joiner` to this node (`own`), at `now`: the rights it offered,
    /// once. A refused request changes nothing.
    pub fn redeem(
        &self,
        request: &JoinRequest,
        joiner: &PublicKey,
        own: &PublicKey,
        now: u64,
    ) -> Result<Rights, Refusal> {
        let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        let inv = list
            .iter_mut()
            .find(|i| i.secret.invitation_id() == request.invitation)
            .ok_or(Refusal::Unknown)?;
        if !inv.secret.verify(&request.proof, joiner, own) {
            return Err(Refusal::BadProof);
        }
        if inv.used {
            return Err(Refusal::Used);
        }
        if inv.expires <= now {
            return Err(Refusal::Expired);
        }
        inv.used = true;
        Ok(inv.offer.clone())
    }

    /// The open invitations (and those used or expired that are still kept).
    pub fn list(&self) -> Vec<Listed> {
        let list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        list.iter()
            .map(|i| Listed {
                id: hex(i.secret.invitation_id()),
                offer: i.offer.clone(),
                expires: i.expires,
                used: i.used,
            })
            .collect()
    }

    /// Revokes the invitation whose id is `id` (16 hex digits); whether there was one.
    pub fn revoke(&self, id: &str) -> bool {
        let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        let before = list.len();
        list.retain(|i| !hex(i.secret.invitation_id()).eq_ignore_ascii_case(id.trim()));
        list.len() < before
    }

    /// The name an invitation suggested for this node, for the listing.
    pub fn name_of(&self, id: &str) -> Option<PeerName> {
        let list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        list.iter()
            .find(|i| hex(i.secret.invitation_id()) == id)
            .and_then(|i| i.name.clone())
    }
}

#[cfg(test)]
mod tests {
    use fabric::id::ToxId;
    use fabric::pairing::Ticket;

    use super::*;

    fn offer() -> Rights {
        Rights {
            exit: true,
            share: "8080".parse().unwrap(),
            introduce: false,
        }
    }

    fn request(secret: &Secret, joiner: &ToxId, own: &PublicKey) -> JoinRequest {
        let ticket = Ticket {
            inviter: ToxId::new(*own, [0; 4]),
            secret: secret.clone(),
            expires: 0,
            name: None,
            endpoints: Vec::new(),
        };
        JoinRequest::new(&ticket, joiner, None)
    }

    #[test]
    fn an_invitation_is_redeemed_once_before_its_expiry_with_the_right_proof() {
        let own = PublicKey([9; 32]);
        let joiner = ToxId::new(PublicKey([1; 32]), [0; 4]);
        let other = ToxId::new(PublicKey([2; 32]), [0; 4]);
        let invitations = Invitations::default();
        let (secret, expires) = invitations
            .create(1000, Duration::from_secs(600), offer(), None)
            .unwrap();
        assert_eq!(expires, 1600);
        let req = request(&secret, &joiner, &own);
        // Someone else with the joiner's request (replayed from their key) is refused, and
        // the invitation stays open.
        assert_eq!(
            invitations.redeem(&req, &other.public_key(), &own, 1001),
            Err(Refusal::BadProof)
        );
        assert_eq!(
            invitations.redeem(&req, &joiner.public_key(), &own, 1001),
            Ok(offer())
        );
        assert_eq!(
            invitations.redeem(&req, &joiner.public_key(), &own, 1002),
            Err(Refusal::Used)
        );
        // Too late.
        let (late, _) = invitations
            .create(1000, Duration::from_secs(10), offer(), None)
            .unwrap();
        let req = request(&late, &joiner, &own);
        assert_eq!(
            invitations.redeem(&req, &joiner.public_key(), &own, 1010),
            Err(Refusal::Expired)
        );
        // Revoked.
        let (revoked, _) = invitations
            .create(1000, Duration::from_secs(600), offer(), None)
            .unwrap();
        let id = hex(revoked.invitation_id());
        assert!(invitations.list().iter().any(|l| l.id == id && !l.used));
        assert!(invitations.revoke(&id));
        assert!(!invitations.revoke(&id));
        let req = request(&revoked, &joiner, &own);
        assert_eq!(
            invitations.redeem(&req, &joiner.public_key(), &own, 1001),
            Err(Refusal::Unknown)
        );
    }

    #[test]
    fn open_invitations_are_bounded() {
        let invitations = Invitations::default();
        for _ in 0..MAX_INVITATIONS {
            assert!(
                invitations
                    .create(0, Duration::from_secs(60), Rights::default(), None)
                    .is_some()
            );
        }
        assert!(
            invitations
                .create(0, Duration::from_secs(60), Rights::default(), None)
                .is_none()
        );
        // Once they expired, room again.
        assert!(
            invitations
                .create(61, Duration::from_secs(60), Rights::default(), None)
                .is_some()
        );
    }
}
