//! keystamp: a sidecar forward proxy that lets agents call third-party APIs while holding no
//! secrets. It intercepts TLS for routed hosts, strips whatever credential the agent sent,
//! stamps a fresh one from an in-memory table and forwards over verified TLS.
//!
//! The binary (`src/main.rs`) is a thin CLI over this library; tests and benches use the same API.

mod admin;
pub mod app;
pub mod body;
pub mod breaker;
pub mod config;
pub mod credentials;
mod duration;
pub mod egress;
pub mod error;
pub mod host;
pub mod identity;
pub mod inject;
pub mod limits;
pub mod proxy;
pub mod reload;
pub mod routes;
pub mod secret;
pub mod state;
pub mod telemetry;
pub mod time;
pub mod tls;
pub mod upstream;

pub use app::{App, RunningApp};
pub use config::Config;
