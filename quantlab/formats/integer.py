"""Integer formats: INT8 and INT4, symmetric or asymmetric (zero point), with a float scale.

Symmetric: scale = amax / qmax, code = clamp(round(x / scale), qmin, qmax), x' = code * scale.
Asymmetric: the range is widened to include 0 (so 0 is exact, as kernels assume), scale =
(hi - lo) / (qmax - qmin), zero_point = clamp(round(qmin - lo / scale), qmin, qmax),
code = clamp(round(x / scale) + zero_point, qmin, qmax), x' = (code - zero_point) * scale.
This is the compressed-tensors convention (signed codes, signed zero point), so its decompressor and
vLLM read our codes unchanged. Rounding is round-half-to-even (torch.round).
"""

from __future__ import annotations

import torch

from .spec import FormatSpec


def exact_div(x: torch.Tensor, c: float) -> torch.Tensor:
    """``x / c`` correctly rounded on every device.

    On CUDA, PyTorch divides by a Python number as a multiplication by its rounded reciprocal (one ulp off
    for divisors like 6 or 448), while the CPU divides; a divisor tensor on ``x``'s device gets a true
    division everywhere, which the kernels' IEEE divisions (``tl.div_rn``) reproduce bit for bit.
    """
    return x / torch.full((), c, dtype=x.dtype, device=x.device)


def store_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round a float32 scale to its storage dtype, replacing 0 by the dtype's smallest normal number.

    A zero scale only arises for an all-zero group; any positive scale encodes it exactly.
    """
    stored = scale.to(dtype)
    tiny = torch.finfo(dtype).tiny
    return torch.where(stored == 0, torch.full_like(stored, tiny), stored)


def qparams(lo: torch.Tensor, hi: torch.Tensor, spec: FormatSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (in ``spec.scale_dtype``) and zero point (int8, or None if symmetric) from a range."""
    if spec.symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        return store_scale(exact_div(amax, spec.qmax), spec.scale_dtype), None
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = store_scale(exact_div(hi - lo, spec.qmax - spec.qmin), spec.scale_dtype)
    zero_point = torch.round(spec.qmin - lo / scale.float()).clamp(spec.qmin, spec.qmax)
    return scale, zero_point.to(torch.int8)


def encode(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, spec: FormatSpec) -> torch.Tensor:
    """Integer codes (int8 storage) of float32 ``x`` under broadcastable ``scale``/``zero_point``."""
    q = torch.round(x / scale.float())
    if zero_point is not None:
        q = q + zero_point.float()
    return q.clamp(spec.qmin, spec.qmax).to(torch.int8)


def decode(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None) -> torch.Tensor:
    """Float32 values of integer codes."""
    q = codes.float()
    if zero_point is not None:
        q = q - zero_point.float()
    return q * scale.float()
