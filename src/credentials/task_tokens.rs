//! Tokens minted per (agent, task): GitHub App tokens of a `mint: per_task` credential, and AWS
//! sessions whose name templates `{agent}` or `{task}`. Minted on first use, used only for that
//! caller, and retired when the task ends (`POST /tasks/ID/end`), after `task_idle` without
//! requests, or when `max_tasks` are live and a new one needs room (least recently used first).
//! Retired GitHub tokens are revoked at GitHub by the reloader's sweep (a token retired while its
//! mint was still in flight too, once the mint lands); STS sessions cannot be revoked one by one
//! and lapse at their expiry. New mints are capped: per credential by `mint_rate`, per agent by
//! `max_tasks_per_agent`; past either the agent gets 429 `mint_limited` and nothing is minted.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use governor::clock::Clock;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use lru::LruCache;
use tokio::sync::OnceCell;
use tokio::time::Instant;

use crate::config::{AwsSpec, GithubAppSpec, SourceSpec, TaskTokenSettings};
use crate::credentials::local::read_key_material;
use crate::credentials::value::SourceError;
use crate::credentials::{aws, github_app, Version};
use crate::upstream::Upstream;

/// What mints a caller's token.
#[derive(Debug)]
pub enum Minter {
    GithubApp(GithubAppSpec),
    Aws(AwsSpec),
}

impl Minter {
    /// A new token for `key`, and the provider's clock skew where it shows it.
    async fn mint(
        &self,
        key: &TaskKey,
        upstream: &Upstream,
    ) -> Result<(Version, Option<i64>), SourceError> {
        match self {
            Minter::GithubApp(spec) => {
                let private_key = read_key_material(&spec.private_key)?;
                let minted = github_app::mint(spec, &private_key, upstream).await?;
                Ok((Version::new(minted.fetched), minted.skew_seconds))
            }
            Minter::Aws(spec) => {
                let caller = aws::Caller {
                    agent: &key.agent,
                    task: &key.task,
                };
                Ok((
                    Version::new(aws::fetch(spec, caller, upstream).await?),
                    None,
                ))
            }
        }
    }

    /// Revokes a token at the provider; `Ok(false)` when the provider cannot.
    async fn revoke(&self, version: &Version, upstream: &Upstream) -> Result<bool, SourceError> {
        match self {
            Minter::GithubApp(spec) => github_app::revoke(spec, &version.secret, upstream)
                .await
                .map(|()| true),
            Minter::Aws(_) => Ok(false),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Minter::GithubApp(_) => "github_app",
            Minter::Aws(_) => "aws",
        }
    }
}

/// Mint a new task token rather than use one with less than this left.
const RENEW_AHEAD: Duration = Duration::from_secs(300);
/// A token the provider issues with less than [`RENEW_AHEAD`] to live is re-minted at most this
/// often (it is used while still valid), or every request would mint.
const REMINT_FLOOR: Duration = Duration::from_secs(60);
/// Revocations sent at once.
const REVOKE_CONCURRENCY: usize = 16;

/// Why no token came back for a caller.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    #[error("{why}")]
    Limited {
        why: &'static str,
        retry_after: Duration,
    },
    #[error("the provider issued a token that has already expired")]
    Expired,
    #[error(transparent)]
    Failed(#[from] SourceError),
}

/// Whether `id` is a task id: 1–64 of `A-Za-z0-9._:-` (it goes into logs, so never free text).
pub fn is_task_id(id: &[u8]) -> bool {
    (1..=64).contains(&id.len())
        && id
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// Whose token: the agent (empty when agents are not identified) and its task id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TaskKey {
    pub agent: Arc<str>,
    pub task: Arc<str>,
}

/// A token retired from use, waiting to be revoked.
#[derive(Debug)]
pub struct Retired {
    pub key: TaskKey,
    pub version: Arc<Version>,
    pub why: &'static str,
}

/// One mint's outcome, shared by every request that waited for it (a failure too: concurrent
/// first requests of a task make one mint and get one answer, never one mint each in turn).
#[derive(Debug, Default)]
struct Mint {
    outcome: OnceCell<Result<Arc<Version>, SourceError>>,
    /// Handed over for revocation already (by whoever got there first).
    retired: AtomicBool,
}

impl Mint {
    fn token(&self) -> Option<&Arc<Version>> {
        self.outcome.get().and_then(|outcome| outcome.as_ref().ok())
    }
}

#[derive(Debug)]
struct Slot {
    mint: Arc<Mint>,
    last_used: Instant,
    /// When this slot's mint began: a short-lived token is not replaced before [`REMINT_FLOOR`].
    created: Instant,
}

/// The live task tokens of one credential.
pub struct TaskTokens {
    minter: Minter,
    settings: TaskTokenSettings,
    live: Mutex<LruCache<TaskKey, Slot>>,
    retired: Mutex<Vec<Retired>>,
    mint_rate: DefaultDirectRateLimiter,
    /// The provider's clock minus keystamp's at the last mint (`i64::MIN`: not known).
    skew_seconds: AtomicI64,
}

impl std::fmt::Debug for TaskTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskTokens")
            .field("minter", &self.minter.kind())
            .field("settings", &self.settings)
            .finish()
    }
}

impl TaskTokens {
    /// The token set of a credential minted per caller: a `mint: per_task` GitHub App, or an AWS
    /// role whose session name templates `{agent}` or `{task}`; `None` for any other source.
    pub fn for_source(source: &SourceSpec) -> Option<Self> {
        let settings = source.per_task()?;
        let minter = match source {
            SourceSpec::GithubApp(app) => Minter::GithubApp(app.as_ref().clone()),
            SourceSpec::Aws(aws) => Minter::Aws(aws.as_ref().clone()),
            _ => return None,
        };
        let capacity =
            std::num::NonZeroUsize::new(settings.max_tasks).unwrap_or(std::num::NonZeroUsize::MIN);
        let per_second = NonZeroU32::new(settings.mint_per_second).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(settings.mint_burst).unwrap_or(per_second);
        Some(Self {
            minter,
            settings,
            live: Mutex::new(LruCache::new(capacity)),
            retired: Mutex::new(Vec::new()),
            mint_rate: RateLimiter::direct(Quota::per_second(per_second).allow_burst(burst)),
            skew_seconds: AtomicI64::new(i64::MIN),
        })
    }

    /// Whether a request without a task id gets a caller's token too: AWS sessions are named
    /// after the agent; GitHub task tokens are for tasks only.
    pub fn every_request(&self) -> bool {
        matches!(self.minter, Minter::Aws(_))
    }

    /// Task tokens minted and not yet retired.
    pub fn live(&self) -> usize {
        self.lock_live()
            .iter()
            .filter(|(_, slot)| slot.mint.token().is_some())
            .count()
    }

    /// The provider's clock minus keystamp's at the last mint, when the provider showed it.
    pub fn skew_seconds(&self) -> Option<i64> {
        Some(self.skew_seconds.load(Ordering::Relaxed)).filter(|s| *s != i64::MIN)
    }

    /// The token for `key`, minting one on the task's first request (concurrent first requests
    /// share one mint and its outcome). `stale`: a fingerprint the upstream just rejected, to be
    /// replaced. A token already expired is never handed out.
    pub async fn token_for(
        &self,
        key: &TaskKey,
        stale: Option<&str>,
        upstream: &Upstream,
    ) -> Result<Arc<Version>, MintError> {
        let mint = self.slot(key, stale)?;
        let outcome = mint
            .outcome
            .get_or_init(|| async {
                let (version, skew) = self.minter.mint(key, upstream).await?;
                if let Some(skew) = skew {
                    self.skew_seconds.store(skew, Ordering::Relaxed);
                }
                let version = Arc::new(version);
                tracing::info!(
                    credential_kind = self.minter.kind(),
                    agent = %key.agent,
                    task = %key.task,
                    fingerprint = %version.fingerprint,
                    "task token minted"
                );
                Ok(version)
            })
            .await;
        // Retired (evicted by `max_tasks`, its task ended) while the mint was in flight: nobody
        // else will hand it over, so it is queued for revocation now.
        if !self.is_live(key, &mint) {
            self.hand_over(key.clone(), &mint, "retired_while_minting");
        }
        let version = outcome.clone()?;
        if version.is_expired(Instant::now()) {
            return Err(MintError::Expired);
        }
        Ok(version)
    }

    fn is_live(&self, key: &TaskKey, mint: &Arc<Mint>) -> bool {
        self.lock_live()
            .peek(key)
            .is_some_and(|slot| Arc::ptr_eq(&slot.mint, mint))
    }

    /// The mint for `key`, touched; a new one when the old token is stale, failed, near expiry
    /// (at most once per [`REMINT_FLOOR`]) or gone, if the mint rate and the agent's cap allow.
    fn slot(&self, key: &TaskKey, stale: Option<&str>) -> Result<Arc<Mint>, MintError> {
        let now = Instant::now();
        let mut live = self.lock_live();
        if let Some(slot) = live.get_mut(key) {
            let usable = match slot.mint.outcome.get() {
                None => true,
                Some(Err(_)) => false,
                Some(Ok(version)) => {
                    let renew_due = version.is_expired(now + RENEW_AHEAD)
                        && now.duration_since(slot.created) >= REMINT_FLOOR;
                    !version.is_expired(now)
                        && !renew_due
                        && stale.is_none_or(|stale| stale != version.fingerprint)
                }
            };
            if usable {
                slot.last_used = now;
                return Ok(slot.mint.clone());
            }
        }
        let agents_live = live
            .iter()
            .filter(|(k, _)| k.agent == key.agent && *k != key)
            .count();
        if agents_live >= self.settings.max_per_agent {
            return Err(MintError::Limited {
                why: "this agent holds max_tasks_per_agent live task tokens; end a task first",
                retry_after: Duration::from_secs(1),
            });
        }
        if let Err(not_until) = self.mint_rate.check() {
            return Err(MintError::Limited {
                why: "the credential's mint_rate is spent",
                retry_after: not_until.wait_time_from(crate::limits::clock().now()),
            });
        }
        if let Some(old) = live.pop(key) {
            self.retire(key.clone(), old, "replaced");
        }
        let mint = Arc::new(Mint::default());
        let slot = Slot {
            mint: mint.clone(),
            last_used: now,
            created: now,
        };
        if let Some((evicted_key, evicted)) = live.push(key.clone(), slot) {
            if &evicted_key != key {
                self.retire(evicted_key, evicted, "max_tasks");
            }
        }
        Ok(mint)
    }

    /// Retires every token of `task` (any agent). Returns how many.
    pub fn end_task(&self, task: &str) -> usize {
        let mut live = self.lock_live();
        let keys: Vec<TaskKey> = live
            .iter()
            .filter(|(key, _)| key.task.as_ref() == task)
            .map(|(key, _)| key.clone())
            .collect();
        let mut ended = 0;
        for key in keys {
            if let Some(slot) = live.pop(&key) {
                ended += usize::from(slot.mint.token().is_some());
                self.retire(key, slot, "task_ended");
            }
        }
        ended
    }

    /// Retires every live token (the credential left the config, or keystamp is stopping).
    pub fn retire_all(&self) {
        let mut live = self.lock_live();
        while let Some((key, slot)) = live.pop_lru() {
            self.retire(key, slot, "retired");
        }
    }

    /// Retires tokens idle for `task_idle`, then hands over everything retired, to be revoked.
    pub fn sweep(&self, now: Instant) -> Vec<Retired> {
        {
            let mut live = self.lock_live();
            let idle: Vec<TaskKey> = live
                .iter()
                .filter(|(_, slot)| now.duration_since(slot.last_used) >= self.settings.idle)
                .map(|(key, _)| key.clone())
                .collect();
            for key in idle {
                if let Some(slot) = live.pop(&key) {
                    self.retire(key, slot, "idle");
                }
            }
        }
        std::mem::take(&mut *self.lock_retired())
    }

    /// Revokes `retired` tokens at the provider, [`REVOKE_CONCURRENCY`] at a time; failures are
    /// logged (the token still expires).
    pub async fn revoke(&self, retired: Vec<Retired>, upstream: &Upstream) -> usize {
        let revoked = AtomicUsize::new(0);
        futures_util::stream::iter(retired)
            .for_each_concurrent(REVOKE_CONCURRENCY, |Retired { key, version, why }| {
                let revoked = &revoked;
                async move {
                    if version.is_expired(Instant::now()) {
                        return;
                    }
                    match self.minter.revoke(&version, upstream).await {
                        Ok(false) => {}
                        Ok(true) => {
                            revoked.fetch_add(1, Ordering::Relaxed);
                            tracing::info!(agent = %key.agent, task = %key.task, fingerprint = %version.fingerprint, why, "task token revoked");
                        }
                        Err(error) => {
                            tracing::warn!(agent = %key.agent, task = %key.task, fingerprint = %version.fingerprint, why, %error, "task token could not be revoked; it lapses at its expiry")
                        }
                    }
                }
            })
            .await;
        revoked.into_inner()
    }

    fn retire(&self, key: TaskKey, slot: Slot, why: &'static str) {
        self.hand_over(key, &slot.mint, why);
    }

    /// Queues a minted token for revocation, once whoever retires it first.
    fn hand_over(&self, key: TaskKey, mint: &Mint, why: &'static str) {
        let Some(version) = mint.token() else {
            return;
        };
        if mint.retired.swap(true, Ordering::AcqRel) {
            return;
        }
        self.lock_retired().push(Retired {
            key,
            version: version.clone(),
            why,
        });
    }

    fn lock_live(&self) -> std::sync::MutexGuard<'_, LruCache<TaskKey, Slot>> {
        self.live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lock_retired(&self) -> std::sync::MutexGuard<'_, Vec<Retired>> {
        self.retired
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
