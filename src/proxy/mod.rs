//! Inbound only: the proxy listener accepts agents' connections, serves HTTP/1.1 on them
//! (CONNECT and absolute-form requests), and hands each request to `connect.rs` or `pipeline.rs`.
//! [`ProxyState`] is what every connection shares: the published snapshot, the leaf cache, the
//! outbound client, telemetry and the drain signal.

mod conn;
pub mod connect;
mod error_code;
pub mod pipeline;
mod sniff;
pub mod transparent;

use std::sync::Arc;

use http::{Method, Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use http_body_util::BodyExt;

use crate::body::{Counted, ProxyBody};
use crate::config::Timeouts;
use crate::error::ProxyError;
use crate::fleet::FleetLink;
use crate::reload::ReloadHandle;
use crate::state::SharedState;
use crate::telemetry::Telemetry;
use crate::tls::LeafCache;
use crate::upstream::Upstream;
pub use conn::{accept_next, ConnectionCap};
use conn::{serve_until_done, IdleWatch, InFlight};

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
    /// How long agents may keep keystamp waiting.
    pub timeouts: Timeouts,
    /// The `max_connections` cap.
    pub connections: ConnectionCap,
    /// The other sidecars of the fleet, when there is one.
    pub fleet: Option<FleetLink>,
}

impl ProxyState {
    /// Runs a connection's or tunnel's future as a tracked task. The future is boxed first: a
    /// connection's state machine is several KiB (TLS, HTTP and pipeline state inline), and
    /// unboxed it was copied whole into the task at spawn and again when the task finished
    /// (memmove was 4.4 % of keystamp's CPU per new connection, 3.5 % with the box).
    pub fn spawn_connection(&self, future: impl std::future::Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(Box::pin(future));
    }
}

/// Accepts agents until shutdown starts.
pub async fn serve(listener: TcpListener, state: Arc<ProxyState>) {
    while let Some(stream) = accept_next(&listener, &state.shutdown).await {
        let _ = stream.set_nodelay(true);
        let Some(stream) = state.connections.admit(stream) else {
            tracing::debug!("agent connection refused: max_connections reached");
            continue;
        };
        let connection_state = state.clone();
        state.spawn_connection(async move {
            let shutdown = connection_state.shutdown.clone();
            let idle = IdleWatch::new();
            let timeouts = connection_state.timeouts;
            let watch = idle.clone();
            let service = service_fn(move |request| {
                let state = connection_state.clone();
                let in_flight = watch.begin();
                async move {
                    Ok::<_, std::convert::Infallible>(
                        route_request(state, request, in_flight).await,
                    )
                }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(timeouts.request_head)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            let idle = Some((idle.as_ref(), timeouts.idle));
            serve_until_done(connection, shutdown, idle, |c| c.graceful_shutdown()).await;
        });
    }
}

/// Keeps `in_flight` alive until the response body has been sent (or dropped).
fn until_body_ends(response: Response<ProxyBody>, in_flight: InFlight) -> Response<ProxyBody> {
    response.map(|body| {
        let on_end = Box::new(move |_bytes: u64| drop(in_flight));
        Counted::new(body, None, Some(on_end)).boxed_unsync()
    })
}

async fn route_request(
    state: Arc<ProxyState>,
    request: Request<Incoming>,
    in_flight: InFlight,
) -> Response<ProxyBody> {
    let identified = state.state.load().identities.identify(request.headers());
    let agent = match identified {
        Ok(agent) => agent,
        Err(error) => {
            tracing::debug!(?error, "agent identity refused");
            crate::body::discard(request.into_body()).await;
            return ProxyError::IdentityRequired.into_response();
        }
    };
    if request.method() == Method::CONNECT {
        return until_body_ends(connect::handle(state, request, agent).await, in_flight);
    }
    if request.uri().scheme().is_some() && request.uri().authority().is_some() {
        let origin = pipeline::Origin::AbsoluteForm {
            agent,
            via: pipeline::Via::Proxy,
        };
        return pipeline::forward(state, origin, request, in_flight).await;
    }
    crate::body::discard(request.into_body()).await;
    ProxyError::BadRequest("keystamp is a proxy: send CONNECT or an absolute URL").into_response()
}
