#!/usr/bin/env bash
# Run every check and test of the workspace: format, lints, unit, property and end-to-end tests.
# This is the README's test command and what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The end-to-end tests start the real binaries, so build them first.
cargo build --workspace --bins
cargo nextest run --workspace --no-fail-fast
# Benchmarks compile and run once each (a smoke test, not a measurement).
cargo bench -p rusty-benches --bench dataplane -- --test
