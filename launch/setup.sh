#!/usr/bin/env bash
# Idempotent environment set-up: creates .venv next to the repository (if missing) and installs the package
# with its test extras. Safe to run repeatedly; a second run only checks that everything is installed.
#   JAXRL_VENV=/path/to/venv   use another location
#   JAXRL_EXTRAS=test,gym      extras to install (default: test)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${JAXRL_VENV:-$repo/.venv}"
extras="${JAXRL_EXTRAS:-test}"
python="${PYTHON:-python3}"

if ! "$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
  echo "jaxrl_llm needs Python >= 3.11 (found: $("$python" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating virtual environment in $venv"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
fi
stamp="$venv/.jaxrl_llm-installed"
want="$(cat "$repo/pyproject.toml" | sha256sum | cut -c1-16)-$extras"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing jaxrl_llm[$extras] (first run downloads the dependencies)"
  "$venv/bin/python" -m pip install --quiet --progress-bar off -e "$repo[$extras]"
  echo "$want" > "$stamp"
fi
echo "[setup] ready: $venv"
