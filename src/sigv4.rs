//! AWS Signature Version 4 on a request as it leaves keystamp (after strip, with the upstream
//! host), by the maintained `aws-sigv4` crate; the AWS key triple as one credential value; and
//! the service and region read from a standard AWS host name.

use std::borrow::Cow;
use std::time::SystemTime;

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    sign, PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SigningSettings,
    UriPathNormalizationMode,
};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Uri};

use crate::secret::Secret;

/// Headers an agent's own signing leaves behind; stripped before keystamp signs.
pub const AGENT_SIGNING_HEADERS: [&str; 4] = [
    "authorization",
    "x-amz-date",
    "x-amz-security-token",
    "x-amz-content-sha256",
];

/// Query parameters of a presigned URL; stripped before keystamp signs.
pub const PRESIGNED_QUERY_PARAMS: [&str; 7] = [
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-SignedHeaders",
    "X-Amz-Signature",
    "X-Amz-Security-Token",
];

const CONTENT_SHA256: &str = "x-amz-content-sha256";
const STREAMING_TRAILER: &str = "STREAMING-UNSIGNED-PAYLOAD-TRAILER";
const UNSIGNED: &str = "UNSIGNED-PAYLOAD";

/// Whether the agent's `X-Amz-Content-Sha256` only describes how its body is framed (kept), not
/// a hash it signed (stripped: keystamp hashes the body itself).
pub fn describes_body(value: &[u8]) -> bool {
    value == STREAMING_TRAILER.as_bytes() || value == UNSIGNED.as_bytes()
}

#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("the credential is not an AWS key")]
    NotAwsKeys,
    #[error("the request cannot be signed")]
    Unsignable,
}

/// An access key id, secret access key and optional session token, kept as one [`Secret`]
/// (one per line) so a key pair rotates, fingerprints and expires as one version.
pub struct AwsKeys<'a> {
    pub access_key_id: &'a str,
    pub secret_access_key: &'a str,
    pub session_token: Option<&'a str>,
}

impl<'a> AwsKeys<'a> {
    pub fn to_secret(&self) -> Secret {
        match self.session_token {
            Some(token) => Secret::new(format!(
                "{}\n{}\n{token}",
                self.access_key_id, self.secret_access_key
            )),
            None => Secret::new(format!(
                "{}\n{}",
                self.access_key_id, self.secret_access_key
            )),
        }
    }

    pub fn from_secret(secret: &'a Secret) -> Option<Self> {
        let mut lines = secret.expose().split('\n');
        let access_key_id = lines.next().filter(|s| !s.is_empty())?;
        let secret_access_key = lines.next().filter(|s| !s.is_empty())?;
        let session_token = lines.next().filter(|s| !s.is_empty());
        Some(Self {
            access_key_id,
            secret_access_key,
            session_token,
        })
    }
}

/// What the payload hash covers.
#[derive(Debug, Clone, Copy)]
pub enum Payload<'a> {
    /// The whole body, in hand.
    Bytes(&'a [u8]),
    /// A streamed body: `UNSIGNED-PAYLOAD` (only services that accept it, S3).
    Unsigned,
}

/// Whether `service` accepts `UNSIGNED-PAYLOAD` for a streamed body.
pub fn accepts_unsigned_payload(service: &str) -> bool {
    service == "s3"
}

/// Signs the request in place: adds `Authorization`, `X-Amz-Date`, `X-Amz-Security-Token` (with
/// a session token) and, for S3, `X-Amz-Content-Sha256`.
pub fn sign_request(
    method: &Method,
    uri: &Uri,
    headers: &mut HeaderMap,
    keys: &Secret,
    scope: (&str, &str),
    payload: Payload<'_>,
) -> Result<(), SignError> {
    let (service, region) = scope;
    let keys = AwsKeys::from_secret(keys).ok_or(SignError::NotAwsKeys)?;
    let identity: Identity = Credentials::new(
        keys.access_key_id,
        keys.secret_access_key,
        keys.session_token.map(str::to_string),
        None,
        "keystamp",
    )
    .into();
    let mut settings = SigningSettings::default();
    if let Some(excluded) = settings.excluded_headers.as_mut() {
        // Rewritten or dropped by the next hop; never part of the signature.
        excluded.push(Cow::Borrowed("expect"));
        excluded.push(Cow::Borrowed("connection"));
    }
    if service == "s3" {
        // S3 signs the path as sent and wants the payload hash as a header.
        settings.percent_encoding_mode = PercentEncodingMode::Single;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
    }
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(service)
        .time(SystemTime::now())
        .settings(settings)
        .build()
        .map_err(|_| SignError::Unsignable)?
        .into();
    // An S3 client may have framed the body itself (aws-chunked with a checksum trailer) or
    // chosen not to sign it; that choice describes the body and is kept.
    let declared = headers
        .remove(CONTENT_SHA256)
        .filter(|_| service == "s3")
        .and_then(|v| v.to_str().ok().map(str::to_string));
    let body = match (declared.as_deref(), payload) {
        (Some(STREAMING_TRAILER), _) => SignableBody::StreamingUnsignedPayloadTrailer,
        (Some(UNSIGNED), _) | (_, Payload::Unsigned) => SignableBody::UnsignedPayload,
        (_, Payload::Bytes(bytes)) => SignableBody::Bytes(bytes),
    };
    let uri_text = uri.to_string();
    let signable = SignableRequest::new(
        method.as_str(),
        uri_text.as_str(),
        headers
            .iter()
            .filter_map(|(name, value)| Some((name.as_str(), value.to_str().ok()?))),
        body,
    )
    .map_err(|_| SignError::Unsignable)?;
    let (instructions, _signature) = sign(signable, &params)
        .map_err(|_| SignError::Unsignable)?
        .into_parts();
    let (new_headers, _query) = instructions.into_parts();
    for header in new_headers {
        let name = HeaderName::from_static(header.name());
        let mut value = HeaderValue::try_from(header.value()).map_err(|_| SignError::Unsignable)?;
        value.set_sensitive(header.sensitive() || name == http::header::AUTHORIZATION);
        headers.insert(name, value);
    }
    Ok(())
}

/// The signing name and region of a standard AWS host name (`bedrock-runtime.us-east-1.
/// amazonaws.com`, `bucket.s3.eu-west-1.amazonaws.com`, `sts.amazonaws.com`); `None` when the
/// host does not say.
pub fn scope_of_host(host: &str) -> Option<(String, String)> {
    let host = host.trim_start_matches("*.").to_ascii_lowercase();
    let labels: Vec<&str> = host.strip_suffix(".amazonaws.com")?.split('.').collect();
    // From the right: [... service, region] or [... service] for global endpoints.
    let (service, region) = match labels.as_slice() {
        [.., service, region] if looks_like_region(region) => (*service, *region),
        [.., "s3"] => ("s3", "us-east-1"),
        [service] if GLOBAL_SERVICES.contains(service) => (*service, "us-east-1"),
        _ => return None,
    };
    let service = service.trim_end_matches("-fips");
    let signing_name = SIGNING_NAMES
        .iter()
        .find(|(endpoint, _)| *endpoint == service)
        .map_or(service, |(_, name)| *name);
    Some((signing_name.to_string(), region.to_string()))
}

/// Services whose endpoint has no region and signs for us-east-1.
const GLOBAL_SERVICES: [&str; 4] = ["sts", "iam", "s3", "route53"];

/// Endpoint prefixes whose signing name differs.
const SIGNING_NAMES: [(&str, &str); 5] = [
    ("bedrock-runtime", "bedrock"),
    ("bedrock-agent-runtime", "bedrock"),
    ("bedrock-agent", "bedrock"),
    ("email", "ses"),
    ("runtime", "sagemaker"),
];

/// `us-east-1`, `eu-central-2`, `ap-southeast-3`, `us-gov-west-1`: letters-…-digit.
fn looks_like_region(label: &str) -> bool {
    let parts: Vec<&str> = label.split('-').collect();
    parts.len() >= 3
        && parts
            .last()
            .is_some_and(|n| n.chars().all(|c| c.is_ascii_digit()))
        && parts
            .iter()
            .take(parts.len() - 1)
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_lowercase()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_comes_from_standard_host_names() {
        let scope = |host: &str| scope_of_host(host).map(|(s, r)| format!("{s}/{r}"));
        assert_eq!(
            scope("bedrock-runtime.us-east-1.amazonaws.com").as_deref(),
            Some("bedrock/us-east-1")
        );
        assert_eq!(
            scope("s3.eu-west-1.amazonaws.com").as_deref(),
            Some("s3/eu-west-1")
        );
        assert_eq!(
            scope("*.s3.eu-west-1.amazonaws.com").as_deref(),
            Some("s3/eu-west-1")
        );
        assert_eq!(
            scope("my-bucket.s3.amazonaws.com").as_deref(),
            Some("s3/us-east-1")
        );
        assert_eq!(scope("sts.amazonaws.com").as_deref(), Some("sts/us-east-1"));
        assert_eq!(
            scope("sqs-fips.us-gov-west-1.amazonaws.com").as_deref(),
            Some("sqs/us-gov-west-1")
        );
        assert_eq!(
            scope("dynamodb.ap-southeast-2.amazonaws.com").as_deref(),
            Some("dynamodb/ap-southeast-2")
        );
        assert_eq!(scope("api.example.com"), None);
        assert_eq!(scope("weird.amazonaws.com"), None);
    }

    #[test]
    fn key_triples_round_trip_through_one_secret() {
        let keys = AwsKeys {
            access_key_id: "AKID",
            secret_access_key: "s/k",
            session_token: Some("tok"),
        };
        let secret = keys.to_secret();
        let back = AwsKeys::from_secret(&secret).unwrap();
        assert_eq!(
            (
                back.access_key_id,
                back.secret_access_key,
                back.session_token
            ),
            ("AKID", "s/k", Some("tok"))
        );
        assert!(AwsKeys::from_secret(&Secret::new("just-a-token")).is_none());
    }

    #[test]
    fn signs_with_the_documented_headers() {
        let keys = AwsKeys {
            access_key_id: "AKIDEXAMPLE",
            secret_access_key: "secret",
            session_token: Some("session"),
        }
        .to_secret();
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        let uri: Uri = "https://bedrock-runtime.us-east-1.amazonaws.com/model/x/invoke"
            .parse()
            .unwrap();
        sign_request(
            &Method::POST,
            &uri,
            &mut headers,
            &keys,
            ("bedrock", "us-east-1"),
            Payload::Bytes(b"{}"),
        )
        .unwrap();
        let authorization = headers["authorization"].to_str().unwrap();
        assert!(
            authorization.starts_with("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/"),
            "{authorization}"
        );
        assert!(authorization.contains("/us-east-1/bedrock/aws4_request"));
        assert!(headers["authorization"].is_sensitive());
        assert_eq!(headers["x-amz-security-token"], "session");
        assert!(headers.contains_key("x-amz-date"));
        assert!(
            !headers.contains_key("x-amz-content-sha256"),
            "only S3 sends the payload hash header"
        );
    }
}
