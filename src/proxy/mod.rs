//! Inbound only: the proxy listener accepts agents' connections, serves HTTP/1.1 on them
//! (CONNECT and absolute-form requests), and hands each request to `connect.rs` or `pipeline.rs`.
//! [`ProxyState`] is what every connection shares: the published snapshot, the leaf cache, the
//! outbound client, telemetry and the drain signal.

pub mod connect;
pub mod pipeline;
mod sniff;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::body::ProxyBody;
use crate::error::ProxyError;
use crate::reload::ReloadHandle;
use crate::state::SharedState;
use crate::telemetry::{Metrics, Telemetry};
use crate::tls::LeafCache;
use crate::upstream::Upstream;

/// How long an agent may take to send request headers before the connection is dropped.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// State shared by every connection.
pub struct ProxyState {
    /// The published snapshot; requests load it once.
    pub state: Arc<SharedState>,
    pub leaves: LeafCache,
    pub upstream: Upstream,
    pub telemetry: Telemetry,
    /// Reaches the one writer of snapshots (the 401 retry asks it for newer versions).
    pub reloads: ReloadHandle,
    /// Largest request body kept in memory so a request can be replayed after a 401.
    pub replay_body_limit: usize,
    /// Cancelled when keystamp starts draining.
    pub shutdown: CancellationToken,
    /// Every connection and tunnel task, so shutdown can wait for them.
    pub tasks: TaskTracker,
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
        let open = OpenConnection::new(&state.telemetry.metrics);
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
    let identified = state.state.load().identities.identify(request.headers());
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
