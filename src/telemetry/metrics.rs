//! The metric families and the few helpers that keep their label sets consistent.

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Request durations reach well past a minute: LLM calls stream for long.
const DURATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// What the gauges show of one credential version: never its value.
#[derive(Debug, Clone, Copy)]
pub struct ObservedVersion<'a> {
    pub fingerprint: &'a str,
    pub expires_at: Option<std::time::SystemTime>,
}

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub auth_failures: IntCounterVec,
    pub breaker_state: IntGaugeVec,
    pub breaker_transitions: IntCounterVec,
    pub credential_expiry: GaugeVec,
    pub credential_version: IntGaugeVec,
    pub credential_reloads: IntCounterVec,
    pub credential_store_polls: IntCounterVec,
    pub config_reloads: IntCounterVec,
    pub connect: IntCounterVec,
    pub tls_handshake_errors: IntCounterVec,
    pub connections_open: IntGauge,
    pub connections_refused: prometheus::IntCounter,
    pub fleet_store_up: IntGauge,
    pub fleet_events: IntCounterVec,
    pub fleet_rejected: IntCounterVec,
    pub transparent_connections: IntCounterVec,
    pub fleet_task_restarts: prometheus::IntCounter,
    pub fleet_pods: IntGauge,
    pub build_info: IntGaugeVec,
    pub breaker_manual: IntCounterVec,
    pub rate_limited: IntCounterVec,
    pub audit_dropped: prometheus::IntCounter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// Builds and registers every family. Registration only fails on a duplicate name, which
    /// would be a bug here; the error is returned rather than panicking.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let counter =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
                let family = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(family.clone()))?;
                Ok(family)
            };
        let gauge =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntGaugeVec, prometheus::Error> {
                let family = IntGaugeVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(family.clone()))?;
                Ok(family)
            };
        let requests = counter(
            "keystamp_requests_total",
            "Requests by route, credential, agent, status class and who answered (upstream or keystamp).",
            &["route", "credential", "agent", "code", "origin"],
        )?;
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "keystamp_request_duration_seconds",
                "Time from request to response headers.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["route", "credential"],
        )?;
        registry.register(Box::new(request_duration.clone()))?;
        let auth_failures = counter(
            "keystamp_auth_failures_total",
            "Upstream answers that said the credential itself is bad.",
            &["credential", "status"],
        )?;
        let breaker_state = gauge(
            "keystamp_breaker_state",
            "Auth circuit breaker per credential: 0 closed, 1 open, 2 half-open.",
            &["credential"],
        )?;
        let breaker_transitions = counter(
            "keystamp_breaker_transitions_total",
            "Breaker state changes per credential.",
            &["credential", "to"],
        )?;
        let credential_expiry = GaugeVec::new(
            Opts::new(
                "keystamp_credential_expiry_timestamp_seconds",
                "When the current version of a credential expires (Unix time).",
            ),
            &["credential"],
        )?;
        registry.register(Box::new(credential_expiry.clone()))?;
        let credential_version = gauge(
            "keystamp_credential_version_info",
            "The fingerprint of each credential's current version (value 1).",
            &["credential", "fingerprint"],
        )?;
        let credential_reloads = counter(
            "keystamp_credential_reloads_total",
            "Credential reads by result: changed, unchanged, error.",
            &["credential", "result"],
        )?;
        let credential_store_polls = counter(
            "keystamp_credential_store_polls_total",
            "Polls of a secret store (vault) by result: changed, unchanged, error.",
            &["credential", "result"],
        )?;
        let config_reloads = counter(
            "keystamp_config_reloads_total",
            "Config reloads by result: ok, error.",
            &["result"],
        )?;
        let connect = counter(
            "keystamp_connect_total",
            "CONNECT requests by decision: intercept, tunnel, deny.",
            &["decision"],
        )?;
        let tls_handshake_errors = counter(
            "keystamp_tls_handshake_errors_total",
            "Failed TLS handshakes by side: agent, upstream.",
            &["side"],
        )?;
        let connections_open =
            IntGauge::new("keystamp_connections_open", "Agent connections open now.")?;
        registry.register(Box::new(connections_open.clone()))?;
        let connections_refused = prometheus::IntCounter::new(
            "keystamp_connections_refused_total",
            "Agent connections refused because max_connections were open.",
        )?;
        registry.register(Box::new(connections_refused.clone()))?;
        let fleet_store_up = IntGauge::new(
            "keystamp_fleet_store_up",
            "1 while the fleet store answers, 0 while this pod runs on local breakers only.",
        )?;
        registry.register(Box::new(fleet_store_up.clone()))?;
        let fleet_pods = IntGauge::new(
            "keystamp_fleet_pods",
            "Pods of this fleet that heartbeat into the store.",
        )?;
        registry.register(Box::new(fleet_pods.clone()))?;
        let fleet_events = counter(
            "keystamp_fleet_events_total",
            "Fleet messages applied on this pod by kind: open, close, hold, manual.",
            &["kind"],
        )?;
        let fleet_rejected = counter(
            "keystamp_fleet_messages_rejected_total",
            "Fleet messages and index entries dropped by reason: unparseable, unauthenticated, other_fleet, stale, replayed, lacks_authority.",
            &["reason"],
        )?;
        let transparent_connections = counter(
            "keystamp_transparent_connections_total",
            "Connections netfilter redirected to keystamp, by decision: intercept, http, tunnel, deny, no_destination.",
            &["decision"],
        )?;
        let fleet_task_restarts = prometheus::IntCounter::new(
            "keystamp_fleet_task_restarts_total",
            "Times the fleet task crashed and was restarted.",
        )?;
        registry.register(Box::new(fleet_task_restarts.clone()))?;
        let breaker_manual = counter(
            "keystamp_breaker_manual_actions_total",
            "Breakers forced open or closed by an operator through the admin listener.",
            &["credential", "action"],
        )?;
        let rate_limited = counter(
            "keystamp_rate_limited_total",
            "Requests keystamp answered 429 itself: over the credential's rate limit or held after an upstream 429.",
            &["credential"],
        )?;
        let audit_dropped = prometheus::IntCounter::new(
            "keystamp_audit_dropped_total",
            "Audit lines dropped because the writer fell behind.",
        )?;
        registry.register(Box::new(audit_dropped.clone()))?;
        let build_info = gauge(
            "keystamp_build_info",
            "keystamp's version (value 1).",
            &["version"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        // Every label set known without a credential starts at zero, so `increase(...) > 0`
        // alerts see the first event and dashboards show 0 rather than "no data".
        for result in ["ok", "error"] {
            config_reloads.with_label_values(&[result]);
        }
        for side in ["agent", "upstream"] {
            tls_handshake_errors.with_label_values(&[side]);
        }
        for decision in ["intercept", "tunnel", "deny"] {
            connect.with_label_values(&[decision]);
        }
        Ok(Self {
            registry,
            requests,
            request_duration,
            auth_failures,
            breaker_state,
            breaker_transitions,
            credential_expiry,
            credential_version,
            credential_reloads,
            credential_store_polls,
            config_reloads,
            connect,
            tls_handshake_errors,
            connections_open,
            connections_refused,
            fleet_store_up,
            fleet_events,
            fleet_rejected,
            transparent_connections,
            fleet_task_restarts,
            fleet_pods,
            build_info,
            breaker_manual,
            rate_limited,
            audit_dropped,
        })
    }

    /// The Prometheus text exposition of every family.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        if let Err(error) = TextEncoder::new().encode(&self.registry.gather(), &mut buffer) {
            tracing::warn!(%error, "metrics could not be encoded");
        }
        String::from_utf8(buffer).unwrap_or_default()
    }

    /// Keeps the version and expiry gauges in step with a credential's current version.
    pub fn observe_version(
        &self,
        name: &str,
        current: Option<ObservedVersion<'_>>,
        previous_fingerprint: Option<&str>,
    ) {
        if let Some(previous) = previous_fingerprint {
            if current.map(|v| v.fingerprint) != Some(previous) {
                let _ = self
                    .credential_version
                    .remove_label_values(&[name, previous]);
            }
        }
        match current {
            Some(version) => {
                self.credential_version
                    .with_label_values(&[name, version.fingerprint])
                    .set(1);
                match version.expires_at {
                    Some(at) => {
                        let seconds = at
                            .duration_since(std::time::UNIX_EPOCH)
                            .map(|d| d.as_secs_f64())
                            .unwrap_or(0.0);
                        self.credential_expiry
                            .with_label_values(&[name])
                            .set(seconds);
                    }
                    None => {
                        let _ = self.credential_expiry.remove_label_values(&[name]);
                    }
                }
            }
            None => {
                let _ = self.credential_expiry.remove_label_values(&[name]);
            }
        }
    }

    /// Starts a credential's counters at zero when it is defined (its reload counters are made
    /// with it). The expiry gauge is left out until a version has an expiry: a 0 there would
    /// read as "expired in 1970" to an alert on `expiry - time()`.
    pub fn define_credential(&self, name: &str) {
        for status in ["401", "403"] {
            self.auth_failures.with_label_values(&[name, status]);
        }
        for to in ["open", "half_open", "closed"] {
            self.breaker_transitions.with_label_values(&[name, to]);
        }
        for action in ["open", "close"] {
            self.breaker_manual.with_label_values(&[name, action]);
        }
        self.rate_limited.with_label_values(&[name]);
    }

    /// Drops every series of a credential that no longer exists.
    pub fn forget_credential(&self, name: &str, fingerprint: Option<&str>) {
        if let Some(fingerprint) = fingerprint {
            let _ = self
                .credential_version
                .remove_label_values(&[name, fingerprint]);
        }
        let _ = self.credential_expiry.remove_label_values(&[name]);
        let _ = self.breaker_state.remove_label_values(&[name]);
        for status in ["401", "403"] {
            let _ = self.auth_failures.remove_label_values(&[name, status]);
        }
        for to in ["open", "half_open", "closed"] {
            let _ = self.breaker_transitions.remove_label_values(&[name, to]);
        }
        for action in ["open", "close"] {
            let _ = self.breaker_manual.remove_label_values(&[name, action]);
        }
        let _ = self.rate_limited.remove_label_values(&[name]);
    }
}
