#!/usr/bin/env bash
# End-to-end overhead bench: the same small HTTPS request direct, through keystamp, through the
# C reverse proxies a platform team would otherwise configure to add a header (nginx, HAProxy),
# and through the peer MITM proxies (hudsucker-peer, Squid ssl-bump, mitmproxy) in one run,
# driven by oha.
# Prints a markdown table with ratios against the direct connection (this machine is shared and
# noisy: absolute numbers drift, ratios in one run hold), and the CPU time each proxy's process
# tree spent per request (/proc utime + stime; for direct, nginx's own), the figure compared
# against peers because it drifts far less than req/s. The `relay` column is a plain TCP relay
# (benches/tcp_relay.rs: one thread, bytes copied, no TLS, no HTTP) in front of the upstream:
# what the extra hop alone costs here, the floor under any proxy's latency and CPU.
# nginx and HAProxy (one worker / one thread, like keystamp's default) do exactly what keystamp
# does for a routed host: terminate the agent's TLS with an ECDSA P-256 certificate for the API
# name, drop the agent's Authorization, set the credential's, and forward over verified TLS on
# pooled keep-alive upstream connections; they log nothing, so compare them with keystamp-quiet
# (audit and per-request metrics off) as well as with keystamp. Agents reach them as a reverse
# proxy (oha --connect-to, like curl --resolve) rather than through CONNECT: with keep-alive the
# CONNECT is paid once per connection; in the new-connection case it is one more round trip.
#
#   benches/e2e.sh            # all cases, 8 s each
#   SECONDS_PER_CASE=4 PEERS="hudsucker squid" benches/e2e.sh
#   KS_BASELINE=/path/to/older/keystamp benches/e2e.sh   # also an older build, same config, same run
#   FLEET=1 benches/e2e.sh    # also keystamp with fleet: on (starts redis-server on 127.0.0.1:18150)
#   ROUNDS=3 benches/e2e.sh   # every case three times, interleaved; medians reported
#   HOLD=1 benches/e2e.sh     # start everything and wait: profile one proxy by hand
#
# Needs: oha (cargo install oha --locked), the peer rig (../shared/peers/up.sh, started here).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${SECONDS_PER_CASE:-8}
peers=${PEERS:-"hudsucker squid mitm"}
anchors=${ANCHORS:-"nginx haproxy"}
peers_dir=${PEERS_RIG:-../shared/peers}
peers_rig_dir=${PEERS_DIR:-${TMPDIR:-/tmp}/keystamp-peers}   # where up.sh keeps its state
command -v oha >/dev/null || { echo "oha is missing: cargo install oha --locked" >&2; exit 1; }
command -v haproxy >/dev/null || { echo "haproxy is missing: apt-get install haproxy" >&2; exit 1; }

eval "$("$peers_dir/up.sh" | grep -E '^[A-Z_]+=')"
cargo build --release -q
relay_binary=$(cargo bench --bench tcp_relay --no-run 2>&1 | sed -n 's/.*Executable .*(\(.*\)).*/\1/p')
[ -x "$relay_binary" ] || { echo "could not build benches/tcp_relay.rs" >&2; exit 1; }
work=$(mktemp -d)
extra_pids=""
trap 'kill $ks_pid $quiet_pid $relay_pid $extra_pids 2>/dev/null || true; [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")"; rm -rf "$work"' EXIT
# The C anchors: a certificate for the API name from a CA of their own, then nginx on :18160 and
# HAProxy on :18161, both configured to stamp the credential the way keystamp's route does.
start_anchors() {
  local port=$1
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$work/anchor-ca.key" \
    -out "$work/anchor-ca.crt" -days 2 -subj /CN=bench-anchor-ca 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$work/anchor.key" \
    -out "$work/anchor.csr" -subj /CN=upstream.test 2>/dev/null
  printf 'subjectAltName=DNS:upstream.test\n' >"$work/anchor.ext"
  openssl x509 -req -in "$work/anchor.csr" -CA "$work/anchor-ca.crt" -CAkey "$work/anchor-ca.key" \
    -CAcreateserial -out "$work/anchor.crt" -days 2 -extfile "$work/anchor.ext" 2>/dev/null
  cat "$work/anchor.crt" "$work/anchor.key" >"$work/anchor.pem"
  cat >"$work/nginx.conf" <<CONF
worker_processes 1;
pid $work/nginx.pid;
error_log $work/nginx.err warn;
events { worker_connections 8192; }
http {
  access_log off;
  upstream api { server 127.0.0.1:$port; keepalive 64; keepalive_requests 10000000; }
  server {
    listen 127.0.0.1:18160 ssl;
    ssl_certificate $work/anchor.crt;
    ssl_certificate_key $work/anchor.key;
    keepalive_requests 10000000;
    location / {
      proxy_pass https://api;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$http_host;
      proxy_set_header Authorization "Bearer bench-secret";
      proxy_ssl_server_name on;
      proxy_ssl_name upstream.test;
      proxy_ssl_verify on;
      proxy_ssl_trusted_certificate $UPSTREAM_CA;
      proxy_ssl_session_reuse on;
    }
  }
}
CONF
  nginx -c "$work/nginx.conf" -e "$work/nginx.err"
  cat >"$work/haproxy.cfg" <<CONF
global
  nbthread 1
  maxconn 8192
  ssl-server-verify required
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  http-reuse always
frontend agents
  bind 127.0.0.1:18161 ssl crt $work/anchor.pem alpn http/1.1
  http-request set-header Authorization "Bearer bench-secret"
  default_backend api
backend api
  server upstream 127.0.0.1:$port ssl verify required ca-file $UPSTREAM_CA sni str(upstream.test) verifyhost upstream.test alpn http/1.1
CONF
  haproxy -q -f "$work/haproxy.cfg" &
  extra_pids="$extra_pids $!"
  haproxy_pid=$!
}
mkdir -p "$work/secrets"
printf 'bench-secret\n' >"$work/secrets/token"
cat >"$work/keystamp.yaml" <<YAML
listen: 127.0.0.1:18140
admin: 127.0.0.1:18141
ca: { generate: true, cert_out: ./ca.crt }
unmatched: deny
egress: { allow_cidrs: [127.0.0.0/8] }   # the bench upstream is on loopback
upstream_tls: { extra_roots: [$UPSTREAM_CA] }
credentials:
  bench: { source: { file: ./secrets/token } }
routes:
  - { host: upstream.test, credential: bench, inject: { type: bearer } }
YAML
# A second keystamp with per-request metrics and the audit log off, to price them.
sed -e 's/18140/18142/; s/18141/18143/' -e 's|^unmatched: deny$|unmatched: deny\naudit: { output: off }\nmetrics: { per_request: false }|' \
  -e 's|cert_out: ./ca.crt|cert_out: ./ca-quiet.crt|' "$work/keystamp.yaml" >"$work/quiet.yaml"
printf 'audit: { output: ./audit.jsonl }\n' >>"$work/keystamp.yaml"
RUST_LOG=warn ./target/release/keystamp run --config "$work/keystamp.yaml" 2>"$work/keystamp.log" &
ks_pid=$!
RUST_LOG=warn ./target/release/keystamp run --config "$work/quiet.yaml" 2>"$work/quiet.log" &
quiet_pid=$!
upstream_port=$(echo "$UPSTREAM_URL" | sed -n 's|https://[^:/]*:\([0-9]*\)/.*|\1|p')
"$relay_binary" 127.0.0.1:18139 "127.0.0.1:${upstream_port:-443}" &
relay_pid=$!
RELAY_URL=$(echo "$UPSTREAM_URL" | sed "s|:${upstream_port}/|:18139/|")
upstream_authority=$(echo "$UPSTREAM_URL" | sed -n 's|https://\([^/]*\)/.*|\1|p')
start_anchors "$upstream_port"
extra_targets=""
admin_ports="18141 18143"
if [ -n "${KS_BASELINE:-}" ]; then
  sed -e 's/18140/18146/; s/18141/18147/' -e 's|cert_out: ./ca.crt|cert_out: ./ca-baseline.crt|' \
    -e 's|./audit.jsonl|./audit-baseline.jsonl|' "$work/keystamp.yaml" >"$work/baseline.yaml"
  RUST_LOG=warn "$KS_BASELINE" run --config "$work/baseline.yaml" 2>"$work/baseline.log" &
  extra_pids="$extra_pids $!"
  extra_targets="$extra_targets keystamp-baseline"
  admin_ports="$admin_ports 18147"
fi
if [ -n "${FLEET:-}" ]; then
  redis-server --port 18150 --bind 127.0.0.1 --save '' --appendonly no >"$work/redis.log" 2>&1 &
  extra_pids="$extra_pids $!"
  printf 'redis://127.0.0.1:18150/\n' >"$work/redis-url"
  sed -e 's/18140/18144/; s/18141/18145/' -e 's|cert_out: ./ca.crt|cert_out: ./ca-fleet.crt|' \
    -e 's|./audit.jsonl|./audit-fleet.jsonl|' "$work/keystamp.yaml" >"$work/fleet.yaml"
  printf 'fleet: { name: bench, store: { url: { file: ./redis-url } } }\n' >>"$work/fleet.yaml"
  RUST_LOG=warn ./target/release/keystamp run --config "$work/fleet.yaml" 2>"$work/fleet.log" &
  extra_pids="$extra_pids $!"
  extra_targets="$extra_targets keystamp-fleet"
  admin_ports="$admin_ports 18145"
fi
for port in $admin_ports; do
  for _ in $(seq 100); do curl -sf http://127.0.0.1:$port/readyz >/dev/null && break; sleep 0.1; done
done
KS_PROXY=http://127.0.0.1:18140
KS_CA=$work/ca.crt
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
idle_rss=$(rss_kib $ks_pid)

# Sanity: the upstream sees keystamp's credential, not the agent's.
got=$(curl -s --cacert "$KS_CA" -x $KS_PROXY -H 'Authorization: Bearer agent' "$UPSTREAM_URL")
[ "$got" = "auth=Bearer bench-secret" ] || { echo "keystamp did not stamp: $got" >&2; exit 1; }
for port in 18160 18161; do
  for _ in $(seq 50); do
    got=$(curl -s --cacert "$work/anchor-ca.crt" --connect-to "$upstream_authority:127.0.0.1:$port" \
      -H 'Authorization: Bearer agent' "$UPSTREAM_URL" || true)
    [ "$got" = "auth=Bearer bench-secret" ] && break
    sleep 0.1
  done
  [ "$got" = "auth=Bearer bench-secret" ] || { echo "the anchor on :$port did not stamp: $got" >&2; exit 1; }
done

# HOLD=1: start everything, print how to reach each proxy, and wait (for perf, strace, a profiler).
if [ -n "${HOLD:-}" ]; then
  echo "keystamp pid $ks_pid (-x $KS_PROXY --cacert $KS_CA), quiet pid $quiet_pid (-x http://127.0.0.1:18142 --cacert $work/ca-quiet.crt)"
  echo "nginx pid $(cat "$work/nginx.pid") (--connect-to $upstream_authority:127.0.0.1:18160 --cacert $work/anchor-ca.crt), haproxy pid $haproxy_pid (:18161)"
  echo "upstream $UPSTREAM_URL; holding until interrupted"
  sleep infinity & wait $!
fi

# CPU time of a process and all its descendants (utime + stime, and reaped children's), in ticks.
clk_tck=$(getconf CLK_TCK)
descendants() { echo "$1"; for child in $(pgrep -P "$1"); do descendants "$child"; done; }
cpu_ticks() {
  local total=0 p
  for p in $(descendants "$1"); do
    total=$((total + $(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | awk '{print $12 + $13 + $14 + $15}' || echo 0)))
  done
  echo "$total"
}
pid_on_port() { ss -Htlnp "sport = :$1" | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2; }
# The process whose tree does the proxying (nginx's for direct: the server's own share).
proxy_pid() {
  case $1 in
    direct) cat "$peers_rig_dir/nginx.pid" ;;
    nginx) cat "$work/nginx.pid" ;;
    haproxy) echo "$haproxy_pid" ;;
    relay) echo "$relay_pid" ;;
    keystamp) echo "$ks_pid" ;;
    keystamp-quiet) echo "$quiet_pid" ;;
    keystamp-baseline) pid_on_port 18146 ;;
    keystamp-fleet) pid_on_port 18144 ;;
    hudsucker) pid_on_port 18131 ;;
    squid) pgrep -o -x squid ;;
    mitm) pid_on_port 18130 ;;
  esac
}

# measure TARGET ARGS... -> prints "rps p50_ms success cpu_us_per_request"
measure() {
  local target=$1; shift
  local pid before after
  pid=$(proxy_pid "$target")
  before=$(cpu_ticks "$pid")
  oha --no-tui --output-format json -z "${secs}s" "$@" "$(target_url "$target")" 2>/dev/null >"$work/oha.json"
  after=$(cpu_ticks "$pid")
  python3 - "$work/oha.json" "$((after - before))" "$clk_tck" <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); s = d["summary"]
p = d["latencyPercentiles"]["p50"] or 0
n = sum(d.get("statusCodeDistribution", {}).values()) or 1
cpu_us = int(sys.argv[2]) / int(sys.argv[3]) * 1e6 / n
print("%.0f %.3f %.3f %.0f" % (s["requestsPerSec"], p * 1000, s["successRate"] or 0, cpu_us))
PY
}
target_url() { if [ "$1" = relay ]; then echo "$RELAY_URL"; else echo "$UPSTREAM_URL"; fi; }
target_args() {
  case $1 in
    direct | relay) echo "--cacert $UPSTREAM_CA" ;;
    keystamp) echo "--cacert $KS_CA -x $KS_PROXY" ;;
    nginx) echo "--cacert $work/anchor-ca.crt --connect-to $upstream_authority:127.0.0.1:18160" ;;
    haproxy) echo "--cacert $work/anchor-ca.crt --connect-to $upstream_authority:127.0.0.1:18161" ;;
    keystamp-quiet) echo "--cacert $work/ca-quiet.crt -x http://127.0.0.1:18142" ;;
    keystamp-baseline) echo "--cacert $work/ca-baseline.crt -x http://127.0.0.1:18146" ;;
    keystamp-fleet) echo "--cacert $work/ca-fleet.crt -x http://127.0.0.1:18144" ;;
    hudsucker) echo "--cacert $HUD_CA -x $HUD_PROXY" ;;
    squid) echo "--cacert $SQUID_CA -x $SQUID_PROXY" ;;
    mitm) echo "--cacert $MITM_CA -x $MITM_PROXY" ;;
  esac
}
targets="direct relay $anchors keystamp keystamp-quiet$extra_targets $peers"
# ROUNDS=N runs every case N times, the targets interleaved within each round, and reports each
# column's median: CPU per request then compares proxies measured minutes apart, not an hour.
rounds=${ROUNDS:-1}
declare -A ka one fresh
# median_of LINE... -> the line whose every column is that column's median
median_of() {
  python3 - "$@" <<'PY'
import statistics, sys
rows = [list(map(float, line.split())) for line in sys.argv[1:]]
print(" ".join(f"{statistics.median(col):.3f}" if i in (1, 2) else f"{statistics.median(col):.0f}"
                for i, col in enumerate(zip(*rows))))
PY
}
declare -A ka_runs one_runs fresh_runs
for round in $(seq "$rounds"); do
  for t in $targets; do
    # shellcheck disable=SC2046
    ka_runs[$t]+="$(measure $t -c 16 $(target_args $t))|"
    # shellcheck disable=SC2046
    one_runs[$t]+="$(measure $t -c 1 $(target_args $t))|"
    # shellcheck disable=SC2046
    fresh_runs[$t]+="$(measure $t -c 4 --disable-keepalive $(target_args $t))|"
  done
  [ "$rounds" -gt 1 ] && echo "round $round of $rounds done" >&2
done
for t in $targets; do
  IFS='|' read -r -a runs <<<"${ka_runs[$t]%|}"; ka[$t]=$(median_of "${runs[@]}")
  IFS='|' read -r -a runs <<<"${one_runs[$t]%|}"; one[$t]=$(median_of "${runs[@]}")
  IFS='|' read -r -a runs <<<"${fresh_runs[$t]%|}"; fresh[$t]=$(median_of "${runs[@]}")
done
after_rss=$(rss_kib $ks_pid)

# 1,000 keep-alive connections held open through keystamp at a modest rate.
oha --no-tui -z 6s -c 1000 -q 2000 --cacert "$KS_CA" -x $KS_PROXY "$UPSTREAM_URL" >/dev/null 2>&1 &
load_pid=$!
sleep 4
held_rss=$(rss_kib $ks_pid)
open_conns=$(ss -Htn state established "( sport = :18140 )" | wc -l)
wait $load_pid || true

col() { echo "$1" | cut -d' ' -f"$2"; }
ratio() { python3 -c "print(f'{$1/$2:.2f}')"; }
printf '\n| case | %s |\n|---|%s\n' "$(echo $targets | sed 's/ / | /g')" "$(for _ in $targets; do printf -- '---|'; done)"
printf '| keep-alive, 16 conns: req/s |'
for t in $targets; do printf ' %s (%s×) |' "$(col "${ka[$t]}" 1)" "$(ratio "$(col "${ka[$t]}" 1)" "$(col "${ka[direct]}" 1)")"; done
printf '\n| keep-alive, 1 conn: p50 ms |'
for t in $targets; do printf ' %s |' "$(col "${one[$t]}" 2)"; done
printf '\n| new connection per request, 4 conns: req/s |'
for t in $targets; do printf ' %s (%s×) |' "$(col "${fresh[$t]}" 1)" "$(ratio "$(col "${fresh[$t]}" 1)" "$(col "${fresh[direct]}" 1)")"; done
printf '\n| CPU per request, keep-alive 16 conns: µs |'
for t in $targets; do printf ' %s |' "$(col "${ka[$t]}" 4)"; done
printf '\n| CPU per request, 1 conn: µs |'
for t in $targets; do printf ' %s |' "$(col "${one[$t]}" 4)"; done
printf '\n| CPU per request, new connection: µs |'
for t in $targets; do printf ' %s |' "$(col "${fresh[$t]}" 4)"; done
printf '\n| success rate (keep-alive / 1 conn / new conn) |'
for t in $targets; do printf ' %s / %s / %s |' "$(col "${ka[$t]}" 3)" "$(col "${one[$t]}" 3)" "$(col "${fresh[$t]}" 3)"; done
echo
ks_ka=$(col "${ka[keystamp]}" 1)
echo
added_p50() { python3 -c "print(f'{($(col "${one[$1]}" 2) - $(col "${one[direct]}" 2))*1000:.0f}')"; }
echo "added p50 latency over direct, 1 conn: keystamp $(added_p50 keystamp) µs, the bare TCP relay $(added_p50 relay) µs$(for p in $anchors $peers; do printf ', %s %s µs' "$p" "$(added_p50 "$p")"; done)"
above_relay() { echo "$(($(col "${ka[$1]}" 4) - $(col "${ka[relay]}" 4))) / $(($(col "${one[$1]}" 4) - $(col "${one[relay]}" 4))) / $(($(col "${fresh[$1]}" 4) - $(col "${fresh[relay]}" 4)))"; }
echo "CPU per request above the bare relay's (16 conns / 1 conn / new conn, µs): keystamp $(above_relay keystamp)$(for p in $anchors $peers; do printf ', %s %s' "$p" "$(above_relay "$p")"; done)"
for a in $anchors; do
  for k in keystamp keystamp-quiet; do
    echo "$k / $a CPU per request: keep-alive 16 conns $(ratio "$(col "${ka[$k]}" 4)" "$(col "${ka[$a]}" 4)")×, 1 conn $(ratio "$(col "${one[$k]}" 4)" "$(col "${one[$a]}" 4)")×, new connection $(ratio "$(col "${fresh[$k]}" 4)" "$(col "${fresh[$a]}" 4)")×; p50 added on 1 conn $(added_p50 $k) µs vs $(added_p50 $a) µs"
  done
done
echo "the day's noise: direct to nginx $(col "${ka[direct]}" 1) req/s at 16 keep-alive connections"
for p in $peers; do
  echo "keystamp / $p: keep-alive $(ratio "$ks_ka" "$(col "${ka[$p]}" 1)")×, new connection $(ratio "$(col "${fresh[keystamp]}" 1)" "$(col "${fresh[$p]}" 1)")×"
  echo "keystamp / $p CPU per request: keep-alive $(ratio "$(col "${ka[keystamp]}" 4)" "$(col "${ka[$p]}" 4)")×, 1 conn $(ratio "$(col "${one[keystamp]}" 4)" "$(col "${one[$p]}" 4)")×, new connection $(ratio "$(col "${fresh[keystamp]}" 4)" "$(col "${fresh[$p]}" 4)")×"
done
echo "metrics + audit cost, keep-alive: keystamp $(col "${ka[keystamp]}" 1) req/s with them, $(col "${ka[keystamp-quiet]}" 1) without ($(python3 -c "print(f'{(1 - $(col "${ka[keystamp]}" 1) / $(col "${ka[keystamp-quiet]}" 1)) * 100:.1f}')") % slower)"
echo "keystamp RSS: idle $((idle_rss / 1024)) MiB, after the runs $((after_rss / 1024)) MiB, holding $open_conns keep-alive connections $((held_rss / 1024)) MiB"
