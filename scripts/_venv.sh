# Sourced by demo.sh and test.sh: make ./.venv (with pip) and activate it. On a bare Debian machine the
# venv module comes from the python3-venv package, installed here when missing (as root, via apt-get).
PY="${PYTHON:-python3}"
if ! command -v "$PY" >/dev/null 2>&1; then
  echo "python3 not found: install Python 3.11 or newer" >&2; exit 1
fi
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "fedpar needs Python >= 3.11" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
  if ! "$PY" -m venv .venv 2>/dev/null; then
    rm -rf .venv
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv python3-dev gcc >/dev/null
      "$PY" -m venv .venv
    else
      echo "cannot create a virtual environment: install python3-venv (Debian/Ubuntu) and retry" >&2; exit 1
    fi
  fi
  .venv/bin/python -m pip install -q --upgrade pip
fi
# shellcheck disable=SC1091
. .venv/bin/activate
