//! keystamp against an upstream that echoes the request back: whatever form keystamp sent the
//! credential in (raw, the basic pair's base64, percent-encoded in a query) never reaches the
//! agent in a response header or trailer, whatever else the value holds. The real binary, an h2
//! agent, and an upstream that reflects exactly what it received.

// Test code: a panic is a failed assertion, which is what we want here.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;

use base64::Engine;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use common::*;

/// `/`, `+` and `=` are what a query encoding changes; long enough to be searched for.
const SECRET: &str = "echo/secret+value=42";

/// A data frame, then trailers.
type EchoBody =
    StreamBody<futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

/// Every header and trailer an agent could read, as bytes.
type Seen = Vec<(String, Vec<u8>)>;

/// An upstream that answers every request with a 301 whose `Location` carries the query as
/// received, the query again with lower-case escapes, the `Authorization` as received (also
/// behind a non-ASCII byte), and h2 trailers carrying both.
async fn echoing_upstream(ca: &TestCa) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tls_acceptor(ca, UPSTREAM_NAMES, &[b"h2", b"http/1.1"]);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = service_fn(|request: Request<Incoming>| async move {
                    Ok::<_, Infallible>(echo(&request))
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    addr
}

fn echo(request: &Request<Incoming>) -> Response<EchoBody> {
    let auth = request
        .headers()
        .get(http::header::AUTHORIZATION)
        .map(|v| v.as_bytes().to_vec())
        .unwrap_or_default();
    let query = request.uri().query().unwrap_or("").to_string();
    let lower = lower_case_escapes(&query);
    let header = |bytes: &[u8]| HeaderValue::from_bytes(bytes).unwrap();
    let mut trailers = HeaderMap::new();
    trailers.insert("x-trailer-auth", header(&auth));
    trailers.insert("x-trailer-query", header(lower.as_bytes()));
    let frames = vec![
        Ok(Frame::data(Bytes::from_static(b"moved"))),
        Ok(Frame::trailers(trailers)),
    ];
    let mut response = Response::new(StreamBody::new(futures_util::stream::iter(frames)));
    *response.status_mut() = StatusCode::MOVED_PERMANENTLY;
    let headers = response.headers_mut();
    headers.insert(
        "location",
        header(format!("https://query.example.test/moved?{query}").as_bytes()),
    );
    headers.insert("x-echo-query-lower", header(lower.as_bytes()));
    headers.insert("x-echo-auth", header(&auth));
    headers.insert(
        "x-echo-raw",
        header(&[b"caf\xe9 ".as_slice(), &auth].concat()),
    );
    response
}

/// `%2F` as `%2f`: the same bytes to any decoder, another string to a plain search.
fn lower_case_escapes(text: &str) -> String {
    let mut out = String::new();
    let mut escape = 0;
    for c in text.chars() {
        if c == '%' {
            escape = 2;
            out.push(c);
        } else if escape > 0 {
            escape -= 1;
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// One GET over h2 inside a tunnel to `host`; every header and trailer the agent received.
async fn headers_and_trailers(keystamp: &KeystampProcess, host: &str) -> (StatusCode, Seen) {
    let stream = tunnel(keystamp.proxy, &format!("{host}:443"), None).await;
    let tls = agent_tls(stream, &keystamp.ca_pem, host, &[b"h2"])
        .await
        .unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(connection);
    let request = Request::get(format!("https://{host}/resource?page=2"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status();
    let mut seen: Seen = response
        .headers()
        .iter()
        .map(|(name, value)| (name.to_string(), value.as_bytes().to_vec()))
        .collect();
    let collected = response.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().unwrap_or_default();
    assert!(
        !trailers.is_empty(),
        "{host}: the upstream's trailers reach the agent"
    );
    seen.extend(
        trailers
            .iter()
            .map(|(name, value)| (format!("trailer {name}"), value.as_bytes().to_vec())),
    );
    (status, seen)
}

fn value_of(seen: &Seen, name: &str) -> String {
    let value = seen
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_slice());
    String::from_utf8_lossy(value.unwrap_or_default()).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn no_form_of_the_stamped_value_comes_back_in_headers_or_trailers() {
    let ca = TestCa::new("echoing upstream");
    let upstream = echoing_upstream(&ca).await;
    let ca_dir = tempfile::tempdir().unwrap();
    let ca_path = write_pem(ca_dir.path(), "ca.pem", &ca.pem);
    let mut config = TestConfig::new();
    config
        .trust(&ca_path)
        .pin("api.example.test:443", upstream)
        .pin("basic.example.test:443", upstream)
        .pin("query.example.test:443", upstream)
        .credential_file("key", serde_json::json!({}))
        .bearer_route("api.example.test", "key", serde_json::json!({}));
    config.routes.push(serde_json::json!({
        "host": "basic.example.test", "credential": "key",
        "inject": { "type": "basic", "username": "svc" },
    }));
    config.routes.push(serde_json::json!({
        "host": "query.example.test", "credential": "key",
        "inject": { "type": "query", "name": "api_key" },
    }));
    let keystamp = KeystampProcess::start(&config.yaml(), &[("key", SECRET)]);

    let form: String = form_urlencoded::byte_serialize(SECRET.as_bytes()).collect();
    let pair = base64::engine::general_purpose::STANDARD.encode(format!("svc:{SECRET}"));
    let forbidden = [
        SECRET.to_string(),
        form.clone(),
        lower_case_escapes(&form),
        pair.clone(),
    ];
    // Which echo proves the upstream got the value (so redaction, not absence, is tested).
    let cases = [
        (
            "api.example.test",
            "x-echo-auth",
            "Bearer [redacted by keystamp]",
        ),
        (
            "basic.example.test",
            "x-echo-auth",
            "Basic [redacted by keystamp]",
        ),
        (
            "query.example.test",
            "location",
            "&api_key=[redacted by keystamp]",
        ),
        (
            "query.example.test",
            "x-echo-query-lower",
            "api_key=[redacted by keystamp]",
        ),
        (
            "query.example.test",
            "trailer x-trailer-query",
            "api_key=[redacted by keystamp]",
        ),
    ];
    for (host, header, redacted) in cases {
        let (status, seen) = headers_and_trailers(&keystamp, host).await;
        assert_eq!(status, StatusCode::MOVED_PERMANENTLY, "{host}: {seen:?}");
        let shown = value_of(&seen, header);
        assert!(shown.contains(redacted), "{host} {header}: {shown}");
        for (name, value) in &seen {
            for form in &forbidden {
                let found = value.windows(form.len()).any(|w| w == form.as_bytes());
                assert!(
                    !found,
                    "{host}: {name} carries a form of the secret: {:?}",
                    String::from_utf8_lossy(value)
                );
            }
        }
        if host != "query.example.test" {
            let raw = value_of(&seen, "x-echo-raw");
            assert!(
                raw.contains("[redacted by keystamp]"),
                "{host}: non-ASCII value: {raw}"
            );
            let trailer = value_of(&seen, "trailer x-trailer-auth");
            assert!(
                trailer.contains("[redacted by keystamp]"),
                "{host}: trailer: {trailer}"
            );
        }
    }
}
