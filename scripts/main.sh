#!/usr/bin/env bash
# Install (if needed) and run the main job on the embedded default (tiny model, bundled data), offline.
# Installs the Python environment with the train, eval and demo extras (pip only: no root, no apt, no browser).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/install.sh "train,eval,demo"
python -m crem_hf.demo.main "$@"
