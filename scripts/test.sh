#!/usr/bin/env bash
# Install (if needed) and run the test suite and the linter. Offline and CPU only.
# Installs the Python environment with the dev extras, and Debian's chromium for the browser tests (apt, root).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/install.sh dev
bash scripts/install-browser.sh
ruff format --check *.py src tests examples benchmarks
ruff check *.py src tests examples benchmarks
python -m pytest -q "$@"
