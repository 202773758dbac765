//! The `aws_secrets_manager` source kind's section: which secret, which field, which region,
//! and which of this config's `aws` credentials signs the calls.

use std::time::Duration;

use super::super::raw::RawSecretsManager;
use super::super::{SecretsManagerSpec, SourceSpec};
use super::Errors;

impl Errors<'_> {
    pub(super) fn secrets_manager(
        &mut self,
        at: &str,
        raw: &RawSecretsManager,
        timeout: Duration,
    ) -> Option<SourceSpec> {
        if raw.secret_id.is_empty() {
            self.push(
                &format!("{at}.secret_id"),
                "must name the secret (its name or ARN)",
            );
        }
        let region_ok = !raw.region.is_empty()
            && raw
                .region
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !region_ok {
            self.push(
                &format!("{at}.region"),
                "must be an AWS region like us-east-1",
            );
        }
        if raw.field.as_deref().is_some_and(str::is_empty) {
            self.push(
                &format!("{at}.field"),
                "must name a field of the JSON secret",
            );
        }
        let endpoint_text = raw
            .endpoint
            .clone()
            .unwrap_or_else(|| format!("https://secretsmanager.{}.amazonaws.com/", raw.region));
        let endpoint = match endpoint_text.parse::<http::Uri>() {
            Ok(uri)
                if matches!(uri.scheme_str(), Some("https" | "http")) && uri.host().is_some() =>
            {
                Some(uri)
            }
            _ => {
                self.push(
                    &format!("{at}.endpoint"),
                    "must be an absolute https:// URL",
                );
                None
            }
        };
        let poll = self.store_poll(&format!("{at}.poll"), raw.poll.as_deref());
        (!raw.secret_id.is_empty() && region_ok).then_some(())?;
        Some(SourceSpec::SecretsManager(Box::new(SecretsManagerSpec {
            secret_id: raw.secret_id.clone(),
            field: raw.field.clone(),
            region: raw.region.clone(),
            endpoint: endpoint?,
            credential: raw.credential.clone(),
            poll: poll?,
            timeout,
        })))
    }
}
