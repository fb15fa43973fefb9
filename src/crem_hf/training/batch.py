"""The step batch: what `CREMCollator` builds and `CREMTrainer` consumes, one typed structure.

A training step has a retrieval part, a generation part or both. Each part holds processor outputs (flat dicts of
tensors, as `CREMProcessor.process_embedding_inputs` / `process_chat` return them) and what the loss needs besides.

Each structure is a `dict` with a fixed set of keys and a typed property per key: the Trainer (`_prepare_input`),
accelerate (`send_to_device`) and the data loader (`pin_memory`) move a dict's tensors, nested dicts included, and
rebuild it with its own type, so a step batch reaches `compute_loss` placed like any batch, as its own type.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

__all__ = ["GenerationBatch", "RetrievalBatch", "StepBatch"]

Inputs = dict[str, torch.Tensor]


class _Fields(dict):
    """
    A dict over the keys `required + optional` of its class, built from a mapping and/or keywords (the form
    `type(batch)({key: value})` in which the Trainer and accelerate rebuild it); `None` values are left out.
    """

    required: ClassVar[tuple[str, ...]] = ()
    optional: ClassVar[tuple[str, ...]] = ()

    def __init__(self, fields: Mapping[str, Any] | None = None, /, **named: Any):
        given = {**(fields or {}), **named}
        unknown = sorted(set(given) - set(self.required) - set(self.optional))
        if unknown:
            raise ValueError(f"{type(self).__name__} takes {self.required + self.optional}, got unknown {unknown}.")
        missing = [key for key in self.required if given.get(key) is None]
        if missing:
            raise ValueError(f"{type(self).__name__} needs {missing}.")
        super().__init__({key: value for key, value in given.items() if value is not None})
        self.check()

    def check(self) -> None:
        """Raises a ValueError naming what does not fit together (a subclass's consistency rules)."""


class RetrievalBatch(_Fields):
    """
    The contrastive part of a step: B queries, their B positive targets (row i belongs to query i) and M hard
    negatives, each side as embedding inputs (`CREMProcessor.process_embedding_inputs`):
    `input_ids`, `attention_mask`, `mm_token_type_ids` `(rows, length)` and, when the side has images,
    `pixel_values` `(num_patches, patch_dim)` and `image_grid_thw` `(num_images, 3)`.

    The int64 content keys (see `content_key`) let the loss leave out false negatives: a target with the same
    content as a query's positive, or the positive of a query with the same content.

    Keys (each also a property; an absent one reads `None`):
        query: embedding inputs of the B queries.
        target: embedding inputs of the B positive targets.
        negative: embedding inputs of the M hard negatives (all rows' negatives, flattened), optional.
        query_keys: `(B,)` content keys of the queries, optional.
        target_keys: `(B,)` content keys of the targets, optional.
        negative_keys: `(M,)` content keys of the negatives, optional.
    """

    required = ("query", "target")
    optional = ("negative", "query_keys", "target_keys", "negative_keys")

    def check(self) -> None:
        if self.negative_keys is not None and self.negative is None:
            raise ValueError("negative_keys were given without negatives.")
        if self.negative is not None and self.target_keys is not None and self.negative_keys is None:
            raise ValueError("With target_keys, the negatives need their keys too (negative_keys).")

    @property
    def query(self) -> Inputs:
        return self["query"]

    @property
    def target(self) -> Inputs:
        return self["target"]

    @property
    def negative(self) -> Inputs | None:
        return self.get("negative")

    @property
    def query_keys(self) -> torch.Tensor | None:
        return self.get("query_keys")

    @property
    def target_keys(self) -> torch.Tensor | None:
        return self.get("target_keys")

    @property
    def negative_keys(self) -> torch.Tensor | None:
        return self.get("negative_keys")

    def sides(self) -> dict[str, Inputs]:
        """The embedding inputs present, by side: `query`, `target` and (when given) `negative`."""
        return {side: self[side] for side in ("query", "target", "negative") if side in self}


class GenerationBatch(_Fields):
    """
    The language-modelling part of a step: G conversations with labels on every answer, and which of them train
    compressed.

    Keys (each also a property):
        inputs: chat inputs with labels (`CREMProcessor.process_chat(..., return_labels=True)`): `input_ids`,
            `attention_mask`, `mm_token_type_ids`, `labels` `(G, length)` (`labels` is `IGNORE_INDEX` off the
            answers) and, with images, `pixel_values` `(num_patches, patch_dim)`, `image_grid_thw` `(num_images, 3)`.
        compress: `(G,)` bool, the rows trained compressed.
    """

    required = ("inputs", "compress")

    def check(self) -> None:
        rows = self.inputs["input_ids"].shape[0]
        if self.compress.shape != (rows,):
            raise ValueError(f"compress must have shape ({rows},), one flag per row; got {tuple(self.compress.shape)}.")

    @property
    def inputs(self) -> Inputs:
        return self["inputs"]

    @property
    def compress(self) -> torch.Tensor:
        return self["compress"]


class StepBatch(_Fields):
    """
    One training step (`CREMCollator`'s output, the input of `CREMTrainer.compute_loss`).

    Keys (each also a property; an absent one reads `None`):
        retrieval: the step's [`RetrievalBatch`], optional.
        generation: the step's [`GenerationBatch`], optional.
    """

    optional = ("retrieval", "generation")

    def check(self) -> None:
        for key, kind in (("retrieval", RetrievalBatch), ("generation", GenerationBatch)):
            if key in self and not isinstance(self[key], kind):
                raise TypeError(f"StepBatch's {key} must be a {kind.__name__}, got {type(self[key]).__name__}.")

    @property
    def retrieval(self) -> RetrievalBatch | None:
        return self.get("retrieval")

    @property
    def generation(self) -> GenerationBatch | None:
        return self.get("generation")

    def model_inputs(self) -> list[Inputs]:
        """Every processor output in the step: the retrieval sides, then the generation inputs."""
        parts = list(self.retrieval.sides().values()) if self.retrieval is not None else []
        return parts + ([self.generation.inputs] if self.generation is not None else [])
