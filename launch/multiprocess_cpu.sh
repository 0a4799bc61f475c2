#!/usr/bin/env bash
# N training processes on this host, talking over loopback, each with D (fake) CPU devices: the multi-host code
# path without a cluster. Usage:
#   bash launch/multiprocess_cpu.sh NPROC DEVICES --config configs/grpo.yaml key=value ...
# Every process runs `jaxrl-llm train` with the same arguments; process 0 logs, all of them checkpoint.
set -euo pipefail
nproc="${1:?usage: multiprocess_cpu.sh NPROC DEVICES_PER_PROCESS --config X.yaml [key=value ...]}"
devices="${2:?usage: multiprocess_cpu.sh NPROC DEVICES_PER_PROCESS --config X.yaml [key=value ...]}"
shift 2
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${JAXRL_VENV:-$repo/.venv}"
python="$venv/bin/python"
[ -x "$python" ] || python="$(command -v python3)"
port="${JAXRL_PORT:-$((20000 + RANDOM % 20000))}"
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM
for ((rank = 0; rank < nproc; rank++)); do
  JAXRL_COORDINATOR="127.0.0.1:$port" JAXRL_NUM_PROCESSES="$nproc" JAXRL_PROCESS_ID="$rank" \
  JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$devices" \
    "$python" -m jaxrl_llm.cli train "$@" &
  pids+=("$!")
done
status=0
for pid in "${pids[@]}"; do
  # one failed process fails the run; the trap stops the others instead of leaving them waiting on collectives
  wait "$pid" || { status=$?; break; }
done
if [ "$status" -eq 0 ]; then trap - EXIT; fi
exit "$status"
