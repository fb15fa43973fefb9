"""Compressed LM training step: peak memory and time of forward + backward, compressed vs uncompressed.

Every generation row is compressed (the tail may not see the image or the input text: causal prefill up to the chorus
block, prune, the tail over the pruned cache) or none is; a third variant runs the same compressed step under the
dense `batch x L x L` compression mask (`dense_compression_mask` of tests/helpers.py: the oracle the tests compare
with, and what training used before compression became pruning). The questions differ in length, so the rows are
re-packed before the compressed step (the general case). Each configuration runs in its own process, so that the
process's peak resident memory (`ru_maxrss`, above the level before the step) belongs to that step alone.

    python benchmarks/train_step.py [--device cuda --dtype bfloat16 --attn flash_attention_2]
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import subprocess
import sys

from common import arguments, build, image_with_tokens, median_seconds, report

IMAGE_TOKENS = (1280, 4096)
BATCHES = (4, 8)
VARIANTS = ("uncompressed", "compressed", "dense mask")
HELPERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "helpers.py")


def dense_compression_mask():
    """The tests' oracle, read from tests/helpers.py (it is test code, not part of the package)."""
    spec = importlib.util.spec_from_file_location("crem_test_helpers", HELPERS)
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    return helpers.dense_compression_mask


def one_step(image_tokens: int, batch_size: int, variant: str, args) -> dict:
    """Runs in the child process: build, warm up on a small batch, then one forward + backward."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    model, processor = build(128, 2, False, image_tokens, args, num_heads=4)
    model.train()
    dense_mask = dense_compression_mask() if variant == "dense mask" else None

    def make_batch(size: int, tokens: int) -> dict:
        images = [image_with_tokens(processor, tokens, seed=i) for i in range(size)]
        batch = processor.process_generation_inputs(
            questions=["Which digit is shown?" + " Answer in one word." * (i % 3) for i in range(size)],
            images=images,
            texts=[f"photo {i}" for i in range(size)],
            answers=["seven"] * size,
        )
        return {k: v.to(args.device) for k, v in batch.items()}

    def step(batch: dict) -> None:
        if variant == "dense mask":
            inner = {k: v for k, v in batch.items() if k not in ("labels", "attention_mask")}
            position_ids = model.compute_position_ids(
                batch["input_ids"], batch["attention_mask"], batch.get("image_grid_thw"), batch["mm_token_type_ids"]
            )
            mask = dense_mask(model, batch["input_ids"], batch["attention_mask"], True)
            hidden = model.model(**inner, attention_mask=mask, position_ids=position_ids).last_hidden_state
            targets = batch["labels"][:, 1:]
            supervised = targets != -100
            loss = F.cross_entropy(model.lm_head(hidden[:, :-1][supervised]).float(), targets[supervised])
        else:
            compress = True if variant == "compressed" else None
            loss = model(**batch, compress=compress, supervised_logits_only=True).loss  # the trainer's LM path
        loss.backward()
        model.zero_grad(set_to_none=True)

    step(make_batch(1, 16))  # warm-up: allocator and kernels
    batch = make_batch(batch_size, image_tokens)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        before_cuda = torch.cuda.memory_allocated()
    step(batch)  # the first full-size step gives the peak memory; it also pays one-off costs (kernel set-up)
    if args.device.startswith("cuda"):
        peak = (torch.cuda.max_memory_allocated() - before_cuda) / 2**20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024  # KiB on Linux
    seconds = median_seconds(lambda: step(batch), max(args.repeats, 1), args.device, warmup=0)
    return {"seconds": seconds, "peak_mib": peak, "length": int(batch["input_ids"].shape[1])}


def main() -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=3, metavar=("IMAGE_TOKENS", "BATCH", "VARIANT"), default=None)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    args = parser.parse_args()
    if args.child:
        tokens, batch, variant = int(args.child[0]), int(args.child[1]), args.child[2]
        print(json.dumps(one_step(tokens, batch, variant, args)))
        return
    rows = []
    shared = ["--device", args.device, "--dtype", args.dtype, "--attn", args.attn, "--repeats", str(args.repeats)]
    for tokens in IMAGE_TOKENS:
        for batch in BATCHES:
            row = {"image tokens": tokens, "batch": batch}
            for variant in args.variants:
                out = subprocess.run(
                    [sys.executable, __file__, *shared, "--child", str(tokens), str(batch), variant],
                    capture_output=True,
                    text=True,
                )
                if out.returncode != 0:
                    row[f"{variant} peak MiB"] = row[f"{variant} step s"] = "failed"
                    print(out.stderr[-2000:], file=sys.stderr)
                    continue
                result = json.loads(out.stdout.strip().splitlines()[-1])
                row["length"] = result["length"]
                row[f"{variant} peak MiB"] = result["peak_mib"]
                row[f"{variant} step s"] = result["seconds"]
            for variant in args.variants[1:]:
                if isinstance(row.get(f"{variant} peak MiB"), float) and isinstance(
                    row.get("uncompressed peak MiB"), float
                ):
                    row[f"{variant} / uncompressed memory"] = row[f"{variant} peak MiB"] / row["uncompressed peak MiB"]
                    row[f"{variant} / uncompressed time"] = row[f"{variant} step s"] / row["uncompressed step s"]
            rows.append(row)
            print(row, flush=True)
    notes = (
        "One LM training step (forward + backward, labels on the answer) on the tiny model's vision tower and a "
        "h128, 2-layer language model; every row compressed, or none; questions of three lengths (rows re-packed "
        "for the compressed step). Peak = resident-memory high-water mark above "
        "the level before the first full-size step (CPU) or its peak allocated memory (CUDA); time = median of "
        "--repeats further steps. Targets: compressed <= 1.05x memory and "
        "<= 1.1x time of the uncompressed step."
    )
    report("train_step", args, rows, notes)


if __name__ == "__main__":
    main()
