#!/usr/bin/env bash
# One connection (c=1), keep-alive GET, through our proxy and nginx side by
# side in front of 3 `loadgen http-backend`s, away from the cluster: the
# p99 at c=1 is made of waits, and this separates the fronts' own from the
# cluster's. Alternating rounds of `wrk -t1 -c1 -d5 --latency`; with
# TRACE=1, then one traced round per front: `perf record -a` at 20 kHz with
# sched_switch, and the share of each front's samples spent spinning on a
# socket lock inside recv (`__pv_queued_spin_lock_slowpath`).
#
#   benches/c1-sched.sh [ROUNDS]        (default 6)
#
# Environment: TRACE=1 as above; BIN [target/release/proxy].
# Installs nginx, wrk and perf where missing. Ports: 18601-18603, 18610,
# 18611, 18620.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
# shellcheck source=benches/lib.sh
. benches/lib.sh
rounds=${1:-6}
bin=${BIN:-target/release/proxy}
. scripts/setup.sh
command -v nginx >/dev/null || apt_install nginx
command -v wrk >/dev/null || apt_install wrk
[[ ${TRACE:-0} != 1 ]] || command -v perf >/dev/null || apt_install linux-perf
cargo build --release -q -p loadgen -p proxy
work=$(mktemp -d /tmp/c1-sched.XXXXXX)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"' EXIT

start_http_backends "$work" 18600
grep -v '^processes = \|^threads = ' benches/proxy-bench.toml |
    sed -e "s/^\[server\]/[server]\nprocesses = 2\nthreads = 1/" -e "s|/tmp/bench-proxy|$work/p|" >"$work/p.toml"
RUST_LOG=warn PROXY_LISTEN=127.0.0.1:18610 PROXY_STATUS_LISTEN=127.0.0.1:18620 \
    PROXY_BACKENDS=$(IFS=,; echo "${backends[*]}") "$bin" --config "$work/p.toml" >"$work/p.log" 2>&1 &
pids+=($!)
servers=""
for s in "${backends[@]}"; do servers+="server $s; "; done
mkdir -p "$work/nginx"
sed -e "s|@WORKERS@|2|" -e "s|@LISTEN@|127.0.0.1:18611|" -e "s|@PREFIX@|$work/nginx|g" \
    -e "s|@SERVERS@|$servers|" benches/nginx.conf.in >"$work/nginx/nginx.conf"
nginx -c "$work/nginx/nginx.conf" -p "$work/nginx" >"$work/nginx.out" 2>&1 &
pids+=($!)
for port in 18601 18602 18603 18610 18611; do
    for _ in $(seq 100); do curl -sf -o /dev/null "http://127.0.0.1:$port/health" && break; sleep 0.1; done
done
fronts=(proxy:18610 nginx:18611)
for f in "${fronts[@]}"; do wrk -t1 -c1 -d2 "http://127.0.0.1:${f##*:}/" >/dev/null; done

for r in $(seq "$rounds"); do
    for f in "${fronts[@]}"; do
        out=$(wrk -t1 -c1 -d5 --latency "http://127.0.0.1:${f##*:}/")
        printf 'round %s  %-5s  req/s %s  p90 %s  p99 %s\n' "$r" "${f%%:*}" "$(awk '/Requests\/sec/ {print $2}' <<<"$out")" \
            "$(awk '$1 == "90%" {print $2}' <<<"$out")" "$(awk '$1 == "99%" {print $2}' <<<"$out")"
    done
done
[[ ${TRACE:-0} == 1 ]] || exit 0
for f in "${fronts[@]}"; do
    name=${f%%:*}
    perf record -q -e cpu-clock -F 20000 -g -a -e sched:sched_switch -o "$work/$name.data" -- \
        wrk -t1 -c1 -d5 --latency "http://127.0.0.1:${f##*:}/" >"$work/$name.wrk" 2>/dev/null
    perf script -i "$work/$name.data" -F comm,event,ip,sym 2>/dev/null | python3 -c '
import sys
comm, n, spin, rec = sys.argv[1], 0, 0, []
def done():
    global n, spin
    if rec and rec[0] == [comm, "cpu-clock:"]:
        frames = rec[1:]
        n += 1
        spin += any("__pv_queued_spin_lock_slowpath" in x for x in frames) and any("recv" in x for x in frames)
for line in sys.stdin:
    if not line.strip():
        done()
        rec = []
    elif line.startswith("\t"):
        rec.append(line.strip())
    else:
        rec = [line.split()[:2]]
done()
print(f"traced {comm}: {n} samples of its own, {spin} spinning on a socket lock in recv ({100 * spin / max(n, 1):.1f}%)")
' "$name"
    grep -E 'Requests/sec|99%' "$work/$name.wrk" | tr -s ' ' | paste -sd' '
done
