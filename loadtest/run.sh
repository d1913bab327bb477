#!/usr/bin/env bash
# The load-test harness: direct, nginx, HAProxy, Caddy and rusty-lb through the same scenarios.
#
#   loadtest/run.sh                       full run (about 12 minutes), report on stdout
#   loadtest/run.sh --out loadtest/results/$(date +%F).md
#   loadtest/run.sh --smoke               a few seconds: checks the harness still works (CI)
#   loadtest/run.sh --load oha            oha instead of wrk (installed with cargo when missing)
#   loadtest/run.sh --help                every option (durations, rounds, connections, targets)
#
# Installs wrk, nginx, HAProxy and Caddy from Debian's packages when missing and builds rusty-lb in
# release. Everything listens on 127.0.0.1 and every process it starts is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

source loadtest/prepare.sh
prepare wrk=wrk nginx=nginx-light haproxy=haproxy caddy=caddy h2load=nghttp2-client
# oha, when asked for (`--load oha` or `--load=oha`), comes from crates.io (a few minutes to build).
if [[ " $* " == *" --load oha "* || " $* " == *" --load=oha "* ]] && ! command -v oha >/dev/null; then
  cargo install --locked oha
fi

if [ "${1:-}" = "--smoke" ]; then
  shift
  exec python3 loadtest/harness.py --duration 1 --rounds 1 --conns 10 --bodies small \
    --swap-rates 100 "$@"
fi
exec python3 loadtest/harness.py "$@"
