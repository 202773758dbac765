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

/// A token service's answer.
pub struct Answer {
    pub status: StatusCode,
    pub bytes: Bytes,
    /// The service's `Date` header: its clock, to tell keystamp's skew from it.
    pub date: Option<std::time::SystemTime>,
}

impl Answer {
    /// The service's clock minus keystamp's, in whole seconds (positive: the service is ahead).
    pub fn skew_seconds(&self, received: std::time::SystemTime) -> Option<i64> {
        let date = self.date?;
        let seconds = |at: std::time::SystemTime| {
            at.duration_since(std::time::UNIX_EPOCH)
                .ok()
                .and_then(|d| i64::try_from(d.as_secs()).ok())
        };
        Some(seconds(date)? - seconds(received)?)
    }
}

/// Sends `call` and reads the answer, within `timeout`. Any status comes back: the caller decides
/// what a non-success means.
pub async fn send(
    call: Call,
    upstream: &Upstream,
    timeout: std::time::Duration,
) -> Result<Answer, SourceError> {
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
        let date = response
            .headers()
            .get(header::DATE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| httpdate::parse_http_date(v).ok());
        let bytes: Bytes = Limited::new(response.into_body(), MAX_TOKEN_RESPONSE)
            .collect()
            .await
            .map_err(
                |error| match error.downcast_ref::<http_body_util::LengthLimitError>() {
                    Some(_) => SourceError::TooLarge,
                    None => SourceError::TokenResponse,
                },
            )?
            .to_bytes();
        Ok(Answer {
            status,
            bytes,
            date,
        })
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
) -> Result<Answer, SourceError> {
    let answer = send(call, upstream, timeout).await?;
    if !answer.status.is_success() {
        return Err(SourceError::TokenStatus(answer.status.as_u16()));
    }
    Ok(answer)
}
