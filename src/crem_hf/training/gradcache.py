"""The gradient cache (Gao et al., 2021): a contrastive loss over a batch larger than one forward pass holds, with the
gradient of the whole batch."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from torch import nn

from .batch import Inputs, RetrievalBatch
from .losses import ContrastiveOutput, MatryoshkaOutput

__all__ = ["GradientCache", "split_embedding_batch"]


def split_embedding_batch(batch: Inputs, chunk_size: int, vision_start_id: int) -> list[Inputs]:
    """
    Split processor embedding inputs into chunks of `chunk_size` rows, with each chunk's `pixel_values` /
    `image_grid_thw` (rows may hold any number of images) and its left padding trimmed.
    """
    input_ids = batch["input_ids"]
    images_per_row = (input_ids == vision_start_id).sum(1).tolist()
    grid = batch.get("image_grid_thw")
    patches = grid.prod(-1).tolist() if grid is not None else []
    chunks, image_start, patch_start = [], 0, 0
    for start in range(0, input_ids.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        num_images = sum(images_per_row[rows])
        num_patches = sum(patches[image_start : image_start + num_images])
        mask = batch["attention_mask"][rows]
        first = int(mask.any(0).float().argmax())  # first column holding a real token of some row
        chunk = {
            key: batch[key][rows, first:]
            for key in ("input_ids", "attention_mask", "mm_token_type_ids")
            if key in batch
        }
        if num_images:
            chunk["pixel_values"] = batch["pixel_values"][patch_start : patch_start + num_patches]
            chunk["image_grid_thw"] = grid[image_start : image_start + num_images]
        chunks.append(chunk)
        image_start, patch_start = image_start + num_images, patch_start + num_patches
    return chunks


class RandomState:
    """The CPU (and CUDA) random state, so a chunk's re-forward draws the same dropout as its first forward."""

    def __init__(self):
        self.cpu = torch.random.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        """Runs the block from the kept state, then puts back the state it found."""
        cpu, cuda = torch.random.get_rng_state(), torch.cuda.get_rng_state_all() if self.cuda is not None else None
        torch.random.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        try:
            yield
        finally:
            torch.random.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state_all(cuda)


class _CachedChunk(NamedTuple):
    """One chunk of one side: its inputs, the random state of its first forward and its embeddings' gradient."""

    inputs: Inputs
    state: RandomState
    gradient: torch.Tensor


class GradientCache(nn.Module):
    """
    A contrastive loss ([`InfoNCELoss`], [`MatryoshkaInfoNCELoss`]) over a [`RetrievalBatch`] whose sides are
    embedded `chunk_size` rows at a time, so that the batch is not bounded by the memory of one forward pass:

    1. every chunk is embedded without a graph, its random state kept;
    2. the wrapped loss runs on the embeddings of the whole batch (the global batch: the loss gathers the targets
       across processes), and its gradient with respect to every embedding is computed (no parameter is involved);
    3. each chunk is embedded again, with a graph and its first pass's random state (the same dropout), and
       back-propagated with its part of that gradient, as the term `sum(embeddings * gradient)`.

    The parameters' gradient is then the whole batch's, at the memory of one chunk. All chunks but the last are
    back-propagated by `backward` during the call (the caller's: it scales them as it scales the returned loss, and
    decides on gradient synchronisation); the last chunk's term rides in the returned loss, whose backward completes
    the gradient (under DDP, the one synchronising backward).

    With `chunk_size` None, or not below the largest side, the sides are embedded in one go and the wrapped loss is
    returned as it is.

    Args:
        loss: the contrastive loss, called as `loss(queries, positives, negatives, positive_keys=, negative_keys=,
            query_keys=)` on `(rows, hidden)` embeddings; it returns a NamedTuple with a `loss` field `()`.
        chunk_size: embeddings per forward pass (> 0), or None.
        vision_start_id: the `<|vision_start|>` token id, which counts each row's images when a side is split.
    """

    def __init__(self, loss: nn.Module, chunk_size: int | None, vision_start_id: int):
        super().__init__()
        if chunk_size is not None and chunk_size <= 0:
            raise ValueError(f"chunk_size must be > 0 (or None for no cache), got {chunk_size}.")
        self.loss = loss
        self.chunk_size = chunk_size
        self.vision_start_id = vision_start_id

    def forward(
        self,
        embed: Callable[[Inputs], torch.Tensor],
        batch: RetrievalBatch,
        backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    ) -> ContrastiveOutput | MatryoshkaOutput:
        """
        Args:
            embed: the embeddings `(rows, hidden)` of one chunk's inputs (the model's forward).
            batch: the retrieval batch (its sides and content keys).
            backward: back-propagates one chunk's term (a scalar with a graph); called for every chunk but the last,
                in order, before this returns.
        Returns:
            The wrapped loss's output. Its `loss` `()` has the whole batch's value; back-propagated, it completes the
            whole batch's gradient.
        """
        sides = batch.sides()
        keys = {
            "positive_keys": batch.target_keys,
            "negative_keys": batch.negative_keys,
            "query_keys": batch.query_keys,
        }
        largest = max(inputs["input_ids"].shape[0] for inputs in sides.values())
        if self.chunk_size is None or self.chunk_size >= largest:
            embeddings = {side: embed(inputs) for side, inputs in sides.items()}
            return self.loss(embeddings["query"], embeddings["target"], embeddings.get("negative"), **keys)
        chunks, states, cached = {}, {}, {}
        with torch.no_grad():
            for side, inputs in sides.items():
                chunks[side] = split_embedding_batch(inputs, self.chunk_size, self.vision_start_id)
                states[side] = []
                embeddings = []
                for chunk in chunks[side]:
                    states[side].append(RandomState())
                    embeddings.append(embed(chunk))
                cached[side] = torch.cat(embeddings).detach().requires_grad_()
        out = self.loss(cached["query"], cached["target"], cached.get("negative"), **keys)
        out.loss.backward()  # the gradient with respect to every embedding: no parameter is involved yet
        replays = [
            _CachedChunk(inputs, state, gradient)
            for side in sides
            for inputs, state, gradient in zip(
                chunks[side],
                states[side],
                cached[side].grad.split([chunk["input_ids"].shape[0] for chunk in chunks[side]]),
                strict=True,
            )
        ]
        for chunk in replays[:-1]:
            backward(self._term(embed, chunk))
        last = self._term(embed, replays[-1])
        # The whole batch's value (`last - last.detach()` is 0), with the last chunk's graph.
        return out._replace(loss=out.loss.detach() + (last - last.detach()))

    @staticmethod
    def _term(embed: Callable[[Inputs], torch.Tensor], chunk: _CachedChunk) -> torch.Tensor:
        """`sum(embeddings * gradient)` of one chunk, embedded again with a graph from its first pass's random state:
        its gradient with respect to the parameters is the chunk's part of the loss's."""
        with chunk.state.restored():
            return (embed(chunk.inputs) * chunk.gradient).sum()
