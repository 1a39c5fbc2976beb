"""E2M1 rounding, NVFP4 (E4M3 block + FP32 global scales) and MXFP4 (E8M0 block scales)."""

import importlib
import math

import pytest
import torch

from quantlab import formats
from quantlab.formats import fp4
from quantlab.formats.spec import E2M1_GRID

# The 15 distinct E2M1 values (+0 once), padded with a second 6 to fill a block of 16.
E2M1_VALUES = sorted({s * v for v in E2M1_GRID for s in (1.0, -1.0)}) + [6.0]


def _grid_blocks(num_blocks: int, block: int, g: torch.Generator) -> torch.Tensor:
    """[num_blocks, block] E2M1 values, shuffled; every block holds each value, +6 included (amax 6)."""
    pool = torch.tensor(E2M1_VALUES)
    rest = pool[torch.randint(0, len(pool), (num_blocks, block - len(pool)), generator=g)]
    values = torch.cat([pool.expand(num_blocks, -1), rest], dim=1)
    return values.gather(1, torch.rand(num_blocks, block, generator=g).argsort(dim=1))


def test_e2m1_midpoints_round_half_to_even():
    mids = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    expected = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    x = torch.tensor(mids + [-m for m in mids])
    assert fp4.e2m1_decode(fp4.e2m1_encode(x)).tolist() == expected + [-e for e in expected]


def test_e2m1_saturates_to_six_never_inf_or_nan():
    x = torch.tensor([6.0, 7.0, 1e30, 3.4e38, float("inf"), -7.0, -1e30])
    assert fp4.e2m1_decode(fp4.e2m1_encode(x)).tolist() == [6.0, 6.0, 6.0, 6.0, 6.0, -6.0, -6.0]


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_values_beyond_amax_saturate_to_six_times_the_scale(fmt):
    block = formats.get_spec(fmt).block_size
    x = torch.zeros(1, block)
    x[0, :4] = torch.tensor([1e30, -1e30, 7.0, 6.0])
    # amax 6 gives decode scale 1 for mxfp4 (2^(floor(log2 6) - 2)) and for nvfp4 (e4m3(448) / 448).
    q = formats.quantize(x, fmt, amax=torch.tensor(6.0))
    assert formats.dequantize(q)[0, :4].tolist() == [6.0, -6.0, 6.0, 6.0]


def test_e2m1_codes_are_sign_and_grid_index():
    codes = torch.arange(16, dtype=torch.uint8)
    values = fp4.e2m1_decode(codes)
    assert values[:8].tolist() == list(E2M1_GRID)
    assert values[8:].tolist() == [-v for v in E2M1_GRID]
    nonzero = codes != 8  # -0 encodes as +0: there are no negative-zero codes
    assert torch.equal(fp4.e2m1_encode(values)[nonzero], codes[nonzero])
    assert fp4.e2m1_encode(torch.tensor([-0.0, -0.1])).tolist() == [0, 0]


def test_e2m1_rounding_equals_compressed_tensors_cast_to_fp4():
    fp4_utils = importlib.import_module("compressed_tensors.quantization.utils.fp4_utils")
    # Every multiple of 1/64 in [-8, 8]: all midpoints, all grid values, and saturation.
    x = torch.arange(-512, 513, dtype=torch.float32) / 64
    ours = fp4.e2m1_decode(fp4.e2m1_encode(x))
    theirs = fp4_utils.cast_to_fp4(x.clamp(-6, 6).clone())
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("global_exp", [0, -3, 5])
def test_nvfp4_roundtrip_exact_on_grid_values(global_exp):
    g = torch.Generator().manual_seed(global_exp + 10)
    # Random positive finite E4M3 block scales (bit patterns 0x01..0x7e), one of them 448, so the
    # tensor amax is 6 * 448 * 2^k and the global scale 2688 / amax is exactly 2^-k.
    bits = torch.randint(1, 0x7F, (32,), generator=g).to(torch.uint8)
    bits[3] = 0x7E
    block_scale = bits.view(torch.float8_e4m3fn).float()
    assert block_scale.max() == 448.0
    values = _grid_blocks(32, 16, g)
    x = (values * block_scale[:, None] * 2.0**global_exp).reshape(4, 128)

    q = formats.quantize(x, "nvfp4")

    assert q.global_scale.item() == 2.0**-global_exp
    assert torch.equal(q.scale.float().flatten(), block_scale)
    assert torch.equal(fp4.e2m1_decode(q.codes), values.reshape(4, 128))
    assert torch.equal(formats.dequantize(q), x)


def test_nvfp4_block_scales_are_the_exact_e4m3_rounding_of_amax_over_6_times_global():
    x = torch.randn(16, 256, generator=torch.Generator().manual_seed(1)) * torch.logspace(-3, 1, 16)[:, None]
    q = formats.quantize(x, "nvfp4")
    block_amax = x.reshape(16, 16, 16).abs().amax(-1)
    expected = (block_amax / 6 * q.global_scale).to(torch.float8_e4m3fn)

    assert q.scale.dtype == torch.float8_e4m3fn
    assert torch.isfinite(q.scale.float()).all() and q.scale.float().max() <= 448
    assert torch.equal(q.scale.view(torch.uint8), expected.view(torch.uint8))
    # The block holding the tensor's amax gets the largest E4M3 value.
    assert q.scale.float().max() == 448.0


def test_nvfp4_global_scale_is_448_times_6_over_amax():
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(2)) * 3
    amax = x.abs().max()
    q = formats.quantize(x, "nvfp4")
    assert q.global_scale.dtype == torch.float32 and q.global_scale.shape == (1,)
    assert q.global_scale.item() == (torch.tensor(448.0 * 6.0) / amax).item()
    # Its reciprocal is the decode-direction scale amax / (6 * 448).
    assert torch.allclose(1 / q.global_scale, amax / 2688, rtol=1e-6)


def test_nvfp4_global_amax_overrides_the_tensor_amax():
    x = torch.randn(2, 32, generator=torch.Generator().manual_seed(3))
    q = formats.quantize(x, "nvfp4", global_amax=torch.tensor(10.0))
    assert q.global_scale.item() == pytest.approx(268.8)


def test_nvfp4_all_zero_tensor_has_global_scale_one_and_zero_values():
    q = formats.quantize(torch.zeros(2, 32), "nvfp4")
    assert q.global_scale.item() == 1.0
    assert (q.codes == 0).all() and (formats.dequantize(q) == 0).all()


def _mx_amax_cases() -> torch.Tensor:
    g = torch.Generator().manual_seed(4)
    amax = torch.exp2(torch.empty(256).uniform_(-100, 100, generator=g))
    powers = torch.exp2(torch.arange(-60, 61, 7, dtype=torch.float32))
    # Powers of two and the floats just below them (where log2 in float32 rounds up to the integer),
    # and the mantissa 1.75 where the rule rounds up, with its neighbours.
    at_175 = powers * 1.75
    return torch.cat([amax, powers, torch.nextafter(powers, torch.zeros_like(powers)), at_175,
                      torch.nextafter(at_175, torch.zeros_like(at_175)), powers * 1.5])


def test_mxfp4_scale_exponent_is_floor_log2_of_amax_rounded_to_one_mantissa_bit_minus_2():
    amax = _mx_amax_cases()
    x = torch.zeros(amax.numel(), 32)
    x[:, 7] = -amax

    q = formats.quantize(x, "mxfp4")

    assert q.scale.dtype == torch.uint8
    def rounded_exponent(a: float) -> int:
        e = math.floor(math.log2(a))
        return e + (a / 2.0**e >= 1.75)
    expected = [rounded_exponent(a) - 2 + 127 for a in amax.double().tolist()]
    assert q.scale.flatten().tolist() == expected
    # E8M0 scales are powers of two: decoding code 2 (value 1.0) gives the scale itself.
    assert torch.equal(fp4.mxfp4_scale_value(q.scale), torch.exp2(torch.tensor(expected, dtype=torch.float32)[:, None] - 127))


def test_mxfp4_roundtrip_exact_on_grid_values():
    g = torch.Generator().manual_seed(5)
    values = _grid_blocks(16, 32, g)
    exp = torch.randint(-30, 30, (16, 1), generator=g)
    x = (values * torch.exp2(exp.float())).reshape(4, 128)

    q = formats.quantize(x, "mxfp4")

    assert torch.equal(q.scale.reshape(16, 1).long() - 127, exp)  # amax 6 * 2^e -> exponent e
    assert torch.equal(fp4.e2m1_decode(q.codes), values.reshape(4, 128))
    assert torch.equal(formats.dequantize(q), x)


def test_mxfp4_values_between_6_and_7_times_scale_saturate_and_above_7_take_the_next_exponent():
    # amax 6.5: mantissa 1.625 keeps exponent floor(log2 6.5) - 2 = 0, and 6.5 clips to 6 (half a step).
    x = torch.tensor([[6.5, 6.25, 3.0] + [0.0] * 29])
    q = formats.quantize(x, "mxfp4")
    assert q.scale.item() == 127
    assert formats.dequantize(q)[0, :3].tolist() == [6.0, 6.0, 3.0]
    # amax 7.5: mantissa 1.875 rounds up, exponent 1, so 7.5 -> 8 (3.75 * 2 -> 4 * 2) instead of 6; 6.5 -> 6.
    x = torch.tensor([[7.5, 6.5, 3.0] + [0.0] * 29])
    q = formats.quantize(x, "mxfp4")
    assert q.scale.item() == 128
    assert formats.dequantize(q)[0, :3].tolist() == [8.0, 6.0, 3.0]


def test_mxfp4_exponents_equal_compressed_tensors_generate_mx_scales():
    mx = importlib.import_module("compressed_tensors.quantization.utils.mxfp_utils")
    amax = _mx_amax_cases()
    amax = amax[(amax > 2.0**-120) & (amax < 2.0**120)]  # inside E8M0's range, where both rules apply
    expected = mx.generate_mx_scales(amax, num_bits=4)
    assert torch.equal(fp4.mxfp4_block_scale(amax).float(), expected.float())


def test_mxfp4_all_zero_block_gets_the_smallest_scale():
    x = torch.zeros(2, 64)
    x[1, 32:] = 1.0
    q = formats.quantize(x, "mxfp4")
    assert q.scale[0].tolist() == [0, 0] and q.scale[1, 0].item() == 0
    assert (formats.dequantize(q)[:, :32] == 0).all()
