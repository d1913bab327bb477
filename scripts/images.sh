#!/usr/bin/env bash
# Build static release binaries on the host and the Docker images around them, in one step:
#   rustybalancer:production  rustybalancer:development  rustybalancer:slim
#   rustybalancer-demo:v1     rustybalancer-demo:v2      (the demo app, for deploys)
# Nothing is pulled: every image starts FROM scratch.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh
triple=x86_64-unknown-linux-gnu
# Static glibc: the images have no libc. (Flags apply to the target only, not build scripts.)
RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --target "$triple" --bins
out="target/$triple/release"
ctx=target/docker
rm -rf "$ctx"
mkdir -p "$ctx/debug" "$ctx/full" "$ctx/slim"
for b in rusty-agent rusty-lb rusty-echo; do
  cp "$out/$b" "$ctx/debug/$b"                          # line tables: development
  strip --strip-debug -o "$ctx/full/$b" "$out/$b"       # symbols, no line tables: production
  strip --strip-all -o "$ctx/slim/$b" "$out/$b"         # nothing extra: slim
done

# The classic builder: it needs no buildx plugin and pulls nothing for FROM scratch.
build() { DOCKER_BUILDKIT=0 docker build --quiet -f docker/Dockerfile "$@" "$ctx" 2>&1 >/dev/null | grep -v -i -e deprecated -e buildx -e '^ *$' >&2 || true; }
for target in production development slim; do
  build --target "$target" -t "rustybalancer:$target"
done
for version in v1 v2; do
  build --target demo --build-arg "VERSION=$version" -t "rustybalancer-demo:$version"
done
docker image ls --format '{{.Repository}}:{{.Tag}}\t{{.Size}}' | grep '^rustybalancer' | sort
