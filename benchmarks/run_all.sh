#!/usr/bin/env bash
# Run every benchmark; tables and JSON go to outputs/benchmarks. On a GPU: bash benchmarks/run_all.sh --gpu
# (bf16, flash-attention for the native paths when installed; compressed attention always needs sdpa/eager).
set -euo pipefail
cd "$(dirname "$0")/.."
options=()
if [ "${1:-}" = "--gpu" ]; then
  options=(--device cuda --dtype bfloat16 --attn sdpa)
fi
python benchmarks/kv_cache.py "${options[@]}"
python benchmarks/generation.py "${options[@]}"
python benchmarks/embedding.py "${options[@]}"
python benchmarks/ask_many.py "${options[@]}"
python benchmarks/grad_cache.py
