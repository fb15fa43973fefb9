"""
Storage formats of a memory's contexts: exact (`model`, the model's dtype) or quantised (`int8`, `int4`).

The quantised formats follow KIVI (Liu et al., 2024): keys are quantised per channel (each head-dim channel of a
layer and key/value head over the item's slots: keys carry per-channel outliers), values per token (each slot over
the head dim). Each group is quantised asymmetrically between its minimum and maximum: the zero point is the group's
minimum, kept in the model's dtype (so it is exact, and a constant group round-trips exactly), and the scale is
`(max - min) / (2**bits - 1)` stored as float16, rounded up so that no code clips. Every element then comes back
within half a scale of its stored value. `int4` codes are packed two per byte.

Bytes of one stored context of shape `(layers, 2, kv_heads, slots, head_dim)` (`L, 2, H, S, D`), in this order:

* `model`: the tensor itself, in the model's dtype;
* `int8` / `int4`: the codes of keys and values, `(L, 2, H, S, D)` as uint8 (int4: two codes a byte, the first in
  the low nibble), then the key scales `(L, H, 1, D)` float16, the key zero points `(L, H, 1, D)` in the model's dtype,
  the value scales `(L, H, S, 1)` float16 and the value zero points `(L, H, S, 1)` in the model's dtype.
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
    "pack_int4",
    "quantize",
    "unpack_int4",
]

#: The storage formats of a memory's contexts; `model` (exact, in the model's dtype) is the default.
CONTEXT_FORMATS = ("model", "int8", "int4")
_BITS = {"int8": 8, "int4": 4}
SCALE_DTYPE = torch.float16
#: The dims of a `(..., 2, kv_heads, slots, head_dim)` context that keys / values are reduced over.
_KEY_DIM, _VALUE_DIM = -2, -1


def check_context_format(name: object) -> str:
    """`name` if it is a known context format; else a `ValueError` naming it and the known ones."""
    if name not in CONTEXT_FORMATS:
        raise ValueError(f"Unknown context format {name!r}; expected one of {', '.join(CONTEXT_FORMATS)}.")
    return name  # type: ignore[return-value]


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
    return [
        (torch.uint8, (count if fmt == "int8" else count // 2,)),
        (SCALE_DTYPE, (layers, heads, 1, head_dim)),
        (dtype, (layers, heads, 1, head_dim)),
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
    key_codes, key_scale, key_zero = quantize(kv[:, :, 0], bits, _KEY_DIM)
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
    keys = dequantize(codes[:, 0], key_scale, key_zero, dtype)
    values = dequantize(codes[:, 1], value_scale, value_zero, dtype)
    return torch.stack([keys, values], dim=1)
