"""The step batch: what `CREMCollator` builds and `CREMTrainer` consumes, one typed structure.

A training step has a retrieval part, a generation part or both. Each part holds processor outputs (flat dicts of
tensors, as `CREMProcessor.process_embedding_inputs` / `process_chat` return them) and what the loss needs besides.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["GenerationBatch", "RetrievalBatch", "StepBatch"]

Inputs = dict[str, torch.Tensor]


def _map_inputs(inputs: Inputs | None, fn: Callable[[torch.Tensor], torch.Tensor]) -> Inputs | None:
    return None if inputs is None else {key: fn(value) for key, value in inputs.items()}


@dataclass
class RetrievalBatch:
    """
    The contrastive part of a step: B queries, their B positive targets (row i belongs to query i) and M hard
    negatives, each side as embedding inputs (`CREMProcessor.process_embedding_inputs`):
    `input_ids`, `attention_mask`, `mm_token_type_ids` `(rows, length)` and, when the side has images,
    `pixel_values` `(num_patches, patch_dim)` and `image_grid_thw` `(num_images, 3)`.

    The int64 content keys (see `content_key`) let the loss leave out false negatives: a target with the same
    content as a query's positive, or the positive of a query with the same content.

    Args:
        query: embedding inputs of the B queries.
        target: embedding inputs of the B positive targets.
        negative: embedding inputs of the M hard negatives (all rows' negatives, flattened), or `None`.
        query_keys: `(B,)` content keys of the queries, or `None`.
        target_keys: `(B,)` content keys of the targets, or `None`.
        negative_keys: `(M,)` content keys of the negatives, or `None`.
    """

    query: Inputs
    target: Inputs
    negative: Inputs | None = None
    query_keys: torch.Tensor | None = None
    target_keys: torch.Tensor | None = None
    negative_keys: torch.Tensor | None = None

    def __post_init__(self):
        if self.negative_keys is not None and self.negative is None:
            raise ValueError("negative_keys were given without negatives.")
        if self.negative is not None and self.target_keys is not None and self.negative_keys is None:
            raise ValueError("With target_keys, the negatives need their keys too (negative_keys).")

    def sides(self) -> dict[str, Inputs]:
        """The embedding inputs present, by side: `query`, `target` and (when given) `negative`."""
        sides = {"query": self.query, "target": self.target}
        if self.negative is not None:
            sides["negative"] = self.negative
        return sides

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> RetrievalBatch:
        """A copy with `fn` applied to every tensor."""
        keys = {name: getattr(self, name) for name in ("query_keys", "target_keys", "negative_keys")}
        return RetrievalBatch(
            query=_map_inputs(self.query, fn),
            target=_map_inputs(self.target, fn),
            negative=_map_inputs(self.negative, fn),
            **{name: None if value is None else fn(value) for name, value in keys.items()},
        )


@dataclass
class GenerationBatch:
    """
    The language-modelling part of a step: G conversations with labels on every answer, and which of them train
    compressed.

    Args:
        inputs: chat inputs with labels (`CREMProcessor.process_chat(..., return_labels=True)`): `input_ids`,
            `attention_mask`, `mm_token_type_ids`, `labels` `(G, length)` (`labels` is `IGNORE_INDEX` off the
            answers) and, with images, `pixel_values` `(num_patches, patch_dim)`, `image_grid_thw` `(num_images, 3)`.
        compress: `(G,)` bool, the rows trained compressed.
    """

    inputs: Inputs
    compress: torch.Tensor

    def __post_init__(self):
        rows = self.inputs["input_ids"].shape[0]
        if self.compress.shape != (rows,):
            raise ValueError(f"compress must have shape ({rows},), one flag per row; got {tuple(self.compress.shape)}.")

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> GenerationBatch:
        """A copy with `fn` applied to every tensor."""
        return GenerationBatch(_map_inputs(self.inputs, fn), fn(self.compress))


@dataclass
class StepBatch:
    """
    One training step: a [`RetrievalBatch`], a [`GenerationBatch`] or both (`CREMCollator`'s output, the input of
    `CREMTrainer.compute_loss`). `to` moves every tensor, so the Trainer's data loader places it like a dict.
    """

    retrieval: RetrievalBatch | None = None
    generation: GenerationBatch | None = None

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> StepBatch:
        """A copy with `fn` applied to every tensor."""
        return StepBatch(
            self.retrieval.map(fn) if self.retrieval is not None else None,
            self.generation.map(fn) if self.generation is not None else None,
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> StepBatch:
        """A copy with every tensor on `device` (dtypes kept: ids stay integers)."""
        return self.map(lambda tensor: tensor.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> StepBatch:
        """A copy in pinned memory (the data loader calls this with `pin_memory=True`)."""
        return self.map(lambda tensor: tensor.pin_memory())

    def model_inputs(self) -> list[Inputs]:
        """Every processor output in the step: the retrieval sides, then the generation inputs."""
        parts = list(self.retrieval.sides().values()) if self.retrieval is not None else []
        return parts + ([self.generation.inputs] if self.generation is not None else [])
