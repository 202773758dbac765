//! Outbound only: the dialer (honouring `resolve:` pins and egress policy, for tunnels and token
//! endpoints too), the TLS connector that always verifies, and the pools that reuse upstream
//! connections (`pool`: HTTP/1.1 connections lent one request at a time, and a shared h2
//! connection for requests that overlap when the upstream offers h2).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response, Uri};
use rustls::pki_types::ServerName;
use rustls::RootCertStore;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::body::{AgentBodyError, ProxyBody};
use crate::config::Config;
use crate::egress::EgressPolicy;
use crate::error::ProxyError;
use crate::host::{default_port, Host};
use crate::tls::{upstream_client_config, TlsError, ALPN_H2, ALPN_HTTP11};

mod pool;

pub use pool::PooledBody;
use pool::{Pool, PoolError};

const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// `resolve:` pins: (host, port) -> address to dial instead of resolving.
pub type Pins = HashMap<(Host, u16), SocketAddr>;

/// Which protocols a request may go out on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    /// Whichever costs least now (HTTP/1.1 agents, keystamp's own requests): an idle HTTP/1.1
    /// connection, else a stream on a shared h2 connection.
    Any,
    /// h2 when the upstream offers it over ALPN, HTTP/1.1 otherwise (h2 agents: gRPC and other
    /// h2-only semantics stay h2 end to end).
    PreferH2,
    /// HTTP/1.1 only (protocol upgrades).
    Http1,
}

/// Why dialing failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("the URI has no host")]
    NoHost,
    #[error("DNS resolution failed: {0}")]
    Resolve(io::Error),
    #[error("no address answered: {0}")]
    Connect(io::Error),
    #[error("timed out connecting")]
    Timeout,
    #[error("TLS handshake failed: {0}")]
    Tls(io::Error),
    #[error("every address the host resolved to is internal and not allowed by egress policy")]
    EgressDenied,
}

/// Where the dialer reads its rules from on every dial: the published snapshot, so pins and
/// egress policy change together with the routes that need them.
pub trait DialRulesSource: Send + Sync {
    fn dial_rules(&self) -> Arc<DialRules>;
}

/// Rules that never change, for a dialer outside a running keystamp (benches, tools).
struct FixedRules(Arc<DialRules>);

impl DialRulesSource for FixedRules {
    fn dial_rules(&self) -> Arc<DialRules> {
        self.0.clone()
    }
}

/// Opens TCP connections, dialing a `resolve:` pin instead of resolving when one exists.
#[derive(Clone)]
pub struct Dialer {
    rules: Arc<dyn DialRulesSource>,
    /// DNS and TCP, and for upstream requests the TLS handshake too.
    connect_timeout: Duration,
}

/// What the dialer follows; replaced whole on a config reload.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DialRules {
    pub pins: Pins,
    pub egress: EgressPolicy,
}

impl DialRules {
    pub fn from_config(config: &Config) -> Self {
        Self {
            pins: config.resolve.clone(),
            egress: config.egress.clone(),
        }
    }
}

impl Dialer {
    pub fn new(rules: Arc<dyn DialRulesSource>, connect_timeout: Duration) -> Self {
        Self {
            rules,
            connect_timeout,
        }
    }

    /// A dialer whose rules never change.
    pub fn fixed(rules: DialRules) -> Self {
        let connect_timeout = crate::config::Timeouts::default().connect;
        Self::new(Arc::new(FixedRules(Arc::new(rules))), connect_timeout)
    }

    pub async fn dial(&self, host: &Host, port: u16) -> Result<TcpStream, ConnectError> {
        tokio::time::timeout(self.connect_timeout, self.dial_untimed(host, port))
            .await
            .unwrap_or(Err(ConnectError::Timeout))
    }

    async fn dial_untimed(&self, host: &Host, port: u16) -> Result<TcpStream, ConnectError> {
        let rules = self.rules.dial_rules();
        let pinned = rules.pins.get(&(host.clone(), port)).copied();
        let addresses: Vec<SocketAddr> = match pinned {
            // A pin is the operator's explicit choice: no egress check.
            Some(address) => vec![address],
            None => {
                let resolved: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
                    .await
                    .map_err(ConnectError::Resolve)?
                    .collect();
                let permitted: Vec<SocketAddr> = resolved
                    .iter()
                    .copied()
                    .filter(|a| rules.egress.permits(a.ip()))
                    .collect();
                if permitted.is_empty() && !resolved.is_empty() {
                    tracing::warn!(%host, port, addresses = ?resolved, "egress denied: the host resolves to internal addresses only");
                    return Err(ConnectError::EgressDenied);
                }
                permitted
            }
        };
        let mut last = io::Error::new(io::ErrorKind::NotFound, "no addresses");
        for address in addresses {
            match TcpStream::connect(address).await {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    return Ok(stream);
                }
                Err(error) => last = error,
            }
        }
        Err(ConnectError::Connect(last))
    }
}

/// A connection to an upstream, plain (for `http://`) or TLS.
pub enum UpstreamStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl UpstreamStream {
    /// Whether the upstream chose h2 over ALPN.
    pub fn negotiated_h2(&self) -> bool {
        matches!(self, UpstreamStream::Tls(tls) if tls.get_ref().1.alpn_protocol() == Some(ALPN_H2))
    }
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamStream::Plain(s) => s.is_write_vectored(),
            UpstreamStream::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// The hyper connector: dial, then TLS for `https` URIs.
#[derive(Clone)]
pub struct UpstreamConnector {
    dialer: Dialer,
    tls: TlsConnector,
}

impl UpstreamConnector {
    /// Dials `uri`'s host, then TLS for `https`.
    pub async fn dial(&self, uri: &Uri) -> Result<UpstreamStream, ConnectError> {
        let host = uri
            .host()
            .and_then(|host| Host::parse(host).ok())
            .ok_or(ConnectError::NoHost)?;
        let https = uri.scheme_str() == Some("https");
        let port = uri.port_u16().unwrap_or(default_port(https));
        // One deadline for DNS, TCP and TLS: an upstream that accepts and then stalls the
        // handshake must not hold the agent's request.
        let deadline = tokio::time::Instant::now() + self.dialer.connect_timeout;
        let tcp = tokio::time::timeout_at(deadline, self.dialer.dial_untimed(&host, port))
            .await
            .unwrap_or(Err(ConnectError::Timeout))?;
        if !https {
            return Ok(UpstreamStream::Plain(tcp));
        }
        let name = ServerName::try_from(host.as_str().to_string()).map_err(|_| {
            ConnectError::Tls(io::Error::new(
                io::ErrorKind::InvalidInput,
                "invalid server name",
            ))
        })?;
        let tls = tokio::time::timeout_at(deadline, self.tls.connect(name, tcp))
            .await
            .map_err(|_| {
                ConnectError::Tls(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "TLS handshake timed out",
                ))
            })?
            .map_err(ConnectError::Tls)?;
        Ok(UpstreamStream::Tls(Box::new(tls)))
    }
}

/// Sends requests to upstreams over pooled connections. Requests that overlap go to an upstream
/// that offers h2 as streams of one shared connection (more past `MAX_STREAMS_PER_H2`), whatever
/// the agent spoke: with 16 agents that cut the kernel's share of a request by a third (fewer,
/// fuller reads and writes). A lone HTTP/1.1 request takes an HTTP/1.1 connection, cheaper in
/// user space; h2 agents keep h2; upgrades (WebSocket) dial HTTP/1.1 only. Cloning is cheap: the
/// pool is shared.
#[derive(Clone)]
pub struct Upstream {
    pool: Pool,
    dialer: Dialer,
}

impl Upstream {
    pub fn new(
        dialer: Dialer,
        roots: RootCertStore,
        response_head_timeout: Duration,
    ) -> Result<Self, TlsError> {
        let any = upstream_client_config(roots.clone(), &[ALPN_H2, ALPN_HTTP11])?;
        let http1 = upstream_client_config(roots, &[ALPN_HTTP11])?;
        let connector = |config| UpstreamConnector {
            dialer: dialer.clone(),
            tls: TlsConnector::from(config),
        };
        Ok(Self {
            pool: Pool::new(
                connector(any),
                connector(http1),
                POOL_IDLE_TIMEOUT,
                response_head_timeout,
            ),
            dialer: dialer.clone(),
        })
    }

    pub fn dialer(&self) -> &Dialer {
        &self.dialer
    }

    /// Sends `request` (absolute URI) on a pooled connection: connecting within the connect
    /// timeout, then the response head within the response-head timeout.
    pub async fn send(
        &self,
        request: Request<ProxyBody>,
        protocol: UpstreamProtocol,
    ) -> Result<Response<PooledBody>, ProxyError> {
        self.pool
            .send(request, protocol)
            .await
            .map_err(classify_pool)
    }
}

fn classify_pool(error: PoolError) -> ProxyError {
    match &error {
        PoolError::Connect(connect) => {
            tracing::debug!(error = %connect, "upstream connect failed");
            connect_error(connect)
        }
        PoolError::NoAuthority => ProxyError::UpstreamConnect("no host".into()),
        PoolError::HeadTimeout => ProxyError::UpstreamTimeout,
        PoolError::Handshake(_) => classify_chain(&error, true),
        PoolError::Request(_) => classify_chain(&error, false),
    }
}

/// Looks through an error's sources for a connect failure or the agent's broken body.
fn classify_chain(error: &(dyn std::error::Error + 'static), is_connect: bool) -> ProxyError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = source {
        if let Some(connect) = current.downcast_ref::<ConnectError>() {
            tracing::debug!(error = %connect, "upstream connect failed");
            return connect_error(connect);
        }
        if let Some(agent) = current.downcast_ref::<AgentBodyError>() {
            tracing::debug!(error = %agent, "the agent's request body failed mid-stream");
            return ProxyError::AGENT_BODY_FAILED;
        }
        source = current.source();
    }
    tracing::debug!(%error, "upstream request failed");
    if is_connect {
        ProxyError::UpstreamConnect("connection failed".into())
    } else {
        ProxyError::UpstreamFailed
    }
}

pub fn connect_error(error: &ConnectError) -> ProxyError {
    match error {
        ConnectError::Tls(_) => ProxyError::UpstreamTls,
        ConnectError::NoHost => ProxyError::UpstreamConnect("no host".into()),
        ConnectError::Resolve(_) => ProxyError::UpstreamConnect("DNS resolution failed".into()),
        ConnectError::Connect(e) => ProxyError::UpstreamConnect(format!("{}", e.kind())),
        ConnectError::Timeout => ProxyError::UpstreamConnect("timed out".into()),
        ConnectError::EgressDenied => ProxyError::EgressDenied,
    }
}
