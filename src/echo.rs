//! Every form of a stamped value an upstream may echo back, and its redaction from response
//! headers and trailers. The forms are the ones keystamp itself sent: the raw value (bearer,
//! header templates, an AWS session token), the basic pair's base64, and the value percent-encoded
//! in any mixture (a query parameter rebuilt into a `Location`). Bodies are not rewritten.

use base64::Engine;
use http::{HeaderMap, HeaderValue};
use memchr::memmem;

use crate::secret::Secret;

/// What replaces an echoed value.
const REDACTED: &[u8] = b"[redacted by keystamp]";

/// Values shorter than this are not searched for: a 3-character secret would match ordinary
/// header text and mangle it, and is no secret worth the name.
const MIN_REDACTED_LEN: usize = 8;

/// The forms of one stamped value to take out of a response.
#[derive(Clone)]
pub struct Echoes {
    secret: Secret,
    parts: Parts,
    /// Encodings of a whole that only appear literally (the basic pair's base64, std and url).
    literal: Vec<Box<[u8]>>,
}

/// Which parts of the secret went out on the wire.
#[derive(Clone, Copy)]
enum Parts {
    Whole,
    /// AWS keys (`id\nsecret\nsession`): every line after the access key id, which is no secret.
    AfterFirstLine,
}

impl Echoes {
    /// The value went out as it is (bearer, a header template, a query parameter).
    pub fn of_value(secret: &Secret) -> Self {
        Self {
            secret: secret.clone(),
            parts: Parts::Whole,
            literal: Vec::new(),
        }
    }

    /// The value went out as `Basic base64(username:value)`.
    pub fn of_basic(secret: &Secret, username: &str) -> Self {
        let pair = format!("{username}:{}", secret.expose());
        let standard = base64::engine::general_purpose::STANDARD.encode(&pair);
        let url = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&pair);
        let mut literal = Vec::with_capacity(2);
        if url != standard {
            literal.push(url.into_bytes().into_boxed_slice());
        }
        literal.push(standard.into_bytes().into_boxed_slice());
        Self {
            secret: secret.clone(),
            parts: Parts::Whole,
            literal,
        }
    }

    /// AWS keys: the session token goes out raw in `x-amz-security-token`; the secret access key
    /// never should, but is searched for too.
    pub fn of_aws_keys(secret: &Secret) -> Self {
        Self {
            secret: secret.clone(),
            parts: Parts::AfterFirstLine,
            literal: Vec::new(),
        }
    }

    fn plain(&self) -> impl Iterator<Item = &[u8]> {
        let value = self.secret.expose();
        let (whole, lines) = match self.parts {
            Parts::Whole => (Some(value), None),
            Parts::AfterFirstLine => (None, Some(value.split('\n').skip(1))),
        };
        whole
            .into_iter()
            .chain(lines.into_iter().flatten())
            .map(str::as_bytes)
            .filter(|part| part.len() >= MIN_REDACTED_LEN)
    }

    /// Replaces every echo in every value of `headers`, whatever else the value holds.
    pub fn redact(&self, headers: &mut HeaderMap) {
        for value in headers.values_mut() {
            if let Some(clean) = self.redacted(value.as_bytes()) {
                if let Ok(clean) = HeaderValue::from_bytes(&clean) {
                    *value = clean;
                }
            }
        }
    }

    /// `bytes` with every echo replaced, or `None` when it holds none.
    fn redacted(&self, bytes: &[u8]) -> Option<Vec<u8>> {
        let mut found: Vec<(usize, usize)> = Vec::new();
        for literal in &self.literal {
            find_occurrences(&mut found, bytes, literal);
        }
        let escaped = memchr::memchr(b'%', bytes).is_some();
        let plus = memchr::memchr(b'+', bytes).is_some();
        for part in self.plain() {
            find_occurrences(&mut found, bytes, part);
            if escaped {
                found.extend(decoded_occurrences(bytes, part, false));
            }
            if plus && part.contains(&b' ') {
                found.extend(decoded_occurrences(bytes, part, true));
            }
        }
        if found.is_empty() {
            return None;
        }
        found.sort_unstable();
        let mut clean = Vec::with_capacity(bytes.len());
        let mut at = 0;
        for (start, end) in found {
            if end <= at {
                continue;
            }
            if start >= at {
                clean.extend_from_slice(bytes.get(at..start)?);
                clean.extend_from_slice(REDACTED);
            }
            at = end;
        }
        clean.extend_from_slice(bytes.get(at..)?);
        Some(clean)
    }
}

/// Up to this length a header value is searched for by the needle's first byte (`memchr`) and a
/// comparison at each hit: building a `memmem` finder, once per value and form on every
/// response, cost more than the search itself (4 % of a keep-alive request's instructions).
/// Past it, the finder's worst case stays linear whatever the upstream sends.
const SHORT_HAYSTACK: usize = 512;

/// Adds the byte ranges of `needle` in `haystack` to `found`: non-overlapping, left to right.
fn find_occurrences(found: &mut Vec<(usize, usize)>, haystack: &[u8], needle: &[u8]) {
    let Some(&first) = needle.first() else { return };
    if haystack.len() < needle.len() {
        return;
    }
    if haystack.len() > SHORT_HAYSTACK {
        found
            .extend(memmem::find_iter(haystack, needle).map(|start| (start, start + needle.len())));
        return;
    }
    let mut from = 0;
    while let Some(offset) = haystack
        .get(from..)
        .and_then(|rest| memchr::memchr(first, rest))
    {
        let start = from + offset;
        let end = start + needle.len();
        if haystack.get(start..end) == Some(needle) {
            found.push((start, end));
            from = end;
        } else {
            from = start + 1;
        }
    }
}

/// Ranges of `haystack` that percent-decode (and with `plus_as_space`, form-decode) to `needle`,
/// in any mixture of escaped and plain bytes and either hex case.
fn decoded_occurrences(haystack: &[u8], needle: &[u8], plus_as_space: bool) -> Vec<(usize, usize)> {
    let mut decoded = Vec::with_capacity(haystack.len());
    // starts[i]: where decoded byte i begins in `haystack`; one more entry for the end.
    let mut starts = Vec::with_capacity(haystack.len() + 1);
    let mut at = 0;
    while let Some(&byte) = haystack.get(at) {
        starts.push(at);
        let escape = haystack
            .get(at + 1..at + 3)
            .filter(|_| byte == b'%')
            .and_then(|hex| Some(hex_value(*hex.first()?)? << 4 | hex_value(*hex.get(1)?)?));
        match escape {
            Some(value) => {
                decoded.push(value);
                at += 3;
            }
            None => {
                decoded.push(if plus_as_space && byte == b'+' {
                    b' '
                } else {
                    byte
                });
                at += 1;
            }
        }
    }
    starts.push(at);
    let mut in_decoded = Vec::new();
    find_occurrences(&mut in_decoded, &decoded, needle);
    in_decoded
        .into_iter()
        .filter_map(|(start, end)| Some((*starts.get(start)?, *starts.get(end)?)))
        .collect()
}

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redact(echoes: &Echoes, value: &[u8]) -> Vec<u8> {
        let mut headers = HeaderMap::new();
        headers.insert("x-echo", HeaderValue::from_bytes(value).unwrap());
        echoes.redact(&mut headers);
        headers["x-echo"].as_bytes().to_vec()
    }

    #[test]
    fn the_raw_value_goes_wherever_it_sits() {
        let echoes = Echoes::of_value(&Secret::new("sk-live-123456"));
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-debug",
            HeaderValue::from_static("got Bearer sk-live-123456 ok"),
        );
        headers.append("x-debug", HeaderValue::from_static("sk-live-123456"));
        headers.insert("x-other", HeaderValue::from_static("fine"));
        echoes.redact(&mut headers);
        let all: Vec<_> = headers.get_all("x-debug").iter().collect();
        assert_eq!(
            all,
            [
                "got Bearer [redacted by keystamp] ok",
                "[redacted by keystamp]"
            ]
        );
        assert_eq!(headers["x-other"], "fine");
        // A value with a non-ASCII byte is still searched.
        assert_eq!(
            redact(&echoes, b"caf\xe9 sk-live-123456"),
            b"caf\xe9 [redacted by keystamp]"
        );
    }

    #[test]
    fn percent_encoded_forms_in_any_mixture_and_case_go() {
        let echoes = Echoes::of_value(&Secret::new("a/b+c=d e%41"));
        for sent in [
            "https://x/?k=a%2Fb%2Bc%3Dd+e%2541&z=1",
            "https://x/?k=a%2fb%2bc%3dd%20e%2541&z=1",
            "https://x/?k=a/b%2Bc=d%20e%2541&z=1",
        ] {
            let out = redact(&echoes, sent.as_bytes());
            assert_eq!(out, b"https://x/?k=[redacted by keystamp]&z=1", "{sent}");
        }
        assert_eq!(
            redact(&echoes, b"raw a/b+c=d e%41."),
            b"raw [redacted by keystamp]."
        );
    }

    #[test]
    fn the_basic_pair_goes_in_either_base64() {
        let secret = Secret::new("s3cr3t-?>value~~");
        let echoes = Echoes::of_basic(&secret, "svc");
        let standard = base64::engine::general_purpose::STANDARD.encode("svc:s3cr3t-?>value~~");
        let url = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("svc:s3cr3t-?>value~~");
        assert_ne!(standard.trim_end_matches('='), url);
        for sent in [format!("Basic {standard}"), format!("Basic {url}")] {
            assert_eq!(
                redact(&echoes, sent.as_bytes()),
                b"Basic [redacted by keystamp]"
            );
        }
    }

    #[test]
    fn aws_keys_lose_the_session_token_and_keep_the_access_key_id() {
        let echoes =
            Echoes::of_aws_keys(&Secret::new("AKIDEXAMPLE\nsecret-key-123\nsession-tok-456"));
        assert_eq!(
            redact(&echoes, b"AKIDEXAMPLE session-tok-456"),
            b"AKIDEXAMPLE [redacted by keystamp]"
        );
    }

    #[test]
    fn short_values_and_clean_headers_are_left_alone() {
        assert_eq!(
            redact(&Echoes::of_value(&Secret::new("abc")), b"abc abc"),
            b"abc abc"
        );
        assert_eq!(
            Echoes::of_value(&Secret::new("sk-live-123456")).redacted(b"nothing%20here"),
            None
        );
    }

    #[test]
    fn short_and_long_values_are_searched_alike() {
        let needle = b"sk-sk-sk";
        let mut cases: Vec<Vec<u8>> = vec![
            b"sk-sk-sk-sk-sk".to_vec(),
            b"xsk-sk-sk-sk-sk-sk-skx".to_vec(),
            b"sk-sk-s".to_vec(),
            b"sk-sk-sk".to_vec(),
        ];
        for len in [SHORT_HAYSTACK - 3, SHORT_HAYSTACK + 5] {
            let mut long = b"s".repeat(len - 16);
            long.extend_from_slice(b"sk-sk-sk-sk-sk-s");
            cases.push(long);
        }
        for haystack in cases {
            let mut ours = Vec::new();
            find_occurrences(&mut ours, &haystack, needle);
            let memmem: Vec<_> = memmem::find_iter(&haystack, needle)
                .map(|start| (start, start + needle.len()))
                .collect();
            assert_eq!(ours, memmem, "{}", String::from_utf8_lossy(&haystack));
        }
    }
}
