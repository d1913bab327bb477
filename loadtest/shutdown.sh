#!/usr/bin/env bash
# Graceful shutdown under keep-alive load against nginx, HAProxy and rusty-lb; see
# loadtest/shutdown.py. About 1.5 minutes; not part of CI (e2e/tests/connections.rs covers
# rusty-lb's drain there).
#
#   loadtest/shutdown.sh
#   loadtest/shutdown.sh --out loadtest/results/shutdown-$(date +%F).md
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v nginx >/dev/null || missing+=(nginx-light)
command -v haproxy >/dev/null || missing+=(haproxy)
if [ ${#missing[@]} -gt 0 ]; then
  sudo_=""; [ "$(id -u)" = 0 ] || sudo_=sudo
  $sudo_ apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -q "${missing[@]}" >/dev/null
fi
./scripts/setup.sh
cargo build --release -p rusty-lb --bin rusty-lb
exec python3 loadtest/shutdown.py "$@"
