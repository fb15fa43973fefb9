"""Loss modules of CREM training. The LM loss lives in the model (`labels=`): it computes logits at labelled
positions only."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import all_gather_no_grad, all_gather_with_grad, rank

__all__ = [
    "ContrastiveOutput",
    "GatheredTargets",
    "InfoNCELoss",
    "MatryoshkaInfoNCELoss",
    "MatryoshkaOutput",
    "check_temperature",
]


def check_temperature(temperature: float) -> float:
    """`temperature` if it is a usable softmax temperature (> 0), else a ValueError naming it."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    return temperature


class ContrastiveOutput(NamedTuple):
    """The mean InfoNCE loss `()` and the fraction of queries whose best-scoring target is their positive `()`."""

    loss: torch.Tensor
    accuracy: torch.Tensor


class GatheredTargets(NamedTuple):
    """
    What one process scores its queries against: the global batch's targets `(num_targets, hidden)` (with a
    graph to every process's share), each query's positive `(batch_size,)` and the optional content keys.
    """

    targets: torch.Tensor
    positive_index: torch.Tensor
    keys: torch.Tensor | None
    query_keys: torch.Tensor | None
    all_query_keys: torch.Tensor | None


class InfoNCELoss(nn.Module):
    """
    One-way (query -> target) InfoNCE over cosine similarities divided by a temperature. The embeddings are
    L2-normalised here, so the scores are cosines whatever the inputs (already normalised inputs are unchanged).

    Each query is scored against every target: its own positive, the other queries' positives of the whole global
    batch (gathered across processes with an autograd-aware all-gather) and optional hard negatives. Two kinds of
    false negatives are left out when keys are given: a target whose key equals the key of the query's positive (the
    same text or image, as when classification data repeats label texts within a batch), and the positive of another
    query whose key equals this query's (the same query text asked of several images).

    Args:
        temperature: softmax temperature, > 0 (training sets it from `CREMTrainingArguments.temperature`, the
            paper's 0.02).
    """

    def __init__(self, temperature: float):
        super().__init__()
        self.temperature = check_temperature(temperature)

    def scores(
        self,
        queries: torch.Tensor,
        targets: torch.Tensor,
        positive_index: torch.Tensor,
        target_keys: torch.Tensor | None = None,
        query_keys: torch.Tensor | None = None,
        all_query_keys: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Masked logits `(num_queries, num_targets)`: cosine similarities over the temperature of queries
        `(num_queries, dim)` against targets `(num_targets, dim)` (raw or normalised embeddings);
        `positive_index` `(num_queries,)` names each query's positive. `target_keys`
        `(num_targets,)` identify duplicate targets; `query_keys` `(num_queries,)` and `all_query_keys` (the keys of
        the queries that own the first `len(all_query_keys)` targets) identify duplicate queries.
        """
        logits = F.normalize(queries, dim=-1) @ F.normalize(targets, dim=-1).T / self.temperature
        false_negative = torch.zeros_like(logits, dtype=torch.bool)
        if target_keys is not None:
            false_negative |= target_keys[None, :] == target_keys[positive_index][:, None]
        if query_keys is not None and all_query_keys is not None:
            owners = len(all_query_keys)
            false_negative[:, :owners] |= all_query_keys[None, :] == query_keys[:, None]
        false_negative[torch.arange(len(positive_index), device=logits.device), positive_index] = False
        return logits.masked_fill(false_negative, torch.finfo(logits.dtype).min)

    def forward(
        self,
        queries: torch.Tensor,
        positives: torch.Tensor,
        negatives: torch.Tensor | None = None,
        positive_keys: torch.Tensor | None = None,
        negative_keys: torch.Tensor | None = None,
        query_keys: torch.Tensor | None = None,
    ) -> ContrastiveOutput:
        """
        Args:
            queries: `(batch_size, dim)` this process's query embeddings (normalised here).
            positives: `(batch_size, dim)` this process's positive targets (row i belongs to query i).
            negatives: `(num_negatives, dim)` this process's hard negatives, optional.
            positive_keys, negative_keys, query_keys: `(batch_size,)` / `(num_negatives,)` / `(batch_size,)` int64
                content keys, optional (see the class docstring).
        Returns:
            [`ContrastiveOutput`]: the mean loss over this process's queries and the in-batch accuracy.
        """
        gathered = self.gather(queries, positives, negatives, positive_keys, negative_keys, query_keys)
        return self.gathered_loss(queries, gathered)

    @staticmethod
    def gather(
        queries: torch.Tensor,
        positives: torch.Tensor,
        negatives: torch.Tensor | None = None,
        positive_keys: torch.Tensor | None = None,
        negative_keys: torch.Tensor | None = None,
        query_keys: torch.Tensor | None = None,
    ) -> GatheredTargets:
        """The global batch's targets and keys (one all-gather each; see `forward` for the arguments)."""
        targets = all_gather_with_grad(positives)
        keys = all_gather_no_grad(positive_keys) if positive_keys is not None else None
        if negatives is not None and negatives.shape[0] > 0:
            targets = torch.cat([targets, all_gather_with_grad(negatives)], dim=0)
            if keys is not None:
                keys = torch.cat([keys, all_gather_no_grad(negative_keys)], dim=0)
        # This process's positives sit at its rank's offset in the gathered targets.
        positive_index = rank() * queries.shape[0] + torch.arange(queries.shape[0], device=queries.device)
        all_query_keys = all_gather_no_grad(query_keys) if query_keys is not None else None
        return GatheredTargets(targets, positive_index, keys, query_keys, all_query_keys)

    def gathered_loss(
        self, queries: torch.Tensor, gathered: GatheredTargets, dim: int | None = None
    ) -> ContrastiveOutput:
        """
        The loss of `queries` `(batch_size, hidden)` against gathered targets, on the first `dim` components of
        both (re-normalised in `scores`), or on all of them.
        """
        targets = gathered.targets if dim is None else gathered.targets[:, :dim]
        queries = queries if dim is None else queries[:, :dim]
        logits = self.scores(
            queries, targets, gathered.positive_index, gathered.keys, gathered.query_keys, gathered.all_query_keys
        )
        loss = F.cross_entropy(logits, gathered.positive_index)
        accuracy = (logits.argmax(-1) == gathered.positive_index).float().mean().detach()
        return ContrastiveOutput(loss, accuracy)


class MatryoshkaOutput(NamedTuple):
    """
    The weighted mean over dims of the InfoNCE losses `()`, the in-batch accuracy at the largest dim `()`, and per
    dim (in the order of `dims`) the loss and the accuracy, detached.
    """

    loss: torch.Tensor
    accuracy: torch.Tensor
    dim_losses: tuple[torch.Tensor, ...]
    dim_accuracies: tuple[torch.Tensor, ...]


class MatryoshkaInfoNCELoss(nn.Module):
    """
    InfoNCE over Matryoshka prefixes: for each `d` of `dims`, [`InfoNCELoss`] on the first `d` components of every
    query and target, re-normalised (so each prefix is an embedding of its own); the loss is the weighted mean
    `sum_d w_d * L_d / sum_d w_d`.

    A mean, not a sum (sentence-transformers' `MatryoshkaLoss` sums): the loss keeps the scale of the plain InfoNCE
    whatever the number of dims, so `alpha_r` / `alpha_g`, the learning rate and the logged losses mean what they
    mean without dims; with `dims=[hidden_size]` it is the plain InfoNCE.

    The targets are gathered across processes once, at full width, and cut per dim; the loss is a function of the
    full embeddings, so the gradient cache (which differentiates it with respect to them) stays exact.

    Args:
        temperature: softmax temperature, > 0.
        dims: the prefix lengths, strictly increasing, each > 0 (checked against the hidden size by the trainer).
        weights: one weight >= 0 per dim, not all 0; default: all 1.
    """

    def __init__(self, temperature: float, dims: Sequence[int], weights: Sequence[float] | None = None):
        super().__init__()
        self.infonce = InfoNCELoss(temperature)
        self.dims = [int(d) for d in dims]
        increasing = all(a < b for a, b in zip(self.dims, self.dims[1:], strict=False))
        if not self.dims or self.dims[0] <= 0 or not increasing:
            raise ValueError(f"dims must be positive and strictly increasing, got {list(dims)}.")
        self.weights = [1.0] * len(self.dims) if weights is None else [float(w) for w in weights]
        if len(self.weights) != len(self.dims):
            raise ValueError(f"Got {len(self.weights)} weights for {len(self.dims)} dims {self.dims}.")
        if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
            raise ValueError(f"weights must be >= 0 and not all 0, got {self.weights}.")

    def forward(
        self,
        queries: torch.Tensor,
        positives: torch.Tensor,
        negatives: torch.Tensor | None = None,
        positive_keys: torch.Tensor | None = None,
        negative_keys: torch.Tensor | None = None,
        query_keys: torch.Tensor | None = None,
    ) -> MatryoshkaOutput:
        """As [`InfoNCELoss.forward`]; the embeddings `(batch_size, hidden)` must be at least `dims[-1]` wide."""
        if queries.shape[-1] < self.dims[-1]:
            raise ValueError(f"Matryoshka dim {self.dims[-1]} is larger than the embeddings ({queries.shape[-1]}).")
        gathered = self.infonce.gather(queries, positives, negatives, positive_keys, negative_keys, query_keys)
        outputs = [self.infonce.gathered_loss(queries, gathered, dim) for dim in self.dims]
        total = sum(w * out.loss for w, out in zip(self.weights, outputs, strict=True)) / sum(self.weights)
        return MatryoshkaOutput(
            total,
            outputs[-1].accuracy,
            tuple(out.loss.detach() for out in outputs),
            tuple(out.accuracy for out in outputs),
        )
