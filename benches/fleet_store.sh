#!/usr/bin/env bash
# What a fleet asks of its store: N keystamp processes (1, 10 and 50 by default) join one real
# redis-server, each with a fleet-limited credential (`rate_limit: { scope: fleet }`), a
# store-watched credential is left out (its lease is one EVALSHA per second per credential, the
# same at rest and under load). For each N the store's own counters (INFO commandstats) are read
# over a window at rest and over a window with every pod serving agents at a modest rate, and
# printed per pod per second, by command. Redis counts each command inside MULTI/EXEC, so the
# figures are commands, not round trips.
#
#   benches/fleet_store.sh                 # 1, 10, 50 pods; 10 s windows; 20 req/s per pod
#   PODS="1 10" WINDOW=5 RATE=50 benches/fleet_store.sh
#
# Needs: redis-server, oha (cargo install oha --locked), python3.
set -euo pipefail
cd "$(dirname "$0")/.."
pod_counts=${PODS:-"1 10 50"}
window=${WINDOW:-10}
rate=${RATE:-20}
command -v oha >/dev/null || { echo "oha is missing: cargo install oha --locked" >&2; exit 1; }
command -v redis-server >/dev/null || { echo "redis-server is missing: apt-get install redis-server" >&2; exit 1; }
cargo build --release -q
work=$(mktemp -d)
pids=""
cleanup() { kill $pids 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
redis_port=18250
redis-server --port $redis_port --bind 127.0.0.1 --save '' --appendonly no >"$work/redis.log" 2>&1 &
pids="$pids $!"
# The API: a plain-HTTP server answering 200 to anything on localhost:18251 (keystamp's route is
# plain HTTP to `localhost`, a name oha can resolve, so the load is cheap and the store's work
# is what shows).
python3 - >"$work/upstream.log" 2>&1 <<'PY' &
import http.server, socketserver
class Answer(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall
    def do_GET(self):
        self.send_response(200); self.send_header("content-length", "2"); self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *args): pass
class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
Server(("127.0.0.1", 18251), Answer).serve_forever()
PY
pids="$pids $!"
for _ in $(seq 50); do redis-cli -p $redis_port ping >/dev/null 2>&1 && break; sleep 0.1; done
printf 'redis://127.0.0.1:%s/\n' $redis_port >"$work/redis-url"
printf 'bench-secret\n' >"$work/token"

# commands -> "name calls" lines from INFO commandstats
commands() {
  redis-cli -p $redis_port info commandstats | tr -d '\r' |
    sed -n 's/^cmdstat_\([a-z|]*\):calls=\([0-9]*\),.*/\1 \2/p'
}
# per_pod_second BEFORE AFTER PODS SECONDS -> "total  cmd=x cmd=y ..." per pod per second
per_pod_second() {
  python3 - "$1" "$2" "$3" "$4" <<'PY'
import sys
def load(path):
    return {k: int(v) for k, v in (line.split() for line in open(path) if line.strip())}
before, after = load(sys.argv[1]), load(sys.argv[2])
pods, seconds = int(sys.argv[3]), float(sys.argv[4])
ignore = {"info", "ping", "config|resetstat"}
delta = {k: after[k] - before.get(k, 0) for k in after if k not in ignore and after[k] != before.get(k, 0)}
total = sum(delta.values()) / pods / seconds
parts = " ".join(f"{k} {v / pods / seconds:.2f}" for k, v in sorted(delta.items(), key=lambda kv: -kv[1]))
print(f"{total:.2f} | {parts}")
PY
}

printf '| pods | at rest: store commands per pod per second | by command | under load (%s req/s per pod): per pod per second | by command | pods the store counted |\n|---|---|---|---|---|---|\n' "$rate"
for pods in $pod_counts; do
  redis-cli -p $redis_port flushall >/dev/null
  pod_pids=""
  for i in $(seq 0 $((pods - 1))); do
    port=$((18300 + 2 * i))
    cat >"$work/pod$i.yaml" <<YAML
listen: 127.0.0.1:$port
admin: 127.0.0.1:$((port + 1))
ca: { generate: true }
unmatched: deny
audit: { output: off }
egress: { allow_cidrs: [127.0.0.0/8, "::1/128"] }
fleet: { name: bench, store: { url: { file: ./redis-url } } }
credentials:
  shared:
    source: { file: ./token }
    rate_limit: { per_second: 100000, burst: 100000, scope: fleet }
routes:
  - { host: localhost, credential: shared, inject: { type: bearer }, tls_only: false }
YAML
    POD_NAME=bench-$i RUST_LOG=warn ./target/release/keystamp run --config "$work/pod$i.yaml" 2>"$work/pod$i.log" &
    pod_pids="$pod_pids $!"
  done
  for i in $(seq 0 $((pods - 1))); do
    for _ in $(seq 200); do curl -sf "http://127.0.0.1:$((18301 + 2 * i))/readyz" >/dev/null && break; sleep 0.05; done
  done
  # Every pod takes its first token and sees the others' heartbeats before the windows start.
  for i in $(seq 0 $((pods - 1))); do
    curl -s -x "http://127.0.0.1:$((18300 + 2 * i))" http://localhost:18251/ -o "$work/first.txt" -w "%{http_code}" | grep -q 200 || { echo "pod $i did not serve" >&2; exit 1; }
  done
  sleep 6
  commands >"$work/rest.before"; sleep "$window"; commands >"$work/rest.after"
  rest=$(per_pod_second "$work/rest.before" "$work/rest.after" "$pods" "$window")
  counted=$(curl -s "http://127.0.0.1:18301/metrics" | sed -n 's/^keystamp_fleet_pods \([0-9]*\)/\1/p')
  load_pids=""
  for i in $(seq 0 $((pods - 1))); do
    oha --no-tui -z "$((window + 2))s" -c 1 -q "$rate" -x "http://127.0.0.1:$((18300 + 2 * i))" \
      --output-format json http://localhost:18251/ >"$work/load-$i.json" 2>&1 &
    load_pids="$load_pids $!"
  done
  sleep 1
  commands >"$work/load.before"; sleep "$window"; commands >"$work/load.after"
  loaded=$(per_pod_second "$work/load.before" "$work/load.after" "$pods" "$window")
  wait $load_pids || true
  served=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1])).get(\"statusCodeDistribution\"))" "$work/load-0.json" 2>&1 || head -c 300 "$work/load-0.json")
  echo "pod 0 under load answered: $served" >&2
  kill $pod_pids 2>/dev/null || true
  wait $pod_pids 2>/dev/null || true
  printf '| %s | %s | %s | %s |\n' "$pods" "$rest" "$loaded" "$counted"
done
echo
echo "Commands per pod per second at rest are what 500 pods would ask of one store: multiply by 500."
rig=${PEERS_DIR:-${TMPDIR:-/tmp}/keystamp-peers}
gauge="load average $(cut -d' ' -f1-3 /proc/loadavg)"
if [ -f "$rig/ca.crt" ]; then
  rps=$(oha --no-tui --output-format json -z 3s -c 16 --cacert "$rig/ca.crt" https://upstream.test:18443/ 2>/dev/null |
    python3 -c "import json,sys; d=json.load(sys.stdin); print(format(d['summary']['requestsPerSec'], ',.0f'))" 2>/dev/null || true)
  if [ -n "$rps" ]; then gauge="direct to nginx $rps req/s at 16 keep-alive connections; $gauge"; fi
fi
echo "the day's noise: $gauge"
