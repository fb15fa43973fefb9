"""KV-cache size of a compressed context vs the native one, for 256 / 1280 / 4096 image tokens.

Slot counts come from real prompts (the real Qwen tokenizer) and the caches of a real prefill; bytes are scaled to
Qwen2-VL-2B's language model (28 layers x 2 key/value heads x 128 x 2 for keys and values, bf16), which needs no
weights. Run: python benchmarks/kv_cache.py
"""

from __future__ import annotations

import torch
from common import BF16_BYTES, QWEN2VL_2B, arguments, build, image_with_tokens, report

IMAGE_TOKENS = (256, 1280, 4096)
QUESTION = "What is in the image?"


def main() -> None:
    args = arguments(__doc__.splitlines()[0]).parse_args()
    model, processor = build(64, 2, real_vocabulary=True, max_image_tokens=max(IMAGE_TOKENS), args=args)
    per_slot = QWEN2VL_2B["num_layers"] * 2 * QWEN2VL_2B["num_kv_heads"] * QWEN2VL_2B["head_dim"] * BF16_BYTES
    rows = []
    for keep_prefix in (True, False):
        model.config.compression_keep_prefix = keep_prefix
        for tokens in IMAGE_TOKENS:
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
                    "native MiB (2B, bf16)": native_slots * per_slot / 2**20,
                    "compressed MiB (2B, bf16)": kept_slots * per_slot / 2**20,
                    "compressed / native": kept_slots / native_slots,
                    "1 / ratio": native_slots / kept_slots,
                    "context only: native slots": native_context,
                    "context only: compressed slots": context_only,
                    "context only: 1 / ratio": native_context / context_only,
                }
            )
    notes = (
        "Compressed slots = kept prefix (system prompt and `<|im_start|>user\\n`, unless `compression_keep_prefix` "
        "is off) + 16 chorus tokens + the question and assistant header. The paper's Cache(%) counts the chorus "
        "tokens alone. 'Context only' leaves out the question, which both modes cache alike: the compressed context "
        "that `compress` keeps for follow-up questions."
    )
    report("kv_cache", args, rows, notes)


if __name__ == "__main__":
    main()
