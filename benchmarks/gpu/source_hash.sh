#!/usr/bin/env bash
# One hash over the project's installable sources (what its wheel contains), without git.
set -euo pipefail
cd "$(dirname "$0")/../.."
find megatron_moh setup.py -name '*.py' -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -d' ' -f1
