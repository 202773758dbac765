//! Agent identity: an agent presents itself the standard way, `HTTPS_PROXY=http://NAME:TOKEN@host:port`,
//! which every client sends as `Proxy-Authorization: Basic base64(NAME:TOKEN)`. Tokens are read
//! from file or env sources, compared in constant time, never logged, and the header is stripped
//! before anything is forwarded.

use std::collections::HashMap;
use std::sync::Arc;

use base64::Engine;
use http::{header, HeaderMap};

use crate::config::Config;
use crate::credentials::read_local;
use crate::limits::Limits;
use crate::secret::Secret;

/// Every identity with a readable token.
#[derive(Debug, Default, Clone)]
pub struct IdentityTable {
    tokens: HashMap<Arc<str>, Secret>,
    /// Per-agent rate limits, carried across reloads while their settings are unchanged.
    limits: HashMap<Arc<str>, Arc<Limits>>,
    pub required: bool,
}

/// Why a request has no valid identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityError {
    /// No `Proxy-Authorization`, and identities are required.
    Missing,
    /// Credentials were presented but do not match any identity.
    Invalid,
}

impl IdentityTable {
    /// Reads every identity's token. One that cannot be read is logged and left out: its agent
    /// cannot authenticate until it can. `limits` are the per-agent limiters, carried over from
    /// the previous table by `state::plan_next`.
    pub fn read(config: &Config, limits: HashMap<Arc<str>, Arc<Limits>>) -> Self {
        let mut tokens = HashMap::new();
        for (name, spec) in &config.identities {
            match read_local(&spec.source) {
                Some(Ok(fetched)) => {
                    tokens.insert(Arc::from(name.as_str()), fetched.secret);
                }
                Some(Err(error)) => {
                    tracing::warn!(agent = %name, reason = %error, "identity token unavailable")
                }
                None => {}
            }
        }
        Self {
            tokens,
            limits,
            required: config.require_identity,
        }
    }

    /// Every agent's limiter, to carry into the next table.
    pub fn all_limits(&self) -> &HashMap<Arc<str>, Arc<Limits>> {
        &self.limits
    }

    /// Whether both tables accept exactly the same tokens (a rotation changes this).
    pub fn same_tokens(&self, other: &Self) -> bool {
        self.tokens == other.tokens && self.required == other.required
    }

    /// The agent's own rate limit, if it has one.
    pub fn limits(&self, agent: &str) -> Option<&Arc<Limits>> {
        self.limits.get(agent)
    }

    /// The agent named by `Proxy-Authorization`, `None` for an anonymous request that is allowed.
    pub fn identify(&self, headers: &HeaderMap) -> Result<Option<Arc<str>>, IdentityError> {
        let Some(value) = headers.get(header::PROXY_AUTHORIZATION) else {
            return if self.required {
                Err(IdentityError::Missing)
            } else {
                Ok(None)
            };
        };
        let encoded = value
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Basic ")
                    .or_else(|| v.strip_prefix("basic "))
            })
            .ok_or(IdentityError::Invalid)?;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .map_err(|_| IdentityError::Invalid)?;
        let decoded = String::from_utf8(decoded).map_err(|_| IdentityError::Invalid)?;
        let (name, token) = decoded.split_once(':').ok_or(IdentityError::Invalid)?;
        let (agent, expected) = self
            .tokens
            .get_key_value(name)
            .ok_or(IdentityError::Invalid)?;
        if expected.matches(token) {
            Ok(Some(agent.clone()))
        } else {
            Err(IdentityError::Invalid)
        }
    }
}
