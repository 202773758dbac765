//! Vault and OpenBao (one HTTP API): log in (a token from a source, or a role login with a
//! projected service-account JWT through the `jwt` or `kubernetes` auth method), keep the token
//! renewed and log in again when it cannot be, and read a KV version 2 field. Change detection
//! reads the secret's metadata (`current_version`, no value transferred); the value is read only
//! when the version moved. Errors carry Vault's own words (`permission denied`), never a token.

use std::time::Duration;

use http::{HeaderName, HeaderValue, Method, StatusCode};
use tokio::time::Instant;

use crate::config::{VaultAuth, VaultKv, VaultSecret, VaultSpec};
use crate::credentials::exchange::{self, Call};
use crate::credentials::local::read_key_material;
use crate::credentials::store_watch::{Lease, Session, StoreWatch};
use crate::credentials::value::{normalize, Fetched, SourceError};
use crate::secret::Secret;
use crate::upstream::Upstream;

/// Vault's own error text is cut to this many characters in `last_error`.
const MAX_REASON: usize = 160;

/// The configured secret's current value: for KV v2, from the last read while the version is
/// unchanged; for a leased secret, the lease renewed or the secret read anew as it runs out.
pub async fn fetch(
    spec: &VaultSpec,
    watch: &StoreWatch,
    upstream: &Upstream,
) -> Result<Fetched, SourceError> {
    let mut session = watch.vault.lock().await;
    let token = token(spec, &mut session, upstream).await?;
    match read(spec, watch, &token, upstream).await {
        // A token revoked under us: log in once more before giving up.
        Err(SourceError::StoreRejected { status: 403, .. })
            if matches!(spec.auth, VaultAuth::Login { .. }) =>
        {
            *session = None;
            let token = self::token(spec, &mut session, upstream).await?;
            read(spec, watch, &token, upstream).await
        }
        other => other,
    }
}

async fn read(
    spec: &VaultSpec,
    watch: &StoreWatch,
    token: &Secret,
    upstream: &Upstream,
) -> Result<Fetched, SourceError> {
    match &spec.secret {
        VaultSecret::Kv(kv) => {
            let version = current_version(spec, kv, token, upstream).await?;
            if let Some(fetched) = watch.read_at(&version.to_string()) {
                return Ok(fetched);
            }
            let fetched = read_field(spec, kv, token, version, upstream).await?;
            watch.remember(version.to_string(), &fetched);
            Ok(fetched)
        }
        VaultSecret::Dynamic { path, field } => {
            leased(spec, path, field, watch, token, upstream).await
        }
    }
}

/// A leased secret: kept while fresh, renewed two thirds into its lease, read anew (and the old
/// lease revoked) at 85 % of a lease that cannot be renewed or whose renewal ran short.
async fn leased(
    spec: &VaultSpec,
    path: &str,
    field: &str,
    watch: &StoreWatch,
    token: &Secret,
    upstream: &Upstream,
) -> Result<Fetched, SourceError> {
    let now = Instant::now();
    let held = watch.lease();
    if let Some(lease) = held.as_ref().filter(|l| now < l.act_at) {
        return Ok(lease.fetched.clone());
    }
    if let Some(lease) = held.as_ref().filter(|l| l.renewable && now < l.ends) {
        let body = serde_json::json!({ "lease_id": lease.id }).to_string();
        match call(
            spec,
            Method::PUT,
            "sys/leases/renew",
            Some(token),
            Some(body),
            upstream,
        )
        .await
        {
            Ok(answer) => {
                let ttl = answer
                    .get("lease_duration")
                    .and_then(|d| d.as_u64())
                    .unwrap_or(0);
                // A renewal that ran into the max TTL: use it while it lasts, then read anew.
                let short = ttl.saturating_mul(3) < lease.ttl;
                let renewed =
                    Lease::new(lease.id.clone(), ttl, !short, lease.fetched.secret.clone());
                tracing::debug!(path, ttl, "vault lease renewed");
                let fetched = renewed.fetched.clone();
                watch.hold_lease(Some(renewed));
                return Ok(fetched);
            }
            Err(error) => {
                tracing::info!(path, %error, "vault lease could not be renewed; reading anew")
            }
        }
    }
    let answer = call(spec, Method::GET, path, Some(token), None, upstream).await?;
    let value = answer
        .pointer("/data")
        .and_then(|data| data.get(field))
        .and_then(|v| v.as_str())
        .ok_or_else(|| SourceError::StoreField(field.to_string()))?;
    let id = answer
        .get("lease_id")
        .and_then(|v| v.as_str())
        .unwrap_or("")
        .to_string();
    let ttl = answer
        .get("lease_duration")
        .and_then(|d| d.as_u64())
        .unwrap_or(0);
    let renewable = answer
        .get("renewable")
        .and_then(|r| r.as_bool())
        .unwrap_or(false);
    let lease = Lease::new(id, ttl, renewable, Secret::new(normalize(value)?));
    let fetched = lease.fetched.clone();
    if let Some(old) = watch.hold_lease(Some(lease)) {
        revoke(spec, &old.id, token, upstream).await;
    }
    Ok(fetched)
}

/// Revokes the credential's lease at the server (keystamp exits, or the credential left the
/// config). Failures are logged: the lease still ends at its TTL.
pub async fn release(spec: &VaultSpec, watch: &StoreWatch, upstream: &Upstream) {
    let Some(lease) = watch.hold_lease(None) else {
        return;
    };
    let mut session = watch.vault.lock().await;
    match token(spec, &mut session, upstream).await {
        Ok(token) => revoke(spec, &lease.id, &token, upstream).await,
        Err(error) => {
            tracing::warn!(%error, "no vault token to revoke a lease with; it ends at its TTL")
        }
    }
}

async fn revoke(spec: &VaultSpec, lease_id: &str, token: &Secret, upstream: &Upstream) {
    if lease_id.is_empty() {
        return;
    }
    let body = serde_json::json!({ "lease_id": lease_id }).to_string();
    match call(
        spec,
        Method::PUT,
        "sys/leases/revoke",
        Some(token),
        Some(body),
        upstream,
    )
    .await
    {
        Ok(_) => tracing::info!(address = %spec.address, "vault lease revoked"),
        Err(error) => {
            tracing::warn!(%error, "vault lease could not be revoked; it ends at its TTL")
        }
    }
}

/// A usable Vault token: the configured one, or the session's (renewed or logged in afresh).
async fn token(
    spec: &VaultSpec,
    session: &mut Option<Session>,
    upstream: &Upstream,
) -> Result<Secret, SourceError> {
    let now = Instant::now();
    if let VaultAuth::Token(source) = &spec.auth {
        // Read each time: a rotated token file is picked up at the next poll.
        return read_key_material(source);
    }
    if let Some(current) = session.as_ref() {
        if current.renew_after.is_none_or(|at| now < at) {
            return Ok(current.token.clone());
        }
        if current.renewable {
            match renew(spec, &current.token, upstream).await {
                Ok(renewed) => {
                    tracing::debug!(address = %spec.address, "vault token renewed");
                    let token = renewed.token.clone();
                    *session = Some(renewed);
                    return Ok(token);
                }
                Err(error) => {
                    tracing::info!(%error, "vault token could not be renewed; logging in again");
                }
            }
        }
    }
    let fresh = login(spec, upstream).await?;
    tracing::debug!(address = %spec.address, "logged in to vault");
    let token = fresh.token.clone();
    *session = Some(fresh);
    Ok(token)
}

async fn login(spec: &VaultSpec, upstream: &Upstream) -> Result<Session, SourceError> {
    let VaultAuth::Login {
        mount, role, jwt, ..
    } = &spec.auth
    else {
        return Err(SourceError::StoreResponse);
    };
    let jwt = read_key_material(jwt)?;
    let body = serde_json::json!({ "role": role, "jwt": jwt.expose() }).to_string();
    let answer = call(
        spec,
        Method::POST,
        &format!("auth/{mount}/login"),
        None,
        Some(body),
        upstream,
    )
    .await?;
    session_from(&answer)
}

async fn renew(
    spec: &VaultSpec,
    token: &Secret,
    upstream: &Upstream,
) -> Result<Session, SourceError> {
    let answer = call(
        spec,
        Method::POST,
        "auth/token/renew-self",
        Some(token),
        Some("{}".into()),
        upstream,
    )
    .await?;
    session_from(&answer)
}

/// The `auth` block of a login or renewal.
fn session_from(answer: &serde_json::Value) -> Result<Session, SourceError> {
    let auth = answer.get("auth").ok_or(SourceError::StoreResponse)?;
    let token = auth
        .get("client_token")
        .and_then(|t| t.as_str())
        .ok_or(SourceError::StoreResponse)?;
    let ttl = auth
        .get("lease_duration")
        .and_then(|d| d.as_u64())
        .unwrap_or(0);
    let renew_after = (ttl > 0).then(|| {
        let ttl = crate::time::capped(
            ttl,
            crate::time::Unit::Seconds,
            Duration::from_secs(31 * 86400),
        );
        crate::time::deadline(Instant::now(), ttl * 2 / 3)
    });
    Ok(Session {
        token: Secret::new(normalize(token)?),
        renew_after,
        renewable: auth
            .get("renewable")
            .and_then(|r| r.as_bool())
            .unwrap_or(false),
    })
}

/// `current_version` from the secret's metadata: no value is transferred.
async fn current_version(
    spec: &VaultSpec,
    kv: &VaultKv,
    token: &Secret,
    upstream: &Upstream,
) -> Result<u64, SourceError> {
    let path = format!("{}/metadata/{}", kv.mount, kv.path);
    let answer = call(spec, Method::GET, &path, Some(token), None, upstream).await?;
    answer
        .pointer("/data/current_version")
        .and_then(|v| v.as_u64())
        .ok_or(SourceError::StoreResponse)
}

async fn read_field(
    spec: &VaultSpec,
    kv: &VaultKv,
    token: &Secret,
    version: u64,
    upstream: &Upstream,
) -> Result<Fetched, SourceError> {
    let path = format!("{}/data/{}?version={version}", kv.mount, kv.path);
    let answer = call(spec, Method::GET, &path, Some(token), None, upstream).await?;
    let value = answer
        .pointer("/data/data")
        .and_then(|data| data.get(&kv.field))
        .and_then(|v| v.as_str())
        .ok_or_else(|| SourceError::StoreField(kv.field.clone()))?;
    Ok(Fetched {
        secret: Secret::new(normalize(value)?),
        expires_at: None,
        inputs: None,
    })
}

/// One call to `/v1/<path>`; a non-success status is Vault's first error, cut and cleaned.
async fn call(
    spec: &VaultSpec,
    method: Method,
    path: &str,
    token: Option<&Secret>,
    body: Option<String>,
    upstream: &Upstream,
) -> Result<serde_json::Value, SourceError> {
    let base = spec.address.to_string();
    let uri = format!("{}/v1/{path}", base.trim_end_matches('/'))
        .parse()
        .map_err(|_| SourceError::TokenEndpoint("bad_url".into()))?;
    let mut headers = vec![(
        HeaderName::from_static("x-vault-request"),
        HeaderValue::from_static("true"),
    )];
    if let Some(token) = token {
        let mut value =
            HeaderValue::try_from(token.expose()).map_err(|_| SourceError::ControlCharacter)?;
        value.set_sensitive(true);
        headers.push((HeaderName::from_static("x-vault-token"), value));
    }
    if let Some(namespace) = &spec.namespace {
        let value =
            HeaderValue::try_from(namespace.as_str()).map_err(|_| SourceError::ControlCharacter)?;
        headers.push((HeaderName::from_static("x-vault-namespace"), value));
    }
    let call = Call {
        method,
        uri,
        headers,
        body: body.map(|text| ("application/json", text)),
    };
    let answer = exchange::send(call, upstream, spec.timeout).await?;
    let json: serde_json::Value = serde_json::from_slice(&answer.bytes).unwrap_or_default();
    if answer.status.is_success() {
        return Ok(json);
    }
    Err(SourceError::StoreRejected {
        status: answer.status.as_u16(),
        reason: reason(&json, answer.status),
    })
}

/// Vault's first error message, printable ASCII only and cut short; the status's name when none.
fn reason(json: &serde_json::Value, status: StatusCode) -> String {
    let said = json
        .pointer("/errors/0")
        .and_then(|e| e.as_str())
        .filter(|e| !e.is_empty());
    let text = match said {
        Some(text) => text,
        None if status == StatusCode::NOT_FOUND => "no secret at this path",
        None => status.canonical_reason().unwrap_or("error"),
    };
    text.chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(MAX_REASON)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vault_errors_are_cut_and_cleaned() {
        let json = serde_json::json!({ "errors": ["permission denied\n\u{1b}[31m"] });
        assert_eq!(
            reason(&json, StatusCode::FORBIDDEN),
            "permission denied[31m"
        );
        let long = serde_json::json!({ "errors": ["x".repeat(500)] });
        assert_eq!(reason(&long, StatusCode::BAD_REQUEST).len(), MAX_REASON);
        assert_eq!(
            reason(&serde_json::json!({}), StatusCode::NOT_FOUND),
            "no secret at this path"
        );
    }

    #[test]
    fn a_login_answer_becomes_a_session_renewed_two_thirds_in() {
        let answer = serde_json::json!({ "auth": { "client_token": "s.abc", "lease_duration": 30, "renewable": true } });
        let session = session_from(&answer).unwrap();
        assert!(session.renewable);
        let left = session.renew_after.unwrap() - Instant::now();
        assert!(left <= Duration::from_secs(20) && left > Duration::from_secs(19));
        assert!(session_from(&serde_json::json!({ "auth": {} })).is_err());
    }
}
