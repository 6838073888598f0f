#!/usr/bin/env bash
# How each front's workers are scheduled, per request: our proxy and nginx
# (benches/run.sh's configurations, 2 workers each) in front of the same 3
# backends; wrk rounds alternate between the fronts, and around each round
# the workers' threads are read from /proc (status: voluntary and
# involuntary context switches; schedstat: time on a CPU and time waiting
# in the run queue). Prints per round req/s, p50/p90/p99/p99.9/max and those
# per request.
#
#   benches/sched.sh [CONCURRENCY] [ROUNDS]        (defaults 16, 3)
#
# Environment: CLOSE [1] a new connection per request (0: keep-alive);
# SECS [5] per round; BIN [target/release/proxy]; PERF=EVENTS also counts
# perf events on the workers for 3 s of each round, per request
# (PERF='syscalls:sys_enter_*'). Ports: 18701-18703 (backends), 18710
# (proxy), 18711 (nginx), 18720 (proxy status), as benches/pause.sh.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
# shellcheck source=benches/lib.sh
. benches/lib.sh
conc=${1:-16}; rounds=${2:-3}; secs=${SECS:-5}
BIN=${BIN:-target/release/proxy}
command -v wrk >/dev/null && command -v nginx >/dev/null ||
    { apt-get update -qq && apt-get install -y -qq wrk nginx >/dev/null; }
[[ -n ${PERF:-} ]] && { mountpoint -q /sys/kernel/tracing || mount -t tracefs nodev /sys/kernel/tracing; }
cargo build --release -q -p loadgen -p proxy
work=$(mktemp -d /tmp/sched.XXXXXX)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; sleep 0.5; rm -rf "$work"' EXIT
start_fronts "$work" "$BIN"
# snap MASTER: summed over the threads of MASTER's worker processes, the
# voluntary and involuntary context switches, the run-queue wait (ns) and
# the time on a CPU (ns).
snap() {
    local pid task vol=0 invol=0 wait=0 cpu=0 a b
    for pid in $(pgrep -P "$1"); do
        for task in /proc/"$pid"/task/*; do
            vol=$((vol + $(awk '/^voluntary_ctxt/ {print $2}' "$task/status")))
            invol=$((invol + $(awk '/^nonvoluntary_ctxt/ {print $2}' "$task/status")))
            read -r a b _ <"$task/schedstat"
            cpu=$((cpu + a)) wait=$((wait + b))
        done
    done
    echo "$vol $invol $wait $cpu"
}
extra=()
[[ ${CLOSE:-1} == 1 ]] && extra=(-H 'Connection: close')
for r in $(seq "$rounds"); do
    for front in proxy nginx; do
        port=18710 master=$proxy
        [[ $front == nginx ]] && { port=18711; master=$nginx; }
        s0=$(snap "$master")
        if [[ -n ${PERF:-} ]]; then
            (sleep 1; perf stat -e "$PERF" -p "$(pgrep -P "$master" | paste -sd,)" -x, -o "$work/perf-$front-$r" -- sleep 3 2>/dev/null) &
            perf_pid=$!
        fi
        out=$(wrk -t$((conc < 2 ? 1 : 2)) -c"$conc" -d"${secs}s" "${extra[@]}" -s benches/wrk/report.lua "http://127.0.0.1:$port/" |
            sed -n 's/^WRK_JSON //p')
        s1=$(snap "$master")
        python3 - "$out" "$s0" "$s1" "$front" "$r" <<'PY'
import json, sys
j = json.loads(sys.argv[1]); front, r = sys.argv[4:6]
d = [b - a for a, b in zip(map(int, sys.argv[2].split()), map(int, sys.argv[3].split()))]
n, l = j["requests"], j["latency_us"]
print(f"round {r}  {front:5}  req/s {n / j['duration_us'] * 1e6:7.0f}  p50 {l['p50'] / 1000:.2f}  p90 {l['p90'] / 1000:.2f}  "
      f"p99 {l['p99'] / 1000:5.2f}  p99.9 {l['p999'] / 1000:5.2f}  max {l['max'] / 1000:5.1f} ms | per request: "
      f"context switches {d[0] / n:.2f} voluntary, {d[1] / n:.3f} not; run-queue wait {d[2] / n / 1000:.1f} us, "
      f"on a CPU {d[3] / n / 1000:.1f} us")
PY
        if [[ -n ${PERF:-} ]]; then
            wait "$perf_pid"
            # perf counted for 3 s: per request at the round's mean rate.
            per3s=$(python3 -c "import json, sys; j = json.loads(sys.argv[1]); print(j['requests'] / j['duration_us'] * 3e6)" "$out")
            awk -F, -v n="$per3s" '$1 + 0 > 0 {printf "   %-40s %8.3f per request\n", $3, $1 / n}' "$work/perf-$front-$r" |
                sort -k2 -nr | head -25
        fi
    done
done
