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
use crate::proxy::pipeline::{self, Origin};
use crate::proxy::sniff::sniff_tls;
use crate::proxy::{serve_until_shutdown, ProxyState, HEADER_READ_TIMEOUT};
use crate::time::format_rfc3339;
use crate::upstream::connect_error;

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
    let Ok(host) = Host::parse(authority.host()) else {
        return ProxyError::BadRequest("CONNECT needs host:port").into_response();
    };
    let port = authority.port_u16().unwrap_or(443);
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
            state
                .tasks
                .spawn(tunnel(state.clone(), on_upgrade, upstream, record));
            Response::new(body::empty())
        }
        ConnectDecision::Intercept => {
            let on_upgrade = hyper::upgrade::on(request);
            state
                .tasks
                .spawn(intercept(state.clone(), on_upgrade, host, port, agent));
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
    let (is_tls, stream) = match sniff_tls(TokioIo::new(upgraded)).await {
        Ok(sniffed) => sniffed,
        Err(error) => {
            tracing::debug!(%host, %error, "tunnel closed before any byte");
            return;
        }
    };
    if !is_tls {
        // Plain HTTP inside the tunnel (undici tunnels http:// URLs): stamp it all the same.
        let origin = Origin::Intercepted {
            host,
            port,
            tls: false,
            agent,
        };
        serve_intercepted(state, origin, stream).await;
        return;
    }
    let acceptor = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream);
    let start = match acceptor.await {
        Ok(start) => start,
        Err(error) => {
            tracing::debug!(%host, %error, "agent TLS hello unreadable");
            return;
        }
    };
    let leaf_name = start
        .client_hello()
        .server_name()
        .and_then(|name| Host::parse(name).ok())
        .unwrap_or_else(|| host.clone());
    let config = match state.leaves.server_config(&leaf_name) {
        Ok(config) => config,
        Err(error) => {
            tracing::warn!(%host, %error, "could not mint a leaf certificate");
            return;
        }
    };
    let tls = match start.into_stream(config).await {
        Ok(tls) => tls,
        Err(error) => {
            state
                .telemetry
                .metrics
                .tls_handshake_errors
                .with_label_values(&["agent"])
                .inc();
            tracing::debug!(%host, %error, "agent TLS handshake failed (does the agent trust keystamp's CA?)");
            return;
        }
    };
    serve_intercepted(
        state,
        Origin::Intercepted {
            host,
            port,
            tls: true,
            agent,
        },
        tls,
    )
    .await;
}

/// Serves h2 or HTTP/1.1 on the agent's side of an intercepted tunnel.
async fn serve_intercepted<S>(state: Arc<ProxyState>, origin: Origin, stream: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let shutdown = state.shutdown.clone();
    let service = service_fn(move |request| {
        let state = state.clone();
        let origin = origin.clone();
        async move { Ok::<_, std::convert::Infallible>(pipeline::forward(state, origin, request).await) }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    serve_until_shutdown(connection, shutdown, |c| c.graceful_shutdown()).await;
}
