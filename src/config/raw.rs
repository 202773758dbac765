//! The YAML schema exactly as users write it. Every struct denies unknown keys; values stay
//! strings here and are checked in `validate.rs`, so one pass can report every problem at once.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub listen: String,
    #[serde(default)]
    pub admin: Option<String>,
    /// Connections redirected to keystamp by netfilter (see `keystamp netfilter`).
    #[serde(default)]
    pub transparent: Option<RawTransparent>,
    pub ca: RawCa,
    #[serde(default)]
    pub unmatched: Option<String>,
    #[serde(default)]
    pub upstream_tls: RawUpstreamTls,
    #[serde(default)]
    pub resolve: BTreeMap<String, String>,
    #[serde(default)]
    pub credentials: BTreeMap<String, RawCredential>,
    #[serde(default)]
    pub routes: Vec<RawRoute>,
    #[serde(default)]
    pub shutdown_grace: Option<String>,
    #[serde(default)]
    pub reload: RawReload,
    #[serde(default)]
    pub breaker: RawBreaker,
    #[serde(default)]
    pub egress: RawEgress,
    #[serde(default)]
    pub audit: RawAudit,
    #[serde(default)]
    pub metrics: RawMetrics,
    /// Agents by name, each with the token it presents as `NAME:TOKEN` in the proxy URL.
    #[serde(default)]
    pub identities: BTreeMap<String, RawIdentity>,
    #[serde(default)]
    pub require_identity: bool,
    #[serde(default)]
    pub timeouts: RawTimeouts,
    /// Agent connections served at once; more are refused with a 503 and counted.
    #[serde(default)]
    pub max_connections: Option<usize>,
    /// A token (file or env source) the admin listener's POST endpoints require as a bearer.
    #[serde(default)]
    pub admin_token: Option<RawSource>,
    /// Share per-credential state with the other sidecars of a fleet through Redis/Valkey.
    #[serde(default)]
    pub fleet: Option<RawFleet>,
    /// Threads serving requests: a count, or `auto` for one per CPU the process may use.
    #[serde(default)]
    pub workers: Option<RawWorkers>,
}

/// `workers: 2` or `workers: auto`. Deserialized by hand, not `untagged`: its error then says
/// what is accepted instead of naming a Rust type.
#[derive(Debug)]
pub enum RawWorkers {
    Count(u64),
    Word(String),
}

impl<'de> Deserialize<'de> for RawWorkers {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer
            .deserialize_any(NumberOrWord {
                expecting: "a number of threads, or the word auto",
            })
            .map(|either| match either {
                Either::Number(n) => RawWorkers::Count(n),
                Either::Word(w) => RawWorkers::Word(w),
            })
    }
}

/// A whole number or a word, the two forms the schema's ids and counts accept.
enum Either {
    Number(u64),
    Word(String),
}

struct NumberOrWord {
    expecting: &'static str,
}

impl serde::de::Visitor<'_> for NumberOrWord {
    type Value = Either;

    fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.expecting)
    }

    fn visit_u64<E: serde::de::Error>(self, value: u64) -> Result<Either, E> {
        Ok(Either::Number(value))
    }

    fn visit_i64<E: serde::de::Error>(self, value: i64) -> Result<Either, E> {
        u64::try_from(value)
            .map(Either::Number)
            .map_err(|_| E::custom(format!("expected {}", self.expecting)))
    }

    fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<Either, E> {
        Ok(Either::Word(value.to_string()))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFleet {
    /// Isolates fleets sharing one store; every key and channel is prefixed with it.
    pub name: String,
    pub store: RawFleetStore,
    /// Authenticates every message and index entry keystamp writes to the store (HMAC).
    #[serde(default)]
    pub key: Option<RawSource>,
    /// Pods expected when none has been seen yet (degraded mode).
    #[serde(default)]
    pub replicas_hint: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFleetStore {
    /// `redis://` or `rediss://`, from a file or env source (it may hold a password).
    pub url: RawSource,
}

/// How long each side may hold keystamp waiting.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTimeouts {
    /// From a CONNECT's 200 to the agent's TLS handshake done (or first plain byte).
    #[serde(default)]
    pub handshake: Option<String>,
    /// An agent's request head, HTTP/1.1.
    #[serde(default)]
    pub request_head: Option<String>,
    /// An agent connection with no request in flight.
    #[serde(default)]
    pub idle: Option<String>,
    /// Upstream DNS, TCP and TLS together.
    #[serde(default)]
    pub connect: Option<String>,
    /// From sending a request upstream to its status line.
    #[serde(default)]
    pub response_head: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAudit {
    /// `stdout` (default), `off`, or a file path.
    #[serde(default)]
    pub output: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    /// Per-request counters and histograms (default true).
    #[serde(default)]
    pub per_request: Option<bool>,
    /// Each credential's counters from load at 0 (default true), or only once they count.
    #[serde(default)]
    pub zero_series: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIdentity {
    pub source: RawSource,
    /// Requests per second this agent may make through keystamp (on stamped routes).
    #[serde(default)]
    pub rate_limit: Option<RawRateLimit>,
}

/// What one agent may do on a route.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAgentScope {
    #[serde(default)]
    pub methods: Option<Vec<String>>,
    #[serde(default)]
    pub path_prefix: Option<String>,
    /// This agent's own credential on the route (default: the route's).
    #[serde(default)]
    pub credential: Option<String>,
    /// How this agent's credential is injected, when it differs from the route's.
    #[serde(default)]
    pub inject: Option<RawInject>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEgress {
    /// Internal ranges keystamp may dial anyway, e.g. `10.20.0.0/16` for an in-cluster API.
    #[serde(default)]
    pub allow_cidrs: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBreaker {
    #[serde(default)]
    pub failures: Option<u32>,
    #[serde(default)]
    pub open_for: Option<String>,
    #[serde(default)]
    pub max_open_for: Option<String>,
    #[serde(default)]
    pub max_hold: Option<String>,
    #[serde(default)]
    pub jitter: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    pub per_second: u32,
    #[serde(default)]
    pub burst: Option<u32>,
    /// `pod` (default): this sidecar's own bucket; `fleet`: one bucket for the whole fleet.
    #[serde(default)]
    pub scope: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCa {
    #[serde(default)]
    pub generate: bool,
    #[serde(default)]
    pub cert: Option<String>,
    #[serde(default)]
    pub key: Option<String>,
    #[serde(default)]
    pub cert_out: Option<String>,
    /// System roots plus the pod CA, one PEM file, for runtimes that take a single bundle.
    #[serde(default)]
    pub bundle_out: Option<String>,
    #[serde(default)]
    pub leaf_cache_size: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstreamTls {
    #[serde(default)]
    pub extra_roots: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCredential {
    pub source: RawSource,
    /// Refresh this long before expiry instead of the default rule.
    #[serde(default)]
    pub refresh_before: Option<String>,
    #[serde(default)]
    pub rate_limit: Option<RawRateLimit>,
}

/// Exactly one of `file`, `env`, `command`, `oauth2_client_credentials`, `github_app`,
/// `google_service_account` must be set;
/// `validate.rs` says so when not.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSource {
    #[serde(default)]
    pub file: Option<String>,
    #[serde(default)]
    pub env: Option<String>,
    /// argv, run without a shell.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    #[serde(default)]
    pub oauth2_client_credentials: Option<Box<RawOauth2>>,
    #[serde(default)]
    pub github_app: Option<Box<RawGithubApp>>,
    #[serde(default)]
    pub google_service_account: Option<Box<RawGoogle>>,
    #[serde(default)]
    pub aws: Option<Box<RawAws>>,
    #[serde(default)]
    pub vault: Option<Box<RawVault>>,
    #[serde(default)]
    pub aws_secrets_manager: Option<Box<RawSecretsManager>>,
    /// `plain` (default) or `json` (`{"token": "...", "expires_at": "<RFC 3339>"}`).
    #[serde(default)]
    pub format: Option<String>,
    /// For `command`: re-run this often even without an expiry.
    #[serde(default)]
    pub refresh_every: Option<String>,
    /// For `command`, `oauth2_client_credentials`, `github_app`, `google_service_account`.
    #[serde(default)]
    pub timeout: Option<String>,
}

/// A number or a string: GitHub shows app and installation ids as numbers, YAML users quote them.
#[derive(Debug)]
pub enum RawId {
    Number(u64),
    Text(String),
}

impl<'de> Deserialize<'de> for RawId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer
            .deserialize_any(NumberOrWord {
                expecting:
                    "a positive integer (GitHub shows it in the app's or installation's URL)",
            })
            .map(|either| match either {
                Either::Number(n) => RawId::Number(n),
                Either::Word(w) => RawId::Text(w),
            })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGithubApp {
    pub app_id: RawId,
    pub private_key: RawSource,
    pub installation_id: RawId,
    #[serde(default)]
    pub api_url: Option<String>,
    #[serde(default)]
    pub repositories: Vec<String>,
    #[serde(default)]
    pub permissions: BTreeMap<String, String>,
    /// `shared` (default) or `per_task`.
    #[serde(default)]
    pub mint: Option<String>,
    #[serde(default)]
    pub task_idle: Option<String>,
    #[serde(default)]
    pub max_tasks: Option<usize>,
    #[serde(default)]
    pub max_tasks_per_agent: Option<usize>,
    #[serde(default)]
    pub mint_rate: Option<RawMintRate>,
}

/// `mint_rate: { per_second, burst }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMintRate {
    pub per_second: u32,
    #[serde(default)]
    pub burst: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAws {
    #[serde(default)]
    pub access_key_id: Option<RawSource>,
    #[serde(default)]
    pub secret_access_key: Option<RawSource>,
    #[serde(default)]
    pub session_token: Option<RawSource>,
    #[serde(default)]
    pub web_identity: Option<RawWebIdentity>,
    #[serde(default)]
    pub assume_role: Option<RawAssumeRole>,
    #[serde(default)]
    pub sts_endpoint: Option<String>,
    #[serde(default)]
    pub sts_region: Option<String>,
}

/// Every key optional: the EKS convention (`AWS_ROLE_ARN`, `AWS_WEB_IDENTITY_TOKEN_FILE`) fills in.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWebIdentity {
    #[serde(default)]
    pub role_arn: Option<String>,
    #[serde(default)]
    pub token: Option<RawSource>,
    #[serde(default)]
    pub session_name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAssumeRole {
    pub role_arn: String,
    #[serde(default)]
    pub session_name: Option<String>,
    #[serde(default)]
    pub duration: Option<String>,
    /// A policy document, as YAML or as a JSON string.
    #[serde(default)]
    pub policy: Option<serde_json::Value>,
    #[serde(default)]
    pub external_id: Option<String>,
    /// Per-caller sessions (a `session_name` naming `{agent}` or `{task}`): as `github_app`'s.
    #[serde(default)]
    pub task_idle: Option<String>,
    #[serde(default)]
    pub max_tasks: Option<usize>,
    #[serde(default)]
    pub max_tasks_per_agent: Option<usize>,
    #[serde(default)]
    pub mint_rate: Option<RawMintRate>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGoogle {
    /// The service-account JSON key file.
    pub key: RawSource,
    pub scopes: Vec<String>,
    #[serde(default)]
    pub subject: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOauth2 {
    pub token_url: String,
    pub client_id: RawSource,
    pub client_secret: RawSource,
    #[serde(default)]
    pub scopes: Vec<String>,
    #[serde(default)]
    pub audience: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawReload {
    /// Re-read every source this often, as a backstop for lost file events (default 30s).
    #[serde(default)]
    pub resync_every: Option<String>,
    /// Wait this long after a file event before re-reading (default 200ms).
    #[serde(default)]
    pub debounce: Option<String>,
    /// Largest request body kept to replay after a 401 (default 64 KiB).
    #[serde(default)]
    pub replay_body_limit: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    #[serde(default)]
    pub name: Option<String>,
    pub host: String,
    #[serde(default)]
    pub path_prefix: Option<String>,
    #[serde(default)]
    pub methods: Option<Vec<String>>,
    /// The default credential; without one, only agents naming their own may use the route.
    #[serde(default)]
    pub credential: Option<String>,
    pub inject: RawInject,
    #[serde(default)]
    pub strip: Vec<String>,
    /// Hold the credential's traffic when the upstream answers 429 with `Retry-After`.
    #[serde(default)]
    pub respect_retry_after: bool,
    /// Strings that mark a 403 as "this credential is bad" (in a header value or the body's
    /// first KiB), e.g. AWS `InvalidClientTokenId`.
    #[serde(default)]
    pub auth_failure_markers: Vec<String>,
    /// Only these agents may use the route, each optionally narrowed further.
    #[serde(default)]
    pub agents: Option<BTreeMap<String, RawAgentScope>>,
    /// Stamp only requests that arrived over TLS (default true); `false` opts into plain HTTP.
    #[serde(default)]
    pub tls_only: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawInject {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub value: Option<String>,
    #[serde(default)]
    pub username: Option<String>,
    /// For `aws_sigv4`: the signing name and region (read from a standard AWS host if unset).
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub region: Option<String>,
}

/// `vault: { address, auth: { token | jwt | kubernetes }, kv: { mount, path, field }, poll }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVault {
    pub address: String,
    pub auth: RawVaultAuth,
    #[serde(default)]
    pub kv: Option<RawVaultKv>,
    #[serde(default)]
    pub dynamic: Option<RawVaultDynamic>,
    #[serde(default)]
    pub poll: Option<String>,
    /// Vault Enterprise / OpenBao namespace (`X-Vault-Namespace`).
    #[serde(default)]
    pub namespace: Option<String>,
}

/// Exactly one way to log in.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVaultAuth {
    #[serde(default)]
    pub token: Option<RawSource>,
    #[serde(default)]
    pub jwt: Option<RawVaultLogin>,
    #[serde(default)]
    pub kubernetes: Option<RawVaultLogin>,
}

/// A role login with a JWT (a projected service-account token).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVaultLogin {
    pub role: String,
    pub token: RawSource,
    #[serde(default)]
    pub mount: Option<String>,
}

/// A KV version 2 secret and the field of it that is the credential.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVaultKv {
    #[serde(default)]
    pub mount: Option<String>,
    pub path: String,
    pub field: String,
}

/// `aws_secrets_manager: { secret_id, field, region, credential, endpoint, poll }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSecretsManager {
    pub secret_id: String,
    #[serde(default)]
    pub field: Option<String>,
    pub region: String,
    /// The name of an `aws` credential of this config, whose keys sign the calls.
    pub credential: String,
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub poll: Option<String>,
}

/// A secret with a lease (`database/creds/agent`, any engine that returns one).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVaultDynamic {
    pub path: String,
    pub field: String,
}

/// `transparent: { listen, uid, ports, lockdown }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTransparent {
    #[serde(default)]
    pub listen: Option<String>,
    /// The uid keystamp runs as: its own connections are never redirected.
    pub uid: u32,
    /// TCP ports redirected; every TCP port when omitted.
    #[serde(default)]
    pub ports: Option<Vec<u16>>,
    #[serde(default)]
    pub lockdown: Option<bool>,
}
