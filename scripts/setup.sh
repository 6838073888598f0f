# Set-up steps shared by the project's scripts; source it, then call what you need.
# Each step does nothing when what it provides is already there.

# apt-get install, as root or through sudo, updating the package lists once.
apt_install() {
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  if [ -z "${APT_UPDATED:-}" ]; then
    $sudo apt-get update -qq
    APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

# Says how much disk the build has: a test build from scratch needs about
# 6 GB (target/ plus fuzz/target/); with less, the run stops here saying so
# rather than failing later in a compiler.
check_disk() {
  local need_mb=${1:-6000} free_mb
  free_mb=$(df --output=avail -BM . | tail -1 | tr -dc 0-9)
  echo "== disk: ${free_mb} MB free here (a build from scratch needs about ${need_mb} MB)"
  if [ "$free_mb" -lt 1500 ]; then
    echo "not enough disk to build: free some (old target/ directories, /tmp) and run again" >&2
    return 1
  fi
}

# Pingora's build needs cmake (and a C compiler, which rustup machines have).
ensure_build_tools() {
  command -v cmake >/dev/null || { echo "== installing cmake"; apt_install cmake; }
  command -v redis-server >/dev/null || { echo "== installing redis-server"; apt_install redis-server; }
}

# Exports TEST_REDIS_URL: REDIS_URL when given, else the machine's Redis on
# 127.0.0.1:6379, else a redis-server of our own on a free port (stopped on exit).
ensure_redis() {
  if [ -n "${REDIS_URL:-}" ]; then
    export TEST_REDIS_URL="$REDIS_URL"
  elif redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; then
    export TEST_REDIS_URL="redis://127.0.0.1:6379"
  else
    local port
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null || echo 6390)
    echo "== no Redis on 127.0.0.1:6379: starting redis-server on port $port"
    redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --daemonize yes \
      --pidfile "/tmp/chat-test-redis-$port.pid" --logfile "/tmp/chat-test-redis-$port.log"
    for _ in $(seq 50); do redis-cli -p "$port" ping 2>/dev/null | grep -q PONG && break; sleep 0.1; done
    OWN_REDIS_PIDFILE="/tmp/chat-test-redis-$port.pid"
    trap stop_own_redis EXIT
    export TEST_REDIS_URL="redis://127.0.0.1:$port"
  fi
}

# Stops the redis-server ensure_redis started, if it started one.
stop_own_redis() {
  if [ -n "${OWN_REDIS_PIDFILE:-}" ] && [ -f "$OWN_REDIS_PIDFILE" ]; then
    kill "$(cat "$OWN_REDIS_PIDFILE")" 2>/dev/null || true
  fi
}

# Exports OPENAI_PYTHON: a Python with OpenAI's official `openai` package (from
# PyPI), in a virtualenv under target/ made on first use, for the test that
# points the SDK at the proxy. Debian's python3 may lack venv: installed then.
ensure_openai_sdk() {
  local venv=target/openai-sdk
  command -v python3 >/dev/null || apt_install python3 python3-venv
  if ! "$venv/bin/python" -c 'import openai' 2>/dev/null; then
    echo "== installing the openai Python package into $venv"
    python3 -m venv "$venv" 2>/dev/null || { apt_install python3-venv && python3 -m venv "$venv"; }
    "$venv/bin/pip" install -q --disable-pip-version-check 'openai>=1.40,<3'
  fi
  OPENAI_PYTHON="$(pwd)/$venv/bin/python"
  export OPENAI_PYTHON
}
