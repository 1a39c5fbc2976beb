"""Observers choose ranges: min-max, percentile (clips outliers) and MSE search (never worse than min-max)."""

import pytest
import torch

from quantlab import formats, observers
from quantlab.recipe.schema import WeightScheme

SCHEMES = [
    WeightScheme("int8", "channel"),
    WeightScheme("int4", "group", 32),
    WeightScheme("int4_asym", "group", 32),
    WeightScheme("int4", "tensor"),
    WeightScheme("fp8_e4m3", "channel"),
    WeightScheme("nvfp4", "group", 16),
    WeightScheme("mxfp4", "group", 32),
]


def _weight(seed=0, rows=16, cols=128):
    g = torch.Generator().manual_seed(seed)
    # Heavy-ish tails (Student-t-like), where shrinking the range pays off.
    return torch.randn(rows, cols, generator=g) / torch.rand(rows, cols, generator=g).add(0.3).sqrt()


def _group_sq_error(w: torch.Tensor, q: formats.QTensor, scheme: WeightScheme) -> torch.Tensor:
    err = (formats.dequantize(q) - w).pow(2)
    return observers._grouped(err, scheme).sum(-1)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: f"{s.format}-{s.granularity}")
def test_mse_error_never_above_minmax_per_group(scheme):
    w = _weight()
    minmax = observers.quantize_weight(w, WeightScheme(scheme.format, scheme.granularity, scheme.group_size, "minmax"))
    mse = observers.quantize_weight(w, WeightScheme(scheme.format, scheme.granularity, scheme.group_size, "mse"))
    mse_err, minmax_err = _group_sq_error(w, mse, scheme), _group_sq_error(w, minmax, scheme)
    assert (mse_err <= minmax_err).all()
    assert mse_err.sum() < minmax_err.sum()  # the search finds something on heavy-tailed data


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: f"{s.format}-{s.granularity}")
def test_ranges_are_shaped_like_scales(scheme):
    w = _weight()
    q = formats.quantize(w, scheme.format, **observers.scheme_kwargs(scheme))
    for name in ("minmax", "mse", "percentile"):
        lo, hi = observers.weight_range(w, WeightScheme(scheme.format, scheme.granularity, scheme.group_size, name))
        assert lo.shape == hi.shape == q.scale.shape[: lo.ndim] and lo.numel() == q.scale.numel()
        assert (lo <= hi).all()


def test_minmax_returns_group_extremes():
    w = _weight()
    lo, hi = observers.minmax(w, WeightScheme("int4", "group", 32))
    assert torch.equal(lo, w.reshape(16, 4, 32).amin(-1)) and torch.equal(hi, w.reshape(16, 4, 32).amax(-1))


def test_percentile_clips_outliers():
    w = _weight()
    w[3, 5], w[7, 90] = 500.0, -500.0
    scheme = WeightScheme("int8", "channel", observer="percentile", percentile=99.0)
    lo, hi = observers.weight_range(w, scheme)
    assert torch.allclose(hi, torch.quantile(w, 0.99, dim=-1, keepdim=True))
    assert torch.allclose(lo, torch.quantile(w, 0.01, dim=-1, keepdim=True))
    values = formats.dequantize(observers.quantize_weight(w, scheme))
    # The outliers saturate at the percentile range instead of stretching their rows' scales.
    assert values[3, 5] < 50 and values[7, 90] > -50
    # Symmetric int8 maps amax to code 127; code -128 reaches 128/127 of it on the negative side.
    assert (values.abs() <= torch.maximum(lo.abs(), hi.abs()) * 128 / 127 * (1 + 1e-6)).all()


def test_mxfp4_mse_picks_the_halved_scale_when_it_lowers_error():
    # amax 7.5 rounds up to exponent 1 (scale 2): 7.5 -> 8 but every 1.5 -> 2 (31 errors of 0.5). The
    # halved scale 1 saturates 7.5 to 6 (one error of 1.5) and keeps every 1.5 exact: the better choice.
    w = torch.full((1, 32), 1.5)
    w[0, ::2] = -1.5
    w[0, 0] = 7.5
    scheme = WeightScheme("mxfp4", "group", 32, observer="mse")
    lo, hi = observers.weight_range(w, scheme)
    assert hi.item() == pytest.approx(7.5 * 0.5)
    q = observers.quantize_weight(w, scheme)
    assert q.scale.item() == 127  # 2^0
    minmax = formats.quantize(w, "mxfp4")
    assert minmax.scale.item() == 128
    assert (formats.dequantize(q) - w).pow(2).sum() < (formats.dequantize(minmax) - w).pow(2).sum()


def test_nvfp4_mse_keeps_the_minmax_global_scale():
    w = _weight()
    q = observers.quantize_weight(w, WeightScheme("nvfp4", "group", 16, observer="mse"))
    assert q.global_scale.item() == (torch.tensor(2688.0) / w.abs().max()).item()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fmt, group_size", [("int4", 32), ("nvfp4", 16), ("mxfp4", 32)])
def test_mse_observer_runs_on_the_weight_device(fmt, group_size):
    w = _weight().cuda()
    scheme = WeightScheme(fmt, "group", group_size, observer="mse")
    mse = observers.quantize_weight(w, scheme)
    minmax = observers.quantize_weight(w, WeightScheme(fmt, "group", group_size))
    assert mse.scale.is_cuda
    assert (_group_sq_error(w, mse, scheme) <= _group_sq_error(w, minmax, scheme)).all()
