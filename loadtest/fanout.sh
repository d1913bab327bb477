#!/usr/bin/env bash
# Agent -> data planes: decision to table installed in every data plane, for 1, 8 and 32 data
# planes on 127.0.0.1 (loadtest/fanout.py says how it is measured).
#
#   loadtest/fanout.sh                    200 tables per data plane count, report on stdout
#   loadtest/fanout.sh --out loadtest/results/fanout-$(date +%F).md
#   loadtest/fanout.sh --smoke            a few seconds on the debug builds: checks the script
#                                         still works (CI), measures nothing
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh
if [ "${1:-}" = "--smoke" ]; then
  shift
  cargo build -p rusty-lb -p rusty-agent
  exec python3 loadtest/fanout.py --planes 1,2 --tables 10 \
    --agent target/debug/rusty-agent --binary target/debug/rusty-lb "$@"
fi
cargo build --release -p rusty-lb -p rusty-agent
exec python3 loadtest/fanout.py "$@"
