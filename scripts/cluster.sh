#!/usr/bin/env bash
# Runs the whole cluster on this machine, the way docker-compose.yml runs it in
# containers: Redis, 3 AI nodes, 3 backends and the edge proxy in front.
# Needs only the Rust toolchain: cmake and redis-server are installed with apt
# when missing (scripts/setup.sh), then everything is built with cargo.
#
# Usage:
#   scripts/cluster.sh          # build (release), start, wait until healthy; Ctrl-C stops all
#   open http://127.0.0.1:8080/ # the chat page; curl .../api/ai-health; :8090/nginx-status
#
# Environment (all optional):
#   CLUSTER_PORT=8080          public port of the proxy
#   CLUSTER_STATUS_PORT=8090   proxy status port (/nginx-status, /metrics, /upstreams)
#   CLUSTER_BIND=127.0.0.1     address the public port binds (0.0.0.0 to share it)
#   CLUSTER_AI_NODES=3         AI nodes, on ports CLUSTER_AI_PORT, +1, ... (default 8001)
#   CLUSTER_BACKENDS=3         backends, on CLUSTER_BACKEND_PORT, +1, ... (default 3001),
#                              metrics on CLUSTER_METRICS_PORT, +1, ... (default 9101)
#   CLUSTER_PROFILE=release    cargo profile to build and run (debug builds faster)
#   CLUSTER_SKIP_BUILD=        1: run the binaries already in target/<profile> as they are
#   CLUSTER_LOG_DIR=           where logs and the generated proxy config go (default: a new temp dir)
#   REDIS_URL=                 a Redis to use; else the one on 127.0.0.1:6379 if it answers,
#                              else a redis-server of our own on a free port (stopped on exit)
#   RUST_LOG=info              log filter of every process
#
# Internal ports bind 127.0.0.1 only: as in compose, only the proxy faces clients.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# shellcheck source=scripts/setup.sh
source scripts/setup.sh

PUBLIC_PORT=${CLUSTER_PORT:-8080}
STATUS_PORT=${CLUSTER_STATUS_PORT:-8090}
BIND=${CLUSTER_BIND:-127.0.0.1}
N_AI=${CLUSTER_AI_NODES:-3}
N_BACKENDS=${CLUSTER_BACKENDS:-3}
AI_PORT=${CLUSTER_AI_PORT:-8001}
BACKEND_PORT=${CLUSTER_BACKEND_PORT:-3001}
METRICS_PORT=${CLUSTER_METRICS_PORT:-9101}
PROFILE=${CLUSTER_PROFILE:-release}
export RUST_LOG=${RUST_LOG:-info}

case "$PROFILE" in
  release) BUILD_FLAGS=(--release) ;;
  debug) BUILD_FLAGS=() ;;
  *) echo "CLUSTER_PROFILE must be release or debug, not '$PROFILE'" >&2; exit 64 ;;
esac

# True when something accepts connections on 127.0.0.1:$1.
port_busy() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Prints the first free port from $1 upwards.
free_port_from() {
  local p=$1
  while port_busy "$p"; do p=$((p + 1)); done
  echo "$p"
}

# --- what runs, for the table and for the cleanup -----------------------------
NAMES=()   # service names, in start order
PIDS=()    # their pids
WHERE=()   # what each one serves, for the table
DEAD=()    # names already reported dead
LOG_DIR=""

cleanup() {
  local status=$?
  trap - INT TERM EXIT
  if [ "${#PIDS[@]}" -gt 0 ]; then
    echo
    echo "== stopping the cluster"
    # Front to back: the proxy stops taking clients first, Redis goes last.
    local i
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
      kill -TERM "${PIDS[$i]}" 2>/dev/null || true
    done
    # The AI nodes may drain in-flight answers for up to shutdown_grace_ms.
    local deadline=$((SECONDS + 15))
    for i in "${!PIDS[@]}"; do
      while kill -0 "${PIDS[$i]}" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
      if kill -0 "${PIDS[$i]}" 2>/dev/null; then
        echo "   ${NAMES[$i]} did not stop in time: killing it"
        kill -KILL "${PIDS[$i]}" 2>/dev/null || true
      fi
      wait "${PIDS[$i]}" 2>/dev/null || true
    done
    echo "== stopped; logs kept in $LOG_DIR"
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start NAME WHERE COMMAND...: runs COMMAND in the background, logging to $LOG_DIR/NAME.log.
start() {
  local name=$1 where=$2
  shift 2
  "$@" >"$LOG_DIR/$name.log" 2>&1 &
  NAMES+=("$name")
  PIDS+=("$!")
  WHERE+=("$where")
}

# Reports (once each) services that exited; returns 1 when any has.
check_alive() {
  local i rc=0
  for i in "${!PIDS[@]}"; do
    if ! kill -0 "${PIDS[$i]}" 2>/dev/null; then
      rc=1
      if [[ " ${DEAD[*]-} " != *" ${NAMES[$i]} "* ]]; then
        DEAD+=("${NAMES[$i]}")
        echo "!! ${NAMES[$i]} exited; last lines of $LOG_DIR/${NAMES[$i]}.log:" >&2
        tail -n 8 "$LOG_DIR/${NAMES[$i]}.log" | sed 's/^/   /' >&2
      fi
    fi
  done
  return "$rc"
}

# --- build ---------------------------------------------------------------------
ensure_build_tools
command -v curl >/dev/null || { echo "== installing curl"; apt_install curl; }

BIN="$ROOT/target/$PROFILE"
if [ -n "${CLUSTER_SKIP_BUILD:-}" ]; then
  echo "== CLUSTER_SKIP_BUILD: using the binaries in $BIN as they are"
else
  echo "== cargo build ${BUILD_FLAGS[*]} -p ai-node -p backend -p proxy"
  cargo build "${BUILD_FLAGS[@]}" --locked -p ai-node -p backend -p proxy
fi
for bin in ai-node backend proxy; do
  [ -x "$BIN/$bin" ] || { echo "!! $BIN/$bin is missing: build it first" >&2; exit 1; }
done

# --- ports -----------------------------------------------------------------------
busy=()
for p in "$PUBLIC_PORT" "$STATUS_PORT" \
  $(seq "$AI_PORT" $((AI_PORT + N_AI - 1))) \
  $(seq "$BACKEND_PORT" $((BACKEND_PORT + N_BACKENDS - 1))) \
  $(seq "$METRICS_PORT" $((METRICS_PORT + N_BACKENDS - 1))); do
  if port_busy "$p"; then busy+=("$p"); fi
done
if [ "${#busy[@]}" -gt 0 ]; then
  echo "!! ports already in use: ${busy[*]}" >&2
  echo "   stop what holds them, or move the cluster (CLUSTER_PORT, CLUSTER_STATUS_PORT," >&2
  echo "   CLUSTER_AI_PORT, CLUSTER_BACKEND_PORT, CLUSTER_METRICS_PORT)" >&2
  exit 1
fi

LOG_DIR=${CLUSTER_LOG_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/chatproxy-cluster.XXXXXX")}
mkdir -p "$LOG_DIR"

# --- Redis -----------------------------------------------------------------------
if [ -n "${REDIS_URL:-}" ]; then
  REDIS="$REDIS_URL"
  REDIS_NOTE="given by REDIS_URL"
elif redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; then
  REDIS="redis://127.0.0.1:6379"
  REDIS_NOTE="the machine's own"
else
  port=$(free_port_from 6390)
  echo "== no Redis on 127.0.0.1:6379: starting redis-server on port $port (stopped on exit)"
  start redis "redis://127.0.0.1:$port (ours)" \
    redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$LOG_DIR"
  for _ in $(seq 50); do redis-cli -p "$port" ping 2>/dev/null | grep -q PONG && break; sleep 0.1; done
  redis-cli -p "$port" ping 2>/dev/null | grep -q PONG || { check_alive || true; echo "!! redis-server did not start" >&2; exit 1; }
  REDIS="redis://127.0.0.1:$port"
  REDIS_NOTE="ours, stopped on exit"
fi

# --- AI nodes --------------------------------------------------------------------
AI_URLS=()
for i in $(seq "$N_AI"); do
  port=$((AI_PORT + i - 1))
  AI_URLS+=("http://127.0.0.1:$port")
  start "ai-$i" "http://127.0.0.1:$port" \
    env LISTEN_ADDR="127.0.0.1:$port" REDIS_URL="$REDIS" NODE_ID="ai-$i" \
    "$BIN/ai-node" --config "$ROOT/conf/ai-node.toml"
done
AI_SERVICE_URLS=$(IFS=,; echo "${AI_URLS[*]}")

# --- backends --------------------------------------------------------------------
BACKEND_ADDRS=()
for i in $(seq "$N_BACKENDS"); do
  port=$((BACKEND_PORT + i - 1))
  metrics=$((METRICS_PORT + i - 1))
  BACKEND_ADDRS+=("127.0.0.1:$port")
  start "backend-$i" "http://127.0.0.1:$port  (metrics :$metrics)" \
    env LISTEN_ADDR="127.0.0.1:$port" METRICS_LISTEN_ADDR="127.0.0.1:$metrics" REDIS_URL="$REDIS" \
    AI_SERVICE_URLS="$AI_SERVICE_URLS" BACKEND_ID="backend-$i" \
    "$BIN/backend" --config "$ROOT/conf/backend.toml"
done

# --- proxy -----------------------------------------------------------------------
# The shipped config, with its pid file and upgrade socket moved into our own
# directory so two clusters (or a test) never share them; listeners and
# backends come from the environment, which overrides the file.
PROXY_CONF="$LOG_DIR/proxy.toml"
sed -e "s|^pid_file = .*|pid_file = \"$LOG_DIR/proxy.pid\"|" \
    -e "s|^upgrade_sock = .*|upgrade_sock = \"$LOG_DIR/proxy_upgrade.sock\"|" \
    conf/proxy.toml >"$PROXY_CONF"
export PROXY_LISTEN="$BIND:$PUBLIC_PORT"
export PROXY_STATUS_LISTEN="127.0.0.1:$STATUS_PORT"
PROXY_BACKENDS=$(IFS=,; echo "${BACKEND_ADDRS[*]}")
export PROXY_BACKENDS
"$BIN/proxy" --config "$PROXY_CONF" --test >/dev/null
start proxy "http://$BIND:$PUBLIC_PORT  (status http://127.0.0.1:$STATUS_PORT)" \
  "$BIN/proxy" --config "$PROXY_CONF"

# --- wait until the whole path answers ----------------------------------------------
URL="http://127.0.0.1:$PUBLIC_PORT"
echo "== waiting for $URL/api/ai-health to show $N_AI healthy nodes"
healthy=""
for _ in $(seq 120); do
  if ! check_alive; then
    echo "!! a process of the cluster died while starting; logs in $LOG_DIR" >&2
    exit 1
  fi
  body=$(curl -fsS -m 2 "$URL/api/ai-health" 2>/dev/null || true)
  healthy=$(sed -n 's/.*"healthy_nodes":\([0-9]*\).*/\1/p' <<<"$body")
  [ "${healthy:-0}" -ge "$N_AI" ] && break
  sleep 0.5
done
if [ "${healthy:-0}" -lt "$N_AI" ]; then
  echo "!! not ready after 60 s: $URL/api/ai-health says: ${body:-nothing}" >&2
  echo "   logs in $LOG_DIR" >&2
  exit 1
fi

# --- what runs where -------------------------------------------------------------
echo
echo "== cluster up ($PROFILE build): $N_AI AI nodes, $N_BACKENDS backends, Redis $REDIS ($REDIS_NOTE)"
printf '   %-11s %-7s %s\n' SERVICE PID ADDRESS
for i in "${!PIDS[@]}"; do
  printf '   %-11s %-7s %s\n' "${NAMES[$i]}" "${PIDS[$i]}" "${WHERE[$i]}"
done
echo
echo "   chat page     $URL/"
echo "   AI health     curl -s $URL/api/ai-health"
echo "   a chat        curl -s -XPOST $URL/api/chat -H 'content-type: application/json' -d '{\"session_id\":\"s-1\",\"message\":\"Hello\"}'"
echo "   proxy status  curl -s http://127.0.0.1:$STATUS_PORT/nginx-status   (/metrics, /upstreams)"
echo "   logs          $LOG_DIR/<service>.log"
echo "   stop one      kill <pid> (the rest keep running; the proxy and backends route around it)"
echo
echo "== running; Ctrl-C stops everything"

# Keeps running while anything does; a service that dies is reported, not fatal,
# so stopping an AI node by hand to watch the retry is fine.
while :; do
  check_alive || true
  [ "${#DEAD[@]}" -lt "${#PIDS[@]}" ] || { echo "!! every process has exited" >&2; exit 1; }
  sleep 1 &
  wait $! || true
done
