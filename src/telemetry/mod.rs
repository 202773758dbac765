//! What keystamp tells operators: Prometheus metrics on an explicit registry. Labels are bounded
//! by config (route and credential names, fixed enums), never raw hosts, paths or agent input.

mod metrics;

pub use metrics::Metrics;
