#!/usr/bin/env bash
# Run one training command on every worker of a Cloud TPU VM slice (v4/v5e/v5p/v6e pods).
#   bash launch/tpu_pod.sh TPU_NAME ZONE [PROJECT] -- --config configs/grpo.yaml model.path=gs://... key=value ...
# Each worker gets the repository (rsync of this checkout), sets it up and starts `jaxrl-llm train` with the same
# arguments; JAX finds the coordinator and the worker ranks from the TPU metadata by itself, so no flags are needed.
# model.path and log.run_dir must be visible to every worker (a GCS bucket or a shared filesystem).
# JAXRL_COMPILATION_CACHE, if set here, is passed on to every worker (docs/scaling.md, "Compiled programs").
set -euo pipefail
tpu="${1:?usage: tpu_pod.sh TPU_NAME ZONE [PROJECT] -- train arguments}"
zone="${2:?usage: tpu_pod.sh TPU_NAME ZONE [PROJECT] -- train arguments}"
shift 2
project_flag=()
if [ "${1:-}" != "--" ] && [ -n "${1:-}" ]; then project_flag=(--project "$1"); shift; fi
[ "${1:-}" = "--" ] && shift
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
remote_dir="${JAXRL_REMOTE_DIR:-jaxrl_llm}"
args="$(printf '%q ' "$@")"
# JAX writes compiled programs to its cache from process 0 only, and each TPU VM worker has its own disk: the other
# workers find programs on a resume only in a directory they share with worker 0 (e.g. a gs:// path)
cache_env=""
if [ -n "${JAXRL_COMPILATION_CACHE:-}" ]; then cache_env="JAXRL_COMPILATION_CACHE=$(printf '%q' "$JAXRL_COMPILATION_CACHE")"; fi

gcloud compute tpus tpu-vm scp --recurse "$repo" "$tpu:~/" --zone "$zone" --worker=all "${project_flag[@]}"
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all "${project_flag[@]}" --command "
  set -e
  cd ~/$(basename "$repo") 2>/dev/null || cd ~/$remote_dir
  JAXRL_EXTRAS=tpu,gcs bash launch/setup.sh
  $cache_env .venv/bin/jaxrl-llm train $args
"
