"""quantize / dequantize / quantize_dequantize: the one entry point to every format's numerics.

Granularity follows the last dimension, the input-feature axis of a weight ``[out, in]`` and the hidden
axis of an activation ``[..., tokens, hidden]``:
- per tensor (``per_tensor=True``): one scale, shape [1];
- per channel / per token (default): one scale per row, shape ``x.shape[:-1] + (1,)``;
- per group (``group_size=g``): ``x.shape[:-1] + (K // g,)``. The fp4 formats always use their fixed
  block (16 for nvfp4, 32 for mxfp4). A last dimension not divisible by the group is an error: quantlab
  never pads, because a padded checkpoint would not load in vLLM.
These scale shapes are the ones compressed-tensors stores, so export needs no reshaping.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import FormatError
from . import fp4, fp8, integer
from .spec import FormatSpec, get_spec


@dataclass
class QTensor:
    """A quantized tensor: unpacked codes plus everything needed to decode them.

    Attributes:
        fmt: format name (a key of ``FORMATS``).
        codes: unpacked codes, same shape as the original: int8 for int formats (zero point included),
            float8 for fp8, uint8 E2M1 codes (0..15) for fp4. ``quantlab.formats.pack`` packs them.
        scale: scales in the format's storage dtype, shaped as described in the module docstring
            (E8M0 biased exponents for mxfp4, E4M3 for nvfp4).
        zero_point: int8 zero points shaped like ``scale`` (asymmetric formats), else None.
        global_scale: nvfp4's float32 encode-direction global scale, shape [1], else None.
        group_size: group/block length, or None for per-channel and per-tensor.
        per_tensor: True when one scale covers the whole tensor.
    """

    fmt: str
    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None = None
    global_scale: torch.Tensor | None = None
    group_size: int | None = None
    per_tensor: bool = False

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape


def _group_size_for(spec: FormatSpec, group_size: int | None, per_tensor: bool) -> int | None:
    if spec.family == "fp4":
        if per_tensor or (group_size is not None and group_size != spec.block_size):
            raise FormatError(f"{spec.name} uses fixed blocks of {spec.block_size} (got group_size={group_size}, per_tensor={per_tensor})")
        return spec.block_size
    if per_tensor and group_size is not None:
        raise FormatError("per_tensor and group_size are mutually exclusive")
    return group_size


def grouped(x: torch.Tensor, group_size: int | None = None, per_tensor: bool = False) -> torch.Tensor:
    """View ``x`` as [..., groups, group_len], one scale's values per last-dimension run, so every
    format, observer and search reduces over the last dimension: [1, numel] per tensor, [..., 1, K] per
    channel/token, [..., K // g, g] per group of ``g``.

    Raises:
        FormatError: a last dimension not divisible by ``group_size``.
    """
    if per_tensor:
        return x.reshape(1, -1)
    if group_size is None:
        return x.unsqueeze(-2)
    k = x.shape[-1]
    if k % group_size:
        raise FormatError(f"last dimension {k} is not divisible by group size {group_size}")
    return x.reshape(*x.shape[:-1], k // group_size, group_size)


def _scale_shape(xg: torch.Tensor, per_tensor: bool) -> tuple[int, ...]:
    return (1,) if per_tensor else tuple(xg.shape[:-1])


def quantize(
    x: torch.Tensor,
    fmt: str,
    *,
    group_size: int | None = None,
    per_tensor: bool = False,
    amax: torch.Tensor | None = None,
    amin: torch.Tensor | None = None,
    global_amax: torch.Tensor | None = None,
    global_scale: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    check_finite: bool = True,
) -> QTensor:
    """Quantize ``x`` to ``fmt``.

    Args:
        x: float tensor, at least 1-D; quantized along its last dimension (see module docstring).
        fmt: a key of ``FORMATS``.
        group_size: group length for int/fp8 formats (fp4 formats use their own block).
        per_tensor: one scale for the whole tensor (static activations, per-tensor FP8 weights).
        amax, amin: the range to map, broadcastable to the scale shape; default min-max of ``x``.
            Observers (percentile, MSE search) and static calibration pass them. Symmetric formats
            use max(|amin|, |amax|); ``amin`` defaults to ``-amax``.
        global_amax: nvfp4 only: the tensor-wide absolute maximum behind the global scale
            (a calibrated value for static activation global scales); default ``x``'s.
        global_scale: nvfp4 only: the global scale itself, as a checkpoint stores it
            (``input_global_scale``); takes precedence over ``global_amax``.
        scale: per-tensor symmetric int/fp8 only: the scale itself, as a checkpoint stores it
            (``input_scale``, shape [1]); takes precedence over ``amax``.
        check_finite: reject NaN/inf input. The check synchronizes with the GPU, so callers that
            quantize many slices of an already checked tensor (GPTQ's columns) turn it off.

    Returns:
        QTensor with codes of ``x``'s shape.

    Raises:
        FormatError: on NaN/inf input, a last dimension not divisible by the group, or a stored
            ``scale`` where a format or granularity has none of that kind.
    """
    spec = get_spec(fmt)
    if x.numel() == 0:
        raise FormatError("cannot quantize an empty tensor")
    if check_finite and not torch.isfinite(x).all():
        raise FormatError(f"cannot quantize to {fmt}: the tensor contains NaN or inf")
    gs = _group_size_for(spec, group_size, per_tensor)
    xg = grouped(x.float(), gs, per_tensor)
    shape = _scale_shape(xg, per_tensor)
    if scale is not None:
        if not per_tensor or not spec.symmetric or spec.family == "fp4":
            raise FormatError(f"a stored scale applies to per-tensor int/fp8 quantization only (got {fmt}, "
                              f"per_tensor={per_tensor})")
        qp = QParams(fmt, scale.to(spec.scale_dtype).reshape(1, 1))
    else:
        if amax is None:
            hi, lo = xg.amax(-1), xg.amin(-1)
        else:
            hi = amax.float().expand(xg.shape[:-1]) if amax.numel() > 1 else amax.float().reshape(1).expand(xg.shape[:-1])
            lo = -hi if amin is None else (amin.float().expand(xg.shape[:-1]) if amin.numel() > 1 else amin.float().reshape(1).expand(xg.shape[:-1]))
        qp = qparams(fmt, lo.unsqueeze(-1), hi.unsqueeze(-1), global_amax, global_scale)
    codes = _encode(xg, qp, spec)
    return QTensor(
        fmt=fmt,
        codes=codes.reshape(x.shape),
        scale=qp.scale.reshape(shape),
        zero_point=None if qp.zero_point is None else qp.zero_point.reshape(shape),
        global_scale=qp.global_scale,
        group_size=gs,
        per_tensor=per_tensor,
    )


@dataclass
class QParams:
    """A format's scales for some values, broadcastable against them (see ``qparams``)."""

    fmt: str
    scale: torch.Tensor
    zero_point: torch.Tensor | None = None
    global_scale: torch.Tensor | None = None


def qparams(fmt: str, amin: torch.Tensor, amax: torch.Tensor, global_amax: torch.Tensor | None = None,
            global_scale: torch.Tensor | None = None) -> QParams:
    """Scales (in their storage dtype) for ranges ``[amin, amax]`` of any shape.

    ``quantize`` uses this per group; GPTQ computes a group's parameters once and then rounds column by
    column with ``fake_quantize``. nvfp4's global scale comes from ``global_amax``, default the largest
    |range| given, unless ``global_scale`` gives the stored scale itself.
    """
    spec = get_spec(fmt)
    if spec.family == "int":
        scale, zero_point = integer.qparams(amin, amax, spec)
        return QParams(fmt, scale, zero_point)
    if spec.family == "fp8":
        return QParams(fmt, fp8.qparams(amin, amax, spec))
    amax_abs = torch.maximum(amin.abs(), amax.abs())
    if spec.name == "nvfp4":
        if global_scale is None:
            global_scale = fp4.nvfp4_global_scale(amax_abs.max() if global_amax is None else global_amax)
        global_scale = global_scale.float().reshape(1)
        return QParams(fmt, fp4.nvfp4_block_scale(amax_abs, global_scale), None, global_scale)
    return QParams(fmt, fp4.mxfp4_block_scale(amax_abs))


def _encode(x: torch.Tensor, qp: QParams, spec: FormatSpec) -> torch.Tensor:
    if spec.family == "int":
        return integer.encode(x, qp.scale, qp.zero_point, spec)
    if spec.family == "fp8":
        return fp8.encode(x, qp.scale, spec)
    if spec.name == "nvfp4":
        return fp4.nvfp4_encode(x, qp.scale, qp.global_scale)
    return fp4.mxfp4_encode(x, qp.scale)


def _decode(codes: torch.Tensor, qp: QParams, spec: FormatSpec) -> torch.Tensor:
    if spec.family == "int":
        return integer.decode(codes, qp.scale, qp.zero_point)
    if spec.family == "fp8":
        return fp8.decode(codes, qp.scale)
    if spec.name == "nvfp4":
        return fp4.nvfp4_decode(codes, qp.scale, qp.global_scale)
    return fp4.mxfp4_decode(codes, qp.scale)


def fake_quantize(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Round ``x`` elementwise with precomputed parameters broadcastable against it; ``x``'s dtype.

    Unlike ``quantize`` this neither groups nor checks ``x``: the caller has laid the parameters out
    to match (e.g. one column of a weight against its group's scales, shape [out]).
    """
    spec = get_spec(qp.fmt)
    return _decode(_encode(x.float(), qp, spec), qp, spec).to(x.dtype)


def dequantize(q: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode a QTensor to ``dtype`` (float32 arithmetic, one rounding to ``dtype`` at the end)."""
    spec = get_spec(q.fmt)
    cg = grouped(q.codes, q.group_size, q.per_tensor)
    scale = q.scale.reshape(cg.shape[:-1]).unsqueeze(-1)
    zp = None if q.zero_point is None else q.zero_point.reshape(scale.shape)
    values = _decode(cg, QParams(q.fmt, scale, zp, q.global_scale), spec)
    return values.reshape(q.codes.shape).to(dtype)


def quantize_dequantize(x: torch.Tensor, fmt: str, **kwargs) -> torch.Tensor:
    """Simulated quantization: ``dequantize(quantize(x, fmt, **kwargs))`` in ``x``'s dtype.

    Takes the same keyword arguments as ``quantize``; the result has ``x``'s shape and dtype.
    """
    return dequantize(quantize(x, fmt, **kwargs), dtype=x.dtype)
