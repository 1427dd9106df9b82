#!/usr/bin/env bash
# The GPU check kit, one command (README in benchmarks/README.md, "GPU check kit"):
#   bash benchmarks/gpu/check.sh OUT_DIR                 # on a bare CUDA machine, no network
#   bash benchmarks/gpu/check.sh --cpu-dry-run OUT_DIR   # the same script, tiny shapes, on CPU
# On the GPU it makes a venv over the system's torch/triton/transformers (--system-site-packages),
# installs megatron-core, pytest and this project from benchmarks/gpu/wheels/ (fetch_wheels.sh,
# run beforehand where there is network), then runs benchmarks/gpu/check.py: the GPU tests, the
# attention and training benchmarks, a summary against the aims. The dry run uses the current
# Python environment and this checkout.
set -euo pipefail
usage="usage: bash benchmarks/gpu/check.sh [--cpu-dry-run] OUT_DIR"
dry_run=0
if [[ "${1:-}" == "--cpu-dry-run" ]]; then dry_run=1; shift; fi
[[ $# -eq 1 ]] || { echo "check.sh: error: $usage" >&2; exit 2; }
out="$(mkdir -p "$1" && cd "$1" && pwd)"
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"

if (( dry_run )); then
  py="${PYTHON:-python3}"
  export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
  exec "$py" benchmarks/gpu/check.py --cpu-dry-run --out "$out"
fi

wheels=benchmarks/gpu/wheels
if [[ ! -f "$wheels/SOURCE_HASH" ]]; then
  echo "check.sh: error: no wheels in $wheels: run 'bash benchmarks/gpu/fetch_wheels.sh' on a machine with network first" >&2
  exit 2
fi
if [[ "$(cat "$wheels/SOURCE_HASH")" != "$(bash benchmarks/gpu/source_hash.sh)" ]]; then
  echo "check.sh: error: the project wheel in $wheels is older than this checkout: rerun 'bash benchmarks/gpu/fetch_wheels.sh'" >&2
  exit 2
fi
system_py="${PYTHON:-python3}"
venv="$out/venv"
# Without ensurepip (Debian's python3-venv) make the venv bare and use the system's pip module.
"$system_py" -m venv --system-site-packages "$venv" 2>/dev/null \
  || "$system_py" -m venv --system-site-packages --without-pip --clear "$venv"
"$venv/bin/python" -m pip install --quiet --no-index --no-deps --find-links "$wheels" \
  megatron-core pytest pluggy iniconfig pygments pytest-timeout setuptools megatron-moh
exec "$venv/bin/python" benchmarks/gpu/check.py --out "$out"
