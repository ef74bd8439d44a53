#!/usr/bin/env bash
# The README's main command: runs what Beacon can do today, end to end, on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
ops/setup.sh
cargo build --release --locked -p beacon-node -p beacon-router
echo
echo "Beacon today: the wire protocol crate and the command-line surface."
echo "Not yet built: model store, inference engine, provider network, router, MinionS."
target/release/beacon-node --help
