//! HTTP/1.1 connections to upstreams, kept between requests. A connection serves one request at
//! a time and is taken back only when its response body has been read to the end, so the next
//! request goes out on a warm connection without a handshake. Replaces hyper-util's pool on the
//! HTTP/1.1 path, which cost every request a checkout and return hashed byte by byte, a `Host`
//! header formatted anew and a task spawned to notice the connection was free again.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, HOST};
use http::uri::{Authority, PathAndQuery, Uri};
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use tokio::time::Instant;
use tower_service::Service;

use super::{ConnectError, UpstreamConnector};
use crate::body::ProxyBody;

/// Idle connections kept per upstream; more are closed when their request ends.
const MAX_IDLE_PER_UPSTREAM: usize = 64;
/// How often idle connections past the idle timeout are closed.
const REAP_EVERY: Duration = Duration::from_secs(30);

/// Why a request found no connection or lost it.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("the request URI has no scheme or host")]
    NoAuthority,
    #[error("connecting failed: {0}")]
    Connect(#[from] ConnectError),
    #[error("the HTTP/1.1 handshake failed: {0}")]
    Handshake(#[source] hyper::Error),
    #[error("the request failed: {0}")]
    Request(#[source] hyper::Error),
}

/// Which upstream a connection reaches. Authorities are hashed as one string (keystamp writes
/// them lowercase), not byte by byte as `http`'s case-insensitive `Hash` does.
#[derive(Clone, Debug)]
struct PoolKey {
    https: bool,
    authority: Authority,
}

impl PartialEq for PoolKey {
    fn eq(&self, other: &Self) -> bool {
        self.https == other.https && self.authority.as_str() == other.authority.as_str()
    }
}

impl Eq for PoolKey {}

impl Hash for PoolKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.https.hash(state);
        self.authority.as_str().hash(state);
    }
}

struct IdleConnection {
    sender: http1::SendRequest<ProxyBody>,
    since: Instant,
}

impl IdleConnection {
    /// Still open and idle for less than `timeout`.
    fn usable(&self, now: Instant, timeout: Duration) -> bool {
        !self.sender.is_closed() && now.duration_since(self.since) < timeout
    }
}

struct Inner {
    connector: UpstreamConnector,
    idle: Mutex<HashMap<PoolKey, Vec<IdleConnection>>>,
    idle_timeout: Duration,
    reaper_started: std::sync::Once,
}

/// The pool; cloning is cheap and shares it.
#[derive(Clone)]
pub struct Http1Pool {
    inner: Arc<Inner>,
}

impl Http1Pool {
    pub fn new(connector: UpstreamConnector, idle_timeout: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                connector,
                idle: Mutex::new(HashMap::new()),
                idle_timeout,
                reaper_started: std::sync::Once::new(),
            }),
        }
    }

    /// Sends `request` (absolute URI) on an idle connection to its upstream, or a new one. A
    /// request that finds its idle connection closed by the upstream goes out on another.
    pub async fn send(
        &self,
        mut request: Request<ProxyBody>,
    ) -> Result<Response<PooledBody>, PoolError> {
        let key = PoolKey {
            https: request.uri().scheme_str() == Some("https"),
            authority: request
                .uri()
                .authority()
                .cloned()
                .ok_or(PoolError::NoAuthority)?,
        };
        let uri = request.uri().clone();
        to_origin_form(&mut request, &key.authority);
        loop {
            let (mut sender, reused) = match self.take_idle(&key) {
                Some(sender) => (sender, true),
                None => (self.connect(&key, uri.clone()).await?, false),
            };
            // A reused connection may have been closed by the upstream while idle: try another.
            if let Err(error) = sender.ready().await {
                if reused {
                    continue;
                }
                return Err(PoolError::Request(error));
            }
            match sender.try_send_request(request).await {
                Ok(response) => {
                    // After a 101 the connection belongs to the upgraded protocol.
                    let lease =
                        (response.status() != http::StatusCode::SWITCHING_PROTOCOLS).then(|| {
                            Lease {
                                pool: Arc::downgrade(&self.inner),
                                key,
                                sender,
                            }
                        });
                    return Ok(response.map(|inner| PooledBody { inner, lease }));
                }
                Err(mut error) => match error.take_message() {
                    // Never written: safe to send again on another connection.
                    Some(unsent) if reused => request = unsent,
                    _ => return Err(PoolError::Request(error.into_error())),
                },
            }
        }
    }

    fn take_idle(&self, key: &PoolKey) -> Option<http1::SendRequest<ProxyBody>> {
        let mut idle = self.inner.idle.lock().ok()?;
        let connections = idle.get_mut(key)?;
        let now = Instant::now();
        while let Some(connection) = connections.pop() {
            if connection.usable(now, self.inner.idle_timeout) {
                return Some(connection.sender);
            }
        }
        None
    }

    async fn connect(
        &self,
        key: &PoolKey,
        uri: Uri,
    ) -> Result<http1::SendRequest<ProxyBody>, PoolError> {
        self.start_reaper();
        let io = self.inner.connector.clone().call(uri).await?;
        let (sender, connection) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(PoolError::Handshake)?;
        let upstream = key.authority.clone();
        tokio::spawn(async move {
            if let Err(error) = connection.with_upgrades().await {
                tracing::debug!(%upstream, %error, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }

    /// Closes idle connections past the idle timeout every `REAP_EVERY`, for as long as the pool
    /// lives. Started with the first connection (a runtime is running by then).
    fn start_reaper(&self) {
        self.inner.reaper_started.call_once(|| {
            let pool = Arc::downgrade(&self.inner);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(REAP_EVERY);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    let Some(inner) = pool.upgrade() else { return };
                    inner.reap(Instant::now());
                }
            });
        });
    }
}

impl Inner {
    fn reap(&self, now: Instant) {
        if let Ok(mut idle) = self.idle.lock() {
            for connections in idle.values_mut() {
                connections.retain(|c| c.usable(now, self.idle_timeout));
            }
            idle.retain(|_, connections| !connections.is_empty());
        }
    }

    fn put_back(&self, key: PoolKey, sender: http1::SendRequest<ProxyBody>) {
        if sender.is_closed() {
            return;
        }
        if let Ok(mut idle) = self.idle.lock() {
            let connections = idle.entry(key).or_default();
            if connections.len() < MAX_IDLE_PER_UPSTREAM {
                connections.push(IdleConnection {
                    sender,
                    since: Instant::now(),
                });
            }
        }
    }
}

/// Rewrites an absolute URI to origin form (`/path?query`) with `Host` set from the authority,
/// as HTTP/1.1 servers expect.
fn to_origin_form(request: &mut Request<ProxyBody>, authority: &Authority) {
    let path = request
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let mut parts = http::uri::Parts::default();
    parts.path_and_query = Some(path);
    if let Ok(origin_form) = Uri::from_parts(parts) {
        *request.uri_mut() = origin_form;
    }
    if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
        request.headers_mut().insert(HOST, host);
    }
}

/// A connection lent to one request, returned when its response body ends.
struct Lease {
    pool: Weak<Inner>,
    key: PoolKey,
    sender: http1::SendRequest<ProxyBody>,
}

/// An upstream response body. When it has been read to its end, the connection it came on goes
/// back to the pool; dropped before that, the connection is closed with it (the rest of the body
/// would otherwise arrive as the next response).
pub struct PooledBody {
    inner: Incoming,
    lease: Option<Lease>,
}

impl PooledBody {
    /// A body whose connection is not this pool's (h2, shared by many requests).
    pub fn unpooled(inner: Incoming) -> Self {
        Self { inner, lease: None }
    }

    fn release(&mut self) {
        if let Some(lease) = self.lease.take() {
            if let Some(pool) = lease.pool.upgrade() {
                pool.put_back(lease.key, lease.sender);
            }
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.release(),
            Poll::Ready(Some(Err(_))) => self.lease = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // An empty body (204, HEAD, Content-Length: 0) is often never polled: it ended all the same.
        if self.inner.is_end_stream() {
            self.release();
        }
    }
}
