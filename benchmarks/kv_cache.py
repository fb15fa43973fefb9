"""KV-cache size of a compressed context vs the native one, for 256 / 1280 / 4096 image tokens.

Slot counts come from real prompts (the real tokenizer, chat template and image processor of the backbone's
published model) and the caches of a real prefill of a tiny model of that backbone; bytes are scaled to the published
model's language model, read from its real config.json in tests/fixtures (layers x key/value heads x head width x 2
for keys and values, bf16), which needs no weights and downloads nothing: Qwen2-VL-2B (28 x 2 x 128), Qwen2.5-VL-3B
(36 x 2 x 128), Qwen3-VL-2B (28 x 8 x 128).
Run: python benchmarks/kv_cache.py [--backbone qwen2_vl|qwen2_5_vl|qwen3_vl]
"""

from __future__ import annotations

import torch
from common import arguments, build, geometry, image_with_tokens, report

IMAGE_TOKENS = (256, 1280, 4096)
QUESTION = "What is in the image?"


def main() -> None:
    parser = arguments(__doc__.splitlines()[0], backbone=True)
    parser.add_argument("--image-tokens", type=int, nargs="+", default=list(IMAGE_TOKENS))
    args = parser.parse_args()
    shape = geometry(args.backbone)
    model, processor = build(64, 2, real_vocabulary=True, max_image_tokens=max(args.image_tokens), args=args)
    per_slot, name = shape["kv_bytes_per_slot"], shape["model"]
    rows = []
    for keep_prefix in (True, False):
        model.config.compression_keep_prefix = keep_prefix
        for tokens in args.image_tokens:
            batch = processor.process_generation_inputs(
                questions=[QUESTION], images=[image_with_tokens(processor, tokens)]
            )
            batch = batch.to(args.device)
            with torch.no_grad():
                native = model.model(**batch, use_cache=True)
                context = model.compress(**batch)
                embedding_inputs = processor.process_embedding_inputs(images=[image_with_tokens(processor, tokens)]).to(
                    args.device
                )
                context_only = model.compress(**embedding_inputs).cache.get_seq_length()
            native_slots = native.cache.get_seq_length()
            kept_slots = context.cache.get_seq_length()
            native_context = embedding_inputs["input_ids"].shape[1]
            rows.append(
                {
                    "keep prefix": keep_prefix,
                    "image tokens": tokens,
                    "native slots": native_slots,
                    "compressed slots": kept_slots,
                    f"native KV bytes ({name}, bf16)": native_slots * per_slot,
                    f"compressed KV bytes ({name}, bf16)": kept_slots * per_slot,
                    f"native MiB ({name}, bf16)": native_slots * per_slot / 2**20,
                    f"compressed MiB ({name}, bf16)": kept_slots * per_slot / 2**20,
                    "compressed / native": kept_slots / native_slots,
                    "1 / ratio": native_slots / kept_slots,
                    "context only: native slots": native_context,
                    "context only: compressed slots": context_only,
                    "context only: 1 / ratio": native_context / context_only,
                    f"context only: native KV bytes ({name})": native_context * per_slot,
                    f"context only: stored KV bytes ({name})": context_only * per_slot,
                }
            )
    notes = (
        f"Backbone {args.backbone}: {name} geometry, {shape['num_layers']} layers x {shape['num_kv_heads']} key/value "
        f"heads x {shape['head_dim']} = {per_slot:,} bytes per cached token (bf16). "
        "Compressed slots = kept prefix (what the template puts before the user turn: the system prompt and "
        "`<|im_start|>user\\n` on Qwen2-VL / Qwen2.5-VL, `<|im_start|>user\\n` alone on Qwen3-VL; none when "
        "`compression_keep_prefix` is off) + 16 chorus tokens + the question and assistant header. The paper's "
        "Cache(%) counts the chorus tokens alone. 'Context only' leaves out the question, which both modes cache "
        "alike: the compressed context that `compress` keeps for follow-up questions."
    )
    report("kv_cache", args, rows, notes)


if __name__ == "__main__":
    main()
