//! The one path rule, for route prefixes and agent scopes alike: a path is under a prefix only
//! when it starts with it *and* no upstream could read it as another path. Dot segments
//! (`/v1/../admin`) are refused in every reading a server might make of the path: after
//! percent-decoding it once or several times (`%2e%2e`, `%252e`, `%%32e`), with backslashes as
//! slashes, and with a segment's matrix parameters dropped (`..;x=y`, which Tomcat, Jetty and
//! Spring drop before normalising). Encoded separators (`%2f`, `%5c`) are refused outright.

use std::borrow::Cow;

/// How many rounds of percent-decoding are tried; a path still changing after that is refused.
const DECODE_ROUNDS: usize = 4;

/// Whether `path` (without the query) lies under `prefix` for every upstream's reading of it.
pub fn is_under(prefix: &str, path: &str) -> bool {
    path.starts_with(prefix) && !is_ambiguous(path)
}

/// Whether an upstream could resolve `path` (the path alone, no query) to a different path
/// than its bytes say. A `#` cannot be in a request's path; one that is is refused too.
pub fn is_ambiguous(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    if ["%2f", "%5c"].iter().any(|encoded| lower.contains(encoded)) {
        return true;
    }
    let mut reading = Cow::Borrowed(path);
    for _ in 0..DECODE_ROUNDS {
        if reading.contains(['\\', '#']) || has_dot_segment(&reading) {
            return true;
        }
        if !reading.contains('%') {
            return false;
        }
        match percent_decode(&reading) {
            Some(decoded) => reading = Cow::Owned(decoded),
            // Nothing decodable left: this reading is the last one.
            None => return false,
        }
    }
    true
}

fn has_dot_segment(path: &str) -> bool {
    path.split('/').any(|segment| {
        // `..;jsessionid=x` is `..` to a servlet container.
        let bare = segment.split(';').next().unwrap_or(segment);
        bare == "." || bare == ".."
    })
}

/// One round of percent-decoding; `None` when there was nothing to decode.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut changed = false;
    let mut i = 0;
    while let Some(&byte) = bytes.get(i) {
        let high = bytes.get(i + 1).and_then(|b| (*b as char).to_digit(16));
        let low = bytes.get(i + 2).and_then(|b| (*b as char).to_digit(16));
        match (byte, high, low) {
            (b'%', Some(high), Some(low)) => {
                out.push((high * 16 + low) as u8);
                changed = true;
                i += 3;
            }
            _ => {
                out.push(byte);
                i += 1;
            }
        }
    }
    changed.then(|| String::from_utf8_lossy(&out).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_segments_in_every_disguise_are_not_under_the_prefix() {
        for escape in [
            "/v1/../admin",
            "/v1/./../admin",
            "/v1/%2e%2e/admin",
            "/v1/%2E%2E%2Fadmin",
            "/v1/..%2fadmin",
            "/v1/..;/admin",
            "/v1/..;x=y/admin",
            "/v1/.;/x",
            "/v1/%252e%252e/admin",
            "/v1/..%252fadmin",
            "/v1/.%%32e;\u{1f}",
            "/v1/%25252e%25252e/x",
            "/v1/..\\admin",
            "/v1/%5c..%5cadmin",
            "/v1/..",
            "/v1/#/../x",
        ] {
            assert!(!is_under("/v1/", escape), "{escape}");
        }
        for fine in [
            "/v1/",
            "/v1/chat",
            "/v1/a.b/c..d/...",
            "/v1/x;y=z",
            "/v1/a%20b",
            "/v1/100%",
            "/v1/%zz",
        ] {
            assert!(is_under("/v1/", fine), "{fine}");
        }
        assert!(!is_under("/v1/", "/v2/x"));
    }
}
