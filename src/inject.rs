//! Pure header and URI edits: drop hop-by-hop headers, strip every credential the agent sent,
//! stamp the configured one. The secret is exposed here and nowhere else, and header values
//! carrying it are marked sensitive (HPACK never indexes them, debug output hides them).

use base64::Engine;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{PathAndQuery, Uri};

use crate::config::Injection;
use crate::echo::Echoes;
use crate::routes::Route;
use crate::secret::Secret;
use crate::sigv4::{self, Payload, SignError};

/// Stamping failed: the resulting header or URI would be invalid.
#[derive(Debug, thiserror::Error)]
pub enum StampError {
    #[error("the credential cannot be written as a header value")]
    InvalidHeaderValue,
    #[error("the request URI cannot carry the credential")]
    InvalidUri,
    #[error("the request could not be signed: {0}")]
    Signing(#[from] SignError),
}

/// Headers that describe one hop, never forwarded (RFC 9110 section 7.6.1).
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Whether a request asks for a WebSocket upgrade, the one protocol switch keystamp honours:
/// after a 101 the connection is spliced, so any other `Upgrade` (h2c, say) would let later
/// requests on it skip every check. Anything else has its `Upgrade` stripped.
pub fn wants_upgrade(headers: &HeaderMap) -> bool {
    let mut upgrades = headers.get_all(header::UPGRADE).iter();
    let websocket = match (upgrades.next(), upgrades.next()) {
        (Some(value), None) => value
            .to_str()
            .is_ok_and(|v| v.trim().eq_ignore_ascii_case("websocket")),
        _ => false,
    };
    websocket && connection_tokens(headers).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Removes hop-by-hop headers, including every header the `Connection` header names. With
/// `upgrade`, keeps `Connection: upgrade` and `Upgrade` so a WebSocket handshake passes.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // Most requests carry none of these: one pass of cheap name comparisons instead of a
    // hashed removal per name (this was 4 % of a keep-alive request's instructions).
    let any_hop_by_hop = headers
        .keys()
        .any(|name| HOP_BY_HOP.contains(name) || name == header::TE || name == header::UPGRADE);
    if !any_hop_by_hop && !upgrade {
        return;
    }
    // TE may only say "trailers" past this hop (gRPC needs that much).
    let te_is_trailers = headers
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("trailers"));
    // Only the names the message carries are removed: most responses carry just
    // `Connection: keep-alive`, and a hashed removal per absent name cost more than the rest.
    // The `Connection` tokens are split once, not once per header name.
    let named: Vec<&str> = connection_tokens(headers).collect();
    let listed = |name: &HeaderName| {
        named
            .iter()
            .any(|token| name.as_str().eq_ignore_ascii_case(token))
    };
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|name| {
            if *name == header::UPGRADE {
                return !upgrade;
            }
            HOP_BY_HOP.contains(name) || (*name == header::TE && !te_is_trailers) || listed(name)
        })
        .cloned()
        .collect();
    for name in &doomed {
        headers.remove(name);
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Removes every credential-bearing header the agent may have sent for this route: every header
/// any injection on the route writes (the route's and each agent's own), and `strip`. A route
/// that signs with SigV4 also loses the agent's own signing headers and presigned parameters.
pub fn strip_agent_credentials(headers: &mut HeaderMap, uri: &mut Uri, route: &Route) {
    headers.remove(header::AUTHORIZATION);
    headers.remove(header::PROXY_AUTHORIZATION);
    let agents_own = route
        .agents
        .iter()
        .flatten()
        .filter_map(|(_, scope)| scope.inject.as_ref());
    for inject in std::iter::once(&route.inject).chain(agents_own) {
        match inject {
            Injection::Header { name, .. } => {
                headers.remove(name);
            }
            Injection::AwsSigV4 { .. } => {
                let framing = headers
                    .get("x-amz-content-sha256")
                    .filter(|v| sigv4::describes_body(v.as_bytes()))
                    .cloned();
                for name in sigv4::AGENT_SIGNING_HEADERS {
                    headers.remove(name);
                }
                if let Some(framing) = framing {
                    headers.insert("x-amz-content-sha256", framing);
                }
                if let Ok(stripped) = without_query_params(uri, &sigv4::PRESIGNED_QUERY_PARAMS) {
                    *uri = stripped;
                }
            }
            _ => {}
        }
    }
    for name in &route.strip {
        headers.remove(name);
    }
}

/// The parts of the outgoing request a signature covers besides its headers and URI.
pub struct Signed<'a> {
    pub method: &'a http::Method,
    pub payload: Payload<'a>,
}

/// Writes the credential into the request as the route says. Call after
/// [`strip_agent_credentials`], so exactly one value reaches the upstream.
pub fn stamp(
    headers: &mut HeaderMap,
    uri: &mut Uri,
    inject: &Injection,
    secret: &Secret,
    signed: Signed<'_>,
) -> Result<(), StampError> {
    match inject {
        Injection::AwsSigV4 { service, region } => {
            sigv4::sign_request(
                signed.method,
                uri,
                headers,
                secret,
                (service, region),
                signed.payload,
            )?;
        }
        Injection::Bearer => {
            let value = secret
                .bearer_header()
                .ok_or(StampError::InvalidHeaderValue)?;
            headers.insert(header::AUTHORIZATION, value);
        }
        Injection::Basic { username } => {
            let pair = format!("{username}:{}", secret.expose());
            let encoded = base64::engine::general_purpose::STANDARD.encode(pair);
            headers.insert(
                header::AUTHORIZATION,
                sensitive(format!("Basic {encoded}"))?,
            );
        }
        Injection::Header { name, template } => {
            let value = sensitive(template.replace("{secret}", secret.expose()))?;
            headers.insert(name.clone(), value);
        }
        Injection::Query { name } => {
            *uri = with_query_param(uri, name, secret.expose())?;
        }
    }
    Ok(())
}

/// The forms of `secret` that went out under `inject`, to take out of the response.
pub fn echoes(inject: &Injection, secret: &Secret) -> Echoes {
    match inject {
        Injection::Basic { username } => Echoes::of_basic(secret, username),
        Injection::AwsSigV4 { .. } => Echoes::of_aws_keys(secret),
        Injection::Bearer | Injection::Header { .. } | Injection::Query { .. } => {
            Echoes::of_value(secret)
        }
    }
}

fn sensitive(text: String) -> Result<HeaderValue, StampError> {
    let mut value = HeaderValue::try_from(text).map_err(|_| StampError::InvalidHeaderValue)?;
    value.set_sensitive(true);
    Ok(value)
}

/// Returns `uri` with every `name=` pair the agent sent removed and `name=<value>` appended;
/// the agent's other pairs are kept byte for byte.
fn with_query_param(uri: &Uri, name: &str, value: &str) -> Result<Uri, StampError> {
    let mut query = kept_query_pairs(uri, &[name]);
    let encoded_name: String = form_urlencoded::byte_serialize(name.as_bytes()).collect();
    let encoded_value: String = form_urlencoded::byte_serialize(value.as_bytes()).collect();
    query.push(format!("{encoded_name}={encoded_value}"));
    with_query(uri, &query)
}

/// Returns `uri` without any pair named in `names`; the other pairs kept byte for byte.
fn without_query_params(uri: &Uri, names: &[&str]) -> Result<Uri, StampError> {
    if uri.query().is_none() {
        return Ok(uri.clone());
    }
    with_query(uri, &kept_query_pairs(uri, names))
}

/// The query's pairs whose decoded name is not in `names`.
fn kept_query_pairs(uri: &Uri, names: &[&str]) -> Vec<String> {
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter(|pair| {
            if pair.is_empty() {
                return false;
            }
            let key = pair.split('=').next().unwrap_or("");
            let decoded: String = form_urlencoded::parse(key.as_bytes())
                .next()
                .map(|(k, _)| k.into_owned())
                .unwrap_or_default();
            !names.contains(&decoded.as_str())
        })
        .map(str::to_string)
        .collect()
}

fn with_query(uri: &Uri, pairs: &[String]) -> Result<Uri, StampError> {
    let path = uri.path();
    let text = if pairs.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", pairs.join("&"))
    };
    let path_and_query = PathAndQuery::try_from(text).map_err(|_| StampError::InvalidUri)?;
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(path_and_query);
    Uri::from_parts(parts).map_err(|_| StampError::InvalidUri)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_param_is_replaced_and_others_kept_verbatim() {
        let uri: Uri = "/x?a=1&api_key=agent&b=%20+&api%5Fkey=again"
            .parse()
            .unwrap();
        let out = with_query_param(&uri, "api_key", "s3cr/t&").unwrap();
        assert_eq!(out.to_string(), "/x?a=1&b=%20+&api_key=s3cr%2Ft%26");
        let bare: Uri = "/x".parse().unwrap();
        assert_eq!(
            with_query_param(&bare, "k", "v").unwrap().to_string(),
            "/x?k=v"
        );
    }

    #[test]
    fn hop_by_hop_headers_and_connection_named_headers_go() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-private"),
        );
        headers.insert("x-private", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(header::TE, HeaderValue::from_static("gzip"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut headers, false);
        let names: Vec<_> = headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["x-kept"]);

        // TE: trailers passes on (gRPC) unless the Connection header names TE for this hop.
        let mut trailers = HeaderMap::new();
        trailers.insert(header::TE, HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut trailers, false);
        assert_eq!(trailers[header::TE], "trailers");
        trailers.insert(header::CONNECTION, HeaderValue::from_static("TE"));
        strip_hop_by_hop(&mut trailers, false);
        assert!(trailers.is_empty(), "{trailers:?}");
    }

    #[test]
    fn websocket_upgrade_keeps_its_headers() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(wants_upgrade(&headers));
        let mut h2c = headers.clone();
        h2c.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        assert!(!wants_upgrade(&h2c));
        let mut both = headers.clone();
        both.insert(header::UPGRADE, HeaderValue::from_static("websocket, h2c"));
        assert!(!wants_upgrade(&both));
        strip_hop_by_hop(&mut headers, true);
        assert_eq!(headers[header::CONNECTION], "upgrade");
        assert_eq!(headers[header::UPGRADE], "websocket");
    }

    #[test]
    fn presigned_parameters_go_and_the_rest_stays_verbatim() {
        let uri: Uri = "https://b.s3.amazonaws.com/k?X-Amz-Signature=abc&list-type=2&X-Amz-Credential=AK%2Fx&p=%20"
            .parse()
            .unwrap();
        let out = without_query_params(&uri, &sigv4::PRESIGNED_QUERY_PARAMS).unwrap();
        assert_eq!(
            out.to_string(),
            "https://b.s3.amazonaws.com/k?list-type=2&p=%20"
        );
        let only: Uri = "https://b.s3.amazonaws.com/k?X-Amz-Date=1".parse().unwrap();
        assert_eq!(
            without_query_params(&only, &sigv4::PRESIGNED_QUERY_PARAMS)
                .unwrap()
                .to_string(),
            "https://b.s3.amazonaws.com/k"
        );
    }

    #[test]
    fn stamped_headers_are_sensitive() {
        let mut headers = HeaderMap::new();
        let mut uri: Uri = "/".parse().unwrap();
        stamp(
            &mut headers,
            &mut uri,
            &Injection::Basic {
                username: "svc".into(),
            },
            &Secret::new("pw"),
            Signed {
                method: &http::Method::GET,
                payload: Payload::Bytes(b""),
            },
        )
        .unwrap();
        let value = &headers[header::AUTHORIZATION];
        assert!(value.is_sensitive());
        assert_eq!(value, "Basic c3ZjOnB3");
        assert!(!format!("{headers:?}").contains("c3ZjOnB3"));
    }
}
