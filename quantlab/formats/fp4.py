"""FP4 microblock formats: E2M1 elements with one shared scale per block.

E2M1 (OCP MX spec 5.3.3): sign bit plus magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6}; a code is
``sign << 3 | index`` where index points into ``E2M1_GRID``. Rounding is to nearest, ties to the
even code (the one whose mantissa bit is 0), and magnitudes above 6 saturate to 6.

NVFP4 (blocks of 16): a float32 per-tensor global scale and an E4M3 scale per block.
  Stored like compressed-tensors/vLLM: ``global_scale = 448 * 6 / amax_tensor`` (the reciprocal of the
  decode-direction global scale amax/(6*448)), ``block_scale = e4m3(amax_block / 6 * global_scale)``,
  ``x' = e2m1 * block_scale / global_scale``. The global scale stretches block scales over E4M3's range.
MXFP4 (blocks of 32): an E8M0 (power-of-two) scale per block, stored as the biased exponent (uint8,
  bias 127), ``x' = e2m1 * 2**exp``. ``exp = floor(log2(amax_rounded)) - 2``, where ``amax_rounded``
  is the block's amax rounded half-up to E2M1's one mantissa bit (so mantissas >= 1.75 move to the next
  power of two). OCP MX spec 6.3 takes ``floor(log2(amax_block)) - 2``, which leaves a block whose
  amax is above 7 * 2**exp saturating it to 6 * 2**exp, an error larger than any rounding step; the
  rounded rule gives those blocks the next exponent. It is the rule of compressed-tensors'
  ``generate_mx_scales`` and vLLM's MXFP4 reference, and on SmolLM2-135M it lowers MXFP4A16 perplexity
  from 22.72 to 22.16 (docs/accuracy.md). Values the scale cannot reach saturate to 6 * 2**exp.
"""

from __future__ import annotations

import torch

from .fp8 import cast_saturating
from .integer import exact_div
from .spec import E2M1_EMAX, E2M1_GRID, E2M1_MAX, E8M0_BIAS, FP8_E4M3_MAX

# Index into E2M1_GRID of 2 * magnitude (0, 1, 2, 3, 4, 6, 8, 12); other entries are never hit.
_INDEX_OF_DOUBLE = (0, 1, 2, 3, 4, 0, 5, 0, 6, 0, 0, 0, 7)


def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """4-bit E2M1 codes (uint8, values 0..15) of float32 ``x``: nearest, ties to even, saturating.

    E2M1 magnitudes are evenly spaced within each binade: steps of 0.5 below 2, 1 in [2, 4), 2 from 4.
    Rounding ``mag / step`` with torch.round (half to even) therefore rounds to the nearest grid value
    with ties to the even code: at 0.75 to 1.0, 1.25 to 1.0, 1.75 to 2.0, 2.5 to 2.0, 3.5 to 4.0, 5 to 4.0.
    """
    mag = x.abs()
    step = torch.where(mag < 2, 0.5, torch.where(mag < 4, 1.0, 2.0))
    value = (torch.round(mag / step) * step).clamp(max=E2M1_MAX)
    lut = torch.tensor(_INDEX_OF_DOUBLE, dtype=torch.uint8, device=x.device)
    index = lut[(value * 2).to(torch.int64)]
    sign = ((x < 0) & (index > 0)).to(torch.uint8)  # no negative zero codes
    return index | (sign << 3)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """Float32 values of E2M1 codes."""
    grid = torch.tensor(E2M1_GRID, dtype=torch.float32, device=codes.device)
    mag = grid[(codes & 0x7).long()]
    return torch.where((codes & 0x8) != 0, -mag, mag)


def nvfp4_global_scale(amax_tensor: torch.Tensor) -> torch.Tensor:
    """Float32 global scale ``448 * 6 / amax`` as stored in ``weight_global_scale`` (shape [1]).

    An all-zero tensor gets 1.0, like compressed-tensors: any value encodes zeros exactly.
    """
    amax = amax_tensor.float().reshape(1)
    scale = (FP8_E4M3_MAX * E2M1_MAX) / amax
    return torch.where((amax > 0) & torch.isfinite(scale), scale, torch.ones_like(scale))


def nvfp4_block_scale(amax_block: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """E4M3 per-block scales from per-block absolute maxima."""
    return cast_saturating(exact_div(amax_block.float(), E2M1_MAX) * global_scale, torch.float8_e4m3fn)


def nvfp4_encode(x: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """E2M1 codes of ``x`` grouped as [..., blocks, 16] with block scales [..., blocks, 1]."""
    eff = block_scale.float() / global_scale
    scaled = torch.where(eff > 0, x / torch.where(eff > 0, eff, torch.ones_like(eff)), torch.zeros_like(x))
    return e2m1_encode(scaled)


def nvfp4_decode(codes: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """Float32 values of NVFP4 codes."""
    return e2m1_decode(codes) * (block_scale.float() / global_scale)


def mxfp4_block_scale(amax_block: torch.Tensor) -> torch.Tensor:
    """Biased E8M0 exponents (uint8) by the rounded-amax rule of the module docstring; an all-zero
    block gets the smallest scale."""
    amax = amax_block.float()
    # floor(log2(amax)) read from the float's exponent (frexp: amax = m * 2**e, m in [0.5, 1)), not from
    # torch.log2, which rounds up to the next integer for amax just below a power of two (1024 - ulp).
    m, e = torch.frexp(torch.where(amax > 0, amax, torch.ones_like(amax)))
    # Mantissa 1.75 or more (m >= 0.875) rounds up to the next power of two at one mantissa bit.
    exp = (e - 1 - E2M1_EMAX + (m >= 0.875).to(e.dtype)).float()
    exp = torch.where(amax > 0, exp, torch.full_like(exp, -E8M0_BIAS))
    return (exp.clamp(-E8M0_BIAS, E8M0_BIAS) + E8M0_BIAS).to(torch.uint8)


def mxfp4_scale_value(biased_exp: torch.Tensor) -> torch.Tensor:
    """Float32 power-of-two scales of biased E8M0 exponents."""
    return torch.exp2(biased_exp.float() - E8M0_BIAS)


def mxfp4_encode(x: torch.Tensor, biased_exp: torch.Tensor) -> torch.Tensor:
    """E2M1 codes of ``x`` grouped as [..., blocks, 32] with exponents [..., blocks, 1]."""
    return e2m1_encode(x / mxfp4_scale_value(biased_exp))


def mxfp4_decode(codes: torch.Tensor, biased_exp: torch.Tensor) -> torch.Tensor:
    """Float32 values of MXFP4 codes."""
    return e2m1_decode(codes) * mxfp4_scale_value(biased_exp)
