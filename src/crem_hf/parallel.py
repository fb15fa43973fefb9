"""Encoding across processes: join a `torchrun` / `accelerate launch` job, split whole batches, gather the results.

Every helper is the identity on one process (no launcher, no process group), so the same code runs both ways::

    initialize_from_environment()                      # False (and a no-op) without a launcher
    mine = share_of_this_process(len(batches))         # [rank, rank + world, ...]
    rows = torch.cat([encode(batches[b]) for b in mine])
    indices = torch.tensor([i for b in mine for i in batches[b]])
    everything = gather_rows(indices, rows, total)     # (total, d) on every process, in index order
    shutdown()

Whole batches are dealt out, never re-cut, so each batch is composed as in the one-process run: padding, and hence
every row's result, do not depend on the number of processes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "barrier",
    "gather_objects",
    "gather_rows",
    "initialize_from_environment",
    "is_main_process",
    "rank",
    "share_of_this_process",
    "shutdown",
    "world_size",
]

#: Whether `initialize_from_environment` made the process group (then `shutdown` takes it down).
_initialized_here = False
#: What a launcher sets besides WORLD_SIZE for `init_process_group`'s env:// rendezvous.
_LAUNCHER_VARIABLES = ("RANK", "MASTER_ADDR", "MASTER_PORT")


def world_size() -> int:
    """The number of processes in the default process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the default process group (0 without one)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    """Whether this process writes outputs and prints results: rank 0 (the only process without a group)."""
    return rank() == 0


def barrier() -> None:
    """Wait until every process gets here (nothing to wait for on one process)."""
    if world_size() > 1:
        dist.barrier()


def _environment_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"Environment variable {name}={value!r}: expected an integer (as torchrun sets it).") from None


def initialize_from_environment() -> bool:
    """
    Join the job a launcher (`torchrun`, `accelerate launch`) started: when its environment says there are several
    processes (WORLD_SIZE > 1, with RANK, MASTER_ADDR, MASTER_PORT) and no process group exists yet, create the
    default group (env:// rendezvous). Its backend is gloo for CPU tensors, plus NCCL for CUDA tensors on a machine
    with CUDA, where each process also takes the GPU of its LOCAL_RANK (with fewer GPUs than processes, the extra
    processes share the current one: CPU gathers still work, NCCL refuses two ranks on one GPU).

    Returns:
        Whether this process is one of several (also when someone else made the group).
    Raises:
        ValueError: WORLD_SIZE > 1 but a variable the rendezvous needs is missing or not an integer.
    """
    global _initialized_here
    if not dist.is_available():
        return False
    if dist.is_initialized():
        return dist.get_world_size() > 1
    if _environment_int("WORLD_SIZE", 1) <= 1:
        return False
    missing = [name for name in _LAUNCHER_VARIABLES if not os.environ.get(name)]
    if missing:
        raise ValueError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set; start the processes with "
            "torchrun or accelerate launch, which set them."
        )
    _environment_int("RANK", 0)  # a named error for a RANK that is not an integer
    backend = "gloo"
    if torch.cuda.is_available():
        # Both backends: CPU tensors (gathered embeddings, objects) go over gloo, CUDA tensors over NCCL.
        backend = "cpu:gloo,cuda:nccl"
        local_rank = _environment_int("LOCAL_RANK", 0)
        if local_rank < torch.cuda.device_count():
            torch.cuda.set_device(local_rank)
    dist.init_process_group(backend)
    _initialized_here = True
    return True


def shutdown() -> None:
    """
    Take down the process group `initialize_from_environment` made, after a barrier (a process that leaves while
    another is still finishing its last collective can make gloo abort it). Leaves a group made elsewhere alone.
    """
    global _initialized_here
    if _initialized_here and dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    _initialized_here = False


def share_of_this_process(num_batches: int) -> list[int]:
    """
    The batches this process runs, round robin: batch `b` goes to process `b % world_size()`. All of them on one
    process.
    """
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 0:
        raise ValueError(f"num_batches must be an integer >= 0, got {num_batches!r}.")
    return list(range(rank(), num_batches, world_size()))


def _check_cover(indices: list[int], total: int) -> None:
    """Every index in `range(total)` exactly once; otherwise a ValueError naming the bad ones."""
    if isinstance(total, bool) or not isinstance(total, int) or total < 0:
        raise ValueError(f"total must be an integer >= 0, got {total!r}.")
    outside = sorted({i for i in indices if not 0 <= i < total})
    if outside:
        raise ValueError(f"Gathered indices {outside[:10]} are outside [0, {total}).")
    counts = torch.bincount(torch.tensor(indices, dtype=torch.long), minlength=total)
    duplicated = (counts > 1).nonzero().flatten().tolist()
    missing = (counts == 0).nonzero().flatten().tolist()
    if duplicated or missing:
        parts = [f"{len(duplicated)} duplicated (first {duplicated[:10]})"] if duplicated else []
        parts += [f"{len(missing)} missing (first {missing[:10]})"] if missing else []
        raise ValueError(
            f"The processes' indices must cover 0..{total - 1} exactly once; {' and '.join(parts)} "
            f"over {world_size()} process(es)."
        )


def _transport_device(tensor: torch.Tensor) -> torch.device:
    """Where `tensor` can travel: as it is, except CPU tensors in an NCCL-only group (made elsewhere) go to the GPU."""
    if tensor.device.type == "cpu" and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


def gather_rows(indices: torch.LongTensor, rows: torch.Tensor, total: int) -> torch.Tensor:
    """
    Put together the rows every process computed for its own indices. Every process must call it.

    Args:
        indices: `(n_local,)` integer positions in `range(total)` of this process's rows (`n_local` may differ
            between processes, and be 0).
        rows: `(n_local, *row_shape)`; the row shape and dtype must be the same on every process.
        total: the number of rows of the result.
    Returns:
        `(total, *row_shape)` on every process, on `rows`' device: row `i` is the row given for index `i`.
    Raises:
        ValueError: on every process alike, an index outside `range(total)`, duplicated or missing over all
            processes, or row shapes, dtypes or totals that differ between processes; on the process concerned,
            `indices` that are not 1-D integers or not one per row.
    """
    if indices.dim() != 1 or indices.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"indices must be a 1-D int64 tensor, got shape {tuple(indices.shape)} {indices.dtype}.")
    indices = indices.long()
    if rows.dim() < 1 or rows.shape[0] != indices.shape[0]:
        raise ValueError(f"Got {indices.shape[0]} indices for rows of shape {tuple(rows.shape)}; expected one each.")
    world = world_size()
    if world == 1:
        _check_cover(indices.tolist(), total)
        out = rows.new_empty((total, *rows.shape[1:]))
        out[indices.to(rows.device)] = rows
        return out

    # First the sizes, shapes and dtypes (pickled, small), so every process raises the same error instead of
    # entering a tensor collective with mismatched tensors.
    described: list[Any] = [None] * world
    dist.all_gather_object(described, (int(rows.shape[0]), tuple(rows.shape[1:]), str(rows.dtype), total))
    kinds = {(shape, dtype) for _, shape, dtype, _ in described}
    if len(kinds) != 1:
        raise ValueError(f"Every process must give rows of one shape and dtype; got (shape, dtype) {sorted(kinds)}.")
    totals = [t for *_, t in described]
    if len(set(totals)) != 1:
        raise ValueError(f"Every process must ask for the same total; got {totals} (by rank).")
    sizes = [n for n, *_ in described]
    longest = max(sizes)

    # Tensor collectives need one shape everywhere: pad to the longest share.
    device = _transport_device(rows)
    padded_rows = rows.new_zeros((longest, *rows.shape[1:]), device=device)
    padded_rows[: rows.shape[0]] = rows.to(device)
    padded_indices = torch.full((longest,), -1, dtype=torch.long, device=device)
    padded_indices[: indices.shape[0]] = indices.to(device)
    all_rows = [torch.empty_like(padded_rows) for _ in range(world)]
    all_indices = [torch.empty_like(padded_indices) for _ in range(world)]
    dist.all_gather(all_rows, padded_rows)
    dist.all_gather(all_indices, padded_indices)

    joined_indices = torch.cat([part[:n] for part, n in zip(all_indices, sizes, strict=True)])
    joined_rows = torch.cat([part[:n] for part, n in zip(all_rows, sizes, strict=True)])
    _check_cover(joined_indices.tolist(), total)
    out = rows.new_empty((total, *rows.shape[1:]), device=device)
    out[joined_indices] = joined_rows
    return out.to(rows.device)


def gather_objects(indices: Sequence[int], objects: Sequence[Any], total: int) -> list[Any]:
    """
    `gather_rows` for picklable objects (strings, dicts): every process's `objects[k]` for `indices[k]` ->
    the list of `total` objects, object `i` for index `i`, on every process. Every process must call it.
    """
    indices, objects = [int(i) for i in indices], list(objects)
    if len(indices) != len(objects):
        raise ValueError(f"Got {len(indices)} indices for {len(objects)} objects; expected one each.")
    if world_size() > 1:
        parts: list[Any] = [None] * world_size()
        dist.all_gather_object(parts, (indices, objects))
        indices = [i for part_indices, _ in parts for i in part_indices]
        objects = [o for _, part_objects in parts for o in part_objects]
    _check_cover(indices, total)
    out: list[Any] = [None] * total
    for i, item in zip(indices, objects, strict=True):
        out[i] = item
    return out
