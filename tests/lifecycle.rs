//! Credential lifecycle against real files, real servers and the real reloader: kubelet-style
//! secret volume swaps, missing mounts, config reloads while requests flow, the 401 retry, and
//! token refresh counted over simulated hours under tokio's paused clock.

// Test code: a panic is a failed assertion, which is what we want here.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::collections::HashSet;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

/// Writes a secret volume exactly as kubelet's atomic writer does: each update is a new
/// `..<timestamp>` directory, `..data` is swapped to it by renaming a temporary symlink, and
/// the visible names are symlinks through `..data`.
struct KubeletVolume {
    dir: PathBuf,
    generation: usize,
}

impl KubeletVolume {
    fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            generation: 0,
        }
    }

    /// Publishes `files` (name -> content) as the volume's whole content.
    fn update(&mut self, files: &[(&str, &[u8])]) {
        std::fs::create_dir_all(&self.dir).unwrap();
        self.generation += 1;
        let data_name = format!("..2026_11_27_00_00_00.{:09}", self.generation);
        let data_dir = self.dir.join(&data_name);
        std::fs::create_dir(&data_dir).unwrap();
        for (name, content) in files {
            std::fs::write(data_dir.join(name), content).unwrap();
        }
        let previous = std::fs::read_link(self.dir.join("..data")).ok();
        let temporary = self.dir.join("..data_tmp");
        let _ = std::fs::remove_file(&temporary);
        symlink(&data_name, &temporary).unwrap();
        std::fs::rename(&temporary, self.dir.join("..data")).unwrap();
        for (name, _) in files {
            let visible = self.dir.join(name);
            if std::fs::symlink_metadata(&visible).is_err() {
                symlink(format!("..data/{name}"), &visible).unwrap();
            }
        }
        if let Some(previous) = previous {
            let _ = std::fs::remove_dir_all(self.dir.join(previous));
        }
    }
}

fn single_route_config(upstream: &TestUpstream, ca: &Path, source: &str, reload: &str) -> String {
    format!(
        "unmatched: deny\nupstream_tls: {{ extra_roots: [{ca}] }}\nresolve: {{ 'api.example.test:443': {addr} }}\n{reload}\
         credentials:\n  example:\n    source: {source}\n\
         routes:\n  - {{ host: api.example.test, credential: example, inject: {{ type: bearer }} }}\n",
        ca = ca.display(),
        addr = upstream.addr,
    )
}

/// The bearer value the upstream saw for one request, or the keystamp error code.
async fn stamped(keystamp: &TestKeystamp) -> Result<String, String> {
    let response = keystamp
        .client()
        .get("https://api.example.test/who")
        .send()
        .await
        .unwrap();
    if let Some(code) = response.headers().get("x-keystamp-error") {
        return Err(code.to_str().unwrap().to_string());
    }
    let echo: serde_json::Value = response.json().await.unwrap();
    let value = echo["headers"]["authorization"][0].as_str().unwrap();
    Ok(value.strip_prefix("Bearer ").unwrap().to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn kubelet_swaps_are_followed_and_invalid_content_never_served() {
    let (upstream, ca, _ca_dir) = tls_upstream().await;
    let yaml = single_route_config(
        &upstream,
        &ca,
        "{ file: ./mount/token }",
        "reload: { debounce: 50ms, resync_every: 30s }\n",
    );
    let scratch = tempfile::tempdir().unwrap();
    let keystamp = TestKeystamp::start(&yaml, &[]).await;
    let mut volume = KubeletVolume::new(&keystamp.dir.path().join("mount"));
    volume.update(&[("token", b"v0\n")]);
    assert!(
        eventually(Duration::from_secs(3), || async {
            stamped(&keystamp).await == Ok("v0".into())
        })
        .await
    );

    let mut valid: HashSet<String> = HashSet::from(["v0".to_string()]);
    let mut newest = "v0".to_string();
    // A deterministic pseudo-random sequence: valid values, invalid ones, and the key vanishing.
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 1..=200 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        // Every 25th update is a valid one, then keystamp must catch up to it.
        let kind = if i % 25 == 0 { 5 } else { seed % 6 };
        match kind {
            0 => volume.update(&[("token", b"")]),
            1 => volume.update(&[("token", b"bad\nvalue")]),
            2 => volume.update(&[("other", b"x")]), // the key disappears
            3 => volume.update(&[("token", b"nul\0inside\n")]),
            _ => {
                let value = format!("v{i}");
                volume.update(&[("token", format!("{value}\n").as_bytes())]);
                valid.insert(value.clone());
                newest = value;
            }
        }
        // Never an invalid value, at any moment.
        let seen = stamped(&keystamp).await.unwrap();
        assert!(
            valid.contains(&seen),
            "served `{seen:?}`, which was never a valid value"
        );
        if i % 25 == 0 {
            // Within debounce + a margin, the newest valid value is what goes out.
            let expected = newest.clone();
            let caught_up = eventually(Duration::from_millis(1000), || {
                let expected = expected.clone();
                let keystamp = &keystamp;
                async move { stamped(keystamp).await == Ok(expected) }
            })
            .await;
            let now_serving = stamped(&keystamp).await;
            assert!(
                caught_up,
                "after update {i} keystamp did not serve {newest} but {now_serving:?}"
            );
        }
    }
    drop(scratch);
    let metrics = keystamp.metrics().await;
    assert!(
        metric(
            &metrics,
            "keystamp_credential_reloads_total{credential=\"example\",result=\"error\"}"
        )
        .unwrap()
            > 0.0
    );
    // Updates closer together than the debounce are read as one, so how many of the ~60 valid
    // values got a reload of their own depends on the machine's speed; each of the eight the
    // loop waited for (a new value each time) took one.
    let changed = metric(
        &metrics,
        "keystamp_credential_reloads_total{credential=\"example\",result=\"changed\"}",
    )
    .unwrap();
    assert!(changed >= 8.0, "{changed} changed reloads");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_mount_is_picked_up_when_it_appears_and_a_deleted_file_keeps_the_last_value() {
    let (upstream, ca, _ca_dir) = tls_upstream().await;
    let yaml = single_route_config(
        &upstream,
        &ca,
        "{ file: ./volumes/later/token }",
        "reload: { debounce: 50ms }\n",
    );
    let keystamp = TestKeystamp::start(&yaml, &[]).await;
    assert_eq!(
        stamped(&keystamp).await,
        Err("credential_unavailable".into())
    );

    let mut volume = KubeletVolume::new(&keystamp.dir.path().join("volumes/later"));
    volume.update(&[("token", b"first\n")]);
    assert!(
        eventually(Duration::from_secs(2), || async {
            stamped(&keystamp).await == Ok("first".into())
        })
        .await
    );

    // Deleted: keep serving the last good value.
    std::fs::remove_dir_all(keystamp.dir.path().join("volumes/later")).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(stamped(&keystamp).await, Ok("first".into()));

    // Recreated with a new value: followed again (the watch is re-armed).
    let mut volume = KubeletVolume::new(&keystamp.dir.path().join("volumes/later"));
    volume.generation = 100;
    volume.update(&[("token", b"second\n")]);
    assert!(
        eventually(Duration::from_secs(2), || async {
            stamped(&keystamp).await == Ok("second".into())
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_401_with_a_rotated_key_is_retried_once_before_the_watcher_fires() {
    let (upstream, ca, _ca_dir) = tls_upstream().await;
    // A long debounce and resync: only the 401 path can pick the new key up in time.
    let yaml = single_route_config(
        &upstream,
        &ca,
        "{ file: ./secrets/token }",
        "reload: { debounce: 10s, resync_every: 10m }\n",
    );
    let keystamp = TestKeystamp::start(&yaml, &[("token", "key-1\n")]).await;
    upstream.seen.accept_only("key-1");
    assert_eq!(stamped(&keystamp).await, Ok("key-1".into()));

    keystamp.write_secret("token", "key-2\n");
    upstream.seen.accept_only("key-2");
    let before = upstream.seen.count();
    let response = keystamp
        .client()
        .get("https://api.example.test/after-rotation")
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        200,
        "the agent must never see the stale 401"
    );
    let authorizations = upstream.seen.authorizations.lock().unwrap().clone();
    assert_eq!(upstream.seen.count() - before, 2);
    assert_eq!(
        authorizations[before..],
        [Some("Bearer key-1".into()), Some("Bearer key-2".into())]
    );

    // A small POST is replayed with its body.
    keystamp.write_secret("token", "key-3\n");
    upstream.seen.accept_only("key-3");
    let response = keystamp
        .client()
        .post("https://api.example.test/upload")
        .body(vec![1u8; 1000])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["bytes"], 1000);

    // A large POST cannot be replayed: the agent gets the 401, the upstream saw one attempt.
    keystamp.write_secret("token", "key-4\n");
    upstream.seen.accept_only("key-4");
    let before = upstream.seen.count();
    let response = keystamp
        .client()
        .post("https://api.example.test/upload")
        .body(vec![1u8; 100 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(upstream.seen.count() - before, 1);

    // The next small request picks key-4 up through the same retry.
    assert_eq!(
        keystamp
            .client()
            .get("https://api.example.test/x")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // Nothing newer exists: never retried with the same version.
    upstream.seen.accept_only("someone-else");
    let before = upstream.seen.count();
    let response = keystamp
        .client()
        .get("https://api.example.test/x")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(upstream.seen.count() - before, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn config_reloads_while_requests_flow_and_a_broken_config_keeps_the_last_good_one() {
    let (upstream, ca, _ca_dir) = tls_upstream().await;
    let header = format!(
        "unmatched: deny\nupstream_tls: {{ extra_roots: [{}] }}\nreload: {{ debounce: 50ms }}\nresolve:\n  'api.example.test:443': {addr}\n  'basic.example.test:443': {addr}\n",
        ca.display(),
        addr = upstream.addr
    );
    let first = format!(
        "{header}credentials:\n  a: {{ source: {{ file: ./secrets/a }} }}\n  b: {{ source: {{ file: ./secrets/b }} }}\n\
         routes:\n  - {{ host: api.example.test, credential: a, inject: {{ type: bearer }} }}\n"
    );
    let keystamp =
        Arc::new(TestKeystamp::start(&first, &[("a", "secret-a"), ("b", "secret-b")]).await);

    // Requests flow the whole time; none may fail at the transport level or with a 5xx.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flowing = {
        let keystamp = keystamp.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let client = keystamp.client();
            let mut statuses = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let response = client
                    .get("https://api.example.test/flow")
                    .send()
                    .await
                    .expect("transport error during reload");
                statuses.push(response.status().as_u16());
            }
            statuses
        })
    };

    // Add a route.
    let second = format!("{first}  - {{ host: basic.example.test, credential: b, inject: {{ type: basic, username: u }} }}\n");
    keystamp.rewrite_config(&second);
    let client = keystamp.client();
    assert!(
        eventually(Duration::from_secs(2), || async {
            client
                .get("https://basic.example.test/")
                .send()
                .await
                .map(|r| r.status() == 200)
                .unwrap_or(false)
        })
        .await
    );

    // Break the YAML: the last good config stays, the failure is counted.
    keystamp.rewrite_config(&format!("{second}  - {{ host: [broken\n"));
    assert!(
        eventually(Duration::from_secs(2), || async {
            metric(
                &keystamp.metrics().await,
                "keystamp_config_reloads_total{result=\"error\"}",
            )
            .unwrap_or(0.0)
                >= 1.0
        })
        .await
    );
    assert_eq!(
        client
            .get("https://basic.example.test/")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // Remove credential `a` and its route: api.example.test is no longer routed.
    let third = format!(
        "{header}credentials:\n  b: {{ source: {{ file: ./secrets/b }} }}\n\
         routes:\n  - {{ host: basic.example.test, credential: b, inject: {{ type: basic, username: u }} }}\n"
    );
    keystamp.rewrite_config(&third);
    assert!(
        eventually(Duration::from_secs(2), || async {
            client
                .get("https://api.example.test/")
                .send()
                .await
                .map(|r| r.status() == 403)
                .unwrap_or(false)
        })
        .await
    );
    stop.store(true, Ordering::SeqCst);
    let statuses = flowing.await.unwrap();
    assert!(statuses.len() > 10);
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 403),
        "unexpected statuses: {:?}",
        statuses.iter().filter(|s| **s != 200).collect::<Vec<_>>()
    );
    let status = keystamp.status().await;
    let names: Vec<&str> = status["credentials"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["b"]);
    assert!(
        metric(
            &keystamp.metrics().await,
            "keystamp_config_reloads_total{result=\"ok\"}"
        )
        .unwrap()
            >= 2.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_credential_is_never_sent() {
    let (upstream, ca, _ca_dir) = tls_upstream().await;
    let yaml = single_route_config(
        &upstream,
        &ca,
        "{ file: ./secrets/token, format: json }",
        "",
    );
    let expires = time::OffsetDateTime::now_utc() + time::Duration::seconds(3);
    let expires = expires
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let keystamp = TestKeystamp::start(
        &yaml,
        &[(
            "token",
            &format!("{{\"token\": \"short-lived\", \"expires_at\": \"{expires}\"}}"),
        )],
    )
    .await;
    assert_eq!(stamped(&keystamp).await, Ok("short-lived".into()));
    let status = keystamp.status().await;
    assert_eq!(
        status["credentials"][0]["expires_at"]
            .as_str()
            .unwrap()
            .get(..19),
        expires.get(..19)
    );
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let before = upstream.seen.count();
    assert_eq!(stamped(&keystamp).await, Err("credential_expired".into()));
    assert_eq!(upstream.seen.count(), before);
}

#[tokio::test(flavor = "multi_thread")]
async fn command_source_runs_without_a_shell_and_a_failure_keeps_the_last_value() {
    let (upstream, ca, _ca_dir) = tls_upstream().await;
    let scripts = tempfile::tempdir().unwrap();
    let script = scripts.path().join("token.sh");
    let value_file = scripts.path().join("value");
    std::fs::write(&value_file, "from-command-1").unwrap();
    std::fs::write(
        &script,
        format!("#!/bin/sh\nif [ -f {0}.fail ]; then echo \"leaked-$(cat {0})\" >&2; exit 3; fi\nprintf '{{\"token\": \"%s\"}}' \"$(cat {0})\"\n", value_file.display()),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let source = format!(
        "{{ command: [{}], format: json, refresh_every: 200ms, timeout: 5s }}",
        script.display()
    );
    let yaml = single_route_config(&upstream, &ca, &source, "");
    let keystamp = TestKeystamp::start(&yaml, &[]).await;
    assert_eq!(stamped(&keystamp).await, Ok("from-command-1".into()));

    std::fs::write(&value_file, "from-command-2").unwrap();
    assert!(
        eventually(Duration::from_secs(3), || async {
            stamped(&keystamp).await == Ok("from-command-2".into())
        })
        .await
    );

    std::fs::write(format!("{}.fail", value_file.display()), "").unwrap();
    std::fs::write(&value_file, "from-command-3").unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(stamped(&keystamp).await, Ok("from-command-2".into()));
    let status = keystamp.status().await;
    let last_error = status["credentials"][0]["last_error"].as_str().unwrap();
    assert!(last_error.contains("exited"), "{last_error}");
    assert!(
        !last_error.contains("leaked"),
        "stderr must never be shown: {last_error}"
    );
}

/// A token endpoint that issues `tok-<lifetime>-<n>` with `expires_in` = the lifetime in its path.
async fn token_endpoint() -> (std::net::SocketAddr, Arc<Vec<AtomicUsize>>) {
    use http_body_util::Full;
    use hyper::service::service_fn;
    let counts: Arc<Vec<AtomicUsize>> = Arc::new((0..4).map(|_| AtomicUsize::new(0)).collect());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = counts.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let counts = served.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: http::Request<hyper::body::Incoming>| {
                    let counts = counts.clone();
                    async move {
                        let lifetime: u64 = request
                            .uri()
                            .path()
                            .trim_start_matches("/token/")
                            .parse()
                            .unwrap();
                        let slot = [120, 900, 3600, 43200]
                            .iter()
                            .position(|l| *l == lifetime)
                            .unwrap();
                        let n = counts[slot].fetch_add(1, Ordering::SeqCst);
                        let body = format!("{{\"access_token\":\"tok-{lifetime}-{n}\",\"expires_in\":{lifetime},\"token_type\":\"Bearer\"}}");
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            bytes::Bytes::from(body),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    (addr, counts)
}

#[tokio::test(start_paused = true)]
async fn tokens_are_refreshed_ahead_of_expiry_over_simulated_hours() {
    let (addr, counts) = token_endpoint().await;
    let mut yaml =
        String::from("unmatched: deny\negress: { allow_cidrs: [127.0.0.0/8] }\ncredentials:\n");
    for lifetime in [120, 900, 3600, 43200] {
        yaml.push_str(&format!(
            "  t{lifetime}:\n    source:\n      oauth2_client_credentials:\n        token_url: http://{addr}/token/{lifetime}\n        client_id: {{ file: ./secrets/id }}\n        client_secret: {{ file: ./secrets/secret }}\n"
        ));
    }
    let keystamp =
        TestKeystamp::start(&yaml, &[("id", "client"), ("secret", "client-secret")]).await;
    let initial: Vec<usize> = counts.iter().map(|c| c.load(Ordering::SeqCst)).collect();
    assert_eq!(initial, vec![1, 1, 1, 1]);

    tokio::time::sleep(Duration::from_secs(24 * 3600)).await;
    let refreshed: Vec<usize> = counts
        .iter()
        .map(|c| c.load(Ordering::SeqCst) - 1)
        .collect();
    // 2 min: every 60 s (half the lifetime). 15 min: 5 min ahead, every 10 min. 1 h: 6 min
    // ahead, every 54 min. 12 h: 72 min ahead, every 10.8 h.
    let expected = [24 * 60, 24 * 6, 24 * 60 / 54, 2];
    for ((got, want), lifetime) in refreshed
        .iter()
        .zip(expected)
        .zip(["2 min", "15 min", "1 h", "12 h"])
    {
        assert!(
            got.abs_diff(want) <= 1,
            "{lifetime}: {got} refreshes in 24 h, expected {want}"
        );
    }
    // Never expired: every credential still has a live version.
    let status = keystamp.status().await;
    for credential in status["credentials"].as_array().unwrap() {
        assert_eq!(credential["expired"], false, "{credential}");
        assert!(credential["fingerprint"].is_string());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn reload_now_rereads_everything_without_waiting_for_events() {
    let (upstream, ca, _ca_dir) = tls_upstream().await;
    let yaml = single_route_config(
        &upstream,
        &ca,
        "{ file: ./secrets/token }",
        "reload: { debounce: 10s, resync_every: 10m }\n",
    );
    let keystamp = TestKeystamp::start(&yaml, &[("token", "before-hup")]).await;
    assert_eq!(stamped(&keystamp).await, Ok("before-hup".into()));
    keystamp.write_secret("token", "after-hup");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        stamped(&keystamp).await,
        Ok("before-hup".into()),
        "the 10 s debounce has not passed"
    );
    keystamp.app.reload(); // what SIGHUP does
    assert!(
        eventually(Duration::from_secs(2), || async {
            stamped(&keystamp).await == Ok("after-hup".into())
        })
        .await
    );
}
