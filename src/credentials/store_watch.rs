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

/// A leased secret (Vault's dynamic secrets) and when to act on it.
#[derive(Debug, Clone)]
pub(super) struct Lease {
    pub(super) id: String,
    /// The lease's length when granted, in seconds.
    pub(super) ttl: u64,
    pub(super) renewable: bool,
    /// Renew (renewable) or read anew (not) from here on.
    pub(super) act_at: Instant,
    pub(super) ends: Instant,
    /// The value, with the lease's end as its expiry.
    pub(super) fetched: Fetched,
}

impl Lease {
    /// A lease of `ttl` seconds granted now: acted on two thirds in when renewable, at 85 %
    /// when not.
    pub(super) fn new(id: String, ttl: u64, renewable: bool, secret: Secret) -> Self {
        let now = Instant::now();
        let length = crate::time::capped(ttl, crate::time::Unit::Seconds, MAX_LEASE);
        let share = if renewable { 2.0 / 3.0 } else { 0.85 };
        let expires_at = (ttl > 0)
            .then(|| std::time::SystemTime::now().checked_add(length))
            .flatten();
        Self {
            id,
            ttl,
            renewable: renewable && ttl > 0,
            act_at: crate::time::deadline(now, length.mul_f64(share)),
            ends: crate::time::deadline(now, length),
            fetched: Fetched {
                secret,
                expires_at,
                inputs: None,
            },
        }
    }
}

/// No lease is planned for beyond this (a year): longer ones are read anew within it.
const MAX_LEASE: std::time::Duration = std::time::Duration::from_secs(365 * 86_400);

#[derive(Debug, Default)]
pub struct StoreWatch {
    /// The Vault token this credential logged in with (Vault sources only).
    pub(super) vault: tokio::sync::Mutex<Option<Session>>,
    seen: Mutex<Option<Seen>>,
    lease: Mutex<Option<Lease>>,
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

    /// The lease held now, if any.
    pub(super) fn lease(&self) -> Option<Lease> {
        self.lease
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Holds `lease` from now on; returns the one it replaces.
    pub(super) fn hold_lease(&self, lease: Option<Lease>) -> Option<Lease> {
        let mut held = self
            .lease
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        std::mem::replace(&mut *held, lease)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Seen>> {
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
