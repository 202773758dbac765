//! Google access tokens from a service-account key (RFC 7523): read the JSON key file Google
//! issues (`client_email`, `private_key`, `token_uri`), sign a JWT-bearer assertion for the
//! configured scopes (and `subject`, for domain-wide delegation), exchange it at `token_uri`, and
//! make `expires_in` absolute on receipt.

use std::time::SystemTime;

use http::Method;

use crate::config::GoogleSpec;
use crate::credentials::exchange::{self, Call};
use crate::credentials::jwt::{unix_now, SigningKey};
use crate::credentials::oauth::parse_token_response;
use crate::credentials::value::{Fetched, SourceError};
use crate::secret::Secret;
use crate::upstream::Upstream;

/// Google accepts assertions valid for at most an hour.
const ASSERTION_LIFETIME_SECS: u64 = 3600;

/// The parts of a service-account key file keystamp uses.
#[derive(serde::Deserialize)]
struct KeyFile {
    client_email: String,
    private_key: String,
    #[serde(default)]
    private_key_id: Option<String>,
    token_uri: String,
}

pub async fn fetch_token(
    spec: &GoogleSpec,
    key_file: &Secret,
    upstream: &Upstream,
) -> Result<Fetched, SourceError> {
    let key: KeyFile =
        serde_json::from_str(key_file.expose()).map_err(|_| SourceError::ServiceAccountKey)?;
    let token_uri: http::Uri = key
        .token_uri
        .parse()
        .ok()
        .filter(|uri: &http::Uri| uri.scheme_str() == Some("https") && uri.host().is_some())
        .ok_or(SourceError::ServiceAccountKey)?;
    let signer = SigningKey::from_pem(&key.private_key)?;
    let now = unix_now();
    let mut claims = serde_json::Map::new();
    claims.insert("iss".into(), key.client_email.into());
    claims.insert("scope".into(), spec.scopes.join(" ").into());
    claims.insert("aud".into(), key.token_uri.into());
    claims.insert("iat".into(), now.into());
    claims.insert("exp".into(), (now + ASSERTION_LIFETIME_SECS).into());
    if let Some(subject) = &spec.subject {
        claims.insert("sub".into(), subject.as_str().into());
    }
    let claims = serde_json::Value::Object(claims);
    let assertion = signer.sign(&claims, key.private_key_id.as_deref())?;
    let form = form_urlencoded::Serializer::new(String::new())
        .append_pair("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer")
        .append_pair("assertion", assertion.expose())
        .finish();
    let call = Call {
        method: Method::POST,
        uri: token_uri,
        headers: Vec::new(),
        body: Some(("application/x-www-form-urlencoded", form)),
    };
    let bytes = exchange::send_expecting_success(call, upstream, spec.timeout)
        .await?
        .bytes;
    parse_token_response(&bytes, SystemTime::now())
}
