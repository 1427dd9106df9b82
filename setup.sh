#!/usr/bin/env bash
# Create .venv with Python 3.12 and install megatron-moh into it (editable).
#   bash setup.sh          # the package: train, convert, benchmark
#   bash setup.sh --test   # plus pytest and what the tests use (and the oldest supported transformers)
set -euo pipefail
cd "$(dirname "$0")"

find_python() {
  local candidates=(python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 /usr/local/bin/python3.12 /usr/bin/python3.12)
  for py in "${candidates[@]}"; do
    if "$py" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      echo "$py"; return 0
    fi
  done
  echo "setup.sh: error: Python 3.12 not found: install it (e.g. 'pyenv install 3.12') and rerun" >&2
  return 1
}

extras=""
[[ "${1:-}" == "--test" ]] && extras="[test]"
if [[ ! -x .venv/bin/python ]]; then
  "$(find_python)" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".${extras}"
if [[ -n "$extras" ]]; then
  # The oldest transformers setup.py admits, beside the venv: the tests load exports with it too.
  floor=$(sed -n 's/.*"transformers>=\([0-9.]*\)".*/\1/p' setup.py)
  if [[ ! -d ".venv/transformers-floor/transformers-${floor}.dist-info" ]]; then
    rm -rf .venv/transformers-floor
    .venv/bin/python -m pip install --quiet --target .venv/transformers-floor "transformers==${floor}"
  fi
fi
echo "setup.sh: ready: .venv/bin/python ($(.venv/bin/python -c 'import megatron.core, torch; print("torch", torch.__version__, "megatron-core", megatron.core.__version__)'))"
