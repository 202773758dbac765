//! End-to-end proxy behaviour with reqwest configured only through environment variables
//! (`HTTPS_PROXY`, `HTTP_PROXY`, `SSL_CERT_FILE`), against a real TLS upstream.

// Test code: a panic is a failed assertion, which is what we want here.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use serde_json::Value;

static ENV_LOCK: Mutex<()> = Mutex::new(());

/// A reqwest client built the way an agent's would be: from the environment alone.
fn agent_client(proxy: &str, ca_bundle: &Path, http1_only: bool) -> reqwest::Client {
    let _guard = ENV_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    std::env::set_var("HTTPS_PROXY", proxy);
    std::env::set_var("HTTP_PROXY", proxy);
    std::env::set_var("SSL_CERT_FILE", ca_bundle);
    std::env::remove_var("NO_PROXY");
    std::env::remove_var("no_proxy");
    let mut builder = reqwest::Client::builder();
    if http1_only {
        builder = builder.http1_only();
    }
    let client = builder.build().unwrap();
    std::env::remove_var("HTTPS_PROXY");
    std::env::remove_var("HTTP_PROXY");
    std::env::remove_var("SSL_CERT_FILE");
    client
}

struct Rig {
    upstream_ca: Arc<TestCa>,
    upstream: TestUpstream,
    keystamp: TestKeystamp,
}

async fn rig(unmatched: &str, h2_upstream: bool) -> Rig {
    let upstream_ca = Arc::new(TestCa::new("test upstream CA"));
    let upstream = TestUpstream::start(UpstreamKind::Tls {
        ca: upstream_ca.clone(),
        h2: h2_upstream,
    })
    .await;
    let ca_dir = tempfile::tempdir().unwrap();
    let ca_path = write_pem(ca_dir.path(), "upstream-ca.pem", &upstream_ca.pem);
    let yaml = example_config(upstream.addr, &ca_path, unmatched);
    let keystamp = TestKeystamp::start(
        &yaml,
        &[
            ("example", &format!("{EXAMPLE_SECRET}\n")),
            ("other", OTHER_SECRET),
        ],
    )
    .await;
    std::mem::forget(ca_dir);
    Rig {
        upstream_ca,
        upstream,
        keystamp,
    }
}

impl Rig {
    fn client(&self) -> reqwest::Client {
        agent_client(&self.keystamp.proxy_url(), &self.keystamp.ca_path, false)
    }
}

async fn echo(response: reqwest::Response) -> Value {
    assert_eq!(response.status(), 200, "expected an upstream echo");
    response.json().await.unwrap()
}

fn header<'a>(echo: &'a Value, name: &str) -> Vec<&'a str> {
    echo["headers"][name]
        .as_array()
        .map(|values| values.iter().map(|v| v.as_str().unwrap()).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn bearer_replaces_whatever_the_agent_sent() {
    let rig = rig("deny", true).await;
    let response = rig
        .client()
        .get("https://api.example.test/v1/models?x=1")
        .header("Authorization", "Bearer agent-stale-key")
        .header("Proxy-Authorization", "Basic Zm9vOmJhcg==")
        .send()
        .await
        .unwrap();
    let echo = echo(response).await;
    assert_eq!(
        header(&echo, "authorization"),
        vec![format!("Bearer {EXAMPLE_SECRET}")]
    );
    assert!(header(&echo, "proxy-authorization").is_empty());
    assert_eq!(echo["path"], "/v1/models");
    assert_eq!(echo["query"], "x=1");
}

#[tokio::test]
async fn basic_header_and_query_injection() {
    let rig = rig("deny", true).await;
    let client = rig.client();

    let basic = echo(
        client
            .get("https://basic.example.test/")
            .send()
            .await
            .unwrap(),
    )
    .await;
    let expected = base64_encode(&format!("svc:{EXAMPLE_SECRET}"));
    assert_eq!(
        header(&basic, "authorization"),
        vec![format!("Basic {expected}")]
    );

    let custom = echo(
        client
            .post("https://a.other.test/v1/items")
            .header("x-api-key", "agent-own")
            .header("X-API-KEY", "agent-own-2")
            .header("authorization", "Bearer agent")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        header(&custom, "x-api-key"),
        vec![format!("key={OTHER_SECRET}")]
    );
    assert!(header(&custom, "authorization").is_empty());

    let query = echo(
        client
            .get("https://query.example.test/q?a=1&api_key=agent&b=2")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(query["query"], format!("a=1&b=2&api_key={EXAMPLE_SECRET}"));
}

fn base64_encode(text: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(text)
}

#[tokio::test]
async fn wildcard_path_and_method_routing() {
    let rig = rig("deny", true).await;
    let client = rig.client();
    // One label or more under other.test.
    let deep = echo(
        client
            .get("https://deep.b.other.test/v1/x")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        header(&deep, "x-api-key"),
        vec![format!("key={OTHER_SECRET}")]
    );
    // Routed host, but the path or the method is not allowed: 403 route_denied, nothing forwarded.
    let before = rig
        .upstream
        .seen
        .requests
        .load(std::sync::atomic::Ordering::SeqCst);
    for response in [
        client
            .get("https://a.other.test/v2/x")
            .send()
            .await
            .unwrap(),
        client
            .delete("https://a.other.test/v1/x")
            .send()
            .await
            .unwrap(),
        client
            .get("https://a.other.test/v1/../admin")
            .send()
            .await
            .unwrap(),
    ] {
        assert_eq!(response.status(), 403);
        assert_eq!(response.headers()["x-keystamp-error"], "route_denied");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["code"], "route_denied");
    }
    assert_eq!(
        rig.upstream
            .seen
            .requests
            .load(std::sync::atomic::Ordering::SeqCst),
        before
    );
}

#[tokio::test]
async fn missing_credential_answers_503_and_the_rest_works() {
    let rig = rig("deny", true).await;
    let client = rig.client();
    let response = client
        .get("https://api.example.test/broken/x")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(
        response.headers()["x-keystamp-error"],
        "credential_unavailable"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["credential"], "missing");
    let ok = client
        .get("https://api.example.test/fine")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
}

#[tokio::test]
async fn h2_and_http1_on_both_sides() {
    for h2_upstream in [true, false] {
        let rig = rig("deny", h2_upstream).await;
        for http1_only in [false, true] {
            let client = agent_client(&rig.keystamp.proxy_url(), &rig.keystamp.ca_path, http1_only);
            let response = client
                .get("https://api.example.test/v")
                .send()
                .await
                .unwrap();
            let agent_version = response.version();
            let echo = echo(response).await;
            let expected_agent = if http1_only {
                reqwest::Version::HTTP_11
            } else {
                reqwest::Version::HTTP_2
            };
            assert_eq!(agent_version, expected_agent);
            // A lone request follows the agent's protocol, as far as the upstream offers it.
            let upstream_h2 = h2_upstream && !http1_only;
            assert_eq!(
                echo["version"],
                if upstream_h2 { "HTTP/2.0" } else { "HTTP/1.1" },
            );
            // h2 carries the authority in `:authority`, HTTP/1.1 in `Host`: never both.
            assert_eq!(
                header(&echo, "host"),
                if upstream_h2 {
                    Vec::<&str>::new()
                } else {
                    vec!["api.example.test"]
                }
            );
            assert_eq!(
                header(&echo, "authorization"),
                vec![format!("Bearer {EXAMPLE_SECRET}")]
            );
        }
    }
}

#[tokio::test]
async fn unmatched_hosts_tunnel_blind_or_are_denied() {
    let rig = rig("tunnel", true).await;
    // The agent must trust the upstream itself: keystamp does not touch a tunnel.
    let bundle = rig.keystamp.bundle(&[&rig.upstream_ca]);
    let client = agent_client(&rig.keystamp.proxy_url(), &bundle, false);
    let echo = echo(
        client
            .get("https://tunnel.test/t")
            .header("authorization", "Bearer agent-own")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(header(&echo, "authorization"), vec!["Bearer agent-own"]);

    let denying = rig_deny_tunnel().await;
    let client = agent_client(
        &denying.keystamp.proxy_url(),
        &denying.keystamp.bundle(&[&denying.upstream_ca]),
        false,
    );
    let error = client
        .get("https://tunnel.test/t")
        .send()
        .await
        .unwrap_err();
    assert!(
        error.is_connect() || error.to_string().contains("403"),
        "{error:?}"
    );
}

async fn rig_deny_tunnel() -> Rig {
    rig("deny", true).await
}

#[tokio::test]
async fn plain_http_routes_are_stamped_and_https_absolute_form_goes_over_tls() {
    let upstream_ca = Arc::new(TestCa::new("ca"));
    let tls_upstream = TestUpstream::start(UpstreamKind::Tls {
        ca: upstream_ca.clone(),
        h2: true,
    })
    .await;
    let plain_upstream = TestUpstream::start(UpstreamKind::Plain).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_path = write_pem(dir.path(), "up.pem", &upstream_ca.pem);
    let yaml = format!(
        "unmatched: deny\nupstream_tls: {{ extra_roots: [{}] }}\nresolve:\n  plain.test:80: {}\n  api.example.test:443: {}\n\
         credentials:\n  example: {{ source: {{ file: ./secrets/example }} }}\n\
         routes:\n  - {{ host: plain.test, credential: example, inject: {{ type: bearer }}, tls_only: false }}\n  - {{ host: api.example.test, credential: example, inject: {{ type: bearer }} }}\n",
        ca_path.display(),
        plain_upstream.addr,
        tls_upstream.addr
    );
    let keystamp = TestKeystamp::start(&yaml, &[("example", EXAMPLE_SECRET)]).await;
    let client = agent_client(&keystamp.proxy_url(), &keystamp.ca_path, false);
    let echo = echo(
        client
            .get("http://plain.test/p")
            .header("authorization", "x")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        header(&echo, "authorization"),
        vec![format!("Bearer {EXAMPLE_SECRET}")]
    );

    // axios sends `GET https://host/path` to the proxy in plain HTTP.
    let raw = raw_request(
        keystamp.app.proxy_addr(),
        "GET https://api.example.test/abs HTTP/1.1\r\nHost: api.example.test\r\nAuthorization: Bearer agent\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    assert!(raw.contains(&format!("Bearer {EXAMPLE_SECRET}")), "{raw}");
    assert_eq!(
        tls_upstream
            .seen
            .requests
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );

    // Unrouted plain HTTP with `unmatched: deny`.
    let denied = client.get("http://elsewhere.test/").send().await.unwrap();
    assert_eq!(denied.status(), 403);
    assert_eq!(denied.headers()["x-keystamp-error"], "unmatched_denied");
}

async fn raw_request(proxy: std::net::SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    stream.read_to_end(&mut out).await.unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn server_sent_events_arrive_one_by_one() {
    let rig = rig("deny", true).await;
    let response = rig
        .client()
        .get("https://api.example.test/sse")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let started = std::time::Instant::now();
    let first = stream.next().await.unwrap().unwrap();
    // The upstream waits 300 ms between events: the first must not wait for the others.
    assert!(
        started.elapsed() < std::time::Duration::from_millis(250),
        "first event was held back"
    );
    assert_eq!(&first[..], b"data: event-0\n\n");
    let mut rest = Vec::new();
    while let Some(chunk) = stream.next().await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(
        String::from_utf8(rest).unwrap(),
        "data: event-1\n\ndata: event-2\n\n"
    );
}

#[tokio::test]
async fn large_upload_streams_through() {
    let rig = rig("deny", true).await;
    const CHUNK: usize = 1 << 20;
    const CHUNKS: usize = 64;
    let body = futures_util::stream::iter(
        (0..CHUNKS).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![7u8; CHUNK]))),
    );
    let response = rig
        .client()
        .post("https://api.example.test/upload")
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .unwrap();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["bytes"], (CHUNK * CHUNKS) as u64);
}

#[tokio::test]
async fn bad_upstream_certificate_is_502_and_gets_no_request() {
    // The upstream's CA is not in keystamp's trust store.
    let stranger = Arc::new(TestCa::new("untrusted CA"));
    let upstream = TestUpstream::start(UpstreamKind::Tls {
        ca: stranger,
        h2: true,
    })
    .await;
    let trusted = TestCa::new("some other CA");
    let dir = tempfile::tempdir().unwrap();
    let ca_path = write_pem(dir.path(), "up.pem", &trusted.pem);
    let yaml = example_config(upstream.addr, &ca_path, "deny");
    let keystamp = TestKeystamp::start(
        &yaml,
        &[("example", EXAMPLE_SECRET), ("other", OTHER_SECRET)],
    )
    .await;
    let client = agent_client(&keystamp.proxy_url(), &keystamp.ca_path, false);
    let response = client
        .get("https://api.example.test/")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 502);
    assert_eq!(response.headers()["x-keystamp-error"], "upstream_tls");
    assert_eq!(
        upstream
            .seen
            .requests
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
}

#[tokio::test]
async fn unreachable_upstream_is_502_upstream_connect() {
    let unused = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca_path = write_pem(dir.path(), "up.pem", &TestCa::new("x").pem);
    let yaml = example_config(unused, &ca_path, "deny");
    let keystamp = TestKeystamp::start(
        &yaml,
        &[("example", EXAMPLE_SECRET), ("other", OTHER_SECRET)],
    )
    .await;
    let client = agent_client(&keystamp.proxy_url(), &keystamp.ca_path, false);
    let response = client
        .get("https://api.example.test/")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 502);
    assert_eq!(response.headers()["x-keystamp-error"], "upstream_connect");
}

/// Opens `CONNECT host:443` on keystamp and a TLS session inside it that trusts keystamp's CA,
/// offering `alpn`.
async fn intercepted_tls(
    keystamp: &TestKeystamp,
    host: &str,
    sni: Option<&str>,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(keystamp.app.proxy_addr())
        .await
        .unwrap();
    tcp.write_all(format!("CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        tcp.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    let mut config = agent_tls_config(keystamp.app.ca_pem(), alpn);
    // Without SNI the leaf is minted for the CONNECT host; verification still uses `host`.
    config.enable_sni = sni.is_some();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls_pki_types::ServerName::try_from(sni.unwrap_or(host).to_string()).unwrap();
    connector.connect(name, tcp).await.unwrap()
}

/// A 200 from the echo upstream that shows the credential keystamp stamped.
fn assert_stamped_answer(text: &str) {
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.contains(EXAMPLE_SECRET),
        "stamped credential echoed back: {text}"
    );
}

/// An intercepted HTTP/1.1 connection to `api.example.test`, its ClientHello naming the host.
async fn intercepted_api_http1(
    keystamp: &TestKeystamp,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    intercepted_tls(
        keystamp,
        "api.example.test",
        Some("api.example.test"),
        &[b"http/1.1"],
    )
    .await
}

/// Sends `GET path` for `host` with `Connection: close` and reads the whole answer.
async fn get_and_close(
    tls: &mut (impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin),
    path: &str,
    host: &str,
) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// An agent that announces its last request (`Connection: close`) gets the whole response (here
/// a stream whose events are 300 ms apart) and then a TLS close_notify, so it sees a clean
/// close rather than a truncation.
#[tokio::test]
async fn the_tls_close_follows_the_whole_last_response() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rig = rig("deny", true).await;
    for connection in ["close", "keep-alive, Close"] {
        let mut tls = intercepted_api_http1(&rig.keystamp).await;
        let request = format!(
            "GET /sse HTTP/1.1\r\nHost: api.example.test\r\nConnection: {connection}\r\n\r\n"
        );
        tls.write_all(request.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        // rustls reports an end of stream without close_notify as an error.
        tls.read_to_end(&mut out)
            .await
            .unwrap_or_else(|error| panic!("no clean TLS close ({connection}): {error}"));
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(
            text.contains("data: event-0") && text.contains("data: event-2"),
            "every event before the close: {text}"
        );
    }
}

#[tokio::test]
async fn host_mismatch_inside_an_intercepted_connection_is_421() {
    let rig = rig("tunnel", true).await;
    let mut tls = intercepted_api_http1(&rig.keystamp).await;
    let text = get_and_close(&mut tls, "/x", "tunnel.test").await;
    assert!(text.starts_with("HTTP/1.1 421"), "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("x-keystamp-error: host_mismatch"),
        "{text}"
    );
    assert_eq!(
        rig.upstream
            .seen
            .requests
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
}

/// An agent socket that sends its first write (the ClientHello) in the same segment as a
/// `CONNECT`, without waiting for the 200, and skips the 200's head when it reads.
struct ConnectInFront {
    tcp: tokio::net::TcpStream,
    connect: Option<Vec<u8>>,
    head: Vec<u8>,
}

impl tokio::io::AsyncWrite for ConnectInFront {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if let Some(connect) = this.connect.take() {
            let together = [connect.as_slice(), buf].concat();
            // One small write on loopback: the kernel takes it whole.
            let written =
                std::task::ready!(std::pin::Pin::new(&mut this.tcp).poll_write(cx, &together))?;
            assert_eq!(written, together.len());
            return std::task::Poll::Ready(Ok(buf.len()));
        }
        std::pin::Pin::new(&mut this.tcp).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

impl tokio::io::AsyncRead for ConnectInFront {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = &mut *self;
        while !this.head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            let mut one = tokio::io::ReadBuf::new(&mut byte);
            std::task::ready!(std::pin::Pin::new(&mut this.tcp).poll_read(cx, &mut one))?;
            if one.filled().is_empty() {
                return std::task::Poll::Ready(Ok(()));
            }
            this.head.push(byte[0]);
        }
        assert!(
            this.head.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&this.head)
        );
        std::pin::Pin::new(&mut this.tcp).poll_read(cx, buf)
    }
}

#[tokio::test]
async fn a_client_hello_sent_behind_the_connect_is_not_lost() {
    let rig = rig("deny", true).await;
    let host = "api.example.test";
    let tcp = tokio::net::TcpStream::connect(rig.keystamp.app.proxy_addr())
        .await
        .unwrap();
    let agent = ConnectInFront {
        tcp,
        connect: Some(
            format!("CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n").into_bytes(),
        ),
        head: Vec::new(),
    };
    let config = agent_tls_config(rig.keystamp.app.ca_pem(), &[b"http/1.1"]);
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls_pki_types::ServerName::try_from(host.to_string()).unwrap();
    let mut tls = connector.connect(name, agent).await.unwrap();
    let text = get_and_close(&mut tls, "/early", host).await;
    assert_stamped_answer(&text);
}

#[tokio::test]
async fn agent_without_sni_gets_a_leaf_for_the_connect_host() {
    let rig = rig("deny", true).await;
    let mut tls = intercepted_tls(&rig.keystamp, "api.example.test", None, &[b"http/1.1"]).await;
    let text = get_and_close(&mut tls, "/nosni", "api.example.test").await;
    assert_stamped_answer(&text);
}

#[tokio::test]
async fn websocket_through_an_intercepted_route_is_stamped_at_the_handshake() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let rig = rig("deny", true).await;
    // WebSocket over HTTP/1.1 Upgrade, even though the upstream also offers h2.
    let tls = intercepted_api_http1(&rig.keystamp).await;
    let (mut ws, response) = tokio_tungstenite::client_async("wss://api.example.test/ws", tls)
        .await
        .unwrap();
    assert_eq!(response.status(), 101);
    ws.send(Message::text("hello")).await.unwrap();
    let reply = ws.next().await.unwrap().unwrap();
    assert_eq!(reply.to_text().unwrap(), "echo:hello");
    let seen = rig.upstream.seen.authorizations.lock().unwrap().clone();
    assert_eq!(seen, vec![Some(format!("Bearer {EXAMPLE_SECRET}"))]);
}

/// HTTP/1.1 agents' requests go out on warm upstream connections; one the upstream closed, or
/// whose response the agent abandoned half-read, is never used again.
/// HTTP/1.1 agents: a lone request goes out on an HTTP/1.1 connection (the least CPU), requests
/// that overlap share one h2 connection to an upstream that offers h2 (the least I/O); past 100
/// open streams a second one opens; connections the upstream drops are replaced.
#[tokio::test]
async fn overlapping_agents_share_an_h2_upstream_connection() {
    let rig = rig("deny", true).await;
    let connections = || {
        rig.upstream
            .seen
            .connections
            .load(std::sync::atomic::Ordering::SeqCst)
    };
    let client = || agent_client(&rig.keystamp.proxy_url(), &rig.keystamp.ca_path, true);
    // GETs `path` and returns the upstream protocol it arrived on.
    let get = |client: reqwest::Client, path: String| async move {
        let response = client
            .get(format!("https://api.example.test{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
        let echo = echo(response).await;
        assert_eq!(echo["path"], path);
        assert_eq!(
            header(&echo, "authorization"),
            vec![format!("Bearer {EXAMPLE_SECRET}")]
        );
        echo["version"].as_str().unwrap().to_string()
    };

    // An event stream keeps the first (HTTP/1.1) connection busy...
    let mut events = client()
        .get("https://api.example.test/sse")
        .send()
        .await
        .unwrap()
        .bytes_stream();
    events.next().await.unwrap().unwrap();
    assert_eq!(connections(), 1);
    // ...so 16 agents arriving together share one new h2 connection.
    let agents: Vec<_> = (0..16)
        .map(|n| tokio::spawn(get(client(), format!("/v1/shared/{n}"))))
        .collect();
    for agent in agents {
        assert_eq!(agent.await.unwrap(), "HTTP/2.0");
    }
    assert_eq!(connections(), 2, "16 overlapping agents, one h2 connection");
    while events.next().await.is_some() {}
    // Alone again: back on the idle HTTP/1.1 connection.
    let lone = client();
    assert_eq!(get(lone.clone(), "/v1/alone".into()).await, "HTTP/1.1");
    assert_eq!(connections(), 2);

    // 101 requests held upstream fill the HTTP/1.1 connection and the h2 one; the next
    // request opens a second h2 connection rather than queue on a full one.
    let before = rig.upstream.seen.count();
    let held: Vec<_> = (0..101)
        .map(|_| tokio::spawn(lone.get("https://api.example.test/hang").send()))
        .collect();
    assert!(
        eventually(Duration::from_secs(10), || async {
            rig.upstream.seen.count() >= before + 101
        })
        .await,
        "101 requests waiting upstream"
    );
    assert_eq!(get(lone.clone(), "/v1/overflow".into()).await, "HTTP/2.0");
    assert_eq!(connections(), 3, "a full h2 connection is not queued on");
    for request in held {
        request.abort();
    }

    // The upstream drops every connection without a goodbye: requests go out on a new one.
    rig.upstream.seen.drop_connections();
    tokio::time::sleep(Duration::from_millis(200)).await;
    for n in 0..3 {
        assert_eq!(
            get(lone.clone(), format!("/v1/after-drop/{n}")).await,
            "HTTP/1.1"
        );
    }
    assert_eq!(connections(), 4);
}

#[tokio::test]
async fn upstream_connections_are_reused_and_never_reused_broken() {
    let rig = rig("deny", false).await;
    let client = agent_client(&rig.keystamp.proxy_url(), &rig.keystamp.ca_path, true);
    let connections = || {
        rig.upstream
            .seen
            .connections
            .load(std::sync::atomic::Ordering::SeqCst)
    };
    for n in 0..10 {
        let response = client
            .get(format!("https://api.example.test/v1/keep/{n}"))
            .send()
            .await
            .unwrap();
        assert_eq!(echo(response).await["path"], format!("/v1/keep/{n}"));
    }
    assert_eq!(
        connections(),
        1,
        "ten sequential requests, one upstream connection"
    );

    // The upstream closes after this answer: the next request must go out on a new connection.
    let closing = client
        .get("https://api.example.test/close")
        .send()
        .await
        .unwrap();
    assert_eq!(closing.text().await.unwrap(), "closing");
    for _ in 0..3 {
        let response = client
            .get("https://api.example.test/v1/after-close")
            .send()
            .await
            .unwrap();
        assert_eq!(echo(response).await["path"], "/v1/after-close");
    }
    assert_eq!(connections(), 2);

    // An event stream abandoned after its first event: the rest of it must not be read as the
    // next response on a reused connection.
    let mut events = client
        .get("https://api.example.test/sse")
        .send()
        .await
        .unwrap()
        .bytes_stream();
    let first = events.next().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("event-0"));
    drop(events);
    let fresh_client = agent_client(&rig.keystamp.proxy_url(), &rig.keystamp.ca_path, true);
    for _ in 0..3 {
        let response = fresh_client
            .get("https://api.example.test/v1/after-abandon")
            .send()
            .await
            .unwrap();
        assert_eq!(echo(response).await["path"], "/v1/after-abandon");
    }

    // Eight agents at once, ten requests each: every answer its own, and no more upstream
    // connections than requests ever in flight together (an upstream without h2 is never
    // re-dialed while idle connections wait).
    let before = connections();
    let answers = futures_util::future::join_all((0..8).map(|n| {
        let client = agent_client(&rig.keystamp.proxy_url(), &rig.keystamp.ca_path, true);
        async move {
            let mut paths = Vec::new();
            for round in 0..10 {
                let response = client
                    .get(format!("https://api.example.test/v1/parallel/{n}/{round}"))
                    .send()
                    .await
                    .unwrap();
                paths.push(echo(response).await["path"].as_str().unwrap().to_string());
            }
            paths
        }
    }))
    .await;
    for (n, paths) in answers.iter().enumerate() {
        for (round, path) in paths.iter().enumerate() {
            assert_eq!(path, &format!("/v1/parallel/{n}/{round}"));
        }
    }
    assert!(
        connections() - before <= 8,
        "{} new connections",
        connections() - before
    );
}
