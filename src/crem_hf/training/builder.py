"""The one wiring of a CREM training run: read rows -> `MixedStepDataset` -> `CREMCollator` -> `CREMTrainer`."""

from __future__ import annotations

from typing import Any

import datasets

from ..processing_crem import CREMProcessor
from .collator import CREMCollator
from .data import BadRowPolicy, MixedStepDataset
from .trainer import CREMTrainer, CREMTrainingArguments

__all__ = ["build_trainer"]


def build_trainer(
    model,
    processor: CREMProcessor,
    args: CREMTrainingArguments,
    retrieval: datasets.Dataset | None = None,
    generation: datasets.Dataset | None = None,
    *,
    homogeneous: bool = False,
    on_bad_row: BadRowPolicy = "skip",
    **trainer_kwargs: Any,
) -> CREMTrainer:
    """
    A `CREMTrainer` over retrieval pairs and/or conversations, every objective setting taken from `args`: the
    per-part batch sizes, the compression probability p and the seed (data order and compress draws).

    Args:
        model: the CREM model, or its peft wrapper (`apply_lora`).
        processor: the `CREMProcessor` that builds every prompt.
        args: the run's [`CREMTrainingArguments`].
        retrieval: retrieval pairs as `load_retrieval_pairs` reads them, or `None`.
        generation: conversations as `load_conversations` reads them, or `None`.
        homogeneous: each step's retrieval rows come from one source file (subset).
        on_bad_row: a row the processor cannot build raises (`"raise"`) or is skipped and counted (`"skip"`, in
            `trainer.data_collator.skipped`).
        **trainer_kwargs: further `Trainer` arguments (`callbacks`, ...).
    Raises:
        ValueError: neither part given, or too few rows for one step.
    """
    steps = MixedStepDataset(
        retrieval,
        generation,
        retrieval_per_step=args.retrieval_batch_size if retrieval is not None else 0,
        generation_per_step=args.generation_batch_size if generation is not None else 0,
        seed=args.seed,
        homogeneous=homogeneous,
    )
    collator = CREMCollator(processor, args.compress_probability, seed=args.seed, on_bad_row=on_bad_row)
    return CREMTrainer(
        model=model,
        args=args,
        train_dataset=steps,
        data_collator=collator,
        processing_class=processor,
        **trainer_kwargs,
    )
