#!/usr/bin/env bash
# Download (on a machine with network) what benchmarks/gpu/check.sh installs on a bare GPU machine
# without network: megatron-core and pytest as wheels for CPython 3.12 on Linux (x86_64 and
# aarch64), and this project built as a wheel. Everything goes to benchmarks/gpu/wheels/ (ignored
# by git, about 8 MB), with a hash of the sources so check.sh can refuse stale wheels.
#   bash benchmarks/gpu/fetch_wheels.sh [PYTHON]     # PYTHON: one with pip (default: .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${1:-.venv/bin/python}"
WHEELS=benchmarks/gpu/wheels
mkdir -p "$WHEELS"
rm -f "$WHEELS"/*.whl

# Pinned to the versions the suite is run with; pure-Python wheels except megatron-core.
BINARY=(megatron-core==0.19.2)
# setuptools: megatron.core imports torch.utils.cpp_extension, which imports it.
PURE=(pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pygments==2.21.0 pytest-timeout==2.4.0 setuptools==84.2.1)
for arch in x86_64 aarch64; do
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --implementation cp --python-version 3.12 \
    --platform "manylinux_2_28_$arch" --platform "manylinux_2_17_$arch" --dest "$WHEELS" "${BINARY[@]}"
done
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest "$WHEELS" "${PURE[@]}"
"$PY" -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir "$WHEELS" .

bash benchmarks/gpu/source_hash.sh > "$WHEELS/SOURCE_HASH"
du -sh "$WHEELS"
ls "$WHEELS"
