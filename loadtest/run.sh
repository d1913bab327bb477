#!/usr/bin/env bash
# The load-test harness: direct, nginx, HAProxy and rusty-lb through the same scenarios.
#
#   loadtest/run.sh                       full run (about 12 minutes), report on stdout
#   loadtest/run.sh --out loadtest/results/$(date +%F).md
#   loadtest/run.sh --smoke               a few seconds: checks the harness still works (CI)
#   loadtest/run.sh --help                every option (durations, rounds, connections, targets)
#
# Installs wrk, nginx and HAProxy from Debian's packages when missing and builds rusty-lb in
# release. Everything listens on 127.0.0.1 and every process it starts is stopped at the end.
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
# Debian starts nginx as a service on install; the harness runs its own instances.
if command -v systemctl >/dev/null && systemctl is-active --quiet nginx 2>/dev/null; then
  echo "note: a system nginx is running; the harness uses its own ports (18081-19103)" >&2
fi

./scripts/setup.sh
cargo build --release -p rusty-lb --bin rusty-lb

if [ "${1:-}" = "--smoke" ]; then
  shift
  exec python3 loadtest/harness.py --duration 1 --rounds 1 --conns 10 --bodies small \
    --swap-rates 100 "$@"
fi
exec python3 loadtest/harness.py "$@"
