#!/usr/bin/env bash
# Builds Beacon's container images from binaries built on this host, without pulling
# anything: the base from ops/make-base-image.sh (debootstrap + docker import), then
#   beacon-node:TAG      provider-image/Dockerfile, target `prebuilt`
#   beacon-router:TAG    ops/images/router.Dockerfile
#   beacon-registry:TAG  ops/images/registry.Dockerfile (Debian's docker-registry)
#
#   ops/build-images.sh [--bin-dir target/release] [--tag local] [--base beacon-base:bookworm]
#
# Build the binaries first (cargo build --release --locked -p beacon-node -p beacon-router).
set -euo pipefail
cd "$(dirname "$0")/.."

bin_dir=target/release
tag="${BEACON_IMAGE_TAG:-local}"
base="${BEACON_BASE_IMAGE:-beacon-base:bookworm}"

log() { printf '[images] %s\n' "$*" >&2; }
die() { printf '[images] error: %s\n' "$*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --bin-dir) bin_dir="$2"; shift 2 ;;
    --tag) tag="$2"; shift 2 ;;
    --base) base="$2"; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done

for b in beacon-node beacon-router; do
  [ -x "$bin_dir/$b" ] || die "$bin_dir/$b is missing: build it first (cargo build --release --locked -p beacon-node -p beacon-router)"
done
registry_bin="$(command -v docker-registry || true)"
[ -n "$registry_bin" ] || die "docker-registry is missing (apt-get install docker-registry)"

BEACON_BASE_IMAGE="$base" ops/make-base-image.sh

ctx="$(mktemp -d)"
trap 'rm -rf "$ctx"' EXIT
build() { # build NAME DOCKERFILE FILE [docker build args...]
  local name="$1" dockerfile="$2" file="$3"
  shift 3
  rm -rf "${ctx:?}"/*
  cp "$file" "$ctx/"
  log "building $name:$tag"
  docker build -q -f "$dockerfile" --build-arg "BASE_IMAGE=$base" -t "$name:$tag" "$@" "$ctx" >/dev/null
}
build beacon-node provider-image/Dockerfile "$bin_dir/beacon-node" --target prebuilt
build beacon-router ops/images/router.Dockerfile "$bin_dir/beacon-router"
build beacon-registry ops/images/registry.Dockerfile "$registry_bin"
log "built beacon-node:$tag beacon-router:$tag beacon-registry:$tag on $base"
