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
# the stamp holds the pyproject.toml hash and the extras installed with it; asking for a subset installs nothing
stamp="$venv/.jaxrl_llm-installed"
hash="$(sha256sum < "$repo/pyproject.toml" | cut -c1-16)"
current="" have=""
if [ -f "$stamp" ] && [ "$(cut -d' ' -f1 "$stamp")" = "$hash" ]; then current=1 have="$(cut -s -d' ' -f2 "$stamp")"; fi
missing=""
for e in ${extras//,/ }; do
  case ",$have," in *",$e,"*) ;; *) missing=1 ;; esac
done
if [ -z "$current" ] || [ -n "$missing" ]; then
  all="$extras"
  if [ -n "$have" ]; then all="$have,$extras"; fi
  all="$(tr ',' '\n' <<< "$all" | sed '/^$/d' | sort -u | paste -sd, -)"
  echo "[setup] installing jaxrl_llm[$all] (first run downloads the dependencies)"
  "$venv/bin/python" -m pip install --quiet --progress-bar off -e "$repo[$all]"
  echo "$hash $all" > "$stamp"
fi
echo "[setup] ready: $venv"
