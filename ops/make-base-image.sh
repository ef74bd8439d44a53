#!/usr/bin/env bash
# Makes Beacon's container base image without pulling anything from a container registry:
# a minimal Debian rootfs made by debootstrap (from Debian's package mirror), with the
# runtime libraries beacon-node and beacon-router need, loaded into Docker with
# `docker import`. Idempotent: an existing image is kept unless --force is given.
#
#   ops/make-base-image.sh [--tag beacon-base:bookworm] [--suite bookworm] [--mirror URL] [--force]
#
# Needs root (debootstrap), debootstrap and a running Docker engine.
set -euo pipefail

tag="${BEACON_BASE_IMAGE:-beacon-base:bookworm}"
suite=bookworm
mirror="${BEACON_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
force=0
# libgomp1: llama.cpp's OpenMP threads; libstdc++6/libgcc-s1: llama.cpp is C++;
# ca-certificates: HTTPS registries and remote APIs.
packages=ca-certificates,libgomp1,libstdc++6,libgcc-s1

log() { printf '[base-image] %s\n' "$*" >&2; }
die() { printf '[base-image] error: %s\n' "$*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --tag) tag="$2"; shift 2 ;;
    --suite) suite="$2"; shift 2 ;;
    --mirror) mirror="$2"; shift 2 ;;
    --force) force=1; shift ;;
    -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done

command -v docker >/dev/null || die "docker is not installed"
docker info >/dev/null 2>&1 || die "the Docker engine is not reachable (is dockerd running? are you in the docker group?)"
if [ "$force" = 0 ] && docker image inspect "$tag" >/dev/null 2>&1; then
  log "have $tag"
  exit 0
fi
[ "$(id -u)" -eq 0 ] || die "debootstrap needs root: run this as root"
command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"

root="$(mktemp -d /var/tmp/beacon-rootfs.XXXXXX)"
trap 'rm -rf "$root"' EXIT
log "debootstrap $suite (minbase + $packages) from $mirror"
debootstrap --variant=minbase --include="$packages" "$suite" "$root" "$mirror" >"$root.log" 2>&1 \
  || { tail -n 20 "$root.log" >&2; rm -f "$root.log"; die "debootstrap failed"; }
rm -f "$root.log"
# Smaller and reproducible enough: no package caches or lists, no logs.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/var/log/*
log "importing as $tag"
tar -C "$root" -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["/bin/bash"]' \
  - "$tag" >/dev/null
log "made $tag ($(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}'))"
