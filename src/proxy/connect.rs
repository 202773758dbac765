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

use crate::config::Unmatched;
use crate::error::ProxyError;
use crate::proxy::body::{self, ProxyBody};
use crate::proxy::pipeline::{self, Origin};
use crate::proxy::sniff::sniff_tls;
use crate::proxy::upstream::connect_error;
use crate::proxy::{serve_until_shutdown, ProxyState};

/// What keystamp does with a CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectDecision {
    Intercept,
    Tunnel,
    Deny,
}

pub async fn handle(state: Arc<ProxyState>, request: Request<Incoming>) -> Response<ProxyBody> {
    let Some(authority) = request.uri().authority() else {
        return ProxyError::BadRequest("CONNECT needs host:port").into_response();
    };
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let port = authority.port_u16().unwrap_or(443);
    let decision = decide(&state, &host);
    tracing::debug!(%host, port, ?decision, "CONNECT");
    match decision {
        ConnectDecision::Deny => ProxyError::UnmatchedDenied.into_response(),
        ConnectDecision::Tunnel => {
            // Dial before answering, so an unreachable host is a clear 502 rather than a reset.
            let upstream = match state.upstream.dialer().dial(&host, port).await {
                Ok(stream) => stream,
                Err(error) => return connect_error(&error).into_response(),
            };
            let on_upgrade = hyper::upgrade::on(request);
            state.tasks.spawn(tunnel(on_upgrade, upstream));
            Response::new(body::empty())
        }
        ConnectDecision::Intercept => {
            let on_upgrade = hyper::upgrade::on(request);
            state
                .tasks
                .spawn(intercept(state.clone(), on_upgrade, host, port));
            Response::new(body::empty())
        }
    }
}

fn decide(state: &ProxyState, host: &str) -> ConnectDecision {
    let snapshot = state.snapshot();
    if snapshot.routes.routes_host(host) {
        return ConnectDecision::Intercept;
    }
    match snapshot.unmatched {
        Unmatched::Tunnel => ConnectDecision::Tunnel,
        Unmatched::Deny => ConnectDecision::Deny,
    }
}

async fn tunnel(on_upgrade: hyper::upgrade::OnUpgrade, mut upstream: tokio::net::TcpStream) {
    let upgraded = match on_upgrade.await {
        Ok(upgraded) => upgraded,
        Err(error) => {
            tracing::debug!(%error, "CONNECT upgrade failed");
            return;
        }
    };
    let mut agent = TokioIo::new(upgraded);
    match tokio::io::copy_bidirectional(&mut agent, &mut upstream).await {
        Ok((to_upstream, to_agent)) => tracing::debug!(to_upstream, to_agent, "tunnel closed"),
        Err(error) => tracing::debug!(%error, "tunnel ended with an error"),
    }
}

async fn intercept(
    state: Arc<ProxyState>,
    on_upgrade: hyper::upgrade::OnUpgrade,
    host: String,
    port: u16,
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
        .map(str::to_string)
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
        .header_read_timeout(super::HEADER_READ_TIMEOUT);
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    serve_until_shutdown(connection, shutdown, |c| c.graceful_shutdown()).await;
}
