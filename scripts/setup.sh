#!/usr/bin/env bash
# Install what building and testing RustyBalancer needs on a fresh Debian machine:
# cmake (Pingora's libz-ng-sys builds zlib-ng with it), curl, pebble (an offline ACME CA for
# the tests), chromium (headless, for the status pages), prometheus (with promtool, for the
# monitoring test), openssl (the Swarm stack's secrets), grpcio and h2 from PyPI (the HTTP/2 tests) and cargo-nextest if they are
# missing.
set -euo pipefail

need_apt=()
command -v cmake >/dev/null 2>&1 || need_apt+=(cmake)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
# The ACME end-to-end test's CA (pebble and pebble-challtestsrv).
command -v pebble >/dev/null 2>&1 || need_apt+=(pebble)
# The fault suite's network namespace (ip netns) and its socket checks (ss).
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
# The status pages' test loads them in a real browser (headless).
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
# The monitoring test runs a real Prometheus and checks the shipped rules with promtool.
command -v prometheus >/dev/null 2>&1 || need_apt+=(prometheus)
# The Swarm stack's secrets (scripts/swarm-secrets.sh) and the TLS tests' certificates.
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
if ((${#need_apt[@]})); then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
# The HTTP/2 tests' peers: a real gRPC server and client (grpcio), and clients written frame by
# frame (h2's hpack encoder).
if ! python3 -c "import grpc, hpack" >/dev/null 2>&1; then
  python3 -m pip install --quiet --root-user-action=ignore grpcio h2
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install --locked cargo-nextest
fi
