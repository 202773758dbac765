//! How a credential's value is obtained: its sources (file, env, command, OAuth2, tokens minted
//! from a GitHub App or Google service-account key), versions and
//! their expiry, and the immutable table of every credential's current version. Deciding *when*
//! to read belongs to `reload/`; publishing the table belongs to `state.rs`.

mod aws;
mod background;
mod exchange;
pub mod expiry;
mod github_app;
mod google;
mod jwt;
mod local;
mod oauth;
mod secrets_manager;
mod source;
mod store_watch;
mod task_tokens;
mod value;
mod vault;

use foldhash::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::breaker::{Breaker, BreakerEvents};
use crate::config::{CredentialSpec, SourceSpec};
use crate::limits::Limits;
use crate::secret::Secret;
use crate::telemetry::{CredentialCounters, Metrics, ReadResult};
use crate::upstream::Upstream;

pub use aws::access_key_id;
pub use source::{fetch, inputs_fingerprint, read_local};
pub use store_watch::StoreWatch;
pub use task_tokens::{is_task_id, MintError, TaskKey, TaskTokens};
pub use value::{Fetched, SourceError};

/// One value of a credential, as loaded. Identified in logs and `/status` by its fingerprint.
#[derive(Debug)]
pub struct Version {
    pub secret: Secret,
    pub fingerprint: String,
    pub loaded_at: SystemTime,
    /// The same moment on tokio's clock, for scheduling.
    pub loaded: Instant,
    pub expiry: Option<Expiry>,
    /// Fingerprint of the local inputs it was obtained with (see [`Fetched::inputs`]).
    pub inputs: Option<String>,
}

/// When a version stops being accepted upstream.
#[derive(Debug, Clone, Copy)]
pub struct Expiry {
    /// Wall-clock time, for display.
    pub at: SystemTime,
    /// The same moment on tokio's clock, for deciding.
    pub deadline: Instant,
    /// From load to expiry; the refresh point is computed from it.
    pub lifetime: Duration,
}

impl Version {
    pub fn new(fetched: Fetched) -> Self {
        let loaded_at = SystemTime::now();
        let now = Instant::now();
        let expiry = fetched.expires_at.map(|at| {
            let lifetime = at.duration_since(loaded_at).unwrap_or(Duration::ZERO);
            Expiry {
                at,
                deadline: now + lifetime,
                lifetime,
            }
        });
        Self {
            fingerprint: fetched.secret.fingerprint(),
            secret: fetched.secret,
            loaded_at,
            loaded: now,
            expiry,
            inputs: fetched.inputs,
        }
    }

    pub fn is_expired(&self, now: Instant) -> bool {
        self.expiry.is_some_and(|e| e.deadline <= now)
    }
}

/// One credential as the request path sees it.
#[derive(Debug)]
pub struct Credential {
    pub name: Arc<str>,
    pub spec: CredentialSpec,
    /// The last good version; kept when a later read fails.
    pub current: Option<Arc<Version>>,
    /// Why the last read failed, when it did.
    pub last_error: Option<SourceError>,
    /// Runtime state that outlives versions and reloads: carried into every next `Credential`.
    pub breaker: Arc<Breaker>,
    pub limits: Arc<Limits>,
    /// This credential's metric series (reads, breaker, auth failures, version, ...).
    pub series: Arc<CredentialCounters>,
    /// Live per-task tokens, for a credential minted per task.
    pub task_tokens: Option<Arc<TaskTokens>>,
    /// A secret store's session and the version last read, for a `vault` credential.
    pub store_watch: Option<Arc<StoreWatch>>,
}

/// Where a credential's runtime state reports: metrics, and the fleet when there is one.
#[derive(Clone)]
pub struct Reporting {
    pub metrics: Arc<Metrics>,
    pub breaker_events: Option<BreakerEvents>,
}

impl Credential {
    pub fn source_kind(&self) -> &'static str {
        self.spec.source.kind()
    }

    /// Brings the version and expiry gauges in line with this credential's current version.
    pub fn observe(&self) {
        let current = self.current.as_ref().map(|version| {
            let expires_at = version.expiry.map(|e| {
                e.at.duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(0.0)
            });
            (version.fingerprint.as_str(), expires_at)
        });
        self.series.set_version(current);
    }

    /// A credential with no version yet and fresh runtime state (a closed breaker).
    pub fn fresh(name: Arc<str>, spec: CredentialSpec, reporting: &Reporting) -> Self {
        let store = spec.source.is_secret_store();
        let series = reporting.metrics.credentials.define(&name, store);
        let breaker = Arc::new(Breaker::new(
            name.clone(),
            spec.breaker,
            series.clone(),
            reporting.breaker_events.clone(),
        ));
        let limits = Arc::new(Limits::new(spec.rate_limit));
        let task_tokens = TaskTokens::for_source(&spec.source).map(Arc::new);
        let store_watch = spec.source.is_secret_store().then(Arc::default);
        Credential {
            name,
            spec,
            current: None,
            last_error: None,
            breaker,
            limits,
            series,
            task_tokens,
            store_watch,
        }
    }

    /// The credential after a read: a new version if the value changed, the old one kept if the
    /// read failed. Returns whether a new version was published.
    pub fn next(&self, read: Result<Fetched, SourceError>) -> (Self, ReadOutcome) {
        let (current, last_error, outcome) = match read {
            Ok(fetched) => {
                let unchanged = self.current.as_ref().is_some_and(|v| {
                    v.secret == fetched.secret && v.expiry.map(|e| e.at) == fetched.expires_at
                });
                if unchanged {
                    (self.current.clone(), None, ReadOutcome::Unchanged)
                } else {
                    // A `Retry-After` was the old key's quota; the new one starts unheld.
                    if self.current.is_some() {
                        self.limits.clear_hold();
                    }
                    let version = Arc::new(Version::new(fetched));
                    tracing::info!(
                        credential = %self.name,
                        source = self.source_kind(),
                        fingerprint = %version.fingerprint,
                        expires_at = version.expiry.map(|e| crate::time::format_rfc3339(e.at)),
                        "credential version loaded"
                    );
                    (Some(version), None, ReadOutcome::Changed)
                }
            }
            Err(error) => {
                self.report_failed_read(&error);
                (self.current.clone(), Some(error), ReadOutcome::Failed)
            }
        };
        let credential = Credential {
            name: self.name.clone(),
            spec: self.spec.clone(),
            current,
            last_error,
            breaker: self.breaker.clone(),
            limits: self.limits.clone(),
            series: self.series.clone(),
            task_tokens: self.task_tokens.clone(),
            store_watch: self.store_watch.clone(),
        };
        (credential, outcome)
    }
}

impl Credential {
    /// Warns once per distinct reason (a resync every 30 s repeats the same failure): the same
    /// reason again is logged at debug. Says plainly when there is no value to keep.
    fn report_failed_read(&self, error: &SourceError) {
        let repeated = self
            .last_error
            .as_ref()
            .is_some_and(|last| last.to_string() == error.to_string());
        let keeping = self.current.as_ref().map(|v| v.fingerprint.as_str());
        let (name, source) = (&self.name, self.source_kind());
        match (repeated, keeping) {
            (true, _) => {
                tracing::debug!(credential = %name, source, reason = %error, "credential read still failing")
            }
            (false, Some(keeping)) => tracing::warn!(
                credential = %name,
                source,
                reason = %error,
                keeping,
                "credential read failed; keeping the last good version"
            ),
            (false, None) => tracing::warn!(
                credential = %name,
                source,
                reason = %error,
                "credential read failed; no value yet, requests get 503 credential_unavailable"
            ),
        }
    }
}

/// Files and environment variables per blocking task when many are read at once.
const LOCAL_READ_CHUNK: usize = 1024;

/// Reads every credential's source: files and environment variables in chunks on a blocking
/// thread, commands and token endpoints concurrently.
/// A source that signs with another credential's keys (AWS Secrets Manager) is read after the
/// others, with those keys as they are now (`peers`, updated by this read).
pub async fn read_all(
    credentials: Vec<Arc<Credential>>,
    peers: &CredentialTable,
    upstream: &Upstream,
) -> Vec<(Credential, ReadOutcome)> {
    let (signed_with_peers, credentials): (Vec<_>, Vec<_>) = credentials
        .into_iter()
        .partition(|c| matches!(c.spec.source, SourceSpec::SecretsManager(_)));
    let mut results = read_independent(credentials, upstream).await;
    if signed_with_peers.is_empty() {
        return results;
    }
    let mut keys: HashMap<Arc<str>, Arc<Version>> = peers
        .iter()
        .filter_map(|c| Some((c.name.clone(), c.current.clone()?)))
        .collect();
    keys.extend(
        results
            .iter()
            .filter_map(|(c, _)| Some((c.name.clone(), c.current.clone()?))),
    );
    let reads = signed_with_peers.iter().map(|c| {
        let keys = &keys;
        async move {
            let read = match (&c.spec.source, &c.store_watch) {
                (SourceSpec::SecretsManager(spec), Some(watch)) => {
                    let signing = keys.get(spec.credential.as_str()).map(|v| &v.secret);
                    secrets_manager::fetch(spec, signing, watch, upstream).await
                }
                _ => Err(SourceError::StoreResponse),
            };
            c.next(read)
        }
    });
    results.extend(futures_util::future::join_all(reads).await);
    results
}

async fn read_independent(
    credentials: Vec<Arc<Credential>>,
    upstream: &Upstream,
) -> Vec<(Credential, ReadOutcome)> {
    let (remote, local): (Vec<_>, Vec<_>) = credentials.into_iter().partition(|c| {
        c.spec.source.is_remote() || matches!(c.spec.source, SourceSpec::Command(_))
    });
    let chunks: Vec<Vec<Arc<Credential>>> =
        local.chunks(LOCAL_READ_CHUNK).map(<[_]>::to_vec).collect();
    // A bulk read goes one chunk at a time to the low-priority reader thread: a reload must leave
    // the cores to the requests in flight (all chunks at once on the blocking pool cut the
    // reload to 30 ms but added 7 ms to their p99). A few files (the 401 path's "is there a newer
    // version?", a file event) are read at normal priority: an agent is waiting on them, and
    // under full load a nice-19 thread would hold that answer back.
    let bulk = local.len() > LOCAL_READ_CHUNK;
    let local_reads = async move {
        let mut results = Vec::new();
        for chunk in chunks {
            let read_chunk = move || {
                chunk
                    .iter()
                    .map(|c| c.next(read_local(&c.spec.source).unwrap_or(Err(SourceError::Empty))))
                    .collect::<Vec<_>>()
            };
            let read = if bulk {
                background::run_in_background(read_chunk).await
            } else {
                tokio::task::spawn_blocking(read_chunk).await.ok()
            };
            match read {
                Some(chunk) => results.extend(chunk),
                None => tracing::error!("a credential read task failed"),
            }
        }
        results
    };
    let remote_reads = remote
        .iter()
        .map(|c| async move { c.next(fetch_for(c, upstream).await) });
    let (local_results, mut results) =
        futures_util::future::join(local_reads, futures_util::future::join_all(remote_reads)).await;
    results.extend(local_results);
    results
}

/// Fetches `credential`'s value, with the runtime state its source keeps between reads.
pub async fn fetch_for(
    credential: &Credential,
    upstream: &Upstream,
) -> Result<Fetched, SourceError> {
    match (&credential.spec.source, &credential.store_watch) {
        (SourceSpec::Vault(spec), Some(watch)) => vault::fetch(spec, watch, upstream).await,
        (source, _) => fetch(source, upstream).await,
    }
}

/// Gives back what `credential` holds at its store (a Vault lease), revoking it there: keystamp
/// exits, or the credential left the config.
pub async fn release(credential: &Credential, upstream: &Upstream) {
    if let (SourceSpec::Vault(spec), Some(watch)) =
        (&credential.spec.source, &credential.store_watch)
    {
        vault::release(spec, watch, upstream).await;
    }
}

/// What a read did, for metrics and scheduling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadOutcome {
    Changed,
    Unchanged,
    Failed,
}

impl ReadOutcome {
    /// The `result` label this outcome is counted under.
    pub fn result(self) -> ReadResult {
        match self {
            ReadOutcome::Changed => ReadResult::Changed,
            ReadOutcome::Unchanged => ReadResult::Unchanged,
            ReadOutcome::Failed => ReadResult::Error,
        }
    }
}

/// All credentials by name (foldhash: names come from the config; see `RouteTable`).
#[derive(Debug, Clone, Default)]
pub struct CredentialTable {
    by_name: HashMap<Arc<str>, Arc<Credential>>,
}

impl CredentialTable {
    pub fn get(&self, name: &str) -> Option<&Arc<Credential>> {
        self.by_name.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Credential>> {
        self.by_name.values()
    }

    /// A copy with `credential` replaced or added.
    /// A copy with `credentials` replaced or added (one copy of the map, however many).
    pub fn with_all(&self, credentials: impl IntoIterator<Item = Credential>) -> Self {
        let mut by_name = self.by_name.clone();
        for credential in credentials {
            by_name.insert(credential.name.clone(), Arc::new(credential));
        }
        Self { by_name }
    }

    pub fn from_credentials(credentials: impl IntoIterator<Item = Arc<Credential>>) -> Self {
        Self {
            by_name: credentials
                .into_iter()
                .map(|c| (c.name.clone(), c))
                .collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}
