#!/usr/bin/env bash
# What one pause of one front worker does to wrk's latency figures: our proxy
# and nginx (benches/run.sh's configurations, 2 workers each) in front of the
# same 3 backends; keep-alive GET rounds of 5 s alternate between the fronts,
# and in every second round one worker of the front being measured is stopped
# (SIGSTOP) for PAUSE seconds, 2 s in. wrk corrects for coordinated omission
# (every latency of 2 intervals or more is recorded again at each interval
# below it), so one pause of 100 ms moves the p99 of a round from about 1 ms
# to tens of ms: the signature of the rare slow rounds in the full runs.
# Prints each round's req/s, p50/p99/p99.9/max and the machine's steal time.
#
#   benches/pause.sh [CONCURRENCY] [ROUNDS]        (defaults 16, 4)
#
# Environment: PAUSE [0.1] seconds. Ports: 18701-18703 (backends), 18710
# (proxy), 18711 (nginx), 18720 (proxy status).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
# shellcheck source=benches/lib.sh
. benches/lib.sh
conc=${1:-16}
rounds=${2:-4}
pause=${PAUSE:-0.1}
command -v wrk >/dev/null && command -v nginx >/dev/null ||
    { apt-get update -qq && apt-get install -y -qq wrk nginx >/dev/null; }
cargo build --release -q -p loadgen -p proxy
work=$(mktemp -d /tmp/pause.XXXXXX)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; sleep 0.5; rm -rf "$work"' EXIT

start_fronts "$work" target/release/proxy

steal() { awk '$1 == "cpu" {print $9; exit}' /proc/stat; }
hz=$(getconf CLK_TCK)
for r in $(seq "$rounds"); do
    for front in proxy nginx; do
        port=18710 master=$proxy
        [[ $front == nginx ]] && { port=18711; master=$nginx; }
        worker=$(pgrep -P "$master" | head -1)
        paused=$((r % 2 == 0))
        s0=$(steal)
        if ((paused)); then (trap - EXIT; sleep 2; kill -STOP "$worker"; sleep "$pause"; kill -CONT "$worker") & stopper=$!; fi
        out=$(wrk -t$((conc < 2 ? 1 : 2)) -c"$conc" -d5s -s benches/wrk/report.lua "http://127.0.0.1:$port/" |
            sed -n 's/^WRK_JSON //p')
        ((paused)) && wait "$stopper"
        python3 - "$out" "$r" "$front" "$paused" "$pause" $(($(steal) - s0)) "$hz" <<'PY'
import json, sys
j = json.loads(sys.argv[1]); r, front, paused, pause = sys.argv[2:6]
steal = int(sys.argv[6]) / int(sys.argv[7]); l = j["latency_us"]
what = f"one worker stopped {float(pause) * 1000:.0f} ms" if paused == "1" else "no pause"
print(f"round {r}  {front:5}  {what:24}  req/s {j['requests'] / j['duration_us'] * 1e6:7.0f}  p50 {l['p50'] / 1000:.2f}  "
      f"p99 {l['p99'] / 1000:6.2f}  p99.9 {l['p999'] / 1000:6.2f}  max {l['max'] / 1000:6.1f} ms  steal {steal:.2f} s")
PY
    done
done
