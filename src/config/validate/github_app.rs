//! The `github_app` source kind's section: the app and installation, the key that signs its
//! JWTs, what the installation token is narrowed to, and whether it is minted once or per task.

use std::path::Path;
use std::time::Duration;

use super::super::raw::{RawGithubApp, RawId};
use super::super::{GithubAppSpec, MintMode, SourceSpec};
use super::task_limits::TaskLimitKeys;
use super::Errors;

impl Errors<'_> {
    pub(super) fn github_app(
        &mut self,
        at: &str,
        raw: &RawGithubApp,
        base: &Path,
        timeout: Duration,
    ) -> Option<SourceSpec> {
        let app_id = match &raw.app_id {
            RawId::Number(n) => Some(n.to_string()),
            RawId::Text(text)
                if !text.is_empty()
                    && text.len() <= 64
                    && text.chars().all(|c| c.is_ascii_alphanumeric() || c == '.') =>
            {
                Some(text.clone())
            }
            RawId::Text(_) => {
                self.push(
                    &format!("{at}.app_id"),
                    "must be the app's numeric id (or its client id)",
                );
                None
            }
        };
        let installation_id = match &raw.installation_id {
            RawId::Number(n) => Some(*n),
            RawId::Text(text) => text.parse::<u64>().ok().or_else(|| {
                self.push(&format!("{at}.installation_id"), "must be a number");
                None
            }),
        };
        let api_url = match raw.api_url.as_deref() {
            None => Some(http::Uri::from_static("https://api.github.com")),
            Some(text) => match text.trim_end_matches('/').parse::<http::Uri>() {
                Ok(uri)
                    if matches!(uri.scheme_str(), Some("https") | Some("http"))
                        && uri.host().is_some()
                        && uri.query().is_none() =>
                {
                    Some(uri)
                }
                _ => {
                    self.push(
                        &format!("{at}.api_url"),
                        "must be an absolute https:// URL without a query",
                    );
                    None
                }
            },
        };
        for (index, repository) in raw.repositories.iter().enumerate() {
            let valid = !repository.is_empty()
                && repository.len() <= 100
                && repository
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            if !valid {
                self.push(
                    &format!("{at}.repositories[{index}]"),
                    "a repository name without its owner (letters, digits, `-`, `_`, `.`)",
                );
            }
        }
        for (name, level) in &raw.permissions {
            let name_ok =
                !name.is_empty() && name.chars().all(|c| c.is_ascii_lowercase() || c == '_');
            if !name_ok {
                self.push(
                    &format!("{at}.permissions"),
                    "permission names are lowercase with `_` (e.g. `contents`, `pull_requests`)",
                );
            }
            if !matches!(level.as_str(), "read" | "write" | "admin") {
                self.push(
                    &format!("{at}.permissions.{name}"),
                    "must be `read`, `write` or `admin`",
                );
            }
        }
        let limit_keys = TaskLimitKeys::of_github_app(raw);
        let limits = self.task_limits(at, &limit_keys);
        let mint = match raw.mint.as_deref() {
            None | Some("shared") => {
                if limit_keys.any_set() {
                    self.push(
                        &format!("{at}.mint"),
                        "`task_idle`, `max_tasks`, `max_tasks_per_agent` and `mint_rate` apply to `mint: per_task`",
                    );
                }
                Some(MintMode::Shared)
            }
            Some("per_task") => limits.map(MintMode::PerTask),
            Some(_) => {
                self.push(&format!("{at}.mint"), "must be `shared` or `per_task`");
                None
            }
        };
        let private_key = self.key_source(&format!("{at}.private_key"), &raw.private_key, base);
        Some(SourceSpec::GithubApp(Box::new(GithubAppSpec {
            app_id: app_id?,
            private_key: private_key?,
            installation_id: installation_id?,
            api_url: api_url?,
            repositories: raw.repositories.clone(),
            permissions: raw.permissions.clone(),
            mint: mint?,
            timeout,
        })))
    }
}
