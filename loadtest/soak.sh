#!/usr/bin/env bash
# Soak: rusty-lb under steady keep-alive load, connection churn and a table swap every few
# seconds, for 30 minutes by default, sampling RSS and open descriptors; see loadtest/soak.py.
# Not part of CI (`scripts/test.sh` runs it for a few seconds to keep it working).
#
#   loadtest/soak.sh
#   loadtest/soak.sh --minutes 30 --out loadtest/results/soak-$(date +%F).md
set -euo pipefail
cd "$(dirname "$0")/.."

source loadtest/prepare.sh
prepare wrk=wrk nginx=nginx-light
exec python3 loadtest/soak.py "$@"
