#!/usr/bin/env bash
# Several hosts on this one machine: each host is a network namespace with
# its own address, joined by veth links to two switches (Linux bridges in a
# namespace of their own). Needs root (`ip netns`); every address stays
# inside the namespaces this script makes, and nothing listens on the
# machine's own interfaces.
#
#   front 10.77.1.0/24: client .2, proxy-1 .11, proxy-2 .12, backend-N .2N
#   back  10.77.2.0/24: backend-N .2N, ai-N .3N, redis .40 (a Redis Cluster:
#                       6 redis-server, 3 masters and 3 replicas)
#
# Checks (a Python WebSocket client on the client host does the talking):
#   1. the client's proxy is killed mid-answer: the client reconnects through
#      the other proxy and resumes; every seq arrives once, none missing;
#   2. the back link of the backend serving a stream goes down (cut off from
#      Redis and the AI nodes, still reachable by the proxies): both proxies'
#      checks of `/ready` take it out, it closes the socket with 1012, and the
#      client resumes through a proxy on another backend, whole.
#
# Usage: sudo scripts/multihost-test.sh        (about a minute after the build)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
# shellcheck source=scripts/setup.sh
source scripts/setup.sh

[[ $(id -u) == 0 ]] || { echo "multihost-test: needs root (ip netns)" >&2; exit 2; }
ensure_build_tools
command -v ip >/dev/null || apt_install iproute2
command -v redis-server >/dev/null || apt_install redis-server
# Debian's python3, where apt puts python3-websocket (a pyenv python may shadow it).
PYTHON=/usr/bin/python3
[[ -x $PYTHON ]] && "$PYTHON" -c 'import websocket' 2>/dev/null || apt_install python3 python3-websocket
command -v curl >/dev/null || apt_install curl
cargo build -q -p ai-node -p backend -p proxy
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/debug

P=mh$$                      # prefix of every namespace and link made here
WORK=$(mktemp -d /tmp/multihost.XXXXXX)
NAMESPACES=()
PIDS=()
cleanup() {
    local pid ns
    for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    for ns in "${NAMESPACES[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
    if [[ ${KEEP_LOGS:-0} == 1 ]]; then echo "logs kept in $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

log() { printf '[multihost] %s\n' "$*"; }

# --- the network ---------------------------------------------------------------
SW=$P-sw
ip netns add "$SW"; NAMESPACES+=("$SW")
ip -n "$SW" link set lo up
for br in front back; do
    ip -n "$SW" link add "$br" type bridge
    ip -n "$SW" link set "$br" up
done

LINKS=0
host() { # host NAME: a namespace for a host
    ip netns add "$P-$1"; NAMESPACES+=("$P-$1")
    ip -n "$P-$1" link set lo up
}
wire() { # wire HOST SWITCH ADDRESS: a link from HOST to SWITCH, named after the switch
    local ns=$P-$1 br=$2 addr=$3 a b
    LINKS=$((LINKS + 1)); a=$P-a$LINKS; b=$P-b$LINKS
    ip link add "$a" type veth peer name "$b"
    ip link set "$a" netns "$ns"; ip link set "$b" netns "$SW"
    ip -n "$ns" link set "$a" name "$br"
    ip -n "$ns" addr add "$addr/24" dev "$br"
    ip -n "$ns" link set "$br" up
    ip -n "$SW" link set "$b" master "$br"
    ip -n "$SW" link set "$b" up
}
on() { local h=$1; shift; ip netns exec "$P-$h" "$@"; }
# bg HOST CMD...: CMD on HOST in the background; $! is CMD's own pid (exec all the way down).
# Disowned: the shell does not report their ends (the client kills a proxy on purpose).
bg() { local h=$1; shift; ( exec ip netns exec "$P-$h" "$@" ) & disown; }

host client; wire client front 10.77.1.2
for i in 1 2; do host proxy-$i; wire proxy-$i front 10.77.1.1$i; done
for i in 1 2 3; do host backend-$i; wire backend-$i front 10.77.1.2$i; wire backend-$i back 10.77.2.2$i; done
for i in 1 2 3; do host ai-$i; wire ai-$i back 10.77.2.3$i; done
host redis; wire redis back 10.77.2.40
log "network: $(ip netns list | grep -c "^$P-") namespaces on two switches"

# --- the Redis Cluster on its host ---------------------------------------------
seeds=()
for port in 7001 7002 7003 7004 7005 7006; do
    bg redis redis-server --port $port --bind 10.77.2.40 --save "" --appendonly no \
        --cluster-enabled yes --cluster-node-timeout 1000 --cluster-config-file "nodes-$port.conf" \
        --repl-diskless-sync-delay 0 \
        --dir "$WORK" --protected-mode no >"$WORK/redis-$port.log" 2>&1
    PIDS+=($!); seeds+=("10.77.2.40:$port")
done
for port in 7001 7002 7003 7004 7005 7006; do
    for _ in $(seq 100); do on redis redis-cli -h 10.77.2.40 -p $port ping >/dev/null 2>&1 && break; sleep 0.1; done
done
on redis redis-cli --cluster create "${seeds[@]}" --cluster-replicas 1 --cluster-yes >"$WORK/cluster-create.log" 2>&1
for _ in $(seq 100); do
    on redis redis-cli -h 10.77.2.40 -p 7001 cluster info | grep -q cluster_state:ok && break
    sleep 0.2
done
REDIS_URL="redis+cluster://$(IFS=,; echo "${seeds[*]}")"
log "Redis Cluster up: $REDIS_URL"

# --- AI nodes, backends, proxies -------------------------------------------------
cat >"$WORK/ai-node.toml" <<'EOF'
[stream]
lease = "1500ms"
[engine]
kind = "synthetic"
[engine.synthetic]
first_token_ms = 5
tokens_per_second = 10.0
answer_tokens = 120
EOF
for i in 1 2 3; do
    LISTEN_ADDR=10.77.2.3$i:8000 REDIS_URL=$REDIS_URL NODE_ID=ai-$i RUST_LOG=info \
        bg ai-$i "$BIN/ai-node" --config "$WORK/ai-node.toml" >"$WORK/ai-$i.log" 2>&1
    PIDS+=($!)
done
cat >"$WORK/backend.toml" <<'EOF'
[ai]
health_interval = "500ms"
health_timeout = "500ms"
[stream]
stall_timeout = "1s"
close_when_store_lost = "3s"
EOF
for i in 1 2 3; do
    LISTEN_ADDR=10.77.1.2$i:3000 REDIS_URL=$REDIS_URL BACKEND_ID=backend-$i RUST_LOG=info \
        AI_SERVICE_URLS=http://10.77.2.31:8000,http://10.77.2.32:8000,http://10.77.2.33:8000 \
        bg backend-$i "$BIN/backend" --config "$WORK/backend.toml" >"$WORK/backend-$i.log" 2>&1
    PIDS+=($!)
done
PROXY_PIDS=()
for i in 1 2; do
    cat >"$WORK/proxy-$i.toml" <<EOF
[server]
threads = 1
pid_file = "$WORK/proxy-$i.pid"
upgrade_sock = "$WORK/proxy-$i.sock"
[listen]
public = "10.77.1.1$i:8080"
status = "10.77.1.1$i:8090"
[upstreams.backends]
servers = ["10.77.1.21:3000", "10.77.1.22:3000", "10.77.1.23:3000"]
connect_timeout = "1s"
[upstreams.backends.health]
path = "/ready"
interval = "500ms"
timeout = "400ms"
rise = 1
fall = 2
[[routes]]
prefix = "/"
upstream = "backends"
EOF
    RUST_LOG=info bg proxy-$i "$BIN/proxy" --config "$WORK/proxy-$i.toml" >"$WORK/proxy-$i.log" 2>&1
    PIDS+=($!); PROXY_PIDS+=($!)
done

# Every backend sees 3 healthy nodes, through each proxy.
wait_ready() {
    local i url
    for _ in $(seq 150); do
        local ok=1
        for i in 1 2; do
            url=http://10.77.1.1$i:8080/api/ai-health
            on client curl -fsS --max-time 1 "$url" 2>/dev/null | grep -q '"healthy_nodes":3' || ok=0
            on client curl -fsS --max-time 1 "http://10.77.1.1$i:8090/upstreams" 2>/dev/null \
                | "$PYTHON" -c 'import json,sys; b=json.load(sys.stdin)["upstreams"][0]["backends"]; sys.exit(0 if all(x["health"]=="up" for x in b) else 1)' \
                2>/dev/null || ok=0
        done
        [[ $ok == 1 ]] && return 0
        sleep 0.2
    done
    echo "the hosts did not come up; logs:" >&2
    tail -n 20 "$WORK"/*.log >&2
    return 1
}
wait_ready
log "2 proxies, 3 backends, 3 AI nodes up; every backend up in both proxies"

# --- the client ----------------------------------------------------------------
cat >"$WORK/client.py" <<'PY'
"""The client host's side of the checks; prints PASS/FAIL lines, exits 1 on a failure."""
import json, os, signal, subprocess, sys, time, uuid
import websocket

# websocket-client 1.2 (Debian 12) refuses close codes it does not list,
# 1012 (service restart) among them; browsers take it.
websocket._abnf.VALID_CLOSE_STATUS = tuple(websocket._abnf.VALID_CLOSE_STATUS) + (1012, 1013, 1014)

PROXIES = ["10.77.1.11", "10.77.1.12"]
proxy_pid, prefix = int(sys.argv[1]), sys.argv[2]
failed = []

def check(ok, what):
    print(("PASS " if ok else "FAIL ") + what, flush=True)
    if not ok:
        failed.append(what)

def connect(proxy, session):
    ws = websocket.create_connection(f"ws://{proxy}:8080/ws/chat?session_id={session}", timeout=15)
    return ws, ws.getheaders().get("x-backend-id")

def events(ws, request_id, until_seq=None, got=None):
    """Reads events of request_id into got (seq -> event) until until_seq or the end.
    Returns 'end', 'reached', or the way the socket stopped ('closed CODE' / 'cut')."""
    while True:
        try:
            op, data = ws.recv_data(control_frame=False)
        except websocket.WebSocketConnectionClosedException:
            return "cut"
        except (OSError, websocket.WebSocketException) as e:
            return f"cut ({e})"
        if op == websocket.ABNF.OPCODE_CLOSE:
            code = int.from_bytes(data[:2], "big") if len(data) >= 2 else 0
            return f"closed {code}"
        if op != websocket.ABNF.OPCODE_TEXT:
            continue
        frame = json.loads(data)
        if frame.get("request_id") != request_id or frame.get("type") not in ("chunk", "done", "error"):
            continue
        seq = frame["seq"]
        got.setdefault(seq, []).append(frame)
        if frame["type"] != "chunk":
            return "end"
        if until_seq is not None and seq >= until_seq:
            return "reached"

def whole(got):
    seqs = sorted(got)
    repeated = [s for s in seqs if len(got[s]) > 1]
    missing = [s for s in range(1, seqs[-1] + 1) if s not in got] if seqs else []
    last = got[seqs[-1]][0] if seqs else {}
    return repeated, missing, last.get("type")

def chat(ws):
    ws.send(json.dumps({"type": "chat", "message": "a long answer across hosts"}))
    while True:
        frame = json.loads(ws.recv())
        if frame.get("type") == "accepted":
            return frame["request_id"]

# 1. The client's proxy dies mid-answer.
session = f"mh-{uuid.uuid4().hex[:12]}"
ws, first_backend = connect(PROXIES[0], session)
request_id = chat(ws)
got = {}
events(ws, request_id, until_seq=5, got=got)
os.kill(proxy_pid, signal.SIGKILL)
how = events(ws, request_id, got=got)
check(how.startswith("cut") or how.startswith("closed"), f"proxy-1 killed at seq {max(got)}: the socket ends ({how})")
ws, backend = connect(PROXIES[1], session)
ws.send(json.dumps({"type": "resume", "request_id": request_id, "after_seq": max(got)}))
how = events(ws, request_id, got=got)
repeated, missing, end = whole(got)
check(how == "end" and end == "done", f"resumed through proxy-2 (backend {backend}), the answer ends with done")
check(not repeated and not missing, f"{len(got)} events, 0 repeated (seen {repeated}), 0 missing (seen {missing})")
ws.close()

# 2. The serving backend's back link goes down.
session = f"mh-{uuid.uuid4().hex[:12]}"
ws, cut_backend = connect(PROXIES[1], session)
ws.settimeout(60)
request_id = chat(ws)
got = {}
events(ws, request_id, until_seq=5, got=got)
cut_at = time.monotonic()
subprocess.run(["ip", "-n", f"{prefix}-{cut_backend}", "link", "set", "back", "down"], check=True)
how = events(ws, request_id, got=got)
check(how == "closed 1012", f"{cut_backend} cut off from Redis: its socket closes with 1012 ({how}) after {time.monotonic() - cut_at:.1f} s")

def health_of(proxy):
    import urllib.request
    body = json.load(urllib.request.urlopen(f"http://{proxy}:8090/upstreams", timeout=2))
    return {b["addr"]: b["health"] for b in body["upstreams"][0]["backends"]}

cut_addr = "10.77.1.2" + cut_backend.split("-")[1] + ":3000"
deadline = time.monotonic() + 15
while time.monotonic() < deadline and health_of(PROXIES[1]).get(cut_addr) != "down":
    time.sleep(0.2)
check(health_of(PROXIES[1]).get(cut_addr) == "down", f"proxy-2's checks of /ready take {cut_addr} out: {health_of(PROXIES[1])}")
ws, backend = connect(PROXIES[1], session)
check(backend != cut_backend, f"the reconnection lands on {backend}, not {cut_backend}")
ws.send(json.dumps({"type": "resume", "request_id": request_id, "after_seq": max(got)}))
how = events(ws, request_id, got=got)
repeated, missing, end = whole(got)
check(how == "end" and end == "done", "resumed on another backend, the answer ends with done")
check(not repeated and not missing, f"{len(got)} events, 0 repeated (seen {repeated}), 0 missing (seen {missing})")
print(f"client: {len(failed)} failed", flush=True)
sys.exit(1 if failed else 0)
PY
log "client: checks"
if on client "$PYTHON" "$WORK/client.py" "${PROXY_PIDS[0]}" "$P"; then
    log "all checks passed"
else
    echo "multihost-test: FAILED; logs:" >&2
    for f in "$WORK"/backend-*.log "$WORK"/proxy-*.log; do echo "== $f" >&2; tail -n 15 "$f" >&2; done
    exit 1
fi
