"""Folding per-channel scales into a model: the one place SmoothQuant and AWQ change weights.

Both transforms rewrite ``y = L(prev(x))`` as ``y = (L · diag(s)) (diag(1/s) · prev(x))``: the previous
op's output channels are divided by ``s`` and the consuming linears' input columns are multiplied by
it, so the float function is unchanged while the quantizer sees different tensors.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def fold_scales(prev: nn.Module, linears: list[nn.Linear], scales: torch.Tensor) -> None:
    """Divide ``prev``'s output channels by ``scales`` and multiply the linears' input columns by them.

    The arithmetic is done in float32 and each parameter is rounded once back to its own dtype.

    Args:
        prev: the op producing the linears' input. Either a norm whose output is ``weight * normed(x)
            (+ bias)`` (LayerNorm, LlamaRMSNorm: ``weight`` [in]), or a Linear whose output rows feed
            the linears (``weight`` [in, k], ``bias`` [in]). Both scale dimension 0 of ``weight`` and the
            bias. Norms parametrized as ``(1 + weight)`` (Gemma) cannot be folded this way.
        linears: the Linears consuming ``prev``'s output, ``weight`` [out_i, in] each.
        scales: [in], positive.
    """
    s = scales.detach().float().reshape(-1)
    assert bool((s > 0).all()) and bool(torch.isfinite(s).all()), "fold_scales needs positive, finite scales"
    weight = getattr(prev, "weight", None)
    assert weight is not None and weight.shape[0] == s.numel(), (
        f"{type(prev).__name__} has no weight with {s.numel()} output channels to fold scales into")
    weight.copy_((weight.float() / s.view(-1, *[1] * (weight.dim() - 1))).to(weight.dtype))
    bias = getattr(prev, "bias", None)
    if bias is not None:
        bias.copy_((bias.float() / s).to(bias.dtype))
    for linear in linears:
        assert linear.weight.shape[1] == s.numel(), (
            f"a consuming Linear has {linear.weight.shape[1]} input features, scales have {s.numel()}")
        linear.weight.copy_((linear.weight.float() * s).to(linear.weight.dtype))
