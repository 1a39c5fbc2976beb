"""Nibble and int32 packing: lossless, element 0 in the low bits, identical to compressed-tensors."""

import importlib
import pytest
import torch

from quantlab import formats
from quantlab.errors import FormatError
from quantlab.formats import fp4
from quantlab.formats.pack import pack_int32, pack_nibbles, unpack_int32, unpack_nibbles


def _uint4(shape, seed=0):
    return torch.randint(0, 16, shape, generator=torch.Generator().manual_seed(seed)).to(torch.uint8)


def _int4(shape, seed=0):
    return torch.randint(-8, 8, shape, generator=torch.Generator().manual_seed(seed)).to(torch.int8)


@pytest.mark.parametrize("shape", [(2,), (5, 16), (3, 4, 32)])
def test_pack_nibbles_roundtrip(shape):
    codes = _uint4(shape)
    packed = pack_nibbles(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (*shape[:-1], shape[-1] // 2)
    assert torch.equal(unpack_nibbles(packed), codes)


def test_pack_nibbles_puts_element_0_in_the_low_nibble():
    codes = torch.tensor([0x1, 0x2, 0xF, 0x0, 0x0, 0xA], dtype=torch.uint8)
    assert pack_nibbles(codes).tolist() == [0x21, 0x0F, 0xA0]


def test_pack_nibbles_odd_last_dim_raises():
    with pytest.raises(FormatError, match="odd last dimension"):
        pack_nibbles(torch.zeros(4, 3, dtype=torch.uint8))


@pytest.mark.parametrize("dim, shape", [(1, (3, 64)), (1, (4, 40)), (0, (16, 5)), (0, (24, 1))])
def test_pack_int32_roundtrip(dim, shape):
    codes = _int4(shape)
    words = pack_int32(codes, dim=dim)
    expected_shape = list(shape)
    expected_shape[dim] //= 8
    assert words.dtype == torch.int32 and list(words.shape) == expected_shape
    assert torch.equal(unpack_int32(words, dim=dim), codes)


def test_pack_int32_puts_element_0_in_the_low_nibble():
    # Codes -8..7 are stored offset by +8 as 0..15; element k of a word sits in bits 4k..4k+3.
    codes = torch.arange(-8, 8, dtype=torch.int8).reshape(1, 16)
    words = pack_int32(codes)
    assert [w & 0xFFFFFFFF for w in words[0].tolist()] == [0x76543210, 0xFEDCBA98]
    assert torch.equal(pack_int32(codes.t().contiguous(), dim=0).t(), words)


@pytest.mark.parametrize("shape, dim", [((3, 12), 1), ((12, 3), 0), ((2, 3, 8), 1)])
def test_pack_int32_rejects_bad_shapes(shape, dim):
    with pytest.raises(FormatError, match="pack_int32"):
        pack_int32(torch.zeros(shape, dtype=torch.int8), dim=dim)


@pytest.mark.parametrize("dim, shape", [(1, (6, 64)), (1, (5, 40)), (1, (2, 8)), (0, (16, 4)), (0, (40, 3))])
def test_pack_int32_equals_compressed_tensors_pack_to_int32(dim, shape):
    helpers = importlib.import_module("compressed_tensors.compressors.pack_quantized.helpers")
    codes = _int4(shape, seed=dim)
    ours = pack_int32(codes, dim=dim)
    theirs = helpers.pack_to_int32(codes, num_bits=4, packed_dim=dim)
    assert torch.equal(ours, theirs)
    assert torch.equal(unpack_int32(theirs, dim=dim), helpers.unpack_from_int32(ours, 4, codes.shape, packed_dim=dim))


def test_pack_nibbles_equals_compressed_tensors_fp4_packing():
    helpers = importlib.import_module("compressed_tensors.compressors.nvfp4.helpers")
    codes = torch.cat([torch.arange(16, dtype=torch.uint8), _uint4((48,))]).reshape(4, 16)
    # compressed-tensors packs E2M1 *values*; code 8 decodes to -0.0, whose sign bit it keeps.
    values = fp4.e2m1_decode(codes)
    assert torch.equal(pack_nibbles(codes), helpers.pack_fp4_to_uint8(values))
    assert torch.equal(helpers.unpack_fp4_from_uint8(pack_nibbles(codes), 4, 16, dtype=torch.float32), values)


def test_int4_asym_packed_tensors_decompress_in_compressed_tensors():
    """Our weight_packed / weight_scale / weight_zero_point decode in compressed-tensors' own compressor."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(7)) + 0.5
    q = formats.quantize(w, "int4_asym", group_size=32)
    state = {
        "weight_packed": pack_int32(q.codes, dim=1),
        "weight_scale": q.scale,
        "weight_shape": torch.tensor(w.shape),
        "weight_zero_point": pack_int32(q.zero_point, dim=0),  # zero points are packed along rows
    }
    args = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=32)
    out = PackedQuantizationCompressor.decompress(state, QuantizationScheme(targets=["Linear"], weights=args))

    assert torch.equal(out["weight_zero_point"], q.zero_point)
    assert torch.equal(out["weight"], formats.dequantize(q, dtype=torch.bfloat16))
