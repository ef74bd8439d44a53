#!/usr/bin/env bash
# Benchmark: pull throughput of a large blob, beacon-node vs skopeo vs curl (same run).
set -euo pipefail
cd "$(dirname "$0")/.."
ops/setup.sh
cargo build --release --locked -p beacon-node
cargo bench --locked -p beacon-tests --bench pull
