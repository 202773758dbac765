//! The one path rule, for route prefixes and agent scopes alike: a path is under a prefix only
//! when it starts with it *and* no upstream could read it as another path. Dot segments
//! (`/v1/../admin`), their encoded forms (`%2e%2e`), encoded separators (`%2f`, `%5c`),
//! backslashes, matrix parameters on a dot segment (`..;x=y`, which Tomcat, Jetty and Spring drop
//! before normalising) and double-encoded dots and separators (`%252e`) all fail the test.

/// Whether `path` (without the query) lies under `prefix` for every upstream's reading of it.
pub fn is_under(prefix: &str, path: &str) -> bool {
    path.starts_with(prefix) && !is_ambiguous(path)
}

/// Whether an upstream could resolve `path` to a different path than its bytes say.
pub fn is_ambiguous(path: &str) -> bool {
    let path = path.split(['?', '#']).next().unwrap_or(path);
    if path.contains('\\') {
        return true;
    }
    let lower = path.to_ascii_lowercase();
    const ENCODED: [&str; 6] = ["%2e", "%2f", "%5c", "%252e", "%252f", "%255c"];
    if ENCODED.iter().any(|encoded| lower.contains(encoded)) {
        return true;
    }
    path.split('/').any(|segment| {
        // `..;jsessionid=x` is `..` to a servlet container.
        let bare = segment.split(';').next().unwrap_or(segment);
        bare == "." || bare == ".."
    })
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
            "/v1/..\\admin",
            "/v1/%5c..%5cadmin",
            "/v1/..",
        ] {
            assert!(!is_under("/v1/", escape), "{escape}");
        }
        for fine in [
            "/v1/",
            "/v1/chat",
            "/v1/a.b/c..d/...",
            "/v1/x;y=z",
            "/v1/a%20b",
            "/v1/q?next=../x",
        ] {
            assert!(is_under("/v1/", fine), "{fine}");
        }
        assert!(!is_under("/v1/", "/v2/x"));
    }
}
