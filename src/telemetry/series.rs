//! The per-request series (`keystamp_requests_total`, `keystamp_request_duration_seconds`) of
//! the label sets used lately. prometheus' `with_label_values` hashes every label value on each
//! call; route, credential and agent names are `Arc`s shared from the snapshot and the identity
//! table, so a recent set is found by comparing pointers and only a new one pays the lookup.

use std::sync::{Arc, Mutex};

use prometheus::{Histogram, IntCounter};

use super::metrics::Metrics;

/// Label sets remembered; the oldest is forgotten past this.
const RECENT: usize = 16;
/// Who made the response.
#[derive(Debug, Clone, Copy)]
pub enum Origin {
    Keystamp = 0,
    Upstream = 1,
}

impl Origin {
    /// The `origin` label, as the audit line writes it too.
    pub fn label(self) -> &'static str {
        match self {
            Origin::Keystamp => "keystamp",
            Origin::Upstream => "upstream",
        }
    }

    fn index_and_label(self) -> (usize, &'static str) {
        (self as usize, self.label())
    }
}

fn status_class(status: http::StatusCode) -> (usize, &'static str) {
    match status.as_u16() {
        100..=199 => (0, "1xx"),
        200..=299 => (1, "2xx"),
        300..=399 => (2, "3xx"),
        400..=499 => (3, "4xx"),
        _ => (4, "5xx"),
    }
}

/// Placeholder label for "none" (unrouted request, anonymous agent).
pub const NONE: &str = "-";

/// Which series a request counts in.
pub struct Labels<'a> {
    pub route: Option<&'a Arc<str>>,
    pub credential: Option<&'a Arc<str>>,
    pub agent: Option<&'a Arc<str>>,
    pub status: http::StatusCode,
    pub origin: Origin,
}

#[derive(Default)]
pub struct RequestSeries {
    recent: Mutex<Vec<Series>>,
}

/// One route, credential and agent's children; a counter is made on its first request, as
/// `with_label_values` would, so `/metrics` shows the same series as without this.
struct Series {
    route: Option<Arc<str>>,
    credential: Option<Arc<str>>,
    agent: Option<Arc<str>>,
    requests: [[Option<IntCounter>; 2]; 5],
    duration: Histogram,
}

fn same(a: Option<&Arc<str>>, b: &Option<Arc<str>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

fn label(name: Option<&Arc<str>>) -> &str {
    name.map_or(NONE, |name| name)
}

impl RequestSeries {
    /// Counts one request and its duration.
    pub fn observe(&self, metrics: &Metrics, labels: &Labels<'_>, seconds: f64) {
        let (class, class_label) = status_class(labels.status);
        let (origin, origin_label) = labels.origin.index_and_label();
        let Ok(mut recent) = self.recent.lock() else {
            return;
        };
        let found = recent.iter().position(|series| {
            same(labels.route, &series.route)
                && same(labels.credential, &series.credential)
                && same(labels.agent, &series.agent)
        });
        let index = match found {
            Some(index) => index,
            None => {
                if recent.len() == RECENT {
                    recent.remove(0);
                }
                recent.push(Series {
                    route: labels.route.cloned(),
                    credential: labels.credential.cloned(),
                    agent: labels.agent.cloned(),
                    requests: Default::default(),
                    duration: metrics
                        .request_duration
                        .with_label_values(&[label(labels.route), label(labels.credential)]),
                });
                recent.len() - 1
            }
        };
        let Some(series) = recent.get_mut(index) else {
            return;
        };
        let counter = series
            .requests
            .get_mut(class)
            .and_then(|by_origin| by_origin.get_mut(origin));
        if let Some(counter) = counter {
            counter
                .get_or_insert_with(|| {
                    metrics.requests.with_label_values(&[
                        label(labels.route),
                        label(labels.credential),
                        label(labels.agent),
                        class_label,
                        origin_label,
                    ])
                })
                .inc();
        }
        series.duration.observe(seconds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(metrics: &Metrics, series: &str) -> Option<f64> {
        metrics
            .render()
            .lines()
            .find(|line| line.starts_with(series))
            .and_then(|line| line.rsplit(' ').next())
            .and_then(|value| value.parse().ok())
    }

    #[test]
    fn equal_names_in_other_allocations_and_forgotten_sets_count_in_the_same_series() {
        let metrics = Metrics::new().unwrap();
        let series = RequestSeries::default();
        let observe = |route: &Arc<str>, status: u16, origin: Origin| {
            let labels = Labels {
                route: Some(route),
                credential: Some(route),
                agent: None,
                status: http::StatusCode::from_u16(status).unwrap(),
                origin,
            };
            series.observe(&metrics, &labels, 0.001);
        };
        let first: Arc<str> = Arc::from("github");
        observe(&first, 200, Origin::Upstream);
        observe(&first, 200, Origin::Upstream);
        // A reload makes new `Arc`s for the same names.
        let reloaded: Arc<str> = Arc::from("github");
        observe(&reloaded, 204, Origin::Upstream);
        // More label sets than are remembered push "github" out; it comes back.
        for n in 0..RECENT {
            observe(&Arc::from(format!("other-{n}")), 200, Origin::Upstream);
        }
        observe(&reloaded, 503, Origin::Keystamp);
        observe(&first, 200, Origin::Upstream);
        let requests = |code: &str, origin: &str| {
            count(
                &metrics,
                &format!(
                    r#"keystamp_requests_total{{agent="-",code="{code}",credential="github",origin="{origin}",route="github"}}"#
                ),
            )
        };
        assert_eq!(requests("2xx", "upstream"), Some(4.0));
        assert_eq!(requests("5xx", "keystamp"), Some(1.0));
        // No series for a class or origin that had no request.
        assert_eq!(requests("4xx", "upstream"), None);
        assert_eq!(requests("2xx", "keystamp"), None);
        assert_eq!(requests("5xx", "upstream"), None);
        assert_eq!(
            count(
                &metrics,
                r#"keystamp_request_duration_seconds_count{credential="github",route="github"}"#
            ),
            Some(5.0)
        );
    }
}
