//! Vault and OpenBao (one HTTP API): log in (a token from a source, or a role login with a
//! projected service-account JWT through the `jwt` or `kubernetes` auth method), keep the token
//! renewed and log in again when it cannot be, and read a KV version 2 field. Change detection
//! reads the secret's metadata (`current_version`, no value transferred); the value is read only
//! when the version moved. Errors carry Vault's own words (`permission denied`), never a token.

use std::time::Duration;

use http::{HeaderName, HeaderValue, Method, StatusCode};
use tokio::time::Instant;

use crate::config::{VaultAuth, VaultSpec};
use crate::credentials::exchange::{self, Call};
use crate::credentials::local::read_key_material;
use crate::credentials::store_watch::{Session, StoreWatch};
use crate::credentials::value::{normalize, Fetched, SourceError};
use crate::secret::Secret;
use crate::upstream::Upstream;

/// Vault's own error text is cut to this many characters in `last_error`.
const MAX_REASON: usize = 160;

/// The field's current value: from the last read while the secret's version is unchanged.
pub async fn fetch(
    spec: &VaultSpec,
    watch: &StoreWatch,
    upstream: &Upstream,
) -> Result<Fetched, SourceError> {
    let mut session = watch.vault.lock().await;
    let token = token(spec, &mut session, upstream).await?;
    let version = match current_version(spec, &token, upstream).await {
        // A token revoked under us: log in once more before giving up.
        Err(SourceError::StoreRejected { status: 403, .. })
            if matches!(spec.auth, VaultAuth::Login { .. }) =>
        {
            *session = None;
            let token = self::token(spec, &mut session, upstream).await?;
            current_version(spec, &token, upstream).await?
        }
        other => other?,
    };
    if let Some(fetched) = watch.read_at(&version.to_string()) {
        return Ok(fetched);
    }
    let token = session.as_ref().map(|s| s.token.clone()).unwrap_or(token);
    let fetched = read_field(spec, &token, version, upstream).await?;
    watch.remember(version.to_string(), &fetched);
    Ok(fetched)
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
    token: &Secret,
    upstream: &Upstream,
) -> Result<u64, SourceError> {
    let path = format!("{}/metadata/{}", spec.kv.mount, spec.kv.path);
    let answer = call(spec, Method::GET, &path, Some(token), None, upstream).await?;
    answer
        .pointer("/data/current_version")
        .and_then(|v| v.as_u64())
        .ok_or(SourceError::StoreResponse)
}

async fn read_field(
    spec: &VaultSpec,
    token: &Secret,
    version: u64,
    upstream: &Upstream,
) -> Result<Fetched, SourceError> {
    let path = format!("{}/data/{}?version={version}", spec.kv.mount, spec.kv.path);
    let answer = call(spec, Method::GET, &path, Some(token), None, upstream).await?;
    let value = answer
        .pointer("/data/data")
        .and_then(|data| data.get(&spec.kv.field))
        .and_then(|v| v.as_str())
        .ok_or_else(|| SourceError::StoreField(spec.kv.field.clone()))?;
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
