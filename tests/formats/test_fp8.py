"""FP8 E4M3 / E5M2 with a float32 scale: exact on every finite value, saturating, never NaN."""

import pytest
import torch

from quantlab import formats

FP8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def _finite_values(dtype: torch.dtype) -> torch.Tensor:
    """Every finite value of an 8-bit float dtype, as float32 (256 bit patterns, NaN/inf dropped)."""
    values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).float()
    return values[torch.isfinite(values)]


@pytest.mark.parametrize("fmt", list(FP8))
@pytest.mark.parametrize("scale_exp", [0, -7, 5])
def test_roundtrip_exact_on_every_finite_value(fmt, scale_exp):
    dtype = FP8[fmt]
    values = _finite_values(dtype)
    assert values.abs().max() == torch.finfo(dtype).max  # so the min-max scale is exactly 2**scale_exp
    x = values * 2.0**scale_exp

    q = formats.quantize(x, fmt, per_tensor=True)

    assert q.scale.item() == 2.0**scale_exp
    assert torch.equal(q.codes.float(), values)
    assert torch.equal(formats.dequantize(q), x)


@pytest.mark.parametrize("fmt, rel_bound, min_normal", [("fp8_e4m3", 2.0**-4, 2.0**-6), ("fp8_e5m2", 2.0**-3, 2.0**-14)])
def test_relative_error_at_most_half_ulp_in_normal_range(fmt, rel_bound, min_normal):
    # Log-uniform magnitudes over the whole normal range of the format, random signs.
    g = torch.Generator().manual_seed(0)
    fmax = torch.finfo(FP8[fmt]).max
    log_lo, log_hi = torch.tensor([min_normal, fmax]).log().tolist()
    mag = torch.empty(8, 4096).uniform_(log_lo, log_hi, generator=g).exp().clamp(min_normal, fmax)
    x = mag * torch.where(torch.rand(8, 4096, generator=g) < 0.5, -1.0, 1.0)
    x[:, 0] = fmax  # scale 1 per row: x / scale is x itself

    q = formats.quantize(x, fmt)
    rel = ((formats.dequantize(q) - x).abs() / x.abs())

    assert torch.equal(q.scale, torch.ones(8, 1))
    # 3 (E4M3) or 2 (E5M2) mantissa bits: round-to-nearest is off by at most half an ulp, 2^-(m+1).
    assert rel.max() <= rel_bound


def test_e4m3_rounds_half_to_even():
    # At scale 1 the E4M3 grid between 1 and 2 has steps of 1/8; these sit exactly halfway.
    x = torch.tensor([448.0, 1 + 1 / 16, 1 + 3 / 16, 1 + 5 / 16, 1 + 7 / 16])
    q = formats.quantize(x, "fp8_e4m3", per_tensor=True)
    assert q.codes.float().tolist() == [448.0, 1.0, 1.25, 1.25, 1.5]


def test_e4m3_saturates_at_448_and_never_nan():
    x = torch.tensor([500.0, -500.0, 1e30, -1e30, 3.4e38, 449.0])
    q = formats.quantize(x, "fp8_e4m3", per_tensor=True, amax=torch.tensor(448.0))
    values = formats.dequantize(q)
    assert values.tolist() == [448.0, -448.0, 448.0, -448.0, 448.0, 448.0]


@pytest.mark.parametrize("fmt", list(FP8))
@pytest.mark.parametrize("amax", [None, 1e-30, 1.0, 3e38])
def test_no_nan_or_inf_from_finite_input(fmt, amax):
    x = torch.tensor([[3.4e38, -3.4e38, 1e-45, -1e-45, 0.0, 1.0, -448.0, 57344.0]])
    kwargs = {} if amax is None else {"amax": torch.tensor(amax)}
    q = formats.quantize(x, fmt, **kwargs)
    assert not torch.isnan(q.codes.float()).any()
    assert torch.isfinite(formats.dequantize(q)).all()


@pytest.mark.parametrize("fmt", list(FP8))
def test_scale_is_amax_over_fmax_in_float32(fmt):
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    q = formats.quantize(x, fmt)
    assert q.scale.dtype == torch.float32
    assert torch.equal(q.scale, x.abs().amax(-1, keepdim=True) / torch.finfo(FP8[fmt]).max)
    assert q.codes.dtype == FP8[fmt]
