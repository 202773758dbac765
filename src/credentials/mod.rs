//! The credential table: every configured credential's current value (or why it has none),
//! read from its source. A table is immutable once built; the proxy holds the current one in a
//! snapshot behind `ArcSwap` and replaces it whole.

mod source;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use crate::config::{Config, SourceSpec};
use crate::secret::Secret;

pub use source::{read_source, SourceError};

/// One credential as the request path sees it.
#[derive(Debug, Clone)]
pub struct Credential {
    pub name: Arc<str>,
    pub source_kind: &'static str,
    pub state: CredentialState,
}

#[derive(Debug, Clone)]
pub enum CredentialState {
    Ready {
        secret: Secret,
        fingerprint: String,
        loaded_at: SystemTime,
    },
    /// No usable value; requests on its routes get 503 `credential_unavailable`.
    Unavailable(SourceError),
}

/// All credentials by name.
#[derive(Debug, Clone, Default)]
pub struct CredentialTable {
    by_name: HashMap<Arc<str>, Arc<Credential>>,
}

impl CredentialTable {
    /// Reads every source in `config`. A missing or bad source makes that credential
    /// unavailable and is logged (by name and reason, never content); it never fails the load.
    pub fn load(config: &Config) -> Self {
        let by_name = config
            .credentials
            .iter()
            .map(|(name, spec)| {
                let name: Arc<str> = Arc::from(name.as_str());
                let credential = Credential::load(name.clone(), &spec.source);
                (name, Arc::new(credential))
            })
            .collect();
        Self { by_name }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Credential>> {
        self.by_name.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Credential>> {
        self.by_name.values()
    }
}

impl Credential {
    pub fn load(name: Arc<str>, source: &SourceSpec) -> Self {
        let state = match read_source(source) {
            Ok(secret) => {
                let fingerprint = secret.fingerprint();
                tracing::info!(credential = %name, source = source.kind(), %fingerprint, "credential loaded");
                CredentialState::Ready {
                    secret,
                    fingerprint,
                    loaded_at: SystemTime::now(),
                }
            }
            Err(error) => {
                tracing::warn!(credential = %name, source = source.kind(), reason = %error, "credential unavailable");
                CredentialState::Unavailable(error)
            }
        };
        Self {
            name,
            source_kind: source.kind(),
            state,
        }
    }
}
