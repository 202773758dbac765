//! The metric families and the few helpers that keep their label sets consistent.

use crate::telemetry::credential_series::CredentialSeries;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Request durations reach well past a minute: LLM calls stream for long.
const DURATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
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
    pub audit_dropped: prometheus::IntCounter,
    /// Every per-credential family, kept apart from the registry (see `credential_series`).
    pub credentials: CredentialSeries,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// Every family, each credential's counters written from zero (see [`Metrics::build`]).
    pub fn new() -> Result<Self, prometheus::Error> {
        Self::build(true)
    }

    /// Builds and registers every family. Registration only fails on a duplicate name, which
    /// would be a bug here; the error is returned rather than panicking. `zero_series`: whether
    /// a credential's counters are written before they count anything (`metrics.zero_series`).
    pub fn build(zero_series: bool) -> Result<Self, prometheus::Error> {
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
            audit_dropped,
            credentials: CredentialSeries::new(zero_series),
        })
    }

    /// The Prometheus text exposition of every family.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        if let Err(error) = TextEncoder::new().encode(&self.registry.gather(), &mut buffer) {
            tracing::warn!(%error, "metrics could not be encoded");
        }
        let mut text = String::from_utf8(buffer).unwrap_or_default();
        self.credentials.render(&mut text);
        text
    }
}
