#!/usr/bin/env bash
# Run the fuzz targets (fuzz/): table decode + validation, the schedule builder, and the data
# plane's request checks. Usage: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
# Default 10 s each (the CI smoke); longer runs are documented in fuzz/README.md.
#
# Builds without a sanitizer (`-s none`): the code under test is safe Rust, and the address
# sanitizer needs a nightly compiler this machine does not have. New inputs the fuzzer finds go
# to a scratch directory; to keep them, merge them into fuzz/corpus/<target> (see the README).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs="${1:-10}"
shift || true
targets=("$@")
((${#targets[@]})) || targets=(table schedule request)

command -v cargo-fuzz >/dev/null 2>&1 || cargo install --locked cargo-fuzz@0.13.2
if ! cargo fuzz build -s none -O >/tmp/rusty-fuzz-build.log 2>&1; then
  tail -40 /tmp/rusty-fuzz-build.log >&2
  exit 1
fi
for t in "${targets[@]}"; do
  scratch=$(mktemp -d)
  echo "fuzz $t for ${secs}s (corpus: $(ls corpus/"$t" | wc -l) inputs)"
  if ! cargo fuzz run -s none -O "$t" "$scratch" "corpus/$t" -- \
      -max_total_time="$secs" -max_len=4096 -print_final_stats=1 >"$scratch.log" 2>&1; then
    tail -40 "$scratch.log" >&2
    echo "fuzz $t: FAILED; the input is in fuzz/artifacts/$t/" >&2
    exit 1
  fi
  grep -E "stat::number_of_executed_units|Done" "$scratch.log" | sed "s/^/  $t: /"
  rm -rf "$scratch" "$scratch.log"
done
