//! Minted credentials through the real binary: a fake GitHub (app token minting, revocation, and
//! an API that accepts only live installation tokens) and a fake Google token endpoint, both on
//! real TLS, both verifying every JWT keystamp signs against the public half of an RSA key pair
//! this test makes with `openssl` — signature, `iss`, `iat`, `exp`, `aud`, the requested scopes
//! and narrowing — the way the real services do.

// Test code: a panic is a failed assertion, which is what we want here.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::StatusCode;

use common::*;

const APP_ID: &str = "4242";
const INSTALLATION: u64 = 77;
const CLIENT_EMAIL: &str = "agent-runner@proj.iam.gserviceaccount.com";

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn rfc3339_in(seconds: i64) -> String {
    (time::OffsetDateTime::now_utc() + time::Duration::seconds(seconds))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

fn bearer(received: &Received) -> Option<String> {
    received
        .headers
        .get("authorization")?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::to_string)
}

/// One installation token the fake GitHub minted.
#[derive(Clone, Debug)]
struct Minted {
    token: String,
    expires: i64,
    repositories: serde_json::Value,
    permissions: serde_json::Value,
    revoked: bool,
}

/// GitHub as keystamp meets it: app JWTs checked, tokens minted with the narrowing asked for,
/// revocation recorded, and an API that answers 401 to an unknown, revoked or expired token.
#[derive(Default)]
struct FakeGithub {
    /// Lifetime of minted tokens, in seconds (GitHub's is an hour).
    lifetime: Mutex<i64>,
    minted: Mutex<Vec<Minted>>,
    /// JWTs received, to grep keystamp's output for.
    jwts: Mutex<Vec<String>>,
    jwt_rejections: Mutex<Vec<String>>,
    /// Tokens the API saw, in order, and whether each was accepted.
    api_calls: Mutex<Vec<(String, bool)>>,
    /// How long minting (POST) and revoking (DELETE) take: a slow GitHub.
    mint_delay: Mutex<Duration>,
    revoke_delay: Mutex<Duration>,
    /// Mint POSTs received, counted as they arrive (before any delay).
    mint_requests: std::sync::atomic::AtomicUsize,
}

impl FakeGithub {
    async fn start(
        ca: &TestCa,
        key: Arc<RsaKey>,
        lifetime: i64,
    ) -> (Arc<Self>, std::net::SocketAddr) {
        let fake = Arc::new(Self::default());
        *fake.lifetime.lock().unwrap() = lifetime;
        let handler_fake = fake.clone();
        let handler: Handler = Arc::new(move |received| handler_fake.answer(&key, received));
        let delay_fake = fake.clone();
        let delay: Delay = Arc::new(move |received: &Received| match received.method {
            http::Method::POST => {
                delay_fake
                    .mint_requests
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                *delay_fake.mint_delay.lock().unwrap()
            }
            http::Method::DELETE => *delay_fake.revoke_delay.lock().unwrap(),
            _ => Duration::ZERO,
        });
        let addr = serve_tls_with(ca, &["github.example.test"], handler, delay).await;
        (fake, addr)
    }

    fn answer(&self, key: &RsaKey, received: Received) -> (StatusCode, String) {
        let token = bearer(&received).unwrap_or_default();
        let mint_path = format!("/app/installations/{INSTALLATION}/access_tokens");
        if received.method == http::Method::POST && received.path == mint_path {
            self.jwts.lock().unwrap().push(token.clone());
            if let Err(why) = check_app_jwt(key, &token) {
                self.jwt_rejections.lock().unwrap().push(why);
                return (
                    StatusCode::UNAUTHORIZED,
                    r#"{"message":"A JSON web token could not be decoded"}"#.into(),
                );
            }
            let asked: serde_json::Value = serde_json::from_slice(&received.body).unwrap();
            let lifetime = *self.lifetime.lock().unwrap();
            let mut minted = self.minted.lock().unwrap();
            let token = format!("ghs_fake{:04}x{}", minted.len(), unix_now() % 10_000);
            minted.push(Minted {
                token: token.clone(),
                expires: unix_now() + lifetime,
                repositories: asked["repositories"].clone(),
                permissions: asked["permissions"].clone(),
                revoked: false,
            });
            let body = serde_json::json!({
                "token": token,
                "expires_at": rfc3339_in(lifetime),
                "permissions": asked["permissions"],
                "repository_selection": "selected",
            });
            return (StatusCode::CREATED, body.to_string());
        }
        let mut minted = self.minted.lock().unwrap();
        let known = minted.iter_mut().find(|m| m.token == token);
        if received.method == http::Method::DELETE && received.path == "/installation/token" {
            return match known {
                Some(m) if !m.revoked => {
                    m.revoked = true;
                    (StatusCode::NO_CONTENT, String::new())
                }
                _ => (
                    StatusCode::UNAUTHORIZED,
                    r#"{"message":"Bad credentials"}"#.into(),
                ),
            };
        }
        let live = known.is_some_and(|m| !m.revoked && m.expires > unix_now());
        self.api_calls.lock().unwrap().push((token.clone(), live));
        if !live {
            return (
                StatusCode::UNAUTHORIZED,
                r#"{"message":"Bad credentials"}"#.into(),
            );
        }
        (
            StatusCode::OK,
            serde_json::json!({ "path": received.path, "token": token }).to_string(),
        )
    }

    fn minted(&self) -> Vec<Minted> {
        self.minted.lock().unwrap().clone()
    }

    fn narrowing_of(&self, token: &str) -> (serde_json::Value, serde_json::Value) {
        let minted = self.minted();
        let m = minted
            .iter()
            .find(|m| m.token == token)
            .expect("a token the fake minted");
        (m.repositories.clone(), m.permissions.clone())
    }
}

/// GitHub's rules for an app JWT: RS256 by the app's key, `iss` the app id, `iat` in the past,
/// `exp` in the future and no more than 10 minutes ahead.
fn check_app_jwt(key: &RsaKey, jwt: &str) -> Result<(), String> {
    let (_, claims) = key.verify(jwt)?;
    let now = unix_now();
    let (iat, exp) = (
        claims["iat"].as_i64().unwrap_or(0),
        claims["exp"].as_i64().unwrap_or(0),
    );
    if claims["iss"] != APP_ID {
        return Err(format!("iss {}", claims["iss"]));
    }
    if iat > now - 30 || iat < now - 120 {
        return Err(format!("iat {} for now {now}", iat));
    }
    if exp <= now || exp > now + 600 {
        return Err(format!("exp {} for now {now}", exp));
    }
    Ok(())
}

/// Writes the app key and starts the fake GitHub and keystamp with `credentials` and `route`.
struct GithubRig {
    fake: Arc<FakeGithub>,
    key: Arc<RsaKey>,
    keystamp: KeystampProcess,
    _dir: tempfile::TempDir,
}

/// A per-task GitHub credential `gh` with `extra` keys, on a bearer route, for agents `agents`.
async fn per_task_rig(
    lifetime: i64,
    extra: serde_json::Value,
    agents: &[(&str, &str)],
) -> GithubRig {
    let mut app = serde_json::json!({ "permissions": { "contents": "read" }, "mint": "per_task" });
    app.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    GithubRig::start(
        lifetime,
        &[("gh", app)],
        serde_json::json!({ "host": "github.example.test", "credential": "gh", "inject": { "type": "bearer" } }),
        agents,
    )
    .await
}

/// Status and keystamp's error code of one request for `task`.
async fn for_task(client: &reqwest::Client, task: &str) -> (u16, Option<String>, Option<String>) {
    let response = client
        .get("https://github.example.test/user/repos")
        .header("Keystamp-Task", task)
        .send()
        .await
        .unwrap();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    };
    (
        response.status().as_u16(),
        header("x-keystamp-error"),
        header("retry-after"),
    )
}

impl GithubRig {
    async fn start(
        lifetime: i64,
        credentials: &[(&str, serde_json::Value)],
        route: serde_json::Value,
        agents: &[(&str, &str)],
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let key = Arc::new(RsaKey::generate(dir.path()));
        let ca = TestCa::new("providers");
        let ca_path = write_pem(dir.path(), "providers-ca.pem", &ca.pem);
        let (fake, addr) = FakeGithub::start(&ca, key.clone(), lifetime).await;
        let mut config = TestConfig::new();
        config.trust(&ca_path).pin("github.example.test:443", addr);
        let identities: serde_json::Map<String, serde_json::Value> = agents
            .iter()
            .map(|(name, _)| {
                let source =
                    serde_json::json!({ "source": { "file": format!("./secrets/id-{name}") } });
                (name.to_string(), source)
            })
            .collect();
        if !identities.is_empty() {
            config.set("identities", serde_json::Value::Object(identities));
        }
        for (name, app) in credentials {
            let mut source = serde_json::json!({
                "app_id": APP_ID.parse::<u64>().unwrap(),
                "installation_id": INSTALLATION,
                "api_url": "https://github.example.test",
                "private_key": { "file": "./secrets/app.pem" },
            });
            let mut app = app.as_object().unwrap().clone();
            // `timeout` belongs beside `github_app`, not inside it.
            let timeout = app.remove("timeout");
            source.as_object_mut().unwrap().extend(app);
            let mut wrapped = serde_json::json!({ "github_app": source });
            if let Some(timeout) = timeout {
                wrapped["timeout"] = timeout;
            }
            config.credential(name, serde_json::json!({ "source": wrapped }));
        }
        config.routes.push(route);
        let id_files: Vec<(String, &str)> = agents
            .iter()
            .map(|(name, token)| (format!("id-{name}"), *token))
            .collect();
        let mut secrets: Vec<(&str, &str)> = vec![("app.pem", &key.pkcs1_pem)];
        secrets.extend(id_files.iter().map(|(name, token)| (name.as_str(), *token)));
        let keystamp = KeystampProcess::start(&config.yaml(), &secrets);
        Self {
            fake,
            key,
            keystamp,
            _dir: dir,
        }
    }

    /// Asserts no private key, minted token or JWT appears in keystamp's log, metrics or status.
    async fn assert_no_secret_leaked(&self) {
        let mut output = self.keystamp.log();
        output.push_str(&self.keystamp.admin_get("/metrics").await);
        output.push_str(&self.keystamp.admin_get("/status").await);
        output.push_str(&serde_json::to_string(&self.keystamp.audit()).unwrap());
        assert!(
            !output.contains(&self.key.telltale()),
            "the private key leaked"
        );
        for minted in self.fake.minted() {
            assert!(!output.contains(&minted.token), "a minted token leaked");
        }
        for jwt in self.fake.jwts.lock().unwrap().iter() {
            let signature = jwt.rsplit('.').next().unwrap();
            assert!(!output.contains(signature), "an app JWT leaked");
        }
    }
}

/// The token keystamp stamped, as the fake API echoed it.
async fn stamped(response: reqwest::Response) -> String {
    assert_eq!(
        response.status(),
        200,
        "{:?}",
        response.headers().get("x-keystamp-error")
    );
    let body: serde_json::Value = response.json().await.unwrap();
    body["token"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn agents_get_their_own_narrowed_github_app_tokens() {
    let rig = GithubRig::start(
        3600,
        &[
            (
                "gh-read",
                serde_json::json!({ "repositories": ["keystamp"], "permissions": { "contents": "read" } }),
            ),
            (
                "gh-write",
                serde_json::json!({ "repositories": ["keystamp", "docs"], "permissions": { "contents": "read", "issues": "write" } }),
            ),
        ],
        serde_json::json!({
            "host": "github.example.test",
            "inject": { "type": "bearer" },
            "agents": {
                "reader": { "credential": "gh-read", "methods": ["GET"] },
                "writer": { "credential": "gh-write" },
            },
        }),
        &[("reader", "r-token"), ("writer", "w-token")],
    )
    .await;
    let reader = rig.keystamp.agent_client(Some(("reader", "r-token")));
    let writer = rig.keystamp.agent_client(Some(("writer", "w-token")));
    let url = "https://github.example.test/repos/acme/keystamp/contents/README.md";

    let read_token = stamped(
        reader
            .get(url)
            .header("authorization", "Bearer agent-held-nothing")
            .send()
            .await
            .unwrap(),
    )
    .await;
    let write_token = stamped(
        writer
            .post("https://github.example.test/repos/acme/keystamp/issues")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_ne!(read_token, write_token, "two narrowings are two tokens");
    assert_eq!(
        rig.fake.narrowing_of(&read_token),
        (
            serde_json::json!(["keystamp"]),
            serde_json::json!({ "contents": "read" })
        )
    );
    assert_eq!(
        rig.fake.narrowing_of(&write_token),
        (
            serde_json::json!(["keystamp", "docs"]),
            serde_json::json!({ "contents": "read", "issues": "write" })
        )
    );
    // Minted once each at load, then reused: GitHub limits how often an app may mint.
    assert_eq!(
        stamped(reader.get(url).send().await.unwrap()).await,
        read_token
    );
    assert_eq!(rig.fake.minted().len(), 2);
    assert!(
        rig.fake.jwt_rejections.lock().unwrap().is_empty(),
        "{:?}",
        rig.fake.jwt_rejections
    );

    let denied = reader
        .post("https://github.example.test/repos/acme/keystamp/issues")
        .send()
        .await
        .unwrap();
    assert_eq!(denied.status(), 403);
    assert_eq!(denied.headers()["x-keystamp-error"], "scope_denied");

    let status = rig.keystamp.status().await;
    let read = status["credentials"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "gh-read")
        .unwrap()
        .clone();
    assert_eq!(read["source"], "github_app");
    assert_eq!(
        read["minted"]["repositories"],
        serde_json::json!(["keystamp"])
    );
    assert_eq!(
        read["minted"]["permissions"],
        serde_json::json!({ "contents": "read" })
    );
    assert!(read["expires_at"].is_string() && read["fingerprint"].is_string());
    let read_line = |l: &serde_json::Value| {
        l["agent"] == "reader"
            && l["credential"] == "gh-read"
            && l["fingerprint"] == read["fingerprint"]
    };
    // Audit lines are written in batches, up to 20 ms after the request ends.
    assert!(
        eventually(Duration::from_secs(3), || async {
            rig.keystamp.audit().iter().any(read_line)
        })
        .await,
        "{:#?}",
        rig.keystamp.audit()
    );
    rig.assert_no_secret_leaked().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn short_lived_tokens_are_reminted_ahead_and_never_sent_expired() {
    // Four-second tokens stand in for GitHub's hour: a simulated hour is ~15 lifetimes.
    let rig = GithubRig::start(
        4,
        &[("gh", serde_json::json!({ "permissions": { "contents": "read" } }))],
        serde_json::json!({ "host": "github.example.test", "credential": "gh", "inject": { "type": "bearer" } }),
        &[],
    )
    .await;
    let client = rig.keystamp.client();
    let started = std::time::Instant::now();
    let mut answered = 0;
    while started.elapsed() < Duration::from_secs(10) {
        let response = client
            .get("https://github.example.test/user/repos")
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.status(),
            200,
            "a request went out with a token GitHub no longer takes"
        );
        answered += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let calls = rig.fake.api_calls.lock().unwrap().clone();
    assert_eq!(calls.len(), answered);
    assert!(
        calls.iter().all(|(_, live)| *live),
        "every token sent was live"
    );
    let tokens_used: std::collections::BTreeSet<_> = calls.iter().map(|(t, _)| t.clone()).collect();
    let minted = rig.fake.minted().len();
    assert!(
        minted >= 4,
        "re-minted ahead of each expiry: {minted} mints in 10 s"
    );
    assert!(tokens_used.len() >= 4, "{} tokens used", tokens_used.len());
    assert!(rig.fake.jwt_rejections.lock().unwrap().is_empty());
    rig.assert_no_secret_leaked().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn per_task_tokens_are_the_tasks_own_and_revoked_when_it_ends_or_idles() {
    let rig = GithubRig::start(
        3600,
        &[(
            "gh",
            serde_json::json!({ "repositories": ["keystamp"], "permissions": { "pull_requests": "write" }, "mint": "per_task", "task_idle": "2s" }),
        )],
        serde_json::json!({ "host": "github.example.test", "credential": "gh", "inject": { "type": "bearer" } }),
        &[("runner", "run-token")],
    )
    .await;
    let client = rig.keystamp.agent_client(Some(("runner", "run-token")));
    let url = "https://github.example.test/repos/acme/keystamp/pulls";
    let send = |task: Option<&'static str>| {
        let mut request = client.get(url);
        if let Some(task) = task {
            request = request.header("Keystamp-Task", task);
        }
        async move { stamped(request.send().await.unwrap()).await }
    };
    let shared = send(None).await;
    let first = send(Some("build-1")).await;
    let second = send(Some("review-2")).await;
    assert_ne!(first, shared);
    assert_ne!(first, second);
    assert_eq!(send(Some("build-1")).await, first, "a task keeps its token");
    assert_eq!(
        rig.fake.narrowing_of(&first),
        (
            serde_json::json!(["keystamp"]),
            serde_json::json!({ "pull_requests": "write" })
        ),
        "task tokens carry the credential's narrowing"
    );
    let status = rig.keystamp.status().await;
    assert_eq!(status["credentials"][0]["minted"]["live_task_tokens"], 2);

    // The task ends: its token is revoked at GitHub, and a new request for it mints afresh.
    let ended: serde_json::Value = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .post(format!("http://{}/tasks/build-1/end", rig.keystamp.admin))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ended["tokens_retired"], 1);
    let revoked = |token: String| {
        let fake = rig.fake.clone();
        async move {
            eventually(Duration::from_secs(3), || {
                let fake = fake.clone();
                let token = token.clone();
                async move { fake.minted().iter().any(|m| m.token == token && m.revoked) }
            })
            .await
        }
    };
    assert!(
        revoked(first.clone()).await,
        "the ended task's token was revoked"
    );
    // The other task idles past task_idle (2 s): revoked too, without any request.
    assert!(
        revoked(second.clone()).await || {
            tokio::time::sleep(Duration::from_secs(2)).await;
            revoked(second.clone()).await
        },
        "the idle task's token was revoked"
    );
    assert!(
        !rig.fake
            .minted()
            .iter()
            .any(|m| m.token == shared && m.revoked),
        "the shared token lives on"
    );

    let audit = rig.keystamp.audit();
    let fingerprint_of = |task: &str| {
        audit
            .iter()
            .find(|l| l["task"] == task)
            .map(|l| l["fingerprint"].clone())
            .unwrap()
    };
    assert_ne!(
        fingerprint_of("build-1"),
        fingerprint_of("review-2"),
        "a leaked task token traces to one task"
    );
    rig.assert_no_secret_leaked().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_private_key_is_a_clear_503_and_a_fixed_key_mints() {
    let rig = GithubRig::start(
        3600,
        &[("gh", serde_json::json!({}))],
        serde_json::json!({ "host": "github.example.test", "credential": "gh", "inject": { "type": "bearer" } }),
        &[],
    )
    .await;
    // Break the key on disk: the token minted with the good key is kept (it is still valid).
    let key_path = rig.keystamp.dir.path().join("secrets/app.pem");
    std::fs::write(
        &key_path,
        "-----BEGIN RSA PRIVATE KEY-----\nbm90IGEga2V5\n-----END RSA PRIVATE KEY-----\n",
    )
    .unwrap();
    let client = rig.keystamp.client();
    assert!(
        eventually(Duration::from_secs(5), || async {
            rig.keystamp.status().await["credentials"][0]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("private key is not a PEM RSA key"))
        })
        .await
    );
    assert_eq!(
        client
            .get("https://github.example.test/user")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // The good key again, as PKCS#8 this time: a changed key re-mints.
    let before = rig.fake.minted().len();
    std::fs::write(&key_path, &rig.key.pkcs8_pem).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            rig.fake.minted().len() > before
        })
        .await,
        "a key that changes on disk re-mints"
    );
    rig.assert_no_secret_leaked().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_usable_key_at_start_the_route_answers_credential_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = TestConfig::new();
    config.credential(
        "gh",
        serde_json::json!({ "source": { "github_app": {
            "app_id": 1, "installation_id": 2, "api_url": "https://github.example.test",
            "private_key": { "file": "./secrets/app.pem" },
        } } }),
    );
    config.bearer_route("github.example.test", "gh", serde_json::json!({}));
    let keystamp = KeystampProcess::start(&config.yaml(), &[("app.pem", "not a key at all")]);
    let response = keystamp
        .client()
        .get("https://github.example.test/user")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(
        response.headers()["x-keystamp-error"],
        "credential_unavailable"
    );
    let status = keystamp.status().await;
    assert_eq!(
        status["credentials"][0]["last_error"],
        "private key is not a PEM RSA key (PKCS#1 or PKCS#8)"
    );
    drop(dir);
}

/// Google's token endpoint: the JWT-bearer grant, its assertion checked as Google does.
#[tokio::test(flavor = "multi_thread")]
async fn google_service_account_tokens_are_exchanged_for_the_configured_scopes() {
    let dir = tempfile::tempdir().unwrap();
    let key = Arc::new(RsaKey::generate(dir.path()));
    let ca = TestCa::new("providers");
    let ca_path = write_pem(dir.path(), "providers-ca.pem", &ca.pem);
    let token_uri = "https://oauth2.example.test/token";
    let scopes = "https://www.googleapis.com/auth/cloud-platform https://www.googleapis.com/auth/devstorage.read_only";
    let issued: Arc<Mutex<Vec<String>>> = Arc::default();
    let problems: Arc<Mutex<Vec<String>>> = Arc::default();
    let assertions: Arc<Mutex<Vec<String>>> = Arc::default();
    let handler: Handler = {
        let (key, issued, problems, assertions) = (
            key.clone(),
            issued.clone(),
            problems.clone(),
            assertions.clone(),
        );
        Arc::new(move |received: Received| {
            if received.path == "/token" {
                let form: HashMap<String, String> = form_urlencoded::parse(&received.body)
                    .into_owned()
                    .collect();
                let assertion = form.get("assertion").cloned().unwrap_or_default();
                assertions.lock().unwrap().push(assertion.clone());
                let checked = key.verify(&assertion).and_then(|(header, claims)| {
                    let now = unix_now();
                    let (iat, exp) = (
                        claims["iat"].as_i64().unwrap_or(0),
                        claims["exp"].as_i64().unwrap_or(0),
                    );
                    let problems = [
                        (
                            form.get("grant_type").map(String::as_str)
                                != Some("urn:ietf:params:oauth:grant-type:jwt-bearer"),
                            "grant_type",
                        ),
                        (header["kid"] != "key-1", "kid"),
                        (claims["iss"] != CLIENT_EMAIL, "iss"),
                        (claims["aud"] != token_uri, "aud"),
                        (claims["scope"] != scopes, "scope"),
                        (claims["sub"] != "ops@example.com", "sub"),
                        (
                            (iat - now).abs() > 60 || exp - iat > 3600 || exp <= now,
                            "iat/exp",
                        ),
                    ];
                    match problems.iter().find(|(bad, _)| *bad) {
                        Some((_, what)) => Err(what.to_string()),
                        None => Ok(()),
                    }
                });
                if let Err(why) = checked {
                    problems.lock().unwrap().push(why);
                    return (
                        StatusCode::BAD_REQUEST,
                        r#"{"error":"invalid_grant"}"#.into(),
                    );
                }
                let mut issued = issued.lock().unwrap();
                let token = format!("ya29.fake-{}", issued.len());
                issued.push(token.clone());
                return (StatusCode::OK, serde_json::json!({ "access_token": token, "expires_in": 3599, "token_type": "Bearer" }).to_string());
            }
            let token = bearer(&received).unwrap_or_default();
            (
                StatusCode::OK,
                serde_json::json!({ "token": token }).to_string(),
            )
        })
    };
    let addr = serve_tls(
        &ca,
        &["oauth2.example.test", "aiplatform.example.test"],
        handler,
    )
    .await;
    let key_file = serde_json::json!({
        "type": "service_account",
        "project_id": "proj",
        "private_key_id": "key-1",
        "private_key": key.pkcs8_pem,
        "client_email": CLIENT_EMAIL,
        "token_uri": token_uri,
    })
    .to_string();
    let mut config = TestConfig::new();
    config
        .trust(&ca_path)
        .pin("oauth2.example.test:443", addr)
        .pin("aiplatform.example.test:443", addr)
        .credential(
            "vertex",
            serde_json::json!({ "source": { "google_service_account": {
                "key": { "file": "./secrets/sa.json" },
                "scopes": scopes.split(' ').collect::<Vec<_>>(),
                "subject": "ops@example.com",
            } } }),
        )
        .bearer_route("aiplatform.example.test", "vertex", serde_json::json!({}));
    let keystamp = KeystampProcess::start(&config.yaml(), &[("sa.json", &key_file)]);
    let response = keystamp
        .client()
        .post("https://aiplatform.example.test/v1/projects/proj/locations/us-central1/publishers/google/models/gemini:generateContent")
        .send()
        .await
        .unwrap();
    assert_eq!(stamped(response).await, "ya29.fake-0");
    assert!(
        problems.lock().unwrap().is_empty(),
        "{:?}",
        problems.lock().unwrap()
    );
    let status = keystamp.status().await;
    let vertex = &status["credentials"][0];
    assert_eq!(vertex["source"], "google_service_account");
    assert_eq!(vertex["minted"]["scopes"].as_array().unwrap().len(), 2);
    let expires = time::OffsetDateTime::parse(
        vertex["expires_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let left = expires - time::OffsetDateTime::now_utc();
    assert!(
        left > time::Duration::seconds(3500) && left <= time::Duration::seconds(3599),
        "expires_in made absolute on receipt"
    );
    let mut output = keystamp.log();
    output.push_str(&keystamp.admin_get("/metrics").await);
    output.push_str(&status.to_string());
    assert!(!output.contains(&key.telltale()) && !output.contains("ya29.fake"));
    for assertion in assertions.lock().unwrap().iter() {
        assert!(
            !output.contains(assertion.rsplit('.').next().unwrap()),
            "the assertion leaked"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn one_agent_cycling_task_ids_cannot_exhaust_the_apps_minting() {
    let rig = per_task_rig(
        3600,
        serde_json::json!({ "mint_rate": { "per_second": 2, "burst": 5 }, "max_tasks_per_agent": 50 }),
        &[("cycler", "c-token"), ("other", "o-token")],
    )
    .await;
    let cycler = rig.keystamp.agent_client(Some(("cycler", "c-token")));
    // The credential's shared token was minted at start; only task mints count below.
    let at_start = rig.fake.minted().len();
    let started = std::time::Instant::now();
    let mut limited = 0;
    for i in 0..40 {
        let (status, code, retry_after) = for_task(&cycler, &format!("cycle-{i}")).await;
        if status == 429 {
            assert_eq!(code.as_deref(), Some("mint_limited"));
            assert!(retry_after.is_some_and(|s| s.parse::<u64>().unwrap() >= 1));
            limited += 1;
        } else {
            assert_eq!(status, 200);
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let mints = rig.fake.minted().len() - at_start;
    // Burst 5, then 2/s: never more than that reached GitHub.
    assert!(
        mints as f64 <= 5.0 + 2.0 * elapsed + 1.0,
        "{mints} mints in {elapsed:.1} s"
    );
    assert!(limited >= 40 - mints, "{limited} refused of 40");
    assert_eq!(
        rig.fake
            .mint_requests
            .load(std::sync::atomic::Ordering::SeqCst),
        mints + at_start,
        "a refused mint never reached GitHub"
    );

    // A per-agent cap of live task tokens.
    let rig = per_task_rig(
        3600,
        serde_json::json!({ "max_tasks_per_agent": 3 }),
        &[("cycler", "c-token"), ("other", "o-token")],
    )
    .await;
    let cycler = rig.keystamp.agent_client(Some(("cycler", "c-token")));
    for i in 0..3 {
        assert_eq!(for_task(&cycler, &format!("t-{i}")).await.0, 200);
    }
    let (status, code, _) = for_task(&cycler, "t-3").await;
    assert_eq!((status, code.as_deref()), (429, Some("mint_limited")));
    assert_eq!(
        for_task(&cycler, "t-0").await.0,
        200,
        "a live task keeps working"
    );
    let other = rig.keystamp.agent_client(Some(("other", "o-token")));
    assert_eq!(
        for_task(&other, "o-1").await.0,
        200,
        "other agents still mint"
    );
    assert_eq!(
        rig.fake.minted().len(),
        5,
        "the shared token and four task tokens"
    );
    rig.assert_no_secret_leaked().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_first_requests_of_a_task_share_one_slow_mint_and_its_outcome() {
    let rig = per_task_rig(3600, serde_json::json!({ "timeout": "2s" }), &[]).await;
    let at_start = rig
        .fake
        .mint_requests
        .load(std::sync::atomic::Ordering::SeqCst);
    *rig.fake.mint_delay.lock().unwrap() = Duration::from_secs(3);
    let client = rig.keystamp.client();
    let started = std::time::Instant::now();
    let waiters = (0..5).map(|_| {
        let client = client.clone();
        async move {
            let answer = for_task(&client, "slow-1").await;
            (answer, started.elapsed())
        }
    });
    let answers = futures_util::future::join_all(waiters).await;
    for ((status, code, _), at) in &answers {
        assert_eq!(
            (*status, code.as_deref()),
            (503, Some("credential_unavailable"))
        );
        assert!(
            *at < Duration::from_millis(3500),
            "a waiter answered at {at:?}"
        );
    }
    assert_eq!(
        rig.fake
            .mint_requests
            .load(std::sync::atomic::Ordering::SeqCst)
            - at_start,
        1,
        "five waiters, one mint"
    );
    // The endpoint recovers: the next request mints afresh.
    *rig.fake.mint_delay.lock().unwrap() = Duration::ZERO;
    assert_eq!(for_task(&client, "slow-1").await.0, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_minted_token_is_never_stamped_and_a_short_one_is_not_reminted_per_request() {
    // GitHub hands out task tokens that expired ten seconds ago.
    let rig = per_task_rig(3600, serde_json::json!({}), &[]).await;
    *rig.fake.lifetime.lock().unwrap() = -10;
    let client = rig.keystamp.client();
    for _ in 0..3 {
        let (status, code, _) = for_task(&client, "late-1").await;
        assert_eq!((status, code.as_deref()), (503, Some("credential_expired")));
    }
    assert!(
        rig.fake.api_calls.lock().unwrap().is_empty(),
        "an expired token reached the API"
    );
    let status = rig.keystamp.status().await;
    let skew = status["credentials"][0]["minted"]["clock_skew_s"].as_i64();
    assert!(
        skew.is_some_and(|s| s.abs() <= 2),
        "clock skew in /status: {status}"
    );

    // Two-minute tokens (under the 5-minute renewal margin): reused, not minted per request.
    let rig = per_task_rig(3600, serde_json::json!({}), &[]).await;
    *rig.fake.lifetime.lock().unwrap() = 120;
    let at_start = rig.fake.minted().len();
    let client = rig.keystamp.client();
    for _ in 0..10 {
        assert_eq!(for_task(&client, "short-1").await.0, 200);
    }
    assert_eq!(
        rig.fake.minted().len() - at_start,
        1,
        "a short token was re-minted per request"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_retired_mid_mint_and_at_exit_are_all_revoked() {
    let mut rig = per_task_rig(
        3600,
        serde_json::json!({ "max_tasks": 2, "mint_rate": { "per_second": 100, "burst": 100 } }),
        &[],
    )
    .await;
    // Slow mints: four tasks start at once, two are evicted by max_tasks while minting.
    *rig.fake.mint_delay.lock().unwrap() = Duration::from_millis(300);
    let client = rig.keystamp.client();
    let starts = (0..4).map(|i| {
        let client = client.clone();
        async move { for_task(&client, &format!("race-{i}")).await }
    });
    futures_util::future::join_all(starts).await;
    *rig.fake.mint_delay.lock().unwrap() = Duration::ZERO;
    let revoked_count = |fake: &FakeGithub| fake.minted().iter().filter(|m| m.revoked).count();
    let minted = rig.fake.minted().len() - 1;
    assert_eq!(minted, 4, "four task tokens beside the shared one");
    assert!(
        eventually(Duration::from_secs(3), || async {
            revoked_count(&rig.fake) >= minted - 2
        })
        .await,
        "tokens evicted while minting were never revoked: {:?}",
        rig.fake.minted()
    );

    // Thirty live tokens and a 200 ms DELETE: revoked together on the way out.
    let rig2 = per_task_rig(
        3600,
        serde_json::json!({ "mint_rate": { "per_second": 100, "burst": 100 } }),
        &[],
    )
    .await;
    drop(std::mem::replace(&mut rig, rig2));
    let client = rig.keystamp.client();
    let starts = (0..30).map(|i| {
        let client = client.clone();
        async move { for_task(&client, &format!("live-{i}")).await.0 }
    });
    assert!(futures_util::future::join_all(starts)
        .await
        .iter()
        .all(|s| *s == 200));
    *rig.fake.revoke_delay.lock().unwrap() = Duration::from_millis(200);
    assert!(rig.keystamp.terminate(), "keystamp did not exit");
    assert_eq!(
        revoked_count(&rig.fake),
        30,
        "live tokens left unrevoked at exit: {}",
        rig.keystamp.log()
    );
}
