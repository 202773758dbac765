//! The `aws` source kind's section: static keys or a web identity to start from, an optional
//! role to assume (per caller when its session name names `{agent}` or `{task}`), and the STS
//! endpoint that mints the keys.

use std::path::Path;
use std::time::Duration;

use super::super::paths;
use super::super::raw::RawAws;
use super::super::{AssumeRoleSpec, AwsBase, AwsSpec, SourceSpec, ValueFormat};
use super::task_limits::TaskLimitKeys;
use super::Errors;

impl Errors<'_> {
    pub(super) fn aws(
        &mut self,
        at: &str,
        raw: &RawAws,
        base: &Path,
        timeout: Duration,
    ) -> Option<SourceSpec> {
        let key = |key: &str| format!("{at}.{key}");
        let static_keys = raw.access_key_id.is_some() || raw.secret_access_key.is_some();
        let base_keys = match (&raw.web_identity, static_keys) {
            (Some(_), true) => {
                self.push(at, "set either static keys or `web_identity`, not both");
                return None;
            }
            (None, false) => {
                self.push(
                    at,
                    "set `access_key_id` and `secret_access_key`, or `web_identity`",
                );
                return None;
            }
            (None, true) => {
                let (Some(id), Some(secret)) = (&raw.access_key_id, &raw.secret_access_key) else {
                    self.push(
                        at,
                        "static keys need both `access_key_id` and `secret_access_key`",
                    );
                    return None;
                };
                let access_key_id = self.key_source(&key("access_key_id"), id, base);
                let secret_access_key = self.key_source(&key("secret_access_key"), secret, base);
                let session_token = raw
                    .session_token
                    .as_ref()
                    .map(|token| self.key_source(&key("session_token"), token, base));
                AwsBase::Static {
                    access_key_id: access_key_id?,
                    secret_access_key: secret_access_key?,
                    session_token: match session_token {
                        Some(token) => Some(token?),
                        None => None,
                    },
                }
            }
            (Some(web), false) => {
                let at = key("web_identity");
                // The EKS convention fills in what the config leaves out.
                let role_arn = web
                    .role_arn
                    .clone()
                    .or_else(|| std::env::var("AWS_ROLE_ARN").ok());
                let token = match &web.token {
                    Some(token) => self.source(&format!("{at}.token"), token, base),
                    None => std::env::var("AWS_WEB_IDENTITY_TOKEN_FILE")
                        .ok()
                        .filter(|path| !path.is_empty())
                        .map(|path| SourceSpec::File {
                            path: paths::resolve(base, &path),
                            format: ValueFormat::Plain,
                        }),
                };
                let Some(role_arn) = role_arn.filter(|arn| valid_role_arn(arn)) else {
                    self.push(
                        &format!("{at}.role_arn"),
                        "set a role ARN (arn:aws:iam::ACCOUNT:role/NAME) or AWS_ROLE_ARN",
                    );
                    return None;
                };
                let Some(token) = token else {
                    self.push(
                        &format!("{at}.token"),
                        "set a token source or AWS_WEB_IDENTITY_TOKEN_FILE",
                    );
                    return None;
                };
                let session_name = web
                    .session_name
                    .clone()
                    .unwrap_or_else(|| "keystamp".into());
                if !valid_session_name(&session_name) {
                    self.push(
                        &format!("{at}.session_name"),
                        "2 to 64 of letters, digits and `+=,.@-`",
                    );
                    return None;
                }
                AwsBase::WebIdentity {
                    role_arn,
                    token,
                    session_name,
                }
            }
        };
        let assume_role = match &raw.assume_role {
            None => None,
            Some(role) => {
                let at = key("assume_role");
                if !valid_role_arn(&role.role_arn) {
                    self.push(
                        &format!("{at}.role_arn"),
                        "must be a role ARN (arn:aws:iam::ACCOUNT:role/NAME)",
                    );
                }
                let session_name = role
                    .session_name
                    .clone()
                    .unwrap_or_else(|| "keystamp".into());
                let rendered = session_name
                    .replace("{agent}", "agent")
                    .replace("{task}", "task");
                if !valid_session_name(&rendered) {
                    self.push(
                        &format!("{at}.session_name"),
                        "2 to 64 of letters, digits and `+=,.@-`, with `{agent}` and `{task}`",
                    );
                }
                let duration = match role.duration.as_deref() {
                    None => Some(Duration::from_secs(3600)),
                    Some(text) => self.duration(&format!("{at}.duration"), text),
                };
                let duration = duration.filter(|d| (900..=43_200).contains(&d.as_secs()));
                if duration.is_none() {
                    self.push(&format!("{at}.duration"), "must be between 15m and 12h");
                }
                let policy = match &role.policy {
                    None => None,
                    Some(serde_json::Value::String(text)) => match serde_json::from_str::<
                        serde_json::Value,
                    >(
                        text.as_str()
                    ) {
                        Ok(value) if value.is_object() => Some(value.to_string()),
                        _ => {
                            self.push(&format!("{at}.policy"), "must be a JSON policy document");
                            None
                        }
                    },
                    Some(value @ serde_json::Value::Object(_)) => Some(value.to_string()),
                    Some(_) => {
                        self.push(
                            &format!("{at}.policy"),
                            "must be a policy document (a mapping)",
                        );
                        None
                    }
                };
                let limit_keys = TaskLimitKeys::of_assume_role(role);
                let sessions = self.task_limits(&at, &limit_keys);
                let spec = AssumeRoleSpec {
                    role_arn: role.role_arn.clone(),
                    session_name,
                    duration: duration?,
                    policy,
                    external_id: role.external_id.clone(),
                    sessions: sessions?,
                };
                if limit_keys.any_set() && !spec.per_caller() {
                    self.push(
                        &format!("{at}.session_name"),
                        "`task_idle`, `max_tasks`, `max_tasks_per_agent` and `mint_rate` apply to a session per caller: name `{agent}` or `{task}` here",
                    );
                }
                Some(spec)
            }
        };
        let sts_url = match raw.sts_endpoint.as_deref() {
            None => Some(http::Uri::from_static("https://sts.amazonaws.com/")),
            Some(text) => match text.parse::<http::Uri>() {
                Ok(uri) if uri.scheme_str() == Some("https") && uri.host().is_some() => Some(uri),
                _ => {
                    self.push(&key("sts_endpoint"), "must be an absolute https:// URL");
                    None
                }
            },
        };
        Some(SourceSpec::Aws(Box::new(AwsSpec {
            base: base_keys,
            assume_role,
            sts_url: sts_url?,
            sts_region: raw.sts_region.clone().unwrap_or_else(|| "us-east-1".into()),
            timeout,
        })))
    }
}

/// `arn:aws:iam::123456789012:role/NAME` (any partition, paths allowed).
fn valid_role_arn(arn: &str) -> bool {
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    matches!(parts.as_slice(), ["arn", _, "iam", "", account, resource]
        if account.len() == 12 && account.chars().all(|c| c.is_ascii_digit()) && resource.starts_with("role/"))
}

/// An STS role session name: 2–64 of `[A-Za-z0-9+=,.@-]` (and `_`).
fn valid_session_name(name: &str) -> bool {
    (2..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+=,.@-_".contains(c))
}
