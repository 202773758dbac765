#!/usr/bin/env bash
# Instructions keystamp executes per proxied request, counted by valgrind's callgrind: unlike
# req/s or CPU time this number repeats run after run whatever else the machine is doing, so each
# optimisation is judged by it. keystamp (release, metrics and audit on) runs under callgrind;
# after a warm-up the counters are zeroed, a fixed number of requests goes through it, and the
# counters are dumped: total instructions / requests.
#
#   benches/instructions.sh                       # keep-alive (1 conn) and new-connection cases
#   REQUESTS=4000 benches/instructions.sh
#   KS_BASELINE=/path/to/older/keystamp benches/instructions.sh   # the same for an older build
#   TOP=25 benches/instructions.sh                # also the 25 costliest functions (inclusive)
#
# Needs: valgrind, oha (cargo install oha --locked), the peer rig's nginx (../shared/peers/up.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
requests=${REQUESTS:-2000}
peers_dir=${PEERS_RIG:-../shared/peers}
command -v valgrind >/dev/null || { echo "valgrind is missing" >&2; exit 1; }
command -v oha >/dev/null || { echo "oha is missing: cargo install oha --locked" >&2; exit 1; }
eval "$("$peers_dir/up.sh" | grep -E '^[A-Z_]+=')"
cargo build --release -q
work=$(mktemp -d)
[ -n "${KEEP:-}" ] && echo "work dir: $work"
pid=""
trap 'kill $pid 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT
mkdir -p "$work/secrets"
printf 'bench-secret\n' >"$work/secrets/token"
cat >"$work/keystamp.yaml" <<YAML
listen: 127.0.0.1:18160
admin: 127.0.0.1:18161
ca: { generate: true, cert_out: ./ca.crt }
unmatched: deny
egress: { allow_cidrs: [127.0.0.0/8] }
upstream_tls: { extra_roots: [$UPSTREAM_CA] }
audit: { output: ./audit.jsonl }
credentials:
  bench: { source: { file: ./secrets/token } }
routes:
  - { host: upstream.test, credential: bench, inject: { type: bearer } }
YAML

# count BINARY LABEL -> prints "LABEL keep-alive-Ir/req new-connection-Ir/req"
count() {
  local binary=$1 label=$2
  rm -f "$work"/cg.* "$work/ca.crt"
  RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$work/cg.%p" \
    "$binary" run --config "$work/keystamp.yaml" 2>"$work/$label.log" &
  pid=$!
  for _ in $(seq 600); do curl -sf http://127.0.0.1:18161/readyz >/dev/null && break; sleep 0.1; done
  local args=(--no-tui -c 1 --cacert "$work/ca.crt" -x http://127.0.0.1:18160)
  oha "${args[@]}" -n 300 "$UPSTREAM_URL" >/dev/null 2>&1
  oha "${args[@]}" -n 30 --disable-keepalive "$UPSTREAM_URL" >/dev/null 2>&1
  callgrind_control -z "$pid" >/dev/null
  oha "${args[@]}" -n "$requests" "$UPSTREAM_URL" >/dev/null 2>&1
  callgrind_control -d keep-alive "$pid" >/dev/null
  local fresh=$((requests / 10))
  callgrind_control -z "$pid" >/dev/null
  oha "${args[@]}" -n "$fresh" --disable-keepalive "$UPSTREAM_URL" >/dev/null 2>&1
  callgrind_control -d new-connection "$pid" >/dev/null
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
  total() { grep -h '^summary:\|^totals:' $(grep -l "^desc: Trigger: dump $1" "$work"/cg.*) | head -1 | awk '{print $2}'; }
  local ka nc
  ka=$(total keep-alive); nc=$(total new-connection)
  echo "$label $((ka / requests)) $((nc / fresh))"
  if [ -n "${TOP:-}" ]; then
    callgrind_annotate --inclusive="${INCLUSIVE:-no}" "$(grep -l '^desc: Trigger: dump keep-alive' "$work"/cg.*)" 2>/dev/null |
      grep -v '^-' | head -n "$((TOP + 20))" | tail -n "$TOP" >"$work/$label.top"
    cp "$work/$label.top" "./target/instructions-$label.top"
  fi
}

results=("$(count ./target/release/keystamp keystamp)")
[ -n "${KS_BASELINE:-}" ] && results+=("$(count "$KS_BASELINE" baseline)")
printf '\n| build | instructions per keep-alive request | instructions per new-connection request |\n|---|---|---|\n'
for line in "${results[@]}"; do
  set -- $line
  printf '| %s | %s | %s |\n' "$1" "$2" "$3"
done
[ -n "${TOP:-}" ] && echo "costliest functions (inclusive): target/instructions-*.top"
