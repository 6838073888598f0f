#!/usr/bin/env bash
# The one command that runs the whole cluster on this machine:
#   ./scripts/cluster.sh [cluster flags]
# Builds release (installing cmake where missing), then runs the `cluster`
# binary: the proxy on :8080 (status on 127.0.0.1:8090), 3 backends and 3 AI
# nodes on internal loopback ports, printing what runs where. Events go through
# Redis when REDIS_URL is set or one answers on 127.0.0.1:6379; otherwise
# through an embedded in-process bus (it says so). Ctrl-C stops everything.
#
# Environment: CLUSTER_PORT (8080), CLUSTER_STATUS_PORT (8090), REDIS_URL.
# Flags (see --help): --nodes N, --backends N, --embedded, --conf DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/setup.sh
source scripts/setup.sh
command -v cmake >/dev/null || { echo "== installing cmake"; apt_install cmake; }

echo "== building (release)"
cargo build --release --locked -p cluster -p proxy
exec target/release/cluster "$@"
