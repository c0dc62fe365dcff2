#!/usr/bin/env bash
# Install fedpar with its test tools into ./.venv, then lint, type-check and run the test suite.
# Extra arguments go to pytest (e.g. scripts/test.sh tests/unit -x).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
python -m pip install -q -e '.[test]'
ruff check fedpar tests benchmarks examples
mypy
python -m pytest -p no:cacheprovider "$@"
