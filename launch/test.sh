#!/usr/bin/env bash
# Set up the environment (idempotent) and run the whole test suite on the CPU.
# Extra arguments are passed to pytest, e.g. `launch/test.sh -k losses`.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
JAXRL_EXTRAS="${JAXRL_EXTRAS:-test,gym}" bash "$repo/launch/setup.sh"
venv="${JAXRL_VENV:-$repo/.venv}"
cd "$repo"
# Two workers: one per core on the reference CI machine; JAX itself then uses one thread pool per worker.
exec "$venv/bin/python" -m pytest -n "${JAXRL_TEST_WORKERS:-2}" --durations=15 "$@"
