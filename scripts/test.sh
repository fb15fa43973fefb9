#!/usr/bin/env bash
# Install (if needed) and run the test suite and the linter. Offline and CPU only.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/install.sh
ruff format --check *.py src tests examples benchmarks
ruff check *.py src tests examples benchmarks
python -m pytest -q "$@"
