"""AWQ (Lin et al. 2024): activation-aware per-input-channel scales, then weight clipping search.

Input channels that carry large activations matter most to the output, so AWQ multiplies their weight
columns by s > 1 before rounding (less relative rounding error) and divides the activations by s (folded
into the previous op, ``quantlab.algorithms.folding.fold_scales``). s is found by a grid search on the
calibration inputs, following AutoAWQ's ``_search_best_scale``; a per-group clipping ratio is then
searched as in AutoAWQ's ``_compute_best_clip``. Both searches quantize through ``observers`` and
``formats``, so they work for every weight scheme (int4 groups, int8 channels, nvfp4/mxfp4 blocks).
"""

from __future__ import annotations

import torch

from .. import formats, observers
from ..recipe.schema import WeightScheme
from ..recipe.stages import AWQParams
from .folding import fold_scales

__all__ = ["AWQParams", "fold_scales", "search_clip", "search_scales"]


def _row_groups(t: torch.Tensor, scheme: WeightScheme) -> torch.Tensor:
    """``t`` [rows, in] as [rows, groups, group_len] along the scheme's input-dimension groups (one group
    per row for channel and tensor granularity)."""
    return formats.grouped(t, scheme.group_size if scheme.granularity == "group" else None)


def _fake_quant(w: torch.Tensor, scheme: WeightScheme, **kwargs) -> torch.Tensor:
    return formats.dequantize(observers.quantize_weight(w, scheme, **kwargs))


def _weight_mean(weights: list[torch.Tensor], scheme: WeightScheme) -> torch.Tensor:
    """AutoAWQ's w_mean: mean over output rows of |W| normalized to [0, 1] within each quant group."""
    w = torch.cat(weights).abs()
    g = formats.grouped(w, **observers.scheme_kwargs(scheme))
    return (g / (g.amax(-1, keepdim=True) + 1e-6)).reshape(w.shape).mean(0)


def _candidate_scales(x_mean: torch.Tensor, w_mean: torch.Tensor | None, ratio: float) -> torch.Tensor:
    """AutoAWQ's scales for one grid ratio, normalized so that max * min = 1."""
    if w_mean is None:
        s = x_mean.pow(ratio).clamp(min=1e-4)
    else:
        s = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
    s = s / (s.max() * s.min()).sqrt()
    return torch.where(torch.isfinite(s), s, torch.ones_like(s))


def _gram(x: torch.Tensor) -> torch.Tensor:
    """``x^T x / tokens`` for x [tokens, in]: every output-error objective below is a quadratic form in it."""
    return (x.T @ x) / x.shape[0]


@torch.no_grad()
def search_scales(x: torch.Tensor, weights: list[torch.Tensor], weight_scheme: WeightScheme,
                  params: AWQParams) -> tuple[torch.Tensor, dict]:
    """Per-input-channel scales for a group of linears reading the same input.

    For ratio in {0, 1/grid, ..., (grid-1)/grid}, ``s = x_mean^ratio / w_mean^(1 - ratio)``
    (``duo_scaling``) or ``s = x_mean^ratio``, where x_mean is mean |x| per input channel and w_mean is
    ``_weight_mean``. Each candidate is scored by the mean squared error, over tokens and the group's
    concatenated outputs, between ``x W^T`` and ``x (Q(W s) / s)^T`` (the float equivalent of folding s
    and quantizing). That error is ``sum_o d_o^T G d_o / outputs`` with ``d = Q(W s) / s - W`` and
    ``G = x^T x / tokens``, which is how it is computed: [out, in] x [in, in] per candidate instead of
    [tokens, in] x [in, out]. ``s = 1`` is scored too, so the result is never worse than no scaling on
    this objective (with ``duo_scaling`` ratio 0 means ``s = 1 / w_mean``, not 1).

    Args:
        x: [tokens, in] (or [..., in]) calibration inputs to the group, float.
        weights: the group's weights, [out_i, in] each (q/k/v, or gate/up, ...).
        weight_scheme: the scheme the weights will be rounded with; quantized with its observer.
        params: ``grid`` and ``duo_scaling`` are used.

    Returns:
        (scales float32 [in], info) where info has ``ratio`` (the grid ratio of the returned scales, or
        None when s = 1 won), ``loss`` (theirs), ``loss_unscaled`` (s = 1) and ``losses``
        ({ratio: loss} over the grid).
    """
    x = x.detach().float().reshape(-1, x.shape[-1])
    ws = [w.detach().float() for w in weights]
    gram = _gram(x)
    num_out = sum(w.shape[0] for w in ws)

    def loss_of(s: torch.Tensor) -> float:
        d = torch.cat([_fake_quant(w * s, weight_scheme) / s - w for w in ws])
        return float(((d @ gram) * d).sum() / num_out)

    x_mean = x.abs().mean(0)
    w_mean = _weight_mean(ws, weight_scheme) if params.duo_scaling else None
    best_scales = torch.ones_like(x_mean)
    best_ratio, best_loss = None, loss_of(best_scales)
    loss_unscaled, losses = best_loss, {}
    for i in range(params.grid):
        ratio = i / params.grid
        s = _candidate_scales(x_mean, w_mean, ratio)
        losses[ratio] = loss_of(s)
        if losses[ratio] < best_loss:
            best_scales, best_ratio, best_loss = s, ratio, losses[ratio]
    return best_scales, {"ratio": best_ratio, "loss": best_loss, "loss_unscaled": loss_unscaled, "losses": losses}


def _group_output_error(group_grams: torch.Tensor, dg: torch.Tensor) -> torch.Tensor:
    """``mean_t (x_g . diff_{o,g})^2`` per output row o and group g, [out, groups], from the groups'
    Gram blocks [groups, group_len, group_len] and the grouped difference [out, groups, group_len]:
    ``diff_{o,g}^T G_g diff_{o,g}``."""
    return (torch.einsum("ogk,gkl->ogl", dg, group_grams) * dg).sum(-1)


@torch.no_grad()
def search_clip(x: torch.Tensor, weight: torch.Tensor, weight_scheme: WeightScheme, params: AWQParams,
                max_tokens: int = 512, global_amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-scale-entry clipping ranges minimizing each group's output error (AutoAWQ's clip search).

    Each group's min-max range is shrunk by ratios ``linspace(1, max_shrink, clip_grid)`` and the ratio
    with the least ``mean_t (x_g . (w_g - Q(c_g)))^2`` is kept per group, where ``c`` is ``w`` clamped
    to the shrunk range and ``Q`` is the scheme's own rounding (its observer), exactly what ``apply``
    and the rounder do afterwards, as in AutoAWQ. (Quantizing the unclamped ``w`` with the shrunk
    range instead would score a different grid for symmetric integers, whose extra negative code
    reaches ``-(qmax + 1) * scale`` beyond the clamp.) AutoAWQ steps by 1/n_grid and stops short of
    max_shrink; here ``clip_grid`` counts the ratios, as ``AWQParams`` says. Ratio 1 is tried first
    and kept on ties, so no group is worse than no clipping on this objective. With tensor
    granularity there is one range and the error is summed over all groups. nvfp4's global scale is
    held at ``global_amax`` for every candidate: its FP8 block scales round coarsely, so a global scale
    that followed the clipping would move every block's rounding and make groups' choices interact.

    Args:
        x: [tokens, in] inputs of this linear as it will see them (after any scale folding).
        weight: [out, in], after scale folding.
        weight_scheme: the scheme it will be rounded with, observer included.
        params: ``clip_grid`` and ``max_shrink`` are used.
        max_tokens: tokens used, taken at an even stride as AutoAWQ does (n_sample_token).
        global_amax: nvfp4 only: the amax behind the global scale the weight will be rounded with
            (default max|weight|, before clipping; ``LayerContext.global_amax`` for a fused shard).

    Returns:
        (amin, amax) float32, shaped like ``observers.minmax``'s output: the per-group range to clamp the
        weight to (``observers.clamp_to_ranges``) before rounding. Symmetric formats get amin = -amax.
    """
    w = weight.detach().float()
    x = x.detach().float().reshape(-1, x.shape[-1])
    x = x[::max(1, x.shape[0] // max_tokens)][:max_tokens]
    xg = _row_groups(x, weight_scheme)
    group_grams = torch.einsum("tgk,tgl->gkl", xg, xg) / x.shape[0]
    lo, hi = observers.minmax(w, weight_scheme)
    if formats.get_spec(weight_scheme.format).symmetric:
        hi = torch.maximum(lo.abs(), hi.abs())
        lo = -hi
    fixed = {"global_amax": w.abs().max() if global_amax is None else global_amax} if weight_scheme.format == "nvfp4" else {}
    best_lo, best_hi = lo.clone(), hi.clone()
    best_err = torch.full_like(hi, float("inf"))
    for ratio in torch.linspace(1.0, params.max_shrink, max(1, params.clip_grid)).tolist():
        diff = w - _fake_quant(observers.clamp_to_ranges(w, weight_scheme, lo * ratio, hi * ratio), weight_scheme, **fixed)
        err = _group_output_error(group_grams, _row_groups(diff, weight_scheme))
        err = err.sum().reshape(1) if weight_scheme.granularity == "tensor" else err.reshape(hi.shape)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, lo * ratio, best_lo)
        best_hi = torch.where(better, hi * ratio, best_hi)
    return best_lo, best_hi


# AutoAWQ does not clip q/k: their errors pass through softmax, which the per-Linear objective misjudges.
_NO_CLIP = ("q_proj", "k_proj")


def apply(ctx, params: AWQParams) -> None:
    """Pipeline adapter: search and fold activation-aware scales for each foldable group of the layer,
    then (``clip_search``) clamp each Linear's weights to its searched per-group range, which is what the
    rounder then rounds."""
    inputs = ctx.capture_inputs([m.linears[0] for m in ctx.mappings])
    for m in ctx.mappings:
        linears = [ctx.targets[n] for n in m.linears]
        weights = [lin.weight.detach().float() for lin in linears]
        scales, _ = search_scales(inputs[m.linears[0]], weights, ctx.schemes[m.linears[0]].weights, params)
        fold_scales(ctx.layer.get_submodule(m.prev), linears, scales)
    if not params.clip_search:
        return
    names = [n for n in ctx.targets if not n.endswith(_NO_CLIP)]
    inputs = ctx.capture_inputs(names)  # after folding: the scaled inputs the quantized weights will see
    ctx.pin_global_amaxes()
    for n in names:
        lin, scheme = ctx.targets[n], ctx.schemes[n].weights
        w = lin.weight.detach().float()
        amin, amax = search_clip(inputs[n], w, scheme, params, global_amax=ctx.global_amax(n))
        lin.weight.data.copy_(observers.clamp_to_ranges(w, scheme, amin, amax).to(lin.weight.dtype))
