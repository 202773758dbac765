//! Fetching one secret from its source: a file, an environment variable, a command's stdout, or
//! an OAuth2 token endpoint. Values are checked to be usable as header values. Errors describe
//! the problem, never the content (a half-written JSON file may hold half a secret).

use std::io::ErrorKind;
use std::process::Stdio;
use std::time::SystemTime;

use crate::config::{CommandSpec, SourceSpec, ValueFormat};
use crate::credentials::expiry::{jwt_expiry, parse_rfc3339};
use crate::credentials::oauth;
use crate::proxy::upstream::Upstream;
use crate::secret::Secret;

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
}

/// A value as fetched, before it becomes a version.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub secret: Secret,
    pub expires_at: Option<SystemTime>,
}

/// Fetches the current value of `source`. `upstream` reaches token endpoints over the same
/// verified TLS (and `resolve:` pins) as upstream APIs.
pub async fn fetch(source: &SourceSpec, upstream: &Upstream) -> Result<Fetched, SourceError> {
    let fetched = match source {
        SourceSpec::File { .. } | SourceSpec::Env { .. } => {
            return read_local(source).unwrap_or(Err(SourceError::Empty))
        }
        SourceSpec::Command(spec) => run_command(spec).await?,
        SourceSpec::OAuth2(spec) => oauth::fetch_token(spec, upstream).await?,
    };
    Ok(with_jwt_expiry(fetched))
}

/// Reads a file or environment source without waiting on anything (`None` for the others).
/// Secret files are small and local (tmpfs in a pod), so this is a plain blocking read; a
/// thread-pool hop per file made a 10,000-credential reload take a second.
pub fn read_local(source: &SourceSpec) -> Option<Result<Fetched, SourceError>> {
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
        SourceSpec::Command(_) | SourceSpec::OAuth2(_) => return None,
    };
    Some(fetched.map(with_jwt_expiry))
}

/// A JWT-shaped secret without a stated expiry expires at its `exp` claim.
fn with_jwt_expiry(mut fetched: Fetched) -> Fetched {
    if fetched.expires_at.is_none() {
        fetched.expires_at = jwt_expiry(fetched.secret.expose());
    }
    fetched
}

/// Reads a value in `format` from text.
pub fn parse_value(text: &str, format: ValueFormat) -> Result<Fetched, SourceError> {
    match format {
        ValueFormat::Plain => Ok(Fetched {
            secret: Secret::new(normalize(text)?),
            expires_at: None,
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
            })
        }
    }
}

/// Runs the command (no shell) and reads its stdout. Its stderr is counted, never logged: a
/// failing credential helper may print the secret it was handling.
async fn run_command(spec: &CommandSpec) -> Result<Fetched, SourceError> {
    let (program, args) = spec
        .argv
        .split_first()
        .ok_or(SourceError::CommandSpawn(ErrorKind::InvalidInput))?;
    let child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| SourceError::CommandSpawn(e.kind()))?;
    let output = tokio::time::timeout(spec.timeout, child.wait_with_output())
        .await
        .map_err(|_| SourceError::CommandTimeout)?
        .map_err(|e| SourceError::CommandSpawn(e.kind()))?;
    if !output.status.success() {
        return Err(SourceError::CommandFailed {
            status: output.status.to_string(),
            stderr_bytes: output.stderr.len(),
        });
    }
    let stdout = String::from_utf8(output.stdout).map_err(|_| SourceError::NotUtf8)?;
    parse_value(&stdout, spec.format)
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
