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
