//! The request pipeline, every stage called in order from `forward_stages`, each a function whose
//! doc names it: **target** (host, port, scheme), **route** (route and agent scope), **version**
//! (the credential version to stamp), **admit** (breaker, rate limits), **strip** (hop-by-hop and
//! the agent's credentials), the request body (kept for a replay or streamed), **send** (stamp,
//! send, once more with a newer version after a 401), **judge** (the answer, for the breaker) and
//! **relay**. `forward` wraps it with the request's account (metrics and audit line). Used for
//! requests inside intercepted tunnels and for absolute-form requests to the proxy.

use std::sync::Arc;

use bytes::Bytes;
use http::uri::Authority;
use http::{header, HeaderMap, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

use crate::body::{self, Counted, ProxyBody};
use crate::breaker::{Admission, Breaker, Verdict};
use crate::config::Injection;
use crate::config::Unmatched;
use crate::credentials::{
    is_task_id, Credential, MintError, TaskKey, Version as CredentialVersion,
};
use crate::error::ProxyError;
use crate::fleet::Outgoing;
use crate::host::{default_port, Host};
use crate::inject;
use crate::limits::Limits;
use crate::proxy::conn::InFlight;
use crate::proxy::error_code;
use crate::proxy::ProxyState;
use crate::routes::{OutsideScope, Route, RouteMatch};
use crate::s3;
use crate::sigv4::{accepts_unsigned_payload, Payload, SignError};
use crate::telemetry::RequestRecord;
use crate::time;
use crate::upstream::{PooledBody, UpstreamProtocol};

/// How the request reached keystamp.
#[derive(Debug, Clone)]
pub enum Origin {
    /// Inside a `CONNECT host:port` tunnel keystamp terminated (TLS, or plain HTTP when the agent
    /// tunnels an `http://` URL); the request must stay on that host. `agent` was identified on
    /// the CONNECT.
    Intercepted {
        host: Host,
        port: u16,
        tls: bool,
        agent: Option<Arc<str>>,
        /// `host[:port]` as requests in this tunnel name it and as it goes upstream, built once
        /// per tunnel rather than per request.
        authority: Authority,
        via: Via,
    },
    /// An absolute-form request (`GET http://host/...` or `GET https://host/...`) to the proxy.
    AbsoluteForm { agent: Option<Arc<str>>, via: Via },
}

/// How a connection reached keystamp: the agent chose the proxy, or netfilter redirected it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Proxy,
    Transparent,
}

impl Via {
    pub fn label(self) -> &'static str {
        match self {
            Via::Proxy => "proxy",
            Via::Transparent => "transparent",
        }
    }
}

impl Origin {
    /// A tunnel to `host:port` keystamp terminated (`tls`: TLS inside, else plain HTTP);
    /// `None` if the host cannot be written as a URI authority.
    pub fn intercepted(
        host: Host,
        port: u16,
        tls: bool,
        agent: Option<Arc<str>>,
        via: Via,
    ) -> Option<Self> {
        let authority = authority_of(&host, port, tls).ok()?;
        Some(Origin::Intercepted {
            host,
            port,
            tls,
            agent,
            authority,
            via,
        })
    }

    pub fn agent(&self) -> Option<&Arc<str>> {
        match self {
            Origin::Intercepted { agent, .. } | Origin::AbsoluteForm { agent, .. } => {
                agent.as_ref()
            }
        }
    }

    pub fn via(&self) -> Via {
        match self {
            Origin::Intercepted { via, .. } | Origin::AbsoluteForm { via, .. } => *via,
        }
    }
}

/// Where a request goes.
#[derive(Debug, Clone)]
struct Target {
    https: bool,
    host: Host,
    /// `host[:port]` for the upstream URI, the port left out when it is the scheme's default.
    authority: Authority,
}

/// `host[:port]` as it goes into a URI, the port left out when it is the scheme's default.
fn authority_of(host: &Host, port: u16, tls: bool) -> Result<Authority, ProxyError> {
    Authority::try_from(host.authority(port, default_port(tls)))
        .map_err(|_| ProxyError::BadRequest("the request target is not a valid URL"))
}

/// Forwards one request and answers it. `in_flight` is released, and the request's account
/// closed, when the response body ends (one wrapper on the body does both).
pub async fn forward(
    state: Arc<ProxyState>,
    origin: Origin,
    request: Request<Incoming>,
    in_flight: InFlight,
) -> Response<ProxyBody> {
    let host = match &origin {
        Origin::Intercepted { host, .. } => Some(host.clone()),
        Origin::AbsoluteForm { .. } => request.uri().host().and_then(|h| Host::parse(h).ok()),
    };
    let mut record = RequestRecord::start(
        origin.agent().cloned(),
        request.method(),
        host.as_ref().map_or("", Host::as_str),
        request.uri().path(),
    );
    record.via = origin.via().label();
    let response = match forward_stages(&state, &origin, request, &mut record).await {
        Ok(response) => response,
        Err(error) => {
            tracing::debug!(code = error.code(), "keystamp answered the request itself");
            if matches!(error, ProxyError::UpstreamTls) {
                state
                    .telemetry
                    .metrics
                    .tls_handshake_errors
                    .with_label_values(&["upstream"])
                    .inc();
            }
            record.by_keystamp = true;
            record.error = Some(error.code());
            record.fault = Some(error.side().label());
            error.into_response()
        }
    };
    record.status = response.status();
    // The account closes when the response body ends, so streamed responses are counted whole.
    let finished_state = state.clone();
    response.map(|body| {
        let on_end = Box::new(move |bytes: u64| {
            record.finish(&finished_state.telemetry, bytes);
            drop(in_flight);
        });
        Counted::new(body, None, Some(on_end)).boxed_unsync()
    })
}

/// The stages in order; each is a function below whose doc names it.
async fn forward_stages(
    state: &ProxyState,
    origin: &Origin,
    mut request: Request<Incoming>,
    record: &mut RequestRecord,
) -> Result<Response<ProxyBody>, ProxyError> {
    // Every refusal before the body is read: the agent may still be sending it.
    let decided = async {
        screen(&request)?;
        record.task = task_of(&request)?;
        let target = target_of(origin, &request)?;
        let route = choose_route(state, &target, &request, origin.agent(), record)?;
        let stamping = match route {
            Some(chosen) => Some(credential_version(state, chosen, record).await?),
            None => None,
        };
        let admitted = match &stamping {
            Some(stamping) => Some(admit(stamping).await?),
            None => None,
        };
        Ok::<_, ProxyError>((target, stamping, admitted))
    }
    .await;
    let (target, stamping, admitted) = match decided {
        Ok(decided) => decided,
        Err(refusal) => {
            body::discard(request.into_body()).await;
            return Err(refusal);
        }
    };
    let upgrade = request.version() == Version::HTTP_11 && inject::wants_upgrade(request.headers());
    let protocol = match request.version() {
        Version::HTTP_2 => UpstreamProtocol::PreferH2,
        // An upgrade needs an HTTP/1.1 connection of its own.
        _ if upgrade => UpstreamProtocol::Http1,
        _ => UpstreamProtocol::Any,
    };
    let agent_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));
    let (parts, incoming) = request.into_parts();
    let unstamped = Unstamped::new(parts, &target, stamping.as_ref(), upgrade)?;
    // Only a stamped request may need a replay after a 401; an upgrade's body is the new protocol.
    let replay_limit = (stamping.is_some() && !upgrade).then_some(state.replay_body_limit);
    // A SigV4 signature covers the body's hash: only S3 takes a streamed body unsigned.
    let must_hash = stamping.as_ref().is_some_and(|s| {
        matches!(s.injection(), Injection::AwsSigV4 { service, .. } if !accepts_unsigned_payload(service))
    });
    let body = RequestBody::read(
        incoming,
        &unstamped.headers,
        replay_limit,
        must_hash,
        record,
    )
    .await?;
    let (response, admitted) = send(
        state,
        unstamped,
        body,
        stamping.as_ref(),
        admitted,
        protocol,
    )
    .await?;
    let mut response = judge(state, stamping.as_ref(), admitted, response).await;
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(agent_upgrade) = agent_upgrade {
            splice_upgrade(state, agent_upgrade, hyper::upgrade::on(&mut response));
        }
    }
    Ok(relay(response, upgrade))
}

/// The route chosen for a request and what it needs from the snapshot, cloned out so a long
/// request does not pin the snapshot.
struct Chosen {
    route: Arc<Route>,
    /// The agent it was chosen for, whose credential and injection may be its own.
    agent: Option<Arc<str>>,
    credential_name: Arc<str>,
    credential: Option<Arc<Credential>>,
    agent_limits: Option<(Arc<str>, Arc<Limits>)>,
}

/// The route a request takes and the credential version it will carry.
struct Stamping {
    route: Arc<Route>,
    /// The agent stamped for: its own credential and injection, if it has them.
    agent: Option<Arc<str>>,
    credential: Arc<Credential>,
    version: Arc<CredentialVersion>,
    /// The agent's own rate limit, if it is identified and has one.
    agent_limits: Option<(Arc<str>, Arc<Limits>)>,
    /// Whose task token `version` is, for a credential minted per task.
    task: Option<TaskKey>,
}

impl Stamping {
    /// How this agent's credential goes in: its own injection on the route, or the route's.
    fn injection(&self) -> &Injection {
        self.route.inject_for(self.agent.as_deref())
    }
}

/// A breaker admission that is always settled: recorded with the upstream's verdict, or released
/// without one when the request never got a verdict (so a probe slot is never leaked).
struct Admitted {
    breaker: Arc<Breaker>,
    admission: Admission,
    fingerprint: String,
    settled: bool,
}

impl Admitted {
    fn settle(mut self, verdict: Option<Verdict>) {
        self.breaker
            .record(&self.admission, verdict, &self.fingerprint, Instant::now());
        self.settled = true;
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if !self.settled {
            self.breaker
                .record(&self.admission, None, &self.fingerprint, Instant::now());
        }
    }
}

/// **screen**: what keystamp never forwards, whatever the host: a transfer coding other than
/// `chunked` (its bytes would reach the upstream under a plain `chunked`, relabelled).
fn screen(request: &Request<Incoming>) -> Result<(), ProxyError> {
    let unsupported = request
        .headers()
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .any(|value| {
            value.to_str().map_or(true, |value| {
                value
                    .split(',')
                    .map(str::trim)
                    .any(|coding| !coding.is_empty() && !coding.eq_ignore_ascii_case("chunked"))
            })
        });
    if unsupported {
        return Err(ProxyError::TransferCodingUnsupported);
    }
    Ok(())
}

/// The header an agent names its task with; keystamp removes it before forwarding.
const TASK_HEADER: &str = "keystamp-task";

/// **task**: the agent's task id from `Keystamp-Task` (1–64 of `A-Za-z0-9._:-`), for the audit
/// line. Anything else is 400: an id goes into logs, so it is never free text.
fn task_of(request: &Request<Incoming>) -> Result<Option<String>, ProxyError> {
    let Some(value) = request.headers().get(TASK_HEADER) else {
        return Ok(None);
    };
    if !is_task_id(value.as_bytes()) {
        return Err(ProxyError::BadRequest(
            "Keystamp-Task must be 1 to 64 characters of A-Z a-z 0-9 . _ : -",
        ));
    }
    Ok(value.to_str().ok().map(str::to_string))
}

/// **target**: the host, port and scheme. Inside an intercepted connection the request must
/// name the CONNECT host (or nothing); anything else is 421 and goes nowhere.
fn target_of(origin: &Origin, request: &Request<Incoming>) -> Result<Target, ProxyError> {
    match origin {
        Origin::Intercepted {
            host,
            port,
            tls,
            authority,
            ..
        } => {
            let named = match request.uri().authority() {
                Some(authority) => authority_without_userinfo(authority),
                None => request
                    .headers()
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .ok_or(ProxyError::BadRequest("the request has no Host header"))?,
            };
            let target = Target {
                https: *tls,
                host: host.clone(),
                authority: authority.clone(),
            };
            // Nearly every request names the tunnel's host exactly as the tunnel did.
            if named.eq_ignore_ascii_case(authority.as_str()) {
                return Ok(target);
            }
            let (named_host, named_port) = Host::parse_authority(named)
                .map_err(|_| ProxyError::BadRequest("the Host header is not a valid authority"))?;
            if named_host != *host || named_port.unwrap_or(default_port(*tls)) != *port {
                return Err(ProxyError::HostMismatch);
            }
            Ok(target)
        }
        Origin::AbsoluteForm { .. } => {
            let uri = request.uri();
            let https = match uri.scheme_str() {
                Some("https") => true,
                Some("http") => false,
                _ => {
                    return Err(ProxyError::BadRequest(
                        "only http:// and https:// URLs can be proxied",
                    ))
                }
            };
            let authority = uri
                .authority()
                .ok_or(ProxyError::BadRequest("the request URL has no host"))?;
            let (host, port) = Host::parse_authority(authority_without_userinfo(authority))
                .map_err(|_| ProxyError::BadRequest("the request URL has no valid host"))?;
            let port = port.unwrap_or(default_port(https));
            let authority = authority_of(&host, port, https)?;
            Ok(Target {
                https,
                host,
                authority,
            })
        }
    }
}

/// **route**: the most specific route for host, path and method, and whether this agent may use
/// it. A routed host never gets TRACE or TRACK (the upstream would echo the stamped credential
/// back) and a `tls_only` route never gets a plain-HTTP request. `None`: an unrouted host that
/// `unmatched: tunnel` lets through unstamped.
fn choose_route(
    state: &ProxyState,
    target: &Target,
    request: &Request<Incoming>,
    agent: Option<&Arc<str>>,
    record: &mut RequestRecord,
) -> Result<Option<Chosen>, ProxyError> {
    let snapshot = state.state.load();
    let path = request.uri().path();
    let route = match snapshot.routes.lookup(&target.host, path, request.method()) {
        RouteMatch::Matched(route) => route.clone(),
        RouteMatch::Denied => return Err(ProxyError::RouteDenied),
        RouteMatch::HostNotRouted if snapshot.unmatched == Unmatched::Tunnel => return Ok(None),
        RouteMatch::HostNotRouted => return Err(ProxyError::UnmatchedDenied),
    };
    let agent_name = agent.map(|a| a.as_ref());
    // Known from here on, whatever keystamp answers: the account names the route and the
    // credential this agent uses on it (its own, or the route's).
    let credential_name = route.credential_for(agent_name);
    record.route = Some(route.name.clone());
    record.credential = credential_name.clone();
    if let Some(reflecting) = reflecting_method(request.method()) {
        return Err(ProxyError::MethodRefused(reflecting));
    }
    if route.tls_only && !target.https {
        return Err(ProxyError::TlsRequired);
    }
    if !route.admits_agent(agent_name, path, request.method()) {
        return Err(ProxyError::ScopeDenied);
    }
    // A signed S3 request may name a second object in a header (a copy source): it is held to
    // the same bounds as the path, or the copy would read what the path may not.
    if let Injection::AwsSigV4 { .. } = route.inject_for(agent_name) {
        for source in s3::named_sources(request.headers(), target.host.as_str()) {
            match route.admits_named_source(agent_name, &source) {
                Ok(()) => {}
                Err(OutsideScope::Route) => return Err(ProxyError::RouteDenied),
                Err(OutsideScope::Agent) => return Err(ProxyError::ScopeDenied),
            }
        }
    }
    // A route without a default credential serves only agents that have their own.
    let Some(credential_name) = credential_name else {
        return Err(ProxyError::ScopeDenied);
    };
    let credential = snapshot.credentials.get(&credential_name).cloned();
    let agent_limits =
        agent.and_then(|agent| Some((agent.clone(), snapshot.identities.limits(agent)?.clone())));
    Ok(Some(Chosen {
        route,
        agent: agent.cloned(),
        credential_name,
        credential,
        agent_limits,
    }))
}

/// Methods that make a server send the request back, headers and all.
fn reflecting_method(method: &http::Method) -> Option<&'static str> {
    match method.as_str() {
        "TRACE" => Some("TRACE"),
        "TRACK" => Some("TRACK"),
        _ => None,
    }
}

/// **version**: the credential's current version, or 503 when it has none. An expired version
/// is never sent: keystamp first asks for a newer one, then answers `credential_expired`.
async fn credential_version(
    state: &ProxyState,
    chosen: Chosen,
    record: &mut RequestRecord,
) -> Result<Stamping, ProxyError> {
    let Chosen {
        route,
        agent,
        credential_name,
        credential,
        agent_limits,
    } = chosen;
    let Some(credential) = credential else {
        return Err(ProxyError::CredentialUnavailable {
            credential: credential_name.to_string(),
            reason: "not defined".into(),
        });
    };
    let Some(version) = credential.current.clone() else {
        let reason = credential
            .last_error
            .as_ref()
            .map_or_else(|| "no value yet".to_string(), ToString::to_string);
        return Err(ProxyError::CredentialUnavailable {
            credential: credential_name.to_string(),
            reason,
        });
    };
    let version = if version.is_expired(Instant::now()) {
        state
            .reloads
            .newer_than(&credential_name, &version.fingerprint)
            .await
            .ok_or_else(|| ProxyError::CredentialExpired {
                credential: credential_name.to_string(),
            })?
    } else {
        version
    };
    // A credential minted per task: a task's requests carry that task's own token.
    let task = match (&credential.task_tokens, record.task.as_deref()) {
        (Some(tokens), task) if task.is_some() || tokens.every_request() => Some(TaskKey {
            agent: agent.clone().unwrap_or_else(|| Arc::from("")),
            task: Arc::from(task.unwrap_or("")),
        }),
        _ => None,
    };
    let version =
        match (&credential.task_tokens, &task) {
            (Some(tokens), Some(key)) => tokens
                .token_for(key, None, &state.upstream)
                .await
                .map_err(|error| match error {
                    MintError::Limited { why, retry_after } => ProxyError::MintLimited {
                        credential: credential_name.to_string(),
                        why,
                        retry_after,
                    },
                    MintError::Expired => ProxyError::CredentialExpired {
                        credential: credential_name.to_string(),
                    },
                    MintError::Failed(error) => ProxyError::CredentialUnavailable {
                        credential: credential_name.to_string(),
                        reason: format!("task token: {error}"),
                    },
                })?,
            _ => version,
        };
    record.fingerprint = Some(version.fingerprint.clone());
    Ok(Stamping {
        route,
        agent,
        credential,
        version,
        agent_limits,
        task,
    })
}

/// **admit**: the credential's breaker and rate limits (the credential's and the agent's).
/// Neither contacts the upstream.
async fn admit(stamping: &Stamping) -> Result<Admitted, ProxyError> {
    let now = Instant::now();
    let credential = &stamping.credential;
    let admission = match credential.breaker.admit(now) {
        Admission::Reject(rejection) => {
            return Err(ProxyError::CircuitOpen {
                credential: credential.name.to_string(),
                reason: rejection.reason,
                retry_after: rejection.retry_after,
                fingerprint: rejection.fingerprint,
            });
        }
        admission => admission,
    };
    let admitted = Admitted {
        breaker: credential.breaker.clone(),
        admission,
        fingerprint: stamping.version.fingerprint.clone(),
        settled: false,
    };
    let credential_limit = ("credential", &credential.name, &credential.limits);
    let agent_limit = stamping
        .agent_limits
        .as_ref()
        .map(|(agent, limits)| ("agent", agent, limits));
    for (subject, name, limits) in std::iter::once(credential_limit).chain(agent_limit) {
        if let Err(wait) = limits.acquire(now).await {
            credential.series.rate_limited();
            return Err(ProxyError::RateLimited {
                subject,
                name: name.to_string(),
                retry_after: wait,
            });
        }
    }
    Ok(admitted)
}

/// **send**: stamp and send. A 401 on a replayable request whose version has since been
/// replaced (or can be replaced now) is retried once with the new version, admitted afresh; the
/// agent never sees the stale 401, and never a retry with the same version.
async fn send(
    state: &ProxyState,
    unstamped: Unstamped,
    body: RequestBody,
    stamping: Option<&Stamping>,
    admitted: Option<Admitted>,
    protocol: UpstreamProtocol,
) -> Result<(Response<PooledBody>, Option<Admitted>), ProxyError> {
    let stamp = stamping.map(|s| (s.injection(), s.version.as_ref()));
    let bytes = match body {
        RequestBody::Streaming(streaming, failed) => {
            let request = unstamped.into_request(stamp, streaming, Payload::Unsigned)?;
            let response = state
                .upstream
                .send(request, protocol)
                .await
                .map_err(|error| match failed.get() {
                    true => ProxyError::AGENT_BODY_FAILED,
                    false => error,
                })?;
            return Ok((without_echoes(response, stamp), admitted));
        }
        RequestBody::Replayable(bytes) => bytes,
    };
    let request =
        unstamped
            .clone()
            .into_request(stamp, body::full(bytes.clone()), Payload::Bytes(&bytes))?;
    let response = without_echoes(state.upstream.send(request, protocol).await?, stamp);
    let Some(stamping) = stamping.filter(|_| response.status() == StatusCode::UNAUTHORIZED) else {
        return Ok((response, admitted));
    };
    let stale = &stamping.version.fingerprint;
    let newer = match (&stamping.credential.task_tokens, &stamping.task) {
        (Some(tokens), Some(key)) => tokens
            .token_for(key, Some(stale), &state.upstream)
            .await
            .ok(),
        _ => {
            state
                .reloads
                .newer_than(&stamping.credential.name, stale)
                .await
        }
    };
    let Some(newer) = newer else {
        return Ok((response, admitted));
    };
    tracing::info!(
        credential = %stamping.credential.name,
        rejected = %stamping.version.fingerprint,
        retrying_with = %newer.fingerprint,
        "upstream rejected a replaced credential version; retrying once"
    );
    // The first attempt's 401 was for a replaced version: it says nothing about the new one.
    drop(admitted);
    let retry_admission = Admitted {
        breaker: stamping.credential.breaker.clone(),
        admission: stamping.credential.breaker.admit(Instant::now()),
        fingerprint: newer.fingerprint.clone(),
        settled: false,
    };
    if let Admission::Reject(_) = retry_admission.admission {
        return Ok((response, None));
    }
    let request = unstamped.into_request(
        Some((stamping.injection(), newer.as_ref())),
        body::full(bytes.clone()),
        Payload::Bytes(&bytes),
    )?;
    let response = state.upstream.send(request, protocol).await?;
    Ok((
        without_echoes(response, Some((stamping.injection(), newer.as_ref()))),
        Some(retry_admission),
    ))
}

/// An upstream that echoes the stamped value in a response header or trailer (a debug endpoint,
/// an "invalid key sk-..." error, a redirect that carries the query) must not hand it to the
/// agent: every form keystamp sent is redacted (`echo.rs`). Bodies are not rewritten.
fn without_echoes(
    mut response: Response<PooledBody>,
    sent: Option<(&Injection, &CredentialVersion)>,
) -> Response<PooledBody> {
    if let Some((injection, version)) = sent {
        let echoes = inject::echoes(injection, &version.secret);
        echoes.redact(response.headers_mut());
        response.body_mut().redact_trailers(echoes);
    }
    response
}

/// **judge**: what the upstream's answer says about the credential, for the breaker, the
/// auth-failure count and `respect_retry_after`.
async fn judge(
    state: &ProxyState,
    stamping: Option<&Stamping>,
    admitted: Option<Admitted>,
    response: Response<PooledBody>,
) -> Response<ProxyBody> {
    let (Some(stamping), Some(admitted)) = (stamping, admitted) else {
        return response.map(body::stream);
    };
    let route = &stamping.route;
    let status = response.status();
    if status == StatusCode::TOO_MANY_REQUESTS && route.respect_retry_after {
        if let Some(seconds) = retry_after_seconds(response.headers()) {
            // One answer must not lock a credential until restart: held at most `max_hold`.
            let max_hold = stamping.credential.spec.breaker.max_hold;
            let hold = time::capped(seconds, time::Unit::Seconds, max_hold);
            stamping
                .credential
                .limits
                .hold(time::deadline(Instant::now(), hold));
            // The quota is the key's, not this pod's: the whole fleet holds.
            if let Some(fleet) = &state.fleet {
                fleet.send(Outgoing::Hold {
                    credential: stamping.credential.name.clone(),
                    seconds: hold.as_secs(),
                });
            }
        }
    }
    let (verdict, response) = match status {
        StatusCode::UNAUTHORIZED => (
            Some(Verdict::AuthFailure {
                status: 401,
                marker: None,
            }),
            response.map(body::stream),
        ),
        StatusCode::FORBIDDEN => {
            forbidden_says_credential_is_bad(response, &route.auth_failure_markers).await
        }
        _ => (None, response.map(body::stream)),
    };
    if let Some(Verdict::AuthFailure { marker, .. }) = &verdict {
        stamping.credential.series.auth_failure(status.as_u16());
        tracing::warn!(
            credential = %stamping.credential.name,
            fingerprint = %stamping.version.fingerprint,
            status = status.as_u16(),
            marker = marker.as_deref(),
            "upstream rejected the credential"
        );
    }
    let verdict = verdict.unwrap_or(Verdict::NotAuthFailure);
    admitted.settle(Some(verdict));
    tracing::debug!(route = %route.name, credential = %stamping.credential.name, status = status.as_u16(), "forwarded");
    response
}

/// Bytes of a 403 body read for its error code (AWS and OAuth errors are a few hundred).
const MARKER_PEEK: usize = 4096;

/// A 403 means "this credential is bad" only when it says so: `WWW-Authenticate` with
/// `error="invalid_token"`, or an error code equal to a configured marker in the response's
/// structured fields (`error_code.rs`: the AWS error headers, a JSON `__type`/`code`, an XML
/// `<Code>`), never in free text an agent could fill by naming a path. Other 403s are permission
/// answers and leave the breaker alone (`None`). The verdict names the marker that said so.
async fn forbidden_says_credential_is_bad(
    response: Response<PooledBody>,
    markers: &[String],
) -> (Option<Verdict>, Response<ProxyBody>) {
    let bad = |marker: Option<&String>| {
        Some(Verdict::AuthFailure {
            status: 403,
            marker: marker.map(|m| Arc::from(m.as_str())),
        })
    };
    let headers = response.headers();
    let invalid_token = headers
        .get_all(header::WWW_AUTHENTICATE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("invalid_token"));
    if invalid_token {
        return (bad(None), response.map(body::stream));
    }
    if markers.is_empty() {
        return (None, response.map(body::stream));
    }
    let (parts, incoming) = response.into_parts();
    let (prefix, rest) = body::peek(incoming, MARKER_PEEK).await;
    let codes = error_code::error_codes(&parts.headers, &prefix);
    let marked = markers
        .iter()
        .find(|m| codes.iter().any(|code| code == *m))
        .and_then(|m| bad(Some(m)));
    (marked, Response::from_parts(parts, rest))
}

fn retry_after_seconds(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// **strip**: the request as the upstream will see it, before the credential is stamped:
/// absolute URI for the pooled client, hop-by-hop headers gone, the agent's credentials stripped.
#[derive(Clone)]
struct Unstamped {
    method: http::Method,
    uri: Uri,
    headers: HeaderMap,
}

impl Unstamped {
    fn new(
        parts: http::request::Parts,
        target: &Target,
        stamping: Option<&Stamping>,
        upgrade: bool,
    ) -> Result<Self, ProxyError> {
        let mut uri = upstream_uri(target, &parts.uri)?;
        let mut headers = parts.headers;
        inject::strip_hop_by_hop(&mut headers, upgrade);
        // The pooled client writes Host (HTTP/1.1) or :authority (h2) from the URI.
        headers.remove(header::HOST);
        headers.remove(TASK_HEADER);
        if let Some(stamping) = stamping {
            inject::strip_agent_credentials(&mut headers, &mut uri, &stamping.route);
        }
        Ok(Self {
            method: parts.method,
            uri,
            headers,
        })
    }

    /// **stamp**: exactly one credential (or a signature over the request as it leaves), and the
    /// body attached. `payload` is what a signature covers: the body's bytes when in hand.
    fn into_request(
        self,
        stamp: Option<(&Injection, &CredentialVersion)>,
        body: ProxyBody,
        payload: Payload<'_>,
    ) -> Result<Request<ProxyBody>, ProxyError> {
        let Unstamped {
            method,
            mut uri,
            mut headers,
        } = self;
        if let Some((injection, version)) = stamp {
            let signed = inject::Signed {
                method: &method,
                payload,
            };
            inject::stamp(&mut headers, &mut uri, injection, &version.secret, signed).map_err(
                |error| match error {
                    inject::StampError::Signing(SignError::NotAwsKeys) => {
                        ProxyError::Internal("an aws_sigv4 route needs an `aws` credential")
                    }
                    _ => ProxyError::Internal("the credential could not be stamped"),
                },
            )?;
        }
        let mut request = Request::new(body);
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;
        // The client picks h2 or HTTP/1.1 per connection; it refuses an h2-tagged request on h1.
        *request.version_mut() = Version::HTTP_11;
        Ok(request)
    }
}

/// The agent's request body: kept in memory when small enough to replay after a 401, streamed
/// otherwise. Either way its bytes are counted into the request's account.
enum RequestBody {
    Replayable(Bytes),
    /// With the mark its stream sets if the agent's body fails.
    Streaming(ProxyBody, body::AgentBodyFailed),
}

impl RequestBody {
    /// Keeps the body when `replay_limit` is set and its declared length is within it (or it is
    /// empty); hands larger or unsized bodies on as a stream.
    /// With `must_hash`, the body is always kept (a signature covers its hash), and one larger
    /// than the limit is 413 `body_too_large_to_sign`.
    async fn read(
        body: Incoming,
        headers: &HeaderMap,
        replay_limit: Option<usize>,
        must_hash: bool,
        record: &RequestRecord,
    ) -> Result<Self, ProxyError> {
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if let Some(limit) = replay_limit.filter(|_| must_hash) {
            if declared.is_some_and(|l| l > limit as u64) {
                body::discard(body).await;
                return Err(ProxyError::BodyTooLargeToSign { limit });
            }
            let mut body = body;
            let mut kept = bytes::BytesMut::new();
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else {
                    return Err(ProxyError::BadRequest("the request body could not be read"));
                };
                if let Ok(data) = frame.into_data() {
                    if kept.len() + data.len() > limit {
                        body::discard(body).await;
                        return Err(ProxyError::BodyTooLargeToSign { limit });
                    }
                    kept.extend_from_slice(&data);
                }
            }
            let bytes = kept.freeze();
            record
                .request_bytes
                .store(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
            return Ok(Self::Replayable(bytes));
        }
        let small = replay_limit
            .filter(|limit| body.is_end_stream() || declared.is_some_and(|l| l <= *limit as u64));
        let Some(limit) = small else {
            let counter = Some(record.request_bytes.clone());
            let failed = body::AgentBodyFailed::default();
            let streaming =
                Counted::new(body::from_agent(body, failed.clone()), counter, None).boxed_unsync();
            return Ok(Self::Streaming(streaming, failed));
        };
        let bytes = Limited::new(body, limit)
            .collect()
            .await
            .map_err(|_| ProxyError::BadRequest("the request body could not be read"))?
            .to_bytes();
        record
            .request_bytes
            .store(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(Self::Replayable(bytes))
    }
}

/// `host:port` of an authority, without any `user:password@` in front.
fn authority_without_userinfo(authority: &http::uri::Authority) -> &str {
    let text = authority.as_str();
    text.rsplit_once('@').map_or(text, |(_, host)| host)
}

fn upstream_uri(target: &Target, original: &Uri) -> Result<Uri, ProxyError> {
    let scheme = if target.https {
        http::uri::Scheme::HTTPS
    } else {
        http::uri::Scheme::HTTP
    };
    // The agent's path and query are kept as parsed (no re-format, no re-parse); an
    // authority-form or asterisk-form target becomes `/`.
    let path_and_query = original
        .path_and_query()
        .filter(|p| p.as_str().starts_with('/'))
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(scheme);
    parts.authority = Some(target.authority.clone());
    parts.path_and_query = Some(path_and_query);
    Uri::from_parts(parts)
        .map_err(|_| ProxyError::BadRequest("the request target is not a valid URL"))
}

/// **relay**: the upstream's response, streamed back without its hop-by-hop headers.
fn relay(response: Response<ProxyBody>, upgrade: bool) -> Response<ProxyBody> {
    let (mut parts, body) = response.into_parts();
    let switching = parts.status == StatusCode::SWITCHING_PROTOCOLS;
    strip_response_headers(&mut parts.headers, upgrade && switching);
    parts.version = Version::HTTP_11;
    Response::from_parts(parts, body)
}

fn strip_response_headers(headers: &mut HeaderMap, upgrade: bool) {
    inject::strip_hop_by_hop(headers, upgrade);
}

/// Joins the agent's and the upstream's upgraded connections (WebSocket) byte for byte.
fn splice_upgrade(
    state: &ProxyState,
    agent: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
) {
    state.spawn_connection(async move {
        let (agent, upstream) = match tokio::try_join!(agent, upstream) {
            Ok(pair) => pair,
            Err(error) => {
                tracing::debug!(%error, "protocol upgrade did not complete");
                return;
            }
        };
        let mut agent = TokioIo::new(agent);
        let mut upstream = TokioIo::new(upstream);
        if let Err(error) = tokio::io::copy_bidirectional(&mut agent, &mut upstream).await {
            tracing::debug!(%error, "upgraded connection ended with an error");
        }
    });
}
