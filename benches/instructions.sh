#!/usr/bin/env bash
# Instructions keystamp executes per proxied request, counted by valgrind's callgrind: unlike
# req/s or CPU time this number repeats run after run whatever else the machine is doing, so each
# optimisation is judged by it. keystamp (release, metrics and audit on) runs under callgrind;
# after a warm-up the counters are zeroed, a fixed number of requests goes through it, and the
# counters are dumped: total instructions / requests.
#
#   benches/instructions.sh                       # keep-alive (1 conn) and new-connection cases
#   REQUESTS=4000 benches/instructions.sh
#   CONNS=16 benches/instructions.sh              # 16 agent connections at once (their 16
#                                                 # handshakes fall inside the keep-alive count)
#   KS_BASELINE=/path/to/older/keystamp benches/instructions.sh   # the same for an older build
#   TOP=25 benches/instructions.sh                # also the 25 costliest functions (exclusive)
#   PEER=1 benches/instructions.sh                # hudsucker-peer counted the same way, same run
#   SYSCALLS=1 benches/instructions.sh            # also system calls per request (strace -c)
#
# Instructions cover user space; the kernel's share of a request (socket reads and writes,
# wakeups between threads) shows as system calls per request, counted with strace without
# valgrind (strace slows the process, not the count).
#
# Needs: valgrind, oha (cargo install oha --locked), the peer rig's nginx (../shared/peers/up.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
requests=${REQUESTS:-2000}
conns=${CONNS:-1}
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
listen: 127.0.0.1:18176
admin: 127.0.0.1:18177
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

# launch LABEL [WRAPPER...] -> starts LABEL's proxy on port 18176 (keystamp) or 18178 (the peer)
# under WRAPPER, sets pid, proxy and ca.
launch() {
  local label=$1; shift
  rm -f "$work/ca.crt" "$work/hudca.crt"
  case $label in
    hudsucker)
      "$@" "$hud_binary" 127.0.0.1:18178 "$UPSTREAM_CA" "$work/hudca.crt" upstream.test \
        "Bearer bench-secret" >"$work/$label.log" 2>&1 &
      pid=$! proxy=http://127.0.0.1:18178 ca=$work/hudca.crt ;;
    *)
      RUST_LOG=warn "$@" "${binaries[$label]}" run --config "$work/keystamp.yaml" 2>"$work/$label.log" &
      pid=$! proxy=http://127.0.0.1:18176 ca=$work/ca.crt ;;
  esac
  for _ in $(seq 600); do
    [ -s "$ca" ] && curl -sf --cacert "$ca" -x "$proxy" "$UPSTREAM_URL" >/dev/null 2>&1 && break
    sleep 0.1
  done
}

# count LABEL -> prints "LABEL keep-alive-Ir/req new-connection-Ir/req"
count() {
  local label=$1
  rm -f "$work"/cg.*
  launch "$label" valgrind --tool=callgrind --callgrind-out-file="$work/cg.%p"
  local args=(--no-tui -c "$conns" --cacert "$ca" -x "$proxy")
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
    callgrind_annotate --threshold=100 "$(grep -l '^desc: Trigger: dump keep-alive' "$work"/cg.*)" 2>/dev/null |
      grep -v '^-' | grep -v 'clone.S\|start_thread\|thread_start\|call_once\|__rust_begin_short_backtrace\|task::core\|task::raw\|task::harness\|blocking::pool\|blocking::task\|worker::run\|context::scoped\|PROGRAM TOTALS' |
      grep '^ *[0-9]' | head -n "$TOP" >"./target/instructions-$label.top" || true
  fi
}

# syscalls LABEL -> prints "LABEL keep-alive-syscalls/req" (strace -c over 1,000 requests)
syscalls() {
  local label=$1 n=$((1000 * conns))
  launch "$label"
  local args=(--no-tui -c "$conns" --cacert "$ca" -x "$proxy")
  oha "${args[@]}" -n 300 "$UPSTREAM_URL" >/dev/null 2>&1
  strace -c -f -p "$pid" -o "$work/strace.$label" 2>/dev/null &
  local tracer=$!
  sleep 1
  oha "${args[@]}" -n "$n" "$UPSTREAM_URL" >/dev/null 2>&1
  kill -INT "$tracer"; wait "$tracer" 2>/dev/null || true
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
  local calls futex
  calls=$(awk '$NF == "total" {print $4}' "$work/strace.$label")
  futex=$(awk '$NF == "futex" {print $4}' "$work/strace.$label")
  echo "$label $(python3 -c "print(f'{$calls/$n:.1f} ({${futex:-0}/$n:.1f} futex)')")"
}

declare -A binaries=([keystamp]=./target/release/keystamp)
labels=(keystamp)
if [ -n "${KS_BASELINE:-}" ]; then binaries[baseline]=$KS_BASELINE; labels+=(baseline); fi
if [ -n "${PEER:-}" ]; then
  hud_binary="$(dirname "$HUD_CA")/hud-target/release/hudsucker-peer"
  [ -x "$hud_binary" ] || { echo "hudsucker-peer is not built: $peers_dir/up.sh builds it" >&2; exit 1; }
  labels+=(hudsucker)
fi
results=()
for label in "${labels[@]}"; do results+=("$(count "$label")"); done
printf '\n| build | instructions per keep-alive request | instructions per new-connection request |\n|---|---|---|\n'
for line in "${results[@]}"; do
  set -- $line
  printf '| %s | %s | %s |\n' "$1" "$2" "$3"
done
if [ -n "${PEER:-}" ]; then
  set -- ${results[0]}; ka=$2 nc=$3
  set -- ${results[-1]}
  echo "keystamp / hudsucker-peer instructions: keep-alive $(python3 -c "print(f'{$ka/$2:.2f}')")×, new connection $(python3 -c "print(f'{$nc/$3:.2f}')")×"
fi
if [ -n "${SYSCALLS:-}" ]; then
  command -v strace >/dev/null || { echo "strace is missing" >&2; exit 1; }
  printf '\n| build | system calls per keep-alive request |\n|---|---|\n'
  for label in "${labels[@]}"; do
    set -- $(syscalls "$label")
    printf '| %s | %s |\n' "$1" "${*:2}"
  done
fi
[ -n "${TOP:-}" ] && echo "costliest functions (exclusive): target/instructions-*.top"
exit 0
