"""FP8 formats (OCP E4M3 "fn", max 448; E5M2, max 57344) with a float32 scale.

scale = amax / fmax; code = fp8(clamp(x / scale, -fmax, fmax)) with the cast rounding to nearest even;
x' = float(code) * scale. The clamp is what makes the cast saturate: a plain cast of an out-of-range
value gives inf for E5M2 and, depending on torch version and device, NaN for E4M3fn (which has no inf;
torch 2.13 on CPU happens to saturate).
"""

from __future__ import annotations

import torch

from .integer import exact_div, store_scale
from .spec import FormatSpec


def qparams(lo: torch.Tensor, hi: torch.Tensor, spec: FormatSpec) -> torch.Tensor:
    """Float32 scale mapping the group's absolute maximum onto the format's largest finite value."""
    amax = torch.maximum(lo.abs(), hi.abs())
    return store_scale(exact_div(amax, spec.qmax), spec.scale_dtype)


def cast_saturating(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round float32 ``x`` to an fp8 dtype, nearest-even, saturating at the dtype's largest finite value."""
    fmax = torch.finfo(dtype).max
    return x.clamp(-fmax, fmax).to(dtype)


def encode(x: torch.Tensor, scale: torch.Tensor, spec: FormatSpec) -> torch.Tensor:
    """FP8 codes of float32 ``x`` under a broadcastable scale."""
    return cast_saturating(x / scale.float(), spec.element_dtype)


def decode(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Float32 values of FP8 codes."""
    return codes.float() * scale.float()
