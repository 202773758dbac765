//! The state every request reads: one immutable [`Snapshot`] of routes, credentials, identities
//! and dial rules, published whole behind an `ArcSwap` ([`SharedState`]). Requests load it once;
//! the reloader is its only writer. [`plan_next`] is the one place that decides what a new config
//! keeps, re-reads or drops, and so where runtime state (breakers, limits) is carried over.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::{ArcSwap, Guard};

use crate::config::{Config, Unmatched};
use crate::credentials::{Credential, CredentialTable, Reporting};
use crate::identity::IdentityTable;
use crate::limits::Limits;
use crate::routes::RouteTable;
use crate::upstream::{DialRules, DialRulesSource};

/// Everything a request needs to decide, built whole and swapped whole.
#[derive(Debug)]
pub struct Snapshot {
    /// Shared between snapshots until the config itself changes.
    pub routes: Arc<RouteTable>,
    pub credentials: CredentialTable,
    pub unmatched: Unmatched,
    pub identities: Arc<IdentityTable>,
    /// `resolve:` pins and egress policy: published with the routes that rely on them.
    pub dial_rules: Arc<DialRules>,
}

impl Snapshot {
    /// What keystamp holds before its first load: the config's dial rules (token endpoints are
    /// dialled during that load) and nothing to serve.
    pub fn before_first_load(config: &Config) -> Self {
        Self {
            routes: Arc::default(),
            credentials: CredentialTable::default(),
            unmatched: config.unmatched,
            identities: Arc::default(),
            dial_rules: Arc::new(DialRules::from_config(config)),
        }
    }

    /// The same snapshot with another credential table (a source was re-read).
    pub fn with_credentials(&self, credentials: CredentialTable) -> Self {
        Self {
            routes: self.routes.clone(),
            credentials,
            unmatched: self.unmatched,
            identities: self.identities.clone(),
            dial_rules: self.dial_rules.clone(),
        }
    }

    /// The same snapshot with other dial rules: a new config's pins are published before its new
    /// credentials are read, so their token endpoints are reached where the config says.
    pub fn with_dial_rules(&self, dial_rules: Arc<DialRules>) -> Self {
        Self {
            routes: self.routes.clone(),
            credentials: self.credentials.clone(),
            unmatched: self.unmatched,
            identities: self.identities.clone(),
            dial_rules,
        }
    }

    /// The same snapshot with other identities (an agent's token rotated).
    pub fn with_identities(&self, identities: IdentityTable) -> Self {
        Self {
            routes: self.routes.clone(),
            credentials: self.credentials.clone(),
            unmatched: self.unmatched,
            identities: Arc::new(identities),
            dial_rules: self.dial_rules.clone(),
        }
    }
}

/// The cell requests read the current snapshot from.
#[derive(Debug)]
pub struct SharedState {
    current: ArcSwap<Snapshot>,
}

impl SharedState {
    pub fn new(snapshot: Snapshot) -> Self {
        Self {
            current: ArcSwap::from_pointee(snapshot),
        }
    }

    /// The current snapshot; load it once per request.
    pub fn load(&self) -> Guard<Arc<Snapshot>> {
        self.current.load()
    }

    /// The current snapshot as an owned `Arc`, for the writer that builds the next one.
    pub fn load_full(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Publishes a new snapshot; requests already running keep the one they loaded.
    pub fn publish(&self, snapshot: Snapshot) {
        self.current.store(Arc::new(snapshot));
    }
}

impl DialRulesSource for SharedState {
    fn dial_rules(&self) -> Arc<DialRules> {
        self.current.load().dial_rules.clone()
    }
}

/// What moving from one snapshot to a config changes. Credentials whose definition is unchanged
/// are kept whole (version, breaker, limits); new or redefined ones start fresh and must be read
/// before [`NextState::build`]; the rest are dropped.
pub struct NextState {
    pub kept: Vec<Arc<Credential>>,
    pub fresh: Vec<Arc<Credential>>,
    pub dropped: Vec<Arc<Credential>>,
    routes: Arc<RouteTable>,
    unmatched: Unmatched,
    agent_limits: HashMap<Arc<str>, Arc<Limits>>,
    pub dial_rules: Arc<DialRules>,
}

/// Decides what `config` keeps from `previous`, what it reads afresh and what it drops.
pub fn plan_next(previous: &Snapshot, config: &Config, reporting: &Reporting) -> NextState {
    let mut kept = Vec::new();
    let mut fresh = Vec::new();
    for (name, spec) in &config.credentials {
        match previous.credentials.get(name.as_str()) {
            Some(existing) if existing.spec == *spec => kept.push(existing.clone()),
            _ => fresh.push(Arc::new(Credential::fresh(
                Arc::from(name.as_str()),
                spec.clone(),
                reporting,
            ))),
        }
    }
    let dropped = previous
        .credentials
        .iter()
        .filter(|old| !config.credentials.contains_key(old.name.as_ref()))
        .cloned()
        .collect();
    NextState {
        kept,
        fresh,
        dropped,
        routes: Arc::new(RouteTable::new(&config.routes)),
        unmatched: config.unmatched,
        agent_limits: agent_limits(&previous.identities, config),
        dial_rules: Arc::new(DialRules::from_config(config)),
    }
}

/// Each agent's limiter: the previous one while its settings are unchanged, else a new one.
fn agent_limits(previous: &IdentityTable, config: &Config) -> HashMap<Arc<str>, Arc<Limits>> {
    config
        .identities
        .iter()
        .filter(|(_, spec)| spec.rate_limit.is_some())
        .map(|(name, spec)| {
            let kept = previous
                .all_limits()
                .get(name.as_str())
                .filter(|limits| limits.spec == spec.rate_limit)
                .cloned();
            let limits = kept.unwrap_or_else(|| Arc::new(Limits::new(spec.rate_limit)));
            (Arc::from(name.as_str()), limits)
        })
        .collect()
}

impl NextState {
    /// The next snapshot: the kept credentials plus `loaded` (the fresh ones after their read),
    /// and identities read from `config`.
    pub fn build(self, loaded: Vec<Credential>, config: &Config) -> Snapshot {
        let credentials = self
            .kept
            .into_iter()
            .chain(loaded.into_iter().map(Arc::new));
        Snapshot {
            routes: self.routes,
            credentials: CredentialTable::from_credentials(credentials),
            unmatched: self.unmatched,
            identities: Arc::new(IdentityTable::read(config, self.agent_limits)),
            dial_rules: self.dial_rules,
        }
    }
}
