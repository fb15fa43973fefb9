"""One CREMTrainer step as one process of a torchrun job: this rank's share of a fixed batch.

    torchrun --nproc_per_node 2 tests/distributed_step.py OUT.pt [--lora] [--gc-chunk-size N] [--float64]
        [--matryoshka-dims D [D ...]]

Run without torchrun it is the single-process reference on the whole batch. Rank 0 saves the step's loss (averaged
over processes) and the synchronised gradients to OUT.pt.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import mixed_batch, randomize_lora_b  # noqa: E402

from crem_hf.testing import make_tiny_crem, make_tiny_processor  # noqa: E402
from crem_hf.training import CREMTrainer, CREMTrainingArguments, apply_lora  # noqa: E402

RETRIEVAL_ROWS, GENERATION_ROWS = 6, 4
COMPRESS = [True, False, True, True]


def build_model(processor, lora: bool, dtype: torch.dtype):
    model = make_tiny_crem(processor, seed=1).to(dtype)
    if lora:
        model = randomize_lora_b(apply_lora(model, dropout=0.0))
    return model.train()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--gc-chunk-size", type=int, default=None)
    parser.add_argument("--float64", action="store_true", help="compare beyond float32 rounding")
    parser.add_argument("--matryoshka-dims", nargs="+", default=None)
    options = parser.parse_args()
    torch.set_num_threads(1)

    processor = make_tiny_processor()
    model = build_model(processor, options.lora, torch.float64 if options.float64 else torch.float32)
    args = CREMTrainingArguments(
        output_dir=tempfile.mkdtemp(), report_to=[], use_cpu=True, gradient_cache_chunk_size=options.gc_chunk_size,
        ddp_backend="gloo" if "LOCAL_RANK" in os.environ else None, matryoshka_dims=options.matryoshka_dims,
    )  # fmt: skip
    trainer = CREMTrainer(model=model, args=args)
    trainer.current_gradient_accumulation_steps = 1  # set by train(); this runs one step directly
    rank, world = args.process_index, args.world_size
    share, generation_share = RETRIEVAL_ROWS // world, GENERATION_ROWS // world
    batch = mixed_batch(
        processor,
        rows=range(rank * share, (rank + 1) * share),
        generation_rows=range(rank * generation_share, (rank + 1) * generation_share),
        compress=COMPRESS[rank * generation_share : (rank + 1) * generation_share],
    )
    wrapped = trainer.accelerator.prepare_model(model) if world > 1 else model
    loss = trainer.training_step(wrapped, batch).detach()
    if world > 1:
        dist.all_reduce(loss)
        loss /= world
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    if rank == 0:
        torch.save({"loss": loss, "grads": grads, "world": world}, options.out)
    if world > 1:
        # Wait for the file, then leave without tearing gloo down: destroy_process_group once hung the last rank
        # under load, and a rank that exits while the other still holds the group is aborted by gloo.
        dist.barrier()
        sys.stdout.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
