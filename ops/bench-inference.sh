#!/usr/bin/env bash
# Benchmark: beacon-node's engine against llama.cpp's own llama-server, same run, same model.
# llama-server is built once from the llama.cpp sources vendored in the llama-cpp-python
# sdist (PyPI) and cached under ~/.cache/beacon/llama-server/.
set -euo pipefail
cd "$(dirname "$0")/.."
ops/setup.sh
CACHE="${BEACON_CACHE:-$HOME/.cache/beacon}/llama-server"
BIN="$CACHE/build/bin/llama-server"
if [ ! -x "$BIN" ]; then
  mkdir -p "$CACHE"
  if [ ! -d "$CACHE/src" ]; then
    echo "[bench] fetching the llama-cpp-python sdist for llama.cpp's sources" >&2
    url=$(curl -sf --max-time 60 https://pypi.org/pypi/llama-cpp-python/json | python3 -c '
import json, sys, urllib.parse
d = json.load(sys.stdin)
u = [u["url"] for u in d["urls"] if u["packagetype"] == "sdist"][0]
print(urllib.parse.urljoin("https://pypi.org/pypi/llama-cpp-python/json", u))')
    curl -sfL --max-time 600 -o "$CACHE/sdist.tar.gz" "$url"
    mkdir -p "$CACHE/src"
    tar xzf "$CACHE/sdist.tar.gz" -C "$CACHE/src" --strip-components=3 --wildcards '*/vendor/llama.cpp/*'
  fi
  echo "[bench] building llama-server (several minutes)" >&2
  cmake -S "$CACHE/src" -B "$CACHE/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF -DGGML_NATIVE=ON >/dev/null
  cmake --build "$CACHE/build" --target llama-server -j "$(nproc)" >/dev/null
fi
cargo build --release --locked -p beacon-node
BEACON_LLAMA_SERVER="$BIN" cargo bench --locked -p beacon-tests --bench inference
