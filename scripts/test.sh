#!/usr/bin/env bash
# Run every check and test of the workspace: format, lints, unit, property and end-to-end tests,
# and, where a Docker engine answers, the images and the Compose stack against it.
# This is the README's test command and what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The end-to-end tests start the real binaries, so build them first.
cargo build --workspace --bins

# The Docker tests need the images; they are built from static release binaries (slow the first
# time). Without an engine the tests are skipped, and that is said loudly here and in the test.
if docker_error=$(docker info 2>&1 >/dev/null); then
  ./scripts/images.sh
else
  banner="DOCKER TESTS SKIPPED: no Docker engine answers (docker info: $(echo "$docker_error" | head -1))"
  printf '\n%s\n%s\n%s\n\n' "${banner//?/=}" "$banner" "${banner//?/=}" >&2
fi

cargo nextest run --workspace --no-fail-fast
# Every fuzz target for a few seconds on its committed corpus (the corpora are also replayed
# by the unit tests above).
./scripts/fuzz.sh 10
# Benchmarks compile and run once each (a smoke test, not a measurement).
cargo bench -p rusty-benches --bench dataplane -- --test
# The load-test harness runs for a few seconds so it keeps working (not a measurement).
loadtest/run.sh --smoke > /dev/null
