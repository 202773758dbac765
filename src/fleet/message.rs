//! What sidecars tell each other through the store's channel: JSON, names and fingerprints and
//! times only. A message that does not parse is dropped and counted.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum FleetMessage {
    /// Version `fingerprint` of `credential` is rejected fleet-wide: hold it open.
    Open {
        credential: String,
        fingerprint: String,
        reason: String,
        open_for_ms: u64,
        from: String,
    },
    /// A probe of `fingerprint` succeeded on pod `from`.
    Close {
        credential: String,
        fingerprint: String,
        from: String,
    },
    /// The upstream asked for `seconds` of quiet on this credential.
    Hold {
        credential: String,
        seconds: u64,
        from: String,
    },
    /// `credential` changed at its store (the watching pod saw a new version), or an operator
    /// asked for it to be read now: every pod re-reads it from the store. Never a value.
    Refresh { credential: String, from: String },
    /// An operator's switch on pod `from`. `proof` (an HMAC under the admin token of the
    /// fleet, credential, action, `at_ms` and `from`) says an `admin_token` authorised it.
    Manual {
        credential: String,
        action: ManualAction,
        from: String,
        #[serde(default)]
        at_ms: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        proof: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ManualAction {
    Open,
    Close,
}

impl ManualAction {
    pub fn label(self) -> &'static str {
        match self {
            ManualAction::Open => "open",
            ManualAction::Close => "close",
        }
    }
}

impl FleetMessage {
    pub fn credential(&self) -> &str {
        match self {
            FleetMessage::Open { credential, .. }
            | FleetMessage::Close { credential, .. }
            | FleetMessage::Hold { credential, .. }
            | FleetMessage::Refresh { credential, .. }
            | FleetMessage::Manual { credential, .. } => credential,
        }
    }

    /// The `kind` label of `keystamp_fleet_events_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            FleetMessage::Open { .. } => "open",
            FleetMessage::Close { .. } => "close",
            FleetMessage::Hold { .. } => "hold",
            FleetMessage::Refresh { .. } => "refresh",
            FleetMessage::Manual { .. } => "manual",
        }
    }
}
