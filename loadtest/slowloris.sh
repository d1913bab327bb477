#!/usr/bin/env bash
# Slowloris against nginx, HAProxy and rusty-lb, with legitimate traffic alongside; see
# loadtest/slowloris.py. About 2.5 minutes with the defaults; not part of CI (the e2e test
# `connections.rs` covers the header deadline there).
#
#   loadtest/slowloris.sh
#   loadtest/slowloris.sh --out loadtest/results/slowloris-$(date +%F).md
#   loadtest/slowloris.sh --connections 200 --duration 20 --targets rusty-lb
set -euo pipefail
cd "$(dirname "$0")/.."

source loadtest/prepare.sh
prepare slowhttptest=slowhttptest wrk=wrk nginx=nginx-light haproxy=haproxy
exec python3 loadtest/slowloris.py "$@"
