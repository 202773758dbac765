//! The container image's runtime, proven without a container engine: the root filesystem is
//! assembled the way `docker/Dockerfile` lays it out (the stripped binary, exactly the shared
//! libraries `ldd` names, a CA bundle, the image's default config) and keystamp runs in it as
//! uid 65532 on a read-only root, with only `/var/run/keystamp` writable, through a mount
//! namespace and `chroot` (no shell inside). Needs root (tests and CI run as root here).

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
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

/// What distroless `cc` (Debian 12) provides: glibc and libgcc_s. A library outside this list
/// would be missing in the image.
const DISTROLESS_CC: &[&str] = &[
    "libc.so.6",
    "libm.so.6",
    "libgcc_s.so.1",
    "libdl.so.2",
    "libpthread.so.0",
    "librt.so.1",
    "ld-linux-x86-64.so.2",
    "ld-linux-aarch64.so.1",
];

const NONROOT: &str = "65532";

/// The image's root filesystem in a temporary directory, and the one writable directory.
struct RootFs {
    _dir: tempfile::TempDir,
    root: PathBuf,
    writable: PathBuf,
}

fn assemble() -> RootFs {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let binary = root.join("usr/local/bin/keystamp");
    std::fs::create_dir_all(binary.parent().unwrap()).unwrap();
    // Stripped as the Dockerfile strips it.
    let stripped = Command::new("objcopy")
        .args(["--strip-all", env!("CARGO_BIN_EXE_keystamp")])
        .arg(&binary)
        .status()
        .unwrap();
    assert!(stripped.success());
    let ldd = Command::new("ldd").arg(&binary).output().unwrap();
    let libraries: Vec<PathBuf> = String::from_utf8_lossy(&ldd.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().find(|part| part.starts_with('/')))
        .map(PathBuf::from)
        .collect();
    assert!(!libraries.is_empty(), "ldd named nothing: {ldd:?}");
    for library in &libraries {
        let name = library.file_name().unwrap().to_string_lossy().to_string();
        assert!(
            DISTROLESS_CC.contains(&name.as_str()),
            "keystamp links {name}, which distroless cc does not have"
        );
        let target = root.join(library.strip_prefix("/").unwrap());
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::copy(library, &target).unwrap();
    }
    for (path, text) in [
        (
            "etc/passwd",
            "root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n",
        ),
        ("etc/group", "root:x:0:\nnonroot:x:65532:\n"),
    ] {
        std::fs::create_dir_all(root.join(path).parent().unwrap()).unwrap();
        std::fs::write(root.join(path), text).unwrap();
    }
    std::fs::create_dir_all(root.join("etc/ssl/certs")).unwrap();
    std::fs::copy(
        "/etc/ssl/certs/ca-certificates.crt",
        root.join("etc/ssl/certs/ca-certificates.crt"),
    )
    .unwrap();
    std::fs::create_dir_all(root.join("etc/keystamp")).unwrap();
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("docker/keystamp.yaml"),
        root.join("etc/keystamp/keystamp.yaml"),
    )
    .unwrap();
    for mountpoint in ["var/run/keystamp", "proc", "dev", "tmp"] {
        std::fs::create_dir_all(root.join(mountpoint)).unwrap();
    }
    let writable = dir.path().join("run");
    std::fs::create_dir_all(&writable).unwrap();
    std::fs::set_permissions(&writable, std::fs::Permissions::from_mode(0o777)).unwrap();
    RootFs {
        _dir: dir,
        root,
        writable,
    }
}

/// keystamp started in `rootfs` as the image starts it: its own entrypoint and arguments, uid
/// 65532, the root read-only; `config_dir` (if any) mounted over /etc/keystamp as a ConfigMap is.
fn run_in(rootfs: &RootFs, config_dir: Option<&Path>, log: &Path) -> Child {
    let root = rootfs.root.display();
    let mut script = format!(
        "set -e\n\
         mount --make-rprivate /\n\
         mount --bind {root} {root}\n\
         mount -o remount,bind,ro {root}\n\
         mount --bind {writable} {root}/var/run/keystamp\n\
         mount --rbind /dev {root}/dev\n\
         mount -t proc proc {root}/proc\n",
        writable = rootfs.writable.display(),
    );
    if let Some(config_dir) = config_dir {
        script.push_str(&format!(
            "mount --bind {} {root}/etc/keystamp\n",
            config_dir.display()
        ));
    }
    script.push_str(&format!(
        "exec chroot --userspec={NONROOT}:{NONROOT} {root} /usr/local/bin/keystamp \
         --log-format json run --config /etc/keystamp/keystamp.yaml\n"
    ));
    Command::new("unshare")
        .args(["--mount", "sh", "-c", &script])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

fn wait_ready(admin: &str, log: &Path) {
    let started = std::time::Instant::now();
    loop {
        let ready = Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &format!("http://{admin}/readyz"),
            ])
            .output()
            .is_ok_and(|o| o.stdout == b"200");
        if ready {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "keystamp never became ready in the image's root: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn terminate(child: &mut Child) -> std::process::ExitStatus {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    for _ in 0..300 {
        if let Ok(Some(status)) = child.try_wait() {
            return status;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    panic!("keystamp did not exit on SIGTERM");
}

fn assert_root() {
    let root = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"));
    assert!(
        root,
        "the image test makes mount namespaces and chroots: run it as root"
    );
}

#[test]
fn the_images_default_config_runs_as_nonroot_on_a_read_only_root() {
    assert_root();
    let rootfs = assemble();
    let log = rootfs.writable.parent().unwrap().join("default.log");
    let mut keystamp = run_in(&rootfs, None, &log);
    // The image's own config: admin on 0.0.0.0:9901, the CA under /var/run/keystamp.
    wait_ready("127.0.0.1:9901", &log);
    let ca = std::fs::read_to_string(rootfs.writable.join("ca.crt")).unwrap();
    assert!(ca.contains("BEGIN CERTIFICATE"));
    assert!(rootfs.writable.join("ca-bundle.crt").exists());
    let status = terminate(&mut keystamp);
    assert!(
        status.success(),
        "exit on SIGTERM: {status:?} {}",
        std::fs::read_to_string(&log).unwrap()
    );
    // Nothing was written anywhere else: the root is read-only.
    assert!(!rootfs.root.join("etc/keystamp/run").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mounted_config_stamps_requests_and_an_unwritable_path_is_named() {
    assert_root();
    let rootfs = assemble();
    let (upstream, ca, _ca_dir) = tls_upstream().await;
    // A ConfigMap-like directory mounted over /etc/keystamp: the upstream's CA inside it.
    let config_dir = rootfs.writable.parent().unwrap().join("configmap");
    std::fs::create_dir_all(&config_dir).unwrap();
    std::fs::copy(&ca, config_dir.join("upstream-ca.pem")).unwrap();
    std::fs::write(config_dir.join("token"), "image-secret-1").unwrap();
    let (proxy_port, admin_port) = (free_port(), free_port());
    let mut config = TestConfig::new();
    config
        .trust(Path::new("/etc/keystamp/upstream-ca.pem"))
        .pin("api.example.test:443", upstream.addr)
        .credential(
            "key",
            serde_json::json!({ "source": { "file": "/etc/keystamp/token" } }),
        )
        .bearer_route("api.example.test", "key", serde_json::json!({}));
    let header = format!(
        "listen: 127.0.0.1:{proxy_port}\nadmin: 127.0.0.1:{admin_port}\n\
         ca: {{ generate: true, cert_out: /var/run/keystamp/ca.crt }}\n\
         egress: {{ allow_cidrs: [127.0.0.0/8] }}\n"
    );
    std::fs::write(config_dir.join("keystamp.yaml"), header + &config.yaml()).unwrap();
    let log = rootfs.writable.parent().unwrap().join("mounted.log");
    let mut keystamp = run_in(&rootfs, Some(&config_dir), &log);
    wait_ready(&format!("127.0.0.1:{admin_port}"), &log);
    let ca_pem = std::fs::read_to_string(rootfs.writable.join("ca.crt")).unwrap();
    let client = reqwest::Client::builder()
        .proxy(reqwest::Proxy::all(format!("http://127.0.0.1:{proxy_port}")).unwrap())
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap())
        .tls_built_in_root_certs(false)
        .build()
        .unwrap();
    let echo: serde_json::Value = client
        .get("https://api.example.test/who")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(echo["headers"]["authorization"][0], "Bearer image-secret-1");
    assert!(terminate(&mut keystamp).success());

    // A config that writes outside /var/run/keystamp: start-up fails and says what to mount.
    let unwritable = std::fs::read_to_string(config_dir.join("keystamp.yaml"))
        .unwrap()
        .replace("/var/run/keystamp/ca.crt", "/etc/keystamp/run/ca.crt");
    std::fs::write(config_dir.join("keystamp.yaml"), unwritable).unwrap();
    let log = rootfs.writable.parent().unwrap().join("unwritable.log");
    let mut failing = run_in(&rootfs, Some(&config_dir), &log);
    let status = failing.wait().unwrap();
    assert!(!status.success());
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(
        said.contains("/etc/keystamp/run/ca.crt")
            && said.contains("must be writable")
            && said.contains("mount a volume"),
        "{said}"
    );
    assert!(!said.contains("image-secret-1"));
}
