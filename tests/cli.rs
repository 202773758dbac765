//! The real `keystamp` binary: `check` on good and broken configs (positions asserted), and
//! `run` serving curl, draining on SIGTERM, and never printing a secret even at `RUST_LOG=trace`.

// Test code: a panic is a failed assertion, which is what we want here.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use common::*;

fn keystamp() -> Command {
    Command::new(env!("CARGO_BIN_EXE_keystamp"))
}

/// `keystamp check --config PATH`.
fn check(path: &Path) -> std::process::Output {
    keystamp()
        .args(["check", "--config"])
        .arg(path)
        .output()
        .unwrap()
}

#[test]
fn check_accepts_the_shipped_configs_and_lists_routes_and_credential_kinds() {
    for config in [
        "config/example.yaml",
        "config/keystamp.yaml",
        "config/everything.yaml",
    ] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(config);
        let output = keystamp()
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let stdout = String::from_utf8(output.stdout).unwrap();
        assert!(
            output.status.success(),
            "{config}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(stdout.contains("routes ("), "{stdout}");
        assert!(
            stdout.contains("unmatched deny") || stdout.contains("unmatched tunnel"),
            "{stdout}"
        );
        if config.ends_with("everything.yaml") {
            assert!(
                [
                    "oauth2_client_credentials",
                    "command",
                    "github_app",
                    "google_service_account"
                ]
                .iter()
                .all(|kind| stdout.contains(kind)),
                "{stdout}"
            );
            assert!(stdout.contains("identities (2, required):"), "{stdout}");
        }
        if config.ends_with("example.yaml") {
            assert!(stdout.contains("*.other.test"), "{stdout}");
            assert!(stdout
                .lines()
                .any(|l| l.trim_start().starts_with("example") && l.trim_end().ends_with("file")));
            assert!(stdout
                .lines()
                .any(|l| l.trim_start().starts_with("other") && l.trim_end().ends_with("env")));
        }
    }
}

#[test]
fn check_into_a_closed_pipe_stops_quietly() {
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/everything.yaml");
    let mut child = keystamp()
        .args(["check", "--config"])
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The reader goes away before keystamp writes (as `| head` does after its lines): that is
    // the reader's choice, not an error worth a panic; the verdict is the exit code.
    drop(child.stdout.take());
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(output.status.success(), "{stderr}");
}

#[test]
fn check_reports_every_error_with_file_line_column_and_key_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.yaml");
    std::fs::write(
        &path,
        "listen: nope\n\
         ca:\n  generate: true\n\
         credentials:\n  a:\n    source: { file: x, env: Y }\n  good:\n    source: { env: GOOD }\n\
         routes:\n\
         \x20 - host: api.example.test\n    credential: good\n    inject: { type: bearer }\n\
         \x20 - host: \"bad host\"\n    credential: nobody\n    inject: { type: header, name: X-Key, value: \"nosecret\" }\n\
         \x20 - host: ok.test\n    credential: good\n    inject: { type: wat }\n\
         workers: 0\n",
    )
    .unwrap();
    let output = check(&path);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr).unwrap();
    let file = path.display().to_string();
    for expected in [
        format!("{file}:1:1: listen: "),
        format!("{file}:6:5: credentials.a.source: "),
        format!("{file}:13:5: routes[1].host: "),
        format!("{file}:14:5: routes[1].credential: "),
        format!("{file}:15:5: routes[1].inject.value: "),
        format!("{file}:18:5: routes[2].inject.type: "),
        format!("{file}:19:1: workers: must be a number from 1 to 256, or `auto`"),
    ] {
        assert!(
            stderr.lines().any(|l| l.starts_with(&expected)),
            "missing `{expected}` in:\n{stderr}"
        );
    }
    assert_eq!(stderr.lines().count(), 7, "{stderr}");
}

#[test]
fn check_reports_bad_minted_credentials_by_key_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("minted.yaml");
    std::fs::write(
        &path,
        "listen: 127.0.0.1:1\nca: { generate: true }\ncredentials:\n\
         \x20 gh:\n    source:\n      github_app:\n        app_id: 1\n        installation_id: two\n\
         \x20       private_key: { command: [cat, key.pem] }\n\
         \x20       repositories: [acme/keystamp]\n        permissions: { contents: everything }\n\
         \x20       mint: per_request\n\
         \x20 g:\n    source:\n      google_service_account:\n        key: { file: sa.json }\n        scopes: []\n\
         routes: []\n",
    )
    .unwrap();
    let output = check(&path);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr).unwrap();
    for expected in [
        "credentials.gh.source.github_app.installation_id: must be a number",
        "credentials.gh.source.github_app.private_key: key material takes a `file` or `env` source",
        "credentials.gh.source.github_app.repositories[0]: a repository name without its owner",
        "credentials.gh.source.github_app.permissions.contents: must be `read`, `write` or `admin`",
        "credentials.gh.source.github_app.mint: must be `shared` or `per_task`",
        "credentials.g.source.google_service_account.scopes: list at least one OAuth scope",
    ] {
        assert!(
            stderr.contains(expected),
            "missing `{expected}` in:\n{stderr}"
        );
    }
    assert!(!stderr.contains("everything"), "values are never echoed");

    std::fs::write(
        &path,
        "listen: 127.0.0.1:1\nca: { generate: true }\ncredentials:\n\
         \x20 key: { source: { env: KEY } }\n\
         \x20 aws: { source: { aws: { access_key_id: { env: A }, secret_access_key: { env: S },\
          assume_role: { role_arn: not-an-arn, duration: 5m } } } }\n\
         routes:\n\
         \x20 - { host: s3.us-east-1.amazonaws.com, credential: key, inject: { type: aws_sigv4 } }\n\
         \x20 - { host: api.example.test, credential: aws, inject: { type: bearer } }\n\
         \x20 - { host: api.example.test, credential: aws, inject: { type: aws_sigv4 } }\n",
    )
    .unwrap();
    let output = check(&path);
    let stderr = String::from_utf8(output.stderr).unwrap();
    for expected in [
        "credentials.aws.source.aws.assume_role.role_arn: must be a role ARN",
        "credentials.aws.source.aws.assume_role.duration: must be between 15m and 12h",
        "routes[0].inject: inject type `aws_sigv4` needs an `aws` credential",
        "routes[1].inject: an `aws` credential is used with inject type `aws_sigv4` only",
        "routes[2].inject.type: set `service` and `region`: this host is not a standard AWS endpoint",
    ] {
        assert!(stderr.contains(expected), "missing `{expected}` in:\n{stderr}");
    }
}

#[test]
fn check_reports_unknown_keys_with_position_and_never_echoes_values() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("typo.yaml");
    std::fs::write(&path, "listen: 127.0.0.1:1\nca: { generate: true }\ncredentials:\n  k:\n    source: { env: K }\nroutes:\n  - host: a.test\n    credentail: k\n").unwrap();
    let output = check(&path);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.starts_with(&format!(
            "{}:8:5: routes[0].credentail: unknown field",
            path.display()
        )),
        "{stderr}"
    );

    std::fs::write(
        &path,
        "listen: 127.0.0.1:1\nca: { generate: true }\nroutes: \"sk-pasted-secret-value\"\n",
    )
    .unwrap();
    let output = check(&path);
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr.contains(":3:"), "{stderr}");
    assert!(!stderr.contains("sk-pasted-secret-value"), "{stderr}");
}

#[test]
fn version_and_help() {
    let version = keystamp().arg("--version").output().unwrap();
    assert!(String::from_utf8(version.stdout)
        .unwrap()
        .starts_with("keystamp "));
    let help = keystamp().arg("--help").output().unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    assert!(help.contains("run") && help.contains("check") && help.contains("--log-format"));
}

/// A TLS upstream and a config for the real binary (the example routes pointed at it), on free
/// ports, with `secrets` written under `secrets/`.
struct BinaryRig {
    dir: tempfile::TempDir,
    config_path: std::path::PathBuf,
    proxy_port: u16,
    admin_port: u16,
}

impl BinaryRig {
    async fn new(secrets: &[(&str, &str)], top_level: &str, ca_extra: &str) -> Self {
        // The upstream's server task lives on in the runtime; only its address is needed.
        let (upstream, ca_path, dir) = tls_upstream().await;
        std::fs::create_dir_all(dir.path().join("secrets")).unwrap();
        for (name, value) in secrets {
            std::fs::write(dir.path().join("secrets").join(name), value).unwrap();
        }
        let (proxy_port, admin_port) = (free_port(), free_port());
        let config = format!(
            "listen: 127.0.0.1:{proxy_port}\nadmin: 127.0.0.1:{admin_port}\n{top_level}ca:\n  generate: true\n  cert_out: ./run/ca.crt\n{ca_extra}{}",
            example_config(upstream.addr, &ca_path, "deny")
        );
        let config_path = dir.path().join("keystamp.yaml");
        std::fs::write(&config_path, config).unwrap();
        Self {
            dir,
            config_path,
            proxy_port,
            admin_port,
        }
    }

    /// Polls `/readyz` until the started binary answers.
    fn wait_ready(&self) {
        let ready_url = format!("http://127.0.0.1:{}/readyz", self.admin_port);
        let started = Instant::now();
        while !Command::new("curl")
            .args(["-sf", &ready_url])
            .env_remove("http_proxy")
            .output()
            .unwrap()
            .status
            .success()
        {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "keystamp never became ready"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn curl(proxy: &str, ca: &Path, args: &[&str]) -> std::process::Child {
    Command::new("curl")
        .args(["-sS", "--max-time", "20", "-w", "\\n%{http_code}"])
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap())
        .env("HTTPS_PROXY", proxy)
        .env("https_proxy", proxy)
        .env("http_proxy", proxy)
        .env("CURL_CA_BUNDLE", ca)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("curl must be installed (the test script installs it)")
}

fn finish(child: std::process::Child) -> (String, String) {
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    (body.to_string(), code.to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn run_serves_curl_drains_on_sigterm_and_never_prints_the_secret() {
    let canary = format!("cnry/{}+x=", std::process::id() as u64 * 7919 + 12345);
    let secret = format!("{canary}\n");
    let rig = BinaryRig::new(
        &[("example", &secret), ("other", &canary)],
        // One worker per CPU here (the default is one): the multi-worker runtime is served too.
        "shutdown_grace: 10s\nworkers: auto\n",
        "  bundle_out: ./run/bundle.crt\n",
    )
    .await;
    let (dir, proxy_port) = (&rig.dir, rig.proxy_port);
    let log_path = dir.path().join("keystamp.log");
    let mut child = keystamp()
        .args(["--log-format", "json", "run", "--config"])
        .arg(&rig.config_path)
        .env("RUST_LOG", "trace")
        .stdout(Stdio::from(
            std::fs::File::create(dir.path().join("stdout.log")).unwrap(),
        ))
        .stderr(Stdio::from(std::fs::File::create(&log_path).unwrap()))
        .spawn()
        .unwrap();
    rig.wait_ready();
    let proxy = format!("http://127.0.0.1:{proxy_port}");
    // The combined bundle (system roots + pod CA) is what curl, Python and OpenSSL take.
    let ca = dir.path().join("run/bundle.crt");
    let bundle = std::fs::read_to_string(&ca).unwrap();
    assert!(bundle.contains(
        std::fs::read_to_string(dir.path().join("run/ca.crt"))
            .unwrap()
            .trim()
    ));
    assert!(
        bundle.matches("BEGIN CERTIFICATE").count() > 1,
        "system roots missing from the bundle"
    );

    let (body, code) = finish(curl(
        &proxy,
        &ca,
        &[
            "-H",
            "Authorization: Bearer agent-key",
            "https://api.example.test/x",
        ],
    ));
    assert_eq!(code, "200", "{body}");
    assert!(
        body.contains(&canary),
        "the upstream must have received the secret: {body}"
    );
    for url in [
        "https://basic.example.test/",
        "https://query.example.test/q?a=1",
        "https://a.other.test/v1/k",
        "https://a.other.test/denied",
        "https://api.example.test/broken/",
    ] {
        let (_, code) = finish(curl(&proxy, &ca, &[url]));
        assert!(
            ["200", "403", "503"].contains(&code.as_str()),
            "{url}: {code}"
        );
    }

    // A slow response in flight when SIGTERM arrives must complete.
    let slow = curl(&proxy, &ca, &["https://api.example.test/sse"]);
    std::thread::sleep(Duration::from_millis(200));
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let (body, code) = finish(slow);
    assert_eq!(code, "200");
    assert!(
        body.contains("event-2"),
        "drain cut the stream short: {body}"
    );
    let status = child.wait().unwrap();
    assert!(status.success(), "keystamp exited with {status}");

    let mut printed = String::new();
    std::fs::File::open(&log_path)
        .unwrap()
        .read_to_string(&mut printed)
        .unwrap();
    printed.push_str(&std::fs::read_to_string(dir.path().join("stdout.log")).unwrap());
    assert!(printed.lines().count() > 10, "expected trace output");
    for line in printed.lines() {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok(),
            "not JSON: {line}"
        );
    }
    let forms = [
        canary.clone(),
        base64::engine::general_purpose::STANDARD.encode(format!("svc:{canary}")),
        base64::engine::general_purpose::STANDARD.encode(&canary),
        form_urlencoded::byte_serialize(canary.as_bytes()).collect::<String>(),
    ];
    for form in forms {
        assert!(
            !printed.contains(&form),
            "secret form `{form}` printed by keystamp"
        );
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_one_gib_upload_streams_through_without_growing_memory() {
    let rig = BinaryRig::new(
        &[("example", "upload-secret"), ("other", "x")],
        "audit: { output: off }\n",
        "",
    )
    .await;
    let (dir, proxy_port) = (&rig.dir, rig.proxy_port);
    let mut child = keystamp()
        .args(["run", "--config"])
        .arg(&rig.config_path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    rig.wait_ready();
    let started = Instant::now();
    let baseline = rss_kib(child.id());
    // 1 GiB from a pipe: neither curl nor keystamp knows the size up front, so nothing can be
    // buffered whole by accident.
    let proxy = format!("http://127.0.0.1:{proxy_port}");
    let upload = Command::new("sh")
        .arg("-c")
        .arg("head -c 1073741824 /dev/zero | curl -sS --max-time 600 -T - -H 'Transfer-Encoding: chunked' https://api.example.test/upload")
        .env("HTTPS_PROXY", &proxy)
        .env("CURL_CA_BUNDLE", dir.path().join("run/ca.crt"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let peak = std::thread::spawn(move || {
        let mut peak = 0;
        for _ in 0..6000 {
            peak = peak.max(rss_kib(pid));
            std::thread::sleep(Duration::from_millis(100));
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                break;
            }
            if STOP.load(std::sync::atomic::Ordering::SeqCst) {
                break;
            }
        }
        peak
    });
    let output = tokio::task::spawn_blocking(move || upload.wait_with_output().unwrap())
        .await
        .unwrap();
    STOP.store(true, std::sync::atomic::Ordering::SeqCst);
    let peak = peak.join().unwrap();
    let body = String::from_utf8_lossy(&output.stdout);
    assert!(
        body.contains("\"bytes\":1073741824"),
        "upstream did not receive 1 GiB: {body}"
    );
    assert!(
        peak < baseline + 64 * 1024,
        "RSS grew from {baseline} KiB to {peak} KiB during a 1 GiB upload"
    );
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    eprintln!(
        "1 GiB upload: RSS {baseline} KiB before, {peak} KiB at peak, {:?}",
        started.elapsed()
    );
}

static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The first mistakes a newcomer makes writing a config by hand: each one's error names the
/// key at its line and column and says what to write, as a YAML error when it is one.
#[test]
fn check_errors_a_newcomer_can_act_on() {
    const HEAD: &str = "listen: 127.0.0.1:3128\nca: { generate: true }\n";
    const ROUTE: &str =
        "routes:\n  - { host: api.example.com, credential: k, inject: { type: bearer } }\n";
    let cred = |source: &str| format!("{HEAD}credentials:\n  k:\n    source: {source}\n{ROUTE}");
    // (config, line, column, key path shown, what the message must say)
    let cases: Vec<(String, usize, usize, &str, &str)> = vec![
        ("listen: 127.0.0.1:3128\nroutes: []\n".into(), 1, 1, "(root)", "missing key `ca`: add `ca: { generate: true }`"),
        ("ca: { generate: true }\nroutes: []\n".into(), 1, 1, "(root)", "missing key `listen`: add `listen: 127.0.0.1:3128`"),
        (format!("{HEAD}routes:\n  - host: a.example.com\n    credential: k\n"), 4, 5, "routes[0]", "missing key `inject`: add `inject: { type: bearer }`"),
        (format!("{HEAD}routes:\n  - credential: k\n    inject: {{ type: bearer }}\n"), 4, 5, "routes[0]", "missing key `host`"),
        (format!("{HEAD}routes:\n  - host: a.example.com\n    inject: {{ typ: bearer }}\n"), 5, 15, "routes[0].inject.typ", "did you mean `type`?"),
        (format!("{HEAD}credentials:\n  k: {{ sorce: {{ file: x }} }}\n{ROUTE}"), 4, 8, "credentials.k.sorce", "did you mean `source`?"),
        (cred("{ fiel: ./k }"), 5, 15, "credentials.k.source.fiel", "did you mean `file`?"),
        (cred("{ File: ./k }"), 5, 15, "credentials.k.source.File", "did you mean `file`?"),
        (cred("{ enviroment: K }"), 5, 15, "credentials.k.source.enviroment", "expected one of `file`, `env`"),
        (cred("{ github_app: { app_id: 1, installation_id: -1, private_key: { file: k } } }"), 5, 57, "credentials.k.source.github_app.installation_id", "expected a positive integer (GitHub shows it"),
        (cred("{ github_app: { app_id: [1], installation_id: 2, private_key: { file: k } } }"), 5, 37, "credentials.k.source.github_app.app_id", "expected a positive integer"),
        (cred("{ github_app: { app_id: 1, private_key: { file: k } } }"), 5, 27, "credentials.k.source.github_app", "missing key `installation_id`"),
        (cred("{ oauth2_client_credentials: { client_id: { env: A }, client_secret: { env: B } } }"), 5, 42, "credentials.k.source.oauth2_client_credentials", "missing key `token_url`"),
        (cred("{ vault: { address: https://v:8200, kv: { path: a, field: b } } }"), 5, 22, "credentials.k.source.vault", "missing key `auth`"),
        (cred("{ vault: { address: https://v:8200, auth: { jwt: { role: r } }, kv: { path: a, field: b } } }"), 5, 62, "credentials.k.source.vault.auth.jwt", "missing key `token`"),
        (cred("{ aws_secrets_manager: { secret_id: s, region: us-east-1 } }"), 5, 36, "credentials.k.source.aws_secrets_manager", "missing key `credential`"),
        (cred("{ aws: { acces_key_id: { env: A }, secret_access_key: { env: B } } }"), 5, 22, "credentials.k.source.aws.acces_key_id", "did you mean `access_key_id`?"),
        (format!("{HEAD}routes:\n  - {{ host: a.example.com, credential: k, inject: {{ type: bearer, nmae: X }} }}\n"), 4, 67, "routes[0].inject.nmae", "did you mean `name`?"),
        (format!("{HEAD}fleet:\n  name: f\n{ROUTE}"), 4, 3, "fleet", "missing key `store`: add `store: { url: { env: REDIS_URL } }`"),
        (format!("{HEAD}fleet:\n  name: f\n  store: {{ ulr: {{ env: R }} }}\n{ROUTE}"), 5, 12, "fleet.store.ulr", "did you mean `url`?"),
        (format!("{HEAD}identities:\n  bot: {{ sourse: {{ file: t }} }}\n{ROUTE}"), 4, 10, "identities.bot.sourse", "did you mean `source`?"),
        (format!("{HEAD}workers: 2.5\n{ROUTE}"), 3, 10, "workers", "a number of threads, or the word auto"),
        (format!("{HEAD}breaker: {{ failures: 5, open_fro: 30s }}\n{ROUTE}"), 3, 25, "breaker.open_fro", "did you mean `open_for`?"),
        (format!("{HEAD}egress: {{ allow_cidr: [10.0.0.0/8] }}\n{ROUTE}"), 3, 11, "egress.allow_cidr", "did you mean `allow_cidrs`?"),
        (format!("{HEAD}transparent: {{ lockdown: true }}\n{ROUTE}"), 3, 14, "transparent", "missing key `uid`"),
        (format!("{HEAD}reload:\n  debounse: 200ms\n{ROUTE}"), 4, 3, "reload.debounse", "did you mean `debounce`?"),
        ("listen: 127.0.0.1:3128\nca:\n  generate: true\n routes: []\n".into(), 4, 2, "", "YAML syntax error"),
        ("listen: 127.0.0.1:3128\nca: { generate: true }\nroutes: \"unclosed\n".into(), 4, 1, "routes", "YAML syntax error"),
        ("listen: 127.0.0.1:3128\nca: [ generate, true ]\nroutes: []\n".into(), 2, 5, "ca", "expected a mapping of keys (key: value lines"),
        ("listen: 127.0.0.1:3128\n\tca: { generate: true }\n".into(), 2, 1, "listen", "YAML syntax error"),
    ];
    assert!(cases.len() >= 25);
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for (index, (yaml, line, column, key_path, says)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("case-{index}.yaml"));
        std::fs::write(&path, yaml).unwrap();
        let output = check(&path);
        let stderr = String::from_utf8_lossy(&output.stderr).to_string();
        let first = stderr.lines().next().unwrap_or("").to_string();
        let position = format!("case-{index}.yaml:{line}:{column}: {key_path}");
        let good = !output.status.success()
            && first.contains(&position)
            && first.contains(says)
            && !first.contains("Raw")
            && !first.contains("untagged");
        if !good {
            failures.push(format!(
                "case {index}: wanted `{position}` and `{says}`, got: {stderr}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A section serde cannot read does not hide the errors of the others, structural or semantic.
#[test]
fn check_reports_errors_past_a_broken_section() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.yaml");
    std::fs::write(
        &path,
        "listen: 127.0.0.1:3128\ncredentials:\n  k: { sorce: { file: x } }\n\
         breaker: { failures: 0, open_fro: 1s }\n\
         routes:\n  - { host: a.example.com, credential: missing, inject: { type: bearer } }\n",
    )
    .unwrap();
    let output = check(&path);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    for expected in [
        "k.yaml:3:8: credentials.k.sorce: unknown field `sorce`",
        "k.yaml:4:25: breaker.open_fro: unknown field `open_fro`",
        "k.yaml:1:1: (root): missing key `ca`",
        "k.yaml:6:3: routes[0].credential: no credential by this name is defined",
    ] {
        assert!(
            stderr.contains(expected),
            "{expected} missing from:\n{stderr}"
        );
    }
}
