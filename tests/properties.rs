//! Property tests over the functions hostile input reaches first: the host/authority parser, the
//! path rule and the config parser. They run in every CI build; `fuzz/` runs the same functions
//! under libFuzzer (briefly in CI, longer by hand).

// Test code: a panic is a failed assertion, which is what we want here.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use keystamp::internals::{is_under, Host};
use keystamp::Config;
use proptest::prelude::*;

/// Every reading an upstream might give a path: percent-decoded up to three times, backslashes
/// as slashes, `;params` dropped from each segment, dot segments resolved.
fn worst_readings(path: &str) -> Vec<String> {
    let mut readings = vec![path.to_string()];
    let mut current = path.to_string();
    for _ in 0..3 {
        current = percent_decode(&current);
        readings.push(current.clone());
    }
    readings
        .into_iter()
        .map(|reading| resolve_dots(&reading.replace('\\', "/")))
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied(),
            bytes.get(i + 2).copied(),
        ) {
            (b'%', Some(h), Some(l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap() * 16 + hex(l).unwrap()) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn resolve_dots(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    for segment in path.split('/') {
        match segment.split(';').next().unwrap_or(segment) {
            "." => {}
            ".." => {
                segments.pop();
            }
            _ => segments.push(segment),
        }
    }
    segments.join("/")
}

fn path_segment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("..".to_string()),
        Just(".".to_string()),
        Just("%2e%2e".to_string()),
        Just("%2E.".to_string()),
        Just("..;x=y".to_string()),
        Just("%252e%252e".to_string()),
        Just("..%2f".to_string()),
        Just("..\\".to_string()),
        Just("%5c".to_string()),
        Just(".%%32e".to_string()),
        "[a-z0-9._;=%-]{0,8}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    #[test]
    fn a_path_under_a_prefix_stays_under_it_for_every_reading(
        segments in proptest::collection::vec(path_segment(), 0..8)
    ) {
        let prefix = "/v1/";
        let path = format!("{prefix}{}", segments.join("/"));
        if is_under(prefix, &path) {
            for reading in worst_readings(&path) {
                prop_assert!(
                    reading.starts_with("/v1/") || reading == "/v1",
                    "{path} passed the prefix but reads as {reading}"
                );
            }
        }
    }

    #[test]
    fn host_parsing_is_total_and_normalised(text in "\\PC{0,40}") {
        if let Ok((host, port)) = Host::parse_authority(&text) {
            let bare = host.as_str();
            prop_assert!(!bare.is_empty());
            prop_assert!(!bare.ends_with('.'));
            prop_assert!(!bare.contains('['));
            prop_assert_eq!(bare.to_ascii_lowercase(), bare);
            prop_assert!(port.is_none_or(|p| p != 0));
            // What keystamp writes into a URI parses back to the same host and port.
            let written = host.authority(port.unwrap_or(443), 0);
            let (again, again_port) = Host::parse_authority(&written).unwrap();
            prop_assert_eq!(again, host);
            prop_assert_eq!(again_port, Some(port.unwrap_or(443)));
        }
    }

    #[test]
    fn config_errors_never_echo_what_was_pasted(
        slot in 0usize..6,
        pasted in "[a-zA-Z0-9_+/-]{12,24}",
    ) {
        let secret = format!("sk{pasted}");
        let yaml = [
            format!("listen: {secret}\nca: {{ generate: true }}\n"),
            format!("listen: 127.0.0.1:1\nca: {{ generate: true }}\nshutdown_grace: {secret}\n"),
            format!("listen: 127.0.0.1:1\nca: {{ generate: true }}\nunmatched: {secret}\n"),
            format!("listen: 127.0.0.1:1\nca: {{ generate: true }}\negress: {{ allow_cidrs: [{secret}] }}\n"),
            format!("listen: 127.0.0.1:1\nca: {{ generate: true }}\nroutes: {secret}\n"),
            format!("listen: 127.0.0.1:1\nca: {{ generate: true }}\ncredentials: {{ k: {{ source: {{ env: K }}, refresh_before: {secret} }} }}\n"),
        ][slot].clone();
        let error = Config::from_yaml(std::path::Path::new("/t/k.yaml"), &yaml).unwrap_err();
        prop_assert!(!error.to_string().contains(&secret), "{}", error);
    }

    #[test]
    fn the_config_parser_never_panics(text in "\\PC{0,200}") {
        let _ = Config::from_yaml(std::path::Path::new("/t/k.yaml"), &text);
    }
}
