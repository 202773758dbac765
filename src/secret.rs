//! The one type a credential value lives in. `Debug` and `Display` print `[redacted]`; the value
//! is exposed only through [`Secret::expose`] and [`Secret::bearer_header`] (a sensitive header
//! value), which the stamp in `inject.rs` calls.

use std::fmt;
use std::sync::{Arc, OnceLock};

use http::HeaderValue;
use sha2::{Digest, Sha256};

/// A credential value. Cloning is cheap; the bytes are never printed.
#[derive(Clone)]
pub struct Secret(Arc<Held>);

struct Held {
    value: Box<str>,
    /// `Bearer <value>`, built on the first stamp (`None`: not a valid header value): each
    /// request then clones a reference instead of formatting and byte-checking the value.
    bearer: OnceLock<Option<HeaderValue>>,
}

impl Secret {
    pub fn new(value: impl Into<Box<str>>) -> Self {
        Self(Arc::new(Held {
            value: value.into(),
            bearer: OnceLock::new(),
        }))
    }

    /// The raw value. Call this only where the value is written into a request.
    pub fn expose(&self) -> &str {
        &self.0.value
    }

    /// `Bearer <value>` as a sensitive header value, or `None` if the value cannot go in a
    /// header. Call this only where the value is written into a request.
    pub fn bearer_header(&self) -> Option<HeaderValue> {
        self.0
            .bearer
            .get_or_init(|| {
                let mut value = HeaderValue::try_from(format!("Bearer {}", self.0.value)).ok()?;
                value.set_sensitive(true);
                Some(value)
            })
            .clone()
    }

    /// Whether `presented` is this value, compared without an early exit so timing does not
    /// reveal how much of a token matched.
    pub fn matches(&self, presented: &str) -> bool {
        let (a, b) = (self.0.value.as_bytes(), presented.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }

    /// A short, non-reversible identifier of this value: the first 12 hex digits of a
    /// domain-separated SHA-256. Safe for logs, metrics and `/status`.
    pub fn fingerprint(&self) -> String {
        let mut hasher = Sha256::new();
        hasher.update(b"keystamp-fingerprint-v1\0");
        hasher.update(self.0.value.as_bytes());
        let digest = hasher.finalize();
        digest.iter().take(6).map(|b| format!("{b:02x}")).collect()
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        self.0.value == other.0.value
    }
}

impl Eq for Secret {}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_never_show_the_value() {
        let secret = Secret::new("sk-live-123");
        assert_eq!(format!("{secret:?}"), "[redacted]");
        assert_eq!(format!("{secret}"), "[redacted]");
        assert!(!secret.fingerprint().contains("sk-live"));
        assert_eq!(secret.fingerprint().len(), 12);
        assert_ne!(
            secret.fingerprint(),
            Secret::new("sk-live-124").fingerprint()
        );
    }

    #[test]
    fn the_bearer_header_is_built_once_and_stays_sensitive() {
        let secret = Secret::new("sk-live-123");
        let first = secret.bearer_header().expect("a valid header value");
        assert_eq!(first, "Bearer sk-live-123");
        assert!(first.is_sensitive());
        assert!(!format!("{first:?}").contains("sk-live"));
        let again = secret
            .clone()
            .bearer_header()
            .expect("a valid header value");
        assert_eq!(
            again.as_bytes().as_ptr(),
            first.as_bytes().as_ptr(),
            "shared, not rebuilt"
        );
        assert!(Secret::new("line\nbreak").bearer_header().is_none());
        assert_eq!(
            secret,
            Secret::new("sk-live-123"),
            "equality is the value's"
        );
    }
}
