//! A credential per agent on one route, and task ids in the audit: the real binary, reqwest
//! clients that identify through the proxy URL (`http://NAME:TOKEN@host:port`), a real upstream.

// Test code: a panic is a failed assertion, which is what we want here.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::time::Duration;

use common::*;

const READ_SECRET: &str = "gh-read-7d1c";
const WRITE_SECRET: &str = "gh-write-93af";

#[tokio::test(flavor = "multi_thread")]
async fn each_agent_gets_its_own_credential_and_its_task_in_the_audit() {
    let (upstream, ca, dir) = tls_upstream().await;
    for (name, token) in [("reader", "r-token"), ("writer", "w-token")] {
        std::fs::write(dir.path().join(name), token).unwrap();
    }
    let mut config = TestConfig::new();
    config
        .trust(&ca)
        .pin("api.example.test:443", upstream.addr)
        .set(
            "identities",
            serde_json::json!({
                "reader": { "source": { "file": dir.path().join("reader") } },
                "writer": { "source": { "file": dir.path().join("writer") } },
            }),
        )
        .credential_file("gh-read", serde_json::json!({}))
        .credential_file("gh-write", serde_json::json!({}));
    // No default credential: only the listed agents, each with its own.
    config.routes.push(serde_json::json!({
        "host": "api.example.test",
        "inject": { "type": "bearer" },
        "agents": {
            "reader": { "credential": "gh-read", "methods": ["GET"] },
            "writer": {
                "credential": "gh-write",
                "inject": { "type": "header", "name": "X-Api-Key", "value": "{secret}" },
            },
        },
    }));
    let keystamp = KeystampProcess::start(
        &config.yaml(),
        &[("gh-read", READ_SECRET), ("gh-write", WRITE_SECRET)],
    );
    let reader = keystamp.agent_client(Some(("reader", "r-token")));
    let writer = keystamp.agent_client(Some(("writer", "w-token")));
    let anonymous = keystamp.agent_client(None);

    let read = reader
        .get("https://api.example.test/repos")
        .header("Keystamp-Task", "task:42")
        .header("X-Api-Key", "agent-forged")
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), 200);
    let echo: serde_json::Value = read.json().await.unwrap();
    assert_eq!(
        echo["headers"]["authorization"][0],
        format!("Bearer {READ_SECRET}")
    );
    assert!(
        echo["headers"].get("keystamp-task").is_none(),
        "the task header is removed"
    );
    assert!(
        echo["headers"].get("x-api-key").is_none(),
        "the writer's header is stripped too"
    );

    let write = writer
        .post("https://api.example.test/issues")
        .send()
        .await
        .unwrap();
    assert_eq!(write.status(), 200);
    let echo: serde_json::Value = write.json().await.unwrap();
    assert_eq!(echo["headers"]["x-api-key"][0], WRITE_SECRET);
    assert!(echo["headers"].get("authorization").is_none());

    for (client, method) in [
        (&reader, reqwest::Method::POST),
        (&anonymous, reqwest::Method::GET),
    ] {
        let denied = client
            .request(method, "https://api.example.test/issues")
            .send()
            .await
            .unwrap();
        assert_eq!(denied.status(), 403);
        assert_eq!(denied.headers()["x-keystamp-error"], "scope_denied");
    }
    let bad_task = reader
        .get("https://api.example.test/repos")
        .header("Keystamp-Task", "not a task id")
        .send()
        .await
        .unwrap();
    assert_eq!(bad_task.status(), 400);
    assert_eq!(bad_task.headers()["x-keystamp-error"], "bad_request");

    assert!(
        eventually(Duration::from_secs(3), || async {
            keystamp
                .audit()
                .iter()
                .any(|line| line["task"] == "task:42")
        })
        .await
    );
    let audit = keystamp.audit();
    let task_line = audit.iter().find(|line| line["task"] == "task:42").unwrap();
    assert_eq!(task_line["agent"], "reader");
    assert_eq!(task_line["credential"], "gh-read");
    assert!(audit
        .iter()
        .any(|line| line["agent"] == "writer" && line["credential"] == "gh-write"));
    let metrics = keystamp.admin_get("/metrics").await;
    assert!(
        !metrics.contains("task:42"),
        "a task id is never a metric label"
    );
    assert!(metrics.contains("credential=\"gh-write\""));
    let status = keystamp.status().await;
    assert_eq!(status["routes"][0]["agents"]["reader"], "gh-read");
    assert_eq!(status["routes"][0]["agents"]["writer"], "gh-write");
    let log = keystamp.log();
    for secret in [READ_SECRET, WRITE_SECRET] {
        assert!(!log.contains(secret) && !metrics.contains(secret));
    }

    // `keystamp check` prints the agent -> credential table.
    let checked = std::process::Command::new(env!("CARGO_BIN_EXE_keystamp"))
        .args(["check", "--config"])
        .arg(keystamp.dir.path().join("keystamp.yaml"))
        .output()
        .unwrap();
    let stdout = String::from_utf8(checked.stdout).unwrap();
    assert!(stdout.contains("agent reader"), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.contains("agent writer") && l.contains("gh-write (header)")),
        "{stdout}"
    );
}
