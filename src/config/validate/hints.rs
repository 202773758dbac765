//! What a newcomer needs to hear when serde stops: the name of a missing key and how to write
//! it, the key a misspelling was meant to be, and that a syntax error is YAML's. The names are
//! the schema's own (never a value from the file).

/// How to write a required key, for the keys people most often leave out.
pub fn missing_key(key: &str) -> String {
    let hint = match key {
        "ca" => Some("add `ca: { generate: true }` or `ca: { cert: ..., key: ... }`"),
        "listen" => Some("add `listen: 127.0.0.1:3128`"),
        "routes" => Some("add `routes: []` or a list of routes"),
        "host" => Some("every route names the host it stamps, like `host: api.openai.com`"),
        "inject" => Some("add `inject: { type: bearer }` (or basic, header, query, aws_sigv4)"),
        "type" => Some("add `type: bearer` (or basic, header, query, aws_sigv4)"),
        "source" => Some("add `source: { file: ... }` (or env, command, vault, ...)"),
        "name" => Some("the fleet needs a `name` that isolates it in the store"),
        "store" => Some("add `store: { url: { env: REDIS_URL } }`"),
        "url" => Some("add `url: { env: REDIS_URL }` (a file or env source)"),
        "per_second" => Some("add `per_second: 10`"),
        "token_url" => {
            Some("add the token endpoint, like `token_url: https://auth.example.com/token`")
        }
        "client_id" | "client_secret" => Some("give it a source, like `{ env: CLIENT_ID }`"),
        "app_id" | "installation_id" => {
            Some("GitHub shows both ids in the app's settings and the installation's URL")
        }
        "private_key" => Some("add `private_key: { file: /path/to/app.pem }`"),
        "key" => Some("add `key: { file: /path/to/service-account.json }`"),
        "address" => Some("add the server's base URL, like `address: https://vault.internal:8200`"),
        "auth" => {
            Some("add `auth: { jwt: { role: ..., token: { file: ... } } }` (or kubernetes, token)")
        }
        "path" | "field" => Some("name the secret's path and the field that is the credential"),
        "secret_id" | "region" | "credential" => {
            Some("name the secret, its region and the aws credential that signs")
        }
        "uid" => Some("the uid keystamp runs as (the chart uses 65532)"),
        _ => None,
    };
    match hint {
        Some(hint) => format!("missing key `{key}`: {hint}"),
        None => format!("missing key `{key}`"),
    }
}

/// The expected key closest to `field`, if it is a likely misspelling (at most two edits, or
/// the same letters in another case).
pub fn did_you_mean<'a>(field: &str, expected: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    expected
        .map(|candidate| {
            (
                edit_distance(&field.to_ascii_lowercase(), candidate),
                candidate,
            )
        })
        .filter(|(distance, candidate)| *distance <= 2 && *distance < candidate.len())
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

/// Levenshtein distance over bytes (keys are ASCII).
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut current = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitute = previous.get(j).copied().unwrap_or(0) + usize::from(ca != cb);
            let delete = previous.get(j + 1).copied().unwrap_or(0) + 1;
            let insert = current.get(j).copied().unwrap_or(0) + 1;
            current.push(substitute.min(delete).min(insert));
        }
        previous = current;
    }
    previous.last().copied().unwrap_or(0)
}

/// Whether serde's message is the YAML parser's (syntax, indentation), not the schema's.
pub fn is_yaml_syntax(message: &str) -> bool {
    [
        "while parsing",
        "while scanning",
        "did not find expected",
        "found character that cannot start",
        "mapping values are not allowed",
        "found unexpected end of stream",
        "could not find expected",
    ]
    .iter()
    .any(|marker| message.contains(marker))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_misspellings_are_suggested() {
        let expected = ["file", "env", "command", "format"];
        assert_eq!(did_you_mean("fiel", expected.iter().copied()), Some("file"));
        assert_eq!(did_you_mean("File", expected.iter().copied()), Some("file"));
        assert_eq!(
            did_you_mean("comand", expected.iter().copied()),
            Some("command")
        );
        assert_eq!(did_you_mean("zzzzzz", expected.iter().copied()), None);
        assert_eq!(
            did_you_mean("en", ["env", "file"].iter().copied()),
            Some("env")
        );
    }

    #[test]
    fn missing_keys_are_named_with_a_hint() {
        assert!(missing_key("ca").contains("ca: { generate: true }"));
        assert_eq!(missing_key("whatever"), "missing key `whatever`");
    }
}
