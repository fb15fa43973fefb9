"""Process-group helpers that fall back to the identity on one process."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_functional

from ..parallel import rank, world_size

__all__ = ["all_gather_with_grad", "all_gather_no_grad", "all_reduce_sum", "rank", "world_size"]


def _check_same_size(tensor: torch.Tensor) -> None:
    sizes = torch.tensor([tensor.shape[0]], device=tensor.device)
    gathered = [torch.zeros_like(sizes) for _ in range(world_size())]
    dist.all_gather(gathered, sizes)
    if len({int(s) for s in gathered}) != 1:
        raise ValueError(f"Every process must contribute the same batch size; got {[int(s) for s in gathered]}.")


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """
    Concatenate `tensor` `(n, ...)` of every process along dim 0 `(world_size * n, ...)`, rank order, keeping the
    autograd graph: the backward pass sums, for each process's slice, the gradients of all processes.
    """
    if world_size() == 1:
        return tensor
    _check_same_size(tensor)
    return torch.cat(dist_functional.all_gather(tensor), dim=0)


def all_gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """As `all_gather_with_grad`, without a graph (for ids and keys)."""
    if world_size() == 1:
        return tensor
    _check_same_size(tensor)
    gathered = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over processes (a new tensor, no graph)."""
    total = tensor.detach().clone()
    if world_size() > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total
