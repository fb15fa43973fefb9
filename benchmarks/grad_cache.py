"""Gradient cache: peak memory and step time vs contrastive batch size (32 to 256), against the plain path.

Each configuration runs one CREMTrainer step in its own process, so that the process's peak resident memory
(`ru_maxrss`, above the level reached before the step) belongs to that step alone. Run: python benchmarks/grad_cache.py
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time

from common import arguments, report, test_helpers

BATCHES = (32, 64, 128, 256)
CHUNK = 32


def one_step(batch_size: int, chunk: int | None) -> dict:
    """Runs in the child process: build, warm up, then one training step; peak memory above the warm-up level."""
    import torch

    colour_image = test_helpers().colour_image
    from crem_hf.testing import make_tiny_crem, make_tiny_processor
    from crem_hf.training import CREMTrainer, CREMTrainingArguments, RetrievalBatch, StepBatch

    torch.set_num_threads(2)
    processor = make_tiny_processor()
    model = make_tiny_crem(processor, hidden_size=128, num_layers=2, num_heads=4).train()
    names = ["red", "green", "blue", "yellow", "purple", "orange"]

    def make_batch(size: int) -> StepBatch:
        images = [colour_image(names[i % 6], seed=i) for i in range(size)]
        texts = [f"a {names[i % 6]} square number {i}" for i in range(size)]
        query = dict(processor.process_embedding_inputs(images=images))
        target = dict(processor.process_embedding_inputs(texts=texts))
        return StepBatch(retrieval=RetrievalBatch(query=query, target=target, target_keys=torch.arange(size)))

    args = CREMTrainingArguments(
        output_dir=tempfile.mkdtemp(), report_to=[], use_cpu=True, gradient_cache_chunk_size=chunk
    )
    trainer = CREMTrainer(model=model, args=args)
    trainer.current_gradient_accumulation_steps = 1
    trainer.training_step(model, make_batch(2))  # warm-up: allocator and kernels
    batch = make_batch(batch_size)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    trainer.training_step(model, batch)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before  # KiB on Linux
    return {"seconds": seconds, "peak_mib": peak / 1024}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        batch_size, chunk = int(sys.argv[2]), (None if sys.argv[3] == "none" else int(sys.argv[3]))
        print(json.dumps(one_step(batch_size, chunk)))
        return
    args = arguments(__doc__.splitlines()[0]).parse_args()
    rows = []
    for batch_size in BATCHES:
        row = {"batch": batch_size}
        for label, chunk in (("plain", "none"), (f"cache (chunk {CHUNK})", str(CHUNK))):
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(batch_size), chunk],
                capture_output=True,
                text=True,
                check=True,
            )
            result = json.loads(out.stdout.strip().splitlines()[-1])
            row[f"{label} peak MiB"] = result["peak_mib"]
            row[f"{label} step s"] = result["seconds"]
        rows.append(row)
        print(row, flush=True)
    one_chunk = rows[0]["plain peak MiB"]
    for row in rows:
        row["cache peak / one chunk"] = row[f"cache (chunk {CHUNK}) peak MiB"] / one_chunk
    notes = (
        f"One step of image->text InfoNCE on the tiny model (h128, 2 layers), CPU. 'one chunk' = the plain path at "
        f"batch {CHUNK}. Peak = resident-memory high-water mark above the level before the step."
    )
    report("grad_cache", args, rows, notes)


if __name__ == "__main__":
    main()
