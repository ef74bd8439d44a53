#!/usr/bin/env bash
# The README's main command: runs what Beacon does today, end to end, on this machine.
#
# Today that is one provider end to end: a real OCI registry on loopback, the SmolLM2 test
# model packaged as a `docker model`-compatible artifact, pushed, pulled by a second
# "provider" store with digest verification, then served by `beacon-node serve` (llama.cpp)
# on the Docker Model Runner / OpenAI API and asked a question. The provider network, the
# router and MinionS are not built yet; this script says so instead of faking.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*"; }

ops/setup.sh
cargo build --release --locked -p beacon-node
node=target/release/beacon-node
model="${BEACON_TEST_MODEL:-${BEACON_CACHE:-$HOME/.cache/beacon}/models/SmolLM2-135M-Instruct.Q4_1.gguf}"

work="$(mktemp -d)"
registry_pid=""
node_pid=""
cleanup() {
  [ -n "$node_pid" ] && kill "$node_pid" 2>/dev/null || true
  [ -n "$registry_pid" ] && kill "$registry_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
cat >"$work/registry.yml" <<YML
version: 0.1
log: {level: error}
storage: {filesystem: {rootdirectory: $work/registry}}
http: {addr: 127.0.0.1:$port}
YML
log "starting a local OCI registry (docker-registry) on 127.0.0.1:$port"
docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
registry_pid=$!
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$port/v2/" >/dev/null && break; sleep 0.1; done

ref="127.0.0.1:$port/ai/smollm2:135M-Q4_1"
log "packaging $(basename "$model") as $ref and pushing it (publisher store)"
BEACON_DATA_DIR="$work/publisher" "$node" model package --gguf "$model" --context-size 8192 --push "$ref"

log "pulling it into a fresh provider store (every blob verified against its digest)"
BEACON_DATA_DIR="$work/provider" "$node" model pull "$ref"
BEACON_DATA_DIR="$work/provider" "$node" model ls

log "the artifact's config, as docker model writes it (first lines)"
BEACON_DATA_DIR="$work/provider" "$node" model inspect "$ref" >"$work/config.json"
head -n 12 "$work/config.json"

log "provider identity"
BEACON_DATA_DIR="$work/provider" "$node" info

api_port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
log "serving it with llama.cpp on the OpenAI / Docker Model Runner API (127.0.0.1:$api_port)"
BEACON_DATA_DIR="$work/provider" "$node" serve --listen "127.0.0.1:$api_port" --parallel 4 --ctx-size 2048 \
  >"$work/node.log" 2>&1 &
node_pid=$!
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$api_port/healthz" >/dev/null && break; sleep 0.1; done

question="What is the capital of France? Answer in one sentence."
log "POST /engines/v1/chat/completions: $question"
curl -sf "http://127.0.0.1:$api_port/engines/v1/chat/completions" -H 'Content-Type: application/json' \
  -d "{\"model\":\"$ref\",\"messages\":[{\"role\":\"user\",\"content\":\"$question\"}],\"temperature\":0,\"max_tokens\":48}" \
  | python3 -c 'import json,sys; r=json.load(sys.stdin); print("answer:", r["choices"][0]["message"]["content"]); print("usage: ", r["usage"])'
curl -sf "http://127.0.0.1:$api_port/engines/ps" | python3 -m json.tool

log "not built yet: provider network (libp2p, QUIC data plane), router, MinionS (see README)"
