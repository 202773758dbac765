//! The one type a credential value lives in. `Debug` and `Display` print `[redacted]`; the value
//! is exposed only through [`Secret::expose`], which the stamp in `inject.rs` calls.

use std::fmt;

use sha2::{Digest, Sha256};

/// A credential value. Cloning is cheap; the bytes are never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(std::sync::Arc<str>);

impl Secret {
    pub fn new(value: impl Into<std::sync::Arc<str>>) -> Self {
        Self(value.into())
    }

    /// The raw value. Call this only where the value is written into a request.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `presented` is this value, compared without an early exit so timing does not
    /// reveal how much of a token matched.
    pub fn matches(&self, presented: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), presented.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }

    /// A short, non-reversible identifier of this value: the first 12 hex digits of a
    /// domain-separated SHA-256. Safe for logs, metrics and `/status`.
    pub fn fingerprint(&self) -> String {
        let mut hasher = Sha256::new();
        hasher.update(b"keystamp-fingerprint-v1\0");
        hasher.update(self.0.as_bytes());
        let digest = hasher.finalize();
        digest.iter().take(6).map(|b| format!("{b:02x}")).collect()
    }
}

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
}
