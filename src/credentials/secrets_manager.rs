//! AWS Secrets Manager: `DescribeSecret` to learn which version is `AWSCURRENT` (no value
//! transferred), `GetSecretValue` only when it moved (what AWS's own caching agent does), both
//! signed with SigV4 by another credential's AWS keys. A JSON secret gives one `field`.

use http::{header, HeaderMap, HeaderValue, Method};

use crate::config::SecretsManagerSpec;
use crate::credentials::exchange::{self, Call};
use crate::credentials::store_watch::StoreWatch;
use crate::credentials::value::{normalize, Fetched, SourceError};
use crate::secret::Secret;
use crate::sigv4::{sign_request, Payload};
use crate::upstream::Upstream;

const CONTENT_TYPE: &str = "application/x-amz-json-1.1";

/// The secret's current value; the last one read while `AWSCURRENT` is the same version.
/// `keys`: the signing credential's current keys (`None`: it has none yet).
pub async fn fetch(
    spec: &SecretsManagerSpec,
    keys: Option<&Secret>,
    watch: &StoreWatch,
    upstream: &Upstream,
) -> Result<Fetched, SourceError> {
    let keys = keys.ok_or_else(|| SourceError::StoreRejected {
        status: 0,
        reason: format!("credential `{}` has no AWS keys yet", spec.credential),
    })?;
    let described = call(spec, keys, "DescribeSecret", upstream).await?;
    let current = described
        .get("VersionIdsToStages")
        .and_then(|v| v.as_object())
        .and_then(|versions| {
            versions.iter().find_map(|(id, stages)| {
                let staged = stages.as_array()?.iter().any(|s| s == "AWSCURRENT");
                staged.then(|| id.clone())
            })
        })
        .ok_or(SourceError::StoreResponse)?;
    if let Some(fetched) = watch.read_at(&current) {
        return Ok(fetched);
    }
    let value = call(spec, keys, "GetSecretValue", upstream).await?;
    let text = value
        .get("SecretString")
        .and_then(|s| s.as_str())
        .ok_or(SourceError::StoreResponse)?;
    let secret = match &spec.field {
        None => text.to_string(),
        Some(field) => serde_json::from_str::<serde_json::Value>(text)
            .ok()
            .and_then(|json| json.get(field)?.as_str().map(str::to_string))
            .ok_or_else(|| SourceError::StoreField(field.clone()))?,
    };
    let version = value
        .get("VersionId")
        .and_then(|v| v.as_str())
        .unwrap_or(&current)
        .to_string();
    let fetched = Fetched {
        secret: Secret::new(normalize(&secret)?),
        expires_at: None,
        inputs: None,
    };
    watch.remember(version, &fetched);
    Ok(fetched)
}

/// One JSON-protocol call, signed; an error answer is the `__type` code AWS named.
async fn call(
    spec: &SecretsManagerSpec,
    keys: &Secret,
    action: &str,
    upstream: &Upstream,
) -> Result<serde_json::Value, SourceError> {
    let body = serde_json::json!({ "SecretId": spec.secret_id }).to_string();
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    let target = HeaderValue::try_from(format!("secretsmanager.{action}"))
        .map_err(|_| SourceError::StoreResponse)?;
    headers.insert("x-amz-target", target);
    sign_request(
        &Method::POST,
        &spec.endpoint,
        &mut headers,
        keys,
        ("secretsmanager", &spec.region),
        Payload::Bytes(body.as_bytes()),
    )
    .map_err(|_| SourceError::KeyUnusable)?;
    let call = Call {
        method: Method::POST,
        uri: spec.endpoint.clone(),
        headers: headers
            .into_iter()
            .filter_map(|(name, value)| Some((name?, value)))
            .collect(),
        body: Some((CONTENT_TYPE, body)),
    };
    let answer = exchange::send(call, upstream, spec.timeout).await?;
    let json: serde_json::Value = serde_json::from_slice(&answer.bytes).unwrap_or_default();
    if answer.status.is_success() {
        return Ok(json);
    }
    let code = json
        .get("__type")
        .and_then(|t| t.as_str())
        .map(|t| t.rsplit('#').next().unwrap_or(t))
        .filter(|code| code.len() <= 64 && code.chars().all(|c| c.is_ascii_alphanumeric()))
        .unwrap_or("unknown");
    Err(SourceError::StoreRejected {
        status: answer.status.as_u16(),
        reason: code.to_string(),
    })
}
