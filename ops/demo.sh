#!/usr/bin/env bash
# The README's main command: runs what Beacon does today, end to end, on this machine.
#
# Today: a real OCI registry on loopback, the SmolLM2 test model packaged as a
# `docker model`-compatible artifact, pushed, pulled by two provider stores with digest
# verification; both providers serve it with llama.cpp and join a libp2p network in two
# regions; a router joins too, discovers them from their signed adverts, and routes
# OpenAI-compatible chat requests to them over the QUIC data plane, verifying every signed
# result. Then a MinionS job: a supervisor (a Beacon node serving SmolLM2-135M-Instruct
# behind its OpenAI API, standing in for a remote frontier model) plans work on a bundled
# 28 KB report without ever seeing it; the providers read it chunk by chunk and quote what
# they found; the router keeps only quotes that are in the report, verifies every signed
# result and prints the answer, the evidence behind it and the remote tokens saved versus
# sending the whole report to the supervisor.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*"; }

ops/setup.sh
cargo build --release --locked -p beacon-node -p beacon-router
node=target/release/beacon-node
router=target/release/beacon-router
model="${BEACON_TEST_MODEL:-${BEACON_CACHE:-$HOME/.cache/beacon}/models/SmolLM2-135M-Instruct.Q4_1.gguf}"

work="$(mktemp -d)"
registry_pid=""
node_pid=""
node2_pid=""
router_pid=""
sup_pid=""
cleanup() {
  for p in "$router_pid" "$sup_pid" "$node2_pid" "$node_pid" "$registry_pid"; do
    if [ -n "$p" ]; then kill "$p" 2>/dev/null || true; fi
  done
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
# The operator pins the name to this digest: the router trusts no advert that says otherwise.
digest="$(BEACON_DATA_DIR="$work/publisher" "$node" model inspect --digest "$ref")"
log "pinned for the router: $ref = $digest"

log "pulling it into a fresh provider store (every blob verified against its digest)"
BEACON_DATA_DIR="$work/provider" "$node" model pull "$ref"
BEACON_DATA_DIR="$work/provider" "$node" model ls

log "the artifact's config, as docker model writes it (first lines)"
BEACON_DATA_DIR="$work/provider" "$node" model inspect "$ref" >"$work/config.json"
head -n 12 "$work/config.json"

log "provider identity"
BEACON_DATA_DIR="$work/provider" "$node" info

# Two providers share this machine's cores: each gets half of them, so llama.cpp's threads
# never outnumber the cores (spinning threads on shared cores stall each other).
threads=$(( $(nproc) / 2 )); [ "$threads" -ge 1 ] || threads=1
api_port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
log "provider 1 (eu-west): serving it with llama.cpp on 127.0.0.1:$api_port and joining the network"
BEACON_DATA_DIR="$work/provider" "$node" serve --listen "127.0.0.1:$api_port" --parallel 4 --ctx-size 2048 --threads "$threads" \
  --region eu-west --p2p-listen /ip4/127.0.0.1/udp/0/quic-v1 --data-plane 127.0.0.1:0 --advert-interval 2 \
  >"$work/node.log" 2>&1 &
node_pid=$!
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$api_port/healthz" >/dev/null && break; sleep 0.1; done

question="What is the capital of France? Answer in one sentence."
log "POST /engines/v1/chat/completions: $question"
curl -sf "http://127.0.0.1:$api_port/engines/v1/chat/completions" -H 'Content-Type: application/json' \
  -d "{\"model\":\"$ref\",\"messages\":[{\"role\":\"user\",\"content\":\"$question\"}],\"temperature\":0,\"max_tokens\":48}" \
  | python3 -c 'import json,sys; r=json.load(sys.stdin); print("answer:", r["choices"][0]["message"]["content"]); print("usage: ", r["usage"])'
curl -sf "http://127.0.0.1:$api_port/engines/ps" | python3 -m json.tool

boot="$(curl -sf "http://127.0.0.1:$api_port/beacon/node" | python3 -c 'import json,sys; print(json.load(sys.stdin)["listen_addrs"][0])')"
log "provider 2 (us-east): pulls the same model and bootstraps from provider 1 ($boot)"
BEACON_DATA_DIR="$work/provider2" "$node" model pull --progress none "$ref"
api2="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
BEACON_DATA_DIR="$work/provider2" "$node" serve --listen "127.0.0.1:$api2" --parallel 4 --ctx-size 2048 --threads "$threads" \
  --region us-east --p2p-listen /ip4/127.0.0.1/udp/0/quic-v1 --data-plane 127.0.0.1:0 --advert-interval 2 \
  --bootstrap "$boot" >"$work/node2.log" 2>&1 &
node2_pid=$!

sport="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
log "supervisor: a Beacon node serving SmolLM2-135M-Instruct on 127.0.0.1:$sport (stands in for a remote API; not on the network)"
BEACON_DATA_DIR="$work/supervisor" "$node" model package --gguf "$model" ai/smollm2:supervisor >/dev/null
BEACON_DATA_DIR="$work/supervisor" "$node" serve --no-network --listen "127.0.0.1:$sport" --parallel 1 \
  --ctx-size 8192 >"$work/supervisor.log" 2>&1 &
sup_pid=$!
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$sport/healthz" >/dev/null && break; sleep 0.1; done

rport="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
log "router on 127.0.0.1:$rport joins the network (supervisor: ai/smollm2:supervisor)"
"$router" serve --data-dir "$work/router" --listen "127.0.0.1:$rport" \
  --p2p-listen /ip4/127.0.0.1/udp/0/quic-v1 --bootstrap "$boot" \
  --remote-base-url "http://127.0.0.1:$sport/engines/v1" --remote-model ai/smollm2:supervisor \
  --model-pin "$ref=$digest" \
  >"$work/router.log" 2>&1 &
router_pid=$!
for _ in $(seq 1 120); do
  n="$(curl -sf "http://127.0.0.1:$rport/v1/providers" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["providers"]))' 2>/dev/null || echo 0)"
  [ "$n" -ge 2 ] && break
  sleep 0.5
done
cat >"$work/providers.py" <<'PY'
import json, sys
for p in json.load(sys.stdin)["providers"]:
    print("  provider %s... region %-8s slots %s models %s" % (p["peer_id"][:16], p["region"], p["slots"], p["models"]))
PY
cat >"$work/answer.py" <<'PY'
import json, sys
r = json.load(sys.stdin)
b = r["beacon"]
text = r["choices"][0]["message"]["content"].strip().replace("\n", " ")[:70]
print("  %-8s %s... verified=%s audited=%s %4.0f ms: %s" % (b["region"], b["provider"][:16], b["verified"], b["audited"], b["latency_ms"], text))
PY
curl -sf "http://127.0.0.1:$rport/v1/providers" | python3 "$work/providers.py"

log "routed chat: POST /v1/chat/completions on the router (results are signed and verified)"
for q in "Name a large city in Europe." "Name a large river in Africa." "Name a planet of the solar system."; do
  curl -sf "http://127.0.0.1:$rport/v1/chat/completions" -H 'Content-Type: application/json' \
    -d "{\"model\":\"$ref\",\"messages\":[{\"role\":\"user\",\"content\":\"$q\"}],\"temperature\":0,\"max_tokens\":24}" \
    | python3 "$work/answer.py" &
done
wait_jobs() { for j in $(jobs -p); do case " $registry_pid $node_pid $node2_pid $router_pid $sup_pid " in *" $j "*) ;; *) wait "$j";; esac; done; }
wait_jobs

doc=ops/data/northport-annual-report-2025.txt
question="How many tonnes of cargo did the port handle in 2025?"
log "MinionS: \"$question\" about $doc ($(wc -c <"$doc") bytes)"
echo "  the supervisor sees the question and the document's size, never the document;"
echo "  providers read it chunk by chunk; every result is signed and verified (progress below)"
"$router" minions --router "http://127.0.0.1:$rport" --task "$question" --context "$doc" \
  --doc-metadata "Annual report of a harbour authority, 2025" --local-model "$ref" --max-rounds 1
echo
echo "(The models here have 135M parameters, so that this runs on two CPU cores: the protocol,"
echo " placement, verification and accounting are real; the answer's quality is that of a 135M"
echo " supervisor reading quoted evidence. Point --remote-base-url at a frontier model's API for more.)"
