"""AWQ's scale and clip searches never lose to their baselines and beat RTN on salient channels."""

import pytest
import torch

from quantlab import formats, observers
from quantlab.algorithms.awq import AWQParams, search_clip, search_scales
from quantlab.recipe.schema import WeightScheme

INT4_G32 = WeightScheme("int4", "group", 32)
SALIENT = [5, 37, 70, 101]


def _group(seed: int, tokens: int = 128, hidden: int = 128, salient: bool = True):
    """Inputs with a few high-magnitude (salient) channels and two linears reading them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    if salient:
        x[:, SALIENT] *= 20.0
    weights = [torch.randn(64, hidden, generator=g) * 0.05, torch.randn(32, hidden, generator=g) * 0.05]
    return x, weights


def _scaled_output_mse(x, weights, s, scheme):
    """The search objective, written out: output of Q(W s) / s against W, over the concatenated outputs."""
    ref = torch.cat([x @ w.T for w in weights], -1)
    out = torch.cat([x @ (formats.dequantize(observers.quantize_weight(w * s, scheme)) / s).T for w in weights], -1)
    return (out - ref).pow(2).mean().item()


@pytest.mark.parametrize("duo_scaling", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_scales_never_worse_than_unit_scales(seed, duo_scaling):
    x, weights = _group(seed, salient=seed % 2 == 0)
    params = AWQParams(grid=10, duo_scaling=duo_scaling)
    s, info = search_scales(x, weights, INT4_G32, params)
    assert s.shape == (128,) and s.dtype == torch.float32 and (s > 0).all()
    assert info["loss"] <= info["loss_unscaled"]
    assert info["loss"] == min([info["loss_unscaled"], *info["losses"].values()])
    unscaled = _scaled_output_mse(x, weights, torch.ones(128), INT4_G32)
    assert _scaled_output_mse(x, weights, s, INT4_G32) <= unscaled * (1 + 1e-6)


def test_awq_int4_g32_error_clearly_below_rtn_on_salient_channels():
    x, weights = _group(0)
    s, info = search_scales(x, weights, INT4_G32, AWQParams())
    awq, rtn = _scaled_output_mse(x, weights, s, INT4_G32), _scaled_output_mse(x, weights, torch.ones(128), INT4_G32)
    assert info["ratio"] is not None
    assert awq < 0.6 * rtn, f"awq {awq:.4g} vs rtn {rtn:.4g}"


def test_scale_losses_equal_the_output_mse_written_out():
    x, weights = _group(3)
    s, info = search_scales(x, weights, INT4_G32, AWQParams(grid=4))
    assert info["loss_unscaled"] == pytest.approx(_scaled_output_mse(x, weights, torch.ones(128), INT4_G32), rel=1e-4)
    assert info["loss"] == pytest.approx(_scaled_output_mse(x, weights, s, INT4_G32), rel=1e-4)


def _applied_errors(x, w, scheme, amin=None, amax=None):
    """Per-scale-entry output error mean_t (x_g . (w_g - Q(c_g)))^2, flattened, where c is w clamped to
    [amin, amax] (unclamped when None) and Q the scheme's own rounding, nvfp4's global scale held at the
    unclipped weight's: clipping as AWQ applies it."""
    c = w if amin is None else observers.clamp_to_ranges(w, scheme, amin, amax)
    diff = w - formats.dequantize(observers.quantize_weight(c, scheme, global_amax=w.abs().max()))
    glen = scheme.group_size if scheme.granularity == "group" else w.shape[1]
    xg, dg = x.reshape(x.shape[0], -1, glen), diff.reshape(w.shape[0], -1, glen)
    return torch.einsum("tgk,ogk->otg", xg, dg).pow(2).mean(1).flatten()


CLIP_SCHEMES = [INT4_G32, WeightScheme("int4_asym", "group", 32), WeightScheme("int8", "channel"),
                WeightScheme("nvfp4", "group", 16)]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("scheme", CLIP_SCHEMES, ids=["int4", "int4_asym", "int8_channel", "nvfp4"])
def test_applied_clip_never_worse_than_no_clip_and_within_shrink_bounds(scheme, seed):
    x, weights = _group(seed)
    w = weights[0]
    params = AWQParams(clip_grid=8, max_shrink=0.5)
    amin, amax = search_clip(x, w, scheme, params)
    lo, hi = observers.minmax(w, scheme)
    if formats.get_spec(scheme.format).symmetric:
        hi = torch.maximum(lo.abs(), hi.abs())
        lo = -hi
        assert torch.equal(amin, -amax)
    assert amax.shape == hi.shape and amin.shape == lo.shape
    tol = 1e-6
    assert (amax <= hi + tol).all() and (amax >= params.max_shrink * hi - tol).all()
    assert (amin >= lo - tol).all() and (amin <= params.max_shrink * lo + tol).all()
    clipped, unclipped = _applied_errors(x, w, scheme, amin, amax), _applied_errors(x, w, scheme)
    assert (clipped <= unclipped * (1 + 1e-5) + 1e-12).all()
    assert clipped.sum() < unclipped.sum()  # some group actually gains from clipping
