# Sourced by the loadtest scripts: install the peers and tools they need from Debian's packages
# when missing (arguments: command=package pairs), then build rusty-lb in release.
# Run from the repository root.

prepare() {
  local missing=() pair
  for pair in "$@"; do
    command -v "${pair%%=*}" >/dev/null || missing+=("${pair#*=}")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    local sudo_=""
    [ "$(id -u)" = 0 ] || sudo_=sudo
    $sudo_ apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -q "${missing[@]}" >/dev/null
  fi
  # Debian starts nginx as a service on install; the scripts run their own instances.
  if command -v systemctl >/dev/null && systemctl is-active --quiet nginx 2>/dev/null; then
    echo "note: a system nginx is running; the load tests use their own ports (18081-19103)" >&2
  fi
  ./scripts/setup.sh
  cargo build --release -p rusty-lb --bin rusty-lb
}
