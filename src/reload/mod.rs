//! The one writer of snapshots. It re-reads sources when their files change (debounced), on a
//! periodic resync, on SIGHUP and ahead of expiry ([`schedule`]), reloads the config file when
//! its bytes change, and answers the 401 path's "is there a newer version?" ([`handle`]). Each
//! change is built as a whole new snapshot and published at once; a failed read or a broken
//! config keeps the last good one, is logged and counted. It never serves a request.

mod handle;
mod schedule;
mod watch;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, SourceSpec};
use crate::credentials::{
    inputs_fingerprint, read_all, release, Credential, ReadOutcome, Reporting, TaskTokens, Version,
};
use crate::fleet::{FleetLink, FleetRefreshes, Outgoing};
use crate::identity::IdentityTable;
use crate::state::{plan_next, SharedState};
use crate::telemetry::Metrics;
use crate::upstream::Upstream;
use handle::Ask;
use handle::Refreshed;
pub use handle::{ReloadHandle, ReloadRequests};
use schedule::Schedule;
use watch::DirWatcher;

/// After a 401-triggered fetch that found nothing newer than a version, don't fetch again for
/// that same version for this long (a rejected key that nobody rotated must not hammer the source).
const FORCED_FETCH_COOLDOWN: Duration = Duration::from_secs(1);
/// How often idle task tokens are looked for and retired ones revoked.
const TASK_SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Revoking task tokens at exit gets `shutdown_grace` less this, for what runs after it.
const EXIT_MARGIN: Duration = Duration::from_millis(500);

/// What the writer works with: the cell it publishes to, the client token endpoints are reached
/// through, the metrics it counts in, and the token that stops it.
pub struct ReloadContext {
    pub state: Arc<SharedState>,
    pub upstream: Upstream,
    pub metrics: Arc<Metrics>,
    /// Where new credentials' breakers report (the fleet, when there is one).
    pub reporting: Reporting,
    /// The fleet, when there is one: who watches each secret store, and where a rotation the
    /// watcher saw is announced.
    pub fleet: Option<FleetLink>,
    pub shutdown: CancellationToken,
}

pub struct Reloader {
    context: ReloadContext,
    config: Config,
    config_hash: Option<[u8; 32]>,
    asks: mpsc::UnboundedReceiver<Ask>,
    fs_events: mpsc::UnboundedReceiver<()>,
    watcher: Option<DirWatcher>,
    schedule: Schedule,
    /// The last 401-triggered fetch per credential: when, and which version it tried to replace.
    forced_fetches: HashMap<Arc<str>, (Instant, String)>,
    /// Per-task token sets seen at the last sweep, so one a reload dropped is revoked too.
    task_tokens: Vec<Arc<TaskTokens>>,
    /// Credentials other pods asked this one to re-read (their store changed).
    fleet_refreshes: Option<FleetRefreshes>,
}

impl Reloader {
    /// Loads `config` (every credential read once) and publishes the first snapshot to serve.
    pub async fn start(
        context: ReloadContext,
        config: Config,
        asks: ReloadRequests,
        fleet_refreshes: Option<FleetRefreshes>,
    ) -> Self {
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
            context,
            config_hash,
            asks: asks.0,
            fs_events,
            watcher,
            schedule: Schedule::default(),
            forced_fetches: HashMap::new(),
            task_tokens: Vec::new(),
            config: config.clone(),
            fleet_refreshes,
        };
        reloader.apply_config(config).await;
        reloader
    }

    pub async fn run(mut self) {
        let every = self.config.reload.resync_every;
        let mut resync = tokio::time::interval_at(Instant::now() + every, every);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut debounce_until: Option<Instant> = None;
        let mut task_sweep = tokio::time::interval(TASK_SWEEP_EVERY);
        task_sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next_refresh = self.schedule.next_at();
            tokio::select! {
                () = self.context.shutdown.cancelled() => break,
                ask = self.asks.recv() => match ask {
                    Some(ask) => self.answer(ask).await,
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
                Some(name) = next_fleet_refresh(&mut self.fleet_refreshes) => {
                    tracing::debug!(credential = %name, "re-reading: another pod saw it change");
                    self.reread(vec![name]).await;
                }
                _ = resync.tick() => self.resync().await,
                _ = task_sweep.tick() => self.sweep_task_tokens(),
            }
        }
        self.revoke_task_tokens_at_exit().await;
    }

    /// Retires idle task tokens (and every token of a credential a reload dropped), and revokes
    /// what was retired on a task of its own: the provider's answer must not hold up reloads.
    fn sweep_task_tokens(&mut self) {
        let snapshot = self.context.state.load();
        let current: Vec<Arc<TaskTokens>> = snapshot
            .credentials
            .iter()
            .filter_map(|credential| credential.task_tokens.clone())
            .collect();
        for dropped in self
            .task_tokens
            .iter()
            .filter(|old| !current.iter().any(|new| Arc::ptr_eq(old, new)))
        {
            dropped.retire_all();
            self.spawn_revocations(dropped.clone());
        }
        for tokens in &current {
            self.spawn_revocations(tokens.clone());
        }
        self.task_tokens = current;
    }

    fn spawn_revocations(&self, tokens: Arc<TaskTokens>) {
        let retired = tokens.sweep(Instant::now());
        if retired.is_empty() {
            return;
        }
        let upstream = self.context.upstream.clone();
        tokio::spawn(async move { tokens.revoke(retired, &upstream).await });
    }

    /// Task tokens would outlive keystamp by up to an hour: revoke them on the way out.
    async fn revoke_task_tokens_at_exit(&mut self) {
        let snapshot = self.context.state.load();
        self.task_tokens.extend(
            snapshot
                .credentials
                .iter()
                .filter_map(|c| c.task_tokens.clone()),
        );
        let revocations = self.task_tokens.iter().map(|tokens| {
            tokens.retire_all();
            let retired = tokens.sweep(Instant::now());
            let upstream = self.context.upstream.clone();
            async move {
                tokens.revoke(retired, &upstream).await;
            }
        });
        let leases = snapshot
            .credentials
            .iter()
            .filter(|c| c.store_watch.is_some())
            .map(|credential| {
                let upstream = self.context.upstream.clone();
                async move { release(credential, &upstream).await }
            });
        let revocations = futures_util::future::join(
            futures_util::future::join_all(revocations),
            futures_util::future::join_all(leases),
        );
        // Within the drain's grace, less a margin for the audit flush that follows.
        let limit = self
            .config
            .shutdown_grace
            .saturating_sub(EXIT_MARGIN)
            .max(EXIT_MARGIN);
        let _ = tokio::time::timeout(limit, revocations).await;
    }

    async fn answer(&mut self, ask: Ask) {
        match ask {
            Ask::ReloadAll => {
                tracing::info!("reloading the config and every credential");
                // An unchanged config file parses to the same config: only a changed one is
                // parsed again (10,000 credentials are ~50 ms of CPU taken from requests).
                self.reload_config().await;
                self.reread_identities();
                let names = self.credentials_where(|_| true);
                self.reread(names).await;
            }
            Ask::Refresh { credential, reply } => {
                let fingerprint = |reloader: &Self| {
                    let snapshot = reloader.context.state.load();
                    let current = snapshot.credentials.get(&credential)?;
                    Some((
                        current.current.as_ref().map(|v| v.fingerprint.clone()),
                        current.last_error.as_ref().map(ToString::to_string),
                    ))
                };
                let Some((before, _)) = fingerprint(self) else {
                    let _ = reply.send(None);
                    return;
                };
                tracing::info!(credential = %credential, "re-reading on request");
                self.reread(vec![credential.clone()]).await;
                let answer = fingerprint(self).map(|(after, last_error)| Refreshed {
                    before,
                    after,
                    last_error,
                });
                let _ = reply.send(answer);
            }
            Ask::NewerThan {
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
        let current = self.context.state.load().credentials.get(name)?.clone();
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
            .context
            .state
            .load()
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
        let names = self.with_changed_inputs(names);
        self.reread(names).await;
    }

    /// Drops token sources whose local inputs (client secret, private key) are unchanged: an
    /// unrelated file event must not mint a new token (GitHub limits how many an app may mint).
    fn with_changed_inputs(&self, names: Vec<Arc<str>>) -> Vec<Arc<str>> {
        let snapshot = self.context.state.load();
        names
            .into_iter()
            .filter(|name| {
                let Some(credential) = snapshot.credentials.get(name) else {
                    return true;
                };
                if !credential.spec.source.is_remote() {
                    return true;
                }
                let minted_with = credential.current.as_ref().and_then(|v| v.inputs.clone());
                minted_with.is_none() || inputs_fingerprint(&credential.spec.source) != minted_with
            })
            .collect()
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
        let snapshot = self.context.state.load_full();
        let limits = snapshot.identities.all_limits().clone();
        let identities = IdentityTable::read(&self.config, limits);
        if snapshot.identities.same_tokens(&identities) {
            return;
        }
        tracing::info!("agent identities changed");
        self.context
            .state
            .publish(snapshot.with_identities(identities));
    }

    /// Reads what is due. A secret store another pod watches for the fleet is not polled here:
    /// its watcher announces a change and this pod re-reads it then.
    async fn refresh_due(&mut self) {
        let now = Instant::now();
        let snapshot = self.context.state.load_full();
        let (due, watched_elsewhere): (Vec<_>, Vec<_>) =
            self.schedule.due(now).into_iter().partition(|name| {
                let store = snapshot
                    .credentials
                    .get(name)
                    .is_some_and(|c| c.store_watch.is_some());
                let fleet = self.context.fleet.as_ref();
                !store || fleet.is_none_or(|fleet| fleet.view().polls(name))
            });
        for name in watched_elsewhere {
            if let Some(credential) = snapshot.credentials.get(&name) {
                self.schedule
                    .after_read(credential, ReadOutcome::Unchanged, now);
            }
        }
        self.reread(due).await;
    }

    fn credentials_where(&self, wanted: impl Fn(&SourceSpec) -> bool) -> Vec<Arc<str>> {
        self.context
            .state
            .load()
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
        let snapshot = self.context.state.load_full();
        let credentials: Vec<Arc<Credential>> = names
            .iter()
            .filter_map(|name| snapshot.credentials.get(name))
            .cloned()
            .collect();
        let results = read_all(credentials, &snapshot.credentials, &self.context.upstream).await;
        let mut changed = Vec::new();
        for (index, (credential, outcome)) in results.into_iter().enumerate() {
            // Thousands of results are bookkeeping on a runtime worker: let requests in between.
            if index % 256 == 255 {
                tokio::task::yield_now().await;
            }
            let previous = snapshot.credentials.get(&credential.name);
            credential.series.read(outcome.result());
            self.schedule
                .after_read(&credential, outcome, Instant::now());
            if outcome == ReadOutcome::Changed {
                // The fleet's watcher of this store tells every other pod to read it now.
                if let Some(fleet) = self.context.fleet.as_ref() {
                    if credential.store_watch.is_some() && fleet.view().watching(&credential.name) {
                        fleet.send(Outgoing::Refresh {
                            credential: credential.name.clone(),
                        });
                    }
                }
                // Rotation is the cure: a new version starts with a closed breaker.
                credential.breaker.reset();
                credential.observe();
            }
            let error_changed = previous.is_some_and(|c| c.last_error != credential.last_error);
            if outcome == ReadOutcome::Changed || error_changed {
                changed.push(credential);
            }
        }
        if !changed.is_empty() {
            let credentials = snapshot.credentials.with_all(changed);
            self.context
                .state
                .publish(snapshot.with_credentials(credentials));
        }
    }

    /// Reloads the config file if its bytes changed. A broken config keeps the current one.
    async fn reload_config(&mut self) {
        let text = match std::fs::read(&self.config.path) {
            Ok(text) => text,
            Err(error) => {
                tracing::warn!(path = %self.config.path.display(), %error, "config unreadable; keeping the current one");
                self.count_config_reload("error");
                return;
            }
        };
        let digest = hash(&text);
        if self.config_hash == Some(digest) {
            return;
        }
        self.config_hash = Some(digest);
        // Parsing 10,000 credentials is milliseconds of CPU: off the runtime workers, so the
        // requests they carry are not held up behind it.
        let path = self.config.path.clone();
        let parsed = tokio::task::spawn_blocking(move || {
            std::str::from_utf8(&text)
                .map_err(|_| vec![format!("{}: not UTF-8", path.display())])
                .and_then(|text| Config::from_yaml(&path, text).map_err(|e| e.errors()))
        })
        .await
        .unwrap_or_else(|_| Err(vec!["the config parser stopped".to_string()]));
        let config = match parsed {
            Ok(config) => config,
            Err(errors) => {
                for error in errors {
                    tracing::warn!(%error, "config reload rejected; keeping the current config");
                }
                self.count_config_reload("error");
                return;
            }
        };
        if config.listen != self.config.listen || config.admin != self.config.admin {
            tracing::warn!(
                "listen/admin addresses changed in the config; they take effect on restart"
            );
        }
        self.apply_config(config).await;
        tracing::info!(
            routes = self.config.routes.len(),
            credentials = self.config.credentials.len(),
            "config reloaded"
        );
        self.count_config_reload("ok");
    }

    fn count_config_reload(&self, result: &str) {
        self.context
            .metrics
            .config_reloads
            .with_label_values(&[result])
            .inc();
    }

    /// Moves to `config`: reads what it defines afresh, keeps the rest (see `plan_next`),
    /// publishes routes, credentials, identities and dial rules as one snapshot.
    async fn apply_config(&mut self, config: Config) {
        let previous = self.context.state.load_full();
        // Planning walks every credential and route: off the workers too, like the parse.
        let planned = {
            let (previous, config, reporting) = (
                previous.clone(),
                config.clone(),
                self.context.reporting.clone(),
            );
            tokio::task::spawn_blocking(move || plan_next(&previous, &config, &reporting)).await
        };
        let Ok(mut next) = planned else {
            tracing::error!("planning the next snapshot failed; keeping the current one");
            return;
        };
        for old in &next.dropped {
            if old.store_watch.is_some() {
                let (old, upstream) = (old.clone(), self.context.upstream.clone());
                tokio::spawn(async move { release(&old, &upstream).await });
            }
            self.schedule.forget(&old.name);
            self.context.metrics.credentials.forget(&old.name);
        }
        if *next.dial_rules != *previous.dial_rules {
            let rules = next.dial_rules.clone();
            self.context.state.publish(previous.with_dial_rules(rules));
        }
        let fresh = std::mem::take(&mut next.fresh);
        let loaded: Vec<Credential> =
            read_all(fresh, &previous.credentials, &self.context.upstream)
                .await
                .into_iter()
                .map(|(credential, _)| credential)
                .collect();
        for credential in &loaded {
            credential.observe();
            let outcome = if credential.current.is_some() {
                ReadOutcome::Changed
            } else {
                ReadOutcome::Failed
            };
            self.schedule.forget(&credential.name);
            self.schedule
                .after_read(credential, outcome, Instant::now());
        }
        let built = {
            let config = config.clone();
            tokio::task::spawn_blocking(move || next.build(loaded, &config)).await
        };
        match built {
            Ok(snapshot) => self.context.state.publish(snapshot),
            Err(error) => {
                tracing::error!(%error, "building the next snapshot failed; keeping the current one");
                return;
            }
        }
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

/// The next credential another pod asked to be re-read; never, without a fleet.
async fn next_fleet_refresh(refreshes: &mut Option<FleetRefreshes>) -> Option<Arc<str>> {
    match refreshes {
        Some(refreshes) => refreshes.recv().await,
        None => std::future::pending().await,
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
