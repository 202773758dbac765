//! The per-credential auth circuit breaker. After `failures` consecutive auth failures from the
//! upstream it opens: nothing reaches the upstream with that credential and agents get a clear
//! 503 instead of hammering a key the auth service is about to lock. After `open_for` exactly
//! one probe goes through (half-open); a probe that is not an auth failure closes it, a failed
//! probe doubles the wait up to `max_open_for`. A new version of the credential closes it at once.
//!
//! The closed state is checked with one atomic load: no lock is shared across credentials, and
//! a breaker's own lock is only taken when it is not closed or when an auth failure is recorded.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::BreakerSettings;
use crate::telemetry::CredentialCounters;

/// How long other requests are told to wait while a probe is in flight.
const PROBE_RETRY_AFTER: Duration = Duration::from_secs(1);

/// The states, encoded as the `keystamp_breaker_state` gauge reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed = 0,
    Open = 1,
    HalfOpen = 2,
}

impl BreakerState {
    pub fn label(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }

    fn from_u8(value: u8) -> Self {
        match value {
            1 => BreakerState::Open,
            2 => BreakerState::HalfOpen,
            _ => BreakerState::Closed,
        }
    }
}

/// What the breaker lets a request do.
#[derive(Debug)]
pub enum Admission {
    /// Closed: go ahead. `generation` ties the outcome to the version it was admitted under.
    Pass { generation: u64 },
    /// Half-open: this request is the one probe.
    Probe { generation: u64 },
    /// Open, or a probe is already in flight.
    Reject(Rejection),
}

/// Why a request was not let through, for the agent's 503.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub retry_after: Duration,
    pub reason: String,
    /// The version the upstream rejected.
    pub fingerprint: Option<String>,
}

/// What the upstream said, as far as the breaker cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The upstream said the credential itself is bad (401, or a 403 that says so; `marker`:
    /// which of the route's `auth_failure_markers` said it, e.g. AWS `ExpiredToken`).
    AuthFailure {
        status: u16,
        marker: Option<Arc<str>>,
    },
    /// Anything else the upstream answered: success, permission 403s, 429s, 5xx.
    NotAuthFailure,
}

#[derive(Debug)]
struct Inner {
    open_until: Instant,
    /// The current open period (doubles on each failed probe).
    open_for: Duration,
    probe_in_flight: bool,
    reason: String,
    fingerprint: Option<String>,
    /// Forced open by an operator: stays open until closed by hand or a new version arrives.
    forced: bool,
    /// That operator proved the admin token: only a close with the same proof undoes it.
    forced_by_admin: bool,
    /// Opened by the fleet: after `open_until` this pod still waits until the fleet's one probe
    /// lease is its own (or another pod's probe closes it).
    fleet_held: bool,
    jitter_seed: u64,
}

/// What a breaker tells the fleet about its credential, when a fleet is configured. Sent without
/// waiting; a full queue drops the event (the local breaker still protects this pod).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BreakerEvent {
    /// The upstream rejected version `fingerprint` (counted fleet-wide).
    AuthFailure {
        credential: Arc<str>,
        fingerprint: String,
    },
    /// A request with `fingerprint` succeeded after failures: the fleet count starts over.
    Recovered {
        credential: Arc<str>,
        fingerprint: String,
    },
    /// This pod's breaker opened on its own evidence (local failures, a failed probe).
    Opened {
        credential: Arc<str>,
        fingerprint: String,
        reason: String,
        open_for: Duration,
    },
    /// This pod's probe succeeded: the credential works again.
    Closed {
        credential: Arc<str>,
        fingerprint: String,
    },
}

pub type BreakerEvents = tokio::sync::mpsc::Sender<BreakerEvent>;

/// Who asked for a manual switch: an operator who proved the `admin_token`, or anyone else who
/// reached the admin listener or the store (no `admin_token` configured, a store message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Authority {
    AdminToken,
    Unproven,
}

pub struct Breaker {
    credential: Arc<str>,
    settings: BreakerSettings,
    state: AtomicU8,
    /// Bumped whenever the breaker is reset, so outcomes of requests admitted before a rotation
    /// do not count against the new version.
    generation: AtomicU64,
    /// Consecutive auth failures while closed.
    consecutive: AtomicU32,
    inner: Mutex<Inner>,
    /// The credential's metric series (state gauge, transitions).
    series: Arc<CredentialCounters>,
    /// Where fleet-relevant events go, when keystamp is part of a fleet.
    events: Option<BreakerEvents>,
}

impl std::fmt::Debug for Breaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Breaker")
            .field("credential", &self.credential)
            .field("state", &self.state())
            .finish()
    }
}

impl Breaker {
    pub fn new(
        credential: Arc<str>,
        settings: BreakerSettings,
        series: Arc<CredentialCounters>,
        events: Option<BreakerEvents>,
    ) -> Self {
        let jitter_seed = credential.bytes().fold(0x9e37_79b9_7f4a_7c15_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        Self {
            credential,
            settings,
            state: AtomicU8::new(BreakerState::Closed as u8),
            generation: AtomicU64::new(0),
            consecutive: AtomicU32::new(0),
            inner: Mutex::new(Inner {
                open_until: Instant::now(),
                open_for: settings.open_for,
                probe_in_flight: false,
                reason: String::new(),
                fingerprint: None,
                forced: false,
                forced_by_admin: false,
                fleet_held: false,
                jitter_seed,
            }),
            series,
            events,
        }
    }

    fn emit(&self, event: impl FnOnce(Arc<str>) -> BreakerEvent) {
        if let Some(events) = &self.events {
            let _ = events.try_send(event(self.credential.clone()));
        }
    }

    pub fn state(&self) -> BreakerState {
        BreakerState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// Decides whether a request may go upstream now.
    pub fn admit(&self, now: Instant) -> Admission {
        let generation = self.generation.load(Ordering::Acquire);
        if self.state() == BreakerState::Closed {
            return Admission::Pass { generation };
        }
        let Ok(mut inner) = self.inner.lock() else {
            return Admission::Pass { generation };
        };
        match self.state() {
            BreakerState::Closed => Admission::Pass { generation },
            BreakerState::Open if inner.fleet_held && now >= inner.open_until => {
                // The fleet's one probe belongs to another pod for now.
                Admission::Reject(Rejection {
                    retry_after: PROBE_RETRY_AFTER,
                    reason: inner.reason.clone(),
                    fingerprint: inner.fingerprint.clone(),
                })
            }
            BreakerState::Open if inner.forced || now < inner.open_until => {
                Admission::Reject(Rejection {
                    retry_after: if inner.forced {
                        inner.open_for
                    } else {
                        inner.open_until - now
                    },
                    reason: inner.reason.clone(),
                    fingerprint: inner.fingerprint.clone(),
                })
            }
            BreakerState::Open => {
                inner.probe_in_flight = true;
                self.transition(BreakerState::HalfOpen);
                Admission::Probe { generation }
            }
            BreakerState::HalfOpen if inner.probe_in_flight => Admission::Reject(Rejection {
                retry_after: PROBE_RETRY_AFTER,
                reason: inner.reason.clone(),
                fingerprint: inner.fingerprint.clone(),
            }),
            BreakerState::HalfOpen => {
                inner.probe_in_flight = true;
                Admission::Probe { generation }
            }
        }
    }

    /// Records the upstream's verdict for a request admitted as `admission`, made with the
    /// version `fingerprint`. `None`: no verdict (the upstream was never reached), which only
    /// frees the probe slot.
    pub fn record(
        &self,
        admission: &Admission,
        verdict: Option<Verdict>,
        fingerprint: &str,
        now: Instant,
    ) {
        let (generation, probe) = match admission {
            Admission::Pass { generation } => (*generation, false),
            Admission::Probe { generation } => (*generation, true),
            Admission::Reject(_) => return,
        };
        // The common case, closed and fine, takes no lock (and writes nothing when no failure
        // was counted).
        let auth_failure = matches!(verdict, Some(Verdict::AuthFailure { .. }));
        if !probe && !auth_failure && self.state() == BreakerState::Closed {
            if verdict.is_some() && self.consecutive.load(Ordering::Relaxed) != 0 {
                self.consecutive.store(0, Ordering::Relaxed);
                self.emit(|credential| BreakerEvent::Recovered {
                    credential,
                    fingerprint: fingerprint.to_string(),
                });
            }
            return;
        }
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        if generation != self.generation.load(Ordering::Acquire) {
            // Admitted before a new version arrived: says nothing about the new one.
            return;
        }
        match (probe, verdict) {
            (true, Some(Verdict::AuthFailure { status, marker })) => {
                inner.probe_in_flight = false;
                inner.open_for = (inner.open_for * 2).min(self.settings.max_open_for);
                let reason = format!("probe got upstream {status}{}", said(marker.as_deref()));
                self.open_on_evidence(&mut inner, reason, fingerprint, now);
            }
            (true, Some(Verdict::NotAuthFailure)) => {
                self.close(&mut inner);
                self.emit(|credential| BreakerEvent::Closed {
                    credential,
                    fingerprint: fingerprint.to_string(),
                });
            }
            (true, None) => inner.probe_in_flight = false,
            (false, Some(Verdict::AuthFailure { status, marker })) => {
                let consecutive = self.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
                self.emit(|credential| BreakerEvent::AuthFailure {
                    credential,
                    fingerprint: fingerprint.to_string(),
                });
                if self.state() == BreakerState::Closed && consecutive >= self.settings.failures {
                    inner.open_for = self.settings.open_for;
                    let reason = format!(
                        "upstream {status}{} x{consecutive}",
                        said(marker.as_deref())
                    );
                    self.open_on_evidence(&mut inner, reason, fingerprint, now);
                    tracing::warn!(credential = %self.credential, reason = %inner.reason, fingerprint, "auth circuit breaker opened");
                }
            }
            (false, Some(Verdict::NotAuthFailure)) => {
                if self.state() == BreakerState::Closed {
                    self.consecutive.store(0, Ordering::Relaxed);
                }
            }
            (false, None) => {}
        }
    }

    /// A new version was published: start closed at once, whatever happened before.
    pub fn reset(&self) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        self.generation.fetch_add(1, Ordering::AcqRel);
        inner.forced = false;
        inner.forced_by_admin = false;
        inner.fleet_held = false;
        if self.state() != BreakerState::Closed {
            tracing::info!(credential = %self.credential, "new credential version; breaker closed");
        }
        self.close(&mut inner);
    }

    /// Incident response: a leaked key. Stays open until closed by hand or rotated.
    pub fn force_open(&self, now: Instant, authority: Authority) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        inner.forced = true;
        inner.forced_by_admin |= authority == Authority::AdminToken;
        inner.reason = "forced open by an operator".into();
        self.open(&mut inner, now);
    }

    /// Closes by hand. Refused (`false`) when an open proved by the admin token would be undone
    /// by a close that does not prove it (a message forged into the fleet's store, say).
    pub fn force_close(&self, authority: Authority) -> bool {
        let Ok(mut inner) = self.inner.lock() else {
            return false;
        };
        if inner.forced_by_admin && authority != Authority::AdminToken {
            return false;
        }
        inner.forced = false;
        inner.forced_by_admin = false;
        inner.fleet_held = false;
        self.close(&mut inner);
        true
    }

    /// The fleet saw version `fingerprint` fail `failures` times (on any pods): open here too,
    /// held until the fleet's one probe decides.
    pub fn fleet_open(&self, fingerprint: &str, reason: &str, open_for: Duration, now: Instant) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        if inner.forced || self.state() == BreakerState::HalfOpen {
            return;
        }
        inner.fleet_held = true;
        inner.open_for = open_for.max(inner.open_for);
        inner.reason = format!("{reason} (fleet)");
        inner.fingerprint = Some(fingerprint.to_string());
        inner.open_until = inner.open_until.max(crate::time::deadline(now, open_for));
        inner.probe_in_flight = false;
        self.transition(BreakerState::Open);
    }

    /// When a fleet-held breaker's open period ends: the moment to ask for the probe lease.
    pub fn fleet_probe_due(&self, now: Instant) -> Option<String> {
        // The fleet task asks every breaker ten times a second: a closed one answers from the
        // atomic state, without its lock.
        if self.state() != BreakerState::Open {
            return None;
        }
        let inner = self.inner.lock().ok()?;
        let due = inner.fleet_held && self.state() == BreakerState::Open && now >= inner.open_until;
        due.then(|| inner.fingerprint.clone()).flatten()
    }

    /// This pod holds the fleet's probe lease: its next request may probe.
    pub fn fleet_release_for_probe(&self) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.fleet_held = false;
        }
    }

    /// Another pod's probe of `fingerprint` succeeded: close here too (unless forced).
    pub fn fleet_close(&self, fingerprint: &str) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        let same_version = inner.fingerprint.as_deref() == Some(fingerprint);
        if inner.forced || !same_version || self.state() == BreakerState::Closed {
            return;
        }
        inner.fleet_held = false;
        self.close(&mut inner);
    }

    /// Whether the fleet holds this breaker open.
    pub fn fleet_held(&self) -> bool {
        self.inner.lock().is_ok_and(|inner| inner.fleet_held)
    }

    /// Seconds until the breaker lets a probe through, while open.
    pub fn retry_after(&self, now: Instant) -> Option<Duration> {
        let inner = self.inner.lock().ok()?;
        (self.state() != BreakerState::Closed)
            .then(|| inner.open_until.saturating_duration_since(now))
    }

    /// Opens on this pod's own evidence (local failures, a failed probe) and tells the fleet.
    fn open_on_evidence(&self, inner: &mut Inner, reason: String, fingerprint: &str, now: Instant) {
        inner.reason = reason.clone();
        inner.fingerprint = Some(fingerprint.to_string());
        self.open(inner, now);
        let open_for = inner.open_for;
        self.emit(|credential| BreakerEvent::Opened {
            credential,
            fingerprint: fingerprint.to_string(),
            reason,
            open_for,
        });
    }

    fn open(&self, inner: &mut Inner, now: Instant) {
        let period = if self.settings.jitter {
            jittered(inner.open_for, &mut inner.jitter_seed)
        } else {
            inner.open_for
        };
        inner.open_until = now + period;
        inner.probe_in_flight = false;
        self.transition(BreakerState::Open);
    }

    fn close(&self, inner: &mut Inner) {
        self.consecutive.store(0, Ordering::Relaxed);
        inner.probe_in_flight = false;
        inner.open_for = self.settings.open_for;
        inner.reason.clear();
        inner.fingerprint = None;
        self.transition(BreakerState::Closed);
    }

    fn transition(&self, to: BreakerState) {
        let from = BreakerState::from_u8(self.state.swap(to as u8, Ordering::AcqRel));
        if from == to {
            return;
        }
        self.series.breaker_moved(to.label(), to as i64);
    }
}

/// `period` spread by up to ±20 %, so a fleet of sidecars does not probe in lockstep.
fn jittered(period: Duration, seed: &mut u64) -> Duration {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    let unit = (*seed % 10_000) as f64 / 10_000.0;
    period.mul_f64(0.8 + 0.4 * unit)
}

/// ` (InvalidClientTokenId)` when a marker said why, for the breaker's reason.
fn said(marker: Option<&str>) -> String {
    marker.map_or_else(String::new, |m| format!(" ({m})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Arc<Breaker> {
        let settings = BreakerSettings {
            failures: 5,
            open_for: Duration::from_secs(30),
            max_open_for: Duration::from_secs(300),
            max_hold: Duration::from_secs(3600),
            jitter: false,
        };
        Arc::new(Breaker::new(Arc::from("k"), settings, Arc::default(), None))
    }

    fn fail(b: &Breaker) {
        let admission = b.admit(Instant::now());
        b.record(
            &admission,
            Some(Verdict::AuthFailure {
                status: 401,
                marker: None,
            }),
            "fp1",
            Instant::now(),
        );
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_five_failures_probes_once_and_doubles_on_a_failed_probe() {
        let b = breaker();
        for _ in 0..4 {
            fail(&b);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        fail(&b);
        assert_eq!(b.state(), BreakerState::Open);
        let Admission::Reject(rejection) = b.admit(Instant::now()) else {
            panic!("must reject")
        };
        assert_eq!(rejection.retry_after, Duration::from_secs(30));
        assert_eq!(rejection.reason, "upstream 401 x5");
        assert_eq!(rejection.fingerprint.as_deref(), Some("fp1"));

        tokio::time::advance(Duration::from_secs(30)).await;
        // 50 concurrent requests: exactly one probe.
        let admissions: Vec<Admission> = futures_util::future::join_all((0..50).map(|_| {
            let b = b.clone();
            async move { b.admit(Instant::now()) }
        }))
        .await;
        let probes: Vec<&Admission> = admissions
            .iter()
            .filter(|a| matches!(a, Admission::Probe { .. }))
            .collect();
        assert_eq!(probes.len(), 1);
        assert_eq!(b.state(), BreakerState::HalfOpen);

        // The probe fails: open for twice as long.
        b.record(
            probes[0],
            Some(Verdict::AuthFailure {
                status: 401,
                marker: None,
            }),
            "fp1",
            Instant::now(),
        );
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.retry_after(Instant::now()), Some(Duration::from_secs(60)));
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(matches!(b.admit(Instant::now()), Admission::Reject(_)));
        tokio::time::advance(Duration::from_secs(1)).await;
        let probe = b.admit(Instant::now());
        assert!(matches!(probe, Admission::Probe { .. }));
        // A probe that is not an auth failure closes it.
        b.record(&probe, Some(Verdict::NotAuthFailure), "fp1", Instant::now());
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(matches!(b.admit(Instant::now()), Admission::Pass { .. }));
    }

    #[tokio::test(start_paused = true)]
    async fn the_wait_doubles_up_to_the_cap_and_rotation_closes_at_once() {
        let b = breaker();
        for _ in 0..5 {
            fail(&b);
        }
        let mut expected = 30;
        for _ in 0..6 {
            tokio::time::advance(Duration::from_secs(expected)).await;
            let probe = b.admit(Instant::now());
            b.record(
                &probe,
                Some(Verdict::AuthFailure {
                    status: 401,
                    marker: None,
                }),
                "fp1",
                Instant::now(),
            );
            expected = (expected * 2).min(300);
            assert_eq!(
                b.retry_after(Instant::now()),
                Some(Duration::from_secs(expected))
            );
        }
        b.reset();
        assert_eq!(b.state(), BreakerState::Closed);
        // A failure admitted before the reset does not count against the new version.
        let stale = Admission::Pass { generation: 0 };
        for _ in 0..10 {
            b.record(
                &stale,
                Some(Verdict::AuthFailure {
                    status: 401,
                    marker: None,
                }),
                "fp1",
                Instant::now(),
            );
        }
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn success_resets_the_count_and_forced_open_waits_for_an_operator() {
        let b = breaker();
        for _ in 0..4 {
            fail(&b);
        }
        let ok = b.admit(Instant::now());
        b.record(&ok, Some(Verdict::NotAuthFailure), "fp1", Instant::now());
        for _ in 0..4 {
            fail(&b);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        b.force_open(Instant::now(), Authority::AdminToken);
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert!(matches!(b.admit(Instant::now()), Admission::Reject(_)));
        assert!(!b.force_close(Authority::Unproven), "an unproven close");
        assert!(matches!(b.admit(Instant::now()), Admission::Reject(_)));
        assert!(b.force_close(Authority::AdminToken));
        assert!(matches!(b.admit(Instant::now()), Admission::Pass { .. }));
    }
}
