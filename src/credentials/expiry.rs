//! When a credential expires and when to refresh it. Expiry comes from `expires_at` in JSON, the
//! `exp` claim of a JWT-shaped secret, or a token endpoint's `expires_in`; deadlines are kept as
//! `tokio::time::Instant` so refresh logic runs deterministically under a paused clock.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;

/// Never refresh more often than this, whatever the numbers say.
const MIN_REFRESH_DELAY: Duration = Duration::from_secs(1);
const DEFAULT_AHEAD_FLOOR: Duration = Duration::from_secs(300);

/// How long after loading a value with `lifetime` to fetch the next one: when the time left
/// drops below max(10 % of the lifetime, 5 minutes), but never before half the lifetime has
/// passed (a 2-minute token must not refresh in a loop). `refresh_before` replaces the
/// max(...) rule; it is still held to at least 10 % of the lifetime.
pub fn refresh_delay(lifetime: Duration, refresh_before: Option<Duration>) -> Duration {
    let delay = match refresh_before {
        Some(ahead) => lifetime.saturating_sub(ahead).max(lifetime / 10),
        None => {
            let ahead = (lifetime / 10).max(DEFAULT_AHEAD_FLOOR);
            lifetime.saturating_sub(ahead).max(lifetime / 2)
        }
    };
    delay.max(MIN_REFRESH_DELAY)
}

/// The `exp` claim of a JWT-shaped secret (`header.payload.signature`, base64url), if any.
/// The signature is not checked: this only tells when the upstream will stop accepting it.
pub fn jwt_expiry(token: &str) -> Option<SystemTime> {
    let mut parts = token.split('.');
    let (_header, payload, _signature) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?.as_f64()?;
    if !(0.0..1e12).contains(&exp) {
        return None;
    }
    UNIX_EPOCH.checked_add(Duration::from_secs_f64(exp))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn refresh_points_follow_the_rule() {
        // 2 min: 5 min ahead would be immediately; half the lifetime wins.
        assert_eq!(refresh_delay(2 * MIN, None), MIN);
        // 15 min: 5 min ahead.
        assert_eq!(refresh_delay(15 * MIN, None), 10 * MIN);
        // 1 h: 6 min ahead (10 %).
        assert_eq!(refresh_delay(60 * MIN, None), 54 * MIN);
        // 12 h: 72 min ahead.
        assert_eq!(refresh_delay(720 * MIN, None), 648 * MIN);
        // refresh_before overrides, but not into a loop.
        assert_eq!(refresh_delay(60 * MIN, Some(30 * MIN)), 30 * MIN);
        assert_eq!(refresh_delay(60 * MIN, Some(120 * MIN)), 6 * MIN);
        assert_eq!(refresh_delay(Duration::ZERO, None), MIN_REFRESH_DELAY);
    }

    #[test]
    fn reads_the_exp_claim_of_a_jwt() {
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(br#"{"sub":"x","exp":1800000000}"#);
        let token = format!("eyJhbGciOiJub25lIn0.{payload}.sig");
        assert_eq!(
            jwt_expiry(&token),
            Some(UNIX_EPOCH + Duration::from_secs(1_800_000_000))
        );
        assert_eq!(jwt_expiry("not-a-jwt"), None);
        assert_eq!(jwt_expiry("a.b.c"), None);
    }
}
