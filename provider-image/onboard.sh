#!/usr/bin/env bash
# Joins this machine to a Beacon network as a provider, in one command.
#
#   onboard.sh --region eu-west --bootstrap /dns4/boot.example.net/udp/4001/quic-v1 \
#              --model registry.example.net/ai/smollm2:135M-Q4_1
#
# It checks the host (and explains how to fix whatever fails), creates the node identity or
# keeps the existing one, pulls the starter model, starts the node as a container (with the
# GPUs when there are any) or on bare metal (a systemd unit, or in the foreground where
# there is no systemd), waits until it is healthy and prints its peer id, what it
# advertises and how to check on it. Running it again changes only what differs.
#
# Options:
#   --region NAME          region to advertise (default: local)
#   --bootstrap ADDRS      bootstrap peers, comma-separated multiaddrs
#   --model REF            starter model to pull (repeatable)
#   --mode MODE            auto | container | bare-metal (default auto: container when a
#                          Docker engine is reachable, else bare metal)
#   --service KIND         bare metal only: auto | systemd | foreground (default auto)
#   --image IMAGE          provider image (default beacon-node:latest, beacon-node:cuda with GPUs)
#   --binary PATH          bare metal: the beacon-node binary to install (default: on PATH)
#   --prefix DIR           bare metal: where the binary is installed (default /usr/local/bin,
#                          ~/.local/bin when not root)
#   --data-dir DIR         bare metal: model store and identity (default /var/lib/beacon,
#                          ~/.local/share/beacon when not root)
#   --volume NAME          container: the Docker volume for store and identity (beacon-data)
#   --name NAME            container / unit name (default beacon-node)
#   --state-dir DIR        where onboarding records what it installed (default /etc/beacon,
#                          ~/.config/beacon when not root)
#   --api-listen ADDR      the node's local HTTP API (default 127.0.0.1:12434); beyond
#                          loopback it requires a token, made on first start and kept in
#                          the data directory (api-token)
#   --allow-routers IDS    serve work only for these router peer ids (comma-separated;
#                          default: any router of the open network)
#   --p2p-port PORT        libp2p port, TCP and QUIC (default 4001)
#   --data-plane-port PORT QUIC data-plane port (default 4433)
#   --public-host HOST     address others reach this host at (behind NAT or port forwarding)
#   --gpus auto|all|none   use the GPUs (default auto: when nvidia-smi finds one)
#   --insecure-registry H  a registry that may be reached over plain HTTP (repeatable)
#   --min-disk-gb N        free disk space required (default 20)
#   --timeout SECS         how long to wait for the node to be healthy (default 120)
#   --dry-run              print every action; change nothing
#   --uninstall            stop and remove what onboarding installed; keep models and identity
#   --purge                with --uninstall: remove models and identity too
#   -h, --help             this help
set -euo pipefail

# ---------------------------------------------------------------- settings
region=local
bootstrap=""
models=()
mode=auto
service=auto
service_user=beacon
created_user=""
image=""
binary=""
prefix=""
data_dir=""
volume=beacon-data
name=beacon-node
state_dir=""
api_listen=127.0.0.1:12434
allow_routers=""
p2p_port=4001
dp_port=4433
public_host=""
gpus=auto
insecure=()
min_disk_gb=20
timeout=120
dry_run=0
uninstall=0
purge=0

if [ "$(id -u)" -eq 0 ]; then
  default_prefix=/usr/local/bin
  default_data=/var/lib/beacon
  default_state=/etc/beacon
  unit_dir=/etc/systemd/system
  systemctl_scope=()
else
  default_prefix="$HOME/.local/bin"
  default_data="$HOME/.local/share/beacon"
  default_state="$HOME/.config/beacon"
  unit_dir="$HOME/.config/systemd/user"
  systemctl_scope=(--user)
fi

say() { printf '%s\n' "$*"; }
step() { printf '\n==> %s\n' "$*"; }
ok() { printf '  ok    %s\n' "$*"; }
warn() { printf '  warn  %s\n' "$*"; }
problems=0
# fail WHAT FIX: a failed check, explained; onboarding stops after all checks ran.
fail() {
  printf '  FAIL  %s\n        fix: %s\n' "$1" "$2"
  problems=$((problems + 1))
}
die() { printf 'onboard: %s\n' "$*" >&2; exit 1; }
# run CMD...: prints the action; runs it unless this is a dry run.
run() {
  printf '  + %s\n' "$(quote "$@")"
  [ "$dry_run" = 1 ] || "$@"
}
quote() {
  local out="" a
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then out+="$a "; else out+="'${a//\'/\'\\\'\'}' "; fi
  done
  printf '%s' "${out% }"
}
# write_file PATH MODE: writes stdin to PATH (printed, not written, in a dry run).
write_file() {
  local path="$1" mode="$2" content
  content="$(cat)"
  printf '  + write %s:\n' "$path"
  printf '%s\n' "$content" | sed 's/^/      | /'
  if [ "$dry_run" = 0 ]; then
    mkdir -p "$(dirname "$path")"
    printf '%s\n' "$content" >"$path.tmp"
    chmod "$mode" "$path.tmp"
    mv "$path.tmp" "$path"
  fi
}

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --region) region="$2"; shift 2 ;;
    --bootstrap) bootstrap="$2"; shift 2 ;;
    --model) models+=("$2"); shift 2 ;;
    --mode) mode="$2"; shift 2 ;;
    --service) service="$2"; shift 2 ;;
    --image) image="$2"; shift 2 ;;
    --binary) binary="$2"; shift 2 ;;
    --prefix) prefix="$2"; shift 2 ;;
    --data-dir) data_dir="$2"; shift 2 ;;
    --volume) volume="$2"; shift 2 ;;
    --name) name="$2"; shift 2 ;;
    --state-dir) state_dir="$2"; shift 2 ;;
    --api-listen) api_listen="$2"; shift 2 ;;
    --allow-routers) allow_routers="$2"; shift 2 ;;
    --p2p-port) p2p_port="$2"; shift 2 ;;
    --data-plane-port) dp_port="$2"; shift 2 ;;
    --public-host) public_host="$2"; shift 2 ;;
    --gpus) gpus="$2"; shift 2 ;;
    --insecure-registry) insecure+=("$2"); shift 2 ;;
    --min-disk-gb) min_disk_gb="$2"; shift 2 ;;
    --timeout) timeout="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --uninstall) uninstall=1; shift ;;
    --purge) purge=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

case "$mode" in auto|container|bare-metal) ;; *) die "--mode must be auto, container or bare-metal" ;; esac
case "$service" in auto|systemd|foreground) ;; *) die "--service must be auto, systemd or foreground" ;; esac
case "$gpus" in auto|all|none) ;; *) die "--gpus must be auto, all or none" ;; esac
[[ "$p2p_port" =~ ^[0-9]+$ && "$dp_port" =~ ^[0-9]+$ ]] || die "ports must be numbers"
[[ "$region" =~ ^[A-Za-z0-9._-]{1,64}$ ]] || die "--region must be 1-64 letters, digits, '.', '_' or '-'"
[[ "$name" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*$ ]] || die "--name must be a plain name"
# A model reference goes into JSON, unit files and command lines: only the characters a
# reference can have (review L6: a quote in it rewrote the /models/create body).
for m in ${models[@]+"${models[@]}"}; do
  [[ "$m" =~ ^[A-Za-z0-9][A-Za-z0-9._/:@-]{0,254}$ ]] || die "--model '$m' is not a model reference"
done
prefix="${prefix:-$default_prefix}"
data_dir="${data_dir:-$default_data}"
state_dir="${state_dir:-$default_state}"
state_file="$state_dir/$name.onboard"
api_host="${api_listen%:*}"
api_port="${api_listen##*:}"
[ "$api_host" = 0.0.0.0 ] && api_host=127.0.0.1
health_url="http://$api_host:$api_port"
[ "$dry_run" = 1 ] && say "(dry run: every action is printed, nothing is changed)"

docker_ok() { command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; }
# A node already serving here holds its store: identity and pulls then go through its API.
node_up() { curl -sf --max-time 3 "$health_url/healthz" >/dev/null 2>&1; }
# api_token: the running node's API token, when it keeps one (an API beyond loopback).
api_token() {
  if [ "$mode" = container ]; then
    docker exec "$name" cat /var/lib/beacon/api-token 2>/dev/null || true
  else
    cat "$data_dir/api-token" 2>/dev/null || true
  fi
}
# api_get PATH: GET from the running node's API, with its token when it keeps one.
api_get() {
  local token
  token="$(api_token)"
  curl -sf -K <(if [ -n "$token" ]; then printf 'header = "Authorization: Bearer %s"\n' "$token"; fi) \
    "$health_url$1"
}
# pull_via_api REF: the running node pulls REF itself (`/models/create`). The token goes
# through a file descriptor, never on a command line or in this script's output.
pull_via_api() {
  local token
  token="$(api_token)"
  run curl -sf --max-time 3600 -o /dev/null -X POST "$health_url/models/create" \
    -K <(if [ -n "$token" ]; then printf 'header = "Authorization: Bearer %s"\n' "$token"; fi) \
    -H 'Content-Type: application/json' -d "{\"from\":\"$1\"}"
}
have_systemd() { [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; }

# ---------------------------------------------------------------- uninstall
if [ "$uninstall" = 1 ]; then
  step "uninstalling $name"
  recorded_mode="" recorded_binary="" recorded_unit="" recorded_volume="" recorded_data="" recorded_user=""
  if [ -f "$state_file" ]; then
    # The state file holds KEY=VALUE lines written by this script; read them as data.
    while IFS='=' read -r key value; do
      case "$key" in
        mode) recorded_mode="$value" ;;
        binary) recorded_binary="$value" ;;
        unit) recorded_unit="$value" ;;
        volume) recorded_volume="$value" ;;
        data_dir) recorded_data="$value" ;;
        user) recorded_user="$value" ;;
      esac
    done <"$state_file"
    say "  onboarded in ${recorded_mode:-?} mode (record: $state_file)"
  else
    warn "no record of an onboarding at $state_file: removing what the options name"
  fi
  # Only a container this script started (it carries the onboarding label).
  if docker_ok && [ -n "$(docker container inspect -f '{{index .Config.Labels "io.beacon.onboard"}}' "$name" 2>/dev/null)" ]; then
    run docker rm -f "$name"
  fi
  unit="${recorded_unit:-$unit_dir/$name.service}"
  if [ -f "$unit" ]; then
    if have_systemd; then
      run systemctl "${systemctl_scope[@]}" disable --now "$name.service" || true
    fi
    run rm -f "$unit"
    have_systemd && run systemctl "${systemctl_scope[@]}" daemon-reload
  fi
  if [ -n "$recorded_binary" ] && [ -f "$recorded_binary" ]; then
    run rm -f "$recorded_binary"
  fi
  # The system user the unit ran as, when onboarding made it.
  if [ -n "$recorded_user" ] && id -u "$recorded_user" >/dev/null 2>&1; then
    run userdel "$recorded_user"
  fi
  if [ "$purge" = 1 ]; then
    vol="${recorded_volume:-$volume}"
    if docker_ok && docker volume inspect "$vol" >/dev/null 2>&1; then
      run docker volume rm "$vol"
    fi
    dir="${recorded_data:-$data_dir}"
    [ -d "$dir" ] && run rm -rf "$dir"
  else
    say "  models and identity are kept (volume ${recorded_volume:-$volume} or ${recorded_data:-$data_dir}); --purge removes them"
  fi
  if [ -f "$state_file" ]; then
    run rm -f "$state_file"
    [ "$dry_run" = 1 ] || rmdir "$state_dir" 2>/dev/null || true
  fi
  say "done"
  exit 0
fi

# ---------------------------------------------------------------- checks
step "checking this host"
os="$(uname -s)"
if [ "$os" = Linux ]; then
  pretty="$(sed -n 's/^PRETTY_NAME="\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' /etc/os-release 2>/dev/null || true)"
  pretty="${pretty:-Linux}"
  ok "operating system: $pretty"
else
  fail "operating system is $os" "Beacon providers run on Linux; use a Linux host or VM"
fi
arch="$(uname -m)"
case "$arch" in
  x86_64|aarch64) ok "architecture: $arch" ;;
  *) fail "architecture $arch is not supported" "use an x86_64 or aarch64 host" ;;
esac

gpu_names=""
if [ "$gpus" != none ]; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    if gpu_names="$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1)" \
      && [ -n "$gpu_names" ]; then
      while IFS= read -r g; do ok "GPU: $g"; done <<<"$gpu_names"
    else
      gpu_names=""
      if [ "$gpus" = all ]; then
        fail "nvidia-smi cannot talk to the NVIDIA driver" "install the NVIDIA driver for this kernel (e.g. apt-get install nvidia-driver) and reboot, or run with --gpus none"
      else
        warn "nvidia-smi found but no working GPU driver: continuing on the CPU (--gpus all makes this an error)"
      fi
    fi
  elif [ "$gpus" = all ]; then
    fail "--gpus all but nvidia-smi is not installed" "install the NVIDIA driver (it provides nvidia-smi), or run with --gpus none"
  else
    ok "no NVIDIA GPU (nvidia-smi not found): the node runs on the CPU"
  fi
fi
use_gpu=0
[ -n "$gpu_names" ] && use_gpu=1

if [ "$mode" = auto ]; then
  if docker_ok; then mode=container; else mode=bare-metal; fi
  ok "mode: $mode (auto)"
else
  ok "mode: $mode"
fi

if [ "$mode" = container ]; then
  if ! command -v docker >/dev/null 2>&1; then
    fail "Docker is not installed" "install Docker Engine (https://docs.docker.com/engine/install/) or use --mode bare-metal"
  elif ! docker info >/dev/null 2>&1; then
    fail "the Docker engine is not reachable" "start it (systemctl start docker) and make sure this user may use it (root, or the docker group)"
  else
    ok "Docker engine $(docker version --format '{{.Server.Version}}' 2>/dev/null || echo '?')"
    if [ "$use_gpu" = 1 ]; then
      if docker info --format '{{json .Runtimes}}' 2>/dev/null | grep -q nvidia \
        || command -v nvidia-container-runtime-hook >/dev/null 2>&1 \
        || command -v nvidia-ctk >/dev/null 2>&1; then
        ok "NVIDIA container toolkit"
      else
        fail "the NVIDIA container toolkit is missing (containers cannot see the GPUs)" \
          "install nvidia-container-toolkit, run 'nvidia-ctk runtime configure --runtime=docker' and restart Docker; or use --gpus none or --mode bare-metal"
      fi
    fi
    image="${image:-$([ "$use_gpu" = 1 ] && echo beacon-node:cuda || echo beacon-node:latest)}"
    if docker image inspect "$image" >/dev/null 2>&1; then
      ok "image $image"
    else
      warn "image $image is not here: it will be pulled"
    fi
  fi
else
  if [ -z "$binary" ]; then
    binary="$(command -v beacon-node 2>/dev/null || true)"
  fi
  if [ -z "$binary" ] || [ ! -x "$binary" ]; then
    fail "no beacon-node binary (looked at --binary and PATH)" "build it (cargo build --release -p beacon-node, with --features cuda for GPUs) and pass --binary PATH, or use --mode container"
  elif ! version="$("$binary" --version 2>&1)"; then
    fail "$binary does not run: $version" "rebuild beacon-node for this host"
  else
    ok "binary: $binary ($version)"
  fi
  if [ "$service" = auto ]; then
    if have_systemd; then service=systemd; else service=foreground; fi
  fi
  if [ "$service" = systemd ] && ! have_systemd && [ "$dry_run" = 0 ]; then
    fail "systemd is not running here" "use --service foreground (or --mode container)"
  fi
  ok "service: $service"
fi

if ! command -v curl >/dev/null 2>&1; then
  fail "curl is missing (used to wait for the node)" "apt-get install curl (or your distribution's package)"
fi

# Free disk where the models will live.
disk_path="$data_dir"
if [ "$mode" = container ] && docker_ok; then
  disk_path="$(docker info --format '{{.DockerRootDir}}' 2>/dev/null || echo /var/lib/docker)"
fi
probe="$disk_path"
while [ ! -d "$probe" ]; do probe="$(dirname "$probe")"; done
free_kb="$(df -Pk "$probe" | awk 'NR==2 {print $4}')"
free_gb=$((free_kb / 1024 / 1024))
if [ "$free_gb" -ge "$min_disk_gb" ]; then
  ok "disk: ${free_gb} GB free at $probe (need $min_disk_gb)"
else
  fail "only ${free_gb} GB free at $probe (need $min_disk_gb)" "free space there, put the store elsewhere (--data-dir, or Docker's data-root), or lower --min-disk-gb for small models"
fi
mem_kb="$(awk '/MemTotal/ {print $2}' /proc/meminfo 2>/dev/null || echo 0)"
ok "memory: $((mem_kb / 1024 / 1024)) GB"

if [ "$problems" -gt 0 ]; then
  say ""
  die "$problems check(s) failed; fix them and run this again (nothing was changed)"
fi

# ---------------------------------------------------------------- configuration
env_args=(
  "BEACON_REGION=$region"
  "BEACON_LISTEN=$api_listen"
  "BEACON_P2P_LISTEN=/ip4/0.0.0.0/udp/$p2p_port/quic-v1,/ip4/0.0.0.0/tcp/$p2p_port"
  "BEACON_DATA_PLANE=0.0.0.0:$dp_port"
)
[ -n "$bootstrap" ] && env_args+=("BEACON_BOOTSTRAP=$bootstrap")
if [ -n "$public_host" ]; then
  if [[ "$public_host" =~ ^[0-9.]+$ ]]; then proto=ip4; elif [[ "$public_host" == *:* ]]; then proto=ip6; else proto=dns; fi
  env_args+=("BEACON_P2P_ADVERTISE=/$proto/$public_host/udp/$p2p_port/quic-v1,/$proto/$public_host/tcp/$p2p_port")
  env_args+=("BEACON_DATA_PLANE_ADVERTISE=$public_host:$dp_port")
fi
# An API beyond loopback requires a token (the node refuses to start without one): it is
# made on first start and kept in the data directory. On loopback, local tools need none.
case "${api_listen%:*}" in
  127.* | localhost | '[::1]' | ::1) api_loopback=1 ;;
  *) api_loopback=0 ;;
esac
if [ "$api_loopback" = 1 ]; then
  [ "$mode" = container ] && env_args+=("BEACON_API_TOKEN_FILE=")
elif [ "$mode" = container ]; then
  env_args+=("BEACON_API_TOKEN_FILE=/var/lib/beacon/api-token")
else
  env_args+=("BEACON_API_TOKEN_FILE=$data_dir/api-token")
fi
if [ -n "$allow_routers" ]; then
  [[ "$allow_routers" =~ ^[1-9A-HJ-NP-Za-km-z,]+$ ]] || die "--allow-routers takes peer ids (base58), comma-separated"
  env_args+=("BEACON_DATA_PLANE_ALLOW=$allow_routers")
fi
[ "$use_gpu" = 1 ] && env_args+=("BEACON_GPU_LAYERS=999")
[ "${#insecure[@]}" -gt 0 ] && env_args+=("BEACON_INSECURE_REGISTRIES=$(IFS=,; echo "${insecure[*]}")")

# identity_and_models: with `node_cli` (the beacon-node command line of this mode) and
# `running` set, makes sure the identity exists and the starter models are pulled. A node
# that is already up holds its store, so it pulls through its API instead.
identity_and_models() {
  [ "$running" = 1 ] || run "${node_cli[@]}" info
  [ "${#models[@]}" -gt 0 ] || return 0
  step "starter model"
  local m
  for m in "${models[@]}"; do
    if [ "$running" = 1 ]; then
      pull_via_api "$m"
    else
      run "${node_cli[@]}" model pull --progress none "$m"
    fi
  done
}

record_state() {
  write_file "$state_file" 0644 <<EOF
mode=$mode
name=$name
region=$region
$(if [ "$mode" = container ]; then printf 'image=%s\nvolume=%s' "$image" "$volume"; else printf 'binary=%s\ndata_dir=%s\nunit=%s\nuser=%s' "$installed_binary" "$data_dir" "$unit_path" "$created_user"; fi)
EOF
}

# ---------------------------------------------------------------- container mode
node_pid=""
if [ "$mode" = container ]; then
  docker_env=()
  for e in "${env_args[@]}"; do docker_env+=(-e "$e"); done
  gpu_args=()
  [ "$use_gpu" = 1 ] && gpu_args=(--gpus all)
  # Host networking: a p2p node must be reachable at the addresses it advertises.
  common=(--network host -v "$volume:/var/lib/beacon")

  step "image"
  docker image inspect "$image" >/dev/null 2>&1 || run docker pull "$image"

  running=0
  [ "$(docker container inspect -f '{{.State.Running}}' "$name" 2>/dev/null)" = true ] && node_up && running=1
  step "identity"
  if docker volume inspect "$volume" >/dev/null 2>&1; then
    say "  keeping the identity and models in volume $volume"
  else
    run docker volume create "$volume"
    say "  a new identity is created in volume $volume"
  fi
  node_cli=(docker run --rm "${common[@]}" "${docker_env[@]}" "$image")
  identity_and_models

  step "starting the node"
  config_hash="$(printf '%s\n' "$image" "${env_args[@]}" "${gpu_args[@]}" | sha256sum | cut -c1-16)"
  current="$(docker container inspect -f '{{index .Config.Labels "io.beacon.onboard"}} {{.State.Running}}' "$name" 2>/dev/null || true)"
  if [ "$current" = "$config_hash true" ]; then
    say "  $name is already running with this configuration"
  else
    [ -n "$current" ] && run docker rm -f "$name"
    run docker run -d --name "$name" --restart unless-stopped --label "io.beacon.onboard=$config_hash" \
      "${common[@]}" "${gpu_args[@]}" "${docker_env[@]}" "$image" serve
  fi
  installed_binary="" unit_path=""
  record_state
  status_hint="docker logs -f $name; docker inspect -f '{{.State.Health.Status}}' $name"

# ---------------------------------------------------------------- bare metal
else
  step "binary"
  installed_binary="$prefix/beacon-node"
  if [ "$(readlink -f "$binary")" = "$(readlink -f "$installed_binary" 2>/dev/null || true)" ]; then
    say "  using $installed_binary"
    installed_binary=""   # not installed by onboarding: never removed by --uninstall
    node_bin="$binary"
  elif [ -f "$installed_binary" ] && cmp -s "$binary" "$installed_binary"; then
    say "  $installed_binary is up to date"
    node_bin="$installed_binary"
  else
    run install -D -m 0755 "$binary" "$installed_binary"
    node_bin="$installed_binary"
  fi

  running=0
  node_up && running=1
  step "identity"
  if [ -f "$data_dir/identity.key" ]; then
    say "  keeping the identity in $data_dir/identity.key"
  else
    say "  a new identity is created in $data_dir/identity.key"
    run install -d -m 0700 "$data_dir"
  fi
  node_cli=(env "BEACON_DATA_DIR=$data_dir" "${env_args[@]}" "$node_bin")
  identity_and_models

  step "starting the node ($service)"
  unit_path=""
  if [ "$service" = systemd ]; then
    unit_path="$unit_dir/$name.service"
    sandbox=""
    if [ "$(id -u)" -eq 0 ]; then
      # The node parses GGUF files from registries with llama.cpp: as root it runs as its
      # own system user, in a sandbox that leaves it its data directory only.
      if ! id -u "$service_user" >/dev/null 2>&1; then
        run useradd --system --user-group --no-create-home --home-dir "$data_dir" \
          --shell /usr/sbin/nologin "$service_user"
        created_user="$service_user"
      fi
      run chown -R "$service_user:$service_user" "$data_dir"
      mem_max=$((mem_kb * 9 / 10 / 1024))M
      sandbox="User=$service_user
Group=$service_user
NoNewPrivileges=yes
ProtectSystem=strict
ReadWritePaths=$data_dir
ProtectHome=yes
PrivateTmp=yes
CapabilityBoundingSet=
AmbientCapabilities=
RestrictSUIDSGID=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
LockPersonality=yes
MemoryMax=$mem_max
"
    fi
    {
      printf '[Unit]\nDescription=Beacon provider node (%s)\nWants=network-online.target\nAfter=network-online.target\n\n' "$region"
      printf '[Service]\nEnvironment=BEACON_DATA_DIR=%s\n' "$data_dir"
      for e in "${env_args[@]}"; do printf 'Environment="%s"\n' "$e"; done
      printf 'ExecStart=%s serve\nRestart=on-failure\nRestartSec=5\nLimitNOFILE=65536\n' "$node_bin"
      printf '%s' "$sandbox"
      printf '\n[Install]\nWantedBy=%s\n' "$([ "$(id -u)" -eq 0 ] && echo multi-user.target || echo default.target)"
    } | write_file "$unit_path" 0644
    run systemctl "${systemctl_scope[@]}" daemon-reload
    run systemctl "${systemctl_scope[@]}" enable "$name.service"
    run systemctl "${systemctl_scope[@]}" restart "$name.service"
    status_hint="systemctl ${systemctl_scope[*]} status $name; journalctl ${systemctl_scope[*]} -u $name -f"
  else
    say "  + BEACON_DATA_DIR=$data_dir $(quote env "${env_args[@]}") $node_bin serve   (in the foreground; Ctrl-C stops it)"
    if [ "$dry_run" = 0 ]; then
      env "BEACON_DATA_DIR=$data_dir" "${env_args[@]}" "$node_bin" serve &
      node_pid=$!
      trap 'kill -TERM "$node_pid" 2>/dev/null; wait "$node_pid"; exit 0' INT TERM
      # Onboarding that fails while waiting leaves no node behind.
      trap '[ -n "$node_pid" ] && kill -TERM "$node_pid" 2>/dev/null' EXIT
    fi
    status_hint="this terminal runs the node; Ctrl-C stops it"
  fi
  record_state
fi

# ---------------------------------------------------------------- wait and report
if [ "$dry_run" = 1 ]; then
  say ""
  say "dry run finished: nothing was changed"
  exit 0
fi

step "waiting for the node to be healthy ($health_url/healthz)"
deadline=$((SECONDS + timeout))
until curl -sf "$health_url/healthz" >/dev/null 2>&1; do
  if [ -n "$node_pid" ] && ! kill -0 "$node_pid" 2>/dev/null; then die "the node exited; see its output above"; fi
  if [ "$mode" = container ] && [ "$(docker container inspect -f '{{.State.Running}}' "$name" 2>/dev/null)" != true ]; then
    docker logs --tail 20 "$name" >&2 || true
    die "the container stopped; its last log lines are above"
  fi
  [ "$SECONDS" -lt "$deadline" ] || die "not healthy after ${timeout}s; check: $status_hint"
  sleep 1
done
# The first advert follows shortly after the API is up: wait for it (bounded).
info=""
for _ in $(seq 1 30); do
  info="$(api_get /beacon/node || true)"
  case "$info" in *'"advert":{'*) break ;; esac
  sleep 1
done
peer_id=""
if command -v python3 >/dev/null 2>&1 && [ -n "$info" ]; then
  peer_id="$(printf '%s' "$info" | python3 -c 'import json,sys; print(json.load(sys.stdin)["peer_id"])' 2>/dev/null || true)"
  summary="$(printf '%s' "$info" | python3 -c '
import json, sys
n = json.load(sys.stdin)
a = n.get("advert") or {}
print("  region      %s" % n.get("region"))
print("  data plane  %s" % n.get("data_plane"))
for addr in n.get("listen_addrs", [])[:6]:
    print("  listening   %s" % addr)
h = a.get("host") or {}
if h:
    print("  host        %s cores, %.1f GB RAM free" % (h.get("cores"), (h.get("ram_free") or 0) / 1e9))
for g in a.get("accelerators", []):
    print("  accelerator %s" % g)
s = a.get("slots") or {}
if s:
    print("  slots       %s" % s.get("total"))
for m in a.get("models", []):
    print("  model       %s (%s)" % (", ".join(m.get("references") or []) or "?", m.get("digest", "")[:19]))
' 2>/dev/null || true)"
else
  summary="$info"
fi
step "this provider is on the network"
say "  peer id     ${peer_id:-(see $health_url/beacon/node)}"
[ -n "$summary" ] && say "$summary"
say ""
say "check on it:  curl -s $health_url/beacon/node; curl -s $health_url/beacon/peers"
say "              $status_hint"
say "leave:        $0 --uninstall$([ "$mode" = container ] && echo " --volume $volume")"
if [ -n "$node_pid" ]; then
  wait "$node_pid" || true
  node_pid=""
fi
