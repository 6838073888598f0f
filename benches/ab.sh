#!/usr/bin/env bash
# A/B of two proxy builds: both run at once in front of the same 3 backends,
# and wrk alternates between them, so drift in the machine's load hits both.
# Prints req/s, CPU seconds per 100k requests and p99 latency of each, per round.
#
#   benches/ab.sh BIN_A BIN_B [CONCURRENCY] [ROUNDS]
#
# Environment: PAYLOAD=post4k for the 4 KB POST (default: small GET);
# CLOSE=1 for a new connection per request; SERVER_TOML replaces the
# processes/threads lines of [server] in both (default "processes = 2\nthreads = 1",
# as benches/run.sh), SERVER_TOML_A / SERVER_TOML_B in one only. One binary
# in two settings: processes against threads,
#   SERVER_TOML_A='processes = 1\nthreads = 2' SERVER_TOML_B='processes = 2\nthreads = 1' \
#     benches/ab.sh target/release/proxy target/release/proxy 64 4
# Example (glibc against jemalloc): build, copy target/release/proxy to
# /tmp/proxy-a, change the allocator, build again, then
#   benches/ab.sh /tmp/proxy-a target/release/proxy 16 4
# Ports: 18501-18503 (backends), 18510-18511 and 18520-18521 (proxies).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
# shellcheck source=benches/lib.sh
. benches/lib.sh
[[ $# -ge 2 ]] || { sed -n '2,19p' "$0"; exit 64; }
bins=("$1" "$2")
conc=${3:-16}
rounds=${4:-4}
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
cargo build --release -q -p loadgen
work=$(mktemp -d /tmp/ab.XXXXXX)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"' EXIT

start_http_backends "$work" 18500
proxies=()
server_toml=("${SERVER_TOML_A:-${SERVER_TOML:-processes = 2\nthreads = 1}}"
    "${SERVER_TOML_B:-${SERVER_TOML:-processes = 2\nthreads = 1}}")
for i in 0 1; do
    grep -v '^processes = \|^threads = ' benches/proxy-bench.toml |
        sed -e "s/^\[server\]/[server]\n${server_toml[$i]}/" -e "s|/tmp/bench-proxy|$work/p$i|" >"$work/p$i.toml"
    RUST_LOG=warn PROXY_LISTEN=127.0.0.1:$((18510 + i)) PROXY_STATUS_LISTEN=127.0.0.1:$((18520 + i)) \
        PROXY_BACKENDS=$(IFS=,; echo "${backends[*]}") "${bins[$i]}" --config "$work/p$i.toml" >"$work/p$i.log" 2>&1 &
    proxies+=($!)
    pids+=($!)
done
for port in 18501 18502 18503 18510 18511; do
    for _ in $(seq 100); do curl -sf -o /dev/null "http://127.0.0.1:$port/health" && break; sleep 0.1; done
done

cpu_ticks() { # utime+stime of PID and its children (worker processes), in clock ticks
    local pid stat rest total=0
    for pid in "$1" $(pgrep -P "$1" || true); do
        stat=$(cat "/proc/$pid/stat" 2>/dev/null) || continue
        rest=${stat##*) }
        total=$((total + $(awk '{print $12 + $13}' <<<"$rest")))
    done
    echo "$total"
}
wrk_args=(-t$((conc < 2 ? 1 : 2)) -c"$conc" -d3 --latency)
[[ ${CLOSE:-0} == 1 ]] && wrk_args+=(-H 'Connection: close')
path=/
if [[ ${PAYLOAD:-get} == post4k ]]; then
    wrk_args+=(-s benches/wrk/report.lua)
    export WRK_BODY_BYTES=4096
    path=/echo
fi
hz=$(getconf CLK_TCK)
for r in $(seq "$rounds"); do
    for i in 0 1; do
        before=$(cpu_ticks "${proxies[$i]}")
        out=$(wrk "${wrk_args[@]}" "http://127.0.0.1:$((18510 + i))$path")
        after=$(cpu_ticks "${proxies[$i]}")
        n=$(awk '/requests in/ {print $1}' <<<"$out")
        rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
        p99=$(awk '$1 == "99%" {print $2; exit}' <<<"$out")
        printf 'round %s  %s  %s  req/s %s  CPU s/100k %s  p99 %s\n' "$r" "$([[ $i == 0 ]] && echo A || echo B)" \
            "${bins[$i]}" "$rps" "$(awk -v t=$((after - before)) -v n="$n" -v hz="$hz" 'BEGIN {printf "%.2f", t / hz / n * 100000}')" "$p99"
    done
done
