//! Per-credential rate limits (governor) and the hold an upstream asks for with `429` +
//! `Retry-After`. Over the limit keystamp answers 429 `rate_limited` itself, without contacting
//! the upstream.

use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::time::Instant;

use crate::config::RateLimitSpec;

pub struct Limits {
    /// What the limiter was built from, so a reload can tell whether to keep it.
    pub spec: Option<RateLimitSpec>,
    limiter: Option<DefaultDirectRateLimiter>,
    clock: DefaultClock,
    /// Until when the upstream asked this credential's traffic to wait.
    held_until: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limits")
            .field("limited", &self.limiter.is_some())
            .finish()
    }
}

impl Limits {
    pub fn new(spec: Option<RateLimitSpec>) -> Self {
        let limiter = spec.map(|spec| {
            let per_second = NonZeroU32::new(spec.per_second).unwrap_or(NonZeroU32::MIN);
            let burst = NonZeroU32::new(spec.burst).unwrap_or(per_second);
            RateLimiter::direct(Quota::per_second(per_second).allow_burst(burst))
        });
        Self {
            spec,
            limiter,
            clock: DefaultClock::default(),
            held_until: Mutex::new(None),
        }
    }

    /// `Err(wait)` when the request must not go upstream now.
    pub fn check(&self, now: Instant) -> Result<(), Duration> {
        if let Ok(held) = self.held_until.lock() {
            if let Some(until) = *held {
                if now < until {
                    return Err(until - now);
                }
            }
        }
        match &self.limiter {
            Some(limiter) => limiter
                .check()
                .map_err(|not_until| not_until.wait_time_from(self.clock.now())),
            None => Ok(()),
        }
    }

    /// The upstream answered 429 with `Retry-After`: hold this credential's traffic that long.
    pub fn hold(&self, until: Instant) {
        if let Ok(mut held) = self.held_until.lock() {
            if held.is_none_or(|current| current < until) {
                *held = Some(until);
            }
        }
    }
}
