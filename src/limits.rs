//! Per-credential rate limits (governor) and the hold an upstream asks for with `429` +
//! `Retry-After`. Over the limit keystamp answers 429 `rate_limited` itself, without contacting
//! the upstream. A `scope: fleet` limit spends tokens the fleet task took from the store's one
//! bucket ahead of time, so the request path never waits on the store; while the store is out
//! of reach it falls back to this pod's share (`per_second` / pods), never to no limit at all.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::time::Instant;

use crate::config::{LimitScope, RateLimitSpec};

/// What an agent over a fleet-wide limit is told to wait: tokens arrive every refill.
const FLEET_RETRY_AFTER: Duration = Duration::from_secs(1);
/// How long a request that found no fleet token in hand waits for refills before its 429: a
/// store round trip usually, a few regular refills (every 100 ms) on a busy pod.
const FLEET_REFILL_WAIT: Duration = Duration::from_millis(300);

/// Rung when a request finds no fleet token in hand: the fleet task refills now instead of at
/// its next tick, so a burst after a quiet spell is served from the store's bucket rather than
/// refused while it still holds tokens.
pub fn fleet_demand() -> &'static tokio::sync::Notify {
    static DEMAND: tokio::sync::Notify = tokio::sync::Notify::const_new();
    &DEMAND
}

pub struct Limits {
    /// What the limiter was built from, so a reload can tell whether to keep it.
    pub spec: Option<RateLimitSpec>,
    limiter: Option<DefaultDirectRateLimiter>,
    /// For `scope: fleet`: tokens granted by the store, and the fallback share.
    fleet: Option<FleetShare>,
    /// Until when the upstream asked this credential's traffic to wait.
    held_until: Mutex<Option<Instant>>,
}

/// A fleet-wide limit as one pod holds it.
struct FleetShare {
    /// Tokens the fleet task took from the store's bucket for this pod, not yet spent.
    granted: AtomicI64,
    /// Requests that asked since the last refill: how many tokens to ask for next.
    demand: AtomicI64,
    /// Whether the store answered the last refill; if not, the fallback decides.
    live: AtomicBool,
    /// Pods the fallback divides the limit by, and its limiter.
    pods: AtomicU32,
    fallback: Mutex<DefaultDirectRateLimiter>,
    /// Woken after every refill the store answered, for requests waiting on one.
    refilled: tokio::sync::Notify,
}

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limits")
            .field("limited", &(self.limiter.is_some() || self.fleet.is_some()))
            .finish()
    }
}

/// The clock rate-limit waits are measured on (the mint rate of task tokens too). One per
/// process: building one calibrates the TSC (a few microseconds of `cpuid`), which 10,000
/// credentials paid 10,000 times at start-up.
pub(crate) fn clock() -> &'static DefaultClock {
    static CLOCK: std::sync::OnceLock<DefaultClock> = std::sync::OnceLock::new();
    CLOCK.get_or_init(DefaultClock::default)
}

fn limiter(per_second: u32, burst: u32) -> DefaultDirectRateLimiter {
    let per_second = NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(burst).unwrap_or(per_second);
    RateLimiter::direct(Quota::per_second(per_second).allow_burst(burst))
}

impl Limits {
    pub fn new(spec: Option<RateLimitSpec>) -> Self {
        let (limiter, fleet) = match spec {
            None => (None, None),
            Some(spec) if spec.scope == LimitScope::Pod => {
                (Some(limiter(spec.per_second, spec.burst)), None)
            }
            Some(spec) => {
                let share = FleetShare {
                    granted: AtomicI64::new(0),
                    demand: AtomicI64::new(0),
                    live: AtomicBool::new(false),
                    pods: AtomicU32::new(1),
                    fallback: Mutex::new(limiter(spec.per_second, spec.burst)),
                    refilled: tokio::sync::Notify::new(),
                };
                (None, Some(share))
            }
        };
        Self {
            spec,
            limiter,
            fleet,
            held_until: Mutex::new(None),
        }
    }

    /// `Err(wait)` when the request must not go upstream now.
    /// A fleet-wide limit with no token in hand asks the fleet task for a refill and waits for
    /// it (at most `FLEET_REFILL_WAIT`) before refusing.
    pub async fn acquire(&self, now: Instant) -> Result<(), Duration> {
        self.unheld(now)?;
        if let Some(fleet) = &self.fleet {
            return fleet.acquire(clock()).await;
        }
        self.local()
    }

    /// `Err(wait)` while the upstream's hold lasts.
    fn unheld(&self, now: Instant) -> Result<(), Duration> {
        if let Ok(held) = self.held_until.lock() {
            if let Some(until) = *held {
                if now < until {
                    return Err(until - now);
                }
            }
        }
        Ok(())
    }

    fn local(&self) -> Result<(), Duration> {
        match &self.limiter {
            Some(limiter) => limiter
                .check()
                .map_err(|not_until| not_until.wait_time_from(clock().now())),
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

    /// An operator closed the breaker, or a new version replaced the one the upstream held:
    /// the hold is over.
    pub fn clear_hold(&self) {
        if let Ok(mut held) = self.held_until.lock() {
            *held = None;
        }
    }

    /// For the fleet task: how many tokens to ask the store for now (`None`: not fleet-wide, or
    /// nothing needed). An idle pod keeps one token in hand and never hoards more, so the
    /// fleet's tokens go where the requests are.
    pub fn fleet_want(&self) -> Option<i64> {
        let fleet = self.fleet.as_ref()?;
        let demand = fleet.demand.swap(0, Ordering::AcqRel);
        let granted = fleet.granted.load(Ordering::Acquire).max(0);
        let want = demand.max(1) - granted;
        (want > 0).then_some(want)
    }

    /// For the fleet task: the store granted `tokens` (or was out of reach: `None`).
    pub fn fleet_granted(&self, tokens: Option<i64>) {
        let Some(fleet) = &self.fleet else { return };
        match tokens {
            Some(tokens) => {
                fleet.granted.fetch_add(tokens, Ordering::AcqRel);
                fleet.live.store(true, Ordering::Release);
                fleet.refilled.notify_waiters();
            }
            None => fleet.live.store(false, Ordering::Release),
        }
    }

    /// For the fleet task: how many pods share the limit while the store is out of reach.
    pub fn set_fleet_pods(&self, pods: u32) {
        let (Some(fleet), Some(spec)) = (&self.fleet, self.spec) else {
            return;
        };
        let pods = pods.max(1);
        if fleet.pods.swap(pods, Ordering::AcqRel) == pods {
            return;
        }
        let share = (spec.per_second / pods).max(1);
        let burst = (spec.burst / pods).max(1);
        if let Ok(mut fallback) = fleet.fallback.lock() {
            *fallback = limiter(share, burst);
        }
    }
}

impl FleetShare {
    fn check(&self, clock: &DefaultClock) -> Result<(), Duration> {
        if !self.live.load(Ordering::Acquire) {
            let Ok(fallback) = self.fallback.lock() else {
                return Err(FLEET_RETRY_AFTER);
            };
            return fallback
                .check()
                .map_err(|not_until| not_until.wait_time_from(clock.now()));
        }
        self.demand.fetch_add(1, Ordering::AcqRel);
        if self.take() {
            Ok(())
        } else {
            Err(FLEET_RETRY_AFTER)
        }
    }

    /// [`check`](Self::check), but with no token in hand it rings the fleet task for a refill
    /// and waits for it once before refusing: a pod at rest holds one token, and without this a
    /// burst of two got a 429 while the fleet's bucket was full.
    async fn acquire(&self, clock: &DefaultClock) -> Result<(), Duration> {
        let refused = match self.check(clock) {
            Err(wait) if self.live.load(Ordering::Acquire) => wait,
            decided => return decided,
        };
        let deadline = tokio::time::Instant::now() + FLEET_REFILL_WAIT;
        loop {
            let refilled = self.refilled.notified();
            tokio::pin!(refilled);
            refilled.as_mut().enable();
            // Registered before looking again, so a refill landing in between is not missed.
            if self.take() {
                return Ok(());
            }
            fleet_demand().notify_one();
            if tokio::time::timeout_at(deadline, refilled).await.is_err() {
                return if self.take() { Ok(()) } else { Err(refused) };
            }
            // That refill was asked for before this request's demand, or others took it: ask
            // again for this one.
            if self.take() {
                return Ok(());
            }
            self.demand.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Spends one granted token, if there is one.
    fn take(&self) -> bool {
        if self.granted.fetch_sub(1, Ordering::AcqRel) > 0 {
            return true;
        }
        self.granted.fetch_add(1, Ordering::AcqRel);
        false
    }
}
