//! Test harness: a CA made by the test, a real TLS upstream (hyper + rustls) that echoes what it
//! received, and keystamp itself started on ephemeral ports from a YAML config the test writes.

#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;

pub use keystamp::{App, Config, RunningApp};

/// Every host name the test upstream's certificate covers.
pub const UPSTREAM_NAMES: &[&str] = &[
    "api.example.test",
    "basic.example.test",
    "query.example.test",
    "a.other.test",
    "deep.b.other.test",
    "tunnel.test",
    "plain.test",
    "localhost",
];

/// A CA made by the test.
pub struct TestCa {
    pub issuer: Issuer<'static, KeyPair>,
    pub pem: String,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap();
        Self {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf for `names` as PEM (certificate, private key), for servers outside Rust.
    pub fn leaf_pem(&self, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    pub fn leaf(&self, names: &[&str]) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
    }
}

type TestBody = BoxBody<Bytes, Infallible>;

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<TestBody> {
    let mut response = Response::new(Full::new(body.into()).boxed());
    *response.status_mut() = status;
    response
}

/// What the upstream saw, for assertions.
#[derive(Default)]
pub struct Seen {
    pub requests: AtomicUsize,
    /// TCP connections accepted.
    pub connections: AtomicUsize,
    pub authorizations: Mutex<Vec<Option<String>>>,
    /// `METHOD path` of every request, in order.
    pub requests_seen: Mutex<Vec<String>>,
    /// When set, only `Authorization: Bearer <this>` is accepted; anything else gets 401.
    pub accept_only: Mutex<Option<String>>,
    /// Woken to drop every open connection at once, as a restarting server does.
    drop_connections: tokio::sync::Notify,
}

impl Seen {
    pub fn accept_only(&self, token: &str) {
        *self.accept_only.lock().unwrap() = Some(token.to_string());
    }

    /// Closes every connection open now, without a goodbye (no GOAWAY, no `Connection: close`).
    pub fn drop_connections(&self) {
        self.drop_connections.notify_waiters();
    }

    pub fn count(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// `METHOD path` of every request so far.
    pub fn requests(&self) -> Vec<String> {
        self.requests_seen.lock().unwrap().clone()
    }
}

/// A real upstream: TLS (h2 + http/1.1, or http/1.1 only) or plain HTTP.
pub struct TestUpstream {
    pub addr: SocketAddr,
    pub seen: Arc<Seen>,
}

pub enum UpstreamKind {
    Tls { ca: Arc<TestCa>, h2: bool },
    Plain,
}

impl TestUpstream {
    pub async fn start(kind: UpstreamKind) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Seen::default());
        let acceptor = match &kind {
            UpstreamKind::Tls { ca, h2 } => {
                let alpn: &[&[u8]] = if *h2 {
                    &[b"h2", b"http/1.1"]
                } else {
                    &[b"http/1.1"]
                };
                Some(tls_acceptor(ca, UPSTREAM_NAMES, alpn))
            }
            UpstreamKind::Plain => None,
        };
        let seen_for_loop = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let seen = seen_for_loop.clone();
                seen.connections.fetch_add(1, Ordering::SeqCst);
                let acceptor = acceptor.clone();
                let dropped = seen.clone();
                let connection = async move {
                    let service = service_fn(move |request| {
                        let seen = seen.clone();
                        async move { Ok::<_, Infallible>(respond(request, seen).await) }
                    });
                    let builder = auto::Builder::new(TokioExecutor::new());
                    match acceptor {
                        Some(acceptor) => {
                            let Ok(tls) = acceptor.accept(tcp).await else {
                                return;
                            };
                            let _ = builder
                                .serve_connection_with_upgrades(TokioIo::new(tls), service)
                                .await;
                        }
                        None => {
                            let _ = builder
                                .serve_connection_with_upgrades(TokioIo::new(tcp), service)
                                .await;
                        }
                    }
                };
                tokio::spawn(async move {
                    tokio::select! {
                        _ = connection => {}
                        _ = dropped.drop_connections.notified() => {}
                    }
                });
            }
        });
        Self { addr, seen }
    }
}

async fn respond(mut request: Request<Incoming>, seen: Arc<Seen>) -> Response<TestBody> {
    seen.requests.fetch_add(1, Ordering::SeqCst);
    let authorization = request
        .headers()
        .get("authorization")
        .map(|v| v.to_str().unwrap_or("<binary>").to_string());
    seen.authorizations
        .lock()
        .unwrap()
        .push(authorization.clone());
    let path = request.uri().path().to_string();
    seen.requests_seen
        .lock()
        .unwrap()
        .push(format!("{} {path}", request.method()));
    let accepted = seen.accept_only.lock().unwrap().clone();
    if let Some(token) = accepted {
        if authorization.as_deref() != Some(format!("Bearer {token}").as_str()) {
            // Drain the body so the connection stays usable.
            let _ = request.into_body().collect().await;
            return text(StatusCode::UNAUTHORIZED, "{\"error\":\"invalid_token\"}");
        }
    }
    // A 429 with any `Retry-After` the test names, as a hostile or broken upstream sends it.
    if let Some(value) = path.strip_prefix("/retry-after/") {
        let mut response = text(StatusCode::TOO_MANY_REQUESTS, "slow down");
        response
            .headers_mut()
            .insert("retry-after", value.parse().unwrap());
        return response;
    }
    if let Some(code) = path.strip_prefix("/status/") {
        let mut response = text(
            StatusCode::from_u16(code.parse().unwrap()).unwrap(),
            "status",
        );
        if code == "429" {
            response
                .headers_mut()
                .insert("retry-after", "2".parse().unwrap());
        }
        return response;
    }
    // A permission 403 that echoes the resource the agent named into its message, as many
    // APIs do: whatever the path says, its error code is AccessDenied.
    if path.starts_with("/forbidden/echo/") {
        let body = serde_json::json!({
            "message": format!("User is not authorized to access {path}"),
            "code": "AccessDenied",
        });
        let mut response = text(StatusCode::FORBIDDEN, body.to_string());
        response
            .headers_mut()
            .insert("x-echo-path", path.parse().unwrap());
        return response;
    }
    match path.as_str() {
        "/forbidden/aws-header" => {
            let mut response = text(StatusCode::FORBIDDEN, "{\"message\":\"signature\"}");
            response.headers_mut().insert(
                "x-amzn-errortype",
                "InvalidSignatureException:http://internal.amazon.com/coral/com.amazon.coral.service/"
                    .parse()
                    .unwrap(),
            );
            return response;
        }
        "/forbidden/invalid-token" => {
            let mut response = text(StatusCode::FORBIDDEN, "");
            response.headers_mut().insert(
                "www-authenticate",
                "Bearer error=\"invalid_token\", error_description=\"revoked\""
                    .parse()
                    .unwrap(),
            );
            return response;
        }
        "/forbidden/aws" => {
            return text(
                StatusCode::FORBIDDEN,
                "<ErrorResponse><Error><Code>InvalidClientTokenId</Code></Error></ErrorResponse>",
            );
        }
        "/forbidden/permission" => {
            return text(StatusCode::FORBIDDEN, "{\"error\":\"insufficient_scope\"}")
        }
        _ => {}
    }
    match path.as_str() {
        // Answers, then closes the connection (as a server at its keep-alive limit does).
        "/close" => {
            let mut response = text(StatusCode::OK, "closing");
            response
                .headers_mut()
                .insert("connection", "close".parse().unwrap());
            response
        }
        // Never answers: keystamp's response-head timeout must.
        "/hang" => {
            std::future::pending::<()>().await;
            text(StatusCode::OK, "")
        }
        // Echoes the credential it received in a header, as debug endpoints and "invalid key"
        // errors do.
        "/echo-auth" => {
            let mut response = text(StatusCode::OK, "echoed");
            let echoed = format!("you sent {}", authorization.unwrap_or_default());
            response
                .headers_mut()
                .insert("x-echo", echoed.parse().unwrap());
            response
        }
        "/sse" => {
            let events = futures_util::stream::unfold(0u32, |n| async move {
                if n == 3 {
                    return None;
                }
                if n > 0 {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                let frame = Frame::data(Bytes::from(format!("data: event-{n}\n\n")));
                Some((Ok::<_, Infallible>(frame), n + 1))
            });
            let mut response = Response::new(BodyExt::boxed(StreamBody::new(events)));
            response
                .headers_mut()
                .insert("content-type", "text/event-stream".parse().unwrap());
            response
        }
        "/upload" => {
            let mut body = request.into_body();
            let mut total: u64 = 0;
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.unwrap().into_data() {
                    total += data.len() as u64;
                }
            }
            text(StatusCode::OK, format!("{{\"bytes\":{total}}}"))
        }
        "/ws" => {
            let key = request.headers().get("sec-websocket-key").cloned().unwrap();
            let on_upgrade = hyper::upgrade::on(&mut request);
            tokio::spawn(async move {
                let upgraded = on_upgrade.await.unwrap();
                let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    tokio_tungstenite::tungstenite::protocol::Role::Server,
                    None,
                )
                .await;
                while let Some(Ok(message)) = ws.next().await {
                    if message.is_text() {
                        let reply = format!("echo:{}", message.to_text().unwrap());
                        ws.send(tokio_tungstenite::tungstenite::Message::text(reply))
                            .await
                            .unwrap();
                    }
                }
            });
            let accept =
                tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
            let mut response = text(StatusCode::SWITCHING_PROTOCOLS, "");
            response
                .headers_mut()
                .insert("connection", "upgrade".parse().unwrap());
            response
                .headers_mut()
                .insert("upgrade", "websocket".parse().unwrap());
            response
                .headers_mut()
                .insert("sec-websocket-accept", accept.parse().unwrap());
            response
        }
        _ => {
            let mut headers = serde_json::Map::new();
            for (name, value) in request.headers() {
                let entry = headers
                    .entry(name.as_str().to_string())
                    .or_insert_with(|| serde_json::json!([]));
                entry
                    .as_array_mut()
                    .unwrap()
                    .push(value.to_str().unwrap_or("<binary>").into());
            }
            let echo = serde_json::json!({
                "method": request.method().as_str(),
                "path": path,
                "query": request.uri().query(),
                "version": format!("{:?}", request.version()),
                "headers": headers,
            });
            let mut response = text(StatusCode::OK, echo.to_string());
            response
                .headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            response
        }
    }
}

/// A keystamp started in this process from a config the test wrote into a temp dir.
pub struct TestKeystamp {
    pub app: RunningApp,
    pub dir: tempfile::TempDir,
    pub ca_path: PathBuf,
    pub config_path: PathBuf,
}

impl TestKeystamp {
    /// `yaml` is the config below `listen`/`admin`/`ca`; `secrets` are written as files under
    /// `secrets/NAME` in the temp dir (refer to them as `./secrets/NAME`).
    pub async fn start(yaml: &str, secrets: &[(&str, &str)]) -> Self {
        if let Ok(filter) = std::env::var("KEYSTAMP_TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_test_writer()
                .try_init();
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("secrets")).unwrap();
        for (name, value) in secrets {
            std::fs::write(dir.path().join("secrets").join(name), value).unwrap();
        }
        let text = config_text(yaml);
        let path = dir.path().join("keystamp.yaml");
        std::fs::write(&path, &text).unwrap();
        let config = Config::load(&path).unwrap_or_else(|e| panic!("config invalid:\n{e}\n{text}"));
        let app = App::start(config).await.unwrap();
        let ca_path = dir.path().join("run/ca.crt");
        Self {
            app,
            dir,
            ca_path,
            config_path: path,
        }
    }

    /// Replaces the config file (same header as at start) the way an editor or a ConfigMap
    /// update would: write a temporary file, then rename it over the old one.
    pub fn rewrite_config(&self, yaml: &str) {
        let temporary = self.dir.path().join(".keystamp.yaml.tmp");
        std::fs::write(&temporary, config_text(yaml)).unwrap();
        std::fs::rename(&temporary, &self.config_path).unwrap();
    }

    /// Writes a secret file under `secrets/` atomically.
    pub fn write_secret(&self, name: &str, value: &str) {
        let temporary = self.dir.path().join("secrets").join(format!(".{name}.tmp"));
        std::fs::write(&temporary, value).unwrap();
        std::fs::rename(&temporary, self.dir.path().join("secrets").join(name)).unwrap();
    }

    /// A reqwest client pointed at keystamp explicitly (for tests about keystamp's behaviour
    /// rather than about a runtime's environment handling).
    pub fn client(&self) -> reqwest::Client {
        let ca = reqwest::Certificate::from_pem(self.app.ca_pem().as_bytes()).unwrap();
        reqwest::Client::builder()
            .proxy(reqwest::Proxy::all(self.proxy_url()).unwrap())
            .add_root_certificate(ca)
            .tls_built_in_root_certs(false)
            .build()
            .unwrap()
    }

    /// GET on the admin listener, bypassing any proxy.
    pub async fn admin(&self, path: &str) -> reqwest::Response {
        let url = format!("http://{}{path}", self.app.admin_addr().unwrap());
        reqwest::Client::builder()
            .no_proxy()
            .build()
            .unwrap()
            .get(url)
            .send()
            .await
            .unwrap()
    }

    pub async fn metrics(&self) -> String {
        self.admin("/metrics").await.text().await.unwrap()
    }

    pub async fn status(&self) -> serde_json::Value {
        self.admin("/status").await.json().await.unwrap()
    }

    pub fn proxy_url(&self) -> String {
        format!("http://{}", self.app.proxy_addr())
    }

    /// A PEM bundle with keystamp's CA and any extra CAs (for tunnelled hosts).
    pub fn bundle(&self, extra: &[&TestCa]) -> PathBuf {
        let mut pem = self.app.ca_pem().to_string();
        for ca in extra {
            pem.push_str(&ca.pem);
        }
        let path = self.dir.path().join(format!("bundle-{}.pem", extra.len()));
        std::fs::write(&path, pem).unwrap();
        path
    }
}

fn config_text(yaml: &str) -> String {
    // Audit lines would flood the test output; tests about the audit log set their own output.
    let audit = if yaml.contains("audit:") {
        ""
    } else {
        "audit: { output: off }\n"
    };
    format!("listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nca:\n  generate: true\n  cert_out: ./run/ca.crt\n{audit}{yaml}")
}

/// The value of one sample in Prometheus text, e.g. `metric(&text, "keystamp_config_reloads_total{result=\"ok\"}")`.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|line| line.starts_with(series) && line[series.len()..].starts_with(' '))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

/// Polls `check` every 20 ms until it returns true or `within` passes.
pub async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A TLS upstream (h2 + http/1.1) and its CA written to a PEM file keystamp can trust
/// (`upstream_tls.extra_roots`). Keep the directory alive as long as the file is needed.
pub async fn tls_upstream() -> (TestUpstream, PathBuf, tempfile::TempDir) {
    let ca = Arc::new(TestCa::new("upstream"));
    let upstream = TestUpstream::start(UpstreamKind::Tls {
        ca: ca.clone(),
        h2: true,
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let ca_path = write_pem(dir.path(), "upstream-ca.pem", &ca.pem);
    (upstream, ca_path, dir)
}

/// Writes a PEM file into `dir`.
pub fn write_pem(dir: &Path, name: &str, pem: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, pem).unwrap();
    path
}

/// The standard config used by most tests: the issue's example, pointed at `upstream`.
pub fn example_config(upstream: SocketAddr, upstream_ca: &Path, unmatched: &str) -> String {
    let port = upstream.port();
    format!(
        r#"unmatched: {unmatched}
upstream_tls:
  extra_roots: [{ca}]
resolve:
  api.example.test:443: 127.0.0.1:{port}
  basic.example.test:443: 127.0.0.1:{port}
  query.example.test:443: 127.0.0.1:{port}
  a.other.test:443: 127.0.0.1:{port}
  deep.b.other.test:443: 127.0.0.1:{port}
  tunnel.test:443: 127.0.0.1:{port}
credentials:
  example:
    source: {{ file: ./secrets/example }}
  other:
    source: {{ file: ./secrets/other }}
  missing:
    source: {{ file: ./secrets/does-not-exist }}
routes:
  - host: api.example.test
    credential: example
    inject: {{ type: bearer }}
  - host: api.example.test
    path_prefix: /broken/
    credential: missing
    inject: {{ type: bearer }}
  - host: "*.other.test"
    path_prefix: /v1/
    methods: [GET, POST]
    credential: other
    inject: {{ type: header, name: X-Api-Key, value: "key={{secret}}" }}
  - host: basic.example.test
    credential: example
    inject: {{ type: basic, username: svc }}
  - host: query.example.test
    credential: example
    inject: {{ type: query, name: api_key }}
"#,
        ca = upstream_ca.display()
    )
}

pub const EXAMPLE_SECRET: &str = "ex-secret-7f3a9c";
pub const OTHER_SECRET: &str = "other-secret-41bd";

/// A config below `listen`/`admin`/`ca`, built from values instead of `format!`ed YAML:
/// `TestConfig::new().trust(&ca).pin("api.example.test:443", addr).credential_file("key")
/// .bearer_route("api.example.test", "key").yaml()`. Each section is a JSON value, so a test
/// names only the keys it cares about and YAML quoting is never the test's problem.
#[derive(Default)]
pub struct TestConfig {
    top: serde_json::Map<String, serde_json::Value>,
    credentials: serde_json::Map<String, serde_json::Value>,
    pub routes: Vec<serde_json::Value>,
}

impl TestConfig {
    pub fn new() -> Self {
        let mut config = Self::default();
        config.set("unmatched", serde_json::json!("deny"));
        config
    }

    /// Any top-level key (`breaker`, `reload`, `identities`, ...).
    pub fn set(&mut self, key: &str, value: serde_json::Value) -> &mut Self {
        self.top.insert(key.to_string(), value);
        self
    }

    /// Trust `ca` (a PEM file) for upstream TLS, in addition to the system roots.
    pub fn trust(&mut self, ca: &Path) -> &mut Self {
        let roots = serde_json::json!({ "extra_roots": [ca.display().to_string()] });
        self.set("upstream_tls", roots)
    }

    /// Dial `address` for `host_port` (a `resolve:` pin).
    pub fn pin(&mut self, host_port: &str, address: SocketAddr) -> &mut Self {
        let pins = self
            .top
            .entry("resolve")
            .or_insert_with(|| serde_json::json!({}));
        pins[host_port] = serde_json::json!(address.to_string());
        self
    }

    /// A credential read from `./secrets/NAME`, with any extra keys (`rate_limit`, ...).
    pub fn credential_file(&mut self, name: &str, extra: serde_json::Value) -> &mut Self {
        let mut credential =
            serde_json::json!({ "source": { "file": format!("./secrets/{name}") } });
        merge(&mut credential, extra);
        self.credentials.insert(name.to_string(), credential);
        self
    }

    /// A credential with any source (`{"source": {...}, ...}`).
    pub fn credential(&mut self, name: &str, credential: serde_json::Value) -> &mut Self {
        self.credentials.insert(name.to_string(), credential);
        self
    }

    /// A route stamping `credential` as a bearer token on `host`, with any extra keys.
    pub fn bearer_route(
        &mut self,
        host: &str,
        credential: &str,
        extra: serde_json::Value,
    ) -> &mut Self {
        let mut route = serde_json::json!({
            "host": host,
            "credential": credential,
            "inject": { "type": "bearer" },
        });
        merge(&mut route, extra);
        self.routes.push(route);
        self
    }

    pub fn yaml(&self) -> String {
        let mut document = serde_json::Value::Object(self.top.clone());
        document["credentials"] = serde_json::Value::Object(self.credentials.clone());
        document["routes"] = serde_json::Value::Array(self.routes.clone());
        serde_norway::to_string(&document).unwrap()
    }
}

/// Adds `extra`'s keys to `value` (both JSON objects).
fn merge(value: &mut serde_json::Value, extra: serde_json::Value) {
    if let (Some(target), serde_json::Value::Object(extra)) = (value.as_object_mut(), extra) {
        target.extend(extra);
    }
}

/// Sleeps out a `Retry-After` keystamp sent (whole seconds), plus a little for the clock.
pub async fn wait_out(retry_after: Option<&str>) {
    let seconds: u64 = retry_after.expect("a Retry-After header").parse().unwrap();
    tokio::time::sleep(Duration::from_secs(seconds) + Duration::from_millis(50)).await;
}

/// The real `keystamp` binary on free ports, started from a config below `listen`/`admin`/`ca`
/// with `secrets` under `secrets/`; its log and audit lines go to files in its directory. It is
/// killed when dropped.
pub struct KeystampProcess {
    pub dir: tempfile::TempDir,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub ca_pem: String,
    /// The config's directory: `keystamp.yaml`, `secrets/`, `run/ca.crt`, `audit.jsonl`.
    pub home: PathBuf,
    child: std::process::Child,
}

/// Where [`KeystampProcess`] puts its config and how it names it on the command line.
pub struct Layout {
    /// The config's directory below the temp dir (`""` for the temp dir itself).
    pub config_dir: &'static str,
    /// The working directory below the temp dir keystamp starts in.
    pub cwd: &'static str,
    /// `--config` as written, relative to `cwd`; `None` passes the absolute path.
    pub argument: Option<&'static str>,
    /// A symlink made before start: (link, target), both below the temp dir.
    pub symlink: Option<(&'static str, &'static str)>,
}

impl Layout {
    fn absolute() -> Self {
        Self {
            config_dir: "",
            cwd: "",
            argument: None,
            symlink: None,
        }
    }
}

impl KeystampProcess {
    pub fn start(yaml: &str, secrets: &[(&str, &str)]) -> Self {
        Self::start_under(&[], yaml, secrets)
    }

    /// As [`start`](Self::start), run under `wrapper` (`["prlimit", "--nofile=48:48"]`), which
    /// must exec keystamp with the arguments that follow it.
    pub fn start_under(wrapper: &[&str], yaml: &str, secrets: &[(&str, &str)]) -> Self {
        Self::spawn(wrapper, &Layout::absolute(), yaml, secrets)
    }

    /// As [`start`](Self::start), laid out and started as `layout` says (a relative `--config`
    /// from some working directory, a symlinked config directory).
    pub fn start_in(layout: &Layout, yaml: &str, secrets: &[(&str, &str)]) -> Self {
        Self::spawn(&[], layout, yaml, secrets)
    }

    fn spawn(wrapper: &[&str], layout: &Layout, yaml: &str, secrets: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join(layout.config_dir);
        std::fs::create_dir_all(home.join("secrets")).unwrap();
        for (name, value) in secrets {
            std::fs::write(home.join("secrets").join(name), value).unwrap();
        }
        if let Some((link, target)) = layout.symlink {
            std::os::unix::fs::symlink(dir.path().join(target), dir.path().join(link)).unwrap();
        }
        let (proxy_port, admin_port) = (free_port(), free_port());
        let config = format!(
            "listen: 127.0.0.1:{proxy_port}\nadmin: 127.0.0.1:{admin_port}\nca: {{ generate: true, cert_out: ./run/ca.crt }}\naudit: {{ output: ./audit.jsonl }}\n{yaml}"
        );
        let config_path = home.join("keystamp.yaml");
        std::fs::write(&config_path, config).unwrap();
        let binary = env!("CARGO_BIN_EXE_keystamp");
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut command = std::process::Command::new(program);
                command.args(args).arg(binary);
                command
            }
            None => std::process::Command::new(binary),
        };
        command.args(["--log-format", "json", "run", "--config"]);
        match layout.argument {
            Some(argument) => {
                let cwd = dir.path().join(layout.cwd);
                std::fs::create_dir_all(&cwd).unwrap();
                command.arg(argument).current_dir(cwd);
            }
            None => {
                command.arg(&config_path);
            }
        }
        command
            .env("RUST_LOG", "keystamp=debug")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("keystamp.log")).unwrap());
        let child = command.spawn().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
        let started = std::time::Instant::now();
        loop {
            let ready =
                std::net::TcpStream::connect(admin).is_ok() && home.join("run/ca.crt").exists();
            if ready {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "keystamp never became ready:\n{}",
                std::fs::read_to_string(dir.path().join("keystamp.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
        let ca_pem = std::fs::read_to_string(home.join("run/ca.crt")).unwrap();
        Self {
            proxy: format!("127.0.0.1:{proxy_port}").parse().unwrap(),
            admin,
            ca_pem,
            home,
            dir,
            child,
        }
    }

    /// Sends SIGTERM and waits (up to 30 s) for the process to exit; returns whether it did.
    pub fn terminate(&mut self) -> bool {
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        let started = std::time::Instant::now();
        while sent && started.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything keystamp logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("keystamp.log")).unwrap_or_default()
    }

    /// Every audit line so far.
    pub fn audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.home.join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    /// `GET` on the admin listener, without any proxy.
    pub async fn admin_get(&self, path: &str) -> String {
        reqwest::Client::builder()
            .no_proxy()
            .build()
            .unwrap()
            .get(format!("http://{}{path}", self.admin))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

impl Drop for KeystampProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl KeystampProcess {
    /// A reqwest client that uses this keystamp as its proxy and trusts its CA only.
    pub fn client(&self) -> reqwest::Client {
        let ca = reqwest::Certificate::from_pem(self.ca_pem.as_bytes()).unwrap();
        reqwest::Client::builder()
            .proxy(reqwest::Proxy::all(format!("http://{}", self.proxy)).unwrap())
            .add_root_certificate(ca)
            .tls_built_in_root_certs(false)
            .build()
            .unwrap()
    }

    /// `/status` as JSON.
    pub async fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.admin_get("/status").await).unwrap()
    }

    /// A client that identifies as an agent through the proxy URL (`http://NAME:TOKEN@...`), or
    /// anonymously with `None`.
    pub fn agent_client(&self, agent: Option<(&str, &str)>) -> reqwest::Client {
        let proxy = match agent {
            Some((name, token)) => format!("http://{name}:{token}@{}", self.proxy),
            None => format!("http://{}", self.proxy),
        };
        let ca = reqwest::Certificate::from_pem(self.ca_pem.as_bytes()).unwrap();
        reqwest::Client::builder()
            .proxy(reqwest::Proxy::all(proxy).unwrap())
            .add_root_certificate(ca)
            .tls_built_in_root_certs(false)
            .build()
            .unwrap()
    }
}

/// A TLS acceptor with a leaf from `ca` for `names`, offering `alpn` (in preference order).
pub fn tls_acceptor(ca: &TestCa, names: &[&str], alpn: &[&[u8]]) -> tokio_rustls::TlsAcceptor {
    let (chain, key) = ca.leaf(names);
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// One request as a fake service sees it.
pub struct Received {
    pub method: http::Method,
    pub path: String,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

/// A fake service's answer to one request.
pub type Handler = Arc<dyn Fn(Received) -> (StatusCode, String) + Send + Sync>;

/// How long a fake service takes before answering a request (a slow provider).
pub type Delay = Arc<dyn Fn(&Received) -> Duration + Send + Sync>;

/// A real TLS server (h2 + http/1.1) on loopback with a certificate from `ca` for `names`,
/// answering every request with `handler`: the base of the provider fakes.
pub async fn serve_tls(ca: &TestCa, names: &[&str], handler: Handler) -> SocketAddr {
    serve_tls_with(ca, names, handler, Arc::new(|_| Duration::ZERO)).await
}

/// As [`serve_tls`], each answer held back for what `delay` says.
pub async fn serve_tls_with(
    ca: &TestCa,
    names: &[&str],
    handler: Handler,
    delay: Delay,
) -> SocketAddr {
    serve_tls_on("127.0.0.1:0".parse().unwrap(), ca, names, handler, delay).await
}

/// As [`serve_tls_with`], listening on `bind` (an address in a test network namespace).
pub async fn serve_tls_on(
    bind: SocketAddr,
    ca: &TestCa,
    names: &[&str],
    handler: Handler,
    delay: Delay,
) -> SocketAddr {
    let listener = TcpListener::bind(bind).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tls_acceptor(ca, names, &[b"h2", b"http/1.1"]);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, handler, delay) = (acceptor.clone(), handler.clone(), delay.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = service_fn(move |request: Request<Incoming>| {
                    let (handler, delay) = (handler.clone(), delay.clone());
                    async move {
                        let (parts, body) = request.into_parts();
                        let body = body
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let received = Received {
                            method: parts.method,
                            path: parts.uri.path().to_string(),
                            headers: parts.headers,
                            body,
                        };
                        tokio::time::sleep(delay(&received)).await;
                        let (status, text) = handler(received);
                        let mut response = Response::new(Full::new(Bytes::from(text)));
                        *response.status_mut() = status;
                        response
                            .headers_mut()
                            .insert("content-type", "application/json".parse().unwrap());
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    addr
}

/// A real `redis-server` on a free loopback port, with no persistence; killed when dropped.
/// `stop` and `start_again` (same port) simulate a store outage.
pub struct RedisServer {
    pub port: u16,
    child: Option<std::process::Child>,
    /// Extra `redis-server` arguments (TLS, a password), kept for a restart.
    extra: Vec<String>,
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_with(Vec::new())
    }

    /// A TLS-only server (certificate for `localhost` from `ca`) that requires `password`.
    pub fn start_tls(ca: &TestCa, dir: &Path, password: &str) -> Self {
        let (cert, key) = ca.leaf_pem(&["localhost"]);
        let cert_path = dir.join("redis.crt");
        let key_path = dir.join("redis.key");
        std::fs::write(&cert_path, cert).unwrap();
        std::fs::write(&key_path, key).unwrap();
        let port = free_port();
        let extra = vec![
            "--port".into(),
            "0".into(),
            "--tls-port".into(),
            port.to_string(),
            "--tls-cert-file".into(),
            cert_path.display().to_string(),
            "--tls-key-file".into(),
            key_path.display().to_string(),
            "--tls-auth-clients".into(),
            "no".into(),
            "--requirepass".into(),
            password.into(),
        ];
        let mut server = Self {
            port,
            child: None,
            extra,
        };
        server.start_again();
        server
    }

    /// A plain server whose default user needs `password` (what a database engine logs in as).
    pub fn start_with_password(password: &str) -> Self {
        let port = free_port();
        let mut server = Self {
            port,
            child: None,
            extra: vec![
                "--port".into(),
                port.to_string(),
                "--requirepass".into(),
                password.into(),
            ],
        };
        server.start_again();
        server
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    fn start_with(extra: Vec<String>) -> Self {
        let mut server = Self {
            port: free_port(),
            child: None,
            extra,
        };
        server.start_again();
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn start_again(&mut self) {
        let mut command = std::process::Command::new("redis-server");
        if self.extra.is_empty() {
            command.args(["--port", &self.port.to_string()]);
        }
        let child = command
            .args(["--bind", "127.0.0.1"])
            .args(&self.extra)
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/test installs it)");
        self.child = Some(child);
        let started = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `CONNECT authority` on a fresh connection to the proxy; returns the stream after the 200.
pub async fn tunnel(
    proxy: SocketAddr,
    authority: &str,
    agent: Option<&str>,
) -> tokio::net::TcpStream {
    let mut stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let auth = agent
        .map(|credentials| {
            use base64::Engine;
            let encoded = base64::engine::general_purpose::STANDARD.encode(credentials);
            format!("Proxy-Authorization: Basic {encoded}\r\n")
        })
        .unwrap_or_default();
    let request = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n{auth}\r\n");
    tokio::io::AsyncWriteExt::write_all(&mut stream, request.as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        assert_eq!(
            tokio::io::AsyncReadExt::read(&mut stream, &mut byte)
                .await
                .unwrap(),
            1,
            "proxy closed during CONNECT"
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    stream
}

/// TLS to keystamp's leaf inside a tunnel, trusting its CA.
pub async fn agent_tls(
    stream: tokio::net::TcpStream,
    ca_pem: &str,
    sni: &str,
    alpn: &[&[u8]],
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let config = agent_tls_config(ca_pem, alpn);
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls_pki_types::ServerName::try_from(sni.to_string()).unwrap();
    connector.connect(name, stream).await
}

/// An RSA key pair made by `openssl`: the private key in both PEM forms, the public key as
/// PKCS#1 DER for verifying.
pub struct RsaKey {
    pub pkcs1_pem: String,
    pub pkcs8_pem: String,
    pub public_der: Vec<u8>,
    /// The public key as SubjectPublicKeyInfo PEM (what Vault's JWT auth takes).
    pub public_pem: String,
}

impl RsaKey {
    pub fn generate(dir: &Path) -> Self {
        let openssl = |args: &[&str]| {
            let status = std::process::Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .stderr(std::process::Stdio::null())
                .status()
                .unwrap();
            assert!(status.success(), "openssl {args:?}");
        };
        openssl(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            "pkcs8.pem",
        ]);
        openssl(&[
            "rsa",
            "-in",
            "pkcs8.pem",
            "-traditional",
            "-out",
            "pkcs1.pem",
        ]);
        openssl(&[
            "rsa",
            "-in",
            "pkcs8.pem",
            "-RSAPublicKey_out",
            "-outform",
            "DER",
            "-out",
            "public.der",
        ]);
        openssl(&["rsa", "-in", "pkcs8.pem", "-pubout", "-out", "public.pem"]);
        Self {
            public_pem: std::fs::read_to_string(dir.join("public.pem")).unwrap(),
            pkcs1_pem: std::fs::read_to_string(dir.join("pkcs1.pem")).unwrap(),
            pkcs8_pem: std::fs::read_to_string(dir.join("pkcs8.pem")).unwrap(),
            public_der: std::fs::read(dir.join("public.der")).unwrap(),
        }
    }

    /// The JWT's header and claims if its RS256 signature is this key's; why not otherwise.
    pub fn verify(&self, jwt: &str) -> Result<(serde_json::Value, serde_json::Value), String> {
        let parts: Vec<&str> = jwt.split('.').collect();
        let [header, claims, signature] = parts[..] else {
            return Err("not three parts".into());
        };
        use base64::Engine;
        let decode = |part: &str| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(part)
                .map_err(|e| e.to_string())
        };
        let signature = decode(signature)?;
        ring::signature::UnparsedPublicKey::new(
            &ring::signature::RSA_PKCS1_2048_8192_SHA256,
            &self.public_der,
        )
        .verify(format!("{header}.{claims}").as_bytes(), &signature)
        .map_err(|_| "bad signature".to_string())?;
        let header: serde_json::Value =
            serde_json::from_slice(&decode(header)?).map_err(|e| e.to_string())?;
        if header["alg"] != "RS256" {
            return Err("alg is not RS256".into());
        }
        let claims = serde_json::from_slice(&decode(claims)?).map_err(|e| e.to_string())?;
        Ok((header, claims))
    }

    /// An RS256 JWT of `claims` signed with this key, as an identity provider issues one.
    pub fn sign(&self, claims: &serde_json::Value) -> String {
        use base64::Engine;
        let encode = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let header = encode(br#"{"alg":"RS256","typ":"JWT"}"#);
        let body = encode(claims.to_string().as_bytes());
        let input = format!("{header}.{body}");
        use rustls_pki_types::pem::PemObject;
        let der = rustls_pki_types::PrivatePkcs8KeyDer::from_pem_slice(self.pkcs8_pem.as_bytes())
            .unwrap();
        let pair = ring::signature::RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()).unwrap();
        let mut signature = vec![0u8; pair.public().modulus_len()];
        pair.sign(
            &ring::signature::RSA_PKCS1_SHA256,
            &ring::rand::SystemRandom::new(),
            input.as_bytes(),
            &mut signature,
        )
        .unwrap();
        format!("{input}.{}", encode(&signature))
    }

    /// A line from the middle of the private key, to grep output for.
    pub fn telltale(&self) -> String {
        self.pkcs1_pem.lines().nth(5).unwrap().to_string()
    }
}

/// A response's status and keystamp's machine-readable error code (`X-Keystamp-Error`), if any.
pub fn status_and_error_code(response: &reqwest::Response) -> (u16, Option<String>) {
    let code = response
        .headers()
        .get("x-keystamp-error")
        .map(|v| v.to_str().unwrap_or("").to_string());
    (response.status().as_u16(), code)
}

/// The bearer value `host`'s upstream received for `GET /who` through `keystamp` (the test
/// upstreams echo what they received), or keystamp's error code.
pub async fn stamped(keystamp: &KeystampProcess, host: &str) -> Result<String, String> {
    let response = keystamp
        .client()
        .get(format!("https://{host}/who"))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if let Some(code) = response.headers().get("x-keystamp-error") {
        return Err(code.to_str().unwrap_or("").to_string());
    }
    let echo: serde_json::Value = response.json().await.map_err(|e| e.to_string())?;
    let value = echo["headers"]["authorization"][0].as_str().unwrap_or("");
    Ok(value.trim_start_matches("Bearer ").to_string())
}

/// An agent's TLS client config: trusts only `ca_pem` (keystamp's CA), offers `alpn`.
pub fn agent_tls_config(ca_pem: &str, alpn: &[&[u8]]) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    use rustls_pki_types::pem::PemObject;
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config
}
