//! What security teams see: exact metrics after known traffic, `/status`, the audit log (and a
//! canary secret absent from everything keystamp prints), agent identity and per-agent scopes,
//! and the egress guard on the address actually dialled.

// Test code: a panic is a failed assertion, which is what we want here.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use common::*;

struct Rig {
    upstream: TestUpstream,
    plain: TestUpstream,
    keystamp: TestKeystamp,
    _dir: tempfile::TempDir,
}

const CANARY: &str = "cnry/Zq+8u=XJ";

async fn rig(extra: &str) -> Rig {
    let ca = Arc::new(TestCa::new("upstream"));
    let upstream = TestUpstream::start(UpstreamKind::Tls {
        ca: ca.clone(),
        h2: true,
    })
    .await;
    let plain = TestUpstream::start(UpstreamKind::Plain).await;
    let stranger = Arc::new(TestCa::new("untrusted"));
    let untrusted = TestUpstream::start(UpstreamKind::Tls {
        ca: stranger,
        h2: true,
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let ca_path = write_pem(dir.path(), "upstream-ca.pem", &ca.pem);
    let yaml = format!(
        "unmatched: tunnel\nupstream_tls: {{ extra_roots: [{ca}] }}\n{extra}\
         resolve:\n  'api.example.test:443': {up}\n  'query.example.test:443': {up}\n  'basic.example.test:443': {bad}\n  'tunnel.test:443': {up}\n  'plain.test:80': {plain}\n\
         credentials:\n  main: {{ source: {{ file: ./secrets/main }} }}\n  gone: {{ source: {{ file: ./secrets/missing }} }}\n\
         routes:\n\
         \x20 - {{ name: api, host: api.example.test, path_prefix: /v1/, credential: main, inject: {{ type: bearer }} }}\n\
         \x20 - {{ name: api-broken, host: api.example.test, path_prefix: /broken/, credential: gone, inject: {{ type: bearer }} }}\n\
         \x20 - {{ name: query, host: query.example.test, credential: main, inject: {{ type: query, name: key }} }}\n\
         \x20 - {{ name: untrusted, host: basic.example.test, credential: main, inject: {{ type: basic, username: u }} }}\n",
        ca = ca_path.display(),
        up = upstream.addr,
        bad = untrusted.addr,
        plain = plain.addr,
    );
    let keystamp = TestKeystamp::start(&yaml, &[("main", &format!("{CANARY}\n"))]).await;
    std::mem::forget(untrusted);
    Rig {
        upstream,
        plain,
        keystamp,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn known_traffic_gives_exact_metrics_status_and_audit_lines() {
    let rig = rig("audit: { output: ./audit/requests.jsonl }\n").await;
    let client = rig.keystamp.client();
    let bundle = {
        let path = rig.keystamp.dir.path().join("bundle.pem");
        std::fs::write(
            &path,
            format!(
                "{}{}",
                rig.keystamp.app.ca_pem(),
                std::fs::read_to_string(rig._dir.path().join("upstream-ca.pem")).unwrap()
            ),
        )
        .unwrap();
        path
    };
    let tunnel_client = reqwest::Client::builder()
        .proxy(reqwest::Proxy::all(rig.keystamp.proxy_url()).unwrap())
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(&bundle).unwrap()).unwrap(),
        )
        .build()
        .unwrap();
    let status = |r: reqwest::Response| r.status().as_u16();
    // Read whole, so the audit line's byte count is what the agent received.
    let first = client
        .get("https://api.example.test/v1/a?secret=no")
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    assert!(!first.bytes().await.unwrap().is_empty());
    assert_eq!(
        status(
            client
                .get("https://api.example.test/v1/b")
                .send()
                .await
                .unwrap()
        ),
        200
    );
    assert_eq!(
        status(
            client
                .get("https://api.example.test/v1/status/401")
                .send()
                .await
                .unwrap()
        ),
        200
    );
    assert_eq!(
        status(
            client
                .get("https://api.example.test/other")
                .send()
                .await
                .unwrap()
        ),
        403
    );
    assert_eq!(
        status(
            client
                .get("https://api.example.test/broken/x")
                .send()
                .await
                .unwrap()
        ),
        503
    );
    assert_eq!(
        status(
            client
                .get("https://basic.example.test/")
                .send()
                .await
                .unwrap()
        ),
        502
    );
    assert_eq!(
        status(
            client
                .get("https://query.example.test/q?a=1")
                .send()
                .await
                .unwrap()
        ),
        200
    );
    assert_eq!(
        status(
            tunnel_client
                .get("https://tunnel.test/t")
                .send()
                .await
                .unwrap()
        ),
        200
    );
    // A tunnel's audit line is written when it closes.
    drop(tunnel_client);
    // The upstream's own 401 on a stamped path.
    rig.upstream.seen.accept_only("nobody");
    assert_eq!(
        status(
            client
                .get("https://api.example.test/v1/c")
                .send()
                .await
                .unwrap()
        ),
        401
    );

    let keystamp = &rig.keystamp;
    let expected = [
        ("keystamp_requests_total{agent=\"-\",code=\"2xx\",credential=\"main\",origin=\"upstream\",route=\"api\"}", 3.0),
        ("keystamp_requests_total{agent=\"-\",code=\"4xx\",credential=\"main\",origin=\"upstream\",route=\"api\"}", 1.0),
        ("keystamp_requests_total{agent=\"-\",code=\"4xx\",credential=\"-\",origin=\"keystamp\",route=\"-\"}", 1.0),
        ("keystamp_requests_total{agent=\"-\",code=\"5xx\",credential=\"gone\",origin=\"keystamp\",route=\"api-broken\"}", 1.0),
        ("keystamp_requests_total{agent=\"-\",code=\"5xx\",credential=\"main\",origin=\"keystamp\",route=\"untrusted\"}", 1.0),
        ("keystamp_requests_total{agent=\"-\",code=\"2xx\",credential=\"main\",origin=\"upstream\",route=\"query\"}", 1.0),
        // One CONNECT per host: the client reuses each intercepted connection.
        ("keystamp_connect_total{decision=\"intercept\"}", 3.0),
        ("keystamp_connect_total{decision=\"tunnel\"}", 1.0),
        ("keystamp_tls_handshake_errors_total{side=\"upstream\"}", 1.0),
        ("keystamp_auth_failures_total{credential=\"main\",status=\"401\"}", 1.0),
        ("keystamp_credential_version_info{credential=\"main\",fingerprint=\"", 1.0),
        ("keystamp_breaker_state{credential=\"main\"}", 0.0),
        ("keystamp_build_info{version=\"0.1.0\"}", 1.0),
    ];
    let matches = |metrics: &str| {
        expected.iter().all(|(series, value)| {
            metrics.lines().any(|l| {
                l.starts_with(series)
                    && l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) == Some(*value)
            })
        })
    };
    let mut metrics = keystamp.metrics().await;
    for _ in 0..150 {
        if matches(&metrics) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        metrics = keystamp.metrics().await;
    }
    let all_there = matches(&metrics);
    assert!(
        all_there,
        "metrics differ from the traffic sent:\n{metrics}"
    );
    let request_series = metrics
        .lines()
        .filter(|l| l.starts_with("keystamp_requests_total{"))
        .count();
    assert_eq!(request_series, 6, "{metrics}");
    assert!(metrics.contains(
        "keystamp_request_duration_seconds_bucket{credential=\"main\",route=\"api\",le=\"600\"} 4"
    ));

    let status = keystamp.status().await;
    let main = status["credentials"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "main")
        .unwrap();
    assert_eq!(main["source"], "file");
    assert_eq!(main["fingerprint"].as_str().unwrap().len(), 12);
    assert_eq!(main["breaker"], "closed");
    assert!(main["loaded_at"].is_string());
    let gone = status["credentials"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "gone")
        .unwrap();
    assert_eq!(gone["fingerprint"], serde_json::Value::Null);
    assert_eq!(gone["last_error"], "source file does not exist");
    assert_eq!(status["routes"].as_array().unwrap().len(), 4);

    // One audit line per request and per tunnel, fields right, never a query string or secret.
    let audit_path = keystamp.dir.path().join("audit/requests.jsonl");
    let read_lines = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(&audit_path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let mut lines = read_lines();
    for _ in 0..150 {
        if lines.len() >= 9 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        lines = read_lines();
    }
    assert_eq!(
        lines.len(),
        9,
        "expected 8 request lines and 1 tunnel line: {lines:#?}"
    );
    let first = lines.iter().find(|l| l["path"] == "/v1/a").unwrap();
    assert_eq!(first["kind"], "request");
    assert_eq!(first["route"], "api");
    assert_eq!(first["credential"], "main");
    assert_eq!(first["fingerprint"], main["fingerprint"]);
    assert_eq!(first["method"], "GET");
    assert_eq!(first["host"], "api.example.test");
    assert_eq!(first["status"], 200);
    assert_eq!(first["origin"], "upstream");
    assert!(first["bytes_out"].as_u64().unwrap() > 0);
    assert!(first["duration_ms"].as_f64().unwrap() >= 0.0);
    let denied = lines.iter().find(|l| l["path"] == "/other").unwrap();
    assert_eq!(
        (denied["origin"].as_str(), denied["error"].as_str()),
        (Some("keystamp"), Some("route_denied"))
    );
    let tls = lines
        .iter()
        .find(|l| l["host"] == "basic.example.test")
        .unwrap();
    assert_eq!(tls["error"], "upstream_tls");
    assert_eq!(tls["fault"], "upstream");
    assert_eq!(denied["fault"], "agent");
    assert_eq!(first["fault"], serde_json::Value::Null);
    let tunnel = lines.iter().find(|l| l["kind"] == "tunnel").unwrap();
    assert_eq!(
        (tunnel["host"].as_str(), tunnel["port"].as_u64()),
        (Some("tunnel.test"), Some(443))
    );
    assert!(tunnel["bytes_up"].as_u64().unwrap() > 0 && tunnel["bytes_down"].as_u64().unwrap() > 0);

    let audit = std::fs::read_to_string(&audit_path).unwrap();
    assert!(
        !audit.contains("secret=no") && !audit.contains("a=1"),
        "query strings must not be audited"
    );
    let forms = [
        CANARY.to_string(),
        base64::engine::general_purpose::STANDARD.encode(CANARY),
        base64::engine::general_purpose::STANDARD.encode(format!("u:{CANARY}")),
        form_urlencoded::byte_serialize(CANARY.as_bytes()).collect::<String>(),
    ];
    let status_text = keystamp.status().await.to_string();
    for form in &forms {
        for (what, text) in [
            ("audit", &audit),
            ("/status", &status_text),
            ("/metrics", &metrics),
        ] {
            assert!(
                !text.contains(form.as_str()),
                "secret form `{form}` found in {what}"
            );
        }
    }
    // The upstream did receive it: the canary is real.
    assert!(rig
        .upstream
        .seen
        .authorizations
        .lock()
        .unwrap()
        .iter()
        .flatten()
        .any(|a| a.contains(CANARY)));
    drop(rig.plain);
}

const IDENTITIES: &str = "identities:\n  reader: { source: { file: ./secrets/reader } }\n  writer: { source: { env: KEYSTAMP_TEST_WRITER_TOKEN }, rate_limit: { per_second: 1, burst: 2 } }\nrequire_identity: true\n";

async fn identity_rig() -> (TestUpstream, TestKeystamp, tempfile::TempDir) {
    std::env::set_var("KEYSTAMP_TEST_WRITER_TOKEN", "writer-token");
    let (upstream, ca_path, dir) = tls_upstream().await;
    let yaml = format!(
        "{IDENTITIES}upstream_tls: {{ extra_roots: [{ca}] }}\nresolve: {{ 'api.example.test:443': {up} }}\n\
         credentials:\n  shared: {{ source: {{ file: ./secrets/shared }} }}\n\
         routes:\n  - host: api.example.test\n    name: api\n    credential: shared\n    inject: {{ type: bearer }}\n    agents:\n      reader: {{ methods: [GET], path_prefix: /v1/ }}\n      writer: {{}}\n",
        ca = ca_path.display(),
        up = upstream.addr
    );
    let keystamp = TestKeystamp::start(
        &yaml,
        &[("shared", "shared-key"), ("reader", "reader-token\n")],
    )
    .await;
    (upstream, keystamp, dir)
}

fn agent_client(keystamp: &TestKeystamp, user: Option<(&str, &str)>) -> reqwest::Client {
    let mut proxy = reqwest::Proxy::all(keystamp.proxy_url()).unwrap();
    if let Some((name, token)) = user {
        proxy = proxy.basic_auth(name, token);
    }
    reqwest::Client::builder()
        .proxy(proxy)
        .add_root_certificate(
            reqwest::Certificate::from_pem(keystamp.app.ca_pem().as_bytes()).unwrap(),
        )
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn identities_are_required_and_scopes_narrow_a_shared_credential_per_agent() {
    let (upstream, keystamp, _dir) = identity_rig().await;
    // No identity, or a wrong one: 407 before anything else happens.
    for user in [
        None,
        Some(("reader", "wrong")),
        Some(("nobody", "reader-token")),
    ] {
        let error = agent_client(&keystamp, user)
            .get("https://api.example.test/v1/x")
            .send()
            .await
            .unwrap_err();
        assert!(
            format!("{error:?}").contains("407") || error.is_connect(),
            "{error:?}"
        );
    }
    let raw = raw_connect(&keystamp, None).await;
    assert!(raw.starts_with("HTTP/1.1 407"), "{raw}");
    assert!(
        raw.to_ascii_lowercase()
            .contains("proxy-authenticate: basic realm=\"keystamp\""),
        "{raw}"
    );
    assert!(raw.contains("x-keystamp-error: identity_required"), "{raw}");
    assert_eq!(upstream.seen.count(), 0);

    let reader = agent_client(&keystamp, Some(("reader", "reader-token")));
    let writer = agent_client(&keystamp, Some(("writer", "writer-token")));
    let response = reader
        .get("https://api.example.test/v1/items")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let echo: serde_json::Value = response.json().await.unwrap();
    assert_eq!(echo["headers"]["authorization"][0], "Bearer shared-key");
    assert!(
        echo["headers"].get("proxy-authorization").is_none(),
        "the proxy credential is never forwarded"
    );
    for denied in [
        reader.post("https://api.example.test/v1/items"),
        reader.get("https://api.example.test/admin"),
    ] {
        let response = denied.send().await.unwrap();
        assert_eq!(response.status(), 403);
        assert_eq!(response.headers()["x-keystamp-error"], "scope_denied");
    }
    assert_eq!(
        writer
            .post("https://api.example.test/admin")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // curl, the standard way: the identity in the proxy URL.
    let output = std::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "https://api.example.test/v1/curl",
        ])
        .env(
            "HTTPS_PROXY",
            format!("http://reader:reader-token@{}", keystamp.app.proxy_addr()),
        )
        .env("CURL_CA_BUNDLE", &keystamp.ca_path)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&output.stdout), "200");

    let metrics = keystamp.metrics().await;
    assert!(eventually(Duration::from_secs(2), || async {
        let metrics = keystamp.metrics().await;
        metric(&metrics, "keystamp_requests_total{agent=\"reader\",code=\"2xx\",credential=\"shared\",origin=\"upstream\",route=\"api\"}") == Some(2.0)
            && metric(&metrics, "keystamp_requests_total{agent=\"reader\",code=\"4xx\",credential=\"shared\",origin=\"keystamp\",route=\"api\"}") == Some(2.0)
            && metric(&metrics, "keystamp_requests_total{agent=\"writer\",code=\"2xx\",credential=\"shared\",origin=\"upstream\",route=\"api\"}") == Some(1.0)
    })
    .await, "{metrics}");
    assert!(!metrics.contains("reader-token") && !metrics.contains("writer-token"));

    // The writer's own rate limit (1/s, burst 2): a quick run of requests is cut off by
    // keystamp itself, naming the agent, without reaching the upstream; the reader is unaffected.
    let before = upstream.seen.count();
    let mut passed = 0;
    let mut limited = None;
    for _ in 0..4 {
        let response = writer
            .get("https://api.example.test/v1/a")
            .send()
            .await
            .unwrap();
        match response.status().as_u16() {
            200 => passed += 1,
            429 => {
                assert_eq!(response.headers()["x-keystamp-error"], "rate_limited");
                limited = Some(response.json::<serde_json::Value>().await.unwrap());
            }
            other => panic!("unexpected {other}"),
        }
    }
    let limited = limited.expect("the writer was never rate limited");
    assert_eq!(limited["agent"], "writer");
    assert!(passed <= 3);
    assert_eq!(
        reader
            .get("https://api.example.test/v1/c")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(upstream.seen.count() - before, passed + 1);
}

async fn raw_connect(keystamp: &TestKeystamp, authorization: Option<&str>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(keystamp.app.proxy_addr())
        .await
        .unwrap();
    let header = authorization
        .map(|a| format!("Proxy-Authorization: {a}\r\n"))
        .unwrap_or_default();
    tcp.write_all(
        format!(
            "CONNECT api.example.test:443 HTTP/1.1\r\nHost: api.example.test:443\r\n{header}\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut buffer = vec![0u8; 4096];
    let n = tcp.read(&mut buffer).await.unwrap();
    String::from_utf8_lossy(&buffer[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn egress_to_internal_addresses_is_refused_unless_allowed_or_pinned() {
    let plain = TestUpstream::start(UpstreamKind::Plain).await;
    let port = plain.addr.port();
    let yaml =
        format!("unmatched: tunnel\nresolve: {{ 'pinned.test:{port}': 127.0.0.1:{port} }}\n");
    let keystamp = TestKeystamp::start(&yaml, &[]).await;
    let client = keystamp.client();
    for url in [
        format!("http://127.0.0.1:{port}/"),
        format!("http://localhost:{port}/"),
        "http://10.0.0.1/".to_string(),
        "http://169.254.169.254/latest/meta-data/".to_string(),
        "http://[::1]/".to_string(),
    ] {
        let response = client.get(&url).send().await.unwrap();
        assert_eq!(response.status(), 403, "{url}");
        assert_eq!(
            response.headers()["x-keystamp-error"],
            "egress_denied",
            "{url}"
        );
    }
    // Tunnels are checked the same way.
    let raw = {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tokio::net::TcpStream::connect(keystamp.app.proxy_addr())
            .await
            .unwrap();
        tcp.write_all(b"CONNECT 169.254.169.254:443 HTTP/1.1\r\nHost: 169.254.169.254:443\r\n\r\n")
            .await
            .unwrap();
        let mut buffer = vec![0u8; 2048];
        let n = tcp.read(&mut buffer).await.unwrap();
        String::from_utf8_lossy(&buffer[..n]).into_owned()
    };
    assert!(
        raw.starts_with("HTTP/1.1 403") && raw.contains("egress_denied"),
        "{raw}"
    );
    assert_eq!(plain.seen.count(), 0);

    // A resolve: pin is an explicit choice.
    let response = client
        .get(format!("http://pinned.test:{port}/p"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    // An allowed CIDR opens that range only.
    let yaml = "unmatched: tunnel\negress: { allow_cidrs: [127.0.0.0/8] }\n";
    let allowed = TestKeystamp::start(yaml, &[]).await;
    let response = allowed
        .client()
        .get(format!("http://127.0.0.1:{port}/"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let response = allowed
        .client()
        .get("http://169.254.169.254/")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-keystamp-error"], "egress_denied");
}
