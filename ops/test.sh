#!/usr/bin/env bash
# Runs every Beacon test on this machine, installing what it lacks first (ops/setup.sh).
# This is the README's test command and what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[test] %s\n' "$*" >&2; }

ops/setup.sh
export BEACON_TEST_MODEL="${BEACON_TEST_MODEL:-${BEACON_CACHE:-$HOME/.cache/beacon}/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
. ops/ccache.sh

# The deployment tests build images and run containers: make sure the engine is up.
if ! docker info >/dev/null 2>&1; then
  log "starting the Docker engine"
  (service docker start || (dockerd >/var/log/dockerd.log 2>&1 &)) >/dev/null 2>&1 || true
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { log "no Docker engine: the deployment tests need one"; exit 1; }
fi

log "building (locked)"
cargo build --workspace --all-targets --locked

log "unit, property and end-to-end tests"
cargo test --workspace --locked --no-fail-fast

log "fuzz targets: every parser for a bounded time"
ops/fuzz.sh run "${BEACON_FUZZ_SECONDS:-30}"
