//! Turns the raw schema into a [`Config`], collecting every problem with its position rather than
//! stopping at the first. Messages never quote values from the file.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use http::{HeaderName, Method};

use crate::host::Host;

mod aws;
mod github_app;
mod hints;
mod recover;
mod secrets_manager;
mod task_limits;
mod transparent;
mod vault;

use super::locate::{locate, parse_path};
use super::paths;
use super::raw::{
    RawBreaker, RawCa, RawConfig, RawCredential, RawGoogle, RawIdentity, RawInject, RawRateLimit,
    RawReload, RawRoute, RawSource, RawTimeouts, RawWorkers,
};
use super::{
    AgentScope, BreakerSettings, CaConfig, CaOrigin, CommandSpec, Config, ConfigError,
    CredentialSpec, FleetConfig, GoogleSpec, HostPattern, IdentitySpec, Injection, LimitScope,
    OAuth2Spec, RateLimitSpec, ReloadConfig, RouteSpec, SourceSpec, Timeouts, Unmatched,
    ValueFormat,
};

const DEFAULT_LEAF_CACHE: usize = 1024;
const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
const DEFAULT_SOURCE_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_RESYNC: Duration = Duration::from_secs(30);
const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(200);
const DEFAULT_REPLAY_LIMIT: usize = 64 * 1024;
const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// One thread serves requests unless `workers` says otherwise: a sidecar serves one agent, and a
/// second worker costs more CPU per request in cross-thread wakeups than it wins (see benches/).
const DEFAULT_WORKERS: usize = 1;
const MAX_WORKERS: u64 = 256;
/// AWS error codes that mean "this key is bad", the default `auth_failure_markers` of a route that
/// signs with SigV4 (a permission `AccessDenied` is not among them).
const AWS_AUTH_FAILURE_CODES: [&str; 5] = [
    "ExpiredToken",
    "InvalidClientTokenId",
    "UnrecognizedClientException",
    "InvalidSignatureException",
    "SignatureDoesNotMatch",
];

/// Headers keystamp manages itself; a route may not inject into them.
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
];

/// Sections read past after a structural error, at most (one per top-level key is plenty).
const MAX_STRUCTURAL_ERRORS: usize = 24;

pub fn parse(path: &Path, text: &str) -> Result<Config, Vec<ConfigError>> {
    // A section serde cannot read is reported, taken out, and the file read again, so one
    // broken section does not hide the errors of the others.
    let mut structural = Vec::new();
    let mut reading = std::borrow::Cow::Borrowed(text);
    let raw = loop {
        let deserializer = serde_norway::Deserializer::from_str(&reading);
        let error = match serde_path_to_error::deserialize::<_, RawConfig>(deserializer) {
            Ok(raw) => break Some(raw),
            Err(error) => error,
        };
        let section = error
            .path()
            .iter()
            .next()
            .and_then(|segment| match segment {
                serde_path_to_error::Segment::Map { key } => Some(key.clone()),
                _ => None,
            });
        let message = error.inner().to_string();
        let missing = message
            .strip_prefix("missing field `")
            .and_then(|rest| rest.strip_suffix('`'))
            .map(str::to_string);
        structural.push(structural_error(path, &reading, &error));
        let syntax = hints::is_yaml_syntax(&message);
        let next = match (section, missing) {
            _ if syntax || structural.len() >= MAX_STRUCTURAL_ERRORS => None,
            (Some(section), _) => recover::without_section(&reading, &section),
            (None, Some(missing)) => recover::without_section(&reading, &missing),
            (None, None) => None,
        };
        match next {
            Some(next) if next != reading.as_ref() => reading = std::borrow::Cow::Owned(next),
            _ => break None,
        }
    };
    let Some(raw) = raw else {
        return Err(structural);
    };
    let mut errors = Errors {
        file: path,
        text: &reading,
        list: structural,
    };
    let located = paths::absolute(path);
    let base = located.parent().map(Path::to_path_buf).unwrap_or_default();
    let config = errors.config(raw, &located, &base);
    match config {
        Some(config) if errors.list.is_empty() => Ok(config),
        _ => Err(errors.list),
    }
}

/// serde's error as keystamp prints it: position, key path, a message that names no value.
fn structural_error(
    path: &Path,
    text: &str,
    error: &serde_path_to_error::Error<serde_norway::Error>,
) -> ConfigError {
    let key_path = error.path().to_string();
    let inner = error.inner();
    let message = clean_serde_message(&inner.to_string(), &key_path);
    let key_path = if key_path == "." {
        "(root)".to_string()
    } else {
        key_path
    };
    let (line, column) = match inner.location() {
        Some(location) => (location.line(), location.column()),
        None => locate(text, &parse_path(&key_path)),
    };
    ConfigError {
        file: path.to_path_buf(),
        line,
        column,
        path: shown_serde_path(error.path()),
        message,
    }
}

/// serde's messages carry their own position suffix and sometimes the path; we print both
/// ourselves. Quoted values are replaced so a pasted secret is never echoed.
fn clean_serde_message(message: &str, key_path: &str) -> String {
    let mut message = message.to_string();
    if let Some(at) = message.rfind(" at line ") {
        message.truncate(at);
    }
    // The scanner repeats the position inside its own message; we print it in front.
    while let Some(at) = message.find(" at line ") {
        let rest = message.get(at + 9..).unwrap_or("");
        let end = rest.find(',').map_or(message.len(), |comma| at + 9 + comma);
        message.replace_range(at..end, "");
    }
    // serde's derive names the Rust type it expected (`struct RawCa`): say what YAML wants.
    while let Some(at) = message.find("struct Raw") {
        let end = message
            .get(at + 7..)
            .and_then(|rest| rest.find(|c: char| !c.is_ascii_alphanumeric()))
            .map_or(message.len(), |offset| at + 7 + offset);
        message.replace_range(
            at..end,
            "a mapping of keys (key: value lines, or { key: value })",
        );
    }
    // serde_norway prefixes some messages with the path of the enclosing value.
    if let Some((prefix, rest)) = message.split_once(": ") {
        if !prefix.is_empty() && key_path.starts_with(prefix) {
            message = rest.to_string();
        }
    }
    // "missing field `x`" names the schema's own key: say it, and how to write it.
    if let Some(key) = message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.strip_suffix('`'))
        .filter(|key| plausible_key(key))
    {
        return hints::missing_key(key);
    }
    // "unknown field `x`, expected one of `a`, `b`" quotes a key and the schema's own names;
    // every other message may quote a value from the file ("invalid type: integer `123...`").
    if let Some(rest) = message.strip_prefix("unknown field `") {
        // The field itself may hold backticks: the schema's part is the last "`, expected".
        let schema_part = rest
            .rfind("`, expected")
            .or_else(|| rest.rfind("`, there are no fields"));
        if let Some(at) = schema_part {
            let (field, expected) = rest.split_at(at);
            let field = if plausible_key(field) { field } else { "…" };
            let names = expected.split('`').skip(2).step_by(2);
            let suggestion = hints::did_you_mean(field, names)
                .map(|name| format!("; did you mean `{name}`?"))
                .unwrap_or_default();
            return format!("unknown field `{field}{expected}{suggestion}");
        }
    }
    if hints::is_yaml_syntax(&message) {
        return format!(
            "YAML syntax error (check the indentation and the `:`, `]` or `}}` on this line or the one before): {}",
            redact_quoted(&message, true)
        );
    }
    redact_quoted(&message, true)
}

/// A key as people write them: short, of letters, digits and `_-.:*`. Anything else, or
/// anything longer than 24 characters (a token pasted where a key goes), is not repeated in an
/// error: the line and column still point at it.
fn plausible_key(key: &str) -> bool {
    // The schema's one key longer than 24 characters.
    if key == "oauth2_client_credentials" {
        return true;
    }
    key.len() <= 24
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':' | b'*'))
}

/// serde's key path as printed, each map key judged whole (a key may itself hold dots).
fn shown_serde_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut shown = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => shown.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !shown.is_empty() {
                    shown.push('.');
                }
                shown.push_str(if plausible_key(key) { key } else { "…" });
            }
            Segment::Unknown => shown.push_str(".?"),
        }
    }
    if shown.is_empty() {
        "(root)".to_string()
    } else {
        shown
    }
}

/// The key path as printed: each segment that is not a plausible key becomes `…`.
fn shown_key_path(key_path: &str) -> String {
    key_path
        .split('.')
        .map(|segment| {
            let name = segment.split('[').next().unwrap_or(segment);
            if plausible_key(name) || segment == "(root)" {
                segment.to_string()
            } else {
                format!("…{}", segment.get(name.len()..).unwrap_or_default())
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// Replaces what serde quoted (`"..."`, and `` `...` `` when `backticks`) with an ellipsis.
fn redact_quoted(message: &str, backticks: bool) -> String {
    let mut out = String::with_capacity(message.len());
    let mut inside: Option<char> = None;
    let mut escaped = false;
    for c in message.chars() {
        let quote = c == '"' || (backticks && c == '`');
        // serde escapes quotes inside a quoted value: `\"` does not end it.
        if inside.is_some() && (escaped || c == '\\') {
            escaped = !escaped && c == '\\';
            continue;
        }
        match inside {
            Some(open) if c == open => {
                out.push('…');
                out.push(c);
                inside = None;
            }
            Some(_) => {}
            None if quote => {
                out.push(c);
                inside = Some(c);
            }
            None => out.push(c),
        }
    }
    out
}

struct Errors<'a> {
    file: &'a Path,
    text: &'a str,
    list: Vec<ConfigError>,
}

impl Errors<'_> {
    fn push(&mut self, key_path: &str, message: impl Into<String>) {
        let (line, column) = locate(self.text, &parse_path(key_path));
        self.list.push(ConfigError {
            file: self.file.to_path_buf(),
            line,
            column,
            path: shown_key_path(key_path),
            message: message.into(),
        });
    }

    fn config(&mut self, raw: RawConfig, located: &Path, base: &Path) -> Option<Config> {
        let listen = self.socket_addr("listen", &raw.listen);
        let transparent = raw
            .transparent
            .as_ref()
            .map(|transparent| self.transparent(transparent));
        let admin = raw
            .admin
            .as_deref()
            .and_then(|a| self.socket_addr("admin", a));
        let ca = self.ca(&raw.ca, base);
        let unmatched = match raw.unmatched.as_deref() {
            None | Some("deny") => Unmatched::Deny,
            Some("tunnel") => Unmatched::Tunnel,
            Some(_) => {
                self.push("unmatched", "must be `tunnel` or `deny`");
                Unmatched::Deny
            }
        };
        let extra_roots = raw
            .upstream_tls
            .extra_roots
            .iter()
            .map(|p| paths::resolve(base, p))
            .collect();
        let resolve = self.resolve(&raw.resolve);
        let breaker = self.breaker(&raw.breaker);
        let credentials = self.credentials(&raw.credentials, base, breaker, raw.fleet.is_some());
        let routes = raw
            .routes
            .iter()
            .enumerate()
            .filter_map(|(index, route)| {
                self.route(index, route, &raw.credentials, &raw.identities)
            })
            .collect();
        let shutdown_grace = match raw.shutdown_grace.as_deref() {
            None => DEFAULT_SHUTDOWN_GRACE,
            Some(text) => crate::duration::parse(text).unwrap_or_else(|message| {
                self.push("shutdown_grace", message);
                DEFAULT_SHUTDOWN_GRACE
            }),
        };
        let reload = self.reload(&raw.reload);
        let allow = raw
            .egress
            .allow_cidrs
            .iter()
            .enumerate()
            .filter_map(|(i, text)| match text.parse() {
                Ok(cidr) => Some(cidr),
                Err(message) => {
                    self.push(&format!("egress.allow_cidrs[{i}]"), message);
                    None
                }
            })
            .collect();
        let audit = match raw.audit.output.as_deref() {
            None | Some("stdout") => crate::telemetry::AuditOutput::Stdout,
            Some("off") => crate::telemetry::AuditOutput::Off,
            Some(path) => crate::telemetry::AuditOutput::File(paths::resolve(base, path)),
        };
        let mut identities = BTreeMap::new();
        for (name, identity) in &raw.identities {
            let at = format!("identities.{name}");
            if !valid_name(name) {
                self.push(
                    &at,
                    "agent names use letters, digits, `_`, `-` and `.` only",
                );
                continue;
            }
            let Some(rate_limit) = self.rate_limit(
                &format!("{at}.rate_limit"),
                identity.rate_limit.as_ref(),
                false,
            ) else {
                continue;
            };
            match self.source(&format!("{at}.source"), &identity.source, base) {
                Some(source @ (SourceSpec::File { .. } | SourceSpec::Env { .. })) => {
                    identities.insert(name.clone(), IdentitySpec { source, rate_limit });
                }
                Some(_) => self.push(
                    &format!("{at}.source"),
                    "identities take a `file` or `env` source",
                ),
                None => {}
            }
        }
        if raw.require_identity && raw.identities.is_empty() {
            self.push(
                "require_identity",
                "no `identities` are defined, so every request would be refused",
            );
        }
        let timeouts = self.timeouts(&raw.timeouts);
        let workers = self.workers(raw.workers.as_ref());
        let max_connections = raw.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
        if max_connections == 0 {
            self.push("max_connections", "must be at least 1");
        }
        let admin_token = match &raw.admin_token {
            None => None,
            Some(source) => match self.source("admin_token", source, base) {
                Some(spec @ (SourceSpec::File { .. } | SourceSpec::Env { .. })) => Some(spec),
                Some(_) => {
                    self.push(
                        "admin_token",
                        "the admin token takes a `file` or `env` source",
                    );
                    None
                }
                None => None,
            },
        };
        let fleet = raw.fleet.as_ref().and_then(|fleet| {
            if !valid_name(&fleet.name) {
                self.push(
                    "fleet.name",
                    "fleet names use letters, digits, `_`, `-` and `.` only",
                );
            }
            let url = match self.source("fleet.store.url", &fleet.store.url, base) {
                Some(spec @ (SourceSpec::File { .. } | SourceSpec::Env { .. })) => Some(spec),
                Some(_) => {
                    self.push(
                        "fleet.store.url",
                        "the store URL takes a `file` or `env` source",
                    );
                    None
                }
                None => None,
            };
            if fleet.replicas_hint == Some(0) {
                self.push("fleet.replicas_hint", "must be at least 1");
            }
            let key = match &fleet.key {
                None => Some(None),
                Some(raw) => match self.source("fleet.key", raw, base) {
                    Some(spec @ (SourceSpec::File { .. } | SourceSpec::Env { .. })) => {
                        Some(Some(spec))
                    }
                    Some(_) => {
                        self.push("fleet.key", "the fleet key takes a `file` or `env` source");
                        None
                    }
                    None => None,
                },
            };
            Some(FleetConfig {
                name: fleet.name.clone(),
                store_url: url?,
                replicas_hint: fleet.replicas_hint,
                key: key?,
                admin_token: admin_token.clone(),
            })
        });
        Some(Config {
            fleet,
            workers,
            timeouts,
            max_connections: max_connections.max(1),
            admin_token,
            audit,
            per_request_metrics: raw.metrics.per_request.unwrap_or(true),
            zero_series: raw.metrics.zero_series.unwrap_or(true),
            identities,
            require_identity: raw.require_identity,
            egress: crate::egress::EgressPolicy { allow },
            path: located.to_path_buf(),
            reload,
            listen: listen?,
            transparent: transparent.map_or(Some(None), |t| t.map(Some))?,
            admin,
            ca: ca?,
            unmatched,
            extra_roots,
            resolve,
            credentials,
            routes,
            shutdown_grace,
        })
    }

    fn socket_addr(&mut self, key: &str, text: &str) -> Option<SocketAddr> {
        match text.parse() {
            Ok(addr) => Some(addr),
            Err(_) => {
                self.push(key, "must be an IP address and port, like 127.0.0.1:3128");
                None
            }
        }
    }

    fn ca(&mut self, raw: &RawCa, base: &Path) -> Option<CaConfig> {
        let origin = match (raw.generate, &raw.cert, &raw.key) {
            (true, None, None) => CaOrigin::Generate,
            (false, Some(cert), Some(key)) => CaOrigin::Load {
                cert: paths::resolve(base, cert),
                key: paths::resolve(base, key),
            },
            (true, _, _) => {
                self.push(
                    "ca.generate",
                    "`generate: true` cannot be combined with `cert`/`key`",
                );
                return None;
            }
            (false, _, _) => {
                self.push("ca", "set `generate: true`, or both `cert` and `key`");
                return None;
            }
        };
        let leaf_cache_size = raw.leaf_cache_size.unwrap_or(DEFAULT_LEAF_CACHE);
        if leaf_cache_size == 0 {
            self.push("ca.leaf_cache_size", "must be at least 1");
        }
        Some(CaConfig {
            origin,
            cert_out: raw.cert_out.as_deref().map(|p| paths::resolve(base, p)),
            bundle_out: raw.bundle_out.as_deref().map(|p| paths::resolve(base, p)),
            leaf_cache_size: leaf_cache_size.max(1),
        })
    }

    fn resolve(&mut self, raw: &BTreeMap<String, String>) -> HashMap<(Host, u16), SocketAddr> {
        let mut pins = HashMap::new();
        for (from, to) in raw {
            let key_path = format!("resolve.{from}");
            let target = match from.rsplit_once(':') {
                Some((host, port)) if valid_host(host) => port
                    .parse::<u16>()
                    .ok()
                    .zip(Host::parse(host).ok())
                    .map(|(port, host)| (host, port)),
                _ => None,
            };
            let Some((host, port)) = target else {
                self.push(
                    &key_path,
                    "key must be host:port, like api.example.test:443",
                );
                continue;
            };
            let Some(addr) = self.socket_addr(&key_path, to) else {
                continue;
            };
            pins.insert((host, port), addr);
        }
        pins
    }

    fn credentials(
        &mut self,
        raw: &BTreeMap<String, RawCredential>,
        base: &Path,
        breaker: BreakerSettings,
        fleet: bool,
    ) -> BTreeMap<String, CredentialSpec> {
        let mut specs = BTreeMap::new();
        for (name, credential) in raw {
            let key_path = format!("credentials.{name}");
            if !valid_name(name) {
                self.push(
                    &key_path,
                    "credential names use letters, digits, `_`, `-` and `.` only",
                );
                continue;
            }
            let refresh_before = credential
                .refresh_before
                .as_deref()
                .and_then(|text| self.duration(&format!("{key_path}.refresh_before"), text));
            let Some(source) = self.source(&format!("{key_path}.source"), &credential.source, base)
            else {
                continue;
            };
            let Some(rate_limit) = self.rate_limit(
                &format!("{key_path}.rate_limit"),
                credential.rate_limit.as_ref(),
                fleet,
            ) else {
                continue;
            };
            specs.insert(
                name.clone(),
                CredentialSpec {
                    source,
                    refresh_before,
                    rate_limit,
                    breaker,
                },
            );
        }
        // A Secrets Manager source signs with another credential's keys: an `aws` one.
        for (name, spec) in &specs {
            let SourceSpec::SecretsManager(secret) = &spec.source else {
                continue;
            };
            let signer = specs.get(&secret.credential).map(|c| &c.source);
            if !matches!(signer, Some(SourceSpec::Aws(_))) {
                self.push(
                    &format!("credentials.{name}.source.aws_secrets_manager.credential"),
                    "must name an `aws` credential of this config",
                );
            }
        }
        specs
    }

    fn breaker(&mut self, raw: &RawBreaker) -> BreakerSettings {
        let defaults = BreakerSettings::default();
        let open_for = raw
            .open_for
            .as_deref()
            .and_then(|t| self.duration("breaker.open_for", t))
            .unwrap_or(defaults.open_for);
        let max_open_for = raw
            .max_open_for
            .as_deref()
            .and_then(|t| self.duration("breaker.max_open_for", t))
            .unwrap_or(defaults.max_open_for);
        let max_hold = raw
            .max_hold
            .as_deref()
            .and_then(|t| self.duration("breaker.max_hold", t))
            .unwrap_or(defaults.max_hold);
        let failures = raw.failures.unwrap_or(defaults.failures);
        if failures == 0 {
            self.push("breaker.failures", "must be at least 1");
        }
        if max_open_for < open_for {
            self.push("breaker.max_open_for", "must not be shorter than open_for");
        }
        BreakerSettings {
            failures: failures.max(1),
            open_for,
            max_open_for,
            max_hold,
            jitter: raw.jitter.unwrap_or(defaults.jitter),
        }
    }

    /// `Some(None)`: no limit set; `None`: an invalid one (reported).
    /// `fleet_allowed`: a credential's limit in a config with a `fleet:` section.
    fn rate_limit(
        &mut self,
        key_path: &str,
        raw: Option<&RawRateLimit>,
        fleet_allowed: bool,
    ) -> Option<Option<RateLimitSpec>> {
        let Some(limit) = raw else { return Some(None) };
        if limit.per_second == 0 || limit.burst == Some(0) {
            self.push(key_path, "per_second and burst must be at least 1");
            return None;
        }
        let scope = match limit.scope.as_deref() {
            None | Some("pod") => LimitScope::Pod,
            Some("fleet") if fleet_allowed => LimitScope::Fleet,
            Some("fleet") => {
                self.push(
                    &format!("{key_path}.scope"),
                    "`fleet` applies to a credential's limit, with a `fleet:` section",
                );
                return None;
            }
            Some(_) => {
                self.push(&format!("{key_path}.scope"), "must be `pod` or `fleet`");
                return None;
            }
        };
        Some(Some(RateLimitSpec {
            per_second: limit.per_second,
            burst: limit.burst.unwrap_or(limit.per_second),
            scope,
        }))
    }

    fn duration(&mut self, key_path: &str, text: &str) -> Option<Duration> {
        match crate::duration::parse(text) {
            Ok(duration) => Some(duration),
            Err(message) => {
                self.push(key_path, message);
                None
            }
        }
    }

    fn source(&mut self, at: &str, raw: &RawSource, base: &Path) -> Option<SourceSpec> {
        let set = [
            raw.file.is_some(),
            raw.env.is_some(),
            raw.command.is_some(),
            raw.oauth2_client_credentials.is_some(),
            raw.github_app.is_some(),
            raw.google_service_account.is_some(),
            raw.aws.is_some(),
            raw.vault.is_some(),
            raw.aws_secrets_manager.is_some(),
        ];
        if set.iter().filter(|s| **s).count() != 1 {
            self.push(
                at,
                "set exactly one of `file`, `env`, `command`, `oauth2_client_credentials`, \
                 `github_app`, `google_service_account`, `aws`, `vault` or `aws_secrets_manager`",
            );
            return None;
        }
        let format = match raw.format.as_deref() {
            None | Some("plain") => ValueFormat::Plain,
            Some("json") => ValueFormat::Json,
            Some(_) => {
                self.push(&format!("{at}.format"), "must be `plain` or `json`");
                return None;
            }
        };
        let timeout = match raw.timeout.as_deref() {
            Some(text) => self.duration(&format!("{at}.timeout"), text)?,
            None => DEFAULT_SOURCE_TIMEOUT,
        };
        let refresh_every = match raw.refresh_every.as_deref() {
            Some(text) => Some(self.duration(&format!("{at}.refresh_every"), text)?),
            None => None,
        };
        let only_for = |key: &str, set: bool, kinds: &str| {
            set.then(|| (format!("{at}.{key}"), format!("only applies to {kinds}")))
        };
        let is_command = raw.command.is_some();
        let is_remote = raw.oauth2_client_credentials.is_some()
            || raw.github_app.is_some()
            || raw.google_service_account.is_some()
            || raw.aws.is_some()
            || raw.vault.is_some()
            || raw.aws_secrets_manager.is_some();
        if let Some(misplaced) = [
            only_for(
                "refresh_every",
                raw.refresh_every.is_some() && !is_command,
                "`command`",
            ),
            only_for(
                "timeout",
                raw.timeout.is_some() && !is_command && !is_remote,
                "`command` and the token kinds",
            ),
            only_for(
                "format",
                raw.format.is_some() && is_remote,
                "`file`, `env` and `command`",
            ),
        ]
        .into_iter()
        .flatten()
        .next()
        {
            self.push(&misplaced.0, misplaced.1);
            return None;
        }
        if let Some(file) = &raw.file {
            if file.is_empty() {
                self.push(&format!("{at}.file"), "must be a path");
                return None;
            }
            return Some(SourceSpec::File {
                path: paths::resolve(base, file),
                format,
            });
        }
        if let Some(var) = &raw.env {
            if !valid_env_name(var) {
                self.push(
                    &format!("{at}.env"),
                    "not a valid environment variable name",
                );
                return None;
            }
            return Some(SourceSpec::Env {
                var: var.clone(),
                format,
            });
        }
        if let Some(argv) = &raw.command {
            let Some(program) = argv.first().filter(|p| !p.is_empty()) else {
                self.push(
                    &format!("{at}.command"),
                    "must list the program and its arguments",
                );
                return None;
            };
            // A relative program path (./bin/token) resolves like every other path; a bare name
            // (`vault`) is looked up on PATH.
            let program = if program.contains('/') {
                paths::resolve(base, program).display().to_string()
            } else {
                program.clone()
            };
            let argv: Vec<String> = std::iter::once(program)
                .chain(argv.iter().skip(1).cloned())
                .collect();
            return Some(SourceSpec::Command(CommandSpec {
                argv,
                format,
                refresh_every,
                timeout,
            }));
        }
        if let Some(app) = raw.github_app.as_deref() {
            return self.github_app(&format!("{at}.github_app"), app, base, timeout);
        }
        if let Some(aws) = raw.aws.as_deref() {
            return self.aws(&format!("{at}.aws"), aws, base, timeout);
        }
        if let Some(vault) = raw.vault.as_deref() {
            return self.vault(&format!("{at}.vault"), vault, base, timeout);
        }
        if let Some(secret) = raw.aws_secrets_manager.as_deref() {
            return self.secrets_manager(&format!("{at}.aws_secrets_manager"), secret, timeout);
        }
        if let Some(google) = raw.google_service_account.as_deref() {
            return self.google(
                &format!("{at}.google_service_account"),
                google,
                base,
                timeout,
            );
        }
        let oauth = raw.oauth2_client_credentials.as_deref()?;
        let at = format!("{at}.oauth2_client_credentials");
        let token_url = match oauth.token_url.parse::<http::Uri>() {
            Ok(uri)
                if matches!(uri.scheme_str(), Some("https") | Some("http"))
                    && uri.host().is_some() =>
            {
                uri
            }
            _ => {
                self.push(
                    &format!("{at}.token_url"),
                    "must be an absolute https:// (or http://) URL",
                );
                return None;
            }
        };
        let client_id = self.source(&format!("{at}.client_id"), &oauth.client_id, base);
        let client_secret = self.source(&format!("{at}.client_secret"), &oauth.client_secret, base);
        Some(SourceSpec::OAuth2(Box::new(OAuth2Spec {
            token_url,
            client_id: client_id?,
            client_secret: client_secret?,
            scopes: oauth.scopes.clone(),
            audience: oauth.audience.clone(),
            timeout,
        })))
    }

    /// A source of key material: a file or environment variable (a command would run on every
    /// mint; a token endpoint makes no sense here).
    fn key_source(&mut self, at: &str, raw: &RawSource, base: &Path) -> Option<SourceSpec> {
        match self.source(at, raw, base)? {
            spec @ (SourceSpec::File { .. } | SourceSpec::Env { .. }) => Some(spec),
            _ => {
                self.push(at, "key material takes a `file` or `env` source");
                None
            }
        }
    }

    fn google(
        &mut self,
        at: &str,
        raw: &RawGoogle,
        base: &Path,
        timeout: Duration,
    ) -> Option<SourceSpec> {
        if raw.scopes.is_empty() {
            self.push(&format!("{at}.scopes"), "list at least one OAuth scope");
        }
        if raw
            .scopes
            .iter()
            .any(|scope| scope.is_empty() || scope.contains(char::is_whitespace))
        {
            self.push(
                &format!("{at}.scopes"),
                "a scope is one word without spaces",
            );
        }
        if raw.subject.as_deref().is_some_and(|s| !s.contains('@')) {
            self.push(&format!("{at}.subject"), "must be a user's email address");
        }
        let key = self.key_source(&format!("{at}.key"), &raw.key, base)?;
        Some(SourceSpec::GoogleServiceAccount(Box::new(GoogleSpec {
            key,
            scopes: raw.scopes.clone(),
            subject: raw.subject.clone(),
            timeout,
        })))
    }

    /// `workers`: 1 unless set; `auto` is one per CPU the process may use (cgroup quota and
    /// affinity included).
    fn workers(&mut self, raw: Option<&RawWorkers>) -> usize {
        match raw {
            None => DEFAULT_WORKERS,
            Some(RawWorkers::Count(count @ 1..=MAX_WORKERS)) => *count as usize,
            Some(RawWorkers::Word(word)) if word == "auto" => {
                std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
            }
            Some(_) => {
                self.push(
                    "workers",
                    format!("must be a number from 1 to {MAX_WORKERS}, or `auto`"),
                );
                DEFAULT_WORKERS
            }
        }
    }

    fn timeouts(&mut self, raw: &RawTimeouts) -> Timeouts {
        let defaults = Timeouts::default();
        let mut read = |key: &str, text: &Option<String>, default: Duration| match text.as_deref() {
            None => default,
            Some(text) => match self.duration(&format!("timeouts.{key}"), text) {
                Some(duration) if duration.is_zero() => {
                    self.push(&format!("timeouts.{key}"), "must be more than zero");
                    default
                }
                Some(duration) => duration,
                None => default,
            },
        };
        Timeouts {
            handshake: read("handshake", &raw.handshake, defaults.handshake),
            request_head: read("request_head", &raw.request_head, defaults.request_head),
            idle: read("idle", &raw.idle, defaults.idle),
            connect: read("connect", &raw.connect, defaults.connect),
            response_head: read("response_head", &raw.response_head, defaults.response_head),
        }
    }

    fn reload(&mut self, raw: &RawReload) -> ReloadConfig {
        let resync_every = raw
            .resync_every
            .as_deref()
            .and_then(|text| self.duration("reload.resync_every", text))
            .unwrap_or(DEFAULT_RESYNC);
        let debounce = raw
            .debounce
            .as_deref()
            .and_then(|text| self.duration("reload.debounce", text))
            .unwrap_or(DEFAULT_DEBOUNCE);
        if resync_every.is_zero() {
            self.push("reload.resync_every", "must be more than zero");
        }
        ReloadConfig {
            resync_every: resync_every.max(Duration::from_millis(100)),
            debounce,
            replay_body_limit: raw.replay_body_limit.unwrap_or(DEFAULT_REPLAY_LIMIT),
        }
    }

    fn route(
        &mut self,
        index: usize,
        raw: &RawRoute,
        credentials: &BTreeMap<String, RawCredential>,
        identities: &BTreeMap<String, RawIdentity>,
    ) -> Option<RouteSpec> {
        let at = |key: &str| format!("routes[{index}].{key}");
        let errors_before = self.list.len();
        let host = parse_host_pattern(&raw.host);
        if host.is_none() {
            self.push(
                &at("host"),
                "must be a host name like api.example.test or *.example.test",
            );
        }
        self.path_prefix(&at("path_prefix"), raw.path_prefix.as_deref());
        let methods = raw
            .methods
            .as_ref()
            .map(|methods| self.methods(&at("methods"), methods));
        if raw
            .credential
            .as_ref()
            .is_some_and(|c| !credentials.contains_key(c))
        {
            self.push(&at("credential"), "no credential by this name is defined");
        }
        if raw.credential.is_none() && raw.agents.is_none() {
            self.push(
                &at("credential"),
                "a route needs a credential, or agents that each name their own",
            );
        }
        let inject = self.inject(&format!("routes[{index}].inject"), &raw.inject, &raw.host);
        let strip = raw
            .strip
            .iter()
            .enumerate()
            .filter_map(|(i, name)| match HeaderName::from_bytes(name.as_bytes()) {
                Ok(header) => Some(header),
                Err(_) => {
                    self.push(
                        &format!("routes[{index}].strip[{i}]"),
                        "not a valid header name",
                    );
                    None
                }
            })
            .collect();
        let agents = raw.agents.as_ref().map(|agents| {
            agents
                .iter()
                .map(|(agent, scope)| {
                    let at = format!("routes[{index}].agents.{agent}");
                    if !identities.contains_key(agent) {
                        self.push(&at, "no identity by this name is defined");
                    }
                    self.path_prefix(&format!("{at}.path_prefix"), scope.path_prefix.as_deref());
                    let methods = scope
                        .methods
                        .as_ref()
                        .map(|methods| self.methods(&format!("{at}.methods"), methods));
                    match &scope.credential {
                        Some(own) if !credentials.contains_key(own) => self.push(
                            &format!("{at}.credential"),
                            "no credential by this name is defined",
                        ),
                        None if raw.credential.is_none() => self.push(
                            &format!("{at}.credential"),
                            "the route has no default credential: name this agent's own",
                        ),
                        _ => {}
                    }
                    let inject = scope
                        .inject
                        .as_ref()
                        .and_then(|inject| self.inject(&format!("{at}.inject"), inject, &raw.host));
                    (
                        agent.clone(),
                        AgentScope {
                            methods,
                            path_prefix: scope.path_prefix.clone(),
                            credential: scope.credential.clone(),
                            inject,
                        },
                    )
                })
                .collect()
        });
        // SigV4 needs AWS keys, and AWS keys are no header value: each pairing must match.
        let is_aws = |name: Option<&String>| {
            name.and_then(|n| credentials.get(n))
                .is_some_and(|c| c.source.aws.is_some())
        };
        let pairings = std::iter::once((at("inject"), raw.credential.as_ref(), inject.as_ref()))
            .chain(
                agents
                    .iter()
                    .flatten()
                    .map(|(agent, scope): (&String, &AgentScope)| {
                        (
                            format!("routes[{index}].agents.{agent}"),
                            scope.credential.as_ref().or(raw.credential.as_ref()),
                            scope.inject.as_ref().or(inject.as_ref()),
                        )
                    }),
            )
            .filter(|(_, credential, _)| credential.is_some());
        let mut mismatched = Vec::new();
        for (key, credential, injection) in pairings {
            let signs = matches!(injection, Some(Injection::AwsSigV4 { .. }));
            if injection.is_some() && signs != is_aws(credential) {
                mismatched.push((key, signs));
            }
        }
        for (key, signs) in mismatched {
            let message = if signs {
                "inject type `aws_sigv4` needs an `aws` credential"
            } else {
                "an `aws` credential is used with inject type `aws_sigv4` only"
            };
            self.push(&key, message);
        }
        if self.list.len() > errors_before {
            return None;
        }
        let host = host?;
        // AWS answers 403, not 401, to a bad or expired key; these codes say it is the key.
        let mut markers = raw.auth_failure_markers.clone();
        let signs_aws = std::iter::once(inject.as_ref())
            .chain(
                agents
                    .iter()
                    .flatten()
                    .map(|(_, scope): (&String, &AgentScope)| scope.inject.as_ref()),
            )
            .any(|inject| matches!(inject, Some(Injection::AwsSigV4 { .. })));
        if signs_aws && markers.is_empty() {
            markers = AWS_AUTH_FAILURE_CODES
                .iter()
                .map(|c| c.to_string())
                .collect();
        }
        let name = raw.name.clone().unwrap_or_else(|| match &raw.path_prefix {
            Some(prefix) => format!("{host}{prefix}"),
            None => host.to_string(),
        });
        Some(RouteSpec {
            name,
            host,
            path_prefix: raw.path_prefix.clone(),
            methods,
            credential: raw.credential.clone(),
            inject: inject?,
            strip,
            respect_retry_after: raw.respect_retry_after,
            auth_failure_markers: markers,
            agents,
            tls_only: raw.tls_only.unwrap_or(true),
        })
    }

    /// Upper-case HTTP methods; each bad one is reported at its index.
    fn methods(&mut self, at: &str, list: &[String]) -> Vec<Method> {
        list.iter()
            .enumerate()
            .filter_map(|(i, text)| {
                let method = parse_method(text);
                if method.is_none() {
                    self.push(
                        &format!("{at}[{i}]"),
                        "must be an upper-case HTTP method like GET",
                    );
                }
                method
            })
            .collect()
    }

    /// A route's or an agent scope's `path_prefix`: the same rule for both.
    fn path_prefix(&mut self, at: &str, prefix: Option<&str>) {
        if prefix.is_some_and(|p| !p.starts_with('/')) {
            self.push(at, "must start with `/`");
        }
    }

    /// An `inject:` at key path `at` (a route's, or an agent's on a route for `host`).
    fn inject(&mut self, at: &str, raw: &RawInject, host: &str) -> Option<Injection> {
        let at = |key: &str| format!("{at}.{key}");
        let Some(kind) = InjectKind::parse(&raw.kind) else {
            self.push(
                &at("type"),
                "must be one of `bearer`, `basic`, `header`, `query`, `aws_sigv4`",
            );
            return None;
        };
        for (key, set) in [
            ("name", raw.name.is_some()),
            ("value", raw.value.is_some()),
            ("username", raw.username.is_some()),
            ("service", raw.service.is_some()),
            ("region", raw.region.is_some()),
        ] {
            if set && !kind.keys().contains(&key) {
                self.push(
                    &at(key),
                    format!("not used by inject type `{}`", kind.name()),
                );
                return None;
            }
        }
        match kind {
            InjectKind::Bearer => Some(Injection::Bearer),
            InjectKind::Basic => {
                let username = raw.username.clone().unwrap_or_default();
                if username.contains(':') || username.chars().any(char::is_control) {
                    self.push(
                        &at("username"),
                        "must not contain `:` or control characters",
                    );
                    return None;
                }
                Some(Injection::Basic { username })
            }
            InjectKind::Header => {
                let Some(name) = raw.name.as_deref() else {
                    self.push(&at("type"), "inject type `header` needs `name`");
                    return None;
                };
                let header = match HeaderName::from_bytes(name.as_bytes()) {
                    Ok(h) if !RESERVED_HEADERS.contains(&h.as_str()) => h,
                    Ok(_) => {
                        self.push(&at("name"), "keystamp manages this header itself");
                        return None;
                    }
                    Err(_) => {
                        self.push(&at("name"), "not a valid header name");
                        return None;
                    }
                };
                let template = raw.value.clone().unwrap_or_else(|| "{secret}".to_string());
                if !template.contains("{secret}") {
                    self.push(&at("value"), "must contain `{secret}`");
                    return None;
                }
                if template.chars().any(char::is_control) {
                    self.push(&at("value"), "must not contain control characters");
                    return None;
                }
                Some(Injection::Header {
                    name: header,
                    template,
                })
            }
            InjectKind::Query => {
                let name = raw.name.clone().unwrap_or_default();
                if name.is_empty() || name.contains(['&', '=', '#', ' ']) {
                    self.push(&at("name"), "inject type `query` needs a parameter `name`");
                    return None;
                }
                Some(Injection::Query { name })
            }
            InjectKind::AwsSigV4 => {
                let inferred = crate::sigv4::scope_of_host(host);
                let service = raw
                    .service
                    .clone()
                    .or_else(|| inferred.as_ref().map(|(s, _)| s.clone()));
                let region = raw
                    .region
                    .clone()
                    .or_else(|| inferred.as_ref().map(|(_, r)| r.clone()));
                let valid = |text: &str| {
                    !text.is_empty()
                        && text
                            .chars()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                };
                match (service, region) {
                    (Some(service), Some(region)) if valid(&service) && valid(&region) => {
                        Some(Injection::AwsSigV4 { service, region })
                    }
                    (Some(_), Some(_)) => {
                        self.push(
                            &at("service"),
                            "service and region are lowercase names like `s3` and `us-east-1`",
                        );
                        None
                    }
                    _ => {
                        self.push(
                            &at("type"),
                            "set `service` and `region`: this host is not a standard AWS endpoint",
                        );
                        None
                    }
                }
            }
        }
    }
}

/// `inject.type`, parsed once; every later decision matches on this, never on the string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InjectKind {
    Bearer,
    Basic,
    Header,
    Query,
    AwsSigV4,
}

impl InjectKind {
    fn parse(text: &str) -> Option<Self> {
        match text {
            "bearer" => Some(Self::Bearer),
            "basic" => Some(Self::Basic),
            "header" => Some(Self::Header),
            "query" => Some(Self::Query),
            "aws_sigv4" => Some(Self::AwsSigV4),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Bearer => "bearer",
            Self::Basic => "basic",
            Self::Header => "header",
            Self::Query => "query",
            Self::AwsSigV4 => "aws_sigv4",
        }
    }

    /// The `inject` keys this type reads; any other is an error.
    fn keys(self) -> &'static [&'static str] {
        match self {
            Self::Bearer => &[],
            Self::Basic => &["username"],
            Self::Header => &["name", "value"],
            Self::Query => &["name"],
            Self::AwsSigV4 => &["service", "region"],
        }
    }
}

/// An upper-case HTTP method (`GET`, `PATCH`, an extension method like `PROPFIND`).
fn parse_method(text: &str) -> Option<Method> {
    let upper = !text.is_empty() && text.bytes().all(|b| b.is_ascii_uppercase());
    upper
        .then(|| Method::from_bytes(text.as_bytes()).ok())
        .flatten()
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

fn valid_env_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn valid_host(host: &str) -> bool {
    if host.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Parses a route's `host:`. Exported for the route table's tests.
pub fn parse_host_pattern(text: &str) -> Option<HostPattern> {
    let text = text.to_ascii_lowercase();
    if let Some(suffix) = text.strip_prefix("*.") {
        return valid_host(suffix).then(|| HostPattern::Wildcard(format!(".{suffix}")));
    }
    if !valid_host(&text) {
        return None;
    }
    Host::parse(&text).ok().map(HostPattern::Exact)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASTED: &str = "sk-pasted-9f8e7d";

    #[test]
    fn every_rejected_value_is_reported_once_and_never_echoed() {
        let yaml = format!(
            "listen: {PASTED}\nca: {{ generate: true }}\nunmatched: {PASTED}\nshutdown_grace: {PASTED}\n\
             egress: {{ allow_cidrs: [{PASTED}] }}\n\
             credentials:\n  k: {{ source: {{ env: K }}, refresh_before: {PASTED} }}\n\
             routes:\n  - host: a.test\n    credential: {PASTED}\n    methods: [GET, {PASTED}]\n    \
             inject: {{ type: {PASTED} }}\n"
        );
        let errors = parse(Path::new("/t/k.yaml"), &yaml).unwrap_err();
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        for expected in [
            "listen",
            "unmatched",
            "shutdown_grace",
            "egress.allow_cidrs[0]",
            "credentials.k.refresh_before",
            "routes[0].credential",
            "routes[0].methods[1]",
            "routes[0].inject.type",
        ] {
            assert!(
                paths.contains(&expected),
                "{expected} missing from {paths:?}"
            );
        }
        for error in &errors {
            assert!(!error.to_string().contains(PASTED), "{error}");
        }
    }

    #[test]
    fn serde_type_errors_do_not_echo_the_value_either() {
        // Found by fuzz/config: serde quotes numbers in backticks.
        for text in [
            "-1698388888888888769838888888",
            "listen: 1698388888888888769838\nca: 7\n",
            "\np\n\"\r?\r5+ \r:'[8?:[r\n169838888888OOOOOOO\t\t",
            "{p\n\n*vvvvvvvvvv169838888888vvvvv270F",
            "listen: 127.0.0.1:1\nca: { generate: true }\ncredentials: { 'sk 169838888888/x': { source: { env: K } } }\n",
        ] {
            let errors = parse(Path::new("/t/k.yaml"), text).unwrap_err();
            assert!(!errors[0].to_string().contains("169838888888"), "{}", errors[0]);
        }
    }

    #[test]
    fn aws_sessions_per_caller_take_the_task_limit_keys() {
        let config = |session_name: &str| {
            format!(
                "listen: 127.0.0.1:0\nca: {{ generate: true }}\ncredentials:\n  k:\n    source:\n      aws:\n        \
                 access_key_id: {{ env: A }}\n        secret_access_key: {{ env: S }}\n        assume_role:\n          \
                 role_arn: arn:aws:iam::123456789012:role/agents\n          session_name: {session_name}\n          \
                 max_tasks: 1000\n          max_tasks_per_agent: 1000\n          mint_rate: {{ per_second: 50 }}\n\
                 routes: []\n"
            )
        };
        let parsed = parse(Path::new("/t/k.yaml"), &config("ks-{task}")).unwrap();
        let sessions = parsed.credentials["k"].source.per_task().unwrap();
        assert_eq!((sessions.max_tasks, sessions.max_per_agent), (1000, 1000));
        assert_eq!((sessions.mint_per_second, sessions.mint_burst), (50, 50));
        assert_eq!(sessions.idle, Duration::from_secs(600));

        let errors = parse(Path::new("/t/k.yaml"), &config("ks-fixed")).unwrap_err();
        assert_eq!(
            errors[0].path,
            "credentials.k.source.aws.assume_role.session_name"
        );
        assert_eq!(errors[0].line, 11, "{}", errors[0]);
    }

    #[test]
    fn route_and_agent_scope_share_the_method_and_prefix_rules() {
        let yaml = "listen: 127.0.0.1:0\nca: { generate: true }\n\
             identities: { r: { source: { env: R } } }\n\
             credentials: { k: { source: { env: K } } }\n\
             routes:\n  - host: a.test\n    credential: k\n    inject: { type: bearer }\n    \
             path_prefix: v1\n    methods: [get]\n    agents: { r: { methods: [get], path_prefix: v1 } }\n";
        let errors = parse(Path::new("/t/k.yaml"), yaml).unwrap_err();
        let shown: Vec<(String, String)> = errors
            .iter()
            .map(|e| (e.path.clone(), e.message.clone()))
            .collect();
        let message = |path: &str| {
            shown
                .iter()
                .find(|(p, _)| p == path)
                .map(|(_, m)| m.clone())
                .unwrap_or_else(|| panic!("{path} missing from {shown:?}"))
        };
        assert_eq!(
            message("routes[0].methods[0]"),
            message("routes[0].agents.r.methods[0]")
        );
        assert_eq!(
            message("routes[0].path_prefix"),
            message("routes[0].agents.r.path_prefix")
        );
    }
}
