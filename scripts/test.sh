#!/usr/bin/env bash
# Run every check and test of the workspace: format, lints, unit, property and end-to-end tests,
# and, where a Docker engine answers, the images and the Compose stack against it; then the fuzz
# targets, the benchmarks and the load-test harness, each for a few seconds.
# This is the README's test command and what CI runs (`.ci/run`).
#
#   scripts/test.sh            everything
#   scripts/test.sh --quick    the edit loop: fmt, clippy, unit and end-to-end tests (Docker's
#                              only if the images are already built); no fuzz, bench or load test
set -euo pipefail
cd "$(dirname "$0")/.."

quick=false
case "${1:-}" in
  --quick) quick=true ;;
  "") ;;
  *) echo "usage: scripts/test.sh [--quick]" >&2; exit 2 ;;
esac

./scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The end-to-end tests start the real binaries, so build them first.
cargo build --workspace --bins

# The Docker tests need the images; they are built from static release binaries (slow the first
# time). Without an engine the tests are skipped, and that is said loudly here and in the test.
if docker_error=$(docker info 2>&1 >/dev/null); then
  if $quick && docker image inspect rustybalancer:production >/dev/null 2>&1; then
    echo "quick: using the images already built (scripts/images.sh rebuilds them)"
  elif $quick; then
    export RUSTY_SKIP_DOCKER="quick mode: no images built yet (scripts/images.sh builds them)"
  else
    ./scripts/images.sh
  fi
else
  banner="DOCKER TESTS SKIPPED: no Docker engine answers (docker info: $(echo "$docker_error" | head -1))"
  printf '\n%s\n%s\n%s\n\n' "${banner//?/=}" "$banner" "${banner//?/=}" >&2
fi

cargo nextest run --workspace --no-fail-fast
if $quick; then
  echo "quick: fuzz, benchmark and load-test smoke runs skipped (scripts/test.sh runs them)"
  exit 0
fi
# Every fuzz target for a few seconds on its committed corpus (the corpora are also replayed
# by the unit tests above).
./scripts/fuzz.sh 10
# Benchmarks compile and run once each (a smoke test, not a measurement).
cargo bench -p rusty-benches --bench dataplane -- --test
# The load-test harness runs for a few seconds so it keeps working (not a measurement).
loadtest/run.sh --smoke > /dev/null
loadtest/run.sh --smoke --targets nginx,rusty-lb,nginx-tls,rusty-lb-tls --bodies "" \
  --h2-streams 1 --swap-rates "" > /dev/null
loadtest/soak.sh --smoke > /dev/null
loadtest/idle.sh --smoke > /dev/null
loadtest/fanout.sh --smoke > /dev/null
