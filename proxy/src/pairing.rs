//! Invitations (issue "Pairing"): what `proxy invite` offers and what the node checks a
//! joiner's request against. The ticket and the request themselves are `fabric::pairing`.
//!
//! An invitation holds its secret, when it expires, and the rights it offers. It is valid
//! once: the first request with a valid proof, before the expiry, redeems it; any other
//! (another proof, the same ticket again, too late, a revoked invitation) changes nothing.
//! Invitations are kept in `invitations.toml` in the data dir (mode 0600, written atomically:
//! it holds the secrets), so they outlive a restart and can be made while no node runs
//! (`proxy invite` then writes the file, and the node reads it when it starts).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use fabric::id::{PublicKey, ToxId};
use fabric::overlay::PeerName;
use fabric::pairing::{JoinRequest, SECRET_LEN, Secret, Ticket};

use crate::rights::Rights;

/// The file's name in the data dir.
pub const STORE: &str = "invitations.toml";

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
    /// `invitations.toml`, when kept.
    store: Option<PathBuf>,
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

/// `ticket` as a QR code of Unicode half blocks (two modules a character, with the quiet
/// zone), drawn light on dark for a terminal's dark background; `None` if it does not fit a
/// QR code.
pub fn qr(ticket: &str) -> Option<String> {
    use qrcode::render::unicode::Dense1x2;
    let code =
        qrcode::QrCode::with_error_correction_level(ticket.as_bytes(), qrcode::EcLevel::L).ok()?;
    Some(
        code.render::<Dense1x2>()
            .dark_color(Dense1x2::Light)
            .light_color(Dense1x2::Dark)
            .quiet_zone(true)
            .build(),
    )
}

fn encode_secret(secret: &Secret) -> String {
    secret.0.iter().map(|b| format!("{b:02x}")).collect()
}

fn decode_secret(text: &str) -> Option<Secret> {
    if text.len() != SECRET_LEN * 2 || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; SECRET_LEN];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(Secret(out))
}

impl Invitations {
    /// The invitations kept in the data dir `dir` (none if it has no file yet), kept there
    /// as they change. A damaged file is an error (its secrets are not guessed at).
    pub fn load(dir: &Path) -> std::io::Result<Self> {
        let path = dir.join(STORE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e),
        };
        let bad = |why: String| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: {why}", path.display()),
            )
        };
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            #[serde(default)]
            invitation: Vec<Stored>,
        }
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Stored {
            secret: String,
            expires: u64,
            #[serde(default)]
            exit: bool,
            #[serde(default)]
            share: String,
            name: Option<String>,
            #[serde(default)]
            used: bool,
        }
        let file: File = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let mut list = Vec::new();
        for s in file.invitation {
            let secret = decode_secret(&s.secret).ok_or_else(|| bad("a bad secret".into()))?;
            let share = if s.share.is_empty() {
                Default::default()
            } else {
                s.share.parse().map_err(|e| bad(format!("share: {e}")))?
            };
            list.push(Invitation {
                secret,
                expires: s.expires,
                offer: Rights {
                    exit: s.exit,
                    share,
                    introduce: false,
                },
                name: s.name.and_then(|n| n.parse().ok()),
                used: s.used,
            });
        }
        Ok(Self {
            list: Mutex::new(list),
            store: Some(path),
        })
    }

    /// Writes the list to the store, if kept (a failure is logged: the invitation still
    /// works in this run).
    fn save(&self, list: &[Invitation]) {
        let Some(path) = &self.store else {
            return;
        };
        let mut text = String::from(
            "# Written by proxy: open invitations. It holds their secrets: keep it private.\n",
        );
        for i in list {
            text.push_str(&format!(
                "\n[[invitation]]\nsecret = \"{}\"\nexpires = {}\nexit = {}\nshare = \"{}\"\nused = {}\n",
                encode_secret(&i.secret),
                i.expires,
                i.offer.exit,
                i.offer.share,
                i.used
            ));
            if let Some(n) = &i.name {
                text.push_str(&format!("name = \"{n}\"\n"));
            }
        }
        if let Err(e) = fabric::tox::write_private(path, text.as_bytes()) {
            tracing::warn!(path = %path.display(), %e, "invitations not kept");
        }
    }

    /// The latest expiry of an open invitation, if any is open at `now`.
    pub fn open_until(&self, now: u64) -> Option<u64> {
        let list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        list.iter()
            .filter(|i| !i.used && i.expires > now)
            .map(|i| i.expires)
            .max()
    }

    /// Answers a pairing request line about invitations (`invite …`, `invites`,
    /// `invite-revoke ID`) for node `inviter`, whose direct endpoints are `endpoints`;
    /// `None` for any other line. A new invitation's ticket is the answer's last line.
    pub fn answer(
        &self,
        words: &[&str],
        inviter: ToxId,
        endpoints: Vec<std::net::SocketAddr>,
        now: u64,
    ) -> Option<Result<String, String>> {
        Some(match words.split_first()? {
            (&"invite", rest) => self.invite(rest, inviter, endpoints, now),
            (&"invites", []) => Ok(self.listing(now)),
            (&"invite-revoke", [id]) => {
                if self.revoke(id) {
                    Ok(format!("invitation {id} revoked"))
                } else {
                    Err(format!("no invitation {id}"))
                }
            }
            _ => return None,
        })
    }

    /// `invite [name=N] [exit] [share=PORTS] [ttl=SECS]`.
    fn invite(
        &self,
        words: &[&str],
        inviter: ToxId,
        endpoints: Vec<std::net::SocketAddr>,
        now: u64,
    ) -> Result<String, String> {
        let mut offer = Rights::default();
        let (mut name, mut ttl) = (None, Duration::from_secs(600));
        for w in words {
            match w.split_once('=') {
                None if *w == "exit" => offer.exit = true,
                Some(("name", n)) => {
                    name = Some(
                        n.parse::<PeerName>()
                            .map_err(|e| format!("name {n:?}: {e}"))?,
                    )
                }
                Some(("share", p)) => {
                    offer.share = p.parse().map_err(|e| format!("share {p:?}: {e}"))?
                }
                Some(("ttl", t)) => {
                    ttl = Duration::from_secs(t.parse().map_err(|e| format!("ttl {t:?}: {e}"))?)
                }
                _ => return Err(format!("invite: unknown word {w:?}")),
            }
        }
        let (secret, expires) = self
            .create(now, ttl, offer.clone(), name.clone())
            .ok_or("too many open invitations: revoke some (proxy invite --list)")?;
        let id = hex(secret.invitation_id());
        let ticket = Ticket {
            inviter,
            secret,
            expires,
            name,
            endpoints,
        };
        Ok(format!(
            "invitation {id}: the joiner may {}; valid once, for {} s\n{}",
            crate::status::peers::may_here(&offer),
            ttl.as_secs(),
            ticket.encode()
        ))
    }

    /// `invites`: the open invitations, a line each.
    fn listing(&self, now: u64) -> String {
        let list = self.list();
        if list.is_empty() {
            return "no open invitations".into();
        }
        list.iter()
            .map(|l| {
                let state = if l.used {
                    "used".to_owned()
                } else if l.expires <= now {
                    "expired".to_owned()
                } else {
                    format!("{} s left", l.expires - now)
                };
                format!(
                    "{}  exit {}  shares {}  {state}",
                    l.id,
                    if l.offer.exit { "yes" } else { "no" },
                    if l.offer.share.is_empty() {
                        "none".to_owned()
                    } else {
                        l.offer.share.to_string()
                    }
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

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
        self.save(&list);
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
        let offer = inv.offer.clone();
        self.save(&list);
        Ok(offer)
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
        let revoked = list.len() < before;
        if revoked {
            self.save(&list);
        }
        revoked
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

    #[test]
    fn invitations_are_kept_in_the_data_dir_with_their_state() {
        let dir = std::env::temp_dir().join(format!("proxy-invitations-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let _ = std::fs::remove_file(dir.join(STORE));
        let own = PublicKey([9; 32]);
        let joiner = ToxId::new(PublicKey([1; 32]), [0; 4]);
        let first = Invitations::load(&dir).unwrap();
        let (used, _) = first
            .create(
                1000,
                Duration::from_secs(600),
                offer(),
                Some("nas".parse().unwrap()),
            )
            .unwrap();
        let (open, _) = first
            .create(1000, Duration::from_secs(900), offer(), None)
            .unwrap();
        let (revoked, _) = first
            .create(1000, Duration::from_secs(600), offer(), None)
            .unwrap();
        first
            .redeem(
                &request(&used, &joiner, &own),
                &joiner.public_key(),
                &own,
                1001,
            )
            .unwrap();
        assert!(first.revoke(&hex(revoked.invitation_id())));

        let again = Invitations::load(&dir).unwrap();
        assert_eq!(
            again.redeem(
                &request(&used, &joiner, &own),
                &joiner.public_key(),
                &own,
                1002
            ),
            Err(Refusal::Used)
        );
        assert_eq!(
            again.redeem(
                &request(&revoked, &joiner, &own),
                &joiner.public_key(),
                &own,
                1002
            ),
            Err(Refusal::Unknown)
        );
        assert_eq!(again.open_until(1002), Some(1900));
        assert_eq!(
            again.redeem(
                &request(&open, &joiner, &own),
                &joiner.public_key(),
                &own,
                1002
            ),
            Ok(offer())
        );
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.join(STORE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(
            dir.join(STORE),
            "[[invitation]]\nsecret = \"zz\"\nexpires = 1\n",
        )
        .unwrap();
        assert!(
            Invitations::load(&dir).is_err(),
            "a damaged file is an error"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_ticket_fits_a_terminal_qr_code() {
        let ticket = Ticket {
            inviter: ToxId::new(PublicKey([7; 32]), [1; 4]),
            secret: Secret([3; SECRET_LEN]),
            expires: 1_800_000_000,
            name: Some("a-rather-long-host-name-for-a-nas".parse().unwrap()),
            endpoints: vec![
                "192.168.1.20:33445".parse().unwrap(),
                "[2001:db8::20]:33445".parse().unwrap(),
                "10.0.0.5:33445".parse().unwrap(),
                "[fd00::5]:33445".parse().unwrap(),
            ],
        }
        .encode();
        let code = qr(&ticket).expect("a QR code");
        let lines: Vec<&str> = code.lines().collect();
        let width = lines[0].chars().count();
        assert!(lines.iter().all(|l| l.chars().count() == width));
        // Square with its quiet zone, two modules a line; fits an 80-column terminal.
        assert_eq!(lines.len(), width.div_ceil(2));
        assert!(width <= 80, "{width} columns");
    }
}
