//! AWS keys for `aws_sigv4` routes: static keys read from their sources, or temporary keys from
//! STS — `AssumeRoleWithWebIdentity` with a projected token (EKS IRSA), `AssumeRole` signed with
//! the base keys (with an inline session policy, an external id, and a session name that may
//! name the agent and task) — whose `Expiration` makes them an expiring version like any other.

use http::{header, HeaderMap, HeaderValue, Method};

use crate::config::{AwsBase, AwsSpec};
use crate::credentials::exchange::{self, Call};
use crate::credentials::local::read_plain;
use crate::credentials::value::{Fetched, SourceError};
use crate::secret::Secret;
use crate::sigv4::{sign_request, AwsKeys, Payload};
use crate::time::parse_rfc3339;
use crate::upstream::Upstream;

/// Who a session is for, when the session name templates `{agent}` and `{task}`.
pub struct Caller<'a> {
    pub agent: &'a str,
    pub task: &'a str,
}

/// The keys `spec` yields now. `caller` fills `{agent}` and `{task}` in the session name.
pub async fn fetch(
    spec: &AwsSpec,
    caller: Caller<'_>,
    upstream: &Upstream,
) -> Result<Fetched, SourceError> {
    let base = base_keys(spec, upstream).await?;
    let Some(role) = &spec.assume_role else {
        return Ok(base);
    };
    let session_name = session_name(&role.session_name, &caller);
    let duration = role.duration.as_secs().to_string();
    let mut pairs = vec![
        ("Action", "AssumeRole"),
        ("Version", "2011-06-15"),
        ("RoleArn", role.role_arn.as_str()),
        ("RoleSessionName", session_name.as_str()),
        ("DurationSeconds", duration.as_str()),
    ];
    if let Some(policy) = &role.policy {
        pairs.push(("Policy", policy));
    }
    if let Some(external_id) = &role.external_id {
        pairs.push(("ExternalId", external_id));
    }
    let body = query_form(&pairs);
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(FORM_CONTENT_TYPE),
    );
    sign_request(
        &Method::POST,
        &spec.sts_url,
        &mut headers,
        &base.secret,
        ("sts", &spec.sts_region),
        Payload::Bytes(body.as_bytes()),
    )
    .map_err(|_| SourceError::KeyUnusable)?;
    let call = Call {
        method: Method::POST,
        uri: spec.sts_url.clone(),
        headers: headers
            .into_iter()
            .filter_map(|(k, v)| Some((k?, v)))
            .chain([xml_accept()])
            .collect(),
        body: Some((FORM_CONTENT_TYPE, body)),
    };
    let mut assumed = sts_credentials(call, spec, upstream).await?;
    assumed.inputs = base.inputs;
    Ok(assumed)
}

const FORM_CONTENT_TYPE: &str = "application/x-www-form-urlencoded; charset=utf-8";

/// STS answers JSON to `Accept: application/json`; its documented answer is XML.
fn xml_accept() -> (header::HeaderName, HeaderValue) {
    (header::ACCEPT, HeaderValue::from_static("text/xml"))
}

/// The keys the role is assumed with (or used directly, without `assume_role`).
async fn base_keys(spec: &AwsSpec, upstream: &Upstream) -> Result<Fetched, SourceError> {
    match &spec.base {
        AwsBase::Static { .. } => static_keys(spec).unwrap_or(Err(SourceError::Empty)),
        AwsBase::WebIdentity {
            role_arn,
            token,
            session_name,
        } => {
            let token = read_plain(token).unwrap_or(Err(SourceError::Empty))?;
            let body = query_form(&[
                ("Action", "AssumeRoleWithWebIdentity"),
                ("Version", "2011-06-15"),
                ("RoleArn", role_arn),
                ("RoleSessionName", session_name),
                ("WebIdentityToken", token.secret.expose()),
            ]);
            // Unsigned: the web identity token is the proof.
            let call = Call {
                method: Method::POST,
                uri: spec.sts_url.clone(),
                headers: vec![xml_accept()],
                body: Some((FORM_CONTENT_TYPE, body)),
            };
            let mut keys = sts_credentials(call, spec, upstream).await?;
            keys.inputs = Some(token.secret.fingerprint());
            Ok(keys)
        }
    }
}

/// Static keys read from their file or environment sources (their fingerprint is also the
/// `inputs` of keys assumed with them); `None` for STS-based specs.
pub fn static_keys(spec: &AwsSpec) -> Option<Result<Fetched, SourceError>> {
    let AwsBase::Static {
        access_key_id,
        secret_access_key,
        session_token,
    } = &spec.base
    else {
        return None;
    };
    let read = |source| read_plain(source).unwrap_or(Err(SourceError::Empty));
    let keys = (|| {
        let id = read(access_key_id)?;
        let secret = read(secret_access_key)?;
        let token = session_token.as_ref().map(read).transpose()?;
        let keys = AwsKeys {
            access_key_id: id.secret.expose(),
            secret_access_key: secret.secret.expose(),
            session_token: token.as_ref().map(|t| t.secret.expose()),
        };
        let secret = keys.to_secret();
        Ok(Fetched {
            inputs: Some(secret.fingerprint()),
            secret,
            expires_at: None,
        })
    })();
    Some(keys)
}

/// Sends an STS call and reads the `Credentials` of its answer.
async fn sts_credentials(
    call: Call,
    spec: &AwsSpec,
    upstream: &Upstream,
) -> Result<Fetched, SourceError> {
    let exchange::Answer { status, bytes, .. } =
        exchange::send(call, upstream, spec.timeout).await?;
    let text = String::from_utf8_lossy(&bytes);
    if !status.is_success() {
        let code = xml_text(&text, "Code")
            .filter(|code| {
                code.len() <= 64 && code.chars().all(|c| c.is_ascii_alphanumeric() || c == '.')
            })
            .unwrap_or_else(|| "unknown".into());
        return Err(SourceError::Rejected {
            status: status.as_u16(),
            code,
        });
    }
    let field = |tag| xml_text(&text, tag).ok_or(SourceError::TokenResponse);
    let keys = AwsKeys {
        access_key_id: &field("AccessKeyId")?,
        secret_access_key: &field("SecretAccessKey")?,
        session_token: Some(&field("SessionToken")?),
    }
    .to_secret();
    let expires_at = parse_rfc3339(&field("Expiration")?).ok_or(SourceError::TokenResponse)?;
    Ok(Fetched {
        secret: keys,
        expires_at: Some(expires_at),
        inputs: None,
    })
}

/// An AWS query-protocol form body, encoded as the AWS SDKs encode it: everything but
/// `A-Za-z0-9-_.~` percent-encoded (WHATWG forms leave `*` bare; some servers re-encode it).
fn query_form(pairs: &[(&str, &str)]) -> String {
    let encode = |text: &str| -> String {
        text.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    char::from(b).to_string()
                }
                b' ' => "+".to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect()
    };
    pairs
        .iter()
        .map(|(name, value)| format!("{}={}", encode(name), encode(value)))
        .collect::<Vec<_>>()
        .join("&")
}

/// The session name with `{agent}` and `{task}` filled in and made valid for STS: characters
/// outside `[A-Za-z0-9+=,.@_-]` become `-`, at most 64.
fn session_name(template: &str, caller: &Caller<'_>) -> String {
    let agent = if caller.agent.is_empty() {
        "anonymous"
    } else {
        caller.agent
    };
    let task = if caller.task.is_empty() {
        "none"
    } else {
        caller.task
    };
    template
        .replace("{agent}", agent)
        .replace("{task}", task)
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "+=,.@_-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect()
}

/// The text of the first `<tag>…</tag>`, entities decoded. STS answers are small and flat.
fn xml_text(xml: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = xml.find(&open)? + open.len();
    let end = start + xml.get(start..)?.find(&close)?;
    let raw = xml.get(start..end)?.trim();
    Some(
        raw.replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&apos;", "'")
            .replace("&amp;", "&"),
    )
}

/// What a version's keys are, for `/status`: the access key id is not a secret (CloudTrail
/// shows it), the rest is.
pub fn access_key_id(secret: &Secret) -> Option<String> {
    AwsKeys::from_secret(secret).map(|keys| keys.access_key_id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_sts_credentials_and_error_codes() {
        let ok = "<AssumeRoleResponse><AssumeRoleResult><Credentials><AccessKeyId>ASIA1</AccessKeyId>\
                  <SecretAccessKey>s&amp;k</SecretAccessKey><SessionToken>tok</SessionToken>\
                  <Expiration>2030-01-01T00:00:00Z</Expiration></Credentials></AssumeRoleResult></AssumeRoleResponse>";
        assert_eq!(xml_text(ok, "SecretAccessKey").as_deref(), Some("s&k"));
        assert_eq!(xml_text(ok, "Missing"), None);
        let err = "<ErrorResponse><Error><Code>ExpiredToken</Code></Error></ErrorResponse>";
        assert_eq!(xml_text(err, "Code").as_deref(), Some("ExpiredToken"));
    }

    #[test]
    fn session_names_name_the_caller_within_sts_rules() {
        let caller = Caller {
            agent: "reader",
            task: "build:42",
        };
        assert_eq!(
            session_name("ks-{agent}-{task}", &caller),
            "ks-reader-build-42"
        );
        let anonymous = Caller {
            agent: "",
            task: "",
        };
        assert_eq!(session_name("{agent}.{task}", &anonymous), "anonymous.none");
        let long = Caller {
            agent: &"a".repeat(60),
            task: "t",
        };
        assert_eq!(session_name("{agent}-{task}", &long).len(), 62);
    }
}
