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
start_http_backends "$work" 18700
sed "s|/tmp/bench-proxy|$work/proxy|" benches/proxy-bench.toml >"$work/proxy.toml"
RUST_LOG=warn PROXY_LISTEN=127.0.0.1:18710 PROXY_STATUS_LISTEN=127.0.0.1:18720 \
    PROXY_BACKENDS=$(IFS=,; echo "${backends[*]}") $BIN --config "$work/proxy.toml" >"$work/proxy.log" 2>&1 &
proxy=$!; pids+=($proxy)
mkdir -p "$work/nginx"
servers=""; for s in "${backends[@]}"; do servers+="server $s; "; done
sed -e "s|@WORKERS@|2|" -e "s|@LISTEN@|127.0.0.1:18711|" -e "s|@PREFIX@|$work/nginx|g" -e "s|@SERVERS@|$servers|" \
    benches/nginx.conf.in >"$work/nginx/nginx.conf"
nginx -c "$work/nginx/nginx.conf" -p "$work/nginx" >"$work/nginx/stdout.log" 2>&1 </dev/null &
nginx=$!; pids+=($nginx)
for port in 18701 18702 18703 18710 18711; do
    for _ in $(seq 100); do curl -sf -o /dev/null "http://127.0.0.1:$port/health" && break; sleep 0.1; done
done
for port in 18710 18711; do wrk -t2 -c64 -d2s "http://127.0.0.1:$port/" >/dev/null; done
snap() { # sum over threads of workers: vol nonvol run_delay_ns cpu_ns
  local v=0 n=0 d=0 c=0 t
  for p in $(pgrep -P "$1"); do for t in /proc/$p/task/*; do
    v=$((v+$(awk '/^voluntary_ctxt/{print $2}' $t/status))); n=$((n+$(awk '/^nonvoluntary_ctxt/{print $2}' $t/status)))
    read a b _ < $t/schedstat; c=$((c+a)); d=$((d+b)); done; done
  echo "$v $n $d $c"
}
extra=()
[[ ${CLOSE:-1} == 1 ]] && extra=(-H 'Connection: close')
for r in $(seq "$rounds"); do
  for front in proxy nginx; do
    port=18710 master=$proxy; [[ $front == nginx ]] && { port=18711; master=$nginx; }
    s0=$(snap $master)
    wp=$(pgrep -P $master | paste -sd,)
    if [[ -n ${PERF:-} ]]; then (sleep 1; perf stat -e "$PERF" -p "$wp" -x, -o $work/perf-$front-$r -- sleep 3 2>/dev/null) & perfpid=$!; fi
    out=$(wrk -t$((conc < 2 ? 1 : 2)) -c"$conc" -d${secs}s "${extra[@]}" -s benches/wrk/report.lua "http://127.0.0.1:$port/" | sed -n 's/^WRK_JSON //p')
    s1=$(snap $master)
    python3 - "$out" "$s0" "$s1" "$front" "$r" <<'PY'
import json,sys
j=json.loads(sys.argv[1]); a=list(map(int,sys.argv[2].split())); b=list(map(int,sys.argv[3].split()))
d=[y-x for x,y in zip(a,b)]; n=j["requests"]; l=j["latency_us"]
print(f"r{sys.argv[5]} {sys.argv[4]:5} req/s {n/j['duration_us']*1e6:7.0f} p50 {l['p50']/1000:.2f} p90 {l['p90']/1000:.2f} p99 {l['p99']/1000:5.2f} p999 {l['p999']/1000:5.2f} max {l['max']/1000:5.1f} | per req: vol {d[0]/n:.2f} invol {d[1]/n:.3f} runq-wait {d[2]/n/1000:.1f}us cpu {d[3]/n/1000:.1f}us | runq total {d[2]/1e9:.2f}s")
PY
    if [[ -n ${PERF:-} ]]; then wait $perfpid; awk -F, -v n=$(python3 -c "import json,sys;j=json.loads(sys.argv[1]);print(j['requests']/j['duration_us']*3e6)" "$out") '$1+0>0 {printf "   %-40s %8.3f/req\n", $3, $1/n}' $work/perf-$front-$r | sort -k2 -nr | head -25; fi
  done
done
