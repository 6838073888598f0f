#!/usr/bin/env bash
# Per-component costs for the capacity model (benches/results/capacity.md):
# one Redis, one AI node and one backend as separate release processes, and
# the load generator streaming answers straight to the backend. The CPU of
# each process is read from /proc before and after, so each part's cost per
# event (or per stream) follows from the same run. Then the backplane alone:
# `loadgen ledger` writes events through the EMIT script as fast as one Redis
# takes them.
#
# Usage:  benches/capacity.sh                (about 2 minutes after the build)
#   STREAMS [1000]   concurrent answers (40 chunks at 20/s each, 3 in turn)
#   PRODUCERS [64]   concurrent writers for the Redis-alone step
#   OUT [benches/results/raw/capacity.json]
# Only loopback; ports are free ones picked at start.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
# shellcheck source=scripts/setup.sh
source scripts/setup.sh
ensure_build_tools
command -v redis-server >/dev/null || apt_install redis-server
command -v curl >/dev/null || apt_install curl
STREAMS=${STREAMS:-1000}
PRODUCERS=${PRODUCERS:-64}
OUT=${OUT:-$ROOT/benches/results/raw/capacity.json}
mkdir -p "$(dirname "$OUT")"
cargo build --release -q -p ai-node -p backend -p loadgen
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
WORK=$(mktemp -d /tmp/capacity.XXXXXX)
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT
log() { printf '[capacity] %s\n' "$*" >&2; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cpu_ticks() { # utime+stime of PID, in clock ticks
    local stat rest
    stat=$(cat "/proc/$1/stat"); rest=${stat##*) }
    awk '{print $12 + $13}' <<<"$rest"
}
rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
wait_http() {
    for _ in $(seq 100); do curl -fsS --max-time 1 "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done
    echo "no answer from $1" >&2; return 1
}
HZ=$(getconf CLK_TCK)

REDIS_PORT=$(free_port); AI_PORT=$(free_port); BACKEND_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no >"$WORK/redis.log" 2>&1 &
REDIS_PID=$!; PIDS+=($REDIS_PID)
for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
REDIS=redis://127.0.0.1:$REDIS_PORT

LISTEN_ADDR=127.0.0.1:$AI_PORT REDIS_URL=$REDIS RUST_LOG=warn \
    "$BIN/ai-node" --config benches/conf/ai-node.toml >"$WORK/ai.log" 2>&1 &
AI_PID=$!; PIDS+=($AI_PID)
LISTEN_ADDR=127.0.0.1:$BACKEND_PORT METRICS_LISTEN_ADDR=127.0.0.1:$(free_port) REDIS_URL=$REDIS \
    AI_SERVICE_URLS=http://127.0.0.1:$AI_PORT RUST_LOG=warn \
    "$BIN/backend" --config benches/conf/backend.toml >"$WORK/backend.log" 2>&1 &
BACKEND_PID=$!; PIDS+=($BACKEND_PID)
wait_http "http://127.0.0.1:$AI_PORT/health"
wait_http "http://127.0.0.1:$BACKEND_PORT/health"
for _ in $(seq 100); do
    curl -fsS "http://127.0.0.1:$BACKEND_PORT/api/ai-health" | grep -q '"healthy_nodes":1' && break
    sleep 0.1
done

log "streams: $STREAMS answers at once, straight to one backend (one AI node, one Redis)"
before=("$(cpu_ticks $REDIS_PID)" "$(cpu_ticks $AI_PID)" "$(cpu_ticks $BACKEND_PID)")
rss_before=("$(rss_kb $AI_PID)" "$(rss_kb $BACKEND_PID)")
started=$(date +%s.%N)
"$BIN/loadgen" ws --url "ws://127.0.0.1:$BACKEND_PORT/ws/chat" --sessions "$STREAMS" --chats-per-session 3 \
    --spread-ms 50 --no-progress --out "$WORK/streams.json" >/dev/null
ended=$(date +%s.%N)
after=("$(cpu_ticks $REDIS_PID)" "$(cpu_ticks $AI_PID)" "$(cpu_ticks $BACKEND_PID)")

log "Redis alone: $PRODUCERS writers through the EMIT script"
ledger_before=$(cpu_ticks $REDIS_PID)
"$BIN/loadgen" ledger --redis "$REDIS" --producers "$PRODUCERS" --secs 5 --out "$WORK/ledger.json" >/dev/null

python3 - "$WORK/streams.json" "$WORK/ledger.json" "$HZ" "$started" "$ended" \
    "${before[@]}" "${after[@]}" "${rss_before[@]}" >"$OUT" <<'PY'
import json, sys
streams, ledger = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
hz, t0, t1 = int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
before, after = [int(x) for x in sys.argv[6:9]], [int(x) for x in sys.argv[9:12]]
cpu = {name: (a - b) / hz for name, a, b in zip(("redis", "ai_node", "backend"), after, before)}
chunks = streams["chunks"]
secs = t1 - t0
out = {
    "streams": streams["sessions"],
    "seconds": round(secs, 2),
    "chunks": round(chunks),
    "chunks_per_sec": round(streams["chunks_per_sec"]),
    "lost_chunks": streams["lost_chunks"],
    "complete": streams["complete"], "chats": streams["chats"],
    "publish_to_client_p99_ms": streams["publish_to_client"]["p99_ms"],
    "cpu_s": {k: round(v, 2) for k, v in cpu.items()},
    "events_per_cpu_s": {k: round(chunks / v) if v else None for k, v in cpu.items()},
    "ledger": ledger,
}
json.dump(out, sys.stdout, indent=2)
PY
cat "$OUT"
