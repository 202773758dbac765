//! What a credential read from a secret store (Vault/OpenBao, AWS Secrets Manager) keeps
//! between polls: the store's version id last read, with the value read at it, so a poll that
//! finds the same version costs one metadata call and no value transfer; and Vault's session.

use std::sync::Mutex;

use tokio::time::Instant;

use crate::credentials::value::Fetched;
use crate::secret::Secret;

/// A Vault token and when to renew it.
#[derive(Debug)]
pub(super) struct Session {
    pub(super) token: Secret,
    /// Renew (or log in again) from here on: two thirds into the token's TTL.
    pub(super) renew_after: Option<Instant>,
    pub(super) renewable: bool,
}

#[derive(Debug, Default)]
pub struct StoreWatch {
    /// The Vault token this credential logged in with (Vault sources only).
    pub(super) vault: tokio::sync::Mutex<Option<Session>>,
    seen: Mutex<Option<Seen>>,
}

#[derive(Debug, Clone)]
struct Seen {
    version: String,
    fetched: Fetched,
}

impl StoreWatch {
    /// The store's version id last read (a KV version, a Secrets Manager version id).
    pub fn version(&self) -> Option<String> {
        self.lock().as_ref().map(|seen| seen.version.clone())
    }

    /// The value last read, if it was read at `version`.
    pub(super) fn read_at(&self, version: &str) -> Option<Fetched> {
        self.lock()
            .as_ref()
            .filter(|seen| seen.version == version)
            .map(|seen| seen.fetched.clone())
    }

    pub(super) fn remember(&self, version: String, fetched: &Fetched) {
        *self.lock() = Some(Seen {
            version,
            fetched: fetched.clone(),
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Seen>> {
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
