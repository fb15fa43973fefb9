"""Turns one step's rows into model inputs, through the processor only."""

from __future__ import annotations

import hashlib
from collections import Counter
from functools import partial
from typing import Any

import torch

from ..formats import conversation_messages
from ..processing_crem import CREMProcessor
from .batch import GenerationBatch, RetrievalBatch, StepBatch
from .data import build_step_rows

__all__ = ["CREMCollator", "check_compress_probability", "content_key"]

# Keeps the per-step seeds of the compress draws apart from each other.
_SEED_STRIDE = 1_000_003


def check_compress_probability(probability: float) -> float:
    """`probability` if it is one (in [0, 1]), else a ValueError naming `compress_probability`."""
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"compress_probability must be in [0, 1], got {probability}.")
    return probability


def content_key(text: str, image: str) -> int:
    """A stable int64 key of one target's content (the same on every process, unlike `hash`)."""
    digest = hashlib.blake2b(f"{image}\x00{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


class CREMCollator:
    """
    Collates one [`MixedStepDataset`] item into a [`StepBatch`]: a [`RetrievalBatch`] (queries, targets, hard
    negatives and their content keys, which let the loss leave out false negatives) and a [`GenerationBatch`]
    (conversations with labels and their compress flags).

    Each conversation of the generation part is compressed with probability `compress_probability`, drawn from a
    generator seeded by `(seed, step)`, so a resumed run draws the same flags as an uninterrupted one.

    Args:
        processor: the `CREMProcessor` (builds every prompt).
        compress_probability: p, the chance that a generation sample is trained compressed (training sets it from
            `CREMTrainingArguments.compress_probability`, the paper's 0.5; see `build_trainer`).
        seed: seed of the compress draws.
        on_bad_row: a row the processor cannot build raises, named by its file and row (`"raise"`), or is left out,
            logged and counted in `skipped` (`"skip"`; see [`build_step_rows`]: a bad retrieval row is replaced by a
            copy of a good one of its step, so the batch keeps its size).
    """

    def __init__(self, processor: CREMProcessor, compress_probability: float, seed: int = 0, on_bad_row: str = "skip"):
        check_compress_probability(compress_probability)
        if on_bad_row not in ("skip", "raise"):
            raise ValueError(f"on_bad_row must be 'skip' or 'raise', got {on_bad_row!r}.")
        self.processor = processor
        self.compress_probability = compress_probability
        self.seed = seed
        self.on_bad_row = on_bad_row
        self.skipped: Counter = Counter()  # rows left out while collating (in this process), by reason

    def __call__(self, items: list[dict[str, Any]]) -> StepBatch:
        if len(items) != 1:
            raise ValueError(
                f"Got {len(items)} items per batch: one MixedStepDataset item is a whole step, so train with "
                "per_device_train_batch_size=1 and set retrieval_batch_size / generation_batch_size instead."
            )
        item = items[0]
        parts = {}
        checked = partial(build_step_rows, on_bad_row=self.on_bad_row, skipped=self.skipped)
        if "retrieval" in item:
            parts["retrieval"] = checked(self.retrieval_batch, item["retrieval"], "retrieval", keep_size=True)
        if "generation" in item:
            build = partial(self.generation_batch, step=item["step"])
            parts["generation"] = checked(build, item["generation"], "generation")
        return StepBatch(parts)

    def _embedding_inputs(self, texts: list[str], images: list[str]) -> dict[str, torch.Tensor]:
        batch = self.processor.process_embedding_inputs(
            images=[image or None for image in images], texts=[text or None for text in texts]
        )
        return dict(batch)

    def retrieval_batch(self, rows: dict[str, list]) -> RetrievalBatch:
        """Queries, positive targets and (flattened) hard negatives, with content keys for deduplication."""
        neg_texts = [t for texts in rows["neg_texts"] for t in texts]
        neg_images = [i for images in rows["neg_images"] for i in images]
        return RetrievalBatch(
            query=self._embedding_inputs(rows["query_text"], rows["query_image"]),
            target=self._embedding_inputs(rows["pos_text"], rows["pos_image"]),
            negative=self._embedding_inputs(neg_texts, neg_images) if neg_texts else None,
            query_keys=_keys(rows["query_text"], rows["query_image"]),
            target_keys=_keys(rows["pos_text"], rows["pos_image"]),
            negative_keys=_keys(neg_texts, neg_images) if neg_texts else None,
        )

    def compress_flags(self, size: int, step: int) -> torch.Tensor:
        """`(size,)` bool: which samples of this step train compressed (Bernoulli(p), reproducible per step)."""
        generator = torch.Generator().manual_seed(self.seed * _SEED_STRIDE + step)
        return torch.rand(size, generator=generator) < self.compress_probability

    def generation_batch(self, rows: dict[str, list], step: int) -> GenerationBatch:
        """Conversations with labels on every answer, and the per-sample compress flags."""
        conversations = [conversation_messages(i, t) for i, t in zip(rows["image"], rows["turns"], strict=True)]
        inputs = dict(self.processor.process_chat(conversations=conversations, return_labels=True))
        return GenerationBatch(inputs=inputs, compress=self.compress_flags(len(conversations), step))


def _keys(texts: list[str], images: list[str]) -> torch.Tensor:
    """`(len(texts),)` int64 content keys of parallel texts and images."""
    return torch.tensor([content_key(t, i) for t, i in zip(texts, images, strict=True)], dtype=torch.long)
