//! OAuth2 client credentials (RFC 6749 section 4.4): POST to the token endpoint with the client id
//! and secret (each itself a source), read `access_token` and `expires_in`. The endpoint is
//! reached through keystamp's upstream client: verified TLS, `resolve:` pins.

use std::time::{Duration, SystemTime};

use http::Method;

use crate::config::OAuth2Spec;
use crate::credentials::exchange;
use crate::credentials::value::{normalize, Fetched, SourceError};
use crate::secret::Secret;
use crate::upstream::Upstream;

/// The client's id and secret, already read from their sources.
pub struct Client<'a> {
    pub id: &'a Secret,
    pub secret: &'a Secret,
}

pub async fn fetch_token(
    spec: &OAuth2Spec,
    client: Client<'_>,
    upstream: &Upstream,
) -> Result<Fetched, SourceError> {
    let form = {
        // Scoped: the serializer is not `Send` and must not live across an await.
        let mut form = form_urlencoded::Serializer::new(String::new());
        form.append_pair("grant_type", "client_credentials");
        form.append_pair("client_id", client.id.expose());
        form.append_pair("client_secret", client.secret.expose());
        if !spec.scopes.is_empty() {
            form.append_pair("scope", &spec.scopes.join(" "));
        }
        if let Some(audience) = &spec.audience {
            form.append_pair("audience", audience);
        }
        form.finish()
    };
    let call = exchange::Call {
        method: Method::POST,
        uri: spec.token_url.clone(),
        headers: Vec::new(),
        body: Some(("application/x-www-form-urlencoded", form)),
    };
    let bytes = exchange::send_expecting_success(call, upstream, spec.timeout)
        .await?
        .bytes;
    let received_at = SystemTime::now();
    parse_token_response(&bytes, received_at)
}

pub(super) fn parse_token_response(
    bytes: &[u8],
    received_at: SystemTime,
) -> Result<Fetched, SourceError> {
    #[derive(serde::Deserialize)]
    struct TokenResponse {
        access_token: String,
        #[serde(default)]
        expires_in: Option<f64>,
    }
    let parsed: TokenResponse =
        serde_json::from_slice(bytes).map_err(|_| SourceError::TokenResponse)?;
    let token = normalize(&parsed.access_token)?;
    let expires_at = parsed
        .expires_in
        .filter(|seconds| seconds.is_finite() && *seconds > 0.0 && *seconds < 1e9)
        .and_then(|seconds| received_at.checked_add(Duration::from_secs_f64(seconds)));
    Ok(Fetched {
        secret: Secret::new(token),
        expires_at,
        inputs: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expires_in_becomes_an_absolute_time_at_receipt() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let fetched = parse_token_response(
            br#"{"access_token":"tok","expires_in":3600,"token_type":"Bearer"}"#,
            at,
        )
        .unwrap();
        assert_eq!(fetched.secret.expose(), "tok");
        assert_eq!(fetched.expires_at, Some(at + Duration::from_secs(3600)));
        assert!(parse_token_response(br#"{"error":"invalid_client"}"#, at).is_err());
    }
}
