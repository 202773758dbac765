//! Authenticates what keystamp writes to the store. With `fleet.key`, every channel message and
//! every index entry is an envelope `{"sealed": BODY, "mac": HEX}`: BODY is the JSON of the
//! fleet name, the time it was written, a random nonce and the message; MAC is HMAC-SHA256 over
//! BODY under the fleet key. What fails the MAC, names another fleet, is stale or from the
//! future, or repeats a nonce already seen is dropped and counted; so is anything unsealed.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use crate::fleet::message::{FleetMessage, ManualAction};

/// How far a channel message's time may be from this pod's clock: the channel delivers in
/// milliseconds, so anything older is a replay, not a late delivery.
pub const MAX_SKEW: Duration = Duration::from_secs(30);

/// Why a message from the store was dropped (the `reason` label of
/// `keystamp_fleet_messages_rejected_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("not a fleet message")]
    Unparseable,
    #[error("not sealed with the fleet key")]
    Unauthenticated,
    #[error("sealed for another fleet")]
    OtherFleet,
    #[error("too old or from the future")]
    Stale,
    #[error("seen before")]
    Replayed,
}

impl Rejected {
    pub fn label(self) -> &'static str {
        match self {
            Rejected::Unparseable => "unparseable",
            Rejected::Unauthenticated => "unauthenticated",
            Rejected::OtherFleet => "other_fleet",
            Rejected::Stale => "stale",
            Rejected::Replayed => "replayed",
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    sealed: String,
    mac: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    fleet: String,
    at_ms: u64,
    nonce: String,
    message: FleetMessage,
}

/// Seals and opens one fleet's messages; remembers nonces seen within [`MAX_SKEW`].
pub struct Seal {
    fleet: String,
    key: Option<hmac::Key>,
    seen: HashMap<String, u64>,
    random: SystemRandom,
}

impl Seal {
    /// `key: None` writes and reads plain JSON, as a fleet without `fleet.key` does.
    pub fn new(fleet: &str, key: Option<&[u8]>) -> Self {
        Self {
            fleet: fleet.to_string(),
            key: key.map(|key| hmac::Key::new(hmac::HMAC_SHA256, key)),
            seen: HashMap::new(),
            random: SystemRandom::new(),
        }
    }

    /// The text to write for `message`, at wall-clock `now`.
    pub fn seal(&self, message: &FleetMessage, now: SystemTime) -> String {
        let Some(key) = &self.key else {
            return serde_json::to_string(message).unwrap_or_default();
        };
        let mut nonce = [0u8; 16];
        // A failing system RNG leaves the nonce zero: still sealed, only replay-detected by time.
        let _ = self.random.fill(&mut nonce);
        let body = Body {
            fleet: self.fleet.clone(),
            at_ms: unix_ms(now),
            nonce: hex(&nonce),
            message: message.clone(),
        };
        let sealed = serde_json::to_string(&body).unwrap_or_default();
        let mac = hex(hmac::sign(key, sealed.as_bytes()).as_ref());
        serde_json::to_string(&Envelope { sealed, mac }).unwrap_or_default()
    }

    /// A channel message: authentic, this fleet's, fresh, and not seen before.
    pub fn open_message(&mut self, text: &str, now: SystemTime) -> Result<FleetMessage, Rejected> {
        let (body, at_ms) = match self.verified(text)? {
            Verified::Plain(message) => return Ok(message),
            Verified::Sealed(body) => {
                let at_ms = body.at_ms;
                (body, at_ms)
            }
        };
        let now_ms = unix_ms(now);
        if now_ms.abs_diff(at_ms) > millis(MAX_SKEW) {
            return Err(Rejected::Stale);
        }
        self.seen
            .retain(|_, at| now_ms.abs_diff(*at) <= millis(MAX_SKEW));
        if self.seen.insert(body.nonce.clone(), at_ms).is_some() {
            return Err(Rejected::Replayed);
        }
        Ok(body.message)
    }

    /// An index entry (a version the fleet holds open): authentic, this fleet's, written no
    /// later than now, and not outlived (`open_for` since it was written).
    pub fn open_entry(&self, text: &str, now: SystemTime) -> Result<FleetMessage, Rejected> {
        let body = match self.verified(text)? {
            Verified::Plain(message) => return Ok(message),
            Verified::Sealed(body) => body,
        };
        let now_ms = unix_ms(now);
        let lasts_ms = match &body.message {
            FleetMessage::Open { open_for_ms, .. } => *open_for_ms,
            _ => 0,
        };
        let future = body.at_ms > now_ms.saturating_add(millis(MAX_SKEW));
        let outlived = body.at_ms.saturating_add(lasts_ms) < now_ms;
        if future || outlived {
            return Err(Rejected::Stale);
        }
        Ok(body.message)
    }

    fn verified(&self, text: &str) -> Result<Verified, Rejected> {
        let Some(key) = &self.key else {
            return serde_json::from_str(text)
                .map(Verified::Plain)
                .map_err(|_| Rejected::Unparseable);
        };
        let Ok(envelope) = serde_json::from_str::<Envelope>(text) else {
            // Plain JSON of a message is what a store writer without the key can produce.
            return Err(match serde_json::from_str::<FleetMessage>(text) {
                Ok(_) => Rejected::Unauthenticated,
                Err(_) => Rejected::Unparseable,
            });
        };
        let mac = unhex(&envelope.mac).ok_or(Rejected::Unauthenticated)?;
        hmac::verify(key, envelope.sealed.as_bytes(), &mac)
            .map_err(|_| Rejected::Unauthenticated)?;
        let body: Body =
            serde_json::from_str(&envelope.sealed).map_err(|_| Rejected::Unparseable)?;
        if body.fleet != self.fleet {
            return Err(Rejected::OtherFleet);
        }
        Ok(Verified::Sealed(body))
    }
}

enum Verified {
    Plain(FleetMessage),
    Sealed(Body),
}

/// What an operator's switch proves with the admin token.
pub struct ManualFacts<'a> {
    pub fleet: &'a str,
    pub credential: &'a str,
    pub action: ManualAction,
    pub at_ms: u64,
    pub from: &'a str,
}

impl ManualFacts<'_> {
    fn text(&self) -> String {
        format!(
            "keystamp-manual-v1\n{}\n{}\n{}\n{}\n{}",
            self.fleet,
            self.credential,
            self.action.label(),
            self.at_ms,
            self.from
        )
    }
}

/// HMAC-SHA256 of `facts` under the admin token, hex.
pub fn manual_proof(admin_token: &[u8], facts: &ManualFacts<'_>) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, admin_token);
    hex(hmac::sign(&key, facts.text().as_bytes()).as_ref())
}

/// Whether `proof` is [`manual_proof`] of `facts`, compared in constant time.
pub fn manual_proof_holds(admin_token: &[u8], facts: &ManualFacts<'_>, proof: &str) -> bool {
    let key = hmac::Key::new(hmac::HMAC_SHA256, admin_token);
    unhex(proof).is_some_and(|mac| hmac::verify(&key, facts.text().as_bytes(), &mac).is_ok())
}

pub fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map(millis).unwrap_or(0)
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(text.get(at..at + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close() -> FleetMessage {
        FleetMessage::Close {
            credential: "k".into(),
            fingerprint: "f".into(),
            from: "pod-a".into(),
        }
    }

    #[test]
    fn a_sealed_message_opens_once_and_only_fresh() {
        let now = SystemTime::now();
        let writer = Seal::new("drill", Some(b"fleet-key"));
        let mut reader = Seal::new("drill", Some(b"fleet-key"));
        let text = writer.seal(&close(), now);
        assert_eq!(reader.open_message(&text, now), Ok(close()));
        assert_eq!(reader.open_message(&text, now), Err(Rejected::Replayed));
        let old = writer.seal(&close(), now - Duration::from_secs(31));
        assert_eq!(reader.open_message(&old, now), Err(Rejected::Stale));
    }

    #[test]
    fn forged_plain_tampered_and_foreign_messages_are_refused() {
        let now = SystemTime::now();
        let mut reader = Seal::new("drill", Some(b"fleet-key"));
        let plain = serde_json::to_string(&close()).unwrap();
        assert_eq!(
            reader.open_message(&plain, now),
            Err(Rejected::Unauthenticated)
        );
        let forged = Seal::new("drill", Some(b"guessed")).seal(&close(), now);
        assert_eq!(
            reader.open_message(&forged, now),
            Err(Rejected::Unauthenticated)
        );
        let tampered = Seal::new("drill", Some(b"fleet-key"))
            .seal(&close(), now)
            .replace("pod-a", "pod-b");
        assert_eq!(
            reader.open_message(&tampered, now),
            Err(Rejected::Unauthenticated)
        );
        let foreign = Seal::new("other", Some(b"fleet-key")).seal(&close(), now);
        assert_eq!(
            reader.open_message(&foreign, now),
            Err(Rejected::OtherFleet)
        );
        assert_eq!(reader.open_message("{", now), Err(Rejected::Unparseable));
    }

    #[test]
    fn an_index_entry_lasts_as_long_as_its_open_period() {
        let open = FleetMessage::Open {
            credential: "k".into(),
            fingerprint: "f".into(),
            reason: "r".into(),
            open_for_ms: 60_000,
            from: "pod-a".into(),
        };
        let seal = Seal::new("drill", Some(b"fleet-key"));
        let written = SystemTime::now() - Duration::from_secs(45);
        let text = seal.seal(&open, written);
        assert_eq!(seal.open_entry(&text, SystemTime::now()), Ok(open.clone()));
        let later = SystemTime::now() + Duration::from_secs(20);
        assert_eq!(seal.open_entry(&text, later), Err(Rejected::Stale));
    }

    #[test]
    fn without_a_key_messages_are_plain_json() {
        let now = SystemTime::now();
        let mut plain = Seal::new("drill", None);
        let text = plain.seal(&close(), now);
        assert_eq!(text, serde_json::to_string(&close()).unwrap());
        assert_eq!(plain.open_message(&text, now), Ok(close()));
    }
}
