#!/usr/bin/env bash
# What the transparent path costs against the CONNECT path, in one run (root only: it makes two
# network namespaces and installs keystamp's netfilter rules in one of them, never on the host).
# The same agent (Python's http.client, uid 1600) sends the same small HTTPS request to a routed
# host once through HTTPS_PROXY (CONNECT) and once straight at the host (redirected by
# netfilter), keep-alive on one connection and with a new connection per request. Prints
# keystamp's CPU per request (utime+stime of its process over the run) and the client's p50
# for each, and their ratio: this machine is shared and noisy, so compare within the run.
#
#   sudo benches/transparent.sh            # 3000 keep-alive requests, 400 new connections
#   REQUESTS=10000 CONNECTIONS=1000 benches/transparent.sh
set -euo pipefail
cd "$(dirname "$0")/.."
requests=${REQUESTS:-3000}
connections=${CONNECTIONS:-400}
[ "$(id -u)" = 0 ] || { echo "run as root (network namespaces, netfilter)" >&2; exit 1; }
cargo build --release -q
work=$(mktemp -d)
chmod 777 "$work"
id=$$
agent=ksb-a$id; up=ksb-u$id; va=ksbva$id; vu=ksbvu$id
cleanup() {
  kill "${ks_pid:-}" "${up_pid:-}" 2>/dev/null || true
  ip netns del "$agent" 2>/dev/null || true
  ip netns del "$up" 2>/dev/null || true
  rm -rf "/etc/netns/$agent" "$work"
}
trap cleanup EXIT
ip netns add "$agent"; ip netns add "$up"
ip link add "$va" type veth peer name "$vu"
ip link set "$va" netns "$agent"; ip link set "$vu" netns "$up"
ip -n "$agent" addr add 10.232.0.1/24 dev "$va"; ip -n "$up" addr add 10.232.0.2/24 dev "$vu"
for ns in "$agent" "$up"; do ip -n "$ns" link set lo up; done
ip -n "$agent" link set "$va" up; ip -n "$up" link set "$vu" up
mkdir -p "/etc/netns/$agent"
printf '127.0.0.1 localhost\n10.232.0.2 api.example.test\n' >"/etc/netns/$agent/hosts"

# The upstream: a CA, a leaf for api.example.test, a keep-alive HTTPS server in its namespace.
openssl req -x509 -newkey rsa:2048 -nodes -keyout "$work/ca.key" -out "$work/ca.pem" -days 1 \
  -subj /CN=bench-ca 2>/dev/null
openssl req -newkey rsa:2048 -nodes -keyout "$work/leaf.key" -out "$work/leaf.csr" \
  -subj /CN=api.example.test 2>/dev/null
printf 'subjectAltName=DNS:api.example.test\n' >"$work/san"
openssl x509 -req -in "$work/leaf.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" \
  -CAcreateserial -out "$work/leaf.pem" -days 1 -extfile "$work/san" 2>/dev/null
ip netns exec "$up" /usr/bin/python3 - "$work" <<'PY' &
import http.server, ssl, sys
work = sys.argv[1]
class Echo(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else head and body wait on a delayed ACK (40 ms)
    def do_GET(self):
        body = ("auth=" + self.headers.get("Authorization", "")).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args): pass
server = http.server.ThreadingHTTPServer(("10.232.0.2", 443), Echo)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(f"{work}/leaf.pem", f"{work}/leaf.key")
server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
PY
up_pid=$!

printf 'bench-secret\n' >"$work/token"
cat >"$work/keystamp.yaml" <<YAML
listen: 127.0.0.1:18160
admin: 127.0.0.1:18161
ca: { generate: true, cert_out: ./run/ca.crt }
unmatched: deny
audit: { output: off }
egress: { allow_cidrs: [10.232.0.0/24] }
upstream_tls: { extra_roots: [$work/ca.pem] }
resolve: { "api.example.test:443": "10.232.0.2:443" }
transparent: { listen: "127.0.0.1:15001", uid: 1500, lockdown: true }
credentials:
  bench: { source: { file: ./token } }
routes:
  - { host: api.example.test, credential: bench, inject: { type: bearer } }
YAML
ip netns exec "$agent" ./target/release/keystamp netfilter apply --config "$work/keystamp.yaml" >/dev/null
RUST_LOG=warn ip netns exec "$agent" setpriv --reuid 1500 --regid 1500 --clear-groups \
  ./target/release/keystamp run --config "$work/keystamp.yaml" 2>"$work/keystamp.log" &
ks_pid=$!
for _ in $(seq 100); do [ -f "$work/run/ca.crt" ] && break; sleep 0.1; done
sleep 0.5

clk_tck=$(getconf CLK_TCK)
ticks() { sed 's/.*) //' "/proc/$ks_pid/stat" | awk '{print $12 + $13}'; }
# run MODE VIA COUNT -> "p50_ms cpu_us_per_request"
run() {
  local before after out
  before=$(ticks)
  out=$(ip netns exec "$agent" setpriv --reuid 1600 --regid 1600 --clear-groups /usr/bin/python3 - \
    "$1" "$2" "$3" "$work/run/ca.crt" <<'PY'
import http.client, ssl, statistics, sys, time
mode, via, count, ca = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
context = ssl.create_default_context(cafile=ca)
def connect():
    if via == "proxy":
        c = http.client.HTTPSConnection("127.0.0.1", 18160, context=context)
        c.set_tunnel("api.example.test", 443)
    else:
        c = http.client.HTTPSConnection("api.example.test", 443, context=context)
    return c
times, c = [], connect()
for _ in range(count):
    if mode == "new":
        c.close(); c = connect()
    t = time.perf_counter()
    c.request("GET", "/x"); r = c.getresponse(); body = r.read()
    times.append(time.perf_counter() - t)
    assert body == b"auth=Bearer bench-secret", body
print(f"{statistics.median(times) * 1000:.3f}")
PY
)
  after=$(ticks)
  python3 -c "print('$out', round(($after - $before) / $clk_tck * 1e6 / $3))"
}
# Interleaved, so both paths see the same machine.
ka_proxy=$(run keepalive proxy "$requests"); ka_transparent=$(run keepalive transparent "$requests")
new_proxy=$(run new proxy "$connections"); new_transparent=$(run new transparent "$connections")
ratio() { python3 -c "print(f'{$1/$2:.2f}')"; }
printf '\n| case | CONNECT (HTTPS_PROXY) | transparent | transparent / CONNECT |\n|---|---|---|---|\n'
for case in ka new; do
  p=${case}_proxy; t=${case}_transparent
  read -r p50p cpup <<<"${!p}"; read -r p50t cput <<<"${!t}"
  label=$([ $case = ka ] && echo "keep-alive, 1 conn ($requests req)" || echo "new connection per request ($connections)")
  printf '| %s: client p50 ms | %s | %s | %s× |\n' "$label" "$p50p" "$p50t" "$(ratio "$p50t" "$p50p")"
  printf '| %s: keystamp CPU µs/request | %s | %s | %s× |\n' "$label" "$cpup" "$cput" "$(ratio "$cput" "$cpup")"
done
