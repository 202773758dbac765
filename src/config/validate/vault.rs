//! The `vault` source kind's section: address, one way to log in, the KV v2 field, the poll.

use std::path::Path;
use std::time::Duration;

use super::super::raw::{RawVault, RawVaultLogin};
use super::super::{SourceSpec, VaultAuth, VaultKv, VaultLoginMethod, VaultSecret, VaultSpec};
use super::Errors;

/// Metadata is checked this often unless `poll:` says otherwise.
const DEFAULT_POLL: Duration = Duration::from_secs(30);
/// Polling faster than this would be a load test of the store.
const MIN_POLL: Duration = Duration::from_millis(500);

impl Errors<'_> {
    /// A secret store's `poll:` (any store kind): default 30 s, at least 500 ms.
    pub(super) fn store_poll(&mut self, at: &str, text: Option<&str>) -> Option<Duration> {
        match text {
            None => Some(DEFAULT_POLL),
            Some(text) => self
                .duration(at, text)
                .filter(|poll| *poll >= MIN_POLL)
                .or_else(|| {
                    self.push(at, "must be at least 500ms");
                    None
                }),
        }
    }

    pub(super) fn vault(
        &mut self,
        at: &str,
        raw: &RawVault,
        base: &Path,
        timeout: Duration,
    ) -> Option<SourceSpec> {
        let address = match raw.address.parse::<http::Uri>() {
            Ok(uri)
                if matches!(uri.scheme_str(), Some("https" | "http"))
                    && uri.host().is_some()
                    && uri.path_and_query().is_none_or(|p| p.as_str() == "/") =>
            {
                Some(uri)
            }
            _ => {
                self.push(
                    &format!("{at}.address"),
                    "must be the server's base URL, like https://vault.internal:8200",
                );
                None
            }
        };
        let poll = self.store_poll(&format!("{at}.poll"), raw.poll.as_deref());
        let auth = self.vault_auth(&format!("{at}.auth"), raw, base);
        let secret = self.vault_secret(at, raw);
        Some(SourceSpec::Vault(Box::new(VaultSpec {
            address: address?,
            namespace: raw.namespace.clone(),
            auth: auth?,
            secret: secret?,
            poll: poll?,
            timeout,
        })))
    }

    fn vault_secret(&mut self, at: &str, raw: &RawVault) -> Option<VaultSecret> {
        let path_ok = |text: &str| {
            !text.is_empty()
                && text
                    .split('/')
                    .all(|s| !s.is_empty() && s != "." && s != ".." && !s.contains(['?', '#', '%']))
        };
        match (&raw.kv, &raw.dynamic) {
            (Some(kv), None) => {
                let mount = kv.mount.clone().unwrap_or_else(|| "secret".into());
                let mut ok = true;
                if !path_ok(&mount) {
                    self.push(
                        &format!("{at}.kv.mount"),
                        "must be a mount path like `secret`",
                    );
                    ok = false;
                }
                if !path_ok(&kv.path) {
                    self.push(
                        &format!("{at}.kv.path"),
                        "must be a secret path like `agents/openai` (no `..`, `?`, `#` or `%`)",
                    );
                    ok = false;
                }
                if kv.field.is_empty() {
                    self.push(&format!("{at}.kv.field"), "must name the secret's field");
                    ok = false;
                }
                ok.then(|| {
                    VaultSecret::Kv(VaultKv {
                        mount,
                        path: kv.path.clone(),
                        field: kv.field.clone(),
                    })
                })
            }
            (None, Some(dynamic)) => {
                let mut ok = true;
                if !path_ok(&dynamic.path) {
                    self.push(
                        &format!("{at}.dynamic.path"),
                        "must be a path like `database/creds/agent` (no `..`, `?`, `#` or `%`)",
                    );
                    ok = false;
                }
                if dynamic.field.is_empty() {
                    self.push(
                        &format!("{at}.dynamic.field"),
                        "must name the secret's field",
                    );
                    ok = false;
                }
                ok.then(|| VaultSecret::Dynamic {
                    path: dynamic.path.clone(),
                    field: dynamic.field.clone(),
                })
            }
            _ => {
                self.push(at, "set exactly one of `kv` or `dynamic`");
                None
            }
        }
    }

    fn vault_auth(&mut self, at: &str, raw: &RawVault, base: &Path) -> Option<VaultAuth> {
        let auth = &raw.auth;
        let set = [
            auth.token.is_some(),
            auth.jwt.is_some(),
            auth.kubernetes.is_some(),
        ];
        if set.iter().filter(|s| **s).count() != 1 {
            self.push(at, "set exactly one of `token`, `jwt` or `kubernetes`");
            return None;
        }
        if let Some(token) = &auth.token {
            return self
                .key_source(&format!("{at}.token"), token, base)
                .map(VaultAuth::Token);
        }
        let (method, login, name) = match (&auth.jwt, &auth.kubernetes) {
            (Some(jwt), _) => (VaultLoginMethod::Jwt, jwt, "jwt"),
            (None, Some(kubernetes)) => (VaultLoginMethod::Kubernetes, kubernetes, "kubernetes"),
            (None, None) => return None,
        };
        self.vault_login(&format!("{at}.{name}"), method, name, login, base)
    }

    fn vault_login(
        &mut self,
        at: &str,
        method: VaultLoginMethod,
        default_mount: &str,
        login: &RawVaultLogin,
        base: &Path,
    ) -> Option<VaultAuth> {
        if login.role.is_empty() {
            self.push(&format!("{at}.role"), "must name the Vault role");
        }
        let mount = login.mount.clone().unwrap_or_else(|| default_mount.into());
        let jwt = self.key_source(&format!("{at}.token"), &login.token, base)?;
        (!login.role.is_empty()).then(|| VaultAuth::Login {
            method,
            mount,
            role: login.role.clone(),
            jwt,
        })
    }
}
