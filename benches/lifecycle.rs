//! Lifecycle speed: route + credential lookup with 10 and 10,000 routes, a full read of 10,000
//! file credentials, and the time from a kubelet-style `..data` swap to the first request stamped
//! with the new value (default 200 ms debounce). Prints figures; `cargo bench --bench lifecycle`.

// Bench code: a panic is a failed measurement, which is what we want here.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::hint::black_box;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keystamp::internals::{
    plan_next, read_all, Breaker, BreakerSettings, CredentialTable, Dialer, Host, Metrics,
    Reporting, RouteMatch, RouteTable, Snapshot, Upstream, Verdict,
};
use keystamp::{App, Config};

fn config_with(routes: usize, dir: &Path) -> Config {
    let mut yaml = String::from("listen: 127.0.0.1:0\nca: { generate: true }\ncredentials:\n");
    for i in 0..routes {
        yaml.push_str(&format!(
            "  c{i}: {{ source: {{ file: ./secrets/c{i} }} }}\n"
        ));
    }
    yaml.push_str("routes:\n");
    for i in 0..routes {
        // Half exact hosts, half wildcards, each with its own credential.
        if i % 2 == 0 {
            yaml.push_str(&format!("  - {{ host: api{i}.example.test, credential: c{i}, inject: {{ type: bearer }} }}\n"));
        } else {
            yaml.push_str(&format!("  - {{ host: '*.svc{i}.example.test', path_prefix: /v1/, credential: c{i}, inject: {{ type: bearer }} }}\n"));
        }
    }
    Config::from_yaml(&dir.join("k.yaml"), &yaml).expect("bench config")
}

fn lookup_ns(routes: &RouteTable, credentials: &CredentialTable, count: usize) -> f64 {
    let hosts: Vec<Host> = (0..1024)
        .map(|n| {
            let i = (n * 7919) % count;
            let name = if i % 2 == 0 {
                format!("api{i}.example.test")
            } else {
                format!("a.b.svc{i}.example.test")
            };
            Host::parse(&name).expect("host")
        })
        .collect();
    let method = http::Method::GET;
    let rounds = 200_000;
    let started = Instant::now();
    for n in 0..rounds {
        let host = &hosts[n % hosts.len()];
        if let RouteMatch::Matched(route) = routes.lookup(black_box(host), "/v1/chat", &method) {
            black_box(route.credential.as_deref().and_then(|c| credentials.get(c)));
        }
    }
    started.elapsed().as_nanos() as f64 / rounds as f64
}

/// The start-up load as the reloader does it: plan from nothing, read every source, build.
async fn load_table(
    config: &Config,
    upstream: &Upstream,
    metrics: &Arc<Metrics>,
) -> CredentialTable {
    let reporting = Reporting {
        metrics: metrics.clone(),
        breaker_events: None,
    };
    let mut next = plan_next(&Snapshot::before_first_load(config), config, &reporting);
    let fresh = std::mem::take(&mut next.fresh);
    let loaded = read_all(fresh, &CredentialTable::default(), upstream)
        .await
        .into_iter()
        .map(|(credential, _)| credential)
        .collect();
    next.build(loaded, config).credentials
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let upstream = runtime.block_on(async {
        Upstream::new(
            Dialer::fixed(Default::default()),
            rustls::RootCertStore::empty(),
            std::time::Duration::from_secs(300),
        )
        .expect("upstream")
    });
    let metrics = Arc::new(Metrics::new().expect("metrics"));
    println!("| measurement | figure |\n|---|---|");
    // `LIFECYCLE=p99 cargo bench --bench lifecycle`: only the reload-vs-request-p99 part, for
    // quick A/B runs of two builds.
    if std::env::var("LIFECYCLE").as_deref() == Ok("p99") {
        print_p99();
        return;
    }
    let mut per_request = Vec::new();
    for count in [10usize, 10_000] {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("secrets")).expect("mkdir");
        for i in 0..count {
            std::fs::write(
                dir.path().join(format!("secrets/c{i}")),
                format!("secret-{i}\n"),
            )
            .expect("write");
        }
        let config = config_with(count, dir.path());
        let routes = RouteTable::new(&config.routes);
        let started = Instant::now();
        let credentials = runtime.block_on(load_table(&config, &upstream, &metrics));
        let load = started.elapsed();
        assert_eq!(credentials.len(), count);
        // A reload (SIGHUP, resync, a file event) re-reads existing credentials.
        let existing: Vec<_> = credentials.iter().cloned().collect();
        let started = Instant::now();
        let reread = runtime.block_on(read_all(existing, &credentials, &upstream));
        let reload = started.elapsed();
        assert_eq!(reread.len(), count);
        let ns = lookup_ns(&routes, &credentials, count);
        per_request.push(ns);
        println!(
            "| route + credential lookup, {count} routes / {count} credentials | {ns:.0} ns |"
        );
        println!(
            "| start-up load of {count} file credentials | {:.1} ms |",
            load.as_secs_f64() * 1000.0
        );
        println!(
            "| reload (re-read) of {count} file credentials | {:.1} ms |",
            reload.as_secs_f64() * 1000.0
        );
    }
    println!(
        "| lookup ratio, 10,000 vs 10 routes | {:.2}x |",
        per_request[1] / per_request[0]
    );
    println!(
        "| breaker check + verdict, closed, uncontended | {:.1} ns |",
        breaker_ns()
    );
    println!("| `..data` swap to first request stamped with the new value (200 ms debounce), median of 5 | {:.0} ms |", swap_to_stamp(&runtime));
    print_p99();
}

fn print_p99() {
    let (quiet, during) = p99_during_reloads();
    for (every, reloading) in during {
        println!("| request p99 with 10,000 file credentials: quiet / full reload every {every} ms | {quiet:.2} ms / {reloading:.2} ms ({:+.2} ms) |", reloading - quiet);
    }
}

/// The breaker's cost on the request path in its common state: closed, a success recorded.
fn breaker_ns() -> f64 {
    let breaker = Breaker::new(
        Arc::from("bench"),
        BreakerSettings::default(),
        Arc::default(),
        None,
    );
    let rounds = 5_000_000;
    let now = tokio::time::Instant::now();
    let started = Instant::now();
    for _ in 0..rounds {
        let admission = breaker.admit(black_box(now));
        breaker.record(
            &admission,
            Some(Verdict::NotAuthFailure),
            "fingerprint",
            now,
        );
    }
    started.elapsed().as_nanos() as f64 / rounds as f64
}

/// Request latency (p99 of sequential plain-HTTP requests, each on a new connection) with 10,000
/// file credentials, quiet and while the whole table is re-read every 500 ms and every 50 ms
/// (back to back: a reload takes about that long), in alternating windows. keystamp runs on the
/// runtime the binary builds for the config (one worker by default: a current-thread runtime).
fn p99_during_reloads() -> (f64, Vec<(u64, f64)>) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("secrets")).expect("mkdir");
    let echo = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let echo_addr = echo.local_addr().expect("addr");
    std::thread::spawn(move || {
        for stream in echo.incoming().flatten() {
            std::thread::spawn(move || echo_authorization(stream));
        }
    });
    let mut yaml = format!(
        "listen: 127.0.0.1:0\nca: {{ generate: true }}\naudit: {{ output: off }}\nreload: {{ resync_every: 1h }}\nresolve: {{ 'plain.test:80': {echo_addr} }}\ncredentials:\n"
    );
    for i in 0..10_000 {
        std::fs::write(
            dir.path().join(format!("secrets/c{i}")),
            format!("secret-{i}\n"),
        )
        .expect("write");
        yaml.push_str(&format!(
            "  c{i}: {{ source: {{ file: ./secrets/c{i} }} }}\n"
        ));
    }
    yaml.push_str(
        "routes:\n  - { host: plain.test, credential: c0, inject: { type: bearer }, tls_only: false }\n",
    );
    std::fs::write(dir.path().join("k.yaml"), &yaml).expect("write");
    let config = Config::load(&dir.path().join("k.yaml")).expect("config");
    let runtime = serving_runtime(&config);
    let app = Arc::new(runtime.block_on(App::start(config)).expect("start"));
    let proxy = app.proxy_addr();
    let p99 = |samples: &mut Vec<f64>| {
        samples.sort_by(|a, b| a.total_cmp(b));
        samples[samples.len() * 99 / 100]
    };
    let measure = |count: usize, samples: &mut Vec<f64>| {
        for _ in 0..count {
            let started = Instant::now();
            assert_eq!(ask(proxy), "Bearer secret-0");
            samples.push(started.elapsed().as_secs_f64() * 1000.0);
        }
    };
    // Quiet and reloading windows alternate, so the machine's drift (it is shared) lands on
    // both sides instead of on whichever phase ran second.
    let mut quiet_samples = Vec::new();
    let mut during = Vec::new();
    for every in [500u64, 50] {
        let mut reloading = Vec::new();
        for _ in 0..6 {
            measure(500, &mut quiet_samples);
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let reloader = {
                let (app, stop) = (app.clone(), stop.clone());
                std::thread::spawn(move || {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        app.reload();
                        std::thread::sleep(Duration::from_millis(every));
                    }
                })
            };
            measure(500, &mut reloading);
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let _ = reloader.join();
        }
        during.push((every, p99(&mut reloading)));
    }
    let quiet = p99(&mut quiet_samples);
    (quiet, during)
}

/// The runtime the binary would serve `config` on (`App::runtime`), driven by a thread of its
/// own for the rest of the bench, so the bench's blocking clients can call into it.
fn serving_runtime(config: &Config) -> tokio::runtime::Handle {
    let runtime = App::runtime(config).expect("runtime");
    let handle = runtime.handle().clone();
    std::thread::spawn(move || runtime.block_on(std::future::pending::<()>()));
    handle
}

/// Starts keystamp with a plain-HTTP route to a tiny echo server, swaps a kubelet-style volume,
/// and polls until the upstream sees the new value.
fn swap_to_stamp(runtime: &tokio::runtime::Runtime) -> f64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let echo = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let echo_addr = echo.local_addr().expect("addr");
    std::thread::spawn(move || {
        for stream in echo.incoming().flatten() {
            std::thread::spawn(move || echo_authorization(stream));
        }
    });
    let mount = dir.path().join("mount");
    swap(&mount, 0);
    let yaml = format!(
        "listen: 127.0.0.1:0\nca: {{ generate: true }}\naudit: {{ output: off }}\nresolve: {{ 'plain.test:80': {echo_addr} }}\n\
         credentials:\n  k: {{ source: {{ file: ./mount/token }} }}\n\
         routes:\n  - {{ host: plain.test, credential: k, inject: {{ type: bearer }}, tls_only: false }}\n"
    );
    std::fs::write(dir.path().join("k.yaml"), &yaml).expect("write");
    let config = Config::load(&dir.path().join("k.yaml")).expect("config");
    let app = runtime.block_on(App::start(config)).expect("start");
    let proxy = app.proxy_addr();
    let mut samples = Vec::new();
    for generation in 1..=5 {
        std::thread::sleep(Duration::from_millis(300));
        let started = Instant::now();
        swap(&mount, generation);
        let expected = format!("Bearer value-{generation}");
        loop {
            if ask(proxy) == expected {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "never picked up"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        samples.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    let _app = Arc::new(app);
    samples[samples.len() / 2]
}

fn swap(mount: &Path, generation: usize) {
    std::fs::create_dir_all(mount).expect("mkdir");
    let data = format!("..gen{generation}");
    std::fs::create_dir(mount.join(&data)).expect("mkdir");
    std::fs::write(
        mount.join(&data).join("token"),
        format!("value-{generation}\n"),
    )
    .expect("write");
    let _ = std::fs::remove_file(mount.join("..data_tmp"));
    std::os::unix::fs::symlink(&data, mount.join("..data_tmp")).expect("symlink");
    std::fs::rename(mount.join("..data_tmp"), mount.join("..data")).expect("rename");
    if generation == 0 {
        std::os::unix::fs::symlink("..data/token", mount.join("token")).expect("symlink");
    }
}

fn ask(proxy: std::net::SocketAddr) -> String {
    let Ok(mut stream) = std::net::TcpStream::connect(proxy) else {
        return String::new();
    };
    let _ = stream.write_all(
        b"GET http://plain.test/ HTTP/1.1\r\nHost: plain.test\r\nConnection: close\r\n\r\n",
    );
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or("")
        .trim()
        .to_string()
}

fn echo_authorization(mut stream: std::net::TcpStream) {
    let mut request = Vec::new();
    let mut buffer = [0u8; 4096];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buffer[..n]),
        }
    }
    let text = String::from_utf8_lossy(&request);
    let auth = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("authorization: ")
                .or_else(|| l.strip_prefix("Authorization: "))
        })
        .unwrap_or("")
        .to_string();
    let _ = stream.write_all(
        format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{auth}",
            auth.len()
        )
        .as_bytes(),
    );
}
