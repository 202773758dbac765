#!/usr/bin/env python3
"""How keystamp's cost grows with credentials and live task tokens, on the release binary.

  python3 benches/scale.py                 # both parts
  PART=credentials python3 benches/scale.py
  PART=sts python3 benches/scale.py        # 1,000 per-caller AWS sessions only
  KS_BASELINE=/path/to/older/keystamp python3 benches/scale.py   # the same runs on an older build

credentials: 10,000 file credentials, each with a route. Start-up (process start to /readyz,
median of 3), RSS at ready, /metrics size, lines and render time (median of 5 scrapes), with
`metrics.zero_series` on (the default) and off.

tasks: a per-task GitHub credential (`mint: per_task`) against a local fake GitHub that mints a
token per POST (no JWT check: the bench prices keystamp, not the fake). 1,000 tasks each make
their first request, then keystamp's CPU per request is compared with a task id (cycling over the
1,000 live tokens) and without one (the shared token), its RSS before and after, and its CPU per
second at rest with 1,000 live tokens (the reloader's refresh and idle sweeps) against at rest
with none.

sts (part of tasks; PART=sts alone): the same for 1,000 per-caller AWS sessions
(`session_name: ks-{task}`) minted by a real moto STS behind TLS (STS_TASKS= for another count),
the role's `max_tasks`, `max_tasks_per_agent` and `mint_rate` raised to hold them all.

Figures are printed as a markdown table; this machine is shared, so compare within the run.
"""

import http.client
import http.server
import json
import os
import re
import shutil
import signal
import socketserver
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY = os.path.join(ROOT, "target", "release", "keystamp")
# Requests per CPU-per-request measurement.
REQUESTS = int(os.environ.get("REQUESTS", "5000"))


def cpu_seconds(pid):
    """CPU time of every live thread of `pid`, to the nanosecond (schedstat), not in clock ticks:
    an idle process spends less than one tick a second."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as stat:
                total += int(stat.read().split()[0])
        except OSError:
            pass  # a thread that just exited
    return total / 1e9


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def get(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def wait_ready(admin, process, deadline=60):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if process.poll() is not None:
            raise SystemExit(f"keystamp exited: {process.returncode}")
        try:
            get(f"http://{admin}/readyz", timeout=1)
            return
        except OSError:
            time.sleep(0.002)
    raise SystemExit("keystamp never became ready")


def start(binary, config, cwd, log):
    return subprocess.Popen(
        [binary, "run", "--config", config],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=log,
        env={**os.environ, "RUST_LOG": "warn"},
    )


def stop(process):
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


def credentials_part(binaries, work):
    count = 10_000
    os.makedirs(os.path.join(work, "secrets"), exist_ok=True)
    lines = [
        "listen: 127.0.0.1:18240",
        "admin: 127.0.0.1:18241",
        "ca: { generate: true }",
        "audit: { output: off }",
        "credentials:",
    ]
    for i in range(count):
        with open(os.path.join(work, "secrets", f"c{i}"), "w") as secret:
            secret.write(f"secret-{i}\n")
        lines.append(f"  c{i}: {{ source: {{ file: ./secrets/c{i} }} }}")
    lines.append("routes:")
    for i in range(count):
        lines.append(f"  - {{ host: api{i}.example.test, credential: c{i}, inject: {{ type: bearer }} }}")
    body = "\n".join(lines) + "\n"
    rows = []
    for label, binary in binaries:
        for zeros in (True, False):
            if label != "keystamp" and not zeros:
                continue  # an older build may not know metrics.zero_series
            config = os.path.join(work, f"k-{zeros}.yaml")
            with open(config, "w") as out:
                out.write(body if zeros else body.replace("audit: { output: off }\n", "audit: { output: off }\nmetrics: { zero_series: false }\n"))
            ready, rss, sizes, scrape = [], [], [], []
            for _ in range(3):
                with open(os.path.join(work, "keystamp.log"), "ab") as log:
                    started = time.monotonic()
                    process = start(binary, config, work, log)
                    wait_ready("127.0.0.1:18241", process)
                    ready.append(time.monotonic() - started)
                    rss.append(rss_mib(process.pid))
                    for _ in range(5):
                        begun = time.monotonic()
                        text = get("http://127.0.0.1:18241/metrics")
                        scrape.append(time.monotonic() - begun)
                        sizes.append((len(text), text.count(b"\n")))
                    stop(process)
            rows.append(
                (
                    f"{label}, zero_series: {'true' if zeros else 'false'}",
                    f"{statistics.median(ready) * 1000:.0f} ms ({min(ready) * 1000:.0f}–{max(ready) * 1000:.0f})",
                    f"{statistics.median(rss):.1f} MiB",
                    f"{sizes[-1][0] / 1e6:.2f} MB, {sizes[-1][1]:,} lines",
                    f"{statistics.median(scrape) * 1000:.1f} ms",
                )
            )
    print(f"\n{count:,} file credentials and routes\n")
    print("| build | start-up to ready, median of 3 (range) | RSS at ready | /metrics | scrape, median of 15 |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


class FakeGithub(http.server.BaseHTTPRequestHandler):
    """Mints a token per POST, revokes on DELETE, answers 200 to any API call."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall
    minted = 0
    lock = threading.Lock()

    def answer(self, status, body):
        data = json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        length = int(self.headers.get("content-length") or 0)
        self.rfile.read(length)
        with FakeGithub.lock:
            FakeGithub.minted += 1
            number = FakeGithub.minted
        expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
        self.answer(201, {"token": f"ghs_bench{number:06d}", "expires_at": expires, "permissions": {"contents": "read"}})

    def do_DELETE(self):
        self.answer(204, None)

    def do_GET(self):
        self.answer(200, {"ok": True})

    def log_message(self, *args):
        pass


class ThreadingServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


def requests_through(proxy_port, host, count, task_for):
    """Sends `count` keep-alive GETs through keystamp's plain-HTTP route to `host`; `task_for(i)`
    names the task of request i (None: no task header). Returns the statuses seen."""
    connection = http.client.HTTPConnection("127.0.0.1", proxy_port, timeout=30)
    statuses = {}
    for i in range(count):
        headers = {"Host": host}
        task = task_for(i)
        if task is not None:
            headers["Keystamp-Task"] = task
        connection.request("GET", f"http://{host}/bench/object", headers=headers)
        response = connection.getresponse()
        response.read()
        statuses[response.status] = statuses.get(response.status, 0) + 1
    connection.close()
    return statuses


def first_requests(proxy_port, host, tasks):
    """Each task's first request, one after another; a 429 `mint_limited` (AWS sessions are minted
    at most 2 a second, burst 10) is retried after its Retry-After. Returns the 429s waited out."""
    connection = http.client.HTTPConnection("127.0.0.1", proxy_port, timeout=30)
    waited = 0
    for i in range(tasks):
        for _ in range(60):
            connection.request("GET", f"http://{host}/bench/object", headers={"Host": host, "Keystamp-Task": f"task-{i}"})
            response = connection.getresponse()
            response.read()
            if response.status == 200:
                break
            assert response.status == 429, response.status
            waited += 1
            time.sleep(float(response.getheader("retry-after") or 1))
        else:
            raise SystemExit(f"task {i}: still 429 after 60 waits (a cap, not the mint rate)")
    connection.close()
    return waited


def measure_tasks(binary, work, title, config_body, host, tasks, mints):
    """Starts keystamp on `config_body`, then: CPU at rest, `tasks` first requests (each mints),
    CPU per request with and without a task id, CPU at rest again; prints the table."""
    config = os.path.join(work, "tasks.yaml")
    with open(config, "w") as out:
        out.write(config_body)
    with open(os.path.join(work, "tasks.log"), "ab") as log:
        process = start(binary, config, work, log)
        try:
            wait_ready("127.0.0.1:18243", process)
            warm = requests_through(18242, host, 200, lambda i: None)
            assert warm == {200: 200}, warm
            time.sleep(1)
            rest = 10
            idle_before = cpu_seconds(process.pid)
            time.sleep(rest)
            idle_none = (cpu_seconds(process.pid) - idle_before) / rest
            rss_none = rss_mib(process.pid)
            minted_before = mints()
            begun = time.monotonic()
            waited = first_requests(18242, host, tasks)
            first_seconds = time.monotonic() - begun
            minted = mints() - minted_before
            rss_tasks = rss_mib(process.pid)
            per = {}
            for label, task_for in (("no task id", lambda i: None), (f"a task id, over {tasks:,} live", lambda i: f"task-{(i * 7) % tasks}")):
                for _ in range(2):  # the second round is the one kept: caches warm
                    before = cpu_seconds(process.pid)
                    seen = requests_through(18242, host, REQUESTS, task_for)
                    assert seen == {200: REQUESTS}, seen
                    per[label] = (cpu_seconds(process.pid) - before) / REQUESTS * 1e6
            time.sleep(1)
            idle_before = cpu_seconds(process.pid)
            time.sleep(rest)
            idle_tasks = (cpu_seconds(process.pid) - idle_before) / rest
            status = get("http://127.0.0.1:18243/status")
        finally:
            stop(process)
    print(f"\n{title}\n")
    print("| measurement | figure |\n|---|---|")
    mint_note = f"{minted:,} mints" if minted else "each a session"
    print(f"| first request of {tasks:,} tasks, one after another (each mints) | {first_seconds:.2f} s, {mint_note}, {waited} waits on the mint rate |")
    print(f"| RSS: before the tasks / with {tasks:,} live | {rss_none:.1f} / {rss_tasks:.1f} MiB ({(rss_tasks - rss_none) * 1024 / tasks:.2f} KiB per task) |")
    for label, micros in per.items():
        print(f"| keystamp CPU per request, {label} | {micros:.0f} µs |")
    print(f"| keystamp CPU at rest: before the tasks / with {tasks:,} live | {idle_none * 1000:.3f} / {idle_tasks * 1000:.3f} ms per second |")
    live = sum(int(n) for n in re.findall(rb'"live_task_tokens":(\d+)', status))
    print(f"| live task tokens /status reports at the end | {live:,} |")


def github_part(binary, work):
    tasks = 1000
    server = ThreadingServer(("127.0.0.1", 0), FakeGithub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    key = os.path.join(work, "app.pem")
    subprocess.run(["openssl", "genrsa", "-traditional", "-out", key, "2048"], check=True, capture_output=True)
    body = f"""listen: 127.0.0.1:18242
admin: 127.0.0.1:18243
ca: {{ generate: true }}
audit: {{ output: off }}
egress: {{ allow_cidrs: [127.0.0.0/8] }}
resolve: {{ 'api.github.test:80': 127.0.0.1:{port} }}
credentials:
  gh:
    source:
      github_app:
        app_id: 1
        installation_id: 1
        private_key: {{ file: ./app.pem }}
        api_url: http://127.0.0.1:{port}
        permissions: {{ contents: read }}
        mint: per_task
        task_idle: 10m
        max_tasks: {tasks * 2}
        max_tasks_per_agent: {tasks * 2}
        mint_rate: {{ per_second: 10000, burst: 10000 }}
routes:
  - {{ host: api.github.test, credential: gh, inject: {{ type: bearer }}, tls_only: false }}
"""
    try:
        title = f"{tasks:,} per-task GitHub tokens (fake GitHub on loopback, plain-HTTP route)"
        measure_tasks(binary, work, title, body, "api.github.test", tasks, lambda: FakeGithub.minted)
    finally:
        server.shutdown()


def sts_part(binary, work):
    """Per-caller STS sessions (`session_name: ks-{task}`) minted by a real moto server behind TLS."""
    moto = os.environ.get("MOTO_SERVER") or os.path.join(ROOT, "target", "client-deps", "venv", "bin", "moto_server")
    if not os.path.exists(moto):
        print("\nSTS sessions: skipped (no moto_server; ./scripts/test installs it, or set MOTO_SERVER)")
        return
    for args in (
        ["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "sts-ca.key", "-out", "sts-ca.crt", "-days", "2", "-subj", "/CN=bench-sts-ca"],
        ["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "sts.key", "-out", "sts.csr", "-subj", "/CN=sts.bench.test"],
    ):
        subprocess.run(["openssl", *args], cwd=work, check=True, capture_output=True)
    with open(os.path.join(work, "sts.ext"), "w") as ext:
        ext.write("subjectAltName=DNS:sts.bench.test\n")
    subprocess.run(["openssl", "x509", "-req", "-in", "sts.csr", "-CA", "sts-ca.crt", "-CAkey", "sts-ca.key", "-CAcreateserial", "-out", "sts.crt", "-days", "2", "-extfile", "sts.ext"], cwd=work, check=True, capture_output=True)
    moto_port = 18244
    sts = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(moto_port), "-c", "sts.crt", "-k", "sts.key"], cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = ThreadingServer(("127.0.0.1", 0), FakeGithub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    for name, value in (("aws-id", "AKIABENCHBENCHBENCH0\n"), ("aws-secret", "benchbenchbenchbenchbenchbenchbenchbench\n")):
        with open(os.path.join(work, name), "w") as out:
            out.write(value)
    # The role's own keys raise the per-caller caps (defaults: 32 per agent, 256 per credential,
    # minted at most 2 a second) so that every task's session stays live.
    tasks = int(os.environ.get("STS_TASKS", "1000"))
    body = f"""listen: 127.0.0.1:18242
admin: 127.0.0.1:18243
ca: {{ generate: true }}
audit: {{ output: off }}
egress: {{ allow_cidrs: [127.0.0.0/8] }}
upstream_tls: {{ extra_roots: [./sts-ca.crt] }}
resolve:
  'data.bench.test:80': 127.0.0.1:{port}
  'sts.bench.test:{moto_port}': 127.0.0.1:{moto_port}
credentials:
  data:
    source:
      aws:
        access_key_id: {{ file: ./aws-id }}
        secret_access_key: {{ file: ./aws-secret }}
        assume_role:
          role_arn: "arn:aws:iam::123456789012:role/agents"
          session_name: "ks-{{task}}"
          duration: 1h
          max_tasks: {tasks * 2}
          max_tasks_per_agent: {tasks * 2}
          mint_rate: {{ per_second: 10000, burst: 10000 }}
        sts_endpoint: https://sts.bench.test:{moto_port}/
routes:
  - {{ host: data.bench.test, credential: data, inject: {{ type: aws_sigv4, service: s3, region: us-east-1 }}, tls_only: false }}
"""
    try:
        for _ in range(100):
            try:
                socketserver.socket.create_connection(("127.0.0.1", moto_port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        title = f"{tasks:,} per-caller STS sessions of one agent (a real moto server behind TLS, plain-HTTP SigV4 route)"
        measure_tasks(binary, work, title, body, "data.bench.test", tasks, lambda: 0)
    finally:
        server.shutdown()
        sts.terminate()
        sts.wait(timeout=10)


def noise_gauge():
    """The day's noise: direct-to-nginx req/s (16 keep-alive connections, 3 s) when the peer rig's
    nginx is up (../shared/peers/up.sh), and the load average either way."""
    with open("/proc/loadavg") as loadavg:
        load = " ".join(loadavg.read().split()[:3])
    rig = os.environ.get("PEERS_DIR", os.path.join(tempfile.gettempdir(), "keystamp-peers"))
    ca = os.path.join(rig, "ca.crt")
    if shutil.which("oha") and os.path.exists(ca):
        run = subprocess.run(
            ["oha", "--no-tui", "--output-format", "json", "-z", "3s", "-c", "16", "--cacert", ca, "https://upstream.test:18443/"],
            capture_output=True,
            text=True,
        )
        try:
            rps = json.loads(run.stdout)["summary"]["requestsPerSec"]
            return f"direct to nginx {rps:,.0f} req/s at 16 keep-alive connections; load average {load}"
        except (ValueError, KeyError, TypeError):
            pass
    return f"load average {load} (start ../shared/peers/up.sh for the direct-to-nginx gauge)"


def main():
    part = os.environ.get("PART", "all")
    subprocess.run(["cargo", "build", "--release", "-q"], cwd=ROOT, check=True)
    binaries = [("keystamp", BINARY)]
    if os.environ.get("KS_BASELINE"):
        binaries.append(("baseline", os.environ["KS_BASELINE"]))
    print(f"the day's noise: {noise_gauge()}")
    work = tempfile.mkdtemp(prefix="keystamp-scale-")
    try:
        if part in ("all", "credentials"):
            credentials_part(binaries, work)
        if part in ("all", "tasks"):
            github_part(BINARY, work)
        if part in ("all", "tasks", "sts"):
            sts_part(BINARY, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
