//! What keystamp tells operators: Prometheus metrics on an explicit registry and the audit log.
//! Metric labels are bounded by config (route, credential and agent names, fixed enums), never
//! raw hosts, paths or agent-supplied strings.

pub mod audit;
mod metrics;
mod request;

pub use audit::{AuditLog, AuditOutput};
pub use metrics::Metrics;
pub use request::RequestRecord;
