//! The proxy listener: accepts agents' connections, serves HTTP/1.1 on them (CONNECT and
//! absolute-form requests), and hands each request to `connect.rs` or `pipeline.rs`. Holds the
//! shared state every request reads: the current snapshot, the leaf cache and upstream clients.

pub mod body;
pub mod connect;
pub mod pipeline;
mod sniff;
pub mod upstream;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, Guard};
use http::{Method, Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, Unmatched};
use crate::credentials::reloader::ReloadHandle;
use crate::credentials::CredentialTable;
use crate::error::ProxyError;
use crate::identity::IdentityTable;
use crate::routes::RouteTable;
use crate::telemetry::{AuditLog, Metrics};
use crate::tls::LeafCache;
use body::ProxyBody;
use upstream::Upstream;

/// How long an agent may take to send request headers before the connection is dropped.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything a request needs to decide, built whole and swapped whole.
#[derive(Debug)]
pub struct Snapshot {
    /// Shared between snapshots until the config itself changes.
    pub routes: Arc<RouteTable>,
    pub credentials: CredentialTable,
    pub unmatched: Unmatched,
    pub identities: Arc<IdentityTable>,
}

impl Snapshot {
    /// The first snapshot: routes from `config`, every credential fetched once.
    pub async fn load(config: &Config, upstream: &Upstream, metrics: &Arc<Metrics>) -> Self {
        Self {
            routes: Arc::new(RouteTable::new(&config.routes)),
            credentials: CredentialTable::load(config, upstream, metrics).await,
            unmatched: config.unmatched,
            identities: Arc::new(IdentityTable::load(config, None)),
        }
    }
}

/// What the state reports through.
pub struct Telemetry {
    pub metrics: Arc<Metrics>,
    pub audit: AuditLog,
    pub per_request_metrics: bool,
}

/// State shared by every connection.
pub struct ProxyState {
    snapshot: ArcSwap<Snapshot>,
    pub leaves: LeafCache,
    pub upstream: Upstream,
    pub metrics: Arc<Metrics>,
    /// Reaches the one writer of snapshots (the 401 retry asks it for newer versions).
    pub reloads: ReloadHandle,
    /// Largest request body kept in memory so a request can be replayed after a 401.
    pub replay_body_limit: usize,
    pub audit: AuditLog,
    /// `keystamp_requests_total` and `keystamp_request_duration_seconds` on or off.
    pub per_request_metrics: bool,
    /// Cancelled when keystamp starts draining.
    pub shutdown: CancellationToken,
    /// Every connection and tunnel task, so shutdown can wait for them.
    pub tasks: TaskTracker,
}

impl ProxyState {
    pub fn new(
        snapshot: Snapshot,
        leaves: LeafCache,
        upstream: Upstream,
        telemetry: Telemetry,
        reloads: ReloadHandle,
        replay_body_limit: usize,
    ) -> Self {
        let Telemetry {
            metrics,
            audit,
            per_request_metrics,
        } = telemetry;
        Self {
            audit,
            per_request_metrics,
            snapshot: ArcSwap::from_pointee(snapshot),
            leaves,
            upstream,
            metrics,
            reloads,
            replay_body_limit,
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
        }
    }

    /// The current snapshot; load it once per request.
    pub fn snapshot(&self) -> Guard<Arc<Snapshot>> {
        self.snapshot.load()
    }

    /// The current snapshot as an owned `Arc`, for the writer that builds the next one.
    pub fn snapshot_arc(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Publishes a new snapshot; requests already running keep the one they loaded.
    pub fn publish(&self, snapshot: Snapshot) {
        self.snapshot.store(Arc::new(snapshot));
    }
}

/// Accepts agents until shutdown starts.
pub async fn serve(listener: TcpListener, state: Arc<ProxyState>) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = state.shutdown.cancelled() => break,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(error) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let connection_state = state.clone();
        let open = OpenConnection::new(&state.metrics);
        state.tasks.spawn(async move {
            let _open = open;
            let shutdown = connection_state.shutdown.clone();
            let service = service_fn(move |request| {
                let state = connection_state.clone();
                async move { Ok::<_, std::convert::Infallible>(route_request(state, request).await) }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            serve_until_shutdown(connection, shutdown, |c| c.graceful_shutdown()).await;
        });
    }
}

/// Counts an agent connection in `keystamp_connections_open` for as long as it lives.
struct OpenConnection(prometheus::IntGauge);

impl OpenConnection {
    fn new(metrics: &Metrics) -> Self {
        metrics.connections_open.inc();
        Self(metrics.connections_open.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

async fn route_request(state: Arc<ProxyState>, request: Request<Incoming>) -> Response<ProxyBody> {
    let identified = state.snapshot().identities.identify(request.headers());
    let agent = match identified {
        Ok(agent) => agent,
        Err(error) => {
            tracing::debug!(?error, "agent identity refused");
            return ProxyError::IdentityRequired.into_response();
        }
    };
    if request.method() == Method::CONNECT {
        return connect::handle(state, request, agent).await;
    }
    if request.uri().scheme().is_some() && request.uri().authority().is_some() {
        return pipeline::forward(state, pipeline::Origin::AbsoluteForm { agent }, request).await;
    }
    ProxyError::BadRequest("keystamp is a proxy: send CONNECT or an absolute URL").into_response()
}

/// Serves a connection to its end; when shutdown starts, lets in-flight requests finish and
/// closes it (keep-alive ends, h2 sends GOAWAY).
pub async fn serve_until_shutdown<C, E>(
    connection: C,
    shutdown: CancellationToken,
    start_draining: impl FnOnce(Pin<&mut C>),
) where
    C: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = shutdown.cancelled() => {
            start_draining(connection.as_mut());
            connection.as_mut().await
        }
    };
    if let Err(error) = result {
        tracing::debug!(%error, "connection ended with an error");
    }
}
