#!/usr/bin/env bash
# Set up the environment (idempotent) and run the main job on the embedded default.
# Extra arguments are `key=value` overrides of the pipeline config (e.g. `seed=1 run_dir=runs/seed1`).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
JAXRL_EXTRAS="${JAXRL_EXTRAS:-test,gym}" bash "$repo/launch/setup.sh"
venv="${JAXRL_VENV:-$repo/.venv}"
cd "$repo"
exec "$venv/bin/jaxrl-llm" pipeline --config configs/main.yaml "$@"
