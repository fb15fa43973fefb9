#!/usr/bin/env bash
# Set up a virtual environment with everything crem-hf needs, on a fresh machine, offline-capable afterwards.
# Source it (`. scripts/install.sh`) to stay in the environment. VENV overrides the location (default .venv).
set -euo pipefail
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
# The pinned CPU torch first: an unpinned torch would pull a multi-GB CUDA build.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"
# The browser the demo's tests drive (tests/test_app.py): Debian's chromium, which playwright runs through
# executable_path (playwright's own browser download is not used).
if [ ! -x /usr/bin/chromium ]; then
  if command -v apt-get >/dev/null; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -q
    $SUDO apt-get install -y -q chromium
  else
    echo "install.sh: no apt-get; install Chromium at /usr/bin/chromium for the demo's browser tests" >&2
    exit 1
  fi
fi
