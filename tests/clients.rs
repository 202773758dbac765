//! Real agents in other runtimes (curl, Python `requests`, Node undici) configured only through
//! environment variables, each getting its own credential stamped and keystamp's errors typed.
//! `scripts/test` installs the Python and Node packages under `target/client-deps`.

// Test code: a panic is a failed assertion, which is what we want here.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use common::*;
use serde_json::Value;

fn deps_dir() -> PathBuf {
    std::env::var_os("KEYSTAMP_CLIENT_DEPS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/client-deps"))
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/clients")
        .join(name)
}

struct Agents {
    keystamp: TestKeystamp,
    upstream: TestUpstream,
    plain: TestUpstream,
}

async fn agents() -> Agents {
    let upstream_ca = Arc::new(TestCa::new("upstream"));
    let upstream = TestUpstream::start(UpstreamKind::Tls {
        ca: upstream_ca.clone(),
        h2: true,
    })
    .await;
    let plain = TestUpstream::start(UpstreamKind::Plain).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_path = write_pem(dir.path(), "upstream-ca.pem", &upstream_ca.pem);
    let mut yaml = example_config(upstream.addr, &ca_path, "deny");
    yaml = yaml.replace(
        "resolve:\n",
        &format!("resolve:\n  plain.test:80: {}\n", plain.addr),
    );
    // Plain http:// is stamped only on a route that opts out of tls_only.
    yaml.push_str(
        "  - host: plain.test\n    credential: example\n    inject: { type: bearer }\n    tls_only: false\n",
    );
    let keystamp = TestKeystamp::start(
        &yaml,
        &[("example", EXAMPLE_SECRET), ("other", OTHER_SECRET)],
    )
    .await;
    std::mem::forget(dir);
    Agents {
        keystamp,
        upstream,
        plain,
    }
}

const URLS: [&str; 4] = [
    "https://api.example.test/v1/chat",
    "https://a.other.test/v1/items",
    "https://a.other.test/admin",
    "http://plain.test/p",
];

/// Runs an agent command with proxy and CA settings in its environment only.
fn run_agent(mut command: Command, agents: &Agents) -> Vec<Value> {
    let proxy = agents.keystamp.proxy_url();
    let ca = &agents.keystamp.ca_path;
    command
        .args(URLS)
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .env("HTTPS_PROXY", &proxy)
        .env("https_proxy", &proxy)
        .env("HTTP_PROXY", &proxy)
        .env("http_proxy", &proxy)
        .env("SSL_CERT_FILE", ca)
        .env("REQUESTS_CA_BUNDLE", ca)
        .env("CURL_CA_BUNDLE", ca)
        .env("NODE_EXTRA_CA_CERTS", ca);
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{command:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn assert_agent_results(results: &[Value], agents: &Agents) {
    assert_eq!(results.len(), URLS.len(), "{results:?}");
    let echo =
        |i: usize| -> Value { serde_json::from_str(results[i]["body"].as_str().unwrap()).unwrap() };
    assert_eq!(results[0]["status"], 200);
    assert_eq!(
        echo(0)["headers"]["authorization"],
        serde_json::json!([format!("Bearer {EXAMPLE_SECRET}")])
    );
    assert_eq!(results[1]["status"], 200);
    assert_eq!(
        echo(1)["headers"]["x-api-key"],
        serde_json::json!([format!("key={OTHER_SECRET}")])
    );
    assert_eq!(
        echo(1)["headers"].get("authorization"),
        None,
        "the agent's own key must be stripped"
    );
    assert_eq!(results[2]["status"], 403);
    assert_eq!(results[2]["error"], "route_denied");
    assert_eq!(results[3]["status"], 200);
    assert_eq!(
        echo(3)["headers"]["authorization"],
        serde_json::json!([format!("Bearer {EXAMPLE_SECRET}")])
    );
    assert!(
        agents
            .upstream
            .seen
            .requests
            .load(std::sync::atomic::Ordering::SeqCst)
            >= 2
    );
    assert!(
        agents
            .plain
            .seen
            .requests
            .load(std::sync::atomic::Ordering::SeqCst)
            >= 1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn python_requests_through_keystamp() {
    let agents = agents().await;
    let python = deps_dir().join("venv/bin/python");
    assert!(
        python.exists(),
        "{} missing: run scripts/test, which installs requests",
        python.display()
    );
    let mut command = Command::new(python);
    command.arg(script("agent.py"));
    let results = run_blocking(command, &agents).await;
    assert_agent_results(&results, &agents);
}

#[tokio::test(flavor = "multi_thread")]
async fn node_undici_through_keystamp() {
    let agents = agents().await;
    let modules = deps_dir().join("node/node_modules");
    assert!(
        modules.join("undici").exists(),
        "{} missing: run scripts/test, which installs undici",
        modules.display()
    );
    // ESM resolves packages next to the script, so run a copy placed beside node_modules.
    let copy = deps_dir().join("node/agent.mjs");
    std::fs::copy(script("agent.mjs"), &copy).unwrap();
    let mut command = Command::new("node");
    command.arg(copy);
    let results = run_blocking(command, &agents).await;
    assert_agent_results(&results, &agents);
}

#[tokio::test(flavor = "multi_thread")]
async fn curl_through_keystamp() {
    let agents = agents().await;
    let mut command = Command::new("sh");
    // One JSON line per URL, the same shape the other agents print.
    command.arg("-c").arg(
        r#"for url in "$@"; do
             status=$(curl -sS --max-time 20 -H 'Authorization: Bearer agent-own-key' -D headers -o body -w '%{http_code}' "$url")
             error=$(grep -i '^x-keystamp-error:' headers | cut -d' ' -f2 | tr -d '\r')
             python3 -c 'import json,sys; print(json.dumps({"status": int(sys.argv[1]), "error": sys.argv[2] or None, "body": open("body").read()}))' "$status" "$error"
           done"#,
    );
    command.arg("agent");
    command.current_dir(agents.keystamp.dir.path());
    let results = run_blocking(command, &agents).await;
    assert_agent_results(&results, &agents);
}

async fn run_blocking(command: Command, agents: &Agents) -> Vec<Value> {
    // The agent is a child process; keystamp and the upstream keep serving on the runtime's
    // worker threads while this one waits.
    tokio::task::block_in_place(|| run_agent(command, agents))
}
