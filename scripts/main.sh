#!/usr/bin/env bash
# Install (if needed) and run the main job on the embedded default (tiny model, bundled data), offline.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/install.sh
python -m crem_hf.demo.main "$@"
