"""Decode cost per token and throughput: compressed vs native generation vs the floor.

The floor decodes from a text-only prompt as long as the compressed context (the same number of cached slots, no
pruning machinery): compressed decoding cannot beat it. Per-token cost is the median interval between decode steps
of one `generate` call (a stopping-criteria clock), so the prefill is left out. Two configurations: one where the
language model dominates (hidden 256, 4 layers, a 416-token vocabulary) and one with the real 151k vocabulary.
The largest batch in a memory budget uses the measured cache slots at Qwen2-VL-2B dimensions (bf16).

Run: python benchmarks/generation.py [--device cuda --dtype bfloat16]
"""

from __future__ import annotations

import statistics
import time

import torch
from common import BF16_BYTES, QWEN2VL_2B, arguments, build, image_with_tokens, report, synchronize
from transformers import StoppingCriteria, StoppingCriteriaList

IMAGE_TOKENS = (256, 1024, 4096)
BATCHES = (1, 32)
NEW_TOKENS = 12
KV_BUDGET_GIB = 16
QUESTION = "What is in the image?"


class StepClock(StoppingCriteria):
    """Records the time of every decode step; never stops generation."""

    def __init__(self, device: str):
        self.device, self.times = device, []

    def __call__(self, input_ids, scores, **kwargs):
        synchronize(self.device)
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def per_token(self) -> float:
        steps = [b - a for a, b in zip(self.times, self.times[1:], strict=False)]
        return statistics.median(steps)


def decode_seconds(model, inputs: dict, device: str, **kwargs) -> float:
    clock = StepClock(device)
    with torch.no_grad():
        model.generate(
            **inputs,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            stopping_criteria=StoppingCriteriaList([clock]),
            **kwargs,
        )
    return clock.per_token()


def measure(name: str, hidden: int, layers: int, real_vocabulary: bool, args) -> list[dict]:
    model, processor = build(hidden, layers, real_vocabulary, max(IMAGE_TOKENS), args)
    per_slot = QWEN2VL_2B["num_layers"] * 2 * QWEN2VL_2B["num_kv_heads"] * QWEN2VL_2B["head_dim"] * BF16_BYTES
    rows = []
    for tokens in IMAGE_TOKENS:
        image = image_with_tokens(processor, tokens)
        for batch_size in BATCHES:
            batch = processor.process_generation_inputs(questions=[QUESTION] * batch_size, images=[image] * batch_size)
            batch = batch.to(args.device)
            with torch.no_grad():
                kept = model.compress(**batch).cache.get_seq_length()
            # The floor: a text-only prompt with as many slots as the compressed context, decoded natively.
            vocabulary = min(model.config.chorus_token_ids)
            floor_ids = torch.randint(10, vocabulary, (batch_size, kept), generator=torch.Generator().manual_seed(0))
            floor = {
                "input_ids": floor_ids.to(args.device),
                "attention_mask": torch.ones_like(floor_ids).to(args.device),
            }
            native = decode_seconds(model, batch, args.device)
            compressed = decode_seconds(model, batch, args.device, compress=True)
            floor_time = decode_seconds(model, floor, args.device)
            native_slots = batch["input_ids"].shape[1]
            rows.append(
                {
                    "config": name,
                    "image tokens": tokens,
                    "batch": batch_size,
                    "native ms/token": 1000 * native,
                    "compressed ms/token": 1000 * compressed,
                    "floor ms/token": 1000 * floor_time,
                    "compressed / floor": compressed / floor_time,
                    "native / compressed": native / compressed,
                    "native tokens/s": batch_size / native,
                    "compressed tokens/s": batch_size / compressed,
                    "max batch native (16 GiB KV, 2B)": int(
                        KV_BUDGET_GIB * 2**30 // ((native_slots + NEW_TOKENS) * per_slot)
                    ),
                    "max batch compressed (16 GiB KV, 2B)": int(
                        KV_BUDGET_GIB * 2**30 // ((kept + NEW_TOKENS) * per_slot)
                    ),
                }
            )
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    args = arguments(__doc__.splitlines()[0]).parse_args()
    rows = measure("LM-dominated (h256, L4, 416 vocab)", 256, 4, False, args)
    rows += measure("real vocabulary (h256, L4, 151k vocab)", 256, 4, True, args)
    notes = (
        "ms/token: median decode step (prefill excluded). The floor decodes natively from a text-only prompt with "
        "the compressed context's slot count. Max batch: how many sequences' KV caches (prompt + 12 new tokens) fit "
        f"in {KV_BUDGET_GIB} GiB at Qwen2-VL-2B dimensions in bf16."
    )
    report("generation", args, rows, notes)


if __name__ == "__main__":
    main()
