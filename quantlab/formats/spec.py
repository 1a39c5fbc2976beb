"""The table of quantization formats: every constant a format has, in one place.

A format name (``"int4_asym"``, ``"nvfp4"`` ...) means the same thing in recipes, in this package, in
tests and in docs; only ``quantlab.checkpoint.schema`` translates it into compressed-tensors strings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class FormatSpec:
    """Constants of one element format.

    Attributes:
        name: the format's quantlab name.
        family: ``"int"`` (integer codes with a scale, optionally a zero point), ``"fp8"`` (an
            8-bit float times a scale) or ``"fp4"`` (E2M1 elements in fixed microblocks).
        bits: bits per element.
        symmetric: False only for formats with a zero point.
        qmin, qmax: integer code range (``"int"``) or the largest finite magnitude (float families).
        block_size: fixed microblock length for the fp4 family (16 or 32); None where the recipe
            chooses the granularity.
        scale_dtype: dtype scales are stored in. Scales are rounded to it *before* they are used,
            so the simulated values equal what a kernel reading the checkpoint computes.
        element_dtype: torch dtype of unpacked codes (int8, float8, or uint8 4-bit codes).
    """

    name: str
    family: str
    bits: int
    symmetric: bool
    qmin: float
    qmax: float
    block_size: int | None
    scale_dtype: torch.dtype
    element_dtype: torch.dtype


FP8_E4M3_MAX = 448.0  # OCP FP8 E4M3 (the "fn" variant: no inf, one NaN pattern)
FP8_E5M2_MAX = 57344.0
E2M1_MAX = 6.0
# E2M1 magnitudes in code order: code bits 0-2 index this table, bit 3 is the sign (OCP MX spec 5.3.3).
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E8M0_BIAS = 127
# OCP MX spec 6.3: shared exponent = floor(log2(amax)) - emax_elem, where emax_elem(E2M1) = 2.
E2M1_EMAX = 2

FORMATS: dict[str, FormatSpec] = {
    "int8": FormatSpec("int8", "int", 8, True, -128, 127, None, torch.float32, torch.int8),
    # Group-wise int4 scales are stored in bf16 (as W4A16 kernels read them); 0.25 bit/weight at g64.
    "int4": FormatSpec("int4", "int", 4, True, -8, 7, None, torch.bfloat16, torch.int8),
    "int4_asym": FormatSpec("int4_asym", "int", 4, False, -8, 7, None, torch.bfloat16, torch.int8),
    "fp8_e4m3": FormatSpec("fp8_e4m3", "fp8", 8, True, -FP8_E4M3_MAX, FP8_E4M3_MAX, None, torch.float32, torch.float8_e4m3fn),
    "fp8_e5m2": FormatSpec("fp8_e5m2", "fp8", 8, True, -FP8_E5M2_MAX, FP8_E5M2_MAX, None, torch.float32, torch.float8_e5m2),
    "nvfp4": FormatSpec("nvfp4", "fp4", 4, True, -E2M1_MAX, E2M1_MAX, 16, torch.float8_e4m3fn, torch.uint8),
    "mxfp4": FormatSpec("mxfp4", "fp4", 4, True, -E2M1_MAX, E2M1_MAX, 32, torch.uint8, torch.uint8),
}

# Group sizes the int formats accept (what W4A16 kernels support); the fp4 family has its own block.
INT_GROUP_SIZES = (32, 64, 128)


def get_spec(fmt: str) -> FormatSpec:
    """Look up a format by name; raises KeyError listing the known names."""
    try:
        return FORMATS[fmt]
    except KeyError:
        raise KeyError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}") from None
