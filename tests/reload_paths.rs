//! Hot reload whatever the config path's spelling: the real binary started from a working
//! directory with a relative `--config` (`conf/`, `./conf/`, `../conf/`, a symlinked config
//! directory) follows every way a file gets replaced within a second, as it does with an
//! absolute path. Every earlier lifecycle test passed absolute paths, which hid that it did not.
//! Also how a read that keeps failing is reported: once per reason, not on every resync.

// Test code: a panic is a failed assertion, which is what we want here.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

/// How fast a replaced file must be stamped: well inside the 30 s periodic resync, so only the
/// watcher can make it.
const WITHIN: Duration = Duration::from_secs(1);

fn config(upstream: &TestUpstream, ca: &Path, hosts: &[&str]) -> String {
    let mut config = TestConfig::new();
    config
        .trust(ca)
        .credential_file("token", serde_json::json!({}));
    for host in hosts {
        config
            .pin(&format!("{host}:443"), upstream.addr)
            .bearer_route(host, "token", serde_json::json!({}));
    }
    config.yaml()
}

async fn stamps_within(keystamp: &KeystampProcess, host: &str, want: &str) -> bool {
    eventually(WITHIN, || async {
        stamped(keystamp, host).await.as_deref() == Ok(want)
    })
    .await
}

/// Each way a user or a tool replaces a file, checked against one running keystamp.
async fn every_replacement_is_followed(layout: Layout) {
    let (upstream, ca, _ca_dir) = tls_upstream().await;
    let keystamp = KeystampProcess::start_in(
        &layout,
        &config(&upstream, &ca, &["api.example.test"]),
        &[("token", "first-value")],
    );
    let spelled = layout.argument.unwrap();
    let token = keystamp.home.join("secrets/token");
    assert_eq!(
        stamped(&keystamp, "api.example.test").await.as_deref(),
        Ok("first-value")
    );

    // Renamed over it (kubelet-less mounts, `mv`, most secret writers).
    let temporary = keystamp.home.join("secrets/.token.tmp");
    std::fs::write(&temporary, "renamed-value").unwrap();
    std::fs::rename(&temporary, &token).unwrap();
    assert!(
        stamps_within(&keystamp, "api.example.test", "renamed-value").await,
        "{spelled}: rename over the file not followed within {WITHIN:?}"
    );

    // Written in place (`echo > file`, editors that truncate).
    std::fs::write(&token, "in-place-value").unwrap();
    assert!(
        stamps_within(&keystamp, "api.example.test", "in-place-value").await,
        "{spelled}: write in place not followed within {WITHIN:?}"
    );

    // Copied over it with the real `cp`.
    let source = keystamp.dir.path().join("copied");
    std::fs::write(&source, "copied-value").unwrap();
    let copied = std::process::Command::new("cp")
        .arg(&source)
        .arg(&token)
        .status()
        .unwrap();
    assert!(copied.success());
    assert!(
        stamps_within(&keystamp, "api.example.test", "copied-value").await,
        "{spelled}: cp over the file not followed within {WITHIN:?}"
    );

    // The config itself rewritten by rename (`sed -i`, editors, ConfigMaps), adding a route.
    let config_path = keystamp.home.join("keystamp.yaml");
    let current = std::fs::read_to_string(&config_path).unwrap();
    let header: String = current.lines().take(4).map(|l| format!("{l}\n")).collect();
    let hosts = ["api.example.test", "basic.example.test"];
    let rewritten = keystamp.home.join(".keystamp.yaml.tmp");
    std::fs::write(&rewritten, header + &config(&upstream, &ca, &hosts)).unwrap();
    std::fs::rename(&rewritten, &config_path).unwrap();
    assert!(
        stamps_within(&keystamp, "basic.example.test", "copied-value").await,
        "{spelled}: config rewritten by rename not followed within {WITHIN:?}: {:?}\n{}",
        stamped(&keystamp, "basic.example.test").await,
        keystamp.log()
    );

    // /status names the source file as keystamp resolved it: absolute, symlinks kept.
    let status = keystamp.status().await;
    let shown = status["credentials"][0]["files"][0]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        Path::new(&shown).is_absolute(),
        "{spelled}: /status shows {shown}"
    );
    let expected = keystamp
        .dir
        .path()
        .join(layout.symlink.map_or(layout.config_dir, |(link, _)| link))
        .join("secrets/token");
    assert_eq!(Path::new(&shown), expected, "{spelled}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_relative_config_path_is_hot_reloaded() {
    every_replacement_is_followed(Layout {
        config_dir: "conf",
        cwd: "",
        argument: Some("conf/keystamp.yaml"),
        symlink: None,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dot_slash_config_path_is_hot_reloaded() {
    every_replacement_is_followed(Layout {
        config_dir: "conf",
        cwd: "",
        argument: Some("./conf/keystamp.yaml"),
        symlink: None,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dot_dot_config_path_is_hot_reloaded() {
    every_replacement_is_followed(Layout {
        config_dir: "conf",
        cwd: "work",
        argument: Some("../conf/keystamp.yaml"),
        symlink: None,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_config_in_a_symlinked_directory_is_hot_reloaded() {
    every_replacement_is_followed(Layout {
        config_dir: "real",
        cwd: "",
        argument: Some("conf/keystamp.yaml"),
        symlink: Some(("conf", "real")),
    })
    .await;
}

/// Warning lines about `credential` failing to read, from keystamp's JSON log.
fn read_failures(keystamp: &KeystampProcess) -> Vec<serde_json::Value> {
    keystamp
        .log()
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line["level"] == "WARN")
        .filter(|line| {
            line["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("credential read failed"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_read_that_keeps_failing_warns_once_per_reason() {
    let (upstream, ca, _ca_dir) = tls_upstream().await;
    let mut yaml = config(&upstream, &ca, &["api.example.test"]);
    yaml.push_str("reload: { resync_every: 100ms }\n");
    let keystamp = KeystampProcess::start(&yaml, &[]);
    // Missing for a second: ten resyncs, one warning, which says there is no value.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let warned = read_failures(&keystamp);
    assert_eq!(warned.len(), 1, "{warned:?}");
    assert!(warned[0]["fields"]["message"]
        .as_str()
        .unwrap()
        .contains("no value yet"));
    // Another reason (an empty file) warns again, once.
    std::fs::write(keystamp.home.join("secrets/token"), "").unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(read_failures(&keystamp).len(), 2);
    // A good value, then broken again: the warning names the version it keeps.
    std::fs::write(keystamp.home.join("secrets/token"), "good-value-1").unwrap();
    assert!(stamps_within(&keystamp, "api.example.test", "good-value-1").await);
    std::fs::write(keystamp.home.join("secrets/token"), "").unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let warned = read_failures(&keystamp);
    assert_eq!(warned.len(), 3, "{warned:?}");
    assert!(
        warned[2]["fields"]["keeping"].is_string(),
        "{:?}",
        warned[2]
    );
    assert!(!keystamp.log().contains("good-value-1"));
}
