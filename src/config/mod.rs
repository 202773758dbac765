//! Configuration: read a YAML file, parse it strictly (`raw.rs`), and turn it into validated,
//! typed values (`validate.rs`). Every error names the file, line, column and key path, and never
//! echoes a value from the file: a credential may have been pasted into it by mistake.

mod locate;
mod paths;
mod raw;
mod validate;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderName, Method};

use crate::host::Host;

/// A validated configuration. Paths in it are absolute (resolved against the file's directory).
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub listen: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub transparent: Option<TransparentConfig>,
    pub ca: CaConfig,
    pub unmatched: Unmatched,
    pub extra_roots: Vec<PathBuf>,
    pub resolve: HashMap<(Host, u16), SocketAddr>,
    pub credentials: BTreeMap<String, CredentialSpec>,
    pub routes: Vec<RouteSpec>,
    pub shutdown_grace: Duration,
    pub reload: ReloadConfig,
    pub egress: crate::egress::EgressPolicy,
    pub audit: crate::telemetry::AuditOutput,
    pub per_request_metrics: bool,
    /// Write each credential's counters before they count anything (`metrics.zero_series`).
    pub zero_series: bool,
    /// Agent name -> where its proxy token comes from (file or env).
    pub identities: BTreeMap<String, IdentitySpec>,
    pub require_identity: bool,
    pub timeouts: Timeouts,
    pub max_connections: usize,
    /// The bearer token the admin listener's POST endpoints require, when set.
    pub admin_token: Option<SourceSpec>,
    /// Fleet-wide state through Redis/Valkey; `None`: this pod alone (the default).
    pub fleet: Option<FleetConfig>,
    /// Threads that serve requests (the runtime's workers). Read at start.
    pub workers: usize,
}

/// A fleet of sidecars sharing per-credential state through one store. Read at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetConfig {
    pub name: String,
    /// Where the store's URL comes from (`file` or `env`): it may hold a password.
    pub store_url: SourceSpec,
    pub replicas_hint: Option<u32>,
    /// The fleet key (`file` or `env`): seals what goes through the store.
    pub key: Option<SourceSpec>,
    /// The admin token, which proves an operator's switch to the other pods.
    pub admin_token: Option<SourceSpec>,
}

/// How long each side may hold keystamp waiting. Read at start; a reload does not change them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub handshake: Duration,
    pub request_head: Duration,
    pub idle: Duration,
    pub connect: Duration,
    pub response_head: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            handshake: Duration::from_secs(10),
            request_head: Duration::from_secs(30),
            idle: Duration::from_secs(300),
            connect: Duration::from_secs(10),
            response_head: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Clone)]
pub struct CaConfig {
    pub origin: CaOrigin,
    /// Where to write the CA certificate (PEM) for agents to trust.
    pub cert_out: Option<PathBuf>,
    /// Where to write the system roots plus the CA, for SSL_CERT_FILE / REQUESTS_CA_BUNDLE.
    pub bundle_out: Option<PathBuf>,
    pub leaf_cache_size: usize,
}

#[derive(Debug, Clone)]
pub enum CaOrigin {
    /// A fresh CA in memory; its key is never written anywhere.
    Generate,
    Load {
        cert: PathBuf,
        key: PathBuf,
    },
}

/// What happens to a CONNECT (or plain request) for a host with no route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmatched {
    Tunnel,
    Deny,
}

impl fmt::Display for Unmatched {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Unmatched::Tunnel => "tunnel",
            Unmatched::Deny => "deny",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialSpec {
    pub source: SourceSpec,
    pub refresh_before: Option<Duration>,
    pub rate_limit: Option<RateLimitSpec>,
    /// From the top-level `breaker:`; part of the spec so a change builds a fresh breaker.
    pub breaker: BreakerSettings,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitSpec {
    pub per_second: u32,
    pub burst: u32,
    pub scope: LimitScope,
}

/// Whose bucket a rate limit is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitScope {
    /// This sidecar's own.
    Pod,
    /// One bucket in the fleet store, shared by every sidecar of the fleet.
    Fleet,
}

/// The auth circuit breaker's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Consecutive auth failures that open it.
    pub failures: u32,
    /// The first open period; doubles on each failed probe.
    pub open_for: Duration,
    pub max_open_for: Duration,
    /// The longest an upstream's `Retry-After` (or a fleet hold) may stop this credential.
    pub max_hold: Duration,
    /// Spread open periods by ±20 % (tests switch it off).
    pub jitter: bool,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        Self {
            failures: 5,
            open_for: Duration::from_secs(30),
            max_open_for: Duration::from_secs(300),
            max_hold: Duration::from_secs(3600),
            jitter: true,
        }
    }
}

/// Where a secret comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSpec {
    File { path: PathBuf, format: ValueFormat },
    Env { var: String, format: ValueFormat },
    Command(CommandSpec),
    OAuth2(Box<OAuth2Spec>),
    GithubApp(Box<GithubAppSpec>),
    GoogleServiceAccount(Box<GoogleSpec>),
    Aws(Box<AwsSpec>),
    Vault(Box<VaultSpec>),
    SecretsManager(Box<SecretsManagerSpec>),
}

/// The transparent listener and the netfilter rules that feed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransparentConfig {
    pub listen: SocketAddr,
    /// keystamp's own uid: its connections (upstream dials) are never redirected.
    pub uid: u32,
    /// Redirected TCP ports; `None`: every TCP port.
    pub ports: Option<Vec<u16>>,
    /// Drop every other outbound packet of the other uids (UDP, QUIC, IPv6 included).
    pub lockdown: bool,
}

/// A secret read from AWS Secrets Manager, signed with another credential's AWS keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretsManagerSpec {
    pub secret_id: String,
    /// For a JSON secret: the field that is the credential; `None`: the whole `SecretString`.
    pub field: Option<String>,
    pub region: String,
    /// `https://secretsmanager.<region>.amazonaws.com/` unless set.
    pub endpoint: http::Uri,
    /// The `aws` credential whose keys sign the calls (IRSA, assume_role... as on routes).
    pub credential: String,
    pub poll: Duration,
    pub timeout: Duration,
}

/// A secret read from Vault or OpenBao (same HTTP API).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VaultSpec {
    /// `https://vault.internal:8200` (http only for a dev server).
    pub address: http::Uri,
    pub namespace: Option<String>,
    pub auth: VaultAuth,
    pub secret: VaultSecret,
    /// How often the secret's metadata is checked for a new version.
    pub poll: Duration,
    pub timeout: Duration,
}

/// How keystamp gets a Vault token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VaultAuth {
    /// A Vault token from any source, used as it is (renewed while it can be).
    Token(SourceSpec),
    /// `POST auth/<mount>/login {role, jwt}`: the JWT auth method (`jwt`) or Kubernetes
    /// TokenReview (`kubernetes`), both with a projected service-account token.
    Login {
        method: VaultLoginMethod,
        mount: String,
        role: String,
        jwt: SourceSpec,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VaultLoginMethod {
    Jwt,
    Kubernetes,
}

/// What is read: a KV v2 field (watched by version), or a field of a leased dynamic secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VaultSecret {
    Kv(VaultKv),
    Dynamic { path: String, field: String },
}

/// A field of a KV version 2 secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VaultKv {
    pub mount: String,
    pub path: String,
    pub field: String,
}

/// How a source's bytes hold the secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueFormat {
    /// The whole value (one trailing newline stripped).
    Plain,
    /// `{"token": "...", "expires_at": "<RFC 3339>"}`.
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandSpec {
    pub argv: Vec<String>,
    pub format: ValueFormat,
    pub refresh_every: Option<Duration>,
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuth2Spec {
    pub token_url: http::Uri,
    pub client_id: SourceSpec,
    pub client_secret: SourceSpec,
    pub scopes: Vec<String>,
    pub audience: Option<String>,
    pub timeout: Duration,
}

/// A GitHub App installation token, minted and narrowed by keystamp.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GithubAppSpec {
    pub app_id: String,
    /// The app's PEM private key (PKCS#1 as GitHub issues it, or PKCS#8).
    pub private_key: SourceSpec,
    pub installation_id: u64,
    /// Without a trailing slash, e.g. `https://api.github.com`.
    pub api_url: http::Uri,
    /// Repository names the token is narrowed to; empty: every repository of the installation.
    pub repositories: Vec<String>,
    /// Permission name -> `read` / `write` / `admin`; empty: the installation's own.
    pub permissions: BTreeMap<String, String>,
    pub mint: MintMode,
    pub timeout: Duration,
}

/// Whether a minted credential is one token for every caller, or one per agent and task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MintMode {
    Shared,
    PerTask(TaskTokenSettings),
}

/// How many tokens minted per caller may live, and how fast new ones may be minted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskTokenSettings {
    /// Revoke a task's token after this long without requests.
    pub idle: Duration,
    /// Task tokens alive at once; the least recently used is revoked first.
    pub max_tasks: usize,
    /// Task tokens one agent may hold at once; past it its new tasks get 429 `mint_limited`.
    pub max_per_agent: usize,
    /// Mints per second (steady) and at once (burst) for the whole credential: a provider
    /// rate-limits minting per app, so one agent cycling task ids must not lock out the rest.
    pub mint_per_second: u32,
    pub mint_burst: u32,
}

impl TaskTokenSettings {
    pub const DEFAULT_MAX_PER_AGENT: usize = 32;
    pub const DEFAULT_MINT_PER_SECOND: u32 = 2;
    pub const DEFAULT_MINT_BURST: u32 = 10;
}

/// AWS keys: static, or from STS (web identity, an assumed role, or both).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsSpec {
    pub base: AwsBase,
    pub assume_role: Option<AssumeRoleSpec>,
    /// The STS endpoint, e.g. `https://sts.amazonaws.com` or a regional one.
    pub sts_url: http::Uri,
    /// The region STS calls are signed for.
    pub sts_region: String,
    pub timeout: Duration,
}

/// The keys an `aws` credential starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AwsBase {
    Static {
        access_key_id: SourceSpec,
        secret_access_key: SourceSpec,
        session_token: Option<SourceSpec>,
    },
    /// `AssumeRoleWithWebIdentity` with a projected token (EKS IRSA), kept fresh by its rotation.
    WebIdentity {
        role_arn: String,
        token: SourceSpec,
        session_name: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssumeRoleSpec {
    pub role_arn: String,
    /// May hold `{agent}` and `{task}`: then each (agent, task) gets its own session.
    pub session_name: String,
    pub duration: Duration,
    /// An inline session policy (JSON): the session gets the intersection with the role's.
    pub policy: Option<String>,
    pub external_id: Option<String>,
    /// How many per-caller sessions may live and how fast they are minted (used when
    /// [`per_caller`](Self::per_caller)).
    pub sessions: TaskTokenSettings,
}

impl AssumeRoleSpec {
    /// Whether each (agent, task) needs a session of its own.
    pub fn per_caller(&self) -> bool {
        self.session_name.contains("{agent}") || self.session_name.contains("{task}")
    }
}

/// A Google access token from a service-account key (RFC 7523 JWT-bearer grant).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoogleSpec {
    /// The service-account JSON key file Google issues.
    pub key: SourceSpec,
    pub scopes: Vec<String>,
    /// A user to impersonate (domain-wide delegation).
    pub subject: Option<String>,
    pub timeout: Duration,
}

impl SourceSpec {
    /// The kind, for `check`, logs and `/status`.
    pub fn kind(&self) -> &'static str {
        match self {
            SourceSpec::File { .. } => "file",
            SourceSpec::Env { .. } => "env",
            SourceSpec::Command(_) => "command",
            SourceSpec::OAuth2(_) => "oauth2_client_credentials",
            SourceSpec::GithubApp(_) => "github_app",
            SourceSpec::GoogleServiceAccount(_) => "google_service_account",
            SourceSpec::Aws(_) => "aws",
            SourceSpec::Vault(_) => "vault",
            SourceSpec::SecretsManager(_) => "aws_secrets_manager",
        }
    }

    /// Whether the value is read from a secret store that is polled by version.
    pub fn is_secret_store(&self) -> bool {
        matches!(self, SourceSpec::Vault(_) | SourceSpec::SecretsManager(_))
    }

    /// How often a secret store is polled for a new version.
    pub fn store_poll(&self) -> Option<Duration> {
        match self {
            SourceSpec::Vault(vault) => Some(vault.poll),
            SourceSpec::SecretsManager(secret) => Some(secret.poll),
            _ => None,
        }
    }

    /// Whether the value is obtained over the network (a token endpoint or a provider mint),
    /// so it cannot be watched and is polled and retried instead.
    pub fn is_remote(&self) -> bool {
        match self {
            SourceSpec::OAuth2(_)
            | SourceSpec::GithubApp(_)
            | SourceSpec::GoogleServiceAccount(_)
            | SourceSpec::Vault(_)
            | SourceSpec::SecretsManager(_) => true,
            SourceSpec::Aws(aws) => {
                aws.assume_role.is_some() || matches!(aws.base, AwsBase::WebIdentity { .. })
            }
            _ => false,
        }
    }

    /// The per-caller settings of a credential minted per (agent, task): a `mint: per_task`
    /// GitHub App, or an AWS role whose session name templates `{agent}` or `{task}`.
    pub fn per_task(&self) -> Option<TaskTokenSettings> {
        match self {
            SourceSpec::GithubApp(app) => match app.mint {
                MintMode::PerTask(settings) => Some(settings),
                MintMode::Shared => None,
            },
            SourceSpec::Aws(aws) => aws
                .assume_role
                .as_ref()
                .filter(|role| role.per_caller())
                .map(|role| role.sessions),
            _ => None,
        }
    }

    /// Files this source reads (its own, or its client id/secret's), for the watcher.
    pub fn files(&self) -> Vec<&Path> {
        match self {
            SourceSpec::File { path, .. } => vec![path.as_path()],
            SourceSpec::OAuth2(oauth) => {
                let mut files = oauth.client_id.files();
                files.extend(oauth.client_secret.files());
                files
            }
            SourceSpec::GithubApp(app) => app.private_key.files(),
            SourceSpec::GoogleServiceAccount(google) => google.key.files(),
            SourceSpec::Aws(aws) => match &aws.base {
                AwsBase::Static {
                    access_key_id,
                    secret_access_key,
                    session_token,
                } => {
                    let mut files = access_key_id.files();
                    files.extend(secret_access_key.files());
                    files.extend(session_token.iter().flat_map(SourceSpec::files));
                    files
                }
                AwsBase::WebIdentity { token, .. } => token.files(),
            },
            SourceSpec::Vault(vault) => match &vault.auth {
                VaultAuth::Token(token) => token.files(),
                VaultAuth::Login { jwt, .. } => jwt.files(),
            },
            SourceSpec::Env { .. } | SourceSpec::Command(_) | SourceSpec::SecretsManager(_) => {
                Vec::new()
            }
        }
    }
}

/// How keystamp follows changes while serving.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadConfig {
    pub resync_every: Duration,
    pub debounce: Duration,
    pub replay_body_limit: usize,
}

#[derive(Debug, Clone)]
pub struct RouteSpec {
    pub name: String,
    pub host: HostPattern,
    pub path_prefix: Option<String>,
    pub methods: Option<Vec<Method>>,
    /// The default credential; `None`: only agents with their own may use the route.
    pub credential: Option<String>,
    pub inject: Injection,
    pub strip: Vec<HeaderName>,
    pub respect_retry_after: bool,
    pub auth_failure_markers: Vec<String>,
    /// `None`: any agent (or none). `Some`: only these agents, each within its scope.
    pub agents: Option<BTreeMap<String, AgentScope>>,
    /// Stamp only requests that arrived over TLS.
    pub tls_only: bool,
}

/// One agent's identity: where its proxy token comes from, and its own rate limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentitySpec {
    pub source: SourceSpec,
    pub rate_limit: Option<RateLimitSpec>,
}

/// How far one agent's use of a route's credential goes (the scoped-per-task credential).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentScope {
    pub methods: Option<Vec<Method>>,
    pub path_prefix: Option<String>,
    /// This agent's own credential on the route, instead of the route's.
    pub credential: Option<String>,
    /// This agent's own injection, instead of the route's.
    pub inject: Option<Injection>,
}

/// `api.example.test` or `*.example.test` (one label or more under it). Lowercase, no dot at the end.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostPattern {
    Exact(Host),
    /// Holds the suffix with its leading dot: `.example.test`.
    Wildcard(String),
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(host) => f.write_str(host.as_str()),
            HostPattern::Wildcard(suffix) => write!(f, "*{suffix}"),
        }
    }
}

/// How the credential is put into the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Injection {
    /// `Authorization: Bearer <secret>`
    Bearer,
    /// `Authorization: Basic base64(username:<secret>)`
    Basic { username: String },
    /// `<name>: <template with {secret} replaced>`
    Header { name: HeaderName, template: String },
    /// `?<name>=<secret>`, added or replaced.
    Query { name: String },
    /// AWS Signature Version 4 over the request as it leaves, with an `aws` credential.
    AwsSigV4 { service: String, region: String },
}

impl Injection {
    pub fn kind(&self) -> &'static str {
        match self {
            Injection::Bearer => "bearer",
            Injection::Basic { .. } => "basic",
            Injection::Header { .. } => "header",
            Injection::Query { .. } => "query",
            Injection::AwsSigV4 { .. } => "aws_sigv4",
        }
    }
}

/// One problem in a config file, printed as `file:line:column: key.path: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}: {}",
            self.file.display(),
            self.line,
            self.column,
            self.path,
            self.message
        )
    }
}

/// Everything wrong with a config file; never empty.
#[derive(Debug, thiserror::Error)]
pub enum ConfigLoadError {
    #[error("{path}: cannot read config: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<ConfigError>),
}

impl ConfigLoadError {
    pub fn errors(&self) -> Vec<String> {
        match self {
            ConfigLoadError::Read { .. } => vec![self.to_string()],
            ConfigLoadError::Invalid(errors) => errors.iter().map(ToString::to_string).collect(),
        }
    }
}

impl Config {
    /// Reads and validates the config at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigLoadError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigLoadError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_yaml(path, &text)
    }

    /// Validates `text` as if it had been read from `path` (relative paths resolve against
    /// `path`'s directory).
    pub fn from_yaml(path: &Path, text: &str) -> Result<Config, ConfigLoadError> {
        validate::parse(path, text).map_err(ConfigLoadError::Invalid)
    }
}
