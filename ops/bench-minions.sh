#!/usr/bin/env bash
# MinionS vs Minion vs remote-only on documents with known answers (the bundled 28 KB
# report, generated reports of 300 KB and 1 MB), same supervisor. Set
# BEACON_BENCH_REMOTE_URL, BEACON_BENCH_REMOTE_MODEL (and BEACON_BENCH_REMOTE_KEY) to use a
# real remote API; otherwise the supervisor is a local node serving SmolLM2-135M-Instruct.
# BEACON_BENCH_QUESTIONS=N asks N questions per document; BEACON_BENCH_SIZES the generated
# sizes in bytes (default 300000,1000000).
set -euo pipefail
cd "$(dirname "$0")/.."
ops/setup.sh
export BEACON_TEST_MODEL="${BEACON_TEST_MODEL:-${BEACON_CACHE:-$HOME/.cache/beacon}/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
cargo build --release --locked -p beacon-node -p beacon-router
cargo bench --locked -p beacon-tests --bench minions
