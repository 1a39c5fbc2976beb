"""Choosing a range: min-max, percentile and MSE search. Weight observers return ranges (amin, amax)
shaped like the scales ``quantlab.formats.quantize`` stores; ``formats`` turns them into scales. The
activation observer gives one batch's |x| range for a static activation scale."""

from __future__ import annotations

import torch

from . import formats
from .recipe.schema import ActivationScheme, WeightScheme

# Shrink factors of the min-max range tried by the MSE observer: 1.0 down to 0.5, denser near 1 where
# 8-bit formats find their optimum.
_MSE_FACTORS = tuple(1.0 - 0.5 * (i / 15) ** 2 for i in range(16))


def scheme_kwargs(scheme: WeightScheme) -> dict:
    """The ``formats.quantize`` granularity keywords for a weight scheme."""
    if scheme.granularity == "tensor":
        return {"per_tensor": True}
    if scheme.granularity == "group":
        return {"group_size": scheme.group_size}
    return {}


def _grouped(w: torch.Tensor, scheme: WeightScheme) -> torch.Tensor:
    return formats.grouped(w, **scheme_kwargs(scheme))


def minmax(w: torch.Tensor, scheme: WeightScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group minimum and maximum."""
    g = _grouped(w.float(), scheme)
    return g.amin(-1), g.amax(-1)


def _percentile(w: torch.Tensor, scheme: WeightScheme) -> tuple[torch.Tensor, torch.Tensor]:
    g = _grouped(w.float(), scheme)
    q = scheme.percentile / 100.0
    return torch.quantile(g, 1.0 - q, dim=-1), torch.quantile(g, q, dim=-1)


def _mse(w: torch.Tensor, scheme: WeightScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, the shrink factor of the min-max range with the least squared rounding error."""
    lo, hi = minmax(w, scheme)
    kwargs = scheme_kwargs(scheme)
    g = _grouped(w.float(), scheme)
    best_err = torch.full_like(lo, float("inf"))  # on w's device
    best_lo, best_hi = lo.clone(), hi.clone()
    # nvfp4's global scale stays the min-max one, so shrinking changes only block scales.
    extra = {"global_amax": w.abs().max()} if scheme.format == "nvfp4" else {}
    # An E8M0 scale moves in powers of two, so the only other candidate is one exponent lower (more
    # saturation, finer steps). One higher never wins: its grid is a subset of min-max's below 7 * scale,
    # and blocks with larger maxima already get it from the exponent rule (formats/fp4.py).
    factors = (1.0, 0.5) if scheme.format == "mxfp4" else _MSE_FACTORS
    for f in factors:
        qd = formats.quantize_dequantize(w.float(), scheme.format, amax=hi * f, amin=lo * f, **kwargs, **extra)
        err = (_grouped(qd, scheme) - g).pow(2).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo, best_hi = torch.where(better, lo * f, best_lo), torch.where(better, hi * f, best_hi)
    return best_lo, best_hi


OBSERVERS = {"minmax": minmax, "percentile": _percentile, "mse": _mse}


def clamp_to_ranges(w: torch.Tensor, scheme: WeightScheme, amin: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """``w`` clamped to per-scale-entry ranges shaped as the observers return them (a clipping that the
    rounder's own observer then sees)."""
    g = _grouped(w, scheme)
    return torch.clamp(g, amin.unsqueeze(-1), amax.unsqueeze(-1)).reshape(w.shape)


def weight_range(w: torch.Tensor, scheme: WeightScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """(amin, amax) per scale entry of ``w`` under ``scheme``, chosen by the scheme's observer."""
    return OBSERVERS[scheme.observer](w, scheme)


def quantize_weight(w: torch.Tensor, scheme: WeightScheme, amin: torch.Tensor | None = None,
                    amax: torch.Tensor | None = None, global_amax: torch.Tensor | None = None) -> formats.QTensor:
    """Quantize a weight ``[out, in]`` per its scheme; the range defaults to the scheme's observer.

    nvfp4's global scale always comes from the whole original tensor (``global_amax`` defaults to
    max|w|), so block-scale searches and GPTQ's column updates never move it.
    """
    if amax is None:
        amin, amax = weight_range(w, scheme)
    if scheme.format == "nvfp4" and global_amax is None:
        global_amax = w.detach().abs().max()
    extra = {"global_amax": global_amax} if scheme.format == "nvfp4" else {}
    return formats.quantize(w, scheme.format, amax=amax, amin=amin, **scheme_kwargs(scheme), **extra)


def activation_amax(x: torch.Tensor, act: ActivationScheme) -> torch.Tensor:
    """One batch's |x| range (float32 scalar) under the activation scheme's observer: the maximum
    (``minmax``) or the ``percentile``-th percentile of |x|. Calibration keeps the largest over batches."""
    a = x.detach().abs().float()
    if act.observer != "percentile":
        return a.amax()
    # torch.quantile refuses inputs above 2**24 elements; a strided subsample keeps it exact enough.
    flat = a.flatten()[:: max(1, a.numel() // 2**24 + 1)]
    return torch.quantile(flat, act.percentile / 100.0)
