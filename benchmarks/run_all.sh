#!/usr/bin/env bash
# Run every benchmark; tables and JSON go to outputs/benchmarks. On a GPU: bash benchmarks/run_all.sh --gpu
# (bf16; flash-attention 2 when the flash-attn package is installed, sdpa otherwise: compression needs only a 2-D
# padding mask, so every path runs on either kernel).
set -euo pipefail
cd "$(dirname "$0")/.."
options=()
if [ "${1:-}" = "--gpu" ]; then
  attn=sdpa
  if python -c "import flash_attn" 2>/dev/null; then attn=flash_attention_2; fi
  options=(--device cuda --dtype bfloat16 --attn "$attn")
fi
python benchmarks/kv_cache.py "${options[@]}"
python benchmarks/generation.py "${options[@]}"
python benchmarks/embedding.py "${options[@]}"
python benchmarks/ask_many.py "${options[@]}"
python benchmarks/grad_cache.py
python benchmarks/train_step.py "${options[@]}"
python benchmarks/memory.py "${options[@]}"
