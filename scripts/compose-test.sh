#!/usr/bin/env bash
# The compose deployment, run for real: builds the image, brings
# docker-compose.yml up and runs the old system's checks through the proxy's
# published port, then takes the stack down again (always, also on failure).
#
#   1. /api/ai-health shows 3 healthy AI nodes
#   2. chats (POST /api/chat) land on more than one AI node
#   3. a WebSocket answer arrives whole (seq 1..n then done, the same text as
#      the same message over SSE)
#   4. `docker-compose stop ai-1`: chats still get 202, from the other nodes
#   5. `docker-compose up -d --scale ai=2 ai`: two replicas join, chats reach
#      them, and no backend or proxy container was restarted
#   6. `docker-compose kill -s HUP proxy`: the proxy reloads (its metrics count
#      it), a WebSocket opened before the signal answers again after it, and
#      new chats succeed
# Each check prints PASS or FAIL; the exit status is non-zero if any failed.
#
# What it needs, installed with apt where missing (Debian 12, as root or with
# sudo): docker.io (the engine), docker-compose (v1), debootstrap, curl and
# python3-websocket. When `docker info` does not answer it starts dockerd in
# the background (log: $TMPDIR/compose-test-dockerd.log) and leaves it running.
#
# No image registry is needed (these machines reach none): the base image is
# made with debootstrap from the host's Debian mirror, with curl and
# redis-server in it, once (kept as chatproxy-base:bookworm; delete it to make
# it again); the stack's image is Dockerfile.prebuilt over that base with the
# binaries of `cargo build --release` on this host; the same base serves as
# the Redis image. See ../shared/reference/docker-here.md for why.
#
# Environment:
#   COMPOSE_TEST_BIN_DIR   a directory holding release ai-node, backend and
#                          proxy to use as they are (default: run
#                          `cargo build --release` and use target/release)
#   COMPOSE_TEST_BASE      the base image (default chatproxy-base:bookworm,
#                          made as above when missing; any Debian 12 image
#                          with curl and redis-server will do)
#   COMPOSE_TEST_KEEP=1    leave the stack up at the end (for a look around;
#                          the script prints the `down` command)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/setup.sh
source scripts/setup.sh

started=$SECONDS
BASE_IMAGE=${COMPOSE_TEST_BASE:-chatproxy-base:bookworm}
# Own names, so a run never touches a stack or image someone else uses.
PROJECT=chatproxy-test-$$
IMAGE=chatproxy:compose-test
# Debian's python3, where apt puts python3-websocket (a pyenv python may shadow it).
PYTHON=/usr/bin/python3
failures=0

# as_root CMD...: runs CMD as root, through sudo when we are not root.
as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

pass() { echo "PASS  $*"; }
fail() {
  echo "FAIL  $*"
  failures=$((failures + 1))
}

# free_port: prints a TCP port nothing listens on now.
free_port() {
  "$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# json EXPR: evaluates a Python expression over the JSON document on stdin
# (bound to `j`) and prints the result.
json() {
  "$PYTHON" -c 'import json,sys; j=json.load(sys.stdin); print(eval(sys.argv[1]))' "$1"
}

# ------------------------------------------------------------ set-up ----

echo "== tools"
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v curl >/dev/null || missing+=(curl)
[ -x "$PYTHON" ] && "$PYTHON" -c 'import websocket' 2>/dev/null || missing+=(python3 python3-websocket)
if [ ${#missing[@]} -gt 0 ]; then
  echo "   installing ${missing[*]}"
  apt_install "${missing[@]}"
fi
# docker.io brings a client too; an older or newer one already on the PATH
# talks to this engine as well (the API version is negotiated).
command -v docker >/dev/null || { echo "no docker client after installing docker.io" >&2; exit 1; }

echo "== Docker engine"
if ! docker info >/dev/null 2>&1; then
  dockerd_log=${TMPDIR:-/tmp}/compose-test-dockerd.log
  echo "   none answers: starting dockerd (log: $dockerd_log; it keeps running afterwards)"
  as_root sh -c "nohup dockerd >'$dockerd_log' 2>&1 &"
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { tail -20 "$dockerd_log"; echo "dockerd did not come up" >&2; exit 1; }
fi
echo "   engine $(docker version -f '{{.Server.Version}}')"

echo "== base image $BASE_IMAGE"
if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  echo "   present (cached)"
else
  # The mirror apt already uses here (deb822 sources first, then sources.list).
  mirror=$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
  [ -n "$mirror" ] || mirror=$(awk '$1 == "deb" && $3 == "bookworm" { print $2; exit }' /etc/apt/sources.list 2>/dev/null)
  mirror=${mirror:-http://deb.debian.org/debian}
  rootfs=$(mktemp -d "${TMPDIR:-/tmp}/chatproxy-base.XXXXXX")
  echo "   debootstrap bookworm from $mirror into $rootfs (about a minute)"
  as_root debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1 ||
    { tail -20 "$rootfs.log"; echo "debootstrap failed" >&2; exit 1; }
  as_root cp /etc/resolv.conf "$rootfs/etc/"
  for sources in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
    [ -f "$sources" ] && as_root cp "$sources" "$rootfs$sources"
  done
  # policy-rc.d forbids starting services inside the chroot: without it the
  # redis-server package would start a Redis on the host's port 6379.
  as_root sh -c "printf '#!/bin/sh\nexit 101\n' >'$rootfs/usr/sbin/policy-rc.d' && chmod +x '$rootfs/usr/sbin/policy-rc.d'"
  as_root chroot "$rootfs" sh -c 'apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      ca-certificates curl passwd redis-server >/dev/null &&
    apt-get clean && rm -rf /var/lib/apt/lists/* /usr/sbin/policy-rc.d' >>"$rootfs.log" 2>&1 ||
    { tail -20 "$rootfs.log"; echo "installing into the base failed" >&2; exit 1; }
  as_root tar -C "$rootfs" -c . | docker import - "$BASE_IMAGE" >/dev/null
  as_root rm -rf "$rootfs" "$rootfs.log"
  echo "   made $BASE_IMAGE"
fi

echo "== binaries"
if [ -n "${COMPOSE_TEST_BIN_DIR:-}" ]; then
  bin_dir=$COMPOSE_TEST_BIN_DIR
  echo "   using $bin_dir as it is"
else
  command -v cmake >/dev/null || { echo "   installing cmake"; apt_install cmake; }
  cargo build --release --locked -p ai-node -p backend -p proxy
  bin_dir=${CARGO_TARGET_DIR:-target}/release
fi
for bin in ai-node backend proxy; do
  [ -x "$bin_dir/$bin" ] || { echo "no $bin_dir/$bin" >&2; exit 1; }
done

echo "== image $IMAGE (Dockerfile.prebuilt on $BASE_IMAGE)"
context=$(mktemp -d "${TMPDIR:-/tmp}/chatproxy-image.XXXXXX")
mkdir "$context/bin"
cp "$bin_dir/ai-node" "$bin_dir/backend" "$bin_dir/proxy" "$context/bin/"
cp -r conf "$context/conf"
# The classic builder: BuildKit would want to fetch its frontend image. (It
# says it is deprecated; its output is shown only when the build fails.)
DOCKER_BUILDKIT=0 docker build -f Dockerfile.prebuilt --build-arg BASE="$BASE_IMAGE" -t "$IMAGE" "$context" \
  >"$context.log" 2>&1 || { cat "$context.log"; echo "the image did not build" >&2; exit 1; }
rm -rf "$context" "$context.log"

# ------------------------------------------------------------- stack ----

# What the compose file takes from the environment (its defaults: redis:7,
# chatproxy:local, ports 8080 and 8090, the three named nodes).
PORT=$(free_port)
STATUS_PORT=$(free_port)
export CHAT_IMAGE=$IMAGE CHAT_REDIS_IMAGE=$BASE_IMAGE CHAT_PORT=$PORT CHAT_STATUS_PORT=$STATUS_PORT
# http://ai:8000 names the replicas of the `ai` service added in check 5.
export CHAT_AI_SERVICE_URLS=http://ai-1:8000,http://ai-2:8000,http://ai-3:8000,http://ai:8000
URL=http://127.0.0.1:$PORT

# compose ARGS...: docker-compose on this project.
compose() { docker-compose -p "$PROJECT" -f docker-compose.yml "$@"; }

# progress: docker-compose's output, indented, without the "... " lines it
# prints before each "... done" when it has no terminal.
progress() { tr -d '\r' | { grep -v '\.\.\. *$' || true; } | sed 's/^/   /'; }

finish() {
  local status=$?
  if [ $status -ne 0 ] || [ $failures -gt 0 ]; then
    echo "== state at the end"
    compose --profile replicas ps || true
    compose --profile replicas logs --no-color --tail=15 2>/dev/null | tail -120 || true
  fi
  if [ -n "${COMPOSE_TEST_KEEP:-}" ]; then
    echo "== left up: docker-compose -p $PROJECT --profile replicas down --remove-orphans"
  else
    echo "== down"
    compose --profile replicas down --remove-orphans --timeout 5 >/dev/null 2>&1 ||
      echo "   down failed: run docker-compose -p $PROJECT --profile replicas down"
  fi
  rm -rf "${tmp:-}"
  echo "== $((SECONDS - started)) s"
  [ $status -eq 0 ] && [ $failures -gt 0 ] && status=1
  exit $status
}
trap finish EXIT
tmp=$(mktemp -d "${TMPDIR:-/tmp}/compose-test.XXXXXX")

echo "== up: project $PROJECT, proxy published on $URL (status on 127.0.0.1:$STATUS_PORT)"
compose up -d --no-build 2>&1 | progress

# Keys are on in the compose file: issue one from a backend (which stores it
# in Redis), retried until the backend's container answers.
echo "== an API key"
key=
for _ in $(seq 60); do
  key=$(compose exec -T backend-1 backend --config /etc/chatproxy/backend.toml new-key --id compose-test 2>/dev/null) && break
  sleep 1
done
[ -n "$key" ] || { echo "no API key could be made" >&2; exit 1; }
auth=(-H "Authorization: Bearer $key")

# health: prints /api/ai-health through the proxy ({} when it does not answer).
health() { curl -fsS -m 5 "${auth[@]}" "$URL/api/ai-health" 2>/dev/null || echo '{}'; }

# healthy_urls: prints the URL of every healthy node, one a line.
healthy_urls() {
  health | json '"\n".join(n["url"] for n in j.get("nodes", []) if n["status"] == "healthy")' | sed '/^$/d'
}

# chats N LABEL: sends N chats through the proxy; prints one line per chat,
# "<http status> <node> <backend id>" (- where there is none).
chats() {
  local i status
  for i in $(seq "$1"); do
    status=$(curl -sS -m 30 -D "$tmp/head" -o "$tmp/body" -w '%{http_code}' "${auth[@]}" \
      -H 'content-type: application/json' "$URL/api/chat" \
      -d "{\"session_id\":\"compose-$2-$i\",\"message\":\"$2 $i\",\"user_id\":\"user1\"}" 2>/dev/null) || status=000
    echo "$status $(json 'j.get("node", "-")' <"$tmp/body" 2>/dev/null || echo -)" \
      "$(tr -d '\r' <"$tmp/head" | awk -F': ' 'tolower($1) == "x-backend-id" { b = $2 } END { print b ? b : "-" }')"
  done
}

# ws_answer SESSION MESSAGE [BETWEEN]: over one WebSocket through the proxy,
# sends MESSAGE and checks the answer is whole: "accepted", chunks seq 1..n,
# then "done" with seq n+1, the text equal to the same message's answer over
# SSE. With BETWEEN, runs that shell command after the first answer and asks
# again on the same socket. Prints what it saw; exits non-zero on a fault.
ws_answer() {
  "$PYTHON" - "$URL" "$key" "$@" <<'PY'
import json, subprocess, sys, urllib.request
import websocket

url, key, session, message = sys.argv[1:5]
between = sys.argv[5] if len(sys.argv) > 5 else None

def sse_text():
    req = urllib.request.Request(url + "/api/chat", method="POST",
        data=json.dumps({"session_id": session + "-sse", "message": message}).encode(),
        headers={"content-type": "application/json", "accept": "text/event-stream",
                 "authorization": "Bearer " + key})
    text = []
    with urllib.request.urlopen(req, timeout=30) as r:
        for line in r:
            if line.startswith(b"data: "):
                event = json.loads(line[6:])
                if event["type"] == "chunk":
                    text.append(event["delta"])
                elif event["type"] in ("done", "error"):
                    break
    return "".join(text)

def ask(ws):
    ws.send(json.dumps({"type": "chat", "message": message}))
    seqs, text, request = [], [], None
    while True:
        event = json.loads(ws.recv())
        if event["type"] == "accepted":
            request = event["request_id"]
        elif event.get("request_id") != request:
            continue
        elif event["type"] == "chunk":
            seqs.append(event["seq"]); text.append(event["delta"])
        elif event["type"] == "done":
            seqs.append(event["seq"])
            break
        else:
            sys.exit(f"the answer ended with {event}")
    if seqs != list(range(1, len(seqs) + 1)):
        sys.exit(f"seqs not 1..n: {seqs}")
    return len(seqs) - 1, "".join(text)

expected = sse_text()
ws = websocket.create_connection(url.replace("http", "ws", 1) + "/ws/chat?session_id=" + session,
                                 header=["Authorization: Bearer " + key], timeout=30)
chunks, text = ask(ws)
if text != expected:
    sys.exit(f"WebSocket text {text!r} differs from SSE's {expected!r}")
print(f"{chunks} chunks, seq 1..{chunks + 1}, text equal to the SSE answer ({len(text)} chars)")
if between:
    subprocess.run(between, shell=True, check=True, stdout=subprocess.DEVNULL)
    chunks, again = ask(ws)
    if again != expected:
        sys.exit(f"after {between!r}: text {again!r} differs from {expected!r}")
    print(f"after {between!r}, the same socket: {chunks} chunks, whole")
ws.close()
PY
}

# started_at SERVICE...: prints each service's container id and start time.
started_at() {
  local s
  for s in "$@"; do
    docker inspect -f '{{.Name}} {{.Id}} {{.State.StartedAt}}' "$(compose ps -q "$s")"
  done
}

# ------------------------------------------------------------ checks ----

echo "== 1. three healthy AI nodes"
for _ in $(seq 90); do
  [ "$(health | json 'j.get("healthy_nodes", 0)')" -ge 3 ] && break
  sleep 1
done
nodes=$(health)
if [ "$(echo "$nodes" | json 'j.get("healthy_nodes", 0)')" -eq 3 ]; then
  pass "ai-health: $(echo "$nodes" | json '", ".join(n["url"] + " " + n["status"] for n in j["nodes"])')"
else
  fail "ai-health after 90 s: $nodes"
fi

echo "== 2. chats go round the AI nodes"
chats 9 round >"$tmp/round"
accepted=$(awk '$1 == 202' "$tmp/round" | wc -l)
spread=$(awk '$1 == 202 { print $2 }' "$tmp/round" | sort | uniq -c | awk '{ printf "%s x%s  ", $2, $1 }')
if [ "$accepted" -eq 9 ] && [ "$(awk '$1 == 202 { print $2 }' "$tmp/round" | sort -u | wc -l)" -ge 2 ]; then
  pass "9 of 9 chats 202, on $spread"
else
  fail "$accepted of 9 chats 202, on $spread"
fi
# All from this host arrive at the proxy from the bridge's gateway address, so
# client-IP stickiness pins them to one backend (README, "Deploy with Docker Compose").
echo "      backends seen: $(awk '{ print $3 }' "$tmp/round" | sort | uniq -c | awk '{ printf "%s x%s  ", $2, $1 }')"

echo "== 3. a WebSocket answer arrives whole"
if out=$(ws_answer "compose-ws" "Hello over the socket" 2>&1); then
  pass "$out"
else
  fail "$out"
fi

echo "== 4. docker-compose stop ai-1: chats still succeed"
compose stop ai-1 2>&1 | progress
chats 9 stopped >"$tmp/stopped"
accepted=$(awk '$1 == 202' "$tmp/stopped" | wc -l)
spread=$(awk '$1 == 202 { print $2 }' "$tmp/stopped" | sort | uniq -c | awk '{ printf "%s x%s  ", $2, $1 }')
if [ "$accepted" -eq 9 ] && ! awk '{ print $2 }' "$tmp/stopped" | grep -q '//ai-1:'; then
  pass "9 of 9 chats 202 with ai-1 stopped, on $spread"
else
  fail "$accepted of 9 chats 202 with ai-1 stopped, on $spread"
fi

echo "== 5. docker-compose up -d --scale ai=2 ai: replicas join, nothing restarts"
before=$(started_at backend-1 backend-2 backend-3 proxy ai-2 ai-3)
healthy_before=$(healthy_urls)
# --no-deps: Redis runs already; only the new replicas start.
compose up -d --no-build --no-deps --scale ai=2 ai 2>&1 | progress
joined=
for _ in $(seq 60); do
  joined=$(healthy_urls | grep -vxF "$healthy_before" || true)
  [ "$(echo "$joined" | sed '/^$/d' | wc -l)" -ge 2 ] && break
  sleep 1
done
chats 12 scaled >"$tmp/scaled"
on_new=$(awk '$1 == 202 { print $2 }' "$tmp/scaled" | grep -cxF "$joined" || true)
after=$(started_at backend-1 backend-2 backend-3 proxy ai-2 ai-3)
if [ "$(echo "$joined" | sed '/^$/d' | wc -l)" -ge 2 ] && [ "$on_new" -ge 1 ] && [ "$before" = "$after" ] &&
  [ "$(awk '$1 == 202' "$tmp/scaled" | wc -l)" -eq 12 ]; then
  pass "healthy now: $(echo "$joined" | tr '\n' ' ')(new), $on_new of 12 chats on them; backends, proxy and ai-2/3 not restarted"
else
  fail "joined: [$(echo "$joined" | tr '\n' ' ')], $on_new of 12 chats on them, containers unchanged: $([ "$before" = "$after" ] && echo yes || echo no)"
  cat "$tmp/scaled"
fi

echo "== 6. docker-compose kill -s HUP proxy: it keeps serving"
reloads() {
  curl -fsS -m 5 "http://127.0.0.1:$STATUS_PORT/metrics" |
    awk '/^proxy_config_reloads_total\{result="applied"\}/ { print $2; found = 1 } END { if (!found) print 0 }'
}
proxy_before=$(started_at proxy)
reloads_before=$(reloads)
# The signal is sent between two answers on one socket, opened before it.
if out=$(ws_answer "compose-hup" "Hello across a reload" \
  "docker-compose -p $PROJECT -f docker-compose.yml kill -s HUP proxy && sleep 2" 2>&1); then
  ws_ok=1
else
  ws_ok=
fi
chats 5 reloaded >"$tmp/reloaded"
accepted=$(awk '$1 == 202' "$tmp/reloaded" | wc -l)
reloads_after=$(reloads)
if [ -n "$ws_ok" ] && [ "$accepted" -eq 5 ] && [ "$reloads_after" -gt "$reloads_before" ] &&
  [ "$proxy_before" = "$(started_at proxy)" ]; then
  pass "reloads applied $reloads_before -> $reloads_after, same process; $(echo "$out" | tail -1); 5 of 5 new chats 202"
else
  fail "reloads $reloads_before -> $reloads_after, $accepted of 5 chats 202, socket: $out"
fi

echo "== $((6 - failures)) of 6 checks passed"
