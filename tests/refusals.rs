//! A refusal keystamp makes before forwarding (here 403 `route_denied`) reaches an agent that is
//! still uploading a body, as that refusal and not as a transport error: curl over HTTP/1.1 and
//! h2 and Python `requests`, 30 tries each with a 1 MiB body, through the real binary.

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

use common::*;

const TRIES: usize = 30;
/// The refused URL: the route only stamps `/v1/`.
const REFUSED: &str = "https://api.example.test/admin/upload";

fn python() -> PathBuf {
    let deps = std::env::var_os("KEYSTAMP_CLIENT_DEPS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/client-deps"));
    deps.join("venv/bin/python")
}

async fn rig() -> (KeystampProcess, TestUpstream, tempfile::TempDir, PathBuf) {
    let (upstream, ca, ca_dir) = tls_upstream().await;
    let mut config = TestConfig::new();
    config
        .trust(&ca)
        .pin("api.example.test:443", upstream.addr)
        .credential_file("key", serde_json::json!({}))
        .bearer_route(
            "api.example.test",
            "key",
            serde_json::json!({ "path_prefix": "/v1/" }),
        );
    let keystamp = KeystampProcess::start(&config.yaml(), &[("key", "refusal-secret-1")]);
    let body = ca_dir.path().join("body.bin");
    std::fs::write(&body, vec![b'x'; 1024 * 1024]).unwrap();
    (keystamp, upstream, ca_dir, body)
}

/// How many of `TRIES` curl uploads through `proxy` (trusting `ca`) read keystamp's 403
/// `route_denied`.
fn curl_refusals_read(proxy: std::net::SocketAddr, ca: &Path, body: &Path, http: &str) -> usize {
    (0..TRIES)
        .filter(|_| {
            let output = Command::new("curl")
                .args(["-s", "-o", "/dev/null", "-D", "-", http, "-X", "POST"])
                .arg("--data-binary")
                .arg(format!("@{}", body.display()))
                .arg("--cacert")
                .arg(ca)
                .args(["-x", &format!("http://{proxy}"), REFUSED])
                .output()
                .unwrap();
            let head = String::from_utf8_lossy(&output.stdout).to_ascii_lowercase();
            output.status.success()
                && head.contains(" 403")
                && head.contains("x-keystamp-error: route_denied")
        })
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn refusals_of_uploads_reach_curl_and_python_as_refusals() {
    let (keystamp, upstream, _dir, body) = rig().await;
    let before = upstream.seen.count();
    let (proxy, ca) = (keystamp.proxy, keystamp.home.join("run/ca.crt"));
    let (h1, h2) = tokio::task::spawn_blocking(move || {
        (
            curl_refusals_read(proxy, &ca, &body, "--http1.1"),
            curl_refusals_read(proxy, &ca, &body, "--http2"),
        )
    })
    .await
    .unwrap();
    let script = format!(
        r#"
import sys, requests
data = b"x" * (1024 * 1024)
read = 0
for _ in range({TRIES}):
    try:
        r = requests.post("{REFUSED}", data=data, timeout=20)
        read += r.status_code == 403 and r.headers.get("x-keystamp-error") == "route_denied"
    except requests.RequestException as e:
        print(type(e).__name__, file=sys.stderr)
print(read)
"#
    );
    let output = Command::new(python())
        .args(["-c", &script])
        .env("HTTPS_PROXY", format!("http://{}", keystamp.proxy))
        .env("REQUESTS_CA_BUNDLE", keystamp.home.join("run/ca.crt"))
        .output()
        .unwrap();
    let python_read: usize = String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    let threshold = TRIES - 1;
    assert!(
        h1 >= threshold && h2 >= threshold && python_read >= threshold,
        "refusals read: curl h1 {h1}/{TRIES}, curl h2 {h2}/{TRIES}, python {python_read}/{TRIES} ({})",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        upstream.seen.count(),
        before,
        "a refused upload reached the upstream"
    );
}
