#!/usr/bin/env bash
# Routing overhead: a provider node called directly vs through a router, same run.
set -euo pipefail
cd "$(dirname "$0")/.."
ops/setup.sh
export BEACON_TEST_MODEL="${BEACON_TEST_MODEL:-${BEACON_CACHE:-$HOME/.cache/beacon}/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
cargo build --release --locked -p beacon-node -p beacon-router
cargo bench --locked -p beacon-tests --bench routing
