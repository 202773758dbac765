//! keystamp: a sidecar forward proxy that lets agents call third-party APIs while holding no
//! secrets. It intercepts TLS for routed hosts, strips whatever credential the agent sent,
//! stamps a fresh one from an in-memory table and forwards over verified TLS.
//!
//! The binary (`src/main.rs`) is a thin CLI over this library; tests use the same paved path
//! ([`App`], [`Config`]). Modules are private; the README's layout section lists them by layer.

mod admin;
mod app;
mod body;
mod breaker;
mod config;
mod credentials;
mod duration;
mod echo;
mod egress;
mod error;
mod fleet;
mod host;
mod identity;
mod inject;
mod limits;
mod netfilter;
mod path;
mod proxy;
mod reload;
mod routes;
mod s3;
mod secret;
mod sigv4;
mod state;
mod telemetry;
mod time;
mod tls;
mod upstream;

pub use app::{App, RunningApp};
pub use config::{Config, ConfigError, ConfigLoadError};
pub use netfilter::{apply as apply_netfilter, remove as remove_netfilter, show as show_netfilter};

/// What `benches/`, `fuzz/` and the property tests reach below the paved path. Not a stable
/// interface.
#[doc(hidden)]
pub mod internals {
    pub use crate::breaker::{Breaker, Verdict};
    pub use crate::config::BreakerSettings;
    pub use crate::credentials::{read_all, CredentialTable, Reporting};
    pub use crate::host::{Host, HostError};
    pub use crate::path::{is_ambiguous, is_under};
    pub use crate::routes::{RouteMatch, RouteTable};
    pub use crate::state::{plan_next, Snapshot};
    pub use crate::telemetry::Metrics;
    pub use crate::upstream::{Dialer, Upstream};
}
