//! Wall-clock time as config, logs and `/status` write it: RFC 3339 in and out; and the one
//! checked conversion for a duration someone else chose (a store message, an upstream's
//! `Retry-After`, a token service's lifetime), which must neither overflow nor outlast what
//! this pod's config allows. Deciding and scheduling use `tokio::time::Instant` elsewhere.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;

/// `amount` of `unit` from outside, capped at `max`: `u64::MAX` seconds is `max`, never a panic.
pub fn capped(amount: u64, unit: Unit, max: Duration) -> Duration {
    let duration = match unit {
        Unit::Seconds => Duration::from_secs(amount),
        Unit::Millis => Duration::from_millis(amount),
    };
    duration.min(max)
}

/// The unit a foreign duration is written in.
#[derive(Debug, Clone, Copy)]
pub enum Unit {
    Seconds,
    Millis,
}

/// `now + wait`, or the farthest instant the clock can hold when that overflows.
pub fn deadline(now: Instant, wait: Duration) -> Instant {
    now.checked_add(wait).unwrap_or_else(|| far_future(now))
}

fn far_future(now: Instant) -> Instant {
    // A century is past any hold or lease keystamp keeps; halve until the clock can hold it.
    let mut ahead = Duration::from_secs(100 * 365 * 24 * 3600);
    loop {
        if let Some(at) = now.checked_add(ahead) {
            return at;
        }
        ahead /= 2;
        if ahead.is_zero() {
            return now;
        }
    }
}

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
    fn foreign_durations_are_capped_and_never_overflow() {
        let hour = Duration::from_secs(3600);
        assert_eq!(capped(u64::MAX, Unit::Seconds, hour), hour);
        assert_eq!(capped(u64::MAX, Unit::Millis, hour), hour);
        assert_eq!(capped(30, Unit::Seconds, hour), Duration::from_secs(30));
        let now = Instant::now();
        assert!(deadline(now, Duration::MAX) > now + hour);
        assert_eq!(deadline(now, hour), now + hour);
    }

    #[test]
    fn rfc3339_round_trips() {
        let at = parse_rfc3339("2026-11-27T16:00:00Z").unwrap();
        assert_eq!(format_rfc3339(at), "2026-11-27T16:00:00Z");
        assert!(parse_rfc3339("tomorrow").is_none());
    }
}
