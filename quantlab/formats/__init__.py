"""All quantization numerics. Calibrators, kernels' reference paths, export and tests call only this.

    quantize(x, fmt, *, group_size=None, per_tensor=False, amax=None, amin=None, global_amax=None,
             global_scale=None, scale=None) -> QTensor
    dequantize(q, dtype=torch.float32) -> Tensor
    quantize_dequantize(x, fmt, **same) -> Tensor          # simulated value, x's dtype
    qparams(fmt, amin, amax, global_amax=None) -> QParams  # scales for given ranges
    fake_quantize(x, qparams) -> Tensor                    # elementwise, with precomputed scales
    grouped(x, group_size=None, per_tensor=False) -> Tensor  # [..., groups, group_len] view

``fmt`` is one of ``FORMATS``: int8, int4, int4_asym, fp8_e4m3, fp8_e5m2, nvfp4, mxfp4.
docs/formats.md states each format's numerics with a worked example.
"""

from .core import QParams, QTensor, dequantize, fake_quantize, grouped, qparams, quantize, quantize_dequantize
from .spec import FORMATS, INT_GROUP_SIZES, FormatSpec, get_spec

__all__ = ["FORMATS", "INT_GROUP_SIZES", "FormatSpec", "QParams", "QTensor", "dequantize", "fake_quantize", "get_spec", "grouped", "qparams",
           "quantize", "quantize_dequantize"]
