//! One HTTP exchange with a token service (an OAuth2 endpoint, GitHub's app API, Google's
//! `token_uri`): sent through keystamp's upstream client (verified TLS, `resolve:` pins), bounded
//! in time and in response size. Errors name the status, never the body (it may echo a secret).

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Limited};

use crate::body;
use crate::credentials::value::SourceError;
use crate::upstream::{Upstream, UpstreamProtocol};

/// Token responses larger than this are refused.
const MAX_TOKEN_RESPONSE: usize = 64 * 1024;

/// What to send: method, URL, extra headers, body and its content type.
pub struct Call {
    pub method: Method,
    pub uri: http::Uri,
    pub headers: Vec<(header::HeaderName, HeaderValue)>,
    pub body: Option<(&'static str, String)>,
}

/// Sends `call` and reads the answer, within `timeout`. Any status comes back: the caller decides
/// what a non-success means.
pub async fn send(
    call: Call,
    upstream: &Upstream,
    timeout: std::time::Duration,
) -> Result<(StatusCode, Bytes), SourceError> {
    let (content_type, text) = call.body.unwrap_or(("", String::new()));
    let mut request = Request::new(body::full(text));
    *request.method_mut() = call.method;
    *request.uri_mut() = call.uri;
    let headers = request.headers_mut();
    if !content_type.is_empty() {
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    }
    headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
    headers.insert(
        header::USER_AGENT,
        HeaderValue::from_static(concat!("keystamp/", env!("CARGO_PKG_VERSION"))),
    );
    for (name, value) in call.headers {
        headers.insert(name, value);
    }
    let exchange = async {
        let response = upstream
            .send(request, UpstreamProtocol::Any)
            .await
            .map_err(|e| SourceError::TokenEndpoint(e.code().to_string()))?;
        let status = response.status();
        let bytes: Bytes = Limited::new(response.into_body(), MAX_TOKEN_RESPONSE)
            .collect()
            .await
            .map_err(|_| SourceError::TokenResponse)?
            .to_bytes();
        Ok((status, bytes))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| SourceError::TokenTimeout)?
}

/// Like [`send`], but a non-success status is an error.
pub async fn send_expecting_success(
    call: Call,
    upstream: &Upstream,
    timeout: std::time::Duration,
) -> Result<Bytes, SourceError> {
    let (status, bytes) = send(call, upstream, timeout).await?;
    if !status.is_success() {
        return Err(SourceError::TokenStatus(status.as_u16()));
    }
    Ok(bytes)
}
