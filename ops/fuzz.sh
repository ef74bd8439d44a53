#!/usr/bin/env bash
# Builds (`ops/fuzz.sh build`) or runs for a bounded time (`ops/fuzz.sh run SECONDS`) the
# cargo-fuzz targets of beacon-proto. cargo-fuzz needs a nightly compiler; where only stable
# exists, RUSTC_BOOTSTRAP lets stable accept the sanitizer flags.
set -euo pipefail
cd "$(dirname "$0")/../proto"

mode="${1:-build}"
secs="${2:-30}"

if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "[fuzz] installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked --quiet
fi
toolchain=()
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  toolchain=(+nightly)
else
  export RUSTC_BOOTSTRAP=1
fi

targets=$(cargo "${toolchain[@]}" fuzz list)
case "$mode" in
  build)
    cargo "${toolchain[@]}" fuzz build --release
    echo "[fuzz] built: $(echo "$targets" | tr '\n' ' ')" >&2
    ;;
  run)
    for t in $targets; do
      echo "[fuzz] $t for ${secs}s" >&2
      cargo "${toolchain[@]}" fuzz run --release "$t" -- -max_total_time="$secs" -rss_limit_mb=2048
    done
    ;;
  *) echo "usage: ops/fuzz.sh build|run [SECONDS]" >&2; exit 2 ;;
esac
