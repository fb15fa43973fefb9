"""Quantised context storage (`crem_hf.memory.quantize`): closed-form checks of the int8 (KIVI) and int4
(Hadamard-rotated keys) formats."""

from __future__ import annotations

import pytest
import torch

from crem_hf.memory.quantize import (
    CONTEXT_FORMATS,
    check_context_format,
    context_nbytes,
    decode_context,
    dequantize,
    encode_contexts,
    hadamard,
    pack_int4,
    quantize,
    unpack_int4,
)

#: (layers, 2, kv_heads, slots, head_dim) of a small context.
SHAPE = (3, 2, 2, 16, 8)


def _contexts(batch: int = 2, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """Random contexts `(batch, *SHAPE)` with a per-channel key offset (the outliers KIVI quantises per channel)."""
    generator = torch.Generator().manual_seed(seed)
    kv = torch.randn(batch, *SHAPE, generator=generator)
    kv[:, :, 0] += 10 * torch.randn(1, SHAPE[0], SHAPE[2], 1, SHAPE[4], generator=generator)
    return kv.to(dtype)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dim", [-1, -2])
def test_round_trip_error_is_within_half_a_scale_per_element(bits, dim):
    x = _contexts()[:, :, 0]
    codes, scale, zero = quantize(x, bits, dim)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape and int(codes.max()) <= 2**bits - 1
    expected = list(x.shape)
    expected[dim] = 1
    assert scale.dtype == torch.float16 and list(scale.shape) == expected
    assert zero.dtype == x.dtype and list(zero.shape) == expected
    assert torch.equal(zero, x.amin(dim, keepdim=True))  # the zero point is the group's minimum, exactly
    # The float16 scale covers the group's range (rounded up): the top code reaches the maximum.
    span = x.amax(dim, keepdim=True) - x.amin(dim, keepdim=True)
    assert bool((scale.float() * (2**bits - 1) >= span * (1 - 1e-6)).all())
    assert bool((scale.float() <= span / (2**bits - 1) * (1 + 2**-10) + 1e-7).all())  # by at most one fp16 step
    error = (dequantize(codes, scale, zero, torch.float32) - x).abs()
    bound = scale.float() / 2 + 1e-5 * x.abs().amax()  # half a scale, plus float32 rounding
    assert bool((error <= bound).all())
    # And the bound is not vacuous: the errors use most of it.
    assert float((error / scale.float()).max()) > 0.4


def test_constant_groups_round_trip_exactly_and_a_single_outlier_keeps_its_value():
    x = torch.full((2, 16, 8), 3.14159, dtype=torch.float32)
    x[1, :, 3] = -7.25  # another constant channel
    for bits in (8, 4):
        codes, scale, zero = quantize(x, bits, dim=-2)
        assert bool((scale[0] == 0).all()) and int(codes.max()) == 0
        assert torch.equal(dequantize(codes, scale, zero, torch.float32), x)
    y = torch.zeros(1, 16, 1)
    y[0, 5, 0] = 100.0  # the group's min and max come back exactly (codes 0 and the top one)
    codes, scale, zero = quantize(y, 4, dim=-2)
    restored = dequantize(codes, scale, zero, torch.float32)
    assert float(restored[0, 0, 0]) == 0.0 and float(restored[0, 5, 0]) == pytest.approx(100.0, rel=2**-10)


def test_int4_packing_is_exact_two_codes_a_byte_low_nibble_first():
    codes = torch.arange(16, dtype=torch.uint8).repeat(3)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == 24
    assert packed[:2].tolist() == [0x10, 0x32]  # (0, 1) -> 0x10, (2, 3) -> 0x32
    assert torch.equal(unpack_int4(packed), codes)
    every_byte = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(pack_int4(unpack_int4(every_byte)), every_byte)
    with pytest.raises(ValueError, match="even number"):
        pack_int4(codes[:3])
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_int4(torch.tensor([16, 0], dtype=torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", CONTEXT_FORMATS)
def test_encoded_contexts_decode_to_the_model_dtype_within_the_bound(fmt, dtype):
    kv = _contexts(batch=3, dtype=dtype)
    rows = encode_contexts(kv, fmt)
    assert len(rows) == 3 and all(len(row) == context_nbytes(fmt, dtype, SHAPE) for row in rows)
    for i, row in enumerate(rows):
        decoded = decode_context(row, fmt, dtype, SHAPE)
        assert decoded.dtype == dtype and decoded.shape == SHAPE
        if fmt == "model":
            assert torch.equal(decoded, kv[i])
            continue
        bits = 8 if fmt == "int8" else 4
        # Half a scale, plus the cast of the float32 result to the model's dtype (half an ulp of it).
        ulp = float(torch.finfo(dtype).eps) * kv[i].float().abs()
        _, value_scale, _ = quantize(kv[i, :, 1], bits, dim=-1)
        value_error = (decoded[:, 1].float() - kv[i, :, 1].float()).abs()
        assert bool((value_error <= value_scale.float() / 2 + ulp[:, 1] + 1e-5).all())
        if fmt == "int8":  # Oracle: keys per channel, quantised by `quantize` directly.
            _, key_scale, _ = quantize(kv[i, :, 0], bits, dim=-2)
            key_error = (decoded[:, 0].float() - kv[i, :, 0].float()).abs()
            assert bool((key_error <= key_scale.float() / 2 + ulp[:, 0] + 1e-5).all())
        else:  # Oracle: in the rotated frame the keys are per-slot groups, each element within half their scale.
            matrix = hadamard(SHAPE[-1])
            rotated = (kv[i, :, 0].float() @ matrix).to(dtype)
            _, key_scale, _ = quantize(rotated, bits, dim=-1)
            key_error = (decoded[:, 0].float() @ matrix - rotated.float()).abs()
            slack = 2 * float(torch.finfo(dtype).eps) * kv[i, :, 0].float().norm(dim=-1, keepdim=True)  # the casts
            assert bool((key_error <= key_scale.float() / 2 + slack + 1e-5).all())


@pytest.mark.parametrize("size", [1, 8, 128, 96, 80, 7])
def test_hadamard_is_orthonormal_and_mixes_every_channel_of_its_blocks(size):
    matrix = hadamard(size)
    assert matrix.shape == (size, size)
    assert torch.allclose(matrix @ matrix.T, torch.eye(size), atol=1e-6)
    block = size & -size  # the largest power of two dividing the size
    entries = matrix.abs()
    assert torch.allclose(entries, torch.block_diag(*[torch.full((block, block), block**-0.5)] * (size // block)))
    if size == 128:  # the Sylvester construction: row i, column j is (-1) ** popcount(i & j) / sqrt(128)
        signs = torch.tensor([[(-1) ** bin(a & b).count("1") for b in range(size)] for a in range(size)])
        assert torch.equal(torch.sign(matrix), signs.float())
    with pytest.raises(ValueError, match="size must be positive"):
        hadamard(0)


def test_int4_key_rotation_spreads_an_outlier_channel():
    """Keys with outlier channels: int4 (rotated, per slot) errs less than the same per-slot groups unrotated."""
    generator = torch.Generator().manual_seed(3)
    kv = torch.randn(1, 2, 2, 2, 16, 64, generator=generator)
    kv[:, :, 0, :, :, 5] += 30.0  # an outlier channel in every key
    decoded = decode_context(encode_contexts(kv, "int4")[0], "int4", torch.float32, kv.shape[1:])
    rotated_error = (decoded[:, 0] - kv[0, :, 0]).norm()
    codes, scale, zero = quantize(kv[0, :, 0], 4, dim=-1)
    plain_error = (dequantize(codes, scale, zero, torch.float32) - kv[0, :, 0]).norm()
    assert float(rotated_error) < 0.5 * float(plain_error)


def test_sizes_at_qwen2_vl_2b_geometry():
    shape = (28, 2, 2, 16, 128)  # 28 layers, 2 key/value heads, 16 slots, head dim 128
    elements = 28 * 2 * 2 * 16 * 128
    assert context_nbytes("model", torch.bfloat16, shape) == 2 * elements
    channel_groups, slot_groups = 28 * 2 * 128, 28 * 2 * 16
    # A float16 scale and a bf16 zero point per group: int8 keys per channel, int4 keys per slot; values per slot.
    assert context_nbytes("int8", torch.bfloat16, shape) == elements + 4 * (channel_groups + slot_groups)
    assert context_nbytes("int4", torch.bfloat16, shape) == elements // 2 + 4 * 2 * slot_groups == 121_856
    assert context_nbytes("int4", torch.bfloat16, shape) <= 120 * 1024  # the target, scales included


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="Unknown context format 'int2'; expected one of model, int8, int4"):
        check_context_format("int2")
    with pytest.raises(ValueError, match="Unknown context format"):
        encode_contexts(_contexts(), "fp8")
    with pytest.raises(ValueError, match="shape"):
        encode_contexts(_contexts()[0], "int8")
    broken = _contexts()
    broken[0, 0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        encode_contexts(broken, "int4")
    with pytest.raises(ValueError, match="float16 scale"):
        quantize(torch.tensor([[-1e9], [1e9]]), 8, dim=0)
    row = encode_contexts(_contexts(), "int8")[0]
    # 1536 elements; 48 key and 96 value groups, each a float16 scale and a float32 zero point (6 bytes).
    assert len(row) == 1536 + 6 * (48 + 96) == 2400
    # int4: 768 bytes of codes; 96 key and 96 value groups of 6 bytes.
    with pytest.raises(ValueError, match=r"format 'int4'.*has 1920 bytes, this one 2400"):
        decode_context(row, "int4", torch.float32, SHAPE)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        quantize(torch.zeros(2, 2), 2, dim=0)
