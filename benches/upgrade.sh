#!/usr/bin/env bash
# wrk with keep-alive connections through a graceful binary upgrade, done as
# the README says: start the new proxy with -u, then SIGQUIT the old one.
# Prints wrk's summary; "Socket errors" and "Non-2xx" are the requests the
# upgrade cost. wrk counts a connection closed after a `Connection: close`
# answer as nothing lost (it reconnects), a connection closed under a request
# as a read error.
#
#   benches/upgrade.sh [CONNECTIONS] [SECONDS]
# Ports: 18601-18603 (backends), 18610/18620 (proxy). Builds release.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
# shellcheck source=benches/lib.sh
. benches/lib.sh
conc=${1:-8}
secs=${2:-10}
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
cargo build --release -q -p proxy -p loadgen
work=$(mktemp -d /tmp/upgrade.XXXXXX)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; [[ -f $work/proxy.pid ]] && kill "$(cat "$work/proxy.pid")" 2>/dev/null; rm -rf "$work"' EXIT
start_http_backends "$work" 18600
sed -e "s|/tmp/bench-proxy|$work/proxy|" -e "s|^pid_file = .*|pid_file = \"$work/proxy.pid\"|" \
    benches/proxy-bench.toml >"$work/proxy.toml"
run_proxy() {
    RUST_LOG=warn PROXY_LISTEN=127.0.0.1:18610 PROXY_STATUS_LISTEN=127.0.0.1:18620 \
        PROXY_BACKENDS=$(IFS=,; echo "${backends[*]}") target/release/proxy --config "$work/proxy.toml" "$@" \
        >>"$work/proxy.log" 2>&1
}
run_proxy &
for _ in $(seq 100); do curl -sf -o /dev/null http://127.0.0.1:18610/health && break; sleep 0.1; done
old=$(cat "$work/proxy.pid")
wrk -t2 -c"$conc" -d"${secs}s" http://127.0.0.1:18610/ >"$work/wrk.txt" 2>&1 &
wrk=$!
sleep $((secs / 3))
run_proxy -u &
for _ in $(seq 100); do [[ -S $work/proxy-upgrade.sock ]] && break; sleep 0.05; done
sleep 0.5
kill -QUIT "$old"
wait "$wrk"
cat "$work/wrk.txt"
new=$(cat "$work/proxy.pid")
echo "old pid $old, new pid $new; old still running: $(kill -0 "$old" 2>/dev/null && echo yes || echo no)"
