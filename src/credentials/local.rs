//! Reading a file or environment variable source: a plain or JSON value (one trailing newline
//! stripped, checked to be usable in a header), or key material taken as it is. Secret files are
//! small and local (tmpfs in a pod), so these are plain blocking reads; a thread-pool hop per
//! file made a 10,000-credential reload take a second.

use std::io::ErrorKind;

use crate::config::SourceSpec;
use crate::credentials::expiry::jwt_expiry;
use crate::credentials::value::{parse_value, Fetched, SourceError};
use crate::secret::Secret;

/// Reads a file or environment source (`None` for any other kind).
pub fn read_plain(source: &SourceSpec) -> Option<Result<Fetched, SourceError>> {
    let fetched = match source {
        SourceSpec::File { path, format } => match std::fs::read(path) {
            Ok(bytes) => String::from_utf8(bytes)
                .map_err(|_| SourceError::NotUtf8)
                .and_then(|text| parse_value(&text, *format)),
            Err(e) if e.kind() == ErrorKind::NotFound => Err(SourceError::FileMissing),
            Err(e) => Err(SourceError::FileUnreadable(e.kind())),
        },
        SourceSpec::Env { var, format } => match std::env::var(var) {
            Ok(value) => parse_value(&value, *format),
            Err(std::env::VarError::NotPresent) => Err(SourceError::EnvMissing),
            Err(std::env::VarError::NotUnicode(_)) => Err(SourceError::NotUtf8),
        },
        _ => return None,
    };
    Some(fetched.map(with_jwt_expiry))
}

/// Key material (a PEM key, a JSON key file) from a file or environment variable, as it is:
/// line breaks are part of it.
pub fn read_key_material(source: &SourceSpec) -> Result<Secret, SourceError> {
    let text = match source {
        SourceSpec::File { path, .. } => match std::fs::read(path) {
            Ok(bytes) => String::from_utf8(bytes).map_err(|_| SourceError::NotUtf8)?,
            Err(e) if e.kind() == ErrorKind::NotFound => return Err(SourceError::FileMissing),
            Err(e) => return Err(SourceError::FileUnreadable(e.kind())),
        },
        SourceSpec::Env { var, .. } => match std::env::var(var) {
            Ok(value) => value,
            Err(std::env::VarError::NotPresent) => return Err(SourceError::EnvMissing),
            Err(std::env::VarError::NotUnicode(_)) => return Err(SourceError::NotUtf8),
        },
        _ => return Err(SourceError::KeyUnusable),
    };
    if text.trim().is_empty() {
        return Err(SourceError::Empty);
    }
    Ok(Secret::new(text))
}

/// A JWT-shaped secret without a stated expiry expires at its `exp` claim.
pub fn with_jwt_expiry(mut fetched: Fetched) -> Fetched {
    if fetched.expires_at.is_none() {
        fetched.expires_at = jwt_expiry(fetched.secret.expose());
    }
    fetched
}
