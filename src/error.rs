//! keystamp's own errors and the one place an error becomes a response. Every response keystamp
//! makes itself carries `x-keystamp-error: <code>` and a JSON body `{"code", "message", ...}`,
//! so an agent can tell keystamp's 502 from the upstream's. Messages never carry a secret.

use std::time::Duration;

use http::{header, HeaderValue, Response, StatusCode};

use crate::body::{full, ProxyBody};

pub const ERROR_HEADER: &str = "x-keystamp-error";

/// Which side a failure belongs to; only upstream verdicts may count against a credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Agent,
    Upstream,
    Keystamp,
}

impl Side {
    pub fn label(self) -> &'static str {
        match self {
            Side::Agent => "agent",
            Side::Upstream => "upstream",
            Side::Keystamp => "keystamp",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route for this host and unmatched hosts are denied")]
    UnmatchedDenied,
    #[error("the host is routed, but no route allows this method and path")]
    RouteDenied,
    #[error("credential `{credential}` has no usable value: {reason}")]
    CredentialUnavailable { credential: String, reason: String },
    #[error("credential `{credential}` expired and no newer version could be fetched")]
    CredentialExpired { credential: String },
    #[error("credential `{credential}` is rejected by the upstream ({reason}); requests are held back until it is rotated or the breaker probes again")]
    CircuitOpen {
        credential: String,
        reason: String,
        retry_after: Duration,
        fingerprint: Option<String>,
    },
    #[error("credential `{credential}` mints no more task tokens now: {why}")]
    MintLimited {
        credential: String,
        /// What was reached: the credential's mint rate or the agent's live task tokens.
        why: &'static str,
        retry_after: Duration,
    },
    #[error("{subject} `{name}` is over its rate limit")]
    RateLimited {
        /// `credential` or `agent`: whose limit it is.
        subject: &'static str,
        name: String,
        retry_after: Duration,
    },
    #[error("the upstream's TLS certificate could not be verified or the handshake failed")]
    UpstreamTls,
    #[error("could not connect to the upstream: {0}")]
    UpstreamConnect(String),
    #[error("the upstream sent no response head in time")]
    UpstreamTimeout,
    #[error(
        "keystamp never forwards {0} to a routed host: the upstream could reflect the credential"
    )]
    MethodRefused(&'static str),
    #[error("this route stamps its credential only over TLS; use an https:// URL")]
    TlsRequired,
    #[error("only the chunked transfer coding is supported")]
    TransferCodingUnsupported,
    #[error("the request body is larger than reload.replay_body_limit ({limit} bytes) and this AWS service does not accept an unsigned payload")]
    BodyTooLargeToSign { limit: usize },
    #[error("too many agent connections; try again shortly")]
    TooManyConnections,
    #[error("the upstream connection failed before a response arrived")]
    UpstreamFailed,
    #[error("the destination resolves to an internal address that egress policy does not allow")]
    EgressDenied,
    #[error("keystamp needs the agent's identity: set HTTPS_PROXY=http://NAME:TOKEN@host:port")]
    IdentityRequired,
    #[error("this agent may not use this route for this method and path")]
    ScopeDenied,
    #[error("the request's host does not match the CONNECT host")]
    HostMismatch,
    #[error("{0}")]
    BadRequest(&'static str),
    #[error("keystamp could not prepare the request: {0}")]
    Internal(&'static str),
}

impl ProxyError {
    /// The agent's streamed request body broke off or was malformed mid-request.
    pub const AGENT_BODY_FAILED: ProxyError =
        ProxyError::BadRequest("the request body is malformed or ended early");

    /// The stable, machine-readable code agents script against.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::UnmatchedDenied => "unmatched_denied",
            ProxyError::RouteDenied => "route_denied",
            ProxyError::CredentialUnavailable { .. } => "credential_unavailable",
            ProxyError::CredentialExpired { .. } => "credential_expired",
            ProxyError::CircuitOpen { .. } => "credential_circuit_open",
            ProxyError::RateLimited { .. } => "rate_limited",
            ProxyError::MintLimited { .. } => "mint_limited",
            ProxyError::UpstreamTls => "upstream_tls",
            ProxyError::UpstreamConnect(_) => "upstream_connect",
            ProxyError::UpstreamTimeout => "upstream_timeout",
            ProxyError::MethodRefused(_) => "method_not_allowed",
            ProxyError::TlsRequired => "tls_required",
            ProxyError::TransferCodingUnsupported => "transfer_coding_unsupported",
            ProxyError::BodyTooLargeToSign { .. } => "body_too_large_to_sign",
            ProxyError::TooManyConnections => "too_many_connections",
            ProxyError::UpstreamFailed => "upstream_failed",
            ProxyError::HostMismatch => "host_mismatch",
            ProxyError::EgressDenied => "egress_denied",
            ProxyError::IdentityRequired => "identity_required",
            ProxyError::ScopeDenied => "scope_denied",
            ProxyError::BadRequest(_) => "bad_request",
            ProxyError::Internal(_) => "internal",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::UnmatchedDenied
            | ProxyError::RouteDenied
            | ProxyError::EgressDenied
            | ProxyError::ScopeDenied
            | ProxyError::TlsRequired => StatusCode::FORBIDDEN,
            ProxyError::MethodRefused(_) => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::TransferCodingUnsupported => StatusCode::NOT_IMPLEMENTED,
            ProxyError::BodyTooLargeToSign { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::TooManyConnections => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::IdentityRequired => StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            ProxyError::CredentialUnavailable { .. }
            | ProxyError::CredentialExpired { .. }
            | ProxyError::CircuitOpen { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::RateLimited { .. } | ProxyError::MintLimited { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ProxyError::UpstreamTls
            | ProxyError::UpstreamConnect(_)
            | ProxyError::UpstreamFailed => StatusCode::BAD_GATEWAY,
            ProxyError::HostMismatch => StatusCode::MISDIRECTED_REQUEST,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn side(&self) -> Side {
        match self {
            ProxyError::UnmatchedDenied
            | ProxyError::RouteDenied
            | ProxyError::EgressDenied
            | ProxyError::IdentityRequired
            | ProxyError::ScopeDenied
            | ProxyError::HostMismatch
            | ProxyError::MethodRefused(_)
            | ProxyError::TlsRequired
            | ProxyError::TransferCodingUnsupported
            | ProxyError::BodyTooLargeToSign { .. }
            | ProxyError::BadRequest(_) => Side::Agent,
            ProxyError::UpstreamTls
            | ProxyError::UpstreamConnect(_)
            | ProxyError::UpstreamTimeout
            | ProxyError::UpstreamFailed => Side::Upstream,
            ProxyError::CredentialUnavailable { .. }
            | ProxyError::CredentialExpired { .. }
            | ProxyError::CircuitOpen { .. }
            | ProxyError::RateLimited { .. }
            | ProxyError::MintLimited { .. }
            | ProxyError::TooManyConnections
            | ProxyError::Internal(_) => Side::Keystamp,
        }
    }

    pub fn into_response(self) -> Response<ProxyBody> {
        let mut body = serde_json::Map::new();
        body.insert("code".into(), self.code().into());
        body.insert("message".into(), self.to_string().into());
        let mut retry_after = None;
        match &self {
            ProxyError::CredentialUnavailable { credential, .. }
            | ProxyError::CredentialExpired { credential } => {
                body.insert("credential".into(), credential.as_str().into());
            }
            ProxyError::CircuitOpen {
                credential,
                reason,
                retry_after: wait,
                fingerprint,
            } => {
                let seconds = whole_seconds(*wait);
                body.insert("credential".into(), credential.as_str().into());
                body.insert("reason".into(), reason.as_str().into());
                body.insert("retry_after_s".into(), seconds.into());
                body.insert("fingerprint".into(), fingerprint.clone().into());
                retry_after = Some(seconds);
            }
            ProxyError::RateLimited {
                subject,
                name,
                retry_after: wait,
            } => {
                let seconds = whole_seconds(*wait);
                body.insert((*subject).into(), name.as_str().into());
                body.insert("retry_after_s".into(), seconds.into());
                retry_after = Some(seconds);
            }
            ProxyError::MintLimited {
                credential,
                retry_after: wait,
                ..
            } => {
                let seconds = whole_seconds(*wait);
                body.insert("credential".into(), credential.as_str().into());
                body.insert("retry_after_s".into(), seconds.into());
                retry_after = Some(seconds);
            }
            _ => {}
        }
        let body = serde_json::Value::Object(body);
        let mut response = Response::new(full(body.to_string()));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(ERROR_HEADER, HeaderValue::from_static(self.code()));
        if matches!(self, ProxyError::IdentityRequired) {
            headers.insert(
                header::PROXY_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"keystamp\""),
            );
        }
        if let Some(seconds) = retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// `Retry-After` is whole seconds; round up so an agent never retries too early.
fn whole_seconds(wait: Duration) -> u64 {
    let seconds = wait.as_secs();
    if wait.subsec_nanos() > 0 {
        seconds + 1
    } else {
        seconds.max(1)
    }
}
