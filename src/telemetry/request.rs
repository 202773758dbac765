//! One request's account: filled in as the pipeline learns the route, credential and outcome,
//! and finished when the response body ends (or the agent goes away), so durations and byte
//! counts cover streamed responses whole. Finishing records the metrics and the audit line.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use http::{Method, StatusCode};
use tokio::time::Instant;

use super::series::{Labels, Origin};
use crate::telemetry::Telemetry;
use crate::time::format_rfc3339;

#[derive(Debug)]
pub struct RequestRecord {
    pub time: SystemTime,
    pub started: Instant,
    pub agent: Option<Arc<str>>,
    pub method: Method,
    pub host: String,
    /// Without the query string: a query-injected key would be in it.
    pub path: String,
    pub route: Option<Arc<str>>,
    pub credential: Option<Arc<str>>,
    pub fingerprint: Option<String>,
    /// The agent's task id (`Keystamp-Task`); never a metric label (unbounded).
    pub task: Option<String>,
    pub status: StatusCode,
    /// Whether keystamp made the response itself.
    pub by_keystamp: bool,
    pub error: Option<&'static str>,
    /// For keystamp's own answers: whose fault (agent, upstream, keystamp).
    pub fault: Option<&'static str>,
    pub request_bytes: Arc<AtomicU64>,
    /// How the connection arrived: `proxy` (HTTPS_PROXY) or `transparent` (redirected).
    pub via: &'static str,
}

impl RequestRecord {
    pub fn start(agent: Option<Arc<str>>, method: &Method, host: &str, path: &str) -> Self {
        Self {
            time: SystemTime::now(),
            started: Instant::now(),
            agent,
            method: method.clone(),
            host: host.to_string(),
            path: path.to_string(),
            route: None,
            credential: None,
            fingerprint: None,
            task: None,
            status: StatusCode::OK,
            by_keystamp: false,
            error: None,
            fault: None,
            request_bytes: Arc::default(),
            via: "proxy",
        }
    }

    /// Records the metrics and the audit line; `response_bytes` is what reached the agent.
    pub fn finish(&self, telemetry: &Telemetry, response_bytes: u64) {
        let duration = self.started.elapsed();
        let origin = if self.by_keystamp {
            Origin::Keystamp
        } else {
            Origin::Upstream
        };
        if telemetry.per_request_metrics {
            let labels = Labels {
                route: self.route.as_ref(),
                credential: self.credential.as_ref(),
                agent: self.agent.as_ref(),
                status: self.status,
                origin,
            };
            telemetry
                .series
                .observe(&telemetry.metrics, &labels, duration.as_secs_f64());
        }
        if telemetry.audit.is_on() {
            let time = format_rfc3339(self.time);
            let line = AuditLine {
                time: &time,
                kind: "request",
                via: self.via,
                agent: self.agent.as_deref(),
                route: self.route.as_deref(),
                credential: self.credential.as_deref(),
                fingerprint: self.fingerprint.as_deref(),
                task: self.task.as_deref(),
                method: self.method.as_str(),
                host: &self.host,
                path: &self.path,
                status: self.status.as_u16(),
                origin: origin.label(),
                duration_ms: (duration.as_secs_f64() * 1_000_000.0).round() / 1000.0,
                bytes_in: self.request_bytes.load(Ordering::Relaxed),
                bytes_out: response_bytes,
                error: self.error,
                fault: self.fault,
            };
            telemetry
                .audit
                .record_with(|out| line.write_json(out), &telemetry.metrics);
        }
    }
}

/// One request's audit line, serialised without building a map.
#[cfg_attr(test, derive(serde::Serialize))]
struct AuditLine<'a> {
    time: &'a str,
    kind: &'static str,
    via: &'static str,
    agent: Option<&'a str>,
    route: Option<&'a str>,
    credential: Option<&'a str>,
    fingerprint: Option<&'a str>,
    task: Option<&'a str>,
    method: &'a str,
    host: &'a str,
    path: &'a str,
    status: u16,
    origin: &'static str,
    duration_ms: f64,
    bytes_in: u64,
    bytes_out: u64,
    error: Option<&'static str>,
    fault: Option<&'static str>,
}

impl AuditLine<'_> {
    /// The JSON object serde's derive writes, field for field, with the keys as literals and
    /// strings that need no escaping copied whole: serde's string writer, which scans keys too,
    /// was 4 % of a keep-alive request's instructions.
    fn write_json(&self, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
        out.extend_from_slice(b"{\"time\":");
        json_string(out, self.time)?;
        out.extend_from_slice(b",\"kind\":");
        json_string(out, self.kind)?;
        out.extend_from_slice(b",\"via\":");
        json_string(out, self.via)?;
        json_field(out, b",\"agent\":", self.agent)?;
        json_field(out, b",\"route\":", self.route)?;
        json_field(out, b",\"credential\":", self.credential)?;
        json_field(out, b",\"fingerprint\":", self.fingerprint)?;
        json_field(out, b",\"task\":", self.task)?;
        out.extend_from_slice(b",\"method\":");
        json_string(out, self.method)?;
        out.extend_from_slice(b",\"host\":");
        json_string(out, self.host)?;
        out.extend_from_slice(b",\"path\":");
        json_string(out, self.path)?;
        out.extend_from_slice(b",\"status\":");
        serde_json::to_writer(&mut *out, &self.status)?;
        out.extend_from_slice(b",\"origin\":");
        json_string(out, self.origin)?;
        out.extend_from_slice(b",\"duration_ms\":");
        serde_json::to_writer(&mut *out, &self.duration_ms)?;
        out.extend_from_slice(b",\"bytes_in\":");
        serde_json::to_writer(&mut *out, &self.bytes_in)?;
        out.extend_from_slice(b",\"bytes_out\":");
        serde_json::to_writer(&mut *out, &self.bytes_out)?;
        json_field(out, b",\"error\":", self.error)?;
        json_field(out, b",\"fault\":", self.fault)?;
        out.push(b'}');
        Ok(())
    }
}

/// `key` then the string, or `null`.
fn json_field(out: &mut Vec<u8>, key: &[u8], value: Option<&str>) -> Result<(), serde_json::Error> {
    out.extend_from_slice(key);
    match value {
        Some(value) => json_string(out, value),
        None => {
            out.extend_from_slice(b"null");
            Ok(())
        }
    }
}

/// A JSON string: copied whole when nothing in it needs escaping (the usual case), else
/// escaped by serde_json (control characters, `"` and `\`, as serde would).
fn json_string(out: &mut Vec<u8>, value: &str) -> Result<(), serde_json::Error> {
    let bytes = value.as_bytes();
    if needs_no_escape(bytes) {
        out.reserve(bytes.len() + 2);
        out.push(b'"');
        out.extend_from_slice(bytes);
        out.push(b'"');
        Ok(())
    } else {
        serde_json::to_writer(out, value)
    }
}

/// No control character, `"` or `\` in `bytes`, tested eight bytes at a time (a byte-wise loop
/// was most of an audit line's cost): a word has a zero byte where `(w - 0x01..) & !w & 0x80..`
/// is set, and a byte below 0x20 where `(w - 0x20..) & !w & 0x80..` is; neither test can miss
/// one, and a spurious bit only ever sits above a real one, so "none" is exact.
fn needs_no_escape(bytes: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    const QUOTES: u64 = u64::from_ne_bytes([b'"'; 8]);
    const BACKSLASHES: u64 = u64::from_ne_bytes([b'\\'; 8]);
    const SPACES: u64 = u64::from_ne_bytes([0x20; 8]);
    let has_zero = |w: u64| w.wrapping_sub(ONES) & !w & HIGHS != 0;
    let mut words = bytes.chunks_exact(8);
    for word in &mut words {
        let mut eight = [0u8; 8];
        eight.copy_from_slice(word);
        let w = u64::from_ne_bytes(eight);
        let control = w.wrapping_sub(SPACES) & !w & HIGHS != 0;
        if control || has_zero(w ^ QUOTES) || has_zero(w ^ BACKSLASHES) {
            return false;
        }
    }
    words
        .remainder()
        .iter()
        .all(|&b| b >= 0x20 && b != b'"' && b != b'\\')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_escaped_wherever_the_character_sits() {
        for special in ['"', '\\', '\u{0}', '\u{1f}', '\n'] {
            for at in 0..20 {
                let mut value: String = "abcdefghijklmnopqrst".into();
                value.replace_range(at..at + 1, &special.to_string());
                let mut ours = Vec::new();
                json_string(&mut ours, &value).unwrap();
                assert_eq!(ours, serde_json::to_vec(&value).unwrap(), "{value:?}");
            }
        }
        for clean in [
            "",
            "a",
            "/v1/chat/completions",
            " !#~\u{7f}é漢字 and more text",
        ] {
            let mut ours = Vec::new();
            json_string(&mut ours, clean).unwrap();
            assert_eq!(ours, serde_json::to_vec(clean).unwrap());
        }
    }

    #[test]
    fn audit_lines_are_written_as_serde_writes_them() {
        let tricky = "/v1/a\"b\\c\u{1}\n\u{7f}é漢?x=1";
        for (optional, path, duration_ms) in [
            (None, "/plain", 0.0),
            (Some("agent-7"), tricky, 12.345),
            (Some(tricky), "/", f64::NAN),
        ] {
            let line = AuditLine {
                time: "2026-11-28T16:00:00.123Z",
                kind: "request",
                via: "transparent",
                agent: optional,
                route: optional,
                credential: Some("github"),
                fingerprint: optional,
                task: optional,
                method: "POST",
                host: "api.example.test",
                path,
                status: 201,
                origin: "upstream",
                duration_ms,
                bytes_in: 0,
                bytes_out: u64::MAX,
                error: None,
                fault: Some("agent"),
            };
            let mut ours = Vec::new();
            line.write_json(&mut ours).unwrap();
            assert_eq!(
                String::from_utf8(ours).unwrap(),
                serde_json::to_string(&line).unwrap()
            );
        }
    }
}
