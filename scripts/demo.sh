#!/usr/bin/env bash
# Start the whole local stack without Docker: rusty-agent (which runs the `web` demo backends as
# child processes and health-checks them), one static backend it only checks, and rusty-lb
# subscribed to the agent's table stream. Ctrl-C stops everything (the agent stops its children).
#
#   scripts/demo.sh [ENV]     ENV: development or slim (overlays in examples/agent.toml)
set -euo pipefail
cd "$(dirname "$0")/.."
env_name="${1:-}"

./scripts/setup.sh
cargo build --release --bins
bin=target/release
state=.rusty
mkdir -p "$state"
pids=()
cleanup() {
  kill -TERM "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

for port in 7070 8080 9100 9004; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "demo: port $port is taken (an earlier demo still running?); stop it first" >&2
    exit 1
  fi
done

# The `legacy` service of examples/agent.toml: a backend the agent does not run.
"$bin/rusty-echo" --id legacy --listen 127.0.0.1:9004 > "$state/legacy.log" 2>&1 &
pids+=($!)

"$bin/rusty-agent" check --config examples/agent.toml ${env_name:+--env "$env_name"} > /dev/null
"$bin/rusty-agent" run --config examples/agent.toml ${env_name:+--env "$env_name"} 2> "$state/agent.log" &
pids+=($!)
token="$state/agent/token"
for _ in $(seq 1 100); do [ -s "$token" ] && curl -fs http://127.0.0.1:7070/healthz >/dev/null 2>&1 && break; sleep 0.1; done
[ -s "$token" ] || { echo "demo: the agent did not come up; see $state/agent.log" >&2; exit 1; }

"$bin/rusty-lb" --listen 127.0.0.1:8080 --admin 127.0.0.1:9100 \
  --agent ws://127.0.0.1:7070/v1/tables --token-file "$token" --state-dir "$state/lb" \
  2> "$state/lb.log" &
pids+=($!)
for _ in $(seq 1 150); do curl -fs http://127.0.0.1:9100/healthz >/dev/null 2>&1 && break; sleep 0.1; done
curl -fs http://127.0.0.1:9100/healthz >/dev/null || { echo "demo: rusty-lb has no table; see $state/lb.log and $state/agent.log" >&2; exit 1; }

"$bin/rusty-agent" status --token-file "$token"
cat <<MSG

RustyBalancer is up: rusty-agent on 127.0.0.1:7070, rusty-lb on 127.0.0.1:8080 (admin 9100).
  send traffic:   curl -H 'Host: localhost' http://127.0.0.1:8080/
                  curl -H 'Host: legacy.localhost' http://127.0.0.1:8080/
  the table:      curl http://127.0.0.1:9100/table
  metrics:        curl http://127.0.0.1:9100/metrics      (agent: curl http://127.0.0.1:7070/metrics)
  operate:        $bin/rusty-agent status
                  $bin/rusty-agent scale web 5
                  $bin/rusty-agent deploy web -- $PWD/$bin/rusty-echo --listen {host}:{port} --id v2-{instance}
                  $bin/rusty-agent drain web-1
  logs:           $state/agent.log  $state/lb.log
Ctrl-C stops everything.
MSG
wait
