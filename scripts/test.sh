#!/usr/bin/env bash
# The project's test command (the README's, and what .ci/run runs).
# On a fresh Debian machine with only the Rust toolchain it installs what the
# build and the tests need, makes sure a Redis answers, runs every cargo test,
# then each fuzz target for 10 s (scripts/fuzz.sh), then the browser test of
# the chat page against a cluster it starts, then (as root) the several-hosts
# test in network namespaces (scripts/multihost-test.sh).
# Arguments go to `cargo test`; with any, the fuzzing and the browser test are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/setup.sh
source scripts/setup.sh

check_disk
ensure_build_tools
ensure_redis
ensure_openai_sdk

echo "== cargo test (Redis at $TEST_REDIS_URL)"
results=$(mktemp "${TMPDIR:-/tmp}/chat-test-results.XXXXXX")
cargo test --workspace --locked "$@" 2>&1 | tee "$results"
[ $# -eq 0 ] || exit 0

echo "== fuzz: every target briefly (longer runs: scripts/fuzz.sh SECONDS)"
scripts/fuzz.sh 10

# Starts the one-command cluster (with extra flags) and sets $url to its page.
# Each gets a log of its own: a reused one could still show the last
# cluster's address when it is first read.
start_cluster() {
  log=$(mktemp "${TMPDIR:-/tmp}/chat-cluster.XXXXXX.log")
  target/debug/cluster --port 0 --status-port 0 --redis "$TEST_REDIS_URL" "$@" >"$log" 2>&1 &
  cluster=$!
  for _ in $(seq 600); do
    grep -q "chat cluster is up" "$log" && break
    kill -0 $cluster 2>/dev/null || { cat "$log"; echo "the cluster exited"; exit 1; }
    sleep 0.1
  done
  url=$(sed -n 's|^  chat page *\(http://[^ ]*\)/$|\1|p' "$log")
  [ -n "$url" ] || { cat "$log"; echo "the cluster did not come up"; exit 1; }
}

echo "== browser test: the chat page through the proxy, in headless Chromium"
cargo build --locked -p cluster -p proxy -p backend
cluster=
trap 'kill $cluster 2>/dev/null || true; wait $cluster 2>/dev/null || true; stop_own_redis' EXIT
start_cluster
grep -q "API keys        off" "$log" || { cat "$log"; echo "the cluster does not say API keys are off"; exit 1; }
scripts/e2e_page.sh "$url"
kill $cluster && wait $cluster 2>/dev/null || true

echo "== browser test with API keys on: the page asks for a key, and streams with one"
start_cluster --api-keys
grep -q "API keys        on" "$log" || { cat "$log"; echo "the cluster does not say API keys are on"; exit 1; }
key=$(REDIS_URL="$TEST_REDIS_URL" target/debug/backend new-key --id e2e-page 2>/dev/null)
E2E_API_KEY="$key" scripts/e2e_page.sh "$url"
REDIS_URL="$TEST_REDIS_URL" target/debug/backend revoke-key "$key" >/dev/null

# Several hosts made of network namespaces (needs root; MULTIHOST=0 skips it).
if [ "$(id -u)" = 0 ] && [ "${MULTIHOST:-1}" = 1 ]; then
  echo "== several hosts: 2 proxies, 3 backends, 3 AI nodes, a Redis Cluster and a client in network namespaces"
  scripts/multihost-test.sh
else
  echo "== several hosts: skipped (needs root; MULTIHOST=${MULTIHOST:-1})"
fi

# One closing line: the cargo tests' totals (the fuzz and page steps above
# print their own; reaching this line means every step passed).
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$results"
