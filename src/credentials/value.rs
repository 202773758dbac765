//! A fetched value before it becomes a version: the text checked to be usable as a header value,
//! its expiry if the source states one, and why a read failed. Shared by every source kind;
//! errors describe the problem, never the content (a half-written JSON file may hold half a secret).

use std::io::ErrorKind;
use std::time::SystemTime;

use crate::config::ValueFormat;
use crate::secret::Secret;
use crate::time::parse_rfc3339;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    #[error("source file does not exist")]
    FileMissing,
    #[error("source file cannot be read ({0})")]
    FileUnreadable(ErrorKind),
    #[error("environment variable is not set")]
    EnvMissing,
    #[error("value is empty")]
    Empty,
    #[error("value is not valid UTF-8")]
    NotUtf8,
    #[error("value contains a line break, NUL or other control character")]
    ControlCharacter,
    #[error("value is not the expected JSON object with a `token` string")]
    BadJson,
    #[error("`expires_at` is not an RFC 3339 timestamp")]
    BadExpiry,
    #[error("command could not be started ({0})")]
    CommandSpawn(ErrorKind),
    #[error("command exited with {status} (stderr: {stderr_bytes} bytes, not shown)")]
    CommandFailed { status: String, stderr_bytes: usize },
    #[error("command timed out")]
    CommandTimeout,
    #[error("token endpoint unreachable: {0}")]
    TokenEndpoint(String),
    #[error("token endpoint answered {0}")]
    TokenStatus(u16),
    #[error("token endpoint response has no usable `access_token`")]
    TokenResponse,
    #[error("token endpoint timed out")]
    TokenTimeout,
    #[error("STS answered {status} {code}")]
    Rejected { status: u16, code: String },
    #[error("private key is not a PEM RSA key (PKCS#1 or PKCS#8)")]
    KeyUnusable,
    #[error("service-account key is not a Google JSON key file with `client_email`, `private_key` and an https `token_uri`")]
    ServiceAccountKey,
    #[error("secret store answered {status}: {reason}")]
    StoreRejected { status: u16, reason: String },
    #[error("secret store answer is not what its API returns")]
    StoreResponse,
    #[error("the answer is larger than 64 KiB")]
    TooLarge,
    #[error("the secret has no string field `{0}`")]
    StoreField(String),
}

/// A value as fetched, before it becomes a version.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub secret: Secret,
    pub expires_at: Option<SystemTime>,
    /// For a token obtained with local inputs (a client secret, a private key): their
    /// fingerprint, so a file event re-mints only when they changed.
    pub inputs: Option<String>,
}

/// Reads a value in `format` from text.
pub fn parse_value(text: &str, format: ValueFormat) -> Result<Fetched, SourceError> {
    match format {
        ValueFormat::Plain => Ok(Fetched {
            secret: Secret::new(normalize(text)?),
            expires_at: None,
            inputs: None,
        }),
        ValueFormat::Json => {
            #[derive(serde::Deserialize)]
            struct TokenJson {
                token: String,
                #[serde(default)]
                expires_at: Option<String>,
            }
            let parsed: TokenJson = serde_json::from_str(text).map_err(|_| SourceError::BadJson)?;
            let expires_at = match parsed.expires_at.as_deref() {
                Some(at) => Some(parse_rfc3339(at).ok_or(SourceError::BadExpiry)?),
                None => None,
            };
            Ok(Fetched {
                secret: Secret::new(normalize(&parsed.token)?),
                expires_at,
                inputs: None,
            })
        }
    }
}

/// Strips one trailing newline (`\n` or `\r\n`), then rejects empty values and any control
/// character: a value with a line break inside would split a header.
pub fn normalize(raw: &str) -> Result<&str, SourceError> {
    let value = raw
        .strip_suffix("\r\n")
        .or_else(|| raw.strip_suffix('\n'))
        .unwrap_or(raw);
    if value.is_empty() {
        return Err(SourceError::Empty);
    }
    if value.chars().any(char::is_control) {
        return Err(SourceError::ControlCharacter);
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_exactly_one_trailing_newline() {
        assert_eq!(normalize("abc\n"), Ok("abc"));
        assert_eq!(normalize("abc\r\n"), Ok("abc"));
        assert_eq!(normalize("abc"), Ok("abc"));
        assert_eq!(normalize("abc\n\n"), Err(SourceError::ControlCharacter));
        assert_eq!(normalize("\n"), Err(SourceError::Empty));
        assert_eq!(normalize("a\0b"), Err(SourceError::ControlCharacter));
        assert_eq!(normalize("a\rb"), Err(SourceError::ControlCharacter));
    }

    #[test]
    fn json_values_carry_their_expiry_and_bad_json_is_an_error() {
        let fetched = parse_value(
            r#"{"token":"t1","expires_at":"2030-01-01T00:00:00Z"}"#,
            ValueFormat::Json,
        )
        .unwrap();
        assert_eq!(fetched.secret.expose(), "t1");
        assert!(fetched.expires_at.is_some());
        assert_eq!(
            parse_value(r#"{"token":"t1""#, ValueFormat::Json).unwrap_err(),
            SourceError::BadJson
        );
        assert_eq!(
            parse_value(r#"{"token":"t","expires_at":"soon"}"#, ValueFormat::Json).unwrap_err(),
            SourceError::BadExpiry
        );
        assert_eq!(
            parse_value(r#"{"token":""}"#, ValueFormat::Json).unwrap_err(),
            SourceError::Empty
        );
    }
}
