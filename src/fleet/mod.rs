//! State shared with the other sidecars of a fleet through Redis or Valkey: auth failures of a
//! credential *version* counted fleet-wide, breakers opened everywhere at once with one probe
//! per fleet (a lease with expiry), upstream 429 holds and operators' breaker switches. The
//! request path never waits on the store: breakers report through a queue, and a background
//! task applies what the store says to the local breakers. Without the store, every pod keeps
//! its local breaker, so protection never drops below a lone pod's. Only names, fingerprints,
//! counts and times go into the store, never a value.

mod message;
mod seal;
mod store;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::breaker::{Authority, BreakerEvent, BreakerEvents};
use crate::config::FleetConfig;
use crate::credentials::read_local;
use crate::state::SharedState;
use crate::telemetry::Metrics;
use crate::time;
use crate::tls::combined_bundle;
pub use message::{FleetMessage, ManualAction};
use seal::{Rejected, Seal};
use store::Store;

/// Events waiting for the store before new ones are dropped (the local breaker still acts).
const OUTBOX: usize = 4096;
/// How long one pod may hold the fleet's probe lease for a version.
const PROBE_LEASE: Duration = Duration::from_secs(10);
/// How often held breakers are checked for a due probe and fleet-wide limits take tokens.
const TICK: Duration = Duration::from_millis(100);
/// The least time between two refills, so demand between ticks refills at most this often.
const EAGER_REFILL_GAP: Duration = Duration::from_millis(50);
const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);
/// A pod that has not heartbeat for this long is no longer counted.
const POD_TTL: Duration = Duration::from_secs(15);
/// How long a secret store's watch lease lasts without renewal, and how often it is renewed: a
/// pod that dies holding it is replaced within the lease.
const WATCH_LEASE: Duration = Duration::from_secs(5);
const WATCH_RENEW_EVERY: Duration = Duration::from_secs(1);
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// What the rest of keystamp hands the fleet.
#[derive(Debug)]
pub enum Outgoing {
    /// The upstream asked this credential's traffic to wait (429 + `Retry-After`).
    Hold { credential: Arc<str>, seconds: u64 },
    /// An operator forced a breaker open or closed on this pod's admin listener.
    Manual {
        credential: Arc<str>,
        action: ManualAction,
        authority: Authority,
    },
    /// Every other pod should re-read this credential now (its store changed, or an operator
    /// asked).
    Refresh { credential: Arc<str> },
}

/// Credentials other pods asked this pod to re-read; the reloader drains it.
pub type FleetRefreshes = mpsc::UnboundedReceiver<Arc<str>>;

/// The fleet as the request path and the admin listener see it: a queue, and what is known.
#[derive(Clone)]
pub struct FleetLink {
    outgoing: mpsc::Sender<Outgoing>,
    view: Arc<FleetView>,
}

/// What this pod knows of the fleet, for `/status` and the gauges.
#[derive(Debug)]
pub struct FleetView {
    pub name: String,
    pub pod: String,
    store_up: AtomicBool,
    pods: AtomicI64,
    /// Credentials whose secret store this pod watches for the fleet (it holds the lease).
    watching: std::sync::Mutex<std::collections::HashSet<Arc<str>>>,
}

impl FleetView {
    /// Whether this pod should poll `credential`'s secret store itself: it holds the fleet's
    /// watch lease, or the store is out of reach (then every pod polls, as without a fleet).
    pub fn polls(&self, credential: &str) -> bool {
        !self.store_up() || self.lock_watching().contains(credential)
    }

    /// The credentials this pod watches for the fleet, for `/status`.
    pub fn watching(&self, credential: &str) -> bool {
        self.lock_watching().contains(credential)
    }

    fn lock_watching(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<Arc<str>>> {
        self.watching
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn store_up(&self) -> bool {
        self.store_up.load(Ordering::Relaxed)
    }

    pub fn pods(&self) -> i64 {
        self.pods.load(Ordering::Relaxed)
    }
}

impl FleetLink {
    /// Queues an event for the store; never waits.
    pub fn send(&self, event: Outgoing) {
        let _ = self.outgoing.try_send(event);
    }

    pub fn view(&self) -> &FleetView {
        &self.view
    }
}

/// Starts the fleet task. Returns the link and the queue breakers report into.
pub fn start(
    config: &FleetConfig,
    extra_roots: &[std::path::PathBuf],
    state: Arc<SharedState>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> (FleetLink, BreakerEvents, FleetRefreshes) {
    // `rediss://` goes through rustls: the same provider as everywhere else in keystamp.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (outgoing, outbox) = mpsc::channel(OUTBOX);
    let (breaker_events, breaker_outbox) = mpsc::channel(OUTBOX);
    let pod = pod_name();
    let view = Arc::new(FleetView {
        name: config.name.clone(),
        pod: pod.clone(),
        store_up: AtomicBool::new(false),
        pods: AtomicI64::new(0),
        watching: std::sync::Mutex::default(),
    });
    let (refreshes, refresh_requests) = mpsc::unbounded_channel();
    metrics.fleet_store_up.set(0);
    let task = FleetTask {
        config: config.clone(),
        roots: store_roots(extra_roots),
        state,
        metrics,
        view: view.clone(),
        outbox,
        breaker_outbox,
        shutdown,
        seal: Seal::new(&config.name, None),
        refreshes,
    };
    tokio::spawn(task.supervise());
    (
        FleetLink { outgoing, view },
        breaker_events,
        refresh_requests,
    )
}

/// The system roots plus `upstream_tls.extra_roots`, as one PEM: what a `rediss://` store's
/// certificate is verified against (added to, never instead of, the system's).
fn store_roots(extra_roots: &[std::path::PathBuf]) -> String {
    let extra: String = extra_roots
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .collect::<Vec<_>>()
        .join("\n");
    combined_bundle(&extra)
}

/// This pod's name in the fleet: the pod's name (or host name) and a per-process suffix, so two
/// processes never take each other's messages for their own.
fn pod_name() -> String {
    let name = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "pod".to_string());
    format!("{name}/{:08x}", rand_u32())
}

fn rand_u32() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    nanos ^ std::process::id().rotate_left(16)
}

struct FleetTask {
    config: FleetConfig,
    /// PEM the store's TLS certificate is verified against.
    roots: String,
    state: Arc<SharedState>,
    metrics: Arc<Metrics>,
    view: Arc<FleetView>,
    outbox: mpsc::Receiver<Outgoing>,
    breaker_outbox: mpsc::Receiver<BreakerEvent>,
    shutdown: CancellationToken,
    /// Seals what this pod writes and opens what it reads; re-keyed at every connect.
    seal: Seal,
    /// Where other pods' refresh requests go (the reloader).
    refreshes: mpsc::UnboundedSender<Arc<str>>,
}

impl FleetTask {
    /// Runs the task; a panic in it (a bug, or input nobody foresaw) is caught, counted in
    /// `keystamp_fleet_task_restarts_total`, reported as the store being down, and the task
    /// starts over, so fleet events never silently stop while `store_up` still says 1.
    async fn supervise(mut self) {
        loop {
            match std::panic::AssertUnwindSafe(self.run())
                .catch_unwind()
                .await
            {
                Ok(()) => return,
                Err(_) => {
                    self.set_up(false);
                    self.metrics.fleet_task_restarts.inc();
                    tracing::error!(
                        "the fleet task crashed; restarting it (local breakers meanwhile)"
                    );
                    if self.pause(FIRST_BACKOFF).await {
                        return;
                    }
                }
            }
        }
    }

    /// Connects, serves until the store fails, backs off, reconnects: forever, until shutdown.
    async fn run(&mut self) {
        let mut backoff = FIRST_BACKOFF;
        loop {
            let url = match read_local(&self.config.store_url) {
                Some(Ok(fetched)) => fetched.secret,
                _ => {
                    tracing::warn!("fleet store URL unreadable; local breakers only");
                    self.limits_alone();
                    if self.pause(MAX_BACKOFF).await {
                        return;
                    }
                    continue;
                }
            };
            let Some(key) = self.fleet_key() else {
                tracing::warn!("fleet key unreadable; not joining the fleet until it can be read");
                self.limits_alone();
                if self.pause(MAX_BACKOFF).await {
                    return;
                }
                continue;
            };
            self.seal = Seal::new(
                &self.config.name,
                key.as_ref().map(|k| k.expose().as_bytes()),
            );
            match Store::connect(url.expose(), &self.config.name, &self.roots).await {
                Ok((store, subscription)) => {
                    backoff = FIRST_BACKOFF;
                    self.set_up(true);
                    tracing::info!(fleet = %self.config.name, pod = %self.view.pod, "fleet store connected");
                    let ended = self.serve(store, subscription).await;
                    self.set_up(false);
                    match ended {
                        Served::Shutdown => return,
                        Served::StoreFailed(error) => {
                            tracing::warn!(%error, "fleet store lost; local breakers only until it is back");
                        }
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "fleet store unreachable; local breakers only");
                    self.limits_alone();
                }
            }
            // Drain what piled up: those events are about a past the store did not see.
            while self.outbox.try_recv().is_ok() {}
            while self.breaker_outbox.try_recv().is_ok() {}
            if self.pause(backoff).await {
                return;
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Sleeps `wait`; `true` when shutdown came first.
    async fn pause(&self, wait: Duration) -> bool {
        tokio::select! {
            () = self.shutdown.cancelled() => true,
            () = tokio::time::sleep(wait) => false,
        }
    }

    /// `Some(None)`: no `fleet.key` configured; `None`: configured but unreadable.
    fn fleet_key(&self) -> Option<Option<crate::secret::Secret>> {
        let Some(source) = &self.config.key else {
            return Some(None);
        };
        match read_local(source) {
            Some(Ok(fetched)) => Some(Some(fetched.secret)),
            _ => None,
        }
    }

    fn rejected(&self, reason: &'static str) {
        tracing::debug!(reason, "fleet message dropped");
        self.metrics
            .fleet_rejected
            .with_label_values(&[reason])
            .inc();
    }

    fn set_up(&self, up: bool) {
        if !up {
            self.view.lock_watching().clear();
        }
        self.view.store_up.store(up, Ordering::Relaxed);
        self.metrics.fleet_store_up.set(i64::from(up));
        if !up {
            self.limits_alone();
        }
    }

    async fn serve(&mut self, mut store: Store, mut subscription: store::Subscription) -> Served {
        // Join: apply what the fleet already holds open.
        match store.open_versions().await {
            Ok(open) => {
                for text in open {
                    match self.seal.open_entry(&text, std::time::SystemTime::now()) {
                        Ok(message) => self.apply(&message),
                        Err(rejected) => self.rejected(rejected.label()),
                    }
                }
            }
            Err(error) => return Served::StoreFailed(error),
        }
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next_heartbeat = Instant::now();
        let mut next_watch = Instant::now();
        let mut last_refill = Instant::now();
        loop {
            let result = tokio::select! {
                () = self.shutdown.cancelled() => return Served::Shutdown,
                message = subscription.next() => match message {
                    Some(text) => {
                        let opened = text
                            .ok_or(Rejected::Unparseable)
                            .and_then(|text| self.seal.open_message(&text, std::time::SystemTime::now()));
                        match opened {
                            Ok(message) => self.apply(&message),
                            Err(rejected) => self.rejected(rejected.label()),
                        }
                        Ok(())
                    }
                    None => Err(store::StoreError::Closed),
                },
                Some(event) = self.breaker_outbox.recv() => self.report(&mut store, event).await,
                Some(outgoing) = self.outbox.recv() => self.publish(&mut store, outgoing).await,
                // A request found no fleet token in hand: refill now, unless a refill ran moments
                // ago (then the tick's comes soon enough, and an overloaded pod does not turn
                // every refused request into a store round trip).
                () = crate::limits::fleet_demand().notified() => {
                    if last_refill.elapsed() >= EAGER_REFILL_GAP {
                        last_refill = Instant::now();
                        self.refill_limits(&mut store).await
                    } else {
                        Ok(())
                    }
                }
                _ = tick.tick() => {
                    let mut result = self.probe_leases(&mut store).await;
                    if result.is_ok() {
                        last_refill = Instant::now();
                        result = self.refill_limits(&mut store).await;
                    }
                    if result.is_ok() && Instant::now() >= next_heartbeat {
                        next_heartbeat = Instant::now() + HEARTBEAT_EVERY;
                        result = self.heartbeat(&mut store).await;
                    }
                    if result.is_ok() && Instant::now() >= next_watch {
                        next_watch = Instant::now() + WATCH_RENEW_EVERY;
                        result = self.hold_watches(&mut store).await;
                    }
                    result
                }
            };
            if let Err(error) = result {
                return Served::StoreFailed(error);
            }
        }
    }

    /// A breaker's event, counted and published.
    async fn report(
        &self,
        store: &mut Store,
        event: BreakerEvent,
    ) -> Result<(), store::StoreError> {
        match event {
            BreakerEvent::AuthFailure {
                credential,
                fingerprint,
            } => {
                let Some(settings) = self.breaker_settings(&credential) else {
                    return Ok(());
                };
                let count = store
                    .count_failure(&credential, &fingerprint, settings.max_open_for)
                    .await?;
                // Exactly one pod crosses the threshold and tells the fleet.
                if count == u64::from(settings.failures) {
                    let message = FleetMessage::Open {
                        credential: credential.to_string(),
                        fingerprint,
                        reason: format!("upstream auth failures x{count} across the fleet"),
                        open_for_ms: duration_ms(settings.open_for),
                        from: self.view.pod.clone(),
                    };
                    let sealed = self.seal.seal(&message, std::time::SystemTime::now());
                    store
                        .announce_open(&message, &sealed, settings.open_for)
                        .await?;
                    self.apply(&message);
                }
                Ok(())
            }
            BreakerEvent::Recovered {
                credential,
                fingerprint,
            } => store.clear_failures(&credential, &fingerprint).await,
            BreakerEvent::Opened {
                credential,
                fingerprint,
                reason,
                open_for,
            } => {
                store.release_probe(&credential, &fingerprint).await?;
                let message = FleetMessage::Open {
                    credential: credential.to_string(),
                    fingerprint,
                    reason,
                    open_for_ms: duration_ms(open_for),
                    from: self.view.pod.clone(),
                };
                let sealed = self.seal.seal(&message, std::time::SystemTime::now());
                store.announce_open(&message, &sealed, open_for).await
            }
            BreakerEvent::Closed {
                credential,
                fingerprint,
            } => {
                store.release_probe(&credential, &fingerprint).await?;
                store.clear_failures(&credential, &fingerprint).await?;
                let message = FleetMessage::Close {
                    credential: credential.to_string(),
                    fingerprint,
                    from: self.view.pod.clone(),
                };
                let sealed = self.seal.seal(&message, std::time::SystemTime::now());
                store.announce_close(&message, &sealed).await
            }
        }
    }

    async fn publish(
        &self,
        store: &mut Store,
        outgoing: Outgoing,
    ) -> Result<(), store::StoreError> {
        let message = match outgoing {
            Outgoing::Hold {
                credential,
                seconds,
            } => FleetMessage::Hold {
                credential: credential.to_string(),
                seconds,
                from: self.view.pod.clone(),
            },
            Outgoing::Refresh { credential } => FleetMessage::Refresh {
                credential: credential.to_string(),
                from: self.view.pod.clone(),
            },
            Outgoing::Manual {
                credential,
                action,
                authority,
            } => {
                let at_ms = seal::unix_ms(std::time::SystemTime::now());
                let (credential, from) = (credential.to_string(), self.view.pod.clone());
                let proof = match (authority, self.admin_token()) {
                    (Authority::AdminToken, Some(token)) => Some(seal::manual_proof(
                        token.expose().as_bytes(),
                        &seal::ManualFacts {
                            fleet: &self.config.name,
                            credential: &credential,
                            action,
                            at_ms,
                            from: &from,
                        },
                    )),
                    _ => None,
                };
                FleetMessage::Manual {
                    credential,
                    action,
                    from,
                    at_ms,
                    proof,
                }
            }
        };
        let sealed = self.seal.seal(&message, std::time::SystemTime::now());
        store.publish(&sealed).await
    }

    /// For each breaker the fleet holds open past its period: try for the one probe lease.
    async fn probe_leases(&self, store: &mut Store) -> Result<(), store::StoreError> {
        let now = Instant::now();
        let due: Vec<_> = self
            .state
            .load()
            .credentials
            .iter()
            .filter_map(|c| Some((c.clone(), c.breaker.fleet_probe_due(now)?)))
            .collect();
        for (credential, fingerprint) in due {
            if store
                .take_probe(&credential.name, &fingerprint, &self.view.pod, PROBE_LEASE)
                .await?
            {
                tracing::info!(credential = %credential.name, fingerprint, "this pod holds the fleet's probe");
                credential.breaker.fleet_release_for_probe();
            }
        }
        Ok(())
    }

    /// One pod per fleet watches each secret-store credential: take or keep the lease for every
    /// one, so the store's polls do not grow with the number of pods.
    async fn hold_watches(&self, store: &mut Store) -> Result<(), store::StoreError> {
        let watched: Vec<Arc<str>> = self
            .state
            .load()
            .credentials
            .iter()
            .filter(|c| c.store_watch.is_some())
            .map(|c| c.name.clone())
            .collect();
        let mut holding = std::collections::HashSet::new();
        for credential in watched {
            if store
                .hold_watch(&credential, &self.view.pod, WATCH_LEASE)
                .await?
            {
                holding.insert(credential);
            }
        }
        let mut watching = self.view.lock_watching();
        for gained in holding.difference(&watching) {
            tracing::info!(credential = %gained, "this pod watches the secret store for the fleet");
        }
        *watching = holding;
        Ok(())
    }

    async fn heartbeat(&self, store: &mut Store) -> Result<(), store::StoreError> {
        let pods = store.heartbeat(&self.view.pod, POD_TTL).await?;
        self.view.pods.store(pods, Ordering::Relaxed);
        self.metrics.fleet_pods.set(pods);
        let share = u32::try_from(pods).unwrap_or(1);
        for credential in self.state.load().credentials.iter() {
            credential.limits.set_fleet_pods(share);
        }
        Ok(())
    }

    /// Fleet-wide limits: take from the store's bucket what each was asked for since the last
    /// refill, ahead of the requests that will spend it.
    async fn refill_limits(&self, store: &mut Store) -> Result<(), store::StoreError> {
        let snapshot = self.state.load_full();
        for credential in snapshot.credentials.iter() {
            let Some(spec) = credential.limits.spec else {
                continue;
            };
            let Some(want) = credential.limits.fleet_want() else {
                // Nothing wanted (or not fleet-wide): the store is not asked.
                credential.limits.fleet_granted(Some(0));
                continue;
            };
            let taken = store
                .take_tokens(&credential.name, spec.per_second, spec.burst, want)
                .await;
            match taken {
                Ok(tokens) => credential.limits.fleet_granted(Some(tokens)),
                Err(error) => {
                    credential.limits.fleet_granted(None);
                    return Err(error);
                }
            }
        }
        Ok(())
    }

    /// The store is out of reach: fleet-wide limits fall back to this pod's share.
    fn limits_alone(&self) {
        let pods = match self.view.pods() {
            0 => self.config.replicas_hint.unwrap_or(1),
            seen => u32::try_from(seen).unwrap_or(1),
        };
        for credential in self.state.load().credentials.iter() {
            credential.limits.fleet_granted(None);
            credential.limits.set_fleet_pods(pods);
        }
    }

    /// Applies a message from the store to the local breakers and limits. A message can open
    /// or hold, or close what the fleet itself opened; it never touches which value is stamped.
    fn apply(&self, message: &FleetMessage) {
        let snapshot = self.state.load();
        let Some(credential) = snapshot.credentials.get(message.credential()) else {
            return;
        };
        let current = credential.current.as_ref().map(|v| v.fingerprint.as_str());
        let kind = message.kind();
        let applied = match message {
            // Only the version that failed is held: a pod that already rotated is not. Our own
            // announcements are held too, so that every pod's probe goes by the lease.
            FleetMessage::Open {
                fingerprint,
                reason,
                open_for_ms,
                ..
            } if current == Some(fingerprint.as_str()) => {
                // Never longer than this pod's own config allows, whatever the message says.
                let max = credential.spec.breaker.max_open_for;
                let open_for = time::capped(*open_for_ms, time::Unit::Millis, max);
                credential
                    .breaker
                    .fleet_open(fingerprint, reason, open_for, Instant::now());
                true
            }
            FleetMessage::Close {
                fingerprint, from, ..
            } if *from != self.view.pod => {
                credential.breaker.fleet_close(fingerprint);
                true
            }
            FleetMessage::Hold { seconds, from, .. } if *from != self.view.pod => {
                let max = credential.spec.breaker.max_hold;
                let hold = time::capped(*seconds, time::Unit::Seconds, max);
                credential.limits.hold(time::deadline(Instant::now(), hold));
                true
            }
            FleetMessage::Refresh { from, .. } if *from != self.view.pod => {
                let _ = self.refreshes.send(credential.name.clone());
                true
            }
            FleetMessage::Manual {
                action,
                from,
                at_ms,
                proof,
                ..
            } if *from != self.view.pod => {
                let authority = self.manual_authority(
                    credential.name.as_ref(),
                    *action,
                    from,
                    *at_ms,
                    proof.as_deref(),
                );
                tracing::warn!(credential = %credential.name, action = action.label(), from = %from, ?authority, "breaker set by an operator on another pod");
                match action {
                    ManualAction::Open => credential.breaker.force_open(Instant::now(), authority),
                    ManualAction::Close => {
                        if !credential.breaker.force_close(authority) {
                            tracing::warn!(credential = %credential.name, from = %from, "a close without the admin token's proof cannot undo an open made with it");
                            self.rejected("lacks_authority");
                            return;
                        }
                        credential.limits.clear_hold();
                    }
                }
                credential.series.manual_action(action.label());
                true
            }
            _ => false,
        };
        if applied {
            self.metrics.fleet_events.with_label_values(&[kind]).inc();
        }
    }

    fn admin_token(&self) -> Option<crate::secret::Secret> {
        match read_local(self.config.admin_token.as_ref()?) {
            Some(Ok(fetched)) => Some(fetched.secret),
            _ => None,
        }
    }

    /// An operator's switch from another pod proves the admin token when its proof checks out
    /// under this pod's token and it is fresh.
    fn manual_authority(
        &self,
        credential: &str,
        action: ManualAction,
        from: &str,
        at_ms: u64,
        proof: Option<&str>,
    ) -> Authority {
        let (Some(proof), Some(token)) = (proof, self.admin_token()) else {
            return Authority::Unproven;
        };
        let facts = seal::ManualFacts {
            fleet: &self.config.name,
            credential,
            action,
            at_ms,
            from,
        };
        let fresh = seal::unix_ms(std::time::SystemTime::now()).abs_diff(at_ms)
            <= u64::try_from(seal::MAX_SKEW.as_millis()).unwrap_or(u64::MAX);
        if fresh && seal::manual_proof_holds(token.expose().as_bytes(), &facts, proof) {
            Authority::AdminToken
        } else {
            Authority::Unproven
        }
    }

    fn breaker_settings(&self, credential: &str) -> Option<crate::config::BreakerSettings> {
        let snapshot = self.state.load();
        Some(snapshot.credentials.get(credential)?.spec.breaker)
    }
}

enum Served {
    Shutdown,
    StoreFailed(store::StoreError),
}

fn duration_ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Fleet status for `/status`: per credential, whether the fleet holds its breaker.
pub fn held_by_fleet(state: &SharedState) -> HashMap<Arc<str>, bool> {
    state
        .load()
        .credentials
        .iter()
        .map(|c| (c.name.clone(), c.breaker.fleet_held()))
        .collect()
}
