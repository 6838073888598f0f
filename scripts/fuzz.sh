#!/usr/bin/env bash
# Fuzzes the request and frame parsers and the config loaders (fuzz/, cargo-fuzz
# layout): every target for SECONDS each (default 15). Fails when any target
# crashes, panics, times out or runs out of memory; the input that did it is
# kept under fuzz/artifacts/<target>/.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Runs on the stable toolchain: RUSTC_BOOTSTRAP=1 lets it take cargo-fuzz's
# nightly flags. No sanitizer by default (the workspace forbids unsafe code);
# FUZZ_SANITIZER=address adds ASan (a longer build, slower runs).
# The build goes to fuzz/target (its own workspace, its own Cargo.lock); the
# corpus grows in fuzz/corpus/<target>/, where only the seed-* files are kept in git.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/setup.sh
source scripts/setup.sh

seconds=${1:-15}
[[ $seconds =~ ^[0-9]+$ ]] || { echo "usage: scripts/fuzz.sh [SECONDS] [TARGET...]" >&2; exit 2; }
shift $(($# > 0 ? 1 : 0))
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(ws_frame chat_request event_decode config_loaders)
sanitizer=${FUZZ_SANITIZER:-none}

ensure_build_tools
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install --locked cargo-fuzz --version '^0.13'
fi

export RUSTC_BOOTSTRAP=1
# The config loaders' target writes each input to a file here.
export TMPDIR="$PWD/fuzz/target/tmp"
mkdir -p "$TMPDIR"

echo "== fuzz: building ${targets[*]} (sanitizer $sanitizer)"
start=$SECONDS
for t in "${targets[@]}"; do
  cargo fuzz build -s "$sanitizer" "$t"
done
echo "== fuzz: built in $((SECONDS - start)) s; ${seconds} s per target"

passed=0
failed=0
for t in "${targets[@]}"; do
  log="$TMPDIR/$t.log"
  mkdir -p "fuzz/corpus/$t"
  # -timeout: one input taking 10 s counts as a hang (a failure).
  if cargo fuzz run -s "$sanitizer" "$t" -- -max_total_time="$seconds" -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    cov=$(sed -n 's/^#[0-9]*[[:space:]]*DONE[[:space:]]*cov: \([0-9]*\).*/\1/p' "$log" | tail -1)
    corpus=$(find "fuzz/corpus/$t" -type f | wc -l)
    echo "fuzz $t: ok, ${runs:-?} inputs in ${seconds} s, coverage ${cov:-?}, corpus $corpus"
    passed=$((passed + 1))
  else
    tail -n 60 "$log"
    grep -m1 -A1 "panicked at" "$log" || true
    artifact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -1)
    echo "fuzz $t: FAILED, input kept at ${artifact:-(none)} (full log $log)"
    failed=$((failed + 1))
  fi
done
echo "fuzz: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
