//! The per-credential families (auth failures, breaker state and transitions, manual switches,
//! rate limiting, reads, store polls, version and expiry) as plain atomics per credential in one
//! sorted map, written out as Prometheus text at scrape. A prometheus child per label set keeps
//! its own descriptor, help text and label pairs (about 450 bytes each): with 10,000 credentials
//! and 13 series each that was 56 MiB of heap and most of the start-up time.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

const AUTH_STATUSES: [&str; 2] = ["401", "403"];
const BREAKER_STATES: [&str; 3] = ["open", "half_open", "closed"];
const MANUAL_ACTIONS: [&str; 2] = ["open", "close"];
const READ_RESULTS: [&str; 3] = ["changed", "unchanged", "error"];

/// What one read of a credential's source came to, as `result` labels it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadResult {
    Changed,
    Unchanged,
    Error,
}

/// One credential's series.
#[derive(Debug, Default)]
pub struct CredentialCounters {
    auth_failures: [AtomicU64; 2],
    transitions: [AtomicU64; 3],
    manual: [AtomicU64; 2],
    rate_limited: AtomicU64,
    reads: [AtomicU64; 3],
    /// `Some` for a secret-store source: its polls are counted apart from its reads.
    polls: Option<[AtomicU64; 3]>,
    breaker_state: AtomicI64,
    version: Mutex<VersionSeries>,
}

/// The gauges of a credential's current version.
#[derive(Debug, Default)]
struct VersionSeries {
    fingerprint: Option<Box<str>>,
    /// Unix seconds; `None` until a version has an expiry (a 0 would read as "expired in 1970").
    expires_at: Option<f64>,
}

fn bump(counters: &[AtomicU64], labels: &[&str], label: &str) {
    if let Some(counter) = labels
        .iter()
        .position(|known| *known == label)
        .and_then(|i| counters.get(i))
    {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

impl CredentialCounters {
    /// The upstream said the credential is bad (`401` or `403`).
    pub fn auth_failure(&self, status: u16) {
        let index = match status {
            401 => 0,
            403 => 1,
            _ => return,
        };
        if let Some(counter) = self.auth_failures.get(index) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The breaker moved to `to` (`open`, `half_open`, `closed`), whose gauge value is `value`.
    pub fn breaker_moved(&self, to: &str, value: i64) {
        self.breaker_state.store(value, Ordering::Relaxed);
        bump(&self.transitions, &BREAKER_STATES, to);
    }

    /// An operator forced the breaker `open` or `close`d.
    pub fn manual_action(&self, action: &str) {
        bump(&self.manual, &MANUAL_ACTIONS, action);
    }

    /// keystamp answered 429 itself.
    pub fn rate_limited(&self) {
        self.rate_limited.fetch_add(1, Ordering::Relaxed);
    }

    /// A read of the source (and, for a secret store, a poll of it).
    pub fn read(&self, result: ReadResult) {
        let index = result as usize;
        if let Some(counter) = self.reads.get(index) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(counter) = self.polls.as_ref().and_then(|polls| polls.get(index)) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The current version's fingerprint and expiry (`None`: no usable version).
    pub fn set_version(&self, current: Option<(&str, Option<f64>)>) {
        let mut version = self.version.lock().unwrap_or_else(PoisonError::into_inner);
        match current {
            Some((fingerprint, expires_at)) => {
                if version.fingerprint.as_deref() != Some(fingerprint) {
                    version.fingerprint = Some(fingerprint.into());
                }
                version.expires_at = expires_at;
            }
            None => *version = VersionSeries::default(),
        }
    }
}

/// Every credential's series, and whether counters that never moved are written out.
#[derive(Debug)]
pub struct CredentialSeries {
    table: RwLock<BTreeMap<Arc<str>, Arc<CredentialCounters>>>,
    zeros: bool,
}

/// How one family is described, and how it writes one credential's lines.
struct Family {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    write: fn(&Lines<'_>, &mut String, &CredentialCounters),
}

/// One credential's lines of one family: the family, the credential's escaped name, and
/// whether counters that never moved are written.
struct Lines<'a> {
    family: &'static str,
    credential: &'a str,
    zeros: bool,
}

impl Lines<'_> {
    /// `family{labels} value`, the credential's label and `extra` in label-name order (as the
    /// prometheus crate writes them).
    fn line(&self, out: &mut String, extra: Option<(&str, &str)>, value: impl std::fmt::Display) {
        let (family, credential) = (self.family, self.credential);
        let _ = match extra {
            None => writeln!(out, "{family}{{credential=\"{credential}\"}} {value}"),
            Some((label, text)) if label < "credential" => writeln!(
                out,
                "{family}{{{label}=\"{text}\",credential=\"{credential}\"}} {value}"
            ),
            Some((label, text)) => writeln!(
                out,
                "{family}{{credential=\"{credential}\",{label}=\"{text}\"}} {value}"
            ),
        };
    }

    /// A counter: skipped at zero unless zeros are written.
    fn counter(&self, out: &mut String, extra: Option<(&str, &str)>, value: &AtomicU64) {
        let value = value.load(Ordering::Relaxed);
        if self.zeros || value > 0 {
            self.line(out, extra, value);
        }
    }

    /// One counter per label value, `label` naming them.
    fn counters(&self, out: &mut String, label: &str, values: &[&str], counters: &[AtomicU64]) {
        for (text, value) in values.iter().zip(counters) {
            self.counter(out, Some((label, text)), value);
        }
    }
}

fn version(counters: &CredentialCounters) -> std::sync::MutexGuard<'_, VersionSeries> {
    counters
        .version
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
}

/// Sorted by name, as the registry writes its families.
const FAMILIES: [Family; 9] = [
    Family {
        name: "keystamp_auth_failures_total",
        kind: "counter",
        help: "Upstream answers that said the credential itself is bad.",
        write: |lines, out, c| lines.counters(out, "status", &AUTH_STATUSES, &c.auth_failures),
    },
    Family {
        name: "keystamp_breaker_manual_actions_total",
        kind: "counter",
        help: "Breakers forced open or closed by an operator through the admin listener.",
        write: |lines, out, c| lines.counters(out, "action", &MANUAL_ACTIONS, &c.manual),
    },
    Family {
        name: "keystamp_breaker_state",
        kind: "gauge",
        help: "Auth circuit breaker per credential: 0 closed, 1 open, 2 half-open.",
        write: |lines, out, c| lines.line(out, None, c.breaker_state.load(Ordering::Relaxed)),
    },
    Family {
        name: "keystamp_breaker_transitions_total",
        kind: "counter",
        help: "Breaker state changes per credential.",
        write: |lines, out, c| lines.counters(out, "to", &BREAKER_STATES, &c.transitions),
    },
    Family {
        name: "keystamp_credential_expiry_timestamp_seconds",
        kind: "gauge",
        help: "When the current version of a credential expires (Unix time).",
        write: |lines, out, c| {
            if let Some(at) = version(c).expires_at {
                lines.line(out, None, at);
            }
        },
    },
    Family {
        name: "keystamp_credential_reloads_total",
        kind: "counter",
        help: "Credential reads by result: changed, unchanged, error.",
        write: |lines, out, c| lines.counters(out, "result", &READ_RESULTS, &c.reads),
    },
    Family {
        name: "keystamp_credential_store_polls_total",
        kind: "counter",
        help: "Polls of a secret store (vault) by result: changed, unchanged, error.",
        write: |lines, out, c| {
            if let Some(polls) = &c.polls {
                lines.counters(out, "result", &READ_RESULTS, polls);
            }
        },
    },
    Family {
        name: "keystamp_credential_version_info",
        kind: "gauge",
        help: "The fingerprint of each credential's current version (value 1).",
        write: |lines, out, c| {
            if let Some(fingerprint) = &version(c).fingerprint {
                lines.line(out, Some(("fingerprint", &escape(fingerprint))), 1);
            }
        },
    },
    Family {
        name: "keystamp_rate_limited_total",
        kind: "counter",
        help: "Requests keystamp answered 429 itself: over the credential's rate limit or held after an upstream 429.",
        write: |lines, out, c| lines.counter(out, None, &c.rate_limited),
    },
];

impl CredentialSeries {
    /// `zeros`: write every counter from the moment its credential is defined (so
    /// `increase(...) > 0` alerts see the first event), or only once it has counted something.
    pub fn new(zeros: bool) -> Self {
        Self {
            table: RwLock::default(),
            zeros,
        }
    }

    /// A credential's series, made at zero the first time it is defined.
    pub fn define(&self, name: &Arc<str>, secret_store: bool) -> Arc<CredentialCounters> {
        let fits = |counters: &CredentialCounters| counters.polls.is_some() == secret_store;
        if let Some(existing) = self.read_table().get(name).filter(|c| fits(c)) {
            return existing.clone();
        }
        let mut table = self.table.write().unwrap_or_else(PoisonError::into_inner);
        match table.get(name) {
            Some(existing) if fits(existing) => existing.clone(),
            // New, or its source became (or stopped being) a secret store: counted afresh.
            _ => {
                let counters = Arc::new(CredentialCounters {
                    polls: secret_store.then(Default::default),
                    ..CredentialCounters::default()
                });
                table.insert(name.clone(), counters.clone());
                counters
            }
        }
    }

    /// Drops a removed credential's series.
    pub fn forget(&self, name: &str) {
        let removed = self
            .table
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name);
        if let Some(counters) = removed {
            counters.set_version(None);
        }
    }

    fn read_table(
        &self,
    ) -> std::sync::RwLockReadGuard<'_, BTreeMap<Arc<str>, Arc<CredentialCounters>>> {
        self.table.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends the nine families in Prometheus text format (labels in name order, as the
    /// prometheus crate writes them).
    pub fn render(&self, out: &mut String) {
        let table: Vec<(Arc<str>, Arc<CredentialCounters>)> = self
            .read_table()
            .iter()
            .map(|(name, counters)| (name.clone(), counters.clone()))
            .collect();
        let names: Vec<_> = table.iter().map(|(name, _)| escape(name)).collect();
        for family in &FAMILIES {
            let start = out.len();
            let _ = writeln!(out, "# HELP {} {}", family.name, family.help);
            let _ = writeln!(out, "# TYPE {} {}", family.name, family.kind);
            let header = out.len();
            for (name, (_, counters)) in names.iter().zip(&table) {
                let lines = Lines {
                    family: family.name,
                    credential: name,
                    zeros: self.zeros,
                };
                (family.write)(&lines, out, counters);
            }
            if out.len() == header {
                out.truncate(start);
            }
        }
    }
}

/// A label value as the text format needs it: backslash, double quote and newline escaped.
fn escape(value: &str) -> std::borrow::Cow<'_, str> {
    if !value.contains(['\\', '"', '\n']) {
        return std::borrow::Cow::Borrowed(value);
    }
    std::borrow::Cow::Owned(
        value
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_zeros_and_counts_in_label_name_order() {
        let series = CredentialSeries::new(true);
        let openai = series.define(&Arc::from("openai"), false);
        openai.auth_failure(401);
        openai.manual_action("open");
        openai.breaker_moved("open", 1);
        openai.set_version(Some(("ab12", Some(1_700_000_000.0))));
        let mut out = String::new();
        series.render(&mut out);
        assert!(
            out.contains("keystamp_auth_failures_total{credential=\"openai\",status=\"401\"} 1\n")
        );
        assert!(
            out.contains("keystamp_auth_failures_total{credential=\"openai\",status=\"403\"} 0\n")
        );
        assert!(out.contains(
            "keystamp_breaker_manual_actions_total{action=\"open\",credential=\"openai\"} 1\n"
        ));
        assert!(out.contains("keystamp_breaker_state{credential=\"openai\"} 1\n"));
        assert!(out.contains(
            "keystamp_credential_version_info{credential=\"openai\",fingerprint=\"ab12\"} 1\n"
        ));
        assert!(out.contains(
            "keystamp_credential_expiry_timestamp_seconds{credential=\"openai\"} 1700000000\n"
        ));
        assert!(
            !out.contains("store_polls"),
            "no secret-store credential: {out}"
        );
    }

    #[test]
    fn without_zeros_a_counter_appears_with_its_first_event() {
        let series = CredentialSeries::new(false);
        let github = series.define(&Arc::from("github"), true);
        let mut out = String::new();
        series.render(&mut out);
        assert!(!out.contains("keystamp_rate_limited_total"), "{out}");
        github.rate_limited();
        github.read(ReadResult::Changed);
        out.clear();
        series.render(&mut out);
        assert!(out.contains("keystamp_rate_limited_total{credential=\"github\"} 1\n"));
        assert!(out.contains(
            "keystamp_credential_store_polls_total{credential=\"github\",result=\"changed\"} 1\n"
        ));
        assert!(!out.contains("result=\"error\""), "{out}");
        series.forget("github");
        out.clear();
        series.render(&mut out);
        assert!(!out.contains("github"), "{out}");
    }
}
