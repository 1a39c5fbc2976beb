"""SmoothQuant (Xiao et al. 2023): migrate activation outliers into weights with per-channel scales.

For a group of linears reading the same input X (q/k/v after the attention norm, gate/up after the MLP
norm), ``s_j = max|X_j|^alpha / max_i max|W_i[:, j]|^(1 - alpha)``; X is divided by s (folded into the
previous op) and every W_i multiplied by it (``quantlab.algorithms.folding.fold_scales``). Channels with
outliers get large s, which flattens X's per-channel range at the cost of W's, so both quantize well
at 8 bits.
"""

from __future__ import annotations

import torch

from .. import formats, observers
from ..fake_quant import activation_kwargs, activation_scales
from ..recipe.schema import ActivationScheme, WeightScheme
from ..recipe.stages import SmoothQuantParams
from .folding import fold_scales

__all__ = ["SmoothQuantParams", "fold_scales", "quantized_output_error", "search_alpha", "smoothing_scales"]

# The reference implementation's floor (smoothquant/smooth.py): keeps s and 1/s finite for channels
# whose activations or weights are all zero.
_MIN_SCALE = 1e-5


def smoothing_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """Per-input-channel smoothing scales of one group of linears.

    Args:
        act_absmax: [in], max |X_j| over the calibration tokens.
        weights: the group's weights, [out_i, in] each; the weight range of channel j is the max over
            all of them, since one s must serve every linear reading X.
        alpha: migration strength; 0 puts everything on the weights, 1 on the activations.

    Returns:
        float32 [in], at least 1e-5.
    """
    w_absmax = torch.stack([w.detach().abs().float().amax(0) for w in weights]).amax(0).clamp(min=_MIN_SCALE)
    scales = act_absmax.detach().float().pow(alpha) / w_absmax.pow(1 - alpha)
    return scales.clamp(min=_MIN_SCALE)


def _quantize_acts(x: torch.Tensor, scheme: ActivationScheme) -> torch.Tensor:
    """Simulated run-time activation quantization of ``x`` [tokens, in], as ``QuantLinear`` does it; a
    static range is the min-max of ``x`` itself, i.e. what calibration on this data would store."""
    return formats.quantize_dequantize(x, scheme.format, **activation_kwargs(scheme, *activation_scales(scheme, x.abs().amax())))


def quantized_output_error(x: torch.Tensor, weights: list[torch.Tensor], scales: torch.Tensor,
                           weight_scheme: WeightScheme, act_scheme: ActivationScheme | None) -> float:
    """``sum_i ||X W_i^T - Q(X / s) Q(W_i s)^T||^2``: the group's output error after smoothing by ``s``.

    Args:
        x: [tokens, in] (or [..., in]) calibration inputs to the group, before smoothing.
        weights: [out_i, in] each, before smoothing.
        scales: [in] smoothing scales (ones = no smoothing).
        weight_scheme: quantized with its observer through ``observers.quantize_weight``.
        act_scheme: activation quantization, or None to leave activations in float.
    """
    x = x.detach().float().reshape(-1, x.shape[-1])
    s = scales.detach().float()
    xs = x / s
    xq = xs if act_scheme is None else _quantize_acts(xs, act_scheme)
    err = 0.0
    for w in weights:
        w = w.detach().float()
        wq = formats.dequantize(observers.quantize_weight(w * s, weight_scheme))
        err += (x @ w.T - xq @ wq.T).pow(2).sum().item()
    return err


def search_alpha(x: torch.Tensor, weights: list[torch.Tensor], act_absmax: torch.Tensor,
                 weight_scheme: WeightScheme, act_scheme: ActivationScheme | None,
                 grid: tuple[float, ...]) -> tuple[float, dict[float, float]]:
    """The alpha of ``grid`` whose smoothing scales give the least ``quantized_output_error``.

    Args:
        x: [tokens, in] calibration inputs to the group (a subsample is enough; cost is one quantized
            matmul per linear per candidate).
        weights: the group's weights, [out_i, in] each.
        act_absmax: [in] max |X_j| over all calibration tokens (the same statistic the final scales
            use, which may cover more tokens than ``x``).
        weight_scheme, act_scheme: the schemes the group will be quantized with.
        grid: candidate alphas; ties go to the earlier one.

    Returns:
        (best alpha, {alpha: error} for every candidate).
    """
    losses = {a: quantized_output_error(x, weights, smoothing_scales(act_absmax, weights, a),
                                        weight_scheme, act_scheme) for a in grid}
    best = min(grid, key=lambda a: losses[a])
    return best, losses


def apply(ctx, params: SmoothQuantParams) -> None:
    """Pipeline adapter: smooth every foldable group of the layer (norm -> qkv, norm -> gate/up,
    up -> down, and v -> o without grouped-query attention), in place.

    Scales come from the group's inputs over the whole calibration set; with ``alpha_search`` the alpha
    of each group minimizes its quantized output error under the group's scheme.
    """
    inputs = ctx.capture_inputs([m.linears[0] for m in ctx.mappings])
    for m in ctx.mappings:
        x = inputs[m.linears[0]]
        linears = [ctx.targets[n] for n in m.linears]
        weights = [lin.weight.detach().float() for lin in linears]
        act_absmax = x.abs().amax(0)
        group = ctx.schemes[m.linears[0]]
        alpha = params.alpha
        if params.alpha_search and group.activations is not None:
            alpha, _ = search_alpha(x, weights, act_absmax, group.weights, group.activations, params.alpha_grid)
            ctx.note(f"smoothquant alpha {alpha:.2f} for {m.prev}")
        fold_scales(ctx.layer.get_submodule(m.prev), linears, smoothing_scales(act_absmax, weights, alpha))
