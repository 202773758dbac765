//! What keystamp tells operators: Prometheus metrics on an explicit registry and the audit log.
//! Metric labels are bounded by config (route, credential and agent names, fixed enums), never
//! raw hosts, paths or agent-supplied strings.

pub mod audit;
mod credential_series;
mod metrics;
mod request;
mod series;

pub use audit::{AuditLog, AuditOutput};
pub use credential_series::{CredentialCounters, ReadResult};
pub use metrics::Metrics;
pub use request::RequestRecord;
pub use series::RequestSeries;

/// Where requests report: the metrics registry and the audit log, and whether per-request
/// families are on.
pub struct Telemetry {
    pub metrics: std::sync::Arc<Metrics>,
    pub audit: AuditLog,
    /// `keystamp_requests_total` and `keystamp_request_duration_seconds` on or off.
    pub per_request_metrics: bool,
    /// Those two families' children for the label sets used lately.
    pub series: RequestSeries,
}
