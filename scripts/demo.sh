#!/usr/bin/env bash
# Start the whole local stack without Docker: three rusty-echo demo backends, a spare, and
# rusty-lb serving examples/table.json. Ctrl-C stops everything.
# (The agent takes this role once it lands; until then the data plane reads a table file.)
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh
cargo build --release --bins
bin=target/release
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

for spec in web-a:9001 web-b:9002 web-c:9003 web-spare:9004; do
  "$bin/rusty-echo" --id "${spec%%:*}" --listen "127.0.0.1:${spec##*:}" &
  pids+=($!)
done
"$bin/rusty-lb" --listen 127.0.0.1:8080 --admin 127.0.0.1:9100 \
  --table examples/table.json --state-dir "${TMPDIR:-/tmp}/rusty-lb-demo" &
pids+=($!)

for _ in $(seq 1 100); do curl -fs http://127.0.0.1:9100/healthz >/dev/null 2>&1 && break; sleep 0.1; done
cat <<MSG

RustyBalancer is up.
  send traffic:  curl -H 'Host: localhost' http://127.0.0.1:8080/
  metrics:       curl http://127.0.0.1:9100/metrics
  the table:     curl http://127.0.0.1:9100/table
  reload:        edit examples/table.json (raise "version"), then kill -HUP $(pgrep -n rusty-lb)
Ctrl-C stops everything.
MSG
wait
