//! `CONNECT host:port`: intercept when a route names the host, otherwise tunnel blind or deny
//! as `unmatched:` says. Interception terminates the agent's TLS with a leaf minted for the SNI
//! (the CONNECT host when the agent sends none) and serves h2 or HTTP/1.1 inside it.

use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio_rustls::LazyConfigAcceptor;

use crate::body::{self, ProxyBody};
use crate::config::Unmatched;
use crate::error::ProxyError;
use crate::host::Host;
use crate::proxy::conn::{serve_until_done, IdleWatch, TrackedStream};
use crate::proxy::pipeline::{self, Origin, Via};
use crate::proxy::sniff::sniff_tls;
use crate::proxy::sniff::Prefixed;
use crate::proxy::ProxyState;
use crate::time::format_rfc3339;
use crate::upstream::connect_error;

/// How often an idle h2 agent connection is pinged, and how long a ping may go unanswered.
const H2_PING_EVERY: std::time::Duration = std::time::Duration::from_secs(30);
const H2_PING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// What keystamp does with a CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectDecision {
    Intercept,
    Tunnel,
    Deny,
}

pub async fn handle(
    state: Arc<ProxyState>,
    request: Request<Incoming>,
    agent: Option<Arc<str>>,
) -> Response<ProxyBody> {
    let Some(authority) = request.uri().authority() else {
        return ProxyError::BadRequest("CONNECT needs host:port").into_response();
    };
    // A port out of range is refused, never quietly taken for 443.
    let Ok((host, port)) = Host::parse_authority(authority.as_str()) else {
        return ProxyError::BadRequest("CONNECT needs host:port with a port from 1 to 65535")
            .into_response();
    };
    let port = port.unwrap_or(443);
    let decision = decide(&state, &host);
    tracing::debug!(%host, port, ?decision, "CONNECT");
    state
        .telemetry
        .metrics
        .connect
        .with_label_values(&[decision.label()])
        .inc();
    match decision {
        ConnectDecision::Deny => {
            audit_tunnel(
                &state,
                &TunnelRecord::new(agent, host, port, "deny"),
                Some("unmatched_denied"),
            );
            ProxyError::UnmatchedDenied.into_response()
        }
        ConnectDecision::Tunnel => {
            let record = TunnelRecord::new(agent, host, port, "tunnel");
            // Dial before answering, so an unreachable host is a clear 502 rather than a reset.
            let upstream = match state.upstream.dialer().dial(&record.host, port).await {
                Ok(stream) => stream,
                Err(error) => {
                    let error = connect_error(&error);
                    audit_tunnel(&state, &record, Some(error.code()));
                    return error.into_response();
                }
            };
            let on_upgrade = hyper::upgrade::on(request);
            state.spawn_connection(tunnel(state.clone(), on_upgrade, upstream, record));
            Response::new(body::empty())
        }
        ConnectDecision::Intercept => {
            let on_upgrade = hyper::upgrade::on(request);
            state.spawn_connection(intercept(state.clone(), on_upgrade, host, port, agent));
            Response::new(body::empty())
        }
    }
}

impl ConnectDecision {
    fn label(self) -> &'static str {
        match self {
            ConnectDecision::Intercept => "intercept",
            ConnectDecision::Tunnel => "tunnel",
            ConnectDecision::Deny => "deny",
        }
    }
}

/// A tunnel's account for the audit log: who, where, how much, how long.
struct TunnelRecord {
    agent: Option<Arc<str>>,
    host: Host,
    port: u16,
    decision: &'static str,
    time: std::time::SystemTime,
    started: tokio::time::Instant,
    bytes_up: u64,
    bytes_down: u64,
}

impl TunnelRecord {
    fn new(agent: Option<Arc<str>>, host: Host, port: u16, decision: &'static str) -> Self {
        Self {
            agent,
            host,
            port,
            decision,
            time: std::time::SystemTime::now(),
            started: tokio::time::Instant::now(),
            bytes_up: 0,
            bytes_down: 0,
        }
    }
}

fn audit_tunnel(state: &ProxyState, record: &TunnelRecord, error: Option<&'static str>) {
    if !state.telemetry.audit.is_on() {
        return;
    }
    let line = serde_json::json!({
        "time": format_rfc3339(record.time),
        "kind": "tunnel",
        "decision": record.decision,
        "agent": record.agent.as_deref(),
        "host": record.host.as_str(),
        "port": record.port,
        "bytes_up": record.bytes_up,
        "bytes_down": record.bytes_down,
        "duration_ms": (record.started.elapsed().as_secs_f64() * 1_000_000.0).round() / 1000.0,
        "error": error,
    });
    state
        .telemetry
        .audit
        .record(&line, &state.telemetry.metrics);
}

fn decide(state: &ProxyState, host: &Host) -> ConnectDecision {
    let snapshot = state.state.load();
    if snapshot.routes.routes_host(host) {
        return ConnectDecision::Intercept;
    }
    match snapshot.unmatched {
        Unmatched::Tunnel => ConnectDecision::Tunnel,
        Unmatched::Deny => ConnectDecision::Deny,
    }
}

async fn tunnel(
    state: Arc<ProxyState>,
    on_upgrade: hyper::upgrade::OnUpgrade,
    mut upstream: tokio::net::TcpStream,
    mut record: TunnelRecord,
) {
    let upgraded = match on_upgrade.await {
        Ok(upgraded) => upgraded,
        Err(error) => {
            tracing::debug!(%error, "CONNECT upgrade failed");
            return;
        }
    };
    let mut agent = TokioIo::new(upgraded);
    match tokio::io::copy_bidirectional(&mut agent, &mut upstream).await {
        Ok((up, down)) => {
            record.bytes_up = up;
            record.bytes_down = down;
        }
        Err(error) => tracing::debug!(%error, "tunnel ended with an error"),
    }
    audit_tunnel(&state, &record, None);
}

async fn intercept(
    state: Arc<ProxyState>,
    on_upgrade: hyper::upgrade::OnUpgrade,
    host: Host,
    port: u16,
    agent: Option<Arc<str>>,
) {
    let upgraded = match on_upgrade.await {
        Ok(upgraded) => upgraded,
        Err(error) => {
            tracing::debug!(%error, "CONNECT upgrade failed");
            return;
        }
    };
    // The agent's own socket, taken back out of hyper's upgrade wrapper (with any bytes the
    // agent sent behind the CONNECT): otherwise every read and write in the tunnel goes through
    // a boxed `dyn Io` and two adapters more.
    let stream = match upgraded.downcast::<TokioIo<TrackedStream>>() {
        Ok(parts) => Prefixed::new(parts.read_buf, parts.io.into_inner()),
        Err(_) => {
            tracing::error!("the CONNECT connection is not an agent socket; tunnel closed");
            return;
        }
    };
    intercept_stream(state, stream, host, port, agent, Via::Proxy).await;
}

/// Terminates the agent's side of a connection to `host:port` (a CONNECT tunnel, or one
/// netfilter redirected) and serves its requests through the pipeline.
pub(super) async fn intercept_stream<S>(
    state: Arc<ProxyState>,
    stream: S,
    host: Host,
    port: u16,
    agent: Option<Arc<str>>,
    via: Via,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // The sniff, the ClientHello and the handshake share one deadline: a connection that sends
    // three bytes of a hello must not hold a descriptor forever.
    let handshake = open_agent_side(&state, &host, stream);
    let opened = match tokio::time::timeout(state.timeouts.handshake, handshake).await {
        Ok(Some(opened)) => opened,
        Ok(None) => return,
        Err(_) => {
            count_agent_handshake_error(&state);
            tracing::debug!(%host, "agent TLS handshake timed out");
            return;
        }
    };
    let tls = matches!(opened, AgentSide::Tls(_));
    let Some(origin) = Origin::intercepted(host.clone(), port, tls, agent, via) else {
        tracing::debug!(%host, "the CONNECT host cannot be written as a URI authority");
        return;
    };
    match opened {
        // Plain HTTP inside the tunnel (undici tunnels http:// URLs): served all the same.
        AgentSide::Plain(stream) => serve_intercepted(state, origin, stream).await,
        AgentSide::Tls(tls) => serve_intercepted(state.clone(), origin, *tls).await,
    }
}

/// The agent's side of an intercepted tunnel once its first bytes are in.
enum AgentSide<S> {
    Plain(Prefixed<S>),
    Tls(Box<tokio_rustls::server::TlsStream<Prefixed<S>>>),
}

/// Sniffs the first byte and, for TLS, completes the handshake with a leaf for the CONNECT
/// host. A ClientHello naming another host is refused: a leaf is only ever minted for the host
/// the CONNECT named (and was routed by). `None`: the connection is done.
async fn open_agent_side<S>(state: &ProxyState, host: &Host, stream: S) -> Option<AgentSide<S>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (is_tls, stream) = match sniff_tls(stream).await {
        Ok(sniffed) => sniffed,
        Err(error) => {
            tracing::debug!(%host, %error, "tunnel closed before any byte");
            return None;
        }
    };
    if !is_tls {
        return Some(AgentSide::Plain(stream));
    }
    let acceptor = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream);
    let start = match acceptor.await {
        Ok(start) => start,
        Err(error) => {
            count_agent_handshake_error(state);
            tracing::debug!(%host, %error, "agent TLS hello unreadable");
            return None;
        }
    };
    let named = start.client_hello().server_name().map(Host::parse);
    if named.is_some_and(|named| named.as_ref() != Ok(host)) {
        count_agent_handshake_error(state);
        tracing::debug!(%host, "agent TLS hello names another host than the CONNECT; refused");
        return None;
    }
    let config = match state.leaves.server_config(host) {
        Ok(config) => config,
        Err(error) => {
            tracing::warn!(%host, %error, "could not mint a leaf certificate");
            return None;
        }
    };
    match start.into_stream(config).await {
        Ok(tls) => Some(AgentSide::Tls(Box::new(tls))),
        Err(error) => {
            count_agent_handshake_error(state);
            tracing::debug!(%host, %error, "agent TLS handshake failed (does the agent trust keystamp's CA?)");
            None
        }
    }
}

fn count_agent_handshake_error(state: &ProxyState) {
    state
        .telemetry
        .metrics
        .tls_handshake_errors
        .with_label_values(&["agent"])
        .inc();
}

/// Serves h2 or HTTP/1.1 on the agent's side of an intercepted tunnel.
async fn serve_intercepted<S>(state: Arc<ProxyState>, origin: Origin, stream: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let shutdown = state.shutdown.clone();
    let timeouts = state.timeouts;
    let idle = IdleWatch::new();
    let watch = idle.clone();
    let service = service_fn(move |request| {
        let state = state.clone();
        let origin = origin.clone();
        let in_flight = watch.begin();
        async move {
            Ok::<_, std::convert::Infallible>(
                pipeline::forward(state, origin, request, in_flight).await,
            )
        }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(timeouts.request_head);
    // Pings find h2 peers that vanished; the idle watch closes ones that stay but send nothing.
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(H2_PING_EVERY)
        .keep_alive_timeout(H2_PING_TIMEOUT);
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    let idle = Some((idle.as_ref(), timeouts.idle));
    serve_until_done(connection, shutdown, idle, |c| c.graceful_shutdown()).await;
}
