//! The admin listener: `/livez` (the process answers), `/readyz` (config loaded, CA ready, proxy
//! listener bound), `/metrics` (Prometheus text) and `/status` (JSON: routes, credentials with
//! their version fingerprints and expiry; never a value). Meant for loopback or the pod network
//! only, never the internet.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::body::{full, ProxyBody};
use crate::breaker::Authority;
use crate::config::{MintMode, SourceSpec};
use crate::credentials::{access_key_id, is_task_id, read_local, Credential};
use crate::fleet::{held_by_fleet, FleetLink, ManualAction, Outgoing};
use crate::proxy::accept_next;
use crate::reload::ReloadHandle;
use crate::state::SharedState;
use crate::telemetry::Metrics;
use crate::time::format_rfc3339;

/// Set once keystamp can serve; cleared when it starts draining.
#[derive(Debug, Default)]
pub struct Readiness(AtomicBool);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// What the admin listener reads and acts on.
pub struct Admin {
    pub readiness: Arc<Readiness>,
    pub state: Arc<SharedState>,
    pub metrics: Arc<Metrics>,
    /// Where the bearer token for the POST endpoints comes from; read at each POST, so a
    /// rotated token file takes effect at once. `None`: the POSTs are open (loopback only!).
    pub token: Option<SourceSpec>,
    /// The fleet an operator's switch is passed on to, when there is one.
    pub fleet: Option<FleetLink>,
    /// The reloader, for `POST /credentials/NAME/refresh`.
    pub reloads: ReloadHandle,
}

pub async fn serve(listener: TcpListener, admin: Arc<Admin>, shutdown: CancellationToken) {
    while let Some(stream) = accept_next(&listener, &shutdown).await {
        let admin = admin.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let admin = admin.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(&admin, &request).await) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer(admin: &Admin, request: &Request<Incoming>) -> Response<ProxyBody> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/livez") => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        (&Method::GET, "/readyz") if admin.readiness.is_ready() => {
            (StatusCode::OK, "text/plain", "ready\n".to_string())
        }
        (&Method::GET, "/readyz") => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready\n".to_string(),
        ),
        (&Method::GET, "/metrics") => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            admin.metrics.render(),
        ),
        (&Method::GET, "/status") => (
            StatusCode::OK,
            "application/json",
            status_json(&admin.state, admin.fleet.as_ref()).to_string(),
        ),
        (&Method::POST, path) if path.starts_with("/breakers/") => {
            match authorized(admin, request) {
                Ok(authority) => breaker_action(admin, path, authority),
                Err(refusal) => refusal,
            }
        }
        (&Method::POST, path) if path.starts_with("/credentials/") => {
            match authorized(admin, request) {
                Ok(_) => refresh(admin, path).await,
                Err(refusal) => refusal,
            }
        }
        (&Method::POST, path) if path.starts_with("/tasks/") => match authorized(admin, request) {
            Ok(_) => end_task(admin, path),
            Err(refusal) => refusal,
        },
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_string(),
        ),
    };
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// With an `admin_token`, a POST must carry `Authorization: Bearer <token>`: an agent in the pod
/// must not be able to undo an operator's kill switch.
fn authorized(
    admin: &Admin,
    request: &Request<Incoming>,
) -> Result<Authority, (StatusCode, &'static str, String)> {
    let Some(source) = &admin.token else {
        return Ok(Authority::Unproven);
    };
    let expected = match read_local(source) {
        Some(Ok(fetched)) => fetched.secret,
        _ => {
            tracing::warn!("admin token unreadable; refusing admin POSTs");
            return Err((
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "the admin token cannot be read\n".into(),
            ));
        }
    };
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(token) if expected.matches(token) => Ok(Authority::AdminToken),
        _ => {
            tracing::warn!("admin POST refused: missing or wrong token");
            Err((
                StatusCode::UNAUTHORIZED,
                "text/plain",
                "this endpoint needs Authorization: Bearer <admin token>\n".into(),
            ))
        }
    }
}

/// `POST /tasks/ID/end`: the task is over; its per-task tokens (any agent, any credential) stop
/// being used now and are revoked at the provider within a second.
fn end_task(admin: &Admin, path: &str) -> (StatusCode, &'static str, String) {
    let task = path
        .strip_prefix("/tasks/")
        .and_then(|rest| rest.strip_suffix("/end"))
        .filter(|task| is_task_id(task.as_bytes()));
    let Some(task) = task else {
        return (
            StatusCode::NOT_FOUND,
            "text/plain",
            "use /tasks/ID/end with a task id of 1 to 64 characters of A-Z a-z 0-9 . _ : -\n"
                .into(),
        );
    };
    let snapshot = admin.state.load();
    let retired: usize = snapshot
        .credentials
        .iter()
        .filter_map(|credential| credential.task_tokens.as_ref())
        .map(|tokens| tokens.end_task(task))
        .sum();
    tracing::info!(task, tokens = retired, "task ended by an operator");
    let body = serde_json::json!({ "task": task, "tokens_retired": retired });
    (StatusCode::OK, "application/json", body.to_string())
}

/// `POST /breakers/NAME/open` (a leaked key: nothing goes out with it until it is rotated or
/// closed by hand) and `POST /breakers/NAME/close`. Logged and counted.
fn breaker_action(
    admin: &Admin,
    path: &str,
    authority: Authority,
) -> (StatusCode, &'static str, String) {
    let mut parts = path.trim_start_matches("/breakers/").splitn(2, '/');
    let (Some(name), Some(action)) = (parts.next(), parts.next()) else {
        return (
            StatusCode::NOT_FOUND,
            "text/plain",
            "use /breakers/NAME/open or /breakers/NAME/close\n".into(),
        );
    };
    let snapshot = admin.state.load();
    let Some(credential) = snapshot.credentials.get(name) else {
        return (
            StatusCode::NOT_FOUND,
            "text/plain",
            "no such credential\n".into(),
        );
    };
    let action = match action {
        "open" => {
            credential
                .breaker
                .force_open(tokio::time::Instant::now(), authority);
            ManualAction::Open
        }
        "close" => {
            if !credential.breaker.force_close(authority) {
                return (
                    StatusCode::FORBIDDEN,
                    "text/plain",
                    "opened with the admin token; closing needs it too\n".into(),
                );
            }
            credential.limits.clear_hold();
            ManualAction::Close
        }
        _ => {
            return (
                StatusCode::NOT_FOUND,
                "text/plain",
                "use open or close\n".into(),
            )
        }
    };
    // The whole fleet follows an operator's switch.
    if let Some(fleet) = &admin.fleet {
        fleet.send(Outgoing::Manual {
            credential: credential.name.clone(),
            action,
            authority,
        });
    }
    let action = action.label();
    tracing::warn!(credential = %credential.name, action, "breaker set by an operator");
    credential.series.manual_action(action);
    let body = serde_json::json!({ "credential": credential.name.as_ref(), "breaker": credential.breaker.state().label() });
    (StatusCode::OK, "application/json", body.to_string())
}

/// `POST /credentials/NAME/refresh`: re-read the credential now, on every pod of the fleet too
/// (the webhook a rotation job calls right after it rotates). Answers the fingerprint before and
/// after, and the read's error if it failed.
async fn refresh(admin: &Admin, path: &str) -> (StatusCode, &'static str, String) {
    let name = path
        .trim_start_matches("/credentials/")
        .strip_suffix("/refresh")
        .filter(|name| !name.is_empty() && !name.contains('/'));
    let Some(name) = name else {
        return (
            StatusCode::NOT_FOUND,
            "text/plain",
            "use /credentials/NAME/refresh\n".into(),
        );
    };
    let Some(refreshed) = admin.reloads.refresh(name).await else {
        return (
            StatusCode::NOT_FOUND,
            "text/plain",
            "no such credential\n".into(),
        );
    };
    if let Some(fleet) = &admin.fleet {
        fleet.send(Outgoing::Refresh {
            credential: Arc::from(name),
        });
    }
    let body = serde_json::json!({
        "credential": name,
        "fingerprint": refreshed.after,
        "changed": refreshed.before != refreshed.after,
        "last_error": refreshed.last_error,
        "fleet": admin.fleet.is_some(),
    });
    (StatusCode::OK, "application/json", body.to_string())
}

/// What a minted credential is narrowed to, and how many task tokens it holds; `null` for others.
fn minted_json(credential: &Credential) -> serde_json::Value {
    match &credential.spec.source {
        SourceSpec::GithubApp(app) => serde_json::json!({
            "provider": "github",
            "app_id": app.app_id,
            "installation_id": app.installation_id,
            "repositories": app.repositories,
            "permissions": app.permissions,
            "per_task": app.mint != MintMode::Shared,
            "live_task_tokens": credential.task_tokens.as_ref().map_or(0, |tokens| tokens.live()),
            // GitHub's clock minus keystamp's at the last mint (its `Date`); expiry is judged on
            // GitHub's clock.
            "clock_skew_s": credential.task_tokens.as_ref().and_then(|tokens| tokens.skew_seconds()),
        }),
        SourceSpec::Aws(aws) => serde_json::json!({
            "provider": "aws",
            // Not a secret: CloudTrail shows it, and it joins keystamp's fingerprint to CloudTrail.
            "access_key_id": credential.current.as_ref().and_then(|v| access_key_id(&v.secret)),
            "role_arn": aws.assume_role.as_ref().map(|role| role.role_arn.clone()),
            "session_name": aws.assume_role.as_ref().map(|role| role.session_name.clone()),
            "session_policy": aws.assume_role.as_ref().is_some_and(|role| role.policy.is_some()),
            "live_task_tokens": credential.task_tokens.as_ref().map_or(0, |tokens| tokens.live()),
        }),
        SourceSpec::GoogleServiceAccount(google) => serde_json::json!({
            "provider": "google",
            "scopes": google.scopes,
            "subject": google.subject,
        }),
        _ => serde_json::Value::Null,
    }
}

/// Routes and credentials as they are now. Names, kinds and fingerprints only, never a value.
fn status_json(state: &SharedState, fleet: Option<&FleetLink>) -> serde_json::Value {
    let snapshot = state.load();
    let mut credentials: Vec<_> = snapshot.credentials.iter().collect();
    credentials.sort_by(|a, b| a.name.cmp(&b.name));
    let credentials: Vec<serde_json::Value> = credentials
        .into_iter()
        .map(|credential| {
            let version = credential.current.as_ref();
            serde_json::json!({
                "name": credential.name.as_ref(),
                "source": credential.source_kind(),
                // The files the source reads, as keystamp resolved them (absolute).
                "files": credential.spec.source.files(),
                "fingerprint": version.map(|v| v.fingerprint.clone()),
                "loaded_at": version.map(|v| format_rfc3339(v.loaded_at)),
                "expires_at": version.and_then(|v| v.expiry).map(|e| format_rfc3339(e.at)),
                "expired": version.is_some_and(|v| v.is_expired(tokio::time::Instant::now())),
                "last_error": credential.last_error.as_ref().map(ToString::to_string),
                "breaker": credential.breaker.state().label(),
                "minted": minted_json(credential),
                // The store's version of the secret last read (never a value).
                "store": credential.store_watch.as_ref().map(|watch| serde_json::json!({
                    "version": watch.version(),
                    "last_rotation_seen_at": version.map(|v| format_rfc3339(v.loaded_at)),
                    // Whether this pod polls the store for the fleet (holds the watch lease).
                    "watched_here": fleet.is_none_or(|fleet| fleet.view().watching(&credential.name)),
                })),
            })
        })
        .collect();
    let routes: Vec<serde_json::Value> = snapshot
        .routes
        .iter()
        .map(|route| {
            serde_json::json!({
                "name": route.name.as_ref(),
                "host": route.host.to_string(),
                "path_prefix": route.path_prefix,
                "methods": route.methods.as_ref().map(|m| m.iter().map(|m| m.as_str().to_string()).collect::<Vec<_>>()),
                "credential": route.credential.as_deref(),
                "inject": route.inject.kind(),
                // Which credential each listed agent uses here (its own, or the route's).
                "agents": route.agents.as_ref().map(|agents| {
                    agents
                        .keys()
                        .map(|agent| (agent.clone(), serde_json::json!(route.credential_for(Some(agent)).as_deref())))
                        .collect::<serde_json::Map<_, _>>()
                }),
            })
        })
        .collect();
    let mut status = serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "unmatched": snapshot.unmatched.to_string(),
        "routes": routes,
        "credentials": credentials,
    });
    if let Some(fleet) = fleet {
        let view = fleet.view();
        let held: serde_json::Map<String, serde_json::Value> = held_by_fleet(state)
            .into_iter()
            .map(|(name, held)| {
                (
                    name.to_string(),
                    serde_json::json!({ "held_by_fleet": held }),
                )
            })
            .collect();
        let fleet = serde_json::json!({
            "name": view.name,
            "pod": view.pod,
            "store_up": view.store_up(),
            "pods": view.pods(),
            "credentials": held,
        });
        if let Some(object) = status.as_object_mut() {
            object.insert("fleet".into(), fleet);
        }
    }
    status
}
