#!/usr/bin/env bash
# The secrets of the Swarm stack (stack.yaml), in .rusty/swarm (or $1), each mode 0600:
#   token           the agent's bearer token (the data planes' subscription, the CLI)
#   admin-token     the data planes' admin token (/metrics and /table, for the agent and Prometheus)
#   agent-ca.crt    a private CA the data planes verify the agent's wss:// listener against
#   agent.crt/.key  the agent's certificate for the names it has on the overlay: agent, tasks.agent
# Files that exist are kept (rerun it safely); delete the directory to start over. openssl only.
set -euo pipefail
dir="${1:-$(cd "$(dirname "$0")/.." && pwd)/.rusty/swarm}"
mkdir -p "$dir"
chmod 700 "$dir"
umask 077
random_hex() { head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
for name in token admin-token; do
  [ -s "$dir/$name" ] || random_hex > "$dir/$name"
done
if [ ! -s "$dir/agent.key" ] || [ ! -s "$dir/agent.crt" ] || [ ! -s "$dir/agent-ca.crt" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
    -subj "/CN=RustyBalancer swarm CA" -keyout "$tmp/ca.key" -out "$dir/agent-ca.crt" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=agent" \
    -keyout "$dir/agent.key" -out "$tmp/agent.csr" 2>/dev/null
  printf 'subjectAltName=DNS:agent,DNS:tasks.agent\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' > "$tmp/ext"
  openssl x509 -req -in "$tmp/agent.csr" -CA "$dir/agent-ca.crt" -CAkey "$tmp/ca.key" \
    -CAserial "$tmp/ca.srl" -CAcreateserial -days 825 -extfile "$tmp/ext" -out "$dir/agent.crt" 2>/dev/null
fi
chmod 600 "$dir"/*
echo "$dir: token admin-token agent-ca.crt agent.crt agent.key"
