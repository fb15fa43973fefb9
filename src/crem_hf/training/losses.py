"""Loss modules of CREM training. The LM loss lives in the model (`labels=`): it computes logits at labelled
positions only."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import all_gather_no_grad, all_gather_with_grad, rank

__all__ = ["InfoNCELoss", "ContrastiveOutput", "check_temperature"]


def check_temperature(temperature: float) -> float:
    """`temperature` if it is a usable softmax temperature (> 0), else a ValueError naming it."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    return temperature


class ContrastiveOutput(NamedTuple):
    """The mean InfoNCE loss `()` and the fraction of queries whose best-scoring target is their positive `()`."""

    loss: torch.Tensor
    accuracy: torch.Tensor


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
        targets = all_gather_with_grad(positives)
        keys = all_gather_no_grad(positive_keys) if positive_keys is not None else None
        if negatives is not None and negatives.shape[0] > 0:
            targets = torch.cat([targets, all_gather_with_grad(negatives)], dim=0)
            if keys is not None:
                keys = torch.cat([keys, all_gather_no_grad(negative_keys)], dim=0)
        # This process's positives sit at its rank's offset in the gathered targets.
        positive_index = rank() * queries.shape[0] + torch.arange(queries.shape[0], device=queries.device)
        all_query_keys = all_gather_no_grad(query_keys) if query_keys is not None else None
        logits = self.scores(queries, targets, positive_index, keys, query_keys, all_query_keys)
        loss = F.cross_entropy(logits, positive_index)
        accuracy = (logits.argmax(-1) == positive_index).float().mean().detach()
        return ContrastiveOutput(loss, accuracy)
