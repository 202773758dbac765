//! One request's account: filled in as the pipeline learns the route, credential and outcome,
//! and finished when the response body ends (or the agent goes away), so durations and byte
//! counts cover streamed responses whole. Finishing records the metrics and the audit line.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use http::{Method, StatusCode};
use tokio::time::Instant;

use super::series::{Labels, Origin};
use crate::telemetry::Telemetry;
use crate::time::format_rfc3339;

#[derive(Debug)]
pub struct RequestRecord {
    pub time: SystemTime,
    pub started: Instant,
    pub agent: Option<Arc<str>>,
    pub method: Method,
    pub host: String,
    /// Without the query string: a query-injected key would be in it.
    pub path: String,
    pub route: Option<Arc<str>>,
    pub credential: Option<Arc<str>>,
    pub fingerprint: Option<String>,
    /// The agent's task id (`Keystamp-Task`); never a metric label (unbounded).
    pub task: Option<String>,
    pub status: StatusCode,
    /// Whether keystamp made the response itself.
    pub by_keystamp: bool,
    pub error: Option<&'static str>,
    /// For keystamp's own answers: whose fault (agent, upstream, keystamp).
    pub fault: Option<&'static str>,
    pub request_bytes: Arc<AtomicU64>,
}

impl RequestRecord {
    pub fn start(agent: Option<Arc<str>>, method: &Method, host: &str, path: &str) -> Self {
        Self {
            time: SystemTime::now(),
            started: Instant::now(),
            agent,
            method: method.clone(),
            host: host.to_string(),
            path: path.to_string(),
            route: None,
            credential: None,
            fingerprint: None,
            task: None,
            status: StatusCode::OK,
            by_keystamp: false,
            error: None,
            fault: None,
            request_bytes: Arc::default(),
        }
    }

    /// Records the metrics and the audit line; `response_bytes` is what reached the agent.
    pub fn finish(&self, telemetry: &Telemetry, response_bytes: u64) {
        let duration = self.started.elapsed();
        let origin = if self.by_keystamp {
            "keystamp"
        } else {
            "upstream"
        };
        if telemetry.per_request_metrics {
            let labels = Labels {
                route: self.route.as_ref(),
                credential: self.credential.as_ref(),
                agent: self.agent.as_ref(),
                status: self.status,
                origin: if self.by_keystamp {
                    Origin::Keystamp
                } else {
                    Origin::Upstream
                },
            };
            telemetry
                .series
                .observe(&telemetry.metrics, &labels, duration.as_secs_f64());
        }
        if telemetry.audit.is_on() {
            let time = format_rfc3339(self.time);
            let line = AuditLine {
                time: &time,
                kind: "request",
                agent: self.agent.as_deref(),
                route: self.route.as_deref(),
                credential: self.credential.as_deref(),
                fingerprint: self.fingerprint.as_deref(),
                task: self.task.as_deref(),
                method: self.method.as_str(),
                host: &self.host,
                path: &self.path,
                status: self.status.as_u16(),
                origin,
                duration_ms: (duration.as_secs_f64() * 1_000_000.0).round() / 1000.0,
                bytes_in: self.request_bytes.load(Ordering::Relaxed),
                bytes_out: response_bytes,
                error: self.error,
                fault: self.fault,
            };
            telemetry.audit.record(&line, &telemetry.metrics);
        }
    }
}

/// One request's audit line, serialised without building a map.
#[derive(serde::Serialize)]
struct AuditLine<'a> {
    time: &'a str,
    kind: &'static str,
    agent: Option<&'a str>,
    route: Option<&'a str>,
    credential: Option<&'a str>,
    fingerprint: Option<&'a str>,
    task: Option<&'a str>,
    method: &'a str,
    host: &'a str,
    path: &'a str,
    status: u16,
    origin: &'static str,
    duration_ms: f64,
    bytes_in: u64,
    bytes_out: u64,
    error: Option<&'static str>,
    fault: Option<&'static str>,
}
