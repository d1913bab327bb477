#!/usr/bin/env bash
# Memory per client connection (idle keep-alive and busy) of rusty-lb next to nginx and HAProxy
# (loadtest/idle.py says how it is measured).
#
#   loadtest/idle.sh                      1,000 and 10,000 connections, report on stdout
#   loadtest/idle.sh --out loadtest/results/idle-$(date +%F).md
#   loadtest/idle.sh --smoke              a few seconds: checks the script still works (CI)
#
# It raises its file-descriptor limit to the hard limit and stops with a clear message when
# that is too low for the connection counts asked for.
set -euo pipefail
cd "$(dirname "$0")/.."

source loadtest/prepare.sh
prepare wrk=wrk nginx=nginx-light haproxy=haproxy
if [ "${1:-}" = "--smoke" ]; then
  shift
  exec python3 loadtest/idle.py --conns 200 --rounds 1 --busy-seconds 1 "$@"
fi
exec python3 loadtest/idle.py "$@"
