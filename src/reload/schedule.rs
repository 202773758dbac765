//! When each credential is next read: at its refresh point ahead of expiry, on a command's
//! `refresh_every`, or after a failure with backoff (1 s doubling to 60 s). Pure: it is told the
//! outcome of each read and the time, and answers what is due; it performs no I/O.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::SourceSpec;
use crate::credentials::expiry::refresh_delay;
use crate::credentials::{Credential, ReadOutcome};

const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// When a credential is next read, and how long the last retry waited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Scheduled {
    at: Instant,
    backoff: Option<Duration>,
}

/// Every credential that has a next read planned.
#[derive(Debug, Default)]
pub struct Schedule {
    planned: HashMap<Arc<str>, Scheduled>,
}

impl Schedule {
    /// Plans `credential`'s next read from what its last read did.
    pub fn after_read(&mut self, credential: &Credential, outcome: ReadOutcome, now: Instant) {
        let polled = credential.spec.source.is_remote()
            || matches!(credential.spec.source, SourceSpec::Command(_));
        self.plan(
            &credential.name,
            outcome,
            natural_next(credential, now),
            polled,
            now,
        );
    }

    /// The rule itself. `natural`: when the next read is due if all goes well; `polled`: the
    /// source cannot be watched (a command, a token endpoint), so a failure is retried.
    fn plan(
        &mut self,
        name: &Arc<str>,
        outcome: ReadOutcome,
        natural: Option<Instant>,
        polled: bool,
        now: Instant,
    ) {
        let backoff = || {
            let previous = self.planned.get(name).and_then(|s| s.backoff);
            let wait = previous.map_or(FIRST_BACKOFF, |b| (b * 2).min(MAX_BACKOFF));
            Scheduled {
                at: now + wait,
                backoff: Some(wait),
            }
        };
        let next = match outcome {
            ReadOutcome::Failed if polled || natural.is_some() => Some(backoff()),
            ReadOutcome::Failed => None,
            // Past the refresh point and the source still holds the same value: poll, backing off.
            ReadOutcome::Unchanged if natural.is_some_and(|at| at <= now) => Some(backoff()),
            ReadOutcome::Unchanged | ReadOutcome::Changed => {
                natural.map(|at| Scheduled { at, backoff: None })
            }
        };
        match next {
            Some(next) => {
                self.planned.insert(name.clone(), next);
            }
            None => {
                self.planned.remove(name);
            }
        }
    }

    /// Forgets a credential (dropped, or redefined and about to be planned afresh).
    pub fn forget(&mut self, name: &str) {
        self.planned.remove(name);
    }

    /// The earliest planned read.
    pub fn next_at(&self) -> Option<Instant> {
        self.planned.values().map(|s| s.at).min()
    }

    /// Every credential whose read is due at `now`.
    pub fn due(&self, now: Instant) -> Vec<Arc<str>> {
        self.planned
            .iter()
            .filter(|(_, s)| s.at <= now)
            .map(|(name, _)| name.clone())
            .collect()
    }
}

/// When a credential would next be read if all goes well: its refresh point before expiry, or
/// a command's `refresh_every`, whichever comes first.
fn natural_next(credential: &Credential, now: Instant) -> Option<Instant> {
    let ahead_of_expiry = credential.current.as_ref().and_then(|version| {
        let expiry = version.expiry?;
        Some(version.loaded + refresh_delay(expiry.lifetime, credential.spec.refresh_before))
    });
    let periodic = match &credential.spec.source {
        SourceSpec::Command(command) => command.refresh_every.map(|every| now + every),
        source if source.is_secret_store() => source.store_poll().map(|poll| now + poll),
        _ => None,
    };
    match (ahead_of_expiry, periodic) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn name() -> Arc<str> {
        Arc::from("token")
    }

    #[tokio::test(start_paused = true)]
    async fn failures_of_a_polled_source_back_off_doubling_to_a_minute() {
        let mut schedule = Schedule::default();
        let mut waits = Vec::new();
        for _ in 0..9 {
            let now = Instant::now();
            schedule.plan(&name(), ReadOutcome::Failed, None, true, now);
            let at = schedule.next_at().unwrap();
            waits.push((at - now).as_secs());
            tokio::time::advance(at - now).await;
            assert_eq!(schedule.due(Instant::now()), vec![name()]);
        }
        assert_eq!(waits, vec![1, 2, 4, 8, 16, 32, 60, 60, 60]);
        // A success resets the backoff and plans the natural refresh.
        let now = Instant::now();
        let natural = now + 600 * SECOND;
        schedule.plan(&name(), ReadOutcome::Changed, Some(natural), true, now);
        assert_eq!(schedule.next_at(), Some(natural));
        schedule.plan(&name(), ReadOutcome::Failed, Some(natural), true, now);
        assert_eq!(schedule.next_at(), Some(now + SECOND));
    }

    #[tokio::test(start_paused = true)]
    async fn a_watched_source_without_expiry_is_not_polled() {
        let mut schedule = Schedule::default();
        let now = Instant::now();
        schedule.plan(&name(), ReadOutcome::Failed, None, false, now);
        assert_eq!(schedule.next_at(), None);
        schedule.plan(&name(), ReadOutcome::Changed, None, false, now);
        assert_eq!(schedule.next_at(), None);
        assert!(schedule.due(now + 3600 * SECOND).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn an_unchanged_value_past_its_refresh_point_is_polled_with_backoff() {
        let mut schedule = Schedule::default();
        let now = Instant::now();
        let refresh_point = now + 10 * SECOND;
        schedule.plan(
            &name(),
            ReadOutcome::Changed,
            Some(refresh_point),
            false,
            now,
        );
        assert_eq!(schedule.next_at(), Some(refresh_point));
        assert!(schedule.due(now).is_empty());
        tokio::time::advance(10 * SECOND).await;
        let now = Instant::now();
        assert_eq!(schedule.due(now), vec![name()]);
        schedule.plan(
            &name(),
            ReadOutcome::Unchanged,
            Some(refresh_point),
            false,
            now,
        );
        assert_eq!(schedule.next_at(), Some(now + SECOND));
        schedule.plan(
            &name(),
            ReadOutcome::Unchanged,
            Some(refresh_point),
            false,
            now,
        );
        assert_eq!(schedule.next_at(), Some(now + 2 * SECOND));
        schedule.forget("token");
        assert_eq!(schedule.next_at(), None);
    }
}
