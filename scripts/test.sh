#!/usr/bin/env bash
# The project's test command (the README's, and what .ci/run runs).
# On a fresh Debian machine with only the Rust toolchain it installs what the
# build and the tests need, makes sure a Redis answers, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

ensure_build_tools
ensure_redis

echo "== cargo test (Redis at $TEST_REDIS_URL)"
cargo test --workspace --locked "$@"
