//! Tokens minted per (agent, task): GitHub App tokens of a `mint: per_task` credential, and AWS
//! sessions whose name templates `{agent}` or `{task}`. Minted on first use, used only for that
//! caller, and retired when the task ends (`POST /tasks/ID/end`), after `task_idle` without
//! requests, or when `max_tasks` are live and a new one needs room (least recently used first).
//! Retired GitHub tokens are revoked at GitHub by the reloader's sweep; STS sessions cannot be
//! revoked one by one and lapse at their expiry.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use lru::LruCache;
use tokio::sync::OnceCell;
use tokio::time::Instant;

use crate::config::{AwsSpec, GithubAppSpec, SourceSpec};
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
    async fn mint(&self, key: &TaskKey, upstream: &Upstream) -> Result<Version, SourceError> {
        let fetched = match self {
            Minter::GithubApp(spec) => {
                let private_key = read_key_material(&spec.private_key)?;
                github_app::mint(spec, &private_key, upstream).await?
            }
            Minter::Aws(spec) => {
                let caller = aws::Caller {
                    agent: &key.agent,
                    task: &key.task,
                };
                aws::fetch(spec, caller, upstream).await?
            }
        };
        Ok(Version::new(fetched))
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

#[derive(Debug)]
struct Slot {
    token: Arc<OnceCell<Arc<Version>>>,
    last_used: Instant,
}

/// The live task tokens of one credential.
#[derive(Debug)]
pub struct TaskTokens {
    minter: Minter,
    idle: Duration,
    live: Mutex<LruCache<TaskKey, Slot>>,
    retired: Mutex<Vec<Retired>>,
}

impl TaskTokens {
    /// The token set of a credential minted per caller: a `mint: per_task` GitHub App, or an AWS
    /// role whose session name templates `{agent}` or `{task}`; `None` for any other source.
    pub fn for_source(source: &SourceSpec) -> Option<Self> {
        let (idle, max_tasks) = source.per_task()?;
        let minter = match source {
            SourceSpec::GithubApp(app) => Minter::GithubApp(app.as_ref().clone()),
            SourceSpec::Aws(aws) => Minter::Aws(aws.as_ref().clone()),
            _ => return None,
        };
        let capacity =
            std::num::NonZeroUsize::new(max_tasks).unwrap_or(std::num::NonZeroUsize::MIN);
        Some(Self {
            minter,
            idle,
            live: Mutex::new(LruCache::new(capacity)),
            retired: Mutex::new(Vec::new()),
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
            .filter(|(_, slot)| slot.token.initialized())
            .count()
    }

    /// The token for `key`, minting one on the task's first request (concurrent first requests
    /// share one mint). `stale`: a fingerprint the upstream just rejected, to be replaced.
    pub async fn token_for(
        &self,
        key: &TaskKey,
        stale: Option<&str>,
        upstream: &Upstream,
    ) -> Result<Arc<Version>, SourceError> {
        let cell = self.slot(key, stale);
        let version = cell
            .get_or_try_init(|| async {
                let version = Arc::new(self.minter.mint(key, upstream).await?);
                tracing::info!(
                    credential_kind = self.minter.kind(),
                    agent = %key.agent,
                    task = %key.task,
                    fingerprint = %version.fingerprint,
                    "task token minted"
                );
                Ok::<_, SourceError>(version)
            })
            .await?;
        Ok(version.clone())
    }

    /// The cell for `key`, touched; a fresh one when the old token is stale, near expiry or gone.
    fn slot(&self, key: &TaskKey, stale: Option<&str>) -> Arc<OnceCell<Arc<Version>>> {
        let now = Instant::now();
        let mut live = self.lock_live();
        if let Some(slot) = live.get_mut(key) {
            let usable = match slot.token.get() {
                None => true,
                Some(version) => {
                    !version.is_expired(now + RENEW_AHEAD)
                        && stale.is_none_or(|stale| stale != version.fingerprint)
                }
            };
            if usable {
                slot.last_used = now;
                return slot.token.clone();
            }
            if let Some(old) = live.pop(key) {
                self.retire(key.clone(), old, "replaced");
            }
        }
        let token = Arc::new(OnceCell::new());
        let slot = Slot {
            token: token.clone(),
            last_used: now,
        };
        if let Some((evicted_key, evicted)) = live.push(key.clone(), slot) {
            if &evicted_key != key {
                self.retire(evicted_key, evicted, "max_tasks");
            }
        }
        token
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
                ended += usize::from(slot.token.initialized());
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
                .filter(|(_, slot)| now.duration_since(slot.last_used) >= self.idle)
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

    /// Revokes `retired` tokens at the provider; failures are logged (the token still expires).
    pub async fn revoke(&self, retired: Vec<Retired>, upstream: &Upstream) -> usize {
        let mut revoked = 0;
        for Retired { key, version, why } in retired {
            if version.is_expired(Instant::now()) {
                continue;
            }
            match self.minter.revoke(&version, upstream).await {
                Ok(false) => {}
                Ok(true) => {
                    revoked += 1;
                    tracing::info!(agent = %key.agent, task = %key.task, fingerprint = %version.fingerprint, why, "task token revoked");
                }
                Err(error) => {
                    tracing::warn!(agent = %key.agent, task = %key.task, fingerprint = %version.fingerprint, why, %error, "task token could not be revoked; it lapses at its expiry")
                }
            }
        }
        revoked
    }

    fn retire(&self, key: TaskKey, slot: Slot, why: &'static str) {
        if let Some(version) = slot.token.get() {
            self.lock_retired().push(Retired {
                key,
                version: version.clone(),
                why,
            });
        }
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
