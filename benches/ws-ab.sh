#!/usr/bin/env bash
# A/B of two proxy builds on the stream cell: one cluster (3 AI nodes, 3
# backends, embedded bus) with BIN_A as its proxy, BIN_B beside it on the same
# backends, and nginx too (NGINX=0 leaves it out). Every round runs
# `loadgen ws` through each front in turn (the order rotates), and the
# publish->client p99 and the CPU of the front, of the cluster (AI nodes and
# backends) and of the load generator are printed per round, with the
# medians at the end. Positions are not equal: on 2026-12-07 (Intel, 1,000
# streams) B's p99 was above A's in all 8 rounds of two runs with the builds
# swapped between them, while CPU followed the build. Judge a latency change
# from both orders (A/B, then B/A), or against nginx in each.
#
#   benches/ws-ab.sh BIN_A BIN_B [SESSIONS] [ROUNDS]      (defaults 1000, 5)
#
# Environment: SPREAD_MS [0] spreads the first chats (as run.sh's steady cells);
# CHATS [3] chats per session; SERVER_TOML_B adds lines to B's [server]
# (one binary in two settings: SERVER_TOML_B='work_stealing = false');
# SED_B is a sed script applied to B's config after that (other sections:
# SED_B='s/^relays = 1/relays = 0/');
# DIRECT=1 adds a round straight to one backend (no front; its CPU reads 0),
# DIRECT=spread one straight to every backend, the sessions taking them in
# turn (what a front that cost nothing would do);
# PERF_STAT=EVENTS counts perf events on each front's processes during each
# of its rounds (PERF_STAT='syscalls:sys_enter_*', or task-clock,context-switches)
# and prints the counts after the medians.
# Ports: 18600-18601 (cluster), 18610-18611 (B), 18620 (nginx).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
[[ $# -ge 2 ]] || { sed -n '2,24p' "$0"; exit 64; }
bin_a=$(realpath "$1") bin_b=$(realpath "$2")
sessions=${3:-1000}
rounds=${4:-5}
spread=${SPREAD_MS:-0}
chats=${CHATS:-3}
[[ ${NGINX:-1} == 1 ]] && ! command -v nginx >/dev/null && { apt-get update -qq && apt-get install -y -qq nginx >/dev/null; }
[[ -n ${PERF_STAT:-} ]] && ! command -v perf >/dev/null && { apt-get update -qq && apt-get install -y -qq linux-perf >/dev/null; }
cargo build --release -q -p loadgen -p cluster
work=$(mktemp -d /tmp/ws-ab.XXXXXX)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; sleep 1; rm -rf "$work"' EXIT

RUST_LOG=warn target/release/cluster --conf benches/conf --port 18600 --status-port 18601 --embedded \
    --proxy-bin "$bin_a" >"$work/cluster.log" 2>&1 &
cluster=$!
pids+=($cluster)
for _ in $(seq 300); do grep -q 'chat cluster is up' "$work/cluster.log" && break; sleep 0.1; done
grep -q 'chat cluster is up' "$work/cluster.log" || { cat "$work/cluster.log" >&2; exit 1; }
mapfile -t backends < <(awk '$1 ~ /^backend-[0-9]+$/ {sub("http://", "", $2); print $2}' "$work/cluster.log")
proxy_a=$(pgrep -P "$cluster" -x "$(basename "$bin_a")" | head -1)

sed -e "s|/tmp/bench-cluster-proxy|$work/b|" -e "s/^\[server\]/[server]\n${SERVER_TOML_B:-}/" -e "${SED_B:-}" \
    benches/conf/proxy.toml >"$work/b.toml"
RUST_LOG=warn PROXY_LISTEN=127.0.0.1:18610 PROXY_STATUS_LISTEN=127.0.0.1:18611 \
    PROXY_BACKENDS=$(IFS=,; echo "${backends[*]}") "$bin_b" --config "$work/b.toml" >"$work/b.log" 2>&1 &
proxy_b=$!
pids+=($proxy_b)
fronts=(A B) ports=(18600 18610) masters=("$proxy_a" "$proxy_b")
if [[ ${NGINX:-1} == 1 ]]; then
    mkdir -p "$work/nginx"
    servers=""; for s in "${backends[@]}"; do servers+="server $s; "; done
    sed -e "s|@WORKERS@|2|" -e "s|@LISTEN@|127.0.0.1:18620|" -e "s|@PREFIX@|$work/nginx|g" \
        -e "s|@SERVERS@|$servers|" benches/nginx.conf.in >"$work/nginx/nginx.conf"
    nginx -c "$work/nginx/nginx.conf" -p "$work/nginx" >"$work/nginx/stdout.log" 2>&1 </dev/null &
    pids+=($!)
    fronts+=(nginx) ports+=(18620) masters+=($!)
fi
if [[ ${DIRECT:-0} == 1 ]]; then
    # Straight to one backend, no front: what the cluster alone adds.
    fronts+=(direct) ports+=("${backends[0]##*:}") masters+=("")
elif [[ ${DIRECT:-0} == spread ]]; then
    direct_ports=""; for b in "${backends[@]}"; do direct_ports+="${direct_ports:+,}${b##*:}"; done
    fronts+=(direct) ports+=("$direct_ports") masters+=("")
fi
for port in ${ports[@]//,/ }; do
    for _ in $(seq 100); do curl -sf -o /dev/null "http://127.0.0.1:$port/api/ai-health" && break; sleep 0.1; done
done

cpu_ticks() { # utime+stime of a master and its workers, in clock ticks (0 for no master)
    local pid stat rest total=0
    [[ -n $1 ]] || { echo 0; return; }
    for pid in "$1" $(pgrep -P "$1" || true); do
        stat=$(cat "/proc/$pid/stat" 2>/dev/null) || continue
        rest=${stat##*) }
        total=$((total + $(awk '{print $12 + $13}' <<<"$rest")))
    done
    echo "$total"
}
sched() { # run-queue wait (ns) and run periods of a master, its workers and their threads
    local pid wait=0 slices=0 a b c
    [[ -n $1 ]] || { echo "0 0"; return; }
    for pid in "$1" $(pgrep -P "$1" || true); do
        for f in /proc/"$pid"/task/*/schedstat; do
            read -r a b c <"$f" 2>/dev/null || continue
            wait=$((wait + b)) slices=$((slices + c))
        done
    done
    echo "$wait $slices"
}
load() { # load PORT[,PORT...] SESSIONS CHATS SPREAD OUT
    local url="" port
    for port in ${1//,/ }; do url+="${url:+,}ws://127.0.0.1:$port/ws/chat"; done
    timeout 300 target/release/loadgen ws --url "$url" --sessions "$2" \
        --chats-per-session "$3" --concurrency 128 --source-ips 64 --chat-timeout 60 --spread-ms "$4" \
        --out "$5" >/dev/null 2>"$work/load.err"
}

echo "warm-up: $sessions sessions, 1 chat, through each front" >&2
for i in "${!fronts[@]}"; do load "${ports[$i]}" "$sessions" 1 0 "$work/warm.json" || true; sleep 1; done
n=${#fronts[@]}
for round in $(seq "$rounds"); do
    for k in $(seq 0 $((n - 1))); do
        i=$(((k + round - 1) % n))
        before=$(cpu_ticks "${masters[$i]}") sched_before=$(sched "${masters[$i]}") cluster_before=$(cpu_ticks "$cluster")
        # bash's `times`: user and system time of this shell's children (the load generator).
        times >"$work/times"; load_before=$(awk 'NR == 2 {print $1 " " $2}' "$work/times")
        perf_pid=""
        if [[ -n ${PERF_STAT:-} && -n ${masters[$i]} ]]; then
            perf stat -e "$PERF_STAT" -p "$(echo "${masters[$i]}" $(pgrep -P "${masters[$i]}") | tr ' ' ,)" \
                -o "$work/${fronts[$i]}-$round.perf" &
            perf_pid=$!
            sleep 0.2
        fi
        load "${ports[$i]}" "$sessions" "$chats" "$spread" "$work/${fronts[$i]}-$round.json" ||
            echo "loadgen failed: $(tail -2 "$work/load.err")" >&2
        [[ -n $perf_pid ]] && { kill -INT "$perf_pid"; wait "$perf_pid" || true; }
        times >"$work/times"; load_after=$(awk 'NR == 2 {print $1 " " $2}' "$work/times")
        after=$(cpu_ticks "${masters[$i]}") sched_after=$(sched "${masters[$i]}") cluster_after=$(cpu_ticks "$cluster")
        echo "$((after - before)) $((cluster_after - cluster_before)) $load_before $load_after" >"$work/${fronts[$i]}-$round.cpu"
        read -r w0 s0 <<<"$sched_before"; read -r w1 s1 <<<"$sched_after"
        echo "$((w1 - w0)) $((s1 - s0))" >"$work/${fronts[$i]}-$round.sched"
        sleep 1
    done
done
python3 - "$work" "$rounds" "$(getconf CLK_TCK)" "${fronts[@]}" <<'PY'
import json, math, statistics, sys
work, rounds, hz, fronts = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
rows = {f: [] for f in fronts}
by_round = {f: {} for f in fronts}  # round -> p99, to pair the fronts
for r in range(1, rounds + 1):
    line = [f"round {r}:"]
    for f in fronts:
        try:
            j = json.load(open(f"{work}/{f}-{r}.json"))
        except Exception:
            line.append(f"{f} failed"); continue
        front, cluster, *times = open(f"{work}/{f}-{r}.cpu").read().split()
        secs = lambda t: float(t[:t.index("m")]) * 60 + float(t[t.index("m") + 1:-1])  # "0m1.234s"
        load = sum(secs(t) for t in times[2:]) - sum(secs(t) for t in times[:2])
        cpu, cluster = int(front) / hz, int(cluster) / hz
        p = j["publish_to_client"]["p99_ms"]
        wait_ns, slices = map(int, open(f"{work}/{f}-{r}.sched").read().split())
        wait_us = wait_ns / 1000 / max(slices, 1)
        by_round[f][r] = p
        rows[f].append((p, cpu, j["lost_chunks"], cluster, load, wait_us, slices))
        line.append(f"{f} p99 {p:6.2f} ms cpu {cpu:4.2f}/{cluster:4.2f}/{load:4.2f} s wait {wait_us:5.1f} us x {slices} lost {j['lost_chunks']}")
    print("  ".join(line))
for f in fronts:
    if rows[f]:
        m = lambda k: statistics.median(r[k] for r in rows[f])
        print(f"{f:6} median p99 {m(0):6.2f} ms  median CPU s: front {m(1):5.2f}, cluster {m(3):5.2f}, "
              f"loadgen {m(4):5.2f}  run-queue wait {m(5):5.1f} us x {m(6):.0f}  lost {sum(r[2] for r in rows[f])}")
# Each front against nginx round by round: how often lower, and the geometric
# mean of the paired ratios with its 95% interval (t, n-1 degrees of freedom).
T95 = dict(zip(range(4, 31), (2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
                              2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052,
                              2.048, 2.045, 2.042)))  # more rounds: about 2
for f in fronts:
    pairs = [(by_round[f][r], by_round["nginx"][r]) for r in by_round[f] if r in by_round.get("nginx", {})]
    if f == "nginx" or len(pairs) < 5:
        continue
    logs = [math.log(a / b) for a, b in pairs]
    mean, half = statistics.mean(logs), T95.get(len(pairs) - 1, 2.0) * statistics.stdev(logs) / math.sqrt(len(pairs))
    print(f"{f:6} against nginx: lower in {sum(a < b for a, b in pairs)} of {len(pairs)} paired rounds, "
          f"p99 ratio (geometric mean) {math.exp(mean):.2f}, 95% interval {math.exp(mean - half):.2f}-{math.exp(mean + half):.2f}")
PY
if [[ -n ${PERF_STAT:-} ]]; then
    for f in "$work"/*.perf; do
        echo "== perf stat, $(basename "$f" .perf) (nonzero counts)"
        awk '$1 ~ /^[0-9,.]+$/ && $1 != "0" && $2 != "seconds" {l = $0; sub(/#.*/, "", l); gsub(/ +/, " ", l); print " " l}' "$f"
    done
fi
echo "(CPU per round: front/cluster/loadgen seconds; wait: the front's mean run-queue wait per run period (schedstat) x its run periods)"
