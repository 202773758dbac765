//! The path rule on arbitrary paths: whatever it accepts under `/v1/` stays under `/v1/` after
//! percent-decoding (up to three times), backslashes as slashes, `;params` dropped and dot
//! segments resolved: every reading an upstream might give it.
#![no_main]

use keystamp::internals::is_under;
use libfuzzer_sys::fuzz_target;

fn decode(text: &str) -> String {
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
                out.push((hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0)) as u8);
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

fn resolve(path: &str) -> String {
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

fuzz_target!(|tail: &str| {
    let path = format!("/v1/{tail}");
    if !is_under("/v1/", &path) {
        return;
    }
    let mut reading = path.clone();
    for _ in 0..4 {
        let resolved = resolve(&reading.replace('\\', "/"));
        assert!(
            resolved.starts_with("/v1/") || resolved == "/v1",
            "{path} reads as {resolved}"
        );
        reading = decode(&reading);
    }
});
