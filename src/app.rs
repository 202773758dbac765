//! Wiring: build the CA, the upstream clients and the first snapshot from a [`Config`], bind the
//! listeners, and drain on shutdown. Errors here are start-up failures, reported with `anyhow`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{self, Admin, Readiness};
use crate::config::{CaOrigin, Config};
use crate::credentials::Reporting;
use crate::fleet;
use crate::proxy::{self, ConnectionCap, ProxyState};
use crate::reload::{ReloadContext, ReloadHandle, Reloader};
use crate::state::{SharedState, Snapshot};
use crate::telemetry::{AuditLog, Metrics, RequestSeries, Telemetry};
use crate::tls::{combined_bundle, upstream_roots, CertificateAuthority, LeafCache};
use crate::upstream::{Dialer, Upstream};

/// Starts keystamp from a validated config.
pub struct App;

/// A started keystamp: its bound addresses and the handle to drain it.
pub struct RunningApp {
    proxy_addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    ca_pem: String,
    state: Arc<ProxyState>,
    readiness: Arc<Readiness>,
    shutdown_grace: Duration,
}

impl App {
    /// The runtime keystamp serves on: with one worker (the default) the current-thread
    /// scheduler, which spent 15-20 % less CPU per request than a one-worker multi-thread
    /// runtime with 16 agent connections (no work-stealing queues or driver hand-offs to keep
    /// up); with more, a multi-thread runtime of that many workers.
    pub fn runtime(config: &Config) -> std::io::Result<tokio::runtime::Runtime> {
        let mut builder = if config.workers <= 1 {
            tokio::runtime::Builder::new_current_thread()
        } else {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(config.workers);
            builder
        };
        builder.enable_all().build()
    }

    pub async fn start(config: Config) -> anyhow::Result<RunningApp> {
        let ca = match &config.ca.origin {
            CaOrigin::Generate => CertificateAuthority::generate().context("generating the CA")?,
            CaOrigin::Load { cert, key } => {
                CertificateAuthority::load(cert, key).context("loading the CA")?
            }
        };
        let ca_pem = ca.cert_pem().to_string();
        let leaves = LeafCache::new(ca, config.ca.leaf_cache_size);
        let metrics = Arc::new(Metrics::build(config.zero_series).context("registering metrics")?);
        // The dialer reads pins and egress policy from the published snapshot on every dial.
        let shared = Arc::new(SharedState::new(Snapshot::before_first_load(&config)));
        let upstream = Upstream::new(
            Dialer::new(shared.clone(), config.timeouts.connect),
            upstream_roots(&config.extra_roots),
            config.timeouts.response_head,
        )
        .context("building the upstream TLS client")?;
        let shutdown = CancellationToken::new();
        let (fleet, breaker_events, fleet_refreshes) = match &config.fleet {
            Some(fleet) => {
                let (link, events, refreshes) = fleet::start(
                    fleet,
                    &config.extra_roots,
                    shared.clone(),
                    metrics.clone(),
                    shutdown.clone(),
                );
                (Some(link), Some(events), Some(refreshes))
            }
            None => (None, None, None),
        };
        let (reloads, reload_requests) = ReloadHandle::channel();
        let state = Arc::new(ProxyState {
            state: shared.clone(),
            leaves,
            upstream,
            telemetry: Telemetry {
                metrics: metrics.clone(),
                audit: AuditLog::start(&config.audit)
                    .await
                    .context("opening the audit log")?,
                per_request_metrics: config.per_request_metrics,
                series: RequestSeries::default(),
            },
            reloads,
            replay_body_limit: config.reload.replay_body_limit,
            shutdown,
            tasks: TaskTracker::new(),
            timeouts: config.timeouts,
            connections: ConnectionCap::new(config.max_connections, metrics.clone()),
            fleet: fleet.clone(),
        });

        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding the proxy listener on {}", config.listen))?;
        let proxy_addr = listener.local_addr()?;
        let transparent = match &config.transparent {
            Some(transparent) => Some(TcpListener::bind(transparent.listen).await.with_context(
                || format!("binding the transparent listener on {}", transparent.listen),
            )?),
            None => None,
        };
        let readiness = Arc::new(Readiness::default());
        let admin_addr = match config.admin {
            Some(address) => {
                let admin_listener = TcpListener::bind(address)
                    .await
                    .with_context(|| format!("binding the admin listener on {address}"))?;
                let bound = admin_listener.local_addr()?;
                let admin = Admin {
                    readiness: readiness.clone(),
                    state: shared.clone(),
                    metrics: metrics.clone(),
                    token: config.admin_token.clone(),
                    fleet: fleet.clone(),
                    reloads: state.reloads.clone(),
                };
                tokio::spawn(admin::serve(
                    admin_listener,
                    Arc::new(admin),
                    state.shutdown.clone(),
                ));
                Some(bound)
            }
            None => None,
        };
        let (routes, shutdown_grace) = (config.routes.len(), config.shutdown_grace);
        let (cert_out, bundle_out) = (config.ca.cert_out.clone(), config.ca.bundle_out.clone());
        // The first load happens here, before anything is served; the config is the
        // reloader's from now on (10,000 credentials made a clone of it 19 MiB).
        let reloader = Reloader::start(
            ReloadContext {
                state: shared.clone(),
                upstream: state.upstream.clone(),
                metrics: metrics.clone(),
                reporting: Reporting {
                    metrics: metrics.clone(),
                    breaker_events,
                },
                fleet: fleet.clone(),
                shutdown: state.shutdown.clone(),
            },
            config,
            reload_requests,
            fleet_refreshes,
        )
        .await;
        // Written only once both listeners are bound (an instance that fails to start must not
        // replace the CA file of the one that is running) and the first load is done: an agent
        // or a test that waits for the file then finds every credential loaded.
        if let Some(path) = &cert_out {
            write_atomically(path, ca_pem.as_bytes())
                .with_context(|| writable_hint("the CA certificate", path))?;
            tracing::info!(path = %path.display(), "CA certificate written for agents to trust");
        }
        if let Some(path) = &bundle_out {
            write_atomically(path, combined_bundle(&ca_pem).as_bytes())
                .with_context(|| writable_hint("the CA bundle", path))?;
            tracing::info!(path = %path.display(), "system roots plus the CA written as one bundle");
        }
        // Tracked, so shutdown waits while it revokes per-task tokens.
        state.tasks.spawn(reloader.run());
        tokio::spawn(proxy::serve(listener, state.clone()));
        if let Some(transparent) = transparent {
            tracing::info!(addr = ?transparent.local_addr().ok(), "transparent listener serving redirected connections");
            tokio::spawn(proxy::transparent::serve(transparent, state.clone()));
        }
        readiness.set(true);
        tracing::info!(%proxy_addr, admin = ?admin_addr, routes, "keystamp is serving");
        Ok(RunningApp {
            proxy_addr,
            admin_addr,
            ca_pem,
            state,
            readiness,
            shutdown_grace,
        })
    }
}

impl RunningApp {
    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy_addr
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Re-reads the config and every credential source now (what SIGHUP does).
    pub fn reload(&self) {
        self.state.reloads.reload_all();
    }

    /// The CA certificate (PEM) agents must trust.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Stops accepting, lets in-flight requests finish for up to the configured grace, then
    /// returns. Returns whether everything drained in time.
    pub async fn shutdown(self) -> bool {
        self.readiness.set(false);
        self.state.shutdown.cancel();
        self.state.tasks.close();
        let drained = tokio::time::timeout(self.shutdown_grace, self.state.tasks.wait())
            .await
            .is_ok();
        self.state.telemetry.audit.flush().await;
        if drained {
            tracing::info!("drained; exiting");
        } else {
            tracing::warn!(grace = ?self.shutdown_grace, remaining = self.state.tasks.len(), "grace period over; closing what is left");
        }
        drained
    }
}

/// Writes through a temporary file and a rename, so readers never see half a certificate.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    std::fs::write(&temporary, bytes)?;
    std::fs::rename(&temporary, path)
}

/// What to do when a file keystamp writes cannot be written: mount something writable there.
fn writable_hint(what: &str, path: &std::path::Path) -> String {
    let dir = path.parent().unwrap_or(path).display();
    format!(
        "writing {what} to {}: {dir} must be writable by keystamp's uid (in a container: mount a \
         volume there, e.g. an emptyDir or `-v keystamp-run:{dir}`)",
        path.display()
    )
}
