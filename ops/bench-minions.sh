#!/usr/bin/env bash
# MinionS vs Minion vs remote-only on the bundled report with known answers, same
# supervisor. Set BEACON_BENCH_REMOTE_URL, BEACON_BENCH_REMOTE_MODEL (and
# BEACON_BENCH_REMOTE_KEY) to use a real remote API; otherwise the supervisor is a local
# node serving Gemma 3 270M.
set -euo pipefail
cd "$(dirname "$0")/.."
ops/setup.sh --supervisor-model
export BEACON_TEST_MODEL="${BEACON_TEST_MODEL:-${BEACON_CACHE:-$HOME/.cache/beacon}/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
cargo build --release --locked -p beacon-node -p beacon-router
cargo bench --locked -p beacon-tests --bench minions
