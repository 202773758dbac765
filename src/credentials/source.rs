//! Reading one secret from its source (a file or an environment variable) and checking it is
//! usable as a header value. Errors describe the problem, never the content.

use std::io::ErrorKind;

use crate::config::SourceSpec;
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
}

/// Reads the current value of `source`.
pub fn read_source(source: &SourceSpec) -> Result<Secret, SourceError> {
    let raw = match source {
        SourceSpec::File(path) => match std::fs::read(path) {
            Ok(bytes) => String::from_utf8(bytes).map_err(|_| SourceError::NotUtf8)?,
            Err(e) if e.kind() == ErrorKind::NotFound => return Err(SourceError::FileMissing),
            Err(e) => return Err(SourceError::FileUnreadable(e.kind())),
        },
        SourceSpec::Env(var) => match std::env::var(var) {
            Ok(value) => value,
            Err(std::env::VarError::NotPresent) => return Err(SourceError::EnvMissing),
            Err(std::env::VarError::NotUnicode(_)) => return Err(SourceError::NotUtf8),
        },
    };
    normalize(&raw).map(Secret::new)
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
}
