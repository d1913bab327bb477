#!/usr/bin/env bash
# Graceful shutdown under keep-alive load against nginx, HAProxy and rusty-lb; see
# loadtest/shutdown.py. About 1.5 minutes; not part of CI (e2e/tests/connections.rs covers
# rusty-lb's drain there).
#
#   loadtest/shutdown.sh
#   loadtest/shutdown.sh --out loadtest/results/shutdown-$(date +%F).md
set -euo pipefail
cd "$(dirname "$0")/.."

source loadtest/prepare.sh
prepare wrk=wrk nginx=nginx-light haproxy=haproxy
exec python3 loadtest/shutdown.py "$@"
