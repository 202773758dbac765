//! keystamp as the pod's only way out, with real netfilter in network namespaces this test
//! makes: an agent namespace (keystamp as uid 1500, agents as uid 1600) joined by a veth pair
//! to an upstream namespace holding the real TLS upstream. The rules are installed by
//! `keystamp netfilter apply`, not by the test. Clients that ignore HTTPS_PROXY (curl
//! --noproxy, Python http.client, Node's built-in fetch, a client dialling a wrong IP) are all
//! stamped and audited `via: transparent`; lockdown keeps everything else in, judged by what
//! the upstream namespace received. Needs root (tests and CI run as root here).

// Test code: a panic is a failed assertion, which is what we want here.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

const SECRET: &str = "transparent-secret-8d1e";
const KEYSTAMP_UID: &str = "1500";
const AGENT_UID: &str = "1600";

/// Two namespaces and a veth pair between them, deleted (with their /etc/netns files) on drop,
/// whether the test passed or not.
struct Namespaces {
    agent: String,
    upstream: String,
    subnet: u8,
}

impl Namespaces {
    fn create() -> Self {
        let id = std::process::id() % 10_000;
        let subnet = u8::try_from(id % 200 + 20).unwrap();
        let namespaces = Self {
            agent: format!("ks-a{id}"),
            upstream: format!("ks-u{id}"),
            subnet,
        };
        let (va, vu) = (format!("ksva{id}"), format!("ksvu{id}"));
        let agent_v4 = format!("10.231.{subnet}.1/24");
        let upstream_v4 = format!("10.231.{subnet}.2/24");
        let agent_v6 = format!("fd00:231:{subnet}::1/64");
        let upstream_v6 = format!("fd00:231:{subnet}::2/64");
        let (a, u) = (namespaces.agent.as_str(), namespaces.upstream.as_str());
        for args in [
            vec!["netns", "add", a],
            vec!["netns", "add", u],
            vec!["link", "add", &va, "type", "veth", "peer", "name", &vu],
            vec!["link", "set", &va, "netns", a],
            vec!["link", "set", &vu, "netns", u],
            vec!["-n", a, "addr", "add", &agent_v4, "dev", &va],
            vec!["-n", u, "addr", "add", &upstream_v4, "dev", &vu],
            vec!["-n", a, "addr", "add", &agent_v6, "dev", &va, "nodad"],
            vec!["-n", u, "addr", "add", &upstream_v6, "dev", &vu, "nodad"],
            vec!["-n", a, "link", "set", "lo", "up"],
            vec!["-n", u, "link", "set", "lo", "up"],
            vec!["-n", a, "link", "set", &va, "up"],
            vec!["-n", u, "link", "set", &vu, "up"],
        ] {
            run_ok(Command::new("ip").args(&args));
        }
        // `ip netns exec` shows /etc/netns/NAME/hosts as /etc/hosts: the routed name resolves.
        let etc = PathBuf::from("/etc/netns").join(a);
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(
            etc.join("hosts"),
            format!("127.0.0.1 localhost\n10.231.{subnet}.2 api.example.test\n"),
        )
        .unwrap();
        namespaces
    }

    fn upstream_ip(&self) -> String {
        format!("10.231.{}.2", self.subnet)
    }

    /// `program args...` in the agent namespace, as `uid` (root when `None`).
    fn in_agent_ns(&self, uid: Option<&str>, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.agent]);
        if let Some(uid) = uid {
            command.args(["setpriv", "--reuid", uid, "--regid", uid, "--clear-groups"]);
        }
        command.arg(program);
        command
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in [&self.agent, &self.upstream] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = std::fs::remove_dir_all(PathBuf::from("/etc/netns").join(&self.agent));
    }
}

fn run_ok(command: &mut Command) -> Output {
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "{command:?}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// What the upstream namespace received: TLS requests on :443, TCP accepts on :8080 and
/// [v6]:8443, UDP datagrams on :443.
#[derive(Default)]
struct Received {
    requests: Mutex<Vec<(String, String)>>,
    tcp_accepts: AtomicUsize,
    udp_datagrams: AtomicUsize,
}

/// Starts the upstream namespace's servers on a thread that entered it.
fn start_upstream(namespaces: &Namespaces, ca: Arc<TestCa>) -> Arc<Received> {
    let received = Arc::new(Received::default());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let netns = PathBuf::from("/var/run/netns").join(&namespaces.upstream);
    let (ip, subnet) = (namespaces.upstream_ip(), namespaces.subnet);
    let seen = received.clone();
    std::thread::spawn(move || {
        let file = std::fs::File::open(netns).unwrap();
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let requests = seen.clone();
            let handler: Handler = Arc::new(move |received: common::Received| {
                let auth = received
                    .headers
                    .get("authorization")
                    .map(|v| v.to_str().unwrap_or("").to_string())
                    .unwrap_or_default();
                requests
                    .requests
                    .lock()
                    .unwrap()
                    .push((received.path.clone(), auth.clone()));
                (
                    http::StatusCode::OK,
                    serde_json::json!({ "auth": auth }).to_string(),
                )
            });
            serve_tls_on(
                format!("{ip}:443").parse().unwrap(),
                &ca,
                &["api.example.test"],
                handler,
                Arc::new(|_| Duration::ZERO),
            )
            .await;
            for bind in [format!("{ip}:8080"), format!("[fd00:231:{subnet}::2]:8443")] {
                let listener = tokio::net::TcpListener::bind(&bind).await.unwrap();
                let counter = seen.clone();
                tokio::spawn(async move {
                    while listener.accept().await.is_ok() {
                        counter.tcp_accepts.fetch_add(1, Ordering::SeqCst);
                    }
                });
            }
            let udp = tokio::net::UdpSocket::bind(format!("{ip}:443"))
                .await
                .unwrap();
            let counter = seen.clone();
            tokio::spawn(async move {
                let mut buffer = [0u8; 2048];
                while udp.recv_from(&mut buffer).await.is_ok() {
                    counter.udp_datagrams.fetch_add(1, Ordering::SeqCst);
                }
            });
            ready_tx.send(()).unwrap();
            std::future::pending::<()>().await;
        });
    });
    ready_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    received
}

/// keystamp in the agent namespace as uid 1500; killed on drop.
struct Keystamp {
    dir: tempfile::TempDir,
    child: std::process::Child,
    proxy_port: u16,
    admin_port: u16,
}

impl Drop for Keystamp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_keystamp(namespaces: &Namespaces, upstream_ca: &str) -> Keystamp {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::write(dir.path().join("key"), SECRET).unwrap();
    std::fs::write(dir.path().join("upstream-ca.pem"), upstream_ca).unwrap();
    let (proxy_port, admin_port) = (free_port(), free_port());
    let mut config = TestConfig::new();
    config
        .trust(&dir.path().join("upstream-ca.pem"))
        .pin(
            "api.example.test:443",
            format!("{}:443", namespaces.upstream_ip()).parse().unwrap(),
        )
        .set(
            "egress",
            serde_json::json!({ "allow_cidrs": ["10.231.0.0/16"] }),
        )
        .set(
            "transparent",
            serde_json::json!({ "listen": "127.0.0.1:15001", "uid": 1500, "lockdown": true }),
        )
        .credential("key", serde_json::json!({ "source": { "file": "./key" } }))
        .bearer_route("api.example.test", "key", serde_json::json!({}));
    let yaml = format!(
        "listen: 127.0.0.1:{proxy_port}\nadmin: 127.0.0.1:{admin_port}\nca: {{ generate: true, cert_out: ./run/ca.crt }}\naudit: {{ output: ./audit.jsonl }}\n{}",
        config.yaml()
    );
    let config_path = dir.path().join("keystamp.yaml");
    std::fs::write(&config_path, yaml).unwrap();
    // The rules, from the same binary, as the chart's init container does.
    run_ok(
        namespaces
            .in_agent_ns(None, env!("CARGO_BIN_EXE_keystamp"))
            .args(["netfilter", "apply", "--config"])
            .arg(&config_path),
    );
    let child = namespaces
        .in_agent_ns(Some(KEYSTAMP_UID), env!("CARGO_BIN_EXE_keystamp"))
        .args(["--log-format", "json", "run", "--config"])
        .arg(&config_path)
        .env("RUST_LOG", "keystamp=debug")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("keystamp.log")).unwrap())
        .spawn()
        .unwrap();
    let keystamp = Keystamp {
        dir,
        child,
        proxy_port,
        admin_port,
    };
    let ca = keystamp.dir.path().join("run/ca.crt");
    let started = std::time::Instant::now();
    while !ca.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "keystamp never started: {}",
            std::fs::read_to_string(keystamp.dir.path().join("keystamp.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    keystamp
}

impl Keystamp {
    fn ca(&self) -> PathBuf {
        self.dir.path().join("run/ca.crt")
    }

    fn audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.path().join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }
}

/// An agent command's stdout, as uid 1600 in the agent namespace, without proxy variables.
fn agent(namespaces: &Namespaces, program: &str, args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut command = namespaces.in_agent_ns(Some(AGENT_UID), program);
    command
        .args(args)
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy");
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().unwrap()
}

#[test]
fn every_outbound_connection_goes_through_keystamp() {
    assert!(
        std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0")),
        "these tests make network namespaces and netfilter rules: run them as root"
    );
    let namespaces = Namespaces::create();
    let ca = Arc::new(TestCa::new("upstream"));
    let received = start_upstream(&namespaces, ca.clone());
    let keystamp = start_keystamp(&namespaces, &ca.pem);
    let ca_file = keystamp.ca();
    let ca_arg = ca_file.to_str().unwrap();
    let url = "https://api.example.test/who";
    let stamped = |output: &Output, client: &str| {
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(
            text.contains(&format!("Bearer {SECRET}")),
            "{client}: {text} {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };

    // Clients that ignore HTTPS_PROXY.
    let curl = agent(
        &namespaces,
        "curl",
        &["-s", "--noproxy", "*", "--cacert", ca_arg, url],
        &[],
    );
    stamped(&curl, "curl --noproxy");
    let python = agent(
        &namespaces,
        "/usr/bin/python3",
        &[
            "-c",
            "import http.client, ssl, sys\n\
             c = http.client.HTTPSConnection('api.example.test', context=ssl.create_default_context(cafile=sys.argv[1]))\n\
             c.request('GET', '/who', headers={'Authorization': 'Bearer agent-own'})\n\
             print(c.getresponse().read().decode())",
            ca_arg,
        ],
        &[],
    );
    stamped(&python, "python http.client");
    let node = agent(
        &namespaces,
        "node",
        &[
            "-e",
            "fetch('https://api.example.test/who').then(r => r.text()).then(console.log)",
        ],
        &[("NODE_EXTRA_CA_CERTS", &ca_file)],
    );
    stamped(&node, "node fetch");
    // A routed name at a wrong address still reaches the real host.
    let wrong = format!("api.example.test:443:10.231.{}.99", namespaces.subnet);
    let misdirected = agent(
        &namespaces,
        "curl",
        &[
            "-s",
            "--noproxy",
            "*",
            "--cacert",
            ca_arg,
            "--resolve",
            &wrong,
            url,
        ],
        &[],
    );
    stamped(&misdirected, "curl to a wrong IP");
    // HTTPS_PROXY clients in the same pod keep working.
    let proxy = format!("http://127.0.0.1:{}", keystamp.proxy_port);
    let proxied = agent(
        &namespaces,
        "curl",
        &["-s", "-x", &proxy, "--cacert", ca_arg, url],
        &[],
    );
    stamped(&proxied, "curl through HTTPS_PROXY");
    let requests = received.requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 5, "{requests:?}");
    assert!(requests
        .iter()
        .all(|(_, auth)| auth == &format!("Bearer {SECRET}")));

    // Lockdown: an unrouted TCP destination, UDP 443 and IPv6 never reach the upstream side.
    let ip = namespaces.upstream_ip();
    let direct = agent(
        &namespaces,
        "curl",
        &[
            "-s",
            "-m",
            "3",
            "--noproxy",
            "*",
            &format!("http://{ip}:8080/"),
        ],
        &[],
    );
    assert!(
        String::from_utf8_lossy(&direct.stdout).contains("unmatched_denied"),
        "{direct:?}"
    );
    let _ = agent(
        &namespaces,
        "/usr/bin/python3",
        &[
            "-c",
            "import socket, sys\n\
             s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
             for _ in range(3):\n    try: s.sendto(b'quic-initial', (sys.argv[1], 443))\n    except OSError: pass",
            &ip,
        ],
        &[],
    );
    let v6 = format!("http://[fd00:231:{}::2]:8443/", namespaces.subnet);
    let v6_attempt = agent(
        &namespaces,
        "curl",
        &["-s", "-m", "3", "--noproxy", "*", &v6],
        &[],
    );
    assert!(!v6_attempt.status.success(), "IPv6 got out: {v6_attempt:?}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        received.tcp_accepts.load(Ordering::SeqCst),
        0,
        "a direct TCP connection got out"
    );
    assert_eq!(
        received.udp_datagrams.load(Ordering::SeqCst),
        0,
        "UDP 443 got out"
    );

    // Bad input: nothing dialled, nothing stamped, each connection closed with an audit line.
    let probe = agent(
        &namespaces,
        "/usr/bin/python3",
        &[
            "-c",
            "import socket, ssl, sys, time\n\
             ip = sys.argv[1]\n\
             def hello(name):\n\
             \tctx = ssl.create_default_context()\n\
             \tctx.check_hostname = name is not None\n\
             \tctx.verify_mode = ssl.CERT_NONE if name is None else ssl.CERT_REQUIRED\n\
             \tincoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()\n\
             \tconn = ctx.wrap_bio(incoming, outgoing, server_hostname=name)\n\
             \ttry: conn.do_handshake()\n\
             \texcept ssl.SSLWantReadError: pass\n\
             \treturn outgoing.read()\n\
             def answer(chunks, pause):\n\
             \ts = socket.create_connection((ip, 443), timeout=5)\n\
             \tfor chunk in chunks:\n\
             \t\ts.sendall(chunk); time.sleep(pause)\n\
             \ttry: return s.recv(1)\n\
             \texcept OSError: return b''\n\
             split = hello('api.example.test')\n\
             print('split', answer([split[i:i+7] for i in range(0, len(split), 7)], 0.005).hex())\n\
             print('nosni', answer([hello(None)], 0).hex())\n\
             print('garbage', answer([b'\\x16\\x03\\x01' + b'\\xff' * 40], 0).hex())",
            &ip,
        ],
        &[],
    );
    let said = String::from_utf8_lossy(&probe.stdout).to_string();
    assert!(
        said.contains("split 16"),
        "a hello split into 7-byte segments was not answered: {said} {probe:?}"
    );
    assert!(
        said.contains("nosni \n"),
        "a hello without SNI was answered: {said}"
    );
    assert!(said.contains("garbage \n"), "garbage was answered: {said}");
    // A connection straight to the transparent port was not redirected: closed, accounted.
    let unredirected = agent(
        &namespaces,
        "curl",
        &["-s", "-m", "3", "--noproxy", "*", "http://127.0.0.1:15001/"],
        &[],
    );
    assert!(!unredirected.status.success());
    assert_eq!(
        received.requests.lock().unwrap().len(),
        5,
        "bad input reached the upstream"
    );

    // Every request is audited with how it arrived.
    std::thread::sleep(Duration::from_millis(200));
    let audit = keystamp.audit();
    let via = |via: &str| {
        audit
            .iter()
            .filter(|l| l["kind"] == "request" && l["via"] == via)
            .count()
    };
    assert_eq!(via("transparent"), 5, "{audit:?}");
    assert_eq!(via("proxy"), 1, "{audit:?}");
    let connections = |decision: &str| {
        audit
            .iter()
            .filter(|l| l["kind"] == "connection" && l["decision"] == decision)
            .count()
    };
    assert!(connections("intercept") >= 4, "{audit:?}");
    // The no-SNI hello and the garbage were denied as unrouted; UDP and v6 never arrived.
    assert!(connections("deny") >= 2, "{audit:?}");
    assert_eq!(connections("no_destination"), 1, "{audit:?}");
    let log = std::fs::read_to_string(keystamp.dir.path().join("keystamp.log")).unwrap();
    assert!(!log.contains(SECRET));
    let _ = keystamp.admin_port;
}
