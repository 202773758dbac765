//! Upstream connections kept between requests, one pool for both protocols. An HTTP/1.1
//! connection serves one request at a time and is taken back only when its response body has
//! been read to the end. An h2 connection is shared: requests that overlap (from h1 and h2
//! agents alike, upgrades excepted) go out as streams on it, up to `MAX_STREAMS_PER_H2` at once,
//! so many agent connections cost one TLS session and few upstream reads and writes; a lone
//! HTTP/1.1 agent's request stays on HTTP/1.1, which costs less CPU. Which protocol an upstream
//! speaks is learned from ALPN when a dial offers h2.

use std::collections::HashMap;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, HOST};
use http::uri::{Authority, PathAndQuery, Uri};
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::Instant;

use super::{ConnectError, UpstreamConnector, UpstreamProtocol, UpstreamStream};
use crate::body::ProxyBody;
use crate::echo::Echoes;

/// Idle HTTP/1.1 connections kept per upstream; more are closed when their request ends.
const MAX_IDLE_PER_UPSTREAM: usize = 64;
/// Streams keystamp opens at once on one h2 connection before it opens another. Below the
/// limits public APIs announce (100 and up), so a request never queues behind the server's.
const MAX_STREAMS_PER_H2: usize = 100;
/// How often idle connections past the idle timeout are closed.
const REAP_EVERY: Duration = Duration::from_secs(30);

/// Why a request found no connection or lost it.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("the request URI has no scheme or host")]
    NoAuthority,
    #[error("connecting failed: {0}")]
    Connect(#[from] ConnectError),
    #[error("the HTTP handshake failed: {0}")]
    Handshake(#[source] hyper::Error),
    #[error("the request failed: {0}")]
    Request(#[source] hyper::Error),
    #[error("no response head within the response-head timeout")]
    HeadTimeout,
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

/// An h2 connection and how many of its streams are open.
struct SharedH2 {
    sender: http2::SendRequest<ProxyBody>,
    streams: Arc<StreamCount>,
}

/// Open streams on one h2 connection, and when the last one ended.
struct StreamCount {
    open: AtomicUsize,
    idle_since: Mutex<Instant>,
}

impl SharedH2 {
    /// Open, and either busy or idle for less than `timeout`.
    fn usable(&self, now: Instant, timeout: Duration) -> bool {
        if self.sender.is_closed() {
            return false;
        }
        self.streams.open.load(Ordering::Acquire) > 0
            || self
                .streams
                .idle_since
                .lock()
                .map_or(true, |since| now.duration_since(*since) < timeout)
    }
}

/// What the pool holds for one upstream.
#[derive(Default)]
struct UpstreamConnections {
    idle_http1: Vec<IdleConnection>,
    /// HTTP/1.1 connections lent out (or being dialed) right now.
    lent_http1: Arc<AtomicUsize>,
    shared_h2: Vec<SharedH2>,
    /// What the last dial with h2 offered negotiated; `None` before the first.
    speaks_h2: Option<bool>,
    /// Held while dialing with h2 offered, so that requests arriving together at a cold h2
    /// upstream share the one connection the first of them opens.
    dialing: Arc<tokio::sync::Mutex<()>>,
}

impl UpstreamConnections {
    /// The most recently returned idle HTTP/1.1 connection still usable.
    fn take_http1(&mut self, now: Instant, timeout: Duration) -> Option<Taken> {
        while let Some(connection) = self.idle_http1.pop() {
            if connection.usable(now, timeout) {
                return Some(Taken::Http1(connection.sender, self.lend_http1()));
            }
        }
        None
    }

    /// A stream on a shared h2 connection with room for one more.
    fn take_h2(&mut self) -> Option<Taken> {
        self.shared_h2.retain(|c| !c.sender.is_closed());
        let shared = self
            .shared_h2
            .iter()
            .find(|c| c.streams.open.load(Ordering::Acquire) < MAX_STREAMS_PER_H2)?;
        Some(Taken::Http2(
            shared.sender.clone(),
            StreamSlot::open(&shared.streams),
        ))
    }

    /// Whether any request to this upstream is in flight, on either protocol.
    fn busy(&self) -> bool {
        self.lent_http1.load(Ordering::Acquire) > 0
            || self
                .shared_h2
                .iter()
                .any(|c| c.streams.open.load(Ordering::Acquire) > 0)
    }

    fn lend_http1(&self) -> LentHttp1 {
        self.lent_http1.fetch_add(1, Ordering::AcqRel);
        LentHttp1(self.lent_http1.clone())
    }

    /// Holds no connection and nobody is using or dialing one: only the memory of whether the
    /// upstream speaks h2 is left, which the next dial learns again.
    fn forgettable(&self) -> bool {
        self.idle_http1.is_empty()
            && self.shared_h2.is_empty()
            && self.lent_http1.load(Ordering::Acquire) == 0
            && Arc::strong_count(&self.dialing) == 1
    }
}

/// Counts one HTTP/1.1 connection as lent out until dropped.
struct LentHttp1(Arc<AtomicUsize>);

impl Drop for LentHttp1 {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How `connect` dials: for HTTP/1.1 only (its place already counted), or offering h2 in turn
/// with others doing the same.
enum Dial {
    Http1(LentHttp1),
    OfferingH2(Arc<tokio::sync::Mutex<()>>),
}

/// A connection taken for one request.
enum Taken {
    Http1(http1::SendRequest<ProxyBody>, LentHttp1),
    Http2(http2::SendRequest<ProxyBody>, StreamSlot),
}

struct Inner {
    /// Offers h2 and HTTP/1.1 over ALPN.
    connector: UpstreamConnector,
    /// Offers HTTP/1.1 only (protocol upgrades).
    http1_connector: UpstreamConnector,
    upstreams: Mutex<HashMap<PoolKey, UpstreamConnections>>,
    idle_timeout: Duration,
    /// From sending a request to its status line; connecting has its own deadline.
    response_head_timeout: Duration,
    reaper_started: std::sync::Once,
}

/// The pool; cloning is cheap and shares it.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

impl Pool {
    pub fn new(
        connector: UpstreamConnector,
        http1_connector: UpstreamConnector,
        idle_timeout: Duration,
        response_head_timeout: Duration,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                connector,
                http1_connector,
                upstreams: Mutex::new(HashMap::new()),
                idle_timeout,
                response_head_timeout,
                reaper_started: std::sync::Once::new(),
            }),
        }
    }

    /// Sends `request` (absolute URI) on a stream of a shared h2 connection, an idle HTTP/1.1
    /// connection, or a new connection. A request found unsent on a connection the upstream
    /// closed goes out on another.
    pub async fn send(
        &self,
        mut request: Request<ProxyBody>,
        protocol: UpstreamProtocol,
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
        loop {
            let (taken, reused) = match self.take(&key, protocol) {
                Some(taken) => (taken, true),
                None => (self.connect(&key, &uri, protocol).await?, false),
            };
            let unsent = match taken {
                Taken::Http1(mut sender, lent) => {
                    // A reused connection may have been closed by the upstream while idle.
                    if let Err(error) = sender.ready().await {
                        if reused {
                            continue;
                        }
                        return Err(PoolError::Request(error));
                    }
                    to_origin_form(&mut request, &key.authority);
                    let sent = self.head_deadline(sender.try_send_request(request)).await?;
                    match sent {
                        Ok(response) => {
                            // After a 101 the connection belongs to the upgraded protocol.
                            let hold = if response.status() == http::StatusCode::SWITCHING_PROTOCOLS
                            {
                                Hold::Nothing
                            } else {
                                Hold::Http1(Lease {
                                    pool: Arc::downgrade(&self.inner),
                                    key,
                                    sender,
                                    _lent: lent,
                                })
                            };
                            return Ok(response.map(|inner| PooledBody {
                                inner,
                                hold,
                                echoes: None,
                            }));
                        }
                        Err(mut error) => match error.take_message() {
                            Some(unsent) if reused => unsent,
                            _ => return Err(PoolError::Request(error.into_error())),
                        },
                    }
                }
                Taken::Http2(mut sender, slot) => {
                    to_absolute_form(&mut request, &uri);
                    match self.head_deadline(sender.try_send_request(request)).await? {
                        Ok(response) => {
                            let hold = Hold::Http2 { _slot: slot };
                            return Ok(response.map(|inner| PooledBody {
                                inner,
                                hold,
                                echoes: None,
                            }));
                        }
                        Err(mut error) => match error.take_message() {
                            Some(unsent) if sender.is_closed() => unsent,
                            _ => return Err(PoolError::Request(error.into_error())),
                        },
                    }
                }
            };
            // Never written: safe to send again on another connection.
            request = unsent;
        }
    }

    /// Waits for `sent` (a request going out, until its response head) for at most the
    /// response-head timeout.
    async fn head_deadline<T>(&self, sent: impl Future<Output = T>) -> Result<T, PoolError> {
        tokio::time::timeout(self.inner.response_head_timeout, sent)
            .await
            .map_err(|_| PoolError::HeadTimeout)
    }

    /// A connection already open, by `protocol`: a lone request costs the least CPU on
    /// HTTP/1.1, overlapping ones the least I/O as streams of one h2 connection, so `Any` takes
    /// an idle HTTP/1.1 connection when nothing else to the upstream is in flight and a shared
    /// h2 stream while something is; h2 agents get h2 where the upstream speaks it.
    fn take(&self, key: &PoolKey, protocol: UpstreamProtocol) -> Option<Taken> {
        let mut upstreams = self.inner.upstreams.lock().ok()?;
        let connections = upstreams.get_mut(key)?;
        let (now, timeout) = (Instant::now(), self.inner.idle_timeout);
        match protocol {
            UpstreamProtocol::Http1 => connections.take_http1(now, timeout),
            UpstreamProtocol::PreferH2 if connections.speaks_h2 == Some(false) => {
                connections.take_http1(now, timeout)
            }
            UpstreamProtocol::PreferH2 => connections.take_h2(),
            // Alone, or HTTP/1.1 is all there is: an idle HTTP/1.1 connection, or `connect`
            // dials one.
            UpstreamProtocol::Any
                if connections.speaks_h2 == Some(false) || !connections.busy() =>
            {
                connections.take_http1(now, timeout)
            }
            UpstreamProtocol::Any => connections.take_h2(),
        }
    }

    /// Dials `key`'s upstream. HTTP/1.1 when the request must have it, when the upstream only
    /// speaks it, or (`Any`) when no other request to it is in flight: a lone agent keeps the
    /// cheaper protocol. Otherwise h2 is offered; dials that may end in h2 wait for
    /// one another, then look again for a shared connection.
    async fn connect(
        &self,
        key: &PoolKey,
        uri: &Uri,
        protocol: UpstreamProtocol,
    ) -> Result<Taken, PoolError> {
        self.start_reaper();
        let dialing = {
            let mut upstreams = self.inner.upstreams.lock().map_err(|_| poisoned())?;
            let connections = upstreams.entry(key.clone()).or_default();
            let http1 = match protocol {
                UpstreamProtocol::Http1 => true,
                UpstreamProtocol::PreferH2 => connections.speaks_h2 == Some(false),
                UpstreamProtocol::Any => {
                    connections.speaks_h2 == Some(false) || !connections.busy()
                }
            };
            if http1 {
                Dial::Http1(connections.lend_http1())
            } else {
                Dial::OfferingH2(connections.dialing.clone())
            }
        };
        let dialing = match dialing {
            Dial::OfferingH2(dialing) => dialing,
            Dial::Http1(lent) => return self.dial_http1(key, uri, lent).await,
        };
        let turn = dialing.lock().await;
        if let Some(taken) = self.take(key, protocol) {
            return Ok(taken);
        }
        if let Some(lent) = self.lend_if_http1_only(key) {
            // Learned while waiting: HTTP/1.1 connections are dialed side by side.
            drop(turn);
            return self.dial_http1(key, uri, lent).await;
        }
        let io = self.inner.connector.dial(uri).await?;
        let h2 = io.negotiated_h2();
        let mut lent = None;
        if let Ok(mut upstreams) = self.inner.upstreams.lock() {
            let connections = upstreams.entry(key.clone()).or_default();
            connections.speaks_h2 = Some(h2);
            lent = (!h2).then(|| connections.lend_http1());
        }
        if !h2 {
            let lent = lent.ok_or_else(poisoned)?;
            let sender = handshake_http1(key, io).await?;
            return Ok(Taken::Http1(sender, lent));
        }
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(hyper_util::rt::TokioIo::new(io))
            .await
            .map_err(PoolError::Handshake)?;
        let upstream = key.authority.clone();
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%upstream, %error, "upstream h2 connection ended with an error");
            }
        });
        let shared = SharedH2 {
            sender: sender.clone(),
            streams: Arc::new(StreamCount {
                open: AtomicUsize::new(0),
                idle_since: Mutex::new(Instant::now()),
            }),
        };
        let slot = StreamSlot::open(&shared.streams);
        if let Ok(mut upstreams) = self.inner.upstreams.lock() {
            upstreams
                .entry(key.clone())
                .or_default()
                .shared_h2
                .push(shared);
        }
        Ok(Taken::Http2(sender, slot))
    }

    /// Lends a new HTTP/1.1 connection's place if the upstream is known to speak only HTTP/1.1.
    fn lend_if_http1_only(&self, key: &PoolKey) -> Option<LentHttp1> {
        let upstreams = self.inner.upstreams.lock().ok()?;
        let connections = upstreams.get(key)?;
        (connections.speaks_h2 == Some(false)).then(|| connections.lend_http1())
    }

    /// Dials for HTTP/1.1 only (ALPN offers nothing else).
    async fn dial_http1(
        &self,
        key: &PoolKey,
        uri: &Uri,
        lent: LentHttp1,
    ) -> Result<Taken, PoolError> {
        let io = self.inner.http1_connector.dial(uri).await?;
        let sender = handshake_http1(key, io).await?;
        Ok(Taken::Http1(sender, lent))
    }

    /// Closes idle connections past the idle timeout every `REAP_EVERY`, and forgets upstreams
    /// left with no connection (a wildcard route would otherwise grow the map with every host
    /// an agent ever named), for as long as the pool lives. Started with the first connection
    /// (a runtime is running by then).
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

fn poisoned() -> PoolError {
    PoolError::Connect(ConnectError::Connect(std::io::Error::other(
        "connection pool lock poisoned",
    )))
}

async fn handshake_http1(
    key: &PoolKey,
    io: UpstreamStream,
) -> Result<http1::SendRequest<ProxyBody>, PoolError> {
    let (sender, connection) = http1::Builder::new()
        .handshake(hyper_util::rt::TokioIo::new(io))
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

impl Inner {
    fn reap(&self, now: Instant) {
        if let Ok(mut upstreams) = self.upstreams.lock() {
            upstreams.retain(|_, connections| {
                connections
                    .idle_http1
                    .retain(|c| c.usable(now, self.idle_timeout));
                connections
                    .shared_h2
                    .retain(|c| c.usable(now, self.idle_timeout));
                !connections.forgettable()
            });
        }
    }

    fn put_back(&self, key: PoolKey, sender: http1::SendRequest<ProxyBody>) {
        if sender.is_closed() {
            return;
        }
        if let Ok(mut upstreams) = self.upstreams.lock() {
            let connections = &mut upstreams.entry(key).or_default().idle_http1;
            if connections.len() < MAX_IDLE_PER_UPSTREAM {
                connections.push(IdleConnection {
                    sender,
                    since: Instant::now(),
                });
            }
        }
    }
}

/// One open stream on a shared h2 connection, counted until the response body ends or drops.
struct StreamSlot {
    streams: Arc<StreamCount>,
}

impl StreamSlot {
    fn open(streams: &Arc<StreamCount>) -> Self {
        streams.open.fetch_add(1, Ordering::AcqRel);
        Self {
            streams: streams.clone(),
        }
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        if self.streams.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            if let Ok(mut since) = self.streams.idle_since.lock() {
                *since = Instant::now();
            }
        }
    }
}

/// Puts back the absolute URI an h2 request carries (`:scheme`, `:authority`); `Host` goes, as
/// `:authority` says it and h2 servers may refuse both.
fn to_absolute_form(request: &mut Request<ProxyBody>, uri: &Uri) {
    if request.uri() != uri {
        *request.uri_mut() = uri.clone();
    }
    request.headers_mut().remove(HOST);
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
    _lent: LentHttp1,
}

/// An upstream response body. When it has been read to its end, the connection it came on goes
/// back to the pool; dropped before that, the connection is closed with it (the rest of the body
/// would otherwise arrive as the next response).
pub struct PooledBody {
    inner: Incoming,
    hold: Hold,
    /// Taken out of the trailers (h2, chunked HTTP/1.1) as the headers were.
    echoes: Option<Echoes>,
}

/// What a response body keeps from the pool until it ends.
enum Hold {
    Nothing,
    Http1(Lease),
    /// Held for its drop, which frees the stream's place.
    Http2 {
        _slot: StreamSlot,
    },
}

impl PooledBody {
    /// Redacts `echoes` from the trailers when they arrive.
    pub fn redact_trailers(&mut self, echoes: Echoes) {
        self.echoes = Some(echoes);
    }

    /// Gives the connection back (HTTP/1.1) or frees the stream's place (h2).
    fn release(&mut self) {
        if let Hold::Http1(lease) = std::mem::replace(&mut self.hold, Hold::Nothing) {
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
        let mut polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &mut polled {
            Poll::Ready(None) => self.release(),
            Poll::Ready(Some(Err(_))) => self.hold = Hold::Nothing,
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(trailers), Some(echoes)) = (frame.trailers_mut(), &self.echoes) {
                    echoes.redact(trailers);
                }
            }
            Poll::Pending => {}
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::{DialRules, Dialer, Upstream};

    fn pool() -> Pool {
        let dialer = Dialer::fixed(DialRules::default());
        let upstream = Upstream::new(
            dialer,
            rustls::RootCertStore::empty(),
            Duration::from_secs(5),
        )
        .expect("an upstream with no roots still builds");
        upstream.pool.clone()
    }

    fn key(authority: &str) -> PoolKey {
        PoolKey {
            https: true,
            authority: authority.parse().expect("authority"),
        }
    }

    #[test]
    fn the_reaper_forgets_upstreams_left_with_no_connection() {
        let pool = pool();
        let (lent, dialing);
        {
            let mut upstreams = pool.inner.upstreams.lock().expect("lock");
            for host in [
                "a.example:443",
                "b.example:443",
                "c.example:443",
                "d.example:443",
            ] {
                upstreams.entry(key(host)).or_default().speaks_h2 = Some(true);
            }
            lent = upstreams[&key("b.example:443")].lend_http1();
            dialing = upstreams[&key("c.example:443")].dialing.clone();
        }
        pool.inner.reap(Instant::now());
        let kept = |host: &str| {
            let upstreams = pool.inner.upstreams.lock().expect("lock");
            upstreams.contains_key(&key(host))
        };
        assert!(!kept("a.example:443"), "nothing left: forgotten");
        assert!(!kept("d.example:443"), "nothing left: forgotten");
        assert!(kept("b.example:443"), "a connection is lent out");
        assert!(kept("c.example:443"), "a dial is in progress");
        drop((lent, dialing));
        pool.inner.reap(Instant::now());
        assert!(pool.inner.upstreams.lock().expect("lock").is_empty());
    }
}
