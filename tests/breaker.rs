//! The auth circuit breaker and rate limits end to end: real upstream, real keystamp, real
//! clients. The state machine itself is tested under tokio's paused clock in `src/breaker.rs`.

// Test code: a panic is a failed assertion, which is what we want here.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

/// A real upstream accepting `key-1`, and keystamp stamping credential `key` (file
/// `./secrets/key`) onto `api.example.test`; `tune` adds to the config.
async fn rig(
    tune: impl FnOnce(&mut TestConfig),
) -> (TestUpstream, TestKeystamp, tempfile::TempDir) {
    let (upstream, ca_path, dir) = tls_upstream().await;
    let mut config = TestConfig::new();
    config
        .trust(&ca_path)
        .pin("api.example.test:443", upstream.addr)
        .set("breaker", serde_json::json!({ "failures": 5, "open_for": "1s", "max_open_for": "8s", "jitter": false }))
        .set("reload", serde_json::json!({ "debounce": "50ms" }))
        .credential_file("key", serde_json::json!({}))
        .bearer_route("api.example.test", "key", serde_json::json!({}));
    tune(&mut config);
    let keystamp = TestKeystamp::start(&config.yaml(), &[("key", "key-1\n")]).await;
    upstream.seen.accept_only("key-1");
    (upstream, keystamp, dir)
}

/// The route's extra keys.
fn route_with(extra: serde_json::Value) -> impl FnOnce(&mut TestConfig) {
    move |config| {
        config.routes.clear();
        config.bearer_route("api.example.test", "key", extra);
    }
}

async fn get(
    client: &reqwest::Client,
    path: &str,
) -> (u16, Option<String>, serde_json::Value, Option<String>) {
    let response = client
        .get(format!("https://api.example.test{path}"))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let code = response
        .headers()
        .get("x-keystamp-error")
        .map(|v| v.to_str().unwrap().to_string());
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    let body = response.json().await.unwrap_or(serde_json::Value::Null);
    (status, code, body, retry_after)
}

#[tokio::test(flavor = "multi_thread")]
async fn five_401s_open_it_nothing_reaches_the_upstream_then_one_probe_and_rotation_closes_it() {
    let (upstream, keystamp, _dir) = rig(|_| {}).await;
    let client = keystamp.client();
    upstream.seen.accept_only("revoked-elsewhere");
    for _ in 0..5 {
        assert_eq!(get(&client, "/x").await.0, 401);
    }
    let before = upstream.seen.count();
    let mut last_retry_after = None;
    for _ in 0..20 {
        let (status, code, body, retry_after) = get(&client, "/x").await;
        last_retry_after = retry_after.clone();
        assert_eq!(status, 503);
        assert_eq!(code.as_deref(), Some("credential_circuit_open"));
        assert_eq!(body["code"], "credential_circuit_open");
        assert_eq!(body["credential"], "key");
        assert_eq!(body["reason"], "upstream 401 x5");
        assert_eq!(body["retry_after_s"], 1);
        assert_eq!(retry_after.as_deref(), Some("1"));
        assert_eq!(body["fingerprint"].as_str().unwrap().len(), 12);
    }
    assert_eq!(
        upstream.seen.count(),
        before,
        "nothing reaches the upstream while open"
    );

    // After the Retry-After keystamp gave, 50 concurrent requests: exactly one probe goes out.
    wait_out(last_retry_after.as_deref()).await;
    let before = upstream.seen.count();
    let results = futures_util::future::join_all((0..50).map(|_| {
        let client = client.clone();
        async move { get(&client, "/x").await.0 }
    }))
    .await;
    assert_eq!(upstream.seen.count() - before, 1);
    assert_eq!(results.iter().filter(|s| **s == 401).count(), 1);
    assert_eq!(results.iter().filter(|s| **s == 503).count(), 49);

    // The failed probe doubled the wait, and keystamp says so.
    let (status, _, body, retry_after) = get(&client, "/x").await;
    assert_eq!(status, 503);
    assert_eq!(body["retry_after_s"], 2);
    assert_eq!(retry_after.as_deref(), Some("2"));

    // Rotation is the cure: a new version closes it at once.
    upstream.seen.accept_only("key-2");
    keystamp.write_secret("key", "key-2\n");
    assert!(
        eventually(Duration::from_secs(2), || async {
            get(&client, "/x").await.0 == 200
        })
        .await
    );
    let metrics = keystamp.metrics().await;
    assert_eq!(
        metric(&metrics, "keystamp_breaker_state{credential=\"key\"}"),
        Some(0.0)
    );
    assert_eq!(
        metric(
            &metrics,
            "keystamp_breaker_transitions_total{credential=\"key\",to=\"open\"}"
        ),
        Some(2.0)
    );
    assert_eq!(
        metric(
            &metrics,
            "keystamp_breaker_transitions_total{credential=\"key\",to=\"half_open\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &metrics,
            "keystamp_auth_failures_total{credential=\"key\",status=\"401\"}"
        ),
        Some(6.0)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn only_403s_that_say_the_credential_is_bad_count() {
    let markers = || {
        route_with(
            serde_json::json!({ "auth_failure_markers": ["InvalidClientTokenId", "ExpiredToken"] }),
        )
    };
    let (_upstream, keystamp, _dir) = rig(markers()).await;
    let client = keystamp.client();
    for _ in 0..10 {
        assert_eq!(get(&client, "/forbidden/permission").await.0, 403);
    }
    assert_eq!(
        get(&client, "/ok").await.0,
        200,
        "permission 403s must not trip it"
    );
    for _ in 0..5 {
        assert_eq!(get(&client, "/forbidden/invalid-token").await.0, 403);
    }
    assert_eq!(
        get(&client, "/ok").await.1.as_deref(),
        Some("credential_circuit_open")
    );

    // A marker in the body's first KiB counts too (a fresh keystamp, breaker closed).
    let (_upstream, keystamp, _dir) = rig(markers()).await;
    let client = keystamp.client();
    for _ in 0..5 {
        let (status, _, _, _) = get(&client, "/forbidden/aws").await;
        assert_eq!(status, 403);
    }
    assert_eq!(
        get(&client, "/ok").await.1.as_deref(),
        Some("credential_circuit_open")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn fleet_drill_fifty_agents_one_revoked_key() {
    let (upstream, keystamp, _dir) = rig(|_| {}).await;
    let keystamp = Arc::new(keystamp);
    let revoked = Arc::new(AtomicBool::new(false));
    let rotated_at: Arc<std::sync::Mutex<Option<tokio::time::Instant>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let unexpected = Arc::new(AtomicUsize::new(0));
    let late_failures = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..50)
        .map(|_| {
            let (keystamp, stop, unexpected, late_failures, rotated_at) = (
                keystamp.clone(),
                stop.clone(),
                unexpected.clone(),
                late_failures.clone(),
                rotated_at.clone(),
            );
            tokio::spawn(async move {
                let client = keystamp.client();
                let mut successes = 0usize;
                while !stop.load(Ordering::SeqCst) {
                    let started = tokio::time::Instant::now();
                    let (status, code, body, _) = get(&client, "/work").await;
                    match (status, code.as_deref()) {
                        (200, None) => successes += 1,
                        (503, Some("credential_circuit_open")) => {
                            assert_eq!(body["code"], "credential_circuit_open")
                        }
                        // Requests already in flight when the key was revoked get the upstream's 401.
                        (401, None) => {}
                        _ => {
                            unexpected.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    // After rotation + debounce + one request, everything must succeed again.
                    let settled = rotated_at
                        .lock()
                        .unwrap()
                        .is_some_and(|at| started > at + Duration::from_millis(400));
                    if settled && status != 200 {
                        late_failures.fetch_add(1, Ordering::SeqCst);
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                successes
            })
        })
        .collect();

    // Every agent is under way (on a loaded machine that takes longer than on a quiet one).
    assert!(
        eventually(Duration::from_secs(10), || async {
            upstream.seen.count() > 50
        })
        .await,
        "the agents never got going"
    );
    upstream.seen.accept_only("nobody");
    revoked.store(true, Ordering::SeqCst);
    let failures_at_revocation = upstream.seen.count();
    // Wait until the breaker has opened, then through a few probe periods.
    assert!(
        eventually(Duration::from_secs(3), || async {
            metric(
                &keystamp.metrics().await,
                "keystamp_breaker_state{credential=\"key\"}",
            ) == Some(1.0)
        })
        .await
    );
    let at_open = upstream.seen.count();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let probes = metric(
        &keystamp.metrics().await,
        "keystamp_breaker_transitions_total{credential=\"key\",to=\"half_open\"}",
    )
    .unwrap_or(0.0) as usize;
    let after_open = upstream.seen.count() - at_open;
    assert_eq!(
        after_open, probes,
        "once open, only probes reach the upstream"
    );
    let total_failures = upstream.seen.count() - failures_at_revocation;
    // At most `failures` + probes, plus what was already on the wire when the key was revoked
    // (one per client at most): those requests were sent before any 401 came back.
    assert!(
        total_failures <= 5 + probes + 50,
        "{total_failures} auth failures"
    );

    // Rotate: every client succeeds again within the debounce plus one request.
    upstream.seen.accept_only("key-2");
    keystamp.write_secret("key", "key-2\n");
    *rotated_at.lock().unwrap() = Some(tokio::time::Instant::now());
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::SeqCst);
    let successes: Vec<usize> = futures_util::future::join_all(clients)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(
        unexpected.load(Ordering::SeqCst),
        0,
        "every answer is a success, the upstream's own 401 or the typed 503"
    );
    assert_eq!(
        late_failures.load(Ordering::SeqCst),
        0,
        "clients still failing after rotation"
    );
    assert!(successes.iter().all(|s| *s > 0));
    eprintln!("fleet drill: {total_failures} auth failures reached the upstream after revocation ({probes} probes)");
}

#[tokio::test(flavor = "multi_thread")]
async fn rate_limit_allows_the_burst_then_the_steady_rate_with_a_correct_retry_after() {
    let (upstream, keystamp, _dir) = rig(|config| {
        let limit = serde_json::json!({ "rate_limit": { "per_second": 1, "burst": 5 } });
        config.credential_file("key", limit);
    })
    .await;
    let client = keystamp.client();
    let before = upstream.seen.count();
    for _ in 0..5 {
        assert_eq!(get(&client, "/x").await.0, 200);
    }
    let (status, code, body, retry_after) = get(&client, "/x").await;
    assert_eq!((status, code.as_deref()), (429, Some("rate_limited")));
    assert_eq!(retry_after.as_deref(), Some("1"));
    assert_eq!(body["retry_after_s"], 1);
    assert_eq!(
        upstream.seen.count() - before,
        5,
        "the limited request never reached the upstream"
    );
    // Steady rate: one more once the Retry-After has passed.
    wait_out(retry_after.as_deref()).await;
    assert_eq!(get(&client, "/x").await.0, 200);
    assert_eq!(get(&client, "/x").await.0, 429);
    let metrics = keystamp.metrics().await;
    assert_eq!(
        metric(&metrics, "keystamp_rate_limited_total{credential=\"key\"}"),
        Some(2.0)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_429_with_retry_after_holds_the_credential_when_the_route_asks() {
    let (upstream, keystamp, _dir) = rig(route_with(
        serde_json::json!({ "respect_retry_after": true }),
    ))
    .await;
    let client = keystamp.client();
    assert_eq!(get(&client, "/status/429").await.0, 429);
    let before = upstream.seen.count();
    let (status, code, _, retry_after) = get(&client, "/x").await;
    assert_eq!((status, code.as_deref()), (429, Some("rate_limited")));
    assert_eq!(retry_after.as_deref(), Some("2"));
    assert_eq!(upstream.seen.count(), before);
}

#[tokio::test(flavor = "multi_thread")]
async fn operators_force_a_breaker_open_and_closed_on_the_admin_listener() {
    let (upstream, keystamp, _dir) = rig(|_| {}).await;
    let client = keystamp.client();
    let admin = reqwest::Client::builder().no_proxy().build().unwrap();
    let base = format!("http://{}", keystamp.app.admin_addr().unwrap());
    let opened: serde_json::Value = admin
        .post(format!("{base}/breakers/key/open"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(opened["breaker"], "open");
    let before = upstream.seen.count();
    let (status, code, body, _) = get(&client, "/x").await;
    assert_eq!(
        (status, code.as_deref()),
        (503, Some("credential_circuit_open"))
    );
    assert_eq!(body["reason"], "forced open by an operator");
    assert_eq!(upstream.seen.count(), before);
    let status_json = keystamp.status().await;
    assert_eq!(status_json["credentials"][0]["breaker"], "open");
    admin
        .post(format!("{base}/breakers/key/close"))
        .send()
        .await
        .unwrap();
    assert_eq!(get(&client, "/x").await.0, 200);
    assert_eq!(
        admin
            .post(format!("{base}/breakers/nope/open"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    let metrics = keystamp.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "keystamp_breaker_manual_actions_total{action=\"open\",credential=\"key\"}"
        ),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_cannot_open_a_shared_breaker_by_naming_a_marker_in_its_path() {
    let (upstream, ca, _ca_dir) = tls_upstream().await;
    let mut config = TestConfig::new();
    config
        .trust(&ca)
        .pin("api.example.test:443", upstream.addr)
        .set(
            "breaker",
            serde_json::json!({ "failures": 3, "jitter": false }),
        )
        .credential_file("key", serde_json::json!({}))
        .bearer_route(
            "api.example.test",
            "key",
            serde_json::json!({ "auth_failure_markers": ["InvalidSignatureException"] }),
        );
    let keystamp = KeystampProcess::start(&config.yaml(), &[("key", "key-1")]);
    let client = keystamp.client();
    let status = |path: &'static str| {
        let client = client.clone();
        async move {
            let response = client
                .get(format!("https://api.example.test{path}"))
                .send()
                .await
                .unwrap();
            status_and_error_code(&response)
        }
    };
    // The marker appears in the echoed message and an echoed header, never as the error code.
    for _ in 0..10 {
        assert_eq!(
            status("/forbidden/echo/InvalidSignatureException").await.0,
            403
        );
    }
    assert_eq!(
        status("/ok").await,
        (200, None),
        "an agent's path opened the breaker"
    );
    // The same marker as the upstream's error code (x-amzn-ErrorType) counts.
    for _ in 0..3 {
        assert_eq!(status("/forbidden/aws-header").await.0, 403);
    }
    assert_eq!(
        status("/ok").await.1.as_deref(),
        Some("credential_circuit_open")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn without_zero_series_a_credential_counter_appears_with_its_first_event() {
    let (upstream, keystamp, _dir) = rig(|config| {
        config.set("metrics", serde_json::json!({ "zero_series": false }));
    })
    .await;
    let client = keystamp.client();
    assert_eq!(get(&client, "/x").await.0, 200);
    let metrics = keystamp.metrics().await;
    // State stays visible; counters that never moved are not written.
    assert_eq!(
        metric(&metrics, "keystamp_breaker_state{credential=\"key\"}"),
        Some(0.0)
    );
    assert!(
        metrics.contains("keystamp_credential_version_info{credential=\"key\",fingerprint=\""),
        "{metrics}"
    );
    for absent in [
        "keystamp_auth_failures_total",
        "keystamp_breaker_transitions_total",
        "keystamp_breaker_manual_actions_total",
        "keystamp_rate_limited_total",
    ] {
        assert!(
            !metrics.contains(absent),
            "{absent} written at zero:\n{metrics}"
        );
    }
    upstream.seen.accept_only("revoked-elsewhere");
    assert_eq!(get(&client, "/x").await.0, 401);
    let metrics = keystamp.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "keystamp_auth_failures_total{credential=\"key\",status=\"401\"}"
        ),
        Some(1.0)
    );
    assert!(
        !metrics.contains("keystamp_auth_failures_total{credential=\"key\",status=\"403\"}"),
        "{metrics}"
    );
}
