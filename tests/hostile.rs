//! keystamp against a hostile agent: the real binary, driven with raw bytes (and raw h2 through
//! hyper's client where the protocol is h2), judged by what a recording upstream received.
//! Every case here is a hole that once let a credential out or a connection hang.

// Test code: a panic is a failed assertion, which is what we want here.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use common::*;

const SECRET: &str = "hostile-secret-5c2e91";
const READER_TOKEN: &str = "reader-token-77";

/// A recording TLS upstream behind the real binary, with a route per case:
/// `api.example.test` (no prefix; agents: reader within GET /v1/), `a.other.test` (route prefix
/// /v1/), `plain.test` (plain HTTP, tls_only: false) and `query.example.test` (tls_only default).
struct Rig {
    upstream: TestUpstream,
    plain: TestUpstream,
    keystamp: KeystampProcess,
    _dir: tempfile::TempDir,
}

async fn rig(extra: &str) -> Rig {
    let (upstream, ca_path, dir) = tls_upstream().await;
    let plain = TestUpstream::start(UpstreamKind::Plain).await;
    std::fs::write(dir.path().join("reader"), READER_TOKEN).unwrap();
    let mut config = TestConfig::new();
    config
        .trust(&ca_path)
        .pin("api.example.test:443", upstream.addr)
        .pin("a.other.test:443", upstream.addr)
        .pin("query.example.test:443", upstream.addr)
        .pin("plain.test:80", plain.addr)
        .set(
            "identities",
            serde_json::json!({ "reader": { "source": { "file": dir.path().join("reader") } } }),
        )
        .credential_file("key", serde_json::json!({}))
        .bearer_route(
            "api.example.test",
            "key",
            serde_json::json!({ "agents": { "reader": { "methods": ["GET"], "path_prefix": "/v1/" } } }),
        )
        .bearer_route("a.other.test", "key", serde_json::json!({ "path_prefix": "/v1/" }))
        .bearer_route("plain.test", "key", serde_json::json!({ "tls_only": false }))
        .bearer_route("query.example.test", "key", serde_json::json!({}));
    let yaml = format!("{}{extra}", config.yaml());
    let keystamp = KeystampProcess::start(&yaml, &[("key", SECRET)]);
    Rig {
        upstream,
        plain,
        keystamp,
        _dir: dir,
    }
}

/// An answer keystamp (or the upstream) gave: status, `x-keystamp-error`, the whole text.
#[derive(Debug)]
struct Answer {
    status: u16,
    code: Option<String>,
    text: String,
}

impl Answer {
    /// Asserts keystamp answered `status` with error code `code` itself.
    #[track_caller]
    fn expect(&self, status: u16, code: &str) {
        assert_eq!(
            (self.status, self.code.as_deref()),
            (status, Some(code)),
            "{}",
            self.text
        );
    }
}

fn parse_answer(text: &str) -> Answer {
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let code = text
        .lines()
        .find_map(|line| line.strip_prefix("x-keystamp-error: "))
        .map(|c| c.trim().to_string());
    Answer {
        status,
        code,
        text: text.to_string(),
    }
}

/// Writes `raw`, then reads until the peer closes or 5 s pass.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, raw: &[u8]) -> Answer {
    stream.write_all(raw).await.unwrap();
    let mut received = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut received)).await;
    parse_answer(&String::from_utf8_lossy(&received))
}

/// One raw HTTP/1.1 request inside a TLS tunnel to `host` (as `agent`, when given).
async fn in_tunnel(
    keystamp: &KeystampProcess,
    host: &str,
    agent: Option<&str>,
    raw: &str,
) -> Answer {
    let stream = tunnel(keystamp.proxy, &format!("{host}:443"), agent).await;
    let mut tls = agent_tls(stream, &keystamp.ca_pem, host, &[b"http/1.1"])
        .await
        .unwrap();
    exchange(&mut tls, raw.as_bytes()).await
}

/// One raw request straight to the proxy listener (absolute-form).
async fn to_proxy(keystamp: &KeystampProcess, raw: &str) -> Answer {
    let mut stream = TcpStream::connect(keystamp.proxy).await.unwrap();
    exchange(&mut stream, raw.as_bytes()).await
}

fn get(path: &str, host: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
}

/// What the upstream saw, as `METHOD path` lines, after `before` of them.
fn seen_since(upstream: &TestUpstream, before: usize) -> Vec<String> {
    upstream.seen.requests().into_iter().skip(before).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn dot_segments_never_escape_an_agent_scope_or_a_route_prefix() {
    let rig = rig("").await;
    let reader = format!("reader:{READER_TOKEN}");
    let escapes = [
        "/v1/../admin",
        "/v1/%2e%2e/admin",
        "/v1/%2E%2E%2Fadmin",
        "/v1/..%2fadmin",
        "/v1/..;/admin",
        "/v1/..;x=y/admin",
        "/v1/%252e%252e/admin",
        "/v1/..%252fadmin",
    ];
    let before = rig.upstream.seen.count();
    for path in escapes {
        let scoped = in_tunnel(
            &rig.keystamp,
            "api.example.test",
            Some(&reader),
            &get(path, "api.example.test"),
        )
        .await;
        assert_eq!(
            (scoped.status, scoped.code.as_deref()),
            (403, Some("scope_denied")),
            "agent scope, {path}: {}",
            scoped.text
        );
        let prefixed = in_tunnel(
            &rig.keystamp,
            "a.other.test",
            None,
            &get(path, "a.other.test"),
        )
        .await;
        assert_eq!(
            (prefixed.status, prefixed.code.as_deref()),
            (403, Some("route_denied")),
            "route prefix, {path}: {}",
            prefixed.text
        );
    }
    assert_eq!(
        seen_since(&rig.upstream, before),
        Vec::<String>::new(),
        "no escaping path may reach the upstream"
    );
    // The scope still works for what it allows.
    let allowed = in_tunnel(
        &rig.keystamp,
        "api.example.test",
        Some(&reader),
        &get("/v1/ok", "api.example.test"),
    )
    .await;
    assert_eq!(allowed.status, 200, "{}", allowed.text);
    assert!(
        allowed.text.contains(SECRET),
        "the allowed request is stamped"
    );
    assert_eq!(
        seen_since(&rig.upstream, before),
        vec!["GET /v1/ok".to_string()]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn trace_and_track_are_refused_in_every_mode_before_stamping() {
    let rig = rig("").await;
    let before = (rig.upstream.seen.count(), rig.plain.seen.count());
    for method in ["TRACE", "TRACK"] {
        // Inside a TLS tunnel, HTTP/1.1.
        let raw =
            format!("{method} / HTTP/1.1\r\nHost: query.example.test\r\nConnection: close\r\n\r\n");
        let answer = in_tunnel(&rig.keystamp, "query.example.test", None, &raw).await;
        answer.expect(405, "method_not_allowed");
        // Absolute-form https:// and http:// to the proxy.
        let raw = format!("{method} https://query.example.test/ HTTP/1.1\r\nHost: query.example.test\r\nConnection: close\r\n\r\n");
        let answer = to_proxy(&rig.keystamp, &raw).await;
        answer.expect(405, "method_not_allowed");
        let raw = format!(
            "{method} http://plain.test/ HTTP/1.1\r\nHost: plain.test\r\nConnection: close\r\n\r\n"
        );
        let answer = to_proxy(&rig.keystamp, &raw).await;
        answer.expect(405, "method_not_allowed");
        // Inside a TLS tunnel, h2.
        let stream = tunnel(rig.keystamp.proxy, "query.example.test:443", None).await;
        let tls = agent_tls(stream, &rig.keystamp.ca_pem, "query.example.test", &[b"h2"])
            .await
            .unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(connection);
        let request = http::Request::builder()
            .method(method)
            .uri("https://query.example.test/")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 405);
        assert_eq!(response.headers()["x-keystamp-error"], "method_not_allowed");
    }
    assert_eq!(
        (rig.upstream.seen.count(), rig.plain.seen.count()),
        before,
        "nothing reached an upstream"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn only_websocket_upgrades_are_honoured_and_only_chunked_is_accepted() {
    let rig = rig("").await;
    // h2c: the Upgrade is stripped and the request goes as a plain request.
    let raw = "GET /h2c HTTP/1.1\r\nHost: query.example.test\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n";
    let answer = in_tunnel(&rig.keystamp, "query.example.test", None, raw).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert!(
        !answer.text.to_ascii_lowercase().contains("\"upgrade\""),
        "{}",
        answer.text
    );
    assert!(!answer.text.contains("http2-settings"), "{}", answer.text);

    // gzip under chunked: refused, nothing sent.
    let before = rig.upstream.seen.count();
    let raw = "POST /upload HTTP/1.1\r\nHost: query.example.test\r\nTransfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    let answer = in_tunnel(&rig.keystamp, "query.example.test", None, raw).await;
    answer.expect(501, "transfer_coding_unsupported");
    assert_eq!(rig.upstream.seen.count(), before);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_agent_body_is_the_agents_fault() {
    let rig = rig("").await;
    let raw = "POST /upload HTTP/1.1\r\nHost: query.example.test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\nzz\r\nnot a chunk\r\n";
    let answer = in_tunnel(&rig.keystamp, "query.example.test", None, raw).await;
    answer.expect(400, "bad_request");
    assert!(
        eventually(Duration::from_secs(3), || async {
            rig.keystamp
                .audit()
                .iter()
                .any(|line| line["path"] == "/upload" && line["fault"] == "agent")
        })
        .await,
        "audit: {:?}",
        rig.keystamp.audit()
    );
    assert!(!rig
        .keystamp
        .audit()
        .iter()
        .any(|line| line["fault"] == "upstream"));
}

#[tokio::test(flavor = "multi_thread")]
async fn plain_http_is_refused_on_tls_only_routes_and_echoed_secrets_are_redacted() {
    let rig = rig("").await;
    let before = rig.upstream.seen.count();
    let raw = "GET http://query.example.test/ HTTP/1.1\r\nHost: query.example.test\r\nConnection: close\r\n\r\n";
    let answer = to_proxy(&rig.keystamp, raw).await;
    answer.expect(403, "tls_required");
    assert_eq!(rig.upstream.seen.count(), before);
    // Opted in: plain HTTP is stamped.
    let raw = "GET http://plain.test/p HTTP/1.1\r\nHost: plain.test\r\nConnection: close\r\n\r\n";
    let answer = to_proxy(&rig.keystamp, raw).await;
    assert_eq!(answer.status, 200, "{}", answer.text);

    let answer = in_tunnel(
        &rig.keystamp,
        "query.example.test",
        None,
        &get("/echo-auth", "query.example.test"),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert!(
        answer
            .text
            .contains("x-echo: you sent Bearer [redacted by keystamp]"),
        "{}",
        answer.text
    );
    assert!(!answer.text.contains(SECRET), "{}", answer.text);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_hello_for_another_host_and_an_out_of_range_port_are_refused() {
    let rig = rig("").await;
    let stream = tunnel(rig.keystamp.proxy, "query.example.test:443", None).await;
    assert!(
        agent_tls(
            stream,
            &rig.keystamp.ca_pem,
            "evil.example.test",
            &[b"http/1.1"]
        )
        .await
        .is_err(),
        "no leaf for a host the CONNECT did not name"
    );
    let answer = to_proxy(
        &rig.keystamp,
        "CONNECT query.example.test:65979 HTTP/1.1\r\nHost: query.example.test:65979\r\n\r\n",
    )
    .await;
    answer.expect(400, "bad_request");
    let metrics = rig.keystamp.admin_get("/metrics").await;
    assert_eq!(
        metric(
            &metrics,
            "keystamp_tls_handshake_errors_total{side=\"agent\"}"
        ),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn stalled_handshakes_idle_connections_and_the_cap_free_their_descriptors() {
    let rig = rig("timeouts: { handshake: 1s, idle: 1s }\nmax_connections: 3\n").await;
    // Three bytes of a ClientHello, then nothing: closed at the handshake deadline.
    let mut stalled = tunnel(rig.keystamp.proxy, "query.example.test:443", None).await;
    stalled.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
    let started = Instant::now();
    let mut sink = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), stalled.read_to_end(&mut sink)).await;
    assert!(closed.is_ok(), "a stalled ClientHello held the connection");
    assert!(started.elapsed() >= Duration::from_millis(900));

    // An idle h2 connection is closed (GOAWAY, then EOF) once idle.
    let stream = tunnel(rig.keystamp.proxy, "query.example.test:443", None).await;
    let tls = agent_tls(stream, &rig.keystamp.ca_pem, "query.example.test", &[b"h2"])
        .await
        .unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    let connection = tokio::spawn(connection);
    let request = http::Request::builder()
        .uri("https://query.example.test/x")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let _ = response.into_body().collect().await;
    let ended = tokio::time::timeout(Duration::from_secs(5), connection).await;
    assert!(ended.is_ok(), "an idle h2 connection stayed open");

    // The cap: three connections are held, the fourth is refused with a 503.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(rig.keystamp.proxy).await.unwrap());
    }
    // All three admitted (on a loaded machine the accept loop may lag a little).
    assert!(
        eventually(Duration::from_secs(5), || async {
            let metrics = rig.keystamp.admin_get("/metrics").await;
            metric(&metrics, "keystamp_connections_open") == Some(3.0)
        })
        .await
    );
    let answer = to_proxy(&rig.keystamp, &get("http://plain.test/", "plain.test")).await;
    answer.expect(503, "too_many_connections");
    let metrics = rig.keystamp.admin_get("/metrics").await;
    assert_eq!(
        metric(&metrics, "keystamp_connections_refused_total"),
        Some(1.0)
    );
    drop(held);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_that_stalls_tls_or_never_answers_gets_a_typed_error_in_time() {
    // An upstream that accepts TCP and then says nothing.
    let mute = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mute_addr = mute.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = mute.accept().await {
            held.push(stream);
        }
    });
    let rig = rig("timeouts: { connect: 1s, response_head: 1s }\n").await;
    // A second keystamp whose api.example.test is pinned to the mute upstream.
    let (upstream, ca_path, _dir) = tls_upstream().await;
    let mut config = TestConfig::new();
    config
        .trust(&ca_path)
        .pin("api.example.test:443", mute_addr)
        .pin("query.example.test:443", upstream.addr)
        .set(
            "timeouts",
            serde_json::json!({ "connect": "1s", "response_head": "1s" }),
        )
        .credential_file("key", serde_json::json!({}))
        .bearer_route("api.example.test", "key", serde_json::json!({}))
        .bearer_route("query.example.test", "key", serde_json::json!({}));
    let stalled = KeystampProcess::start(&config.yaml(), &[("key", SECRET)]);
    let started = Instant::now();
    let answer = in_tunnel(
        &stalled,
        "api.example.test",
        None,
        &get("/", "api.example.test"),
    )
    .await;
    answer.expect(502, "upstream_tls");
    assert!(started.elapsed() < Duration::from_secs(4));

    let started = Instant::now();
    let answer = in_tunnel(
        &rig.keystamp,
        "query.example.test",
        None,
        &get("/hang", "query.example.test"),
    )
    .await;
    answer.expect(504, "upstream_timeout");
    assert!(started.elapsed() < Duration::from_secs(4));
    // A stream whose head comes at once is not cut by the response-head timeout.
    let answer = in_tunnel(
        &rig.keystamp,
        "query.example.test",
        None,
        &get("/sse", "query.example.test"),
    )
    .await;
    assert!(answer.text.contains("event-2"), "{}", answer.text);
}

/// The response-head timeout starts when the request is sent: an upstream slow to connect to,
/// within the connect timeout, still answers.
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_connect_is_not_charged_to_the_response_head_timeout() {
    let (upstream, ca_path, _dir) = tls_upstream().await;
    // Holds each connection 1.5 s before passing it on to the real upstream.
    let slow = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let slow_addr = slow.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut agent_side, _)) = slow.accept().await {
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                let mut upstream_side =
                    tokio::net::TcpStream::connect(upstream.addr).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut agent_side, &mut upstream_side).await;
            });
        }
    });
    let mut config = TestConfig::new();
    config
        .trust(&ca_path)
        .pin("api.example.test:443", slow_addr)
        .set(
            "timeouts",
            serde_json::json!({ "connect": "5s", "response_head": "1s" }),
        )
        .credential_file("key", serde_json::json!({}))
        .bearer_route("api.example.test", "key", serde_json::json!({}));
    let keystamp = KeystampProcess::start(&config.yaml(), &[("key", SECRET)]);
    let answer = in_tunnel(
        &keystamp,
        "api.example.test",
        None,
        &get("/v1/slow-dial", "api.example.test"),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
}

#[tokio::test(flavor = "multi_thread")]
async fn metric_families_exist_at_zero_before_their_first_event() {
    let rig = rig("").await;
    let metrics = rig.keystamp.admin_get("/metrics").await;
    for series in [
        "keystamp_auth_failures_total{credential=\"key\",status=\"401\"}",
        "keystamp_auth_failures_total{credential=\"key\",status=\"403\"}",
        "keystamp_config_reloads_total{result=\"error\"}",
        "keystamp_config_reloads_total{result=\"ok\"}",
        "keystamp_tls_handshake_errors_total{side=\"agent\"}",
        "keystamp_tls_handshake_errors_total{side=\"upstream\"}",
        "keystamp_connections_refused_total",
        "keystamp_rate_limited_total{credential=\"key\"}",
    ] {
        assert_eq!(metric(&metrics, series), Some(0.0), "{series}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_admin_token_guards_the_breaker_switches() {
    let token_dir = tempfile::tempdir().unwrap();
    let token_path = token_dir.path().join("admin");
    std::fs::write(&token_path, "admin-token-31").unwrap();
    let rig = rig(&format!(
        "admin_token: {{ file: {} }}\n",
        token_path.display()
    ))
    .await;
    let admin = reqwest::Client::builder().no_proxy().build().unwrap();
    let url = format!("http://{}/breakers/key/open", rig.keystamp.admin);
    let refused = admin.post(&url).send().await.unwrap();
    assert_eq!(refused.status(), 401);
    let wrong = admin.post(&url).bearer_auth("nope").send().await.unwrap();
    assert_eq!(wrong.status(), 401);
    let allowed = admin
        .post(&url)
        .bearer_auth("admin-token-31")
        .send()
        .await
        .unwrap();
    assert_eq!(allowed.status(), 200);
    assert!(!rig.keystamp.log().contains("admin-token-31"));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_admin_listener_out_of_descriptors_backs_off_instead_of_spinning() {
    let rig_upstream = tls_upstream().await;
    let (_upstream, ca_path, _dir) = rig_upstream;
    let mut config = TestConfig::new();
    config.trust(&ca_path);
    // Few descriptors: the listeners, the runtime and a handful of connections fit, no more.
    let keystamp =
        KeystampProcess::start_under(&["prlimit", "--nofile=48:48"], &config.yaml(), &[]);
    let mut held = Vec::new();
    for _ in 0..64 {
        if let Ok(stream) = TcpStream::connect(keystamp.admin).await {
            held.push(stream);
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cpu = |pid: u32| -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    };
    let pid = child_of(keystamp.pid());
    let before = cpu(pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ticks = cpu(pid) - before;
    // A spinning accept loop burns ~200 ticks (a whole core) in 2 s; backing off costs a few.
    assert!(
        ticks < 40,
        "{ticks} clock ticks in 2 s while out of descriptors"
    );
    drop(held);
}

/// The keystamp under `prlimit` (which execs it, so usually the same pid).
fn child_of(pid: u32) -> u32 {
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    children
        .split_whitespace()
        .next()
        .and_then(|c| c.parse().ok())
        .unwrap_or(pid)
}
