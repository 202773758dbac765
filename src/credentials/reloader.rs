//! The one writer of the credential table and routes. It re-reads sources when their files
//! change (debounced), on a periodic resync, on SIGHUP and ahead of expiry, reloads the config
//! file when it changes, and answers "is there a newer version than the one just rejected?" for
//! the 401 retry. Each change is built as a whole new snapshot and published at once; a failed
//! read or a broken config keeps the last good one, is logged and counted.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::config::{Config, SourceSpec};
use crate::credentials::expiry::refresh_delay;
use crate::credentials::watch::DirWatcher;
use crate::credentials::{read_all, Credential, CredentialTable, ReadOutcome, Version};
use crate::identity::IdentityTable;
use crate::proxy::upstream::DialRules;
use crate::proxy::{ProxyState, Snapshot};
use crate::routes::RouteTable;

const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// After a 401-triggered fetch that found nothing newer than a version, don't fetch again for
/// that same version for this long (a rejected key that nobody rotated must not hammer the source).
const FORCED_FETCH_COOLDOWN: Duration = Duration::from_secs(1);

/// What the rest of keystamp can ask of the reloader.
enum Request {
    ReloadAll,
    NewerThan {
        credential: Arc<str>,
        stale: String,
        reply: oneshot::Sender<Option<Arc<Version>>>,
    },
}

/// A cheap, cloneable way to reach the reloader.
#[derive(Clone, Debug)]
pub struct ReloadHandle {
    requests: mpsc::UnboundedSender<Request>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Request::ReloadAll => f.write_str("ReloadAll"),
            Request::NewerThan { credential, .. } => write!(f, "NewerThan({credential})"),
        }
    }
}

/// The receiving end, handed to [`Reloader::new`].
pub struct ReloadRequests(mpsc::UnboundedReceiver<Request>);

impl ReloadHandle {
    pub fn channel() -> (Self, ReloadRequests) {
        let (requests, receiver) = mpsc::unbounded_channel();
        (Self { requests }, ReloadRequests(receiver))
    }

    /// Re-reads the config and every source now (SIGHUP).
    pub fn reload_all(&self) {
        let _ = self.requests.send(Request::ReloadAll);
    }

    /// A version of `credential` newer than the one with fingerprint `stale`, fetching one now if
    /// the source can say (re-read the file, ask the token endpoint). `None`: there is none.
    pub async fn newer_than(&self, credential: &Arc<str>, stale: &str) -> Option<Arc<Version>> {
        let (reply, answer) = oneshot::channel();
        let request = Request::NewerThan {
            credential: credential.clone(),
            stale: stale.to_string(),
            reply,
        };
        self.requests.send(request).ok()?;
        answer.await.ok().flatten()
    }
}

/// When a credential is next read, and how long the last retry waited.
#[derive(Debug, Clone, Copy)]
struct Scheduled {
    at: Instant,
    backoff: Option<Duration>,
}

pub struct Reloader {
    state: Arc<ProxyState>,
    config: Config,
    config_hash: Option<[u8; 32]>,
    requests: mpsc::UnboundedReceiver<Request>,
    fs_events: mpsc::UnboundedReceiver<()>,
    watcher: Option<DirWatcher>,
    schedule: HashMap<Arc<str>, Scheduled>,
    /// The last 401-triggered fetch per credential: when, and which version it tried to replace.
    forced_fetches: HashMap<Arc<str>, (Instant, String)>,
}

impl Reloader {
    /// `config` is the one the current snapshot was built from.
    pub fn new(state: Arc<ProxyState>, config: Config, requests: ReloadRequests) -> Self {
        let (events, fs_events) = mpsc::unbounded_channel();
        let watcher = match DirWatcher::new(events) {
            Ok(watcher) => Some(watcher),
            Err(error) => {
                tracing::warn!(%error, "file watching unavailable; relying on the periodic resync");
                None
            }
        };
        let config_hash = std::fs::read(&config.path).ok().map(|text| hash(&text));
        let mut reloader = Self {
            state,
            config,
            config_hash,
            requests: requests.0,
            fs_events,
            watcher,
            schedule: HashMap::new(),
            forced_fetches: HashMap::new(),
        };
        reloader.watch_config_dirs();
        let snapshot = reloader.state.snapshot();
        for credential in snapshot.credentials.iter() {
            reloader.state.metrics.observe_credential(credential, None);
            let outcome = if credential.current.is_some() {
                ReadOutcome::Changed
            } else {
                ReadOutcome::Failed
            };
            reloader.plan(credential, outcome);
        }
        reloader
    }

    pub async fn run(mut self) {
        let every = self.config.reload.resync_every;
        let mut resync = tokio::time::interval_at(Instant::now() + every, every);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut debounce_until: Option<Instant> = None;
        loop {
            let next_refresh = self.schedule.values().map(|s| s.at).min();
            tokio::select! {
                () = self.state.shutdown.cancelled() => break,
                request = self.requests.recv() => match request {
                    Some(request) => self.handle(request).await,
                    None => break,
                },
                Some(()) = self.fs_events.recv() => {
                    debounce_until.get_or_insert_with(|| Instant::now() + self.config.reload.debounce);
                }
                () = sleep_until(debounce_until) => {
                    debounce_until = None;
                    while self.fs_events.try_recv().is_ok() {}
                    tracing::debug!("files changed; re-reading");
                    self.reread_files().await;
                }
                () = sleep_until(next_refresh) => self.refresh_due().await,
                _ = resync.tick() => self.resync().await,
            }
        }
    }

    async fn handle(&mut self, request: Request) {
        match request {
            Request::ReloadAll => {
                tracing::info!("reloading the config and every credential");
                self.config_hash = None;
                self.reload_config().await;
                self.reread_identities();
                let names: Vec<Arc<str>> = self
                    .state
                    .snapshot()
                    .credentials
                    .iter()
                    .map(|c| c.name.clone())
                    .collect();
                self.reread(names).await;
            }
            Request::NewerThan {
                credential,
                stale,
                reply,
            } => {
                let _ = reply.send(self.newer_than(&credential, &stale).await);
            }
        }
    }

    /// The 401 path: the version the upstream rejected may already be replaced; if not, read the
    /// source once more (never faster than the cooldown) and answer with what is new, if anything.
    async fn newer_than(&mut self, name: &Arc<str>, stale: &str) -> Option<Arc<Version>> {
        let current = self.state.snapshot().credentials.get(name)?.clone();
        let fresh = |version: &Arc<Version>| {
            version.fingerprint != stale && !version.is_expired(Instant::now())
        };
        if let Some(version) = current.current.as_ref().filter(|v| fresh(v)) {
            return Some(version.clone());
        }
        let now = Instant::now();
        let recently_tried = self.forced_fetches.get(name).is_some_and(|(at, tried)| {
            tried == stale && now.duration_since(*at) < FORCED_FETCH_COOLDOWN
        });
        if recently_tried {
            return None;
        }
        self.forced_fetches
            .insert(name.clone(), (now, stale.to_string()));
        self.reread(vec![name.clone()]).await;
        let updated = self
            .state
            .snapshot()
            .credentials
            .get(name)?
            .current
            .clone()?;
        fresh(&updated).then_some(updated)
    }

    /// After file events: re-arm watches, reload the config if it changed, re-read file sources.
    async fn reread_files(&mut self) {
        if let Some(watcher) = self.watcher.as_mut() {
            watcher.rearm();
        }
        self.reload_config().await;
        self.reread_identities();
        let names = self.credentials_where(|spec| !spec.files().is_empty());
        self.reread(names).await;
    }

    /// The backstop for lost events: everything a file or the environment holds.
    async fn resync(&mut self) {
        if let Some(watcher) = self.watcher.as_mut() {
            watcher.rearm();
        }
        self.reload_config().await;
        self.reread_identities();
        let names = self.credentials_where(|spec| {
            matches!(spec, SourceSpec::File { .. } | SourceSpec::Env { .. })
        });
        self.reread(names).await;
    }

    /// Agents' proxy tokens rotate too; publish only when one changed.
    fn reread_identities(&mut self) {
        let snapshot = self.state.snapshot_arc();
        let identities = IdentityTable::load(&self.config, Some(&snapshot.identities));
        if *snapshot.identities == identities {
            return;
        }
        tracing::info!("agent identities changed");
        self.state.publish(Snapshot {
            routes: snapshot.routes.clone(),
            credentials: snapshot.credentials.clone(),
            unmatched: snapshot.unmatched,
            identities: Arc::new(identities),
        });
    }

    async fn refresh_due(&mut self) {
        let now = Instant::now();
        let due: Vec<Arc<str>> = self
            .schedule
            .iter()
            .filter(|(_, s)| s.at <= now)
            .map(|(n, _)| n.clone())
            .collect();
        self.reread(due).await;
    }

    fn credentials_where(&self, wanted: impl Fn(&SourceSpec) -> bool) -> Vec<Arc<str>> {
        self.state
            .snapshot()
            .credentials
            .iter()
            .filter(|c| wanted(&c.spec.source))
            .map(|c| c.name.clone())
            .collect()
    }

    /// Reads each named credential's source and publishes one snapshot if anything changed.
    async fn reread(&mut self, names: Vec<Arc<str>>) {
        if names.is_empty() {
            return;
        }
        let snapshot = self.state.snapshot_arc();
        let credentials: Vec<Arc<Credential>> = names
            .iter()
            .filter_map(|name| snapshot.credentials.get(name))
            .cloned()
            .collect();
        let results = read_all(credentials, &self.state.upstream).await;
        let mut changed = Vec::new();
        for (index, (credential, outcome)) in results.into_iter().enumerate() {
            // Thousands of results are bookkeeping on a runtime worker: let requests in between.
            if index % 256 == 255 {
                tokio::task::yield_now().await;
            }
            let previous = snapshot
                .credentials
                .get(&credential.name)
                .and_then(|c| c.current.clone());
            credential.reload_counters.count(outcome);
            self.plan(&credential, outcome);
            if outcome == ReadOutcome::Changed {
                // Rotation is the cure: a new version starts with a closed breaker.
                credential.breaker.reset();
                self.state.metrics.observe_credential(
                    &credential,
                    previous.as_ref().map(|v| v.fingerprint.as_str()),
                );
            }
            let error_changed = snapshot
                .credentials
                .get(&credential.name)
                .is_some_and(|c| c.last_error != credential.last_error);
            if outcome == ReadOutcome::Changed || error_changed {
                changed.push(credential);
            }
        }
        if !changed.is_empty() {
            self.state.publish(Snapshot {
                routes: snapshot.routes.clone(),
                credentials: snapshot.credentials.with_all(changed),
                unmatched: snapshot.unmatched,
                identities: snapshot.identities.clone(),
            });
        }
    }

    /// Decides when `credential` is next read, from what the last read did.
    fn plan(&mut self, credential: &Credential, outcome: ReadOutcome) {
        let now = Instant::now();
        let previous = self.schedule.get(&credential.name).and_then(|s| s.backoff);
        let backoff = || Scheduled {
            at: now + previous.map_or(FIRST_BACKOFF, |b| (b * 2).min(MAX_BACKOFF)),
            backoff: Some(previous.map_or(FIRST_BACKOFF, |b| (b * 2).min(MAX_BACKOFF))),
        };
        let natural = natural_next(credential, now);
        let polled = matches!(
            credential.spec.source,
            SourceSpec::Command(_) | SourceSpec::OAuth2(_)
        );
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
                self.schedule.insert(credential.name.clone(), next);
            }
            None => {
                self.schedule.remove(&credential.name);
            }
        }
    }

    /// Reloads the config file if its bytes changed. A broken config keeps the current one.
    async fn reload_config(&mut self) {
        let text = match std::fs::read(&self.config.path) {
            Ok(text) => text,
            Err(error) => {
                tracing::warn!(path = %self.config.path.display(), %error, "config unreadable; keeping the current one");
                self.state
                    .metrics
                    .config_reloads
                    .with_label_values(&["error"])
                    .inc();
                return;
            }
        };
        let digest = hash(&text);
        if self.config_hash == Some(digest) {
            return;
        }
        self.config_hash = Some(digest);
        let parsed = std::str::from_utf8(&text)
            .map_err(|_| vec![format!("{}: not UTF-8", self.config.path.display())])
            .and_then(|text| Config::from_yaml(&self.config.path, text).map_err(|e| e.errors()));
        let config = match parsed {
            Ok(config) => config,
            Err(errors) => {
                for error in errors {
                    tracing::warn!(%error, "config reload rejected; keeping the current config");
                }
                self.state
                    .metrics
                    .config_reloads
                    .with_label_values(&["error"])
                    .inc();
                return;
            }
        };
        self.apply_config(config).await;
        self.state
            .metrics
            .config_reloads
            .with_label_values(&["ok"])
            .inc();
    }

    async fn apply_config(&mut self, config: Config) {
        if config.listen != self.config.listen || config.admin != self.config.admin {
            tracing::warn!(
                "listen/admin addresses changed in the config; they take effect on restart"
            );
        }
        self.state
            .upstream
            .dialer()
            .set_rules(DialRules::from_config(&config));
        let snapshot = self.state.snapshot_arc();
        let mut kept = Vec::new();
        let mut loads = Vec::new();
        for (name, spec) in &config.credentials {
            match snapshot.credentials.get(name.as_str()) {
                // Same definition: keep the version and everything keyed to it.
                Some(existing) if existing.spec == *spec => kept.push(existing.clone()),
                _ => loads.push(Arc::new(Credential::fresh(
                    Arc::from(name.as_str()),
                    spec.clone(),
                    &self.state.metrics,
                ))),
            }
        }
        let loaded: Vec<Credential> = read_all(loads, &self.state.upstream)
            .await
            .into_iter()
            .map(|(credential, _)| credential)
            .collect();
        for old in snapshot.credentials.iter() {
            if !config.credentials.contains_key(old.name.as_ref()) {
                self.schedule.remove(&old.name);
                self.state.metrics.forget_credential(
                    &old.name,
                    old.current.as_ref().map(|v| v.fingerprint.as_str()),
                );
            }
        }
        let mut credentials: Vec<Arc<Credential>> = kept;
        for credential in loaded {
            let previous = snapshot
                .credentials
                .get(&credential.name)
                .and_then(|c| c.current.clone());
            self.state.metrics.observe_credential(
                &credential,
                previous.as_ref().map(|v| v.fingerprint.as_str()),
            );
            let outcome = if credential.current.is_some() {
                ReadOutcome::Changed
            } else {
                ReadOutcome::Failed
            };
            self.schedule.remove(&credential.name);
            self.plan(&credential, outcome);
            credentials.push(Arc::new(credential));
        }
        self.state.publish(Snapshot {
            routes: Arc::new(RouteTable::new(&config.routes)),
            credentials: CredentialTable::from_credentials(credentials),
            unmatched: config.unmatched,
            identities: Arc::new(IdentityTable::load(&config, Some(&snapshot.identities))),
        });
        tracing::info!(
            routes = config.routes.len(),
            credentials = config.credentials.len(),
            "config reloaded"
        );
        self.config = config;
        self.watch_config_dirs();
    }

    /// The config file and every file source, each watched through its directory.
    fn watch_config_dirs(&mut self) {
        let mut files: BTreeSet<PathBuf> = BTreeSet::new();
        files.insert(self.config.path.clone());
        for spec in self.config.credentials.values() {
            files.extend(spec.source.files().into_iter().map(Path::to_path_buf));
        }
        for identity in self.config.identities.values() {
            files.extend(identity.source.files().into_iter().map(Path::to_path_buf));
        }
        if let Some(watcher) = self.watcher.as_mut() {
            watcher.set_files(files);
        }
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
        _ => None,
    };
    match (ahead_of_expiry, periodic) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn hash(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}
