//! GitHub App installation tokens: sign the app JWT (RS256, `iss` = app id, issued 60 s in the
//! past, valid under 10 minutes), ask `POST /app/installations/{id}/access_tokens` for a token
//! narrowed to the configured repositories and permissions, and read its `expires_at`. A token
//! minted per task is revoked with `DELETE /installation/token` when the task ends.

use http::{header, HeaderName, HeaderValue, Method};

use crate::config::GithubAppSpec;
use crate::credentials::exchange::{self, Call};
use crate::credentials::jwt::{unix_now, SigningKey};
use crate::credentials::value::{normalize, Fetched, SourceError};
use crate::secret::Secret;
use crate::time::parse_rfc3339;
use crate::upstream::Upstream;

/// GitHub accepts app JWTs valid for at most 10 minutes; stay under it.
const JWT_LIFETIME_SECS: u64 = 9 * 60;
/// Backdate `iat` against clock drift, as GitHub recommends.
const JWT_BACKDATE_SECS: u64 = 60;

/// A minted token, and GitHub's clock against keystamp's when it was minted.
pub struct Minted {
    pub fetched: Fetched,
    /// GitHub's `Date` minus keystamp's clock, in seconds.
    pub skew_seconds: Option<i64>,
}

/// Mints an installation token narrowed as `spec` says, signing with `private_key` (PEM).
/// `expires_at` is read on GitHub's clock and moved onto keystamp's by the skew its `Date`
/// header shows, so "expired" means expired at GitHub.
pub async fn mint(
    spec: &GithubAppSpec,
    private_key: &Secret,
    upstream: &Upstream,
) -> Result<Minted, SourceError> {
    let key = SigningKey::from_pem(private_key.expose())?;
    let now = unix_now();
    let claims = serde_json::json!({
        "iat": now.saturating_sub(JWT_BACKDATE_SECS),
        "exp": now + JWT_LIFETIME_SECS,
        "iss": spec.app_id,
    });
    let jwt = key.sign(&claims, None)?;
    let mut narrowing = serde_json::Map::new();
    if !spec.repositories.is_empty() {
        narrowing.insert("repositories".into(), serde_json::json!(spec.repositories));
    }
    if !spec.permissions.is_empty() {
        narrowing.insert("permissions".into(), serde_json::json!(spec.permissions));
    }
    let call = Call {
        method: Method::POST,
        uri: endpoint(
            spec,
            &format!("/app/installations/{}/access_tokens", spec.installation_id),
        )?,
        headers: github_headers(&jwt)?,
        body: Some((
            "application/json",
            serde_json::Value::Object(narrowing).to_string(),
        )),
    };
    let answer = exchange::send_expecting_success(call, upstream, spec.timeout).await?;
    let skew_seconds = answer.skew_seconds(std::time::SystemTime::now());
    #[derive(serde::Deserialize)]
    struct Token {
        token: String,
        expires_at: String,
    }
    let token: Token =
        serde_json::from_slice(&answer.bytes).map_err(|_| SourceError::TokenResponse)?;
    let expires_at = parse_rfc3339(&token.expires_at).ok_or(SourceError::TokenResponse)?;
    Ok(Minted {
        fetched: Fetched {
            secret: Secret::new(normalize(&token.token)?),
            expires_at: Some(on_our_clock(expires_at, skew_seconds)),
            inputs: None,
        },
        skew_seconds,
    })
}

/// Revokes an installation token (`DELETE /installation/token`, authenticated by the token).
pub async fn revoke(
    spec: &GithubAppSpec,
    token: &Secret,
    upstream: &Upstream,
) -> Result<(), SourceError> {
    let call = Call {
        method: Method::DELETE,
        uri: endpoint(spec, "/installation/token")?,
        headers: github_headers(token)?,
        body: None,
    };
    exchange::send_expecting_success(call, upstream, spec.timeout)
        .await
        .map(drop)
}

/// GitHub's `at` as keystamp's clock reads it. `Date` has whole seconds: a skew under 2 s is
/// the header's resolution and the trip's length, not a clock difference.
fn on_our_clock(at: std::time::SystemTime, skew_seconds: Option<i64>) -> std::time::SystemTime {
    let Some(skew) = skew_seconds.filter(|s| s.abs() >= 2) else {
        return at;
    };
    let shift = std::time::Duration::from_secs(skew.unsigned_abs());
    let moved = if skew > 0 {
        at.checked_sub(shift)
    } else {
        at.checked_add(shift)
    };
    moved.unwrap_or(at)
}

fn endpoint(spec: &GithubAppSpec, path: &str) -> Result<http::Uri, SourceError> {
    let base = spec.api_url.to_string();
    format!("{}{path}", base.trim_end_matches('/'))
        .parse()
        .map_err(|_| SourceError::TokenEndpoint("bad_url".into()))
}

fn github_headers(bearer: &Secret) -> Result<Vec<(HeaderName, HeaderValue)>, SourceError> {
    let mut authorization = HeaderValue::try_from(format!("Bearer {}", bearer.expose()))
        .map_err(|_| SourceError::ControlCharacter)?;
    authorization.set_sensitive(true);
    Ok(vec![
        (header::AUTHORIZATION, authorization),
        (
            header::ACCEPT,
            HeaderValue::from_static("application/vnd.github+json"),
        ),
        (
            HeaderName::from_static("x-github-api-version"),
            HeaderValue::from_static("2022-11-28"),
        ),
    ])
}
