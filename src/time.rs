//! Wall-clock time as config, logs and `/status` write it: RFC 3339 in and out. Deciding and
//! scheduling use `tokio::time::Instant` elsewhere; this module only converts for people.

use std::time::SystemTime;

/// Parses an RFC 3339 timestamp (`2026-11-27T16:00:00Z`).
pub fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    let parsed =
        ::time::OffsetDateTime::parse(text, &::time::format_description::well_known::Rfc3339)
            .ok()?;
    Some(SystemTime::from(parsed))
}

/// Formats a wall-clock time as RFC 3339 for logs and `/status`.
pub fn format_rfc3339(at: SystemTime) -> String {
    ::time::OffsetDateTime::from(at)
        .format(&::time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips() {
        let at = parse_rfc3339("2026-11-27T16:00:00Z").unwrap();
        assert_eq!(format_rfc3339(at), "2026-11-27T16:00:00Z");
        assert!(parse_rfc3339("tomorrow").is_none());
    }
}
