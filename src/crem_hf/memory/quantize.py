"""
Storage formats of a memory's contexts: exact (`model`, the model's dtype) or quantised (`int8`, `int4`).

Each group of elements is quantised asymmetrically between its minimum and maximum: the zero point is the group's
minimum, kept in the model's dtype (so it is exact, and a constant group round-trips exactly), and the scale is
`(max - min) / (2**bits - 1)` stored as float16, rounded up so that no code clips. Every element then comes back
within half a scale of its stored value. Values are grouped per slot (each slot over the head dim) in both formats;
keys, which carry per-channel outliers, are handled by format:

* `int8` follows KIVI (Liu et al., 2024): keys grouped per channel (each head-dim channel of a layer and key/value
  head over the item's slots), so an outlier channel only widens its own group.
* `int4` rotates the keys over the head dim by a normalised (block) Hadamard matrix first, then groups them per
  slot like the values. The rotation is orthogonal (undone exactly on reading) and spreads an outlier channel over
  the whole slot; per-slot groups need one scale and zero point per slot instead of one per channel, which is what
  takes an int4 context under 1/300 of the item's full KV cache (KIVI's per-channel key scales alone are a third of
  an int4 context). Measured in `benchmarks/memory.py`: the same answer fidelity as KIVI int4 on the main job.

Bytes of one stored context of shape `(layers, 2, kv_heads, slots, head_dim)` (`L, 2, H, S, D`), in this order:

* `model`: the tensor itself, in the model's dtype;
* `int8` / `int4`: the codes of keys and values, `(L, 2, H, S, D)` as uint8 (int4: two codes a byte, the first in
  the low nibble), then the key scales (`int8`: `(L, H, 1, D)`, `int4`: `(L, H, S, 1)`) float16, the key zero points
  (the same shape) in the model's dtype, the value scales `(L, H, S, 1)` float16 and the value zero points
  `(L, H, S, 1)` in the model's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "CONTEXT_FORMATS",
    "check_context_format",
    "context_nbytes",
    "decode_context",
    "dequantize",
    "encode_contexts",
    "hadamard",
    "pack_int4",
    "quantize",
    "unpack_int4",
]

#: The storage formats of a memory's contexts; `model` (exact, in the model's dtype) is the default.
CONTEXT_FORMATS = ("model", "int8", "int4")
_BITS = {"int8": 8, "int4": 4}
SCALE_DTYPE = torch.float16
#: The dim of a `(..., kv_heads, slots, head_dim)` key or value tensor that one group spans, per format.
_KEY_DIM = {"int8": -2, "int4": -1}
_VALUE_DIM = -1
#: Formats whose keys are rotated by `hadamard(head_dim)` before they are quantised.
_ROTATED_KEYS = {"int4"}


def check_context_format(name: object) -> str:
    """`name` if it is a known context format; else a `ValueError` naming it and the known ones."""
    if name not in CONTEXT_FORMATS:
        raise ValueError(f"Unknown context format {name!r}; expected one of {', '.join(CONTEXT_FORMATS)}.")
    return name  # type: ignore[return-value]


def hadamard(size: int) -> torch.Tensor:
    """
    An orthonormal `(size, size)` float32 matrix that mixes every channel into every other: the normalised Sylvester
    Hadamard matrix when `size` is a power of two, else block-diagonal copies of the largest one whose size divides
    `size` (the identity for an odd `size`).
    """
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}.")
    block = size & -size  # the largest power of two dividing size
    matrix = torch.ones(1, 1)
    while matrix.shape[0] < block:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return torch.block_diag(*[matrix / math.sqrt(block)] * (size // block))


def _rotate_keys(keys: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """`keys` `(..., head_dim)` times `hadamard(head_dim)` (or its transpose, the inverse), in float32."""
    matrix = hadamard(keys.shape[-1]).to(keys.device)
    return keys.float() @ (matrix.T if inverse else matrix)


def quantize(x: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    Asymmetric min/max quantisation of `x` in groups along `dim`.

    Args:
        x: a floating tensor, any shape, finite.
        bits: 8 or 4 (codes in `[0, 2**bits - 1]`).
        dim: the dim each group spans (its min and max are taken over it).
    Returns:
        `codes` (uint8, the shape of `x`), `scale` (float16, `x`'s shape with `dim` of size 1) and `zero` (`x`'s dtype,
        the same shape: the group's minimum). `dequantize(codes, scale, zero)` is within `scale / 2` of `x`.
    Raises:
        ValueError: `x` holds a non-finite value, or a group's range is too large for a float16 scale.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}.")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("Cannot quantise a context holding non-finite values (inf or nan); store it exactly.")
    levels = 2**bits - 1
    zero = x.amin(dim, keepdim=True)
    span = x.amax(dim, keepdim=True).float() - zero.float()
    wanted = span / levels
    scale = wanted.to(SCALE_DTYPE)
    # Round the float16 scale up where it fell below the wanted one, so that the top code reaches the group's maximum.
    up = torch.nextafter(scale, torch.full_like(scale, math.inf))
    scale = torch.where(scale.float() < wanted, up, scale)
    if not bool(torch.isfinite(scale).all()):
        raise ValueError(
            f"A context group spans more than a float16 scale holds ({float(span.max()):.3g}); store it exactly "
            "(context format 'model')."
        )
    divisor = torch.where(scale > 0, scale.float(), torch.ones_like(wanted))  # constant groups: every code is 0
    codes = ((x.float() - zero.float()) / divisor).round_().clamp_(0, levels).to(torch.uint8)
    return codes, scale, zero


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`codes * scale + zero` (computed in float32, broadcast over the groups), in `dtype`."""
    return (codes.float() * scale.float() + zero.float()).to(dtype)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Codes in `[0, 15]` (uint8, an even count) as one byte a pair, the first of each pair in the low nibble."""
    flat = codes.reshape(-1)
    if flat.numel() % 2:
        raise ValueError(f"int4 packing needs an even number of codes, got {flat.numel()}.")
    if flat.numel() and int(flat.max()) > 15:
        raise ValueError(f"int4 codes must lie in [0, 15], got {int(flat.max())}.")
    return flat[0::2] | (flat[1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of [`pack_int4`]: `(2 * bytes,)` uint8 codes."""
    flat = packed.reshape(-1)
    return torch.stack([flat & 0x0F, flat >> 4], dim=-1).reshape(-1)


def _parts(shape: Sequence[int], fmt: str, dtype: torch.dtype) -> list[tuple[torch.dtype, tuple[int, ...]]]:
    """(dtype, shape) of each part of a quantised row, in storage order; the codes as uint8 bytes."""
    layers, two, heads, slots, head_dim = shape
    count = layers * two * heads * slots * head_dim
    key_groups = (layers, heads, 1, head_dim) if _KEY_DIM[fmt] == -2 else (layers, heads, slots, 1)
    return [
        (torch.uint8, (count if fmt == "int8" else count // 2,)),
        (SCALE_DTYPE, key_groups),
        (dtype, key_groups),
        (SCALE_DTYPE, (layers, heads, slots, 1)),
        (dtype, (layers, heads, slots, 1)),
    ]


def context_nbytes(fmt: str, dtype: torch.dtype, shape: Sequence[int]) -> int:
    """Bytes of one stored context of `shape` `(layers, 2, kv_heads, slots, head_dim)` in format `fmt`, with scales."""
    check_context_format(fmt)
    if fmt == "model":
        return math.prod(shape) * dtype.itemsize
    return sum(math.prod(part_shape) * part_dtype.itemsize for part_dtype, part_shape in _parts(shape, fmt, dtype))


def _as_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().view(torch.uint8).numpy().tobytes()


def encode_contexts(kv: torch.Tensor, fmt: str) -> list[bytes]:
    """
    Each row of `kv` `(batch, layers, 2, kv_heads, slots, head_dim)` (any device; quantised where it lies, one
    transfer to the CPU) as the bytes of a stored context in format `fmt` (see the module's docstring).
    """
    check_context_format(fmt)
    if kv.dim() != 6 or kv.shape[2] != 2:
        raise ValueError(
            f"Expected contexts of shape (batch, layers, 2, kv_heads, slots, head_dim), got {tuple(kv.shape)}."
        )
    if fmt == "model":
        return [_as_bytes(row) for row in kv.detach().cpu()]
    bits = _BITS[fmt]
    keys = _rotate_keys(kv[:, :, 0]).to(kv.dtype) if fmt in _ROTATED_KEYS else kv[:, :, 0]
    key_codes, key_scale, key_zero = quantize(keys, bits, _KEY_DIM[fmt])
    value_codes, value_scale, value_zero = quantize(kv[:, :, 1], bits, _VALUE_DIM)
    codes = torch.stack([key_codes, value_codes], dim=2).cpu()
    key_scale, key_zero, value_scale, value_zero = (t.cpu() for t in (key_scale, key_zero, value_scale, value_zero))
    rows = []
    for i in range(kv.shape[0]):
        row_codes = codes[i].reshape(-1)
        if bits == 4:
            row_codes = pack_int4(row_codes)
        parts = (row_codes, key_scale[i], key_zero[i], value_scale[i], value_zero[i])
        rows.append(b"".join(_as_bytes(part) for part in parts))
    return rows


def decode_context(data: bytes, fmt: str, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    """
    One stored context (bytes in format `fmt`) as a tensor of `shape` `(layers, 2, kv_heads, slots, head_dim)` in
    `dtype` (dequantised in float32, then cast), on the CPU.

    Raises:
        ValueError: `data` does not have the size of a context of this format, dtype and shape.
    """
    shape = tuple(shape)
    expected = context_nbytes(fmt, dtype, shape)
    if len(data) != expected:
        raise ValueError(
            f"a context in format {fmt!r} of shape {shape} ({dtype}) has {expected} bytes, this one {len(data)}"
        )
    buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    if fmt == "model":
        return buffer.view(dtype).reshape(shape)
    tensors, offset = [], 0
    for part_dtype, part_shape in _parts(shape, fmt, dtype):
        size = math.prod(part_shape) * part_dtype.itemsize
        tensors.append(buffer[offset : offset + size].view(part_dtype).reshape(part_shape))
        offset += size
    codes, key_scale, key_zero, value_scale, value_zero = tensors
    if fmt == "int4":
        codes = unpack_int4(codes)
    codes = codes.reshape(shape)
    if fmt in _ROTATED_KEYS:
        keys = _rotate_keys(dequantize(codes[:, 0], key_scale, key_zero, torch.float32), inverse=True).to(dtype)
    else:
        keys = dequantize(codes[:, 0], key_scale, key_zero, dtype)
    values = dequantize(codes[:, 1], value_scale, value_zero, dtype)
    return torch.stack([keys, values], dim=1)
