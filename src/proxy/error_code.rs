//! The error codes an upstream's refusal names in its structured fields, which is all an
//! `auth_failure_markers` entry is compared with: the `x-amzn-ErrorType` and `x-amz-error-code`
//! headers, a JSON body's `__type`, `code`, `Code`, `errorCode`, `error_code` (top level or in an
//! `error`/`Error` object) or a string `error`, and an XML body's `<Code>` elements. Free text
//! (messages, echoed paths) is never searched: an agent could plant a marker there.

use http::HeaderMap;

/// Headers that carry an error code by themselves.
const CODE_HEADERS: [&str; 2] = ["x-amzn-errortype", "x-amz-error-code"];

/// JSON keys whose string value is an error code.
const CODE_KEYS: [&str; 5] = ["__type", "code", "Code", "errorCode", "error_code"];

/// Every code the response names, normalised: `ns#Code` and `Code:uri` both read as `Code`.
pub fn error_codes(headers: &HeaderMap, body_prefix: &[u8]) -> Vec<String> {
    let mut codes: Vec<String> = CODE_HEADERS
        .iter()
        .flat_map(|name| headers.get_all(*name).iter())
        .filter_map(|value| value.to_str().ok())
        .map(normalise)
        .collect();
    if let Ok(json) = serde_json::from_slice::<serde_json::Value>(body_prefix) {
        codes.extend(json_codes(&json));
    } else {
        codes.extend(xml_codes(&String::from_utf8_lossy(body_prefix)));
    }
    codes.retain(|code| !code.is_empty());
    codes
}

fn json_codes(json: &serde_json::Value) -> Vec<String> {
    let mut codes = Vec::new();
    let nested = ["error", "Error"]
        .iter()
        .filter_map(|key| json.get(*key))
        .filter(|value| value.is_object());
    for object in std::iter::once(json).chain(nested) {
        for key in CODE_KEYS {
            if let Some(code) = object.get(key).and_then(|v| v.as_str()) {
                codes.push(normalise(code));
            }
        }
    }
    // OAuth's `{"error": "invalid_token"}`.
    if let Some(code) = json.get("error").and_then(|v| v.as_str()) {
        codes.push(normalise(code));
    }
    codes
}

fn xml_codes(text: &str) -> Vec<String> {
    let mut codes = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("<Code>") {
        let after = rest.get(start + "<Code>".len()..).unwrap_or("");
        let Some(end) = after.find("</Code>") else {
            break;
        };
        codes.push(normalise(after.get(..end).unwrap_or("")));
        rest = after.get(end..).unwrap_or("");
    }
    codes
}

fn normalise(code: &str) -> String {
    let code = code.rsplit('#').next().unwrap_or(code);
    let code = code.split(':').next().unwrap_or(code);
    code.trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codes(headers: &[(&str, &str)], body: &str) -> Vec<String> {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            let name = http::HeaderName::from_bytes(name.as_bytes()).unwrap();
            map.append(name, value.parse().unwrap());
        }
        error_codes(&map, body.as_bytes())
    }

    #[test]
    fn structured_fields_are_read() {
        assert_eq!(
            codes(
                &[(
                    "x-amzn-ErrorType",
                    "UnrecognizedClientException:http://internal.amazon.com/"
                )],
                ""
            ),
            ["UnrecognizedClientException"]
        );
        assert_eq!(
            codes(
                &[],
                r#"{"__type":"com.amazon.coral.service#ExpiredTokenException","message":"x"}"#
            ),
            ["ExpiredTokenException"]
        );
        assert_eq!(
            codes(
                &[],
                r#"{"error":{"message":"bad","code":"invalid_api_key"}}"#
            ),
            ["invalid_api_key"]
        );
        assert_eq!(
            codes(&[], r#"{"error":"invalid_token"}"#),
            ["invalid_token"]
        );
        assert_eq!(
            codes(&[], "<ErrorResponse><Error><Code>InvalidClientTokenId</Code><Message>m</Message></Error></ErrorResponse>"),
            ["InvalidClientTokenId"]
        );
    }

    #[test]
    fn free_text_is_never_read() {
        let echoed =
            r#"{"message":"no access to /deny/InvalidSignatureException","code":"AccessDenied"}"#;
        assert_eq!(codes(&[], echoed), ["AccessDenied"]);
        let xml = "<Error><Code>AccessDenied</Code><Resource>/InvalidSignatureException</Resource></Error>";
        assert_eq!(codes(&[], xml), ["AccessDenied"]);
        assert!(codes(
            &[("x-debug", "InvalidSignatureException")],
            "InvalidSignatureException"
        )
        .is_empty());
    }
}
