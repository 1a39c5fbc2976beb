"""SmoothQuant scales flatten activation outliers and lower the W8A8 output error."""

import pytest
import torch
from torch import nn

from quantlab import formats
from quantlab.algorithms.smoothquant import (fold_scales, quantized_output_error, search_alpha,
                                             smoothing_scales)
from quantlab.recipe.schema import ActivationScheme, WeightScheme

W8 = WeightScheme("int8", "channel")
A8_TOKEN = ActivationScheme("int8", "token", dynamic=True)
A8_TENSOR = ActivationScheme("int8", "tensor", dynamic=False)
OUTLIERS = [3, 17, 40]


def _group(seed: int = 0, tokens: int = 128, hidden: int = 64):
    """Inputs with a few outlier channels (x50, as in LLM activations) and two linears reading them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    x[:, OUTLIERS] *= 50.0
    weights = [torch.randn(48, hidden, generator=g) * 0.05, torch.randn(32, hidden, generator=g) * 0.05]
    return x, weights


def _channel_range_ratio(x: torch.Tensor) -> float:
    absmax = x.abs().amax(0)
    return (absmax.max() / absmax.min()).item()


def test_smoothing_flattens_activation_channel_ranges():
    x, weights = _group()
    s = smoothing_scales(x.abs().amax(0), weights, alpha=0.5)
    assert s.dtype == torch.float32 and s.shape == (64,)
    assert _channel_range_ratio(x / s) < 0.25 * _channel_range_ratio(x)


def test_smoothing_scales_stay_positive_on_zero_channels():
    x, weights = _group()
    x[:, 5] = 0.0
    weights[0][:, 9] = 0.0
    weights[1][:, 9] = 0.0
    s = smoothing_scales(x.abs().amax(0), weights, alpha=0.5)
    assert torch.isfinite(s).all() and (s >= 1e-5).all()


@pytest.mark.parametrize("act_scheme", [A8_TOKEN, A8_TENSOR], ids=["token", "tensor"])
def test_w8a8_error_with_alpha_half_below_no_smoothing(act_scheme):
    x, weights = _group()
    absmax = x.abs().amax(0)
    smoothed = quantized_output_error(x, weights, smoothing_scales(absmax, weights, 0.5), W8, act_scheme)
    unsmoothed = quantized_output_error(x, weights, torch.ones(64), W8, act_scheme)
    alpha_zero = quantized_output_error(x, weights, smoothing_scales(absmax, weights, 0.0), W8, act_scheme)
    assert smoothed < 0.5 * unsmoothed
    assert smoothed < 0.5 * alpha_zero


def _brute_force_error(x, weights, s):
    """The search objective written out with formats alone: per-token int8 acts, per-channel int8 weights."""
    xq = formats.quantize_dequantize(x / s, "int8")
    return sum((x @ w.T - xq @ formats.quantize_dequantize(w * s, "int8").T).pow(2).sum().item() for w in weights)


@pytest.mark.parametrize("seed", [0, 1])
def test_alpha_search_returns_grid_argmin(seed):
    x, weights = _group(seed)
    absmax = x.abs().amax(0)
    grid = (0.0, 0.3, 0.5, 0.7, 0.9)
    best, losses = search_alpha(x, weights, absmax, W8, A8_TOKEN, grid)
    brute = {a: _brute_force_error(x, weights, smoothing_scales(absmax, weights, a)) for a in grid}
    assert set(losses) == set(grid)
    for a in grid:
        assert losses[a] == pytest.approx(brute[a], rel=1e-4)
    assert best == min(grid, key=brute.get)


def test_folded_smoothing_keeps_float_output():
    x, weights = _group()
    norm = nn.LayerNorm(64)
    linears = [nn.Linear(64, w.shape[0]) for w in weights]
    with torch.no_grad():
        for lin, w in zip(linears, weights):
            lin.weight.copy_(w)
    before = [lin(norm(x)) for lin in linears]
    fold_scales(norm, linears, smoothing_scales(norm(x).abs().amax(0), weights, 0.5))
    for lin, ref in zip(linears, before):
        assert (lin(norm(x)) - ref).abs().max() <= 1e-5 * ref.abs().max()
