//! Connections netfilter redirected to keystamp (see `keystamp netfilter`): the original
//! destination comes from `SO_ORIGINAL_DST`. TLS: the ClientHello's SNI picks the route, as a
//! CONNECT host would, and the routed host is dialled by name, never at the address the agent
//! chose. Plain HTTP: each request's `Host`. Anything unrouted (no SNI, another protocol) is
//! tunnelled to the original destination or denied as `unmatched:` says.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use nix::sys::socket::{getsockopt, sockopt};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

use crate::config::Unmatched;
use crate::host::Host;
use crate::proxy::conn::{accept_next, serve_until_done, IdleWatch};
use crate::proxy::connect::intercept_stream;
use crate::proxy::pipeline::{self, Origin, Via};
use crate::proxy::sniff::{Prefixed, TLS_HANDSHAKE};
use crate::proxy::ProxyState;
use crate::time::format_rfc3339;

/// A ClientHello larger than this is not read further (real ones are under 2 KiB; post-quantum
/// key shares take them past 1 KiB, never near this).
const MAX_HELLO: usize = 16 * 1024;

/// What happened to one redirected connection (the `decision` of its audit line and metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    Intercept,
    Http,
    Tunnel,
    Deny,
    /// Not redirected (a connection straight to the transparent port): nothing to do.
    NoDestination,
}

impl Decision {
    fn label(self) -> &'static str {
        match self {
            Decision::Intercept => "intercept",
            Decision::Http => "http",
            Decision::Tunnel => "tunnel",
            Decision::Deny => "deny",
            Decision::NoDestination => "no_destination",
        }
    }
}

/// Accepts redirected connections until shutdown starts.
pub async fn serve(listener: TcpListener, state: Arc<ProxyState>) {
    while let Some(stream) = accept_next(&listener, &state.shutdown).await {
        let _ = stream.set_nodelay(true);
        let original = original_destination(&stream);
        let Some(stream) = state.connections.admit(stream) else {
            tracing::debug!("redirected connection refused: max_connections reached");
            continue;
        };
        let connection_state = state.clone();
        state.spawn_connection(handle(connection_state, stream, original));
    }
}

/// Where the agent meant to connect, as netfilter's REDIRECT recorded it; `None` for a
/// connection that was not redirected.
fn original_destination(stream: &TcpStream) -> Option<SocketAddr> {
    let local = stream.local_addr().ok()?;
    let original = match local {
        SocketAddr::V4(_) => getsockopt(stream, sockopt::OriginalDst).ok().map(|addr| {
            let ip = std::net::Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
            SocketAddr::from((ip, u16::from_be(addr.sin_port)))
        }),
        SocketAddr::V6(_) => getsockopt(stream, sockopt::Ip6tOriginalDst)
            .ok()
            .map(|addr| {
                let ip = std::net::Ipv6Addr::from(addr.sin6_addr.s6_addr);
                SocketAddr::from((ip, u16::from_be(addr.sin6_port)))
            }),
    }?;
    // Without a redirect the "original" destination is the listener itself.
    (original != local).then_some(original)
}

async fn handle<S>(state: Arc<ProxyState>, stream: S, original: Option<SocketAddr>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let Some(original) = original else {
        account(
            &state,
            Decision::NoDestination,
            None,
            None,
            Some("no_original_destination"),
        );
        return;
    };
    let mut stream = stream;
    let read = tokio::time::timeout(state.timeouts.handshake, first_bytes(&mut stream)).await;
    let Ok(Ok((prefix, hello))) = read else {
        // Nothing readable in time, or an early close: nothing dialled.
        account(
            &state,
            Decision::Deny,
            None,
            Some(original),
            Some("nothing_readable"),
        );
        return;
    };
    let stream = Prefixed::new(prefix.clone(), stream);
    match hello {
        Opening::Tls(Some(host)) if state.state.load().routes.routes_host(&host) => {
            account(
                &state,
                Decision::Intercept,
                Some(&host),
                Some(original),
                None,
            );
            intercept_stream(state, stream, host, original.port(), None, Via::Transparent).await;
        }
        Opening::Http => {
            account(&state, Decision::Http, None, Some(original), None);
            serve_http(state, stream).await;
        }
        Opening::Tls(named) => unrouted(state, stream, original, named).await,
        Opening::Other => unrouted(state, stream, original, None).await,
    }
}

/// How a redirected connection opened.
enum Opening {
    /// A TLS ClientHello, with the host its SNI names (`None`: no SNI, or not a host name).
    Tls(Option<Host>),
    /// Plain HTTP/1.x: routed request by request on `Host`.
    Http,
    /// Anything else (another protocol, a malformed hello).
    Other,
}

/// Reads until the opening is known: a whole ClientHello (however many segments it takes), or
/// the first bytes of anything else. Returns what was read, to be replayed.
async fn first_bytes<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
) -> std::io::Result<(Bytes, Opening)> {
    let mut read = BytesMut::with_capacity(2048);
    if stream.read_buf(&mut read).await? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    if read.first() != Some(&TLS_HANDSHAKE) {
        let http = looks_like_http(&read);
        return Ok((
            read.freeze(),
            if http { Opening::Http } else { Opening::Other },
        ));
    }
    let mut acceptor = rustls::server::Acceptor::default();
    let mut fed = 0;
    loop {
        let mut unfed = read.get(fed..).unwrap_or_default();
        fed += acceptor.read_tls(&mut unfed).unwrap_or(0);
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                let host = accepted
                    .client_hello()
                    .server_name()
                    .and_then(|name| Host::parse(name).ok());
                return Ok((read.freeze(), Opening::Tls(host)));
            }
            Ok(None) if read.len() < MAX_HELLO => {
                if stream.read_buf(&mut read).await? == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
            }
            Ok(None) | Err(_) => return Ok((read.freeze(), Opening::Other)),
        }
    }
}

/// An HTTP/1.x request line starts with an upper-case method token and a space.
fn looks_like_http(bytes: &[u8]) -> bool {
    let method: Vec<u8> = bytes
        .iter()
        .take_while(|b| b.is_ascii_uppercase())
        .copied()
        .collect();
    !method.is_empty() && bytes.get(method.len()) == Some(&b' ')
}

/// `unmatched: tunnel` splices to the original destination (egress policy applies to it);
/// `deny` closes.
async fn unrouted<S>(
    state: Arc<ProxyState>,
    mut stream: Prefixed<S>,
    original: SocketAddr,
    named: Option<Host>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let unmatched = state.state.load().unmatched;
    if unmatched == Unmatched::Deny {
        account(
            &state,
            Decision::Deny,
            named.as_ref(),
            Some(original),
            Some("unmatched_denied"),
        );
        return;
    }
    let Ok(host) = Host::parse(&original.ip().to_string()) else {
        return;
    };
    let mut upstream = match state.upstream.dialer().dial(&host, original.port()).await {
        Ok(upstream) => upstream,
        Err(error) => {
            let code = crate::upstream::connect_error(&error).code();
            account(
                &state,
                Decision::Tunnel,
                named.as_ref(),
                Some(original),
                Some(code),
            );
            return;
        }
    };
    account(
        &state,
        Decision::Tunnel,
        named.as_ref(),
        Some(original),
        None,
    );
    if let Err(error) = tokio::io::copy_bidirectional(&mut stream, &mut upstream).await {
        tracing::debug!(%error, "transparent tunnel ended with an error");
    }
}

/// Plain HTTP: each request routed by its `Host`, as an absolute-form request to the proxy
/// would be.
async fn serve_http<S>(state: Arc<ProxyState>, stream: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let shutdown = state.shutdown.clone();
    let timeouts = state.timeouts;
    let idle = IdleWatch::new();
    let watch = idle.clone();
    let service = service_fn(move |request: http::Request<hyper::body::Incoming>| {
        let state = state.clone();
        let in_flight = watch.begin();
        async move {
            let origin = Origin::AbsoluteForm {
                agent: None,
                via: Via::Transparent,
            };
            let response = match absolute_form(request) {
                Ok(request) => pipeline::forward(state, origin, request, in_flight).await,
                Err(error) => error.into_response(),
            };
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(timeouts.request_head)
        .serve_connection(TokioIo::new(stream), service);
    let idle = Some((idle.as_ref(), timeouts.idle));
    serve_until_done(connection, shutdown, idle, |c| c.graceful_shutdown()).await;
}

/// `GET /path` with `Host: name` as `GET http://name/path`.
fn absolute_form(
    mut request: http::Request<hyper::body::Incoming>,
) -> Result<http::Request<hyper::body::Incoming>, crate::error::ProxyError> {
    let missing = crate::error::ProxyError::BadRequest("a redirected HTTP request needs a Host");
    let host = request
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .ok_or(missing)?
        .to_string();
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    *request.uri_mut() = format!("http://{host}{path}")
        .parse()
        .map_err(|_| crate::error::ProxyError::BadRequest("the Host header is not a host"))?;
    Ok(request)
}

/// One audit line and one count per redirected connection.
fn account(
    state: &ProxyState,
    decision: Decision,
    host: Option<&Host>,
    destination: Option<SocketAddr>,
    error: Option<&'static str>,
) {
    state
        .telemetry
        .metrics
        .transparent_connections
        .with_label_values(&[decision.label()])
        .inc();
    if !state.telemetry.audit.is_on() {
        return;
    }
    let line = serde_json::json!({
        "time": format_rfc3339(std::time::SystemTime::now()),
        "kind": "connection",
        "via": "transparent",
        "decision": decision.label(),
        "host": host.map(Host::as_str),
        "destination": destination.map(|d| d.to_string()),
        "error": error,
    });
    state
        .telemetry
        .audit
        .record(&line, &state.telemetry.metrics);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_request_lines_are_told_from_other_protocols() {
        assert!(looks_like_http(b"GET / HTTP/1.1\r\n"));
        assert!(looks_like_http(b"PROPFIND /x HTTP/1.1\r\n"));
        assert!(!looks_like_http(b"SSH-2.0-OpenSSH"));
        assert!(!looks_like_http(b"\x00\x00\x00\x08\x04\xd2\x16\x2f"));
        assert!(!looks_like_http(b"get / HTTP/1.1"));
    }
}
