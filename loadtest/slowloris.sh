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

missing=()
command -v slowhttptest >/dev/null || missing+=(slowhttptest)
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
exec python3 loadtest/slowloris.py "$@"
