#!/usr/bin/env bash
# Set up a virtual environment with crem-hf and the extras named in $1 (default: dev, everything the tests need),
# on a fresh machine, offline-capable afterwards. No root, no apt: only python3 and pip. The browser the tests drive
# comes from scripts/install-browser.sh. Source it (`. scripts/install.sh [EXTRAS]`) to stay in the environment.
# VENV overrides the location (default .venv).
set -euo pipefail
EXTRAS="${1:-dev}"
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
# The pinned CPU torch first: an unpinned torch would pull a multi-GB CUDA build.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[$EXTRAS]"
