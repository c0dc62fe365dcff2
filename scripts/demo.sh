#!/usr/bin/env bash
# Install fedpar into ./.venv and run a demo job on a local cluster (controller + engines).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
python -m pip install -q -e .
python examples/demo.py "$@"
