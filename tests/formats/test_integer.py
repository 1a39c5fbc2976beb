"""INT8 and INT4 (symmetric and asymmetric): exact on their grid, within half a step elsewhere."""

import pytest
import torch

from quantlab import formats
from quantlab.formats import get_spec


def _expand(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per-group values [rows, groups] repeated to per-element [rows, groups * group_size]."""
    return t.float().repeat_interleave(group_size, dim=-1)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_symmetric_roundtrip_exact_on_codes_times_power_of_two_scale(fmt):
    qmax = int(get_spec(fmt).qmax)
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-qmax, qmax + 1, (8, 4, 32), generator=g)
    codes[..., 5] = qmax  # every group reaches qmax, so its min-max scale is exactly the chosen one
    scale = 2.0 ** torch.randint(-12, 4, (8, 4, 1), generator=g).float()
    x = (codes * scale).reshape(8, 128)

    q = formats.quantize(x, fmt, group_size=32)

    assert torch.equal(q.scale.float(), scale.squeeze(-1))
    assert torch.equal(q.codes, codes.reshape(8, 128).to(torch.int8))
    assert torch.equal(formats.dequantize(q), x)


def test_int4_asym_roundtrip_exact_on_grid_values():
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(-8, 8, (8, 4, 32), generator=g)
    codes[..., 0], codes[..., 1] = -8, 7  # each group spans the full code range ...
    zero_point = torch.randint(-8, 8, (8, 4, 1), generator=g)  # ... around any zero point
    scale = 2.0 ** torch.randint(-10, 2, (8, 4, 1), generator=g).float()
    x = ((codes - zero_point) * scale).reshape(8, 128)

    q = formats.quantize(x, "int4_asym", group_size=32)

    assert torch.equal(q.scale.float(), scale.squeeze(-1))
    assert torch.equal(q.zero_point, zero_point.squeeze(-1).to(torch.int8))
    assert torch.equal(q.codes, codes.reshape(8, 128).to(torch.int8))
    assert torch.equal(formats.dequantize(q), x)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("kwargs", [{}, {"group_size": 32}, {"per_tensor": True}])
def test_symmetric_error_at_most_half_a_step(fmt, kwargs):
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(2))
    q = formats.quantize(x, fmt, **kwargs)
    if q.per_tensor:
        step = q.scale.float()
    elif q.group_size:
        step = _expand(q.scale, q.group_size)
    else:
        step = q.scale.float()
    err = (x - formats.dequantize(q)).abs()
    # The bf16 scale of int4 is off by at most 2^-8 relative, so amax / scale <= 7.03: nothing clips.
    assert (err <= step / 2 * (1 + 1e-6)).all()


def test_int4_asym_error_at_most_half_a_step_where_unclipped():
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(3))
    q = formats.quantize(x, "int4_asym", group_size=32)
    step, zp = _expand(q.scale, 32), _expand(q.zero_point, 32)
    err = (x - formats.dequantize(q)).abs()
    real_code = x / step + zp
    unclipped = (real_code >= -8.5) & (real_code <= 7.5)

    assert unclipped.float().mean() > 0.999
    assert (err[unclipped] <= step[unclipped] / 2 * (1 + 1e-6)).all()
    # The rounded zero point shifts the grid by up to half a step and the bf16 scale (2^-8 relative
    # over 15 steps) by a little more, so a group's extreme value may clip by that much.
    assert (err <= step * (0.5 + 15 * 2.0**-8)).all()


def test_rounding_is_half_to_even():
    # amax 7 -> int4 scale exactly 1, so x / scale is x itself.
    x = torch.tensor([0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, 7.0])
    q = formats.quantize(x, "int4")
    assert q.codes.tolist() == [0, 2, 2, 4, 0, -2, -2, 7]


@pytest.mark.parametrize("fmt", ["int8", "int4", "int4_asym"])
def test_codes_clamp_to_the_code_range_when_amax_is_below_the_data(fmt):
    spec = get_spec(fmt)
    x = torch.tensor([[-1e30, -3.0, 0.0, 3.0, 1e30, 1.0, -1.0, 0.5]])
    q = formats.quantize(x, fmt, amax=torch.tensor([1.0]))
    values = formats.dequantize(q)
    assert q.codes.min().item() == spec.qmin and q.codes.max().item() == spec.qmax
    assert torch.isfinite(values).all()


def test_int8_scale_is_amax_over_127_in_float32():
    x = torch.tensor([[0.3, -2.54, 1.0, 0.0], [5.0, 1.0, -1.0, 0.25]])
    q = formats.quantize(x, "int8")
    assert q.scale.dtype == torch.float32
    assert torch.equal(q.scale, torch.tensor([[2.54], [5.0]]) / 127)


def test_int4_scale_is_amax_over_7_rounded_to_bf16():
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(4))
    q = formats.quantize(x, "int4", group_size=32)
    amax = x.reshape(4, 2, 32).abs().amax(-1)
    assert q.scale.dtype == torch.bfloat16
    assert torch.equal(q.scale, (amax / 7).to(torch.bfloat16))


def test_int4_asym_zero_is_exact_and_zero_points_in_code_range():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(32, 128, generator=g) + torch.randn(32, 1, generator=g) * 3  # off-centre rows
    x[:, ::7] = 0.0  # a zero in every group
    q = formats.quantize(x, "int4_asym", group_size=32)
    values = formats.dequantize(q)

    assert q.zero_point.dtype == torch.int8
    assert q.zero_point.min().item() >= -8 and q.zero_point.max().item() <= 7
    assert (values[:, ::7] == 0).all()


def test_int4_asym_range_widens_to_include_zero():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [-4.0, -3.0, -2.0, -1.0]])
    q = formats.quantize(x, "int4_asym")
    # An all-positive row starts at 0 (zero point -8), an all-negative one ends at 0 (zero point 7).
    assert q.zero_point.flatten().tolist() == [-8, 7]
    assert torch.equal(q.scale.float(), torch.tensor([[4 / 15], [4 / 15]]).to(torch.bfloat16).float())
