"""Linear layers of every format the engine serves: build-time packing and the run-time product.

``pack`` runs at ``quantlab build`` and turns a checkpoint's Linear (a float weight, or a
``StoredLinear`` from ``quantlab.checkpoint.stream``) into a ``LinearSpec`` (saved in engine.json) and the
tensors its kernel reads (saved in the engine's safetensors). ``apply`` computes ``y = Q_act(x) @ W^T + b``
from them; ``apply_quantized`` does the same from ``Q_act(x)`` already made by the caller, as
``input_quantization`` says (the RMSNorm before a W8A8 projection quantizes in its kernel). The reference
path decodes the weight with ``quantlab.formats`` and rounds the activations exactly as
``quantlab.fake_quant.QuantLinear`` does, so the engine and the checkpoint's simulated model agree.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

from quantlab import formats
from quantlab.checkpoint.stream import StoredLinear

from . import gemv, w4a16, w4a16_layout, w8a8


@dataclass(frozen=True)
class LinearSpec:
    """What a linear layer's kernel needs besides its tensors (one entry of engine.json).

    Attributes:
        kind: ``"dense"`` (unquantized), ``"w4a16"`` (int4/int4_asym/nvfp4/mxfp4 weight-only),
            ``"w8a8_fp8"``, ``"w8a8_int8"``, or ``"fake"`` (any other combination, run by the reference).
        weight_format: the weight's ``quantlab.formats`` name, or None for dense.
        in_features, out_features: the product's shape.
        group_size: weight group/block length, or None.
        per_tensor: one weight scale for the whole tensor.
        act_format, act_granularity, act_dynamic: the input-activation scheme, or None for weight-only.
        has_bias: whether a ``bias`` tensor is stored.
        kernel_config: launch choices ``tune`` measured at build time on the target GPU, by M bucket
            (``w4a16.tune``'s, ``w8a8.tune_*``'s or ``gemv.tune_dense``'s dict), or None for the fixed
            per-shape heuristics (cuBLAS for dense).
    """

    kind: str
    weight_format: str | None
    in_features: int
    out_features: int
    group_size: int | None = None
    per_tensor: bool = False
    act_format: str | None = None
    act_granularity: str | None = None
    act_dynamic: bool = True
    has_bias: bool = False
    kernel_config: dict | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "LinearSpec":
        return cls(**d)


def _kind(stored: StoredLinear) -> str:
    fmt, act = stored.qweight.fmt, stored.act
    if act is None and fmt in ("int4", "int4_asym", "nvfp4", "mxfp4"):
        return "w4a16"
    if act is not None and act.format == fmt == "fp8_e4m3":
        return "w8a8_fp8"
    if act is not None and act.format == fmt == "int8":
        return "w8a8_int8"
    return "fake"


def pack(weight: torch.Tensor | StoredLinear, dtype: torch.dtype,
         bias: torch.Tensor | None = None) -> tuple[LinearSpec, dict[str, torch.Tensor]]:
    """Lay one Linear out for its kernel (build time only).

    Args:
        weight: a float weight [out, in] (dense) or a quantized ``StoredLinear``.
        dtype: compute dtype of the engine (dense weights and biases are cast to it).
        bias: the bias of a dense Linear (a StoredLinear carries its own).

    Returns:
        (spec, tensors): tensors by local name, contiguous, on the CPU.
    """
    if isinstance(weight, torch.Tensor):
        out_f, in_f = weight.shape
        tensors = {"weight": weight.to(dtype)}
        if bias is not None:
            tensors["bias"] = bias.to(dtype)
        return LinearSpec("dense", None, in_f, out_f, has_bias=bias is not None), _contiguous(tensors)
    q, act = weight.qweight, weight.act
    out_f, in_f = q.shape
    kind = _kind(weight)
    if kind == "w4a16":
        tensors = w4a16_layout.pack_w4(q.fmt, q.codes, q.scale, q.zero_point, q.global_scale)
    elif kind.startswith("w8a8") and q.group_size is None:
        tensors = w8a8.pack_w8(q.codes, q.scale, q.per_tensor)
    else:
        kind = "fake" if kind.startswith("w8a8") else kind
        tensors = {"codes": q.codes, "scale": q.scale}
        for name, t in (("zero_point", q.zero_point), ("global_scale", q.global_scale)):
            if t is not None:
                tensors[name] = t
    for name, t in (("input_scale", weight.input_scale), ("input_global_scale", weight.input_global_scale)):
        if t is not None:
            tensors[name] = t
    if weight.bias is not None:
        tensors["bias"] = weight.bias.to(dtype)
    spec = LinearSpec(kind, q.fmt, in_f, out_f, q.group_size, q.per_tensor,
                      None if act is None else act.format, None if act is None else act.granularity,
                      True if act is None else act.dynamic, weight.bias is not None)
    return spec, _contiguous(tensors)


def tune(spec: LinearSpec, tensors: dict[str, torch.Tensor]) -> dict | None:
    """Launch choices for ``spec`` measured on the current GPU (build time; tensors on that GPU).

    The builder stores the result as ``spec.kernel_config`` (``dataclasses.replace``); ``apply`` reads it
    by M bucket and never tunes at run time. None where the layer's kernels take no choices. Speed depends on
    the layer's shape, formats and tensor layout, not on its values, so a layer like one already measured in
    this process gets that measurement (a model's 4 x 32 projections have a handful of shapes): the tuning of
    an 8B build is paid once per shape, not once per layer.
    """
    key = (replace(spec, kernel_config=None),
           tuple(sorted((name, t.dtype, tuple(t.shape), t.device.type) for name, t in tensors.items())))
    if key not in _TUNED:
        _TUNED[key] = _measure(spec, tensors)
    config = _TUNED[key]
    return None if config is None else copy.deepcopy(config)


_TUNED: dict[tuple, dict | None] = {}


def _measure(spec: LinearSpec, tensors: dict[str, torch.Tensor]) -> dict | None:
    if spec.kind == "dense":
        return gemv.tune_dense(tensors)
    if spec.kind == "w4a16":
        return w4a16.tune(spec.weight_format, spec.group_size or spec.in_features, tensors)
    if spec.kind == "w8a8_int8":
        return w8a8.tune_int8(tensors)
    if spec.kind == "w8a8_fp8":
        return w8a8.tune_fp8(tensors)
    return None


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def quantize_activation_ref(x: torch.Tensor, spec: LinearSpec, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """``x`` rounded through the layer's activation format (simulated; ``x``'s dtype)."""
    fmt = spec.act_format
    if spec.act_granularity == "token":
        return formats.quantize_dequantize(x, fmt)
    if spec.act_granularity == "tensor" and not spec.act_dynamic:
        return formats.fake_quantize(x, formats.QParams(fmt, tensors["input_scale"]))
    if spec.act_granularity == "tensor":
        return formats.quantize_dequantize(x, fmt, per_tensor=True)
    return formats.quantize_dequantize(x, fmt, global_scale=tensors.get("input_global_scale"))


def dequantize_weight_ref(spec: LinearSpec, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The layer's weight [out, in] in ``dtype``."""
    if spec.kind == "dense":
        return tensors["weight"].to(dtype)
    if spec.kind == "w4a16":
        codes, scale, zero_point = w4a16_layout.unpack_w4(spec.weight_format, tensors)
    elif spec.kind.startswith("w8a8"):
        codes, zero_point = tensors["weight"], None
        scale = tensors["weight_scale"][:, :1] if spec.per_tensor else tensors["weight_scale"].t()
    else:
        codes, scale, zero_point = tensors["codes"], tensors["scale"], tensors.get("zero_point")
    q = formats.QTensor(spec.weight_format, codes, scale.reshape(-1) if spec.per_tensor else scale, zero_point,
                        tensors.get("global_scale"), spec.group_size, spec.per_tensor)
    return formats.dequantize(q, dtype)


def linear_ref(x: torch.Tensor, spec: LinearSpec, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Reference ``Q_act(x) @ dequant(W)^T + b`` in ``x``'s dtype. x: [tokens, in] -> [tokens, out]."""
    if spec.act_format is not None:
        x = quantize_activation_ref(x, spec, tensors)
    return F.linear(x, dequantize_weight_ref(spec, tensors, x.dtype), tensors.get("bias"))


def input_quantization(spec: LinearSpec, tensors: dict[str, torch.Tensor]) -> tuple[str, torch.Tensor | None] | None:
    """How the layer's CUDA kernel quantizes its input, for a caller that can do it earlier (the RMSNorm before
    it): (format, the static per-tensor scale or None for per-token scales), or None where the kernel takes
    the input unquantized. Any 8-bit codes and scales made so go to ``apply_quantized``."""
    static = not spec.act_dynamic and spec.act_granularity == "tensor"
    if spec.kind in ("w8a8_fp8", "w8a8_int8") and (spec.act_granularity == "token" or static):
        return spec.act_format, tensors["input_scale"] if static else None
    return None


def apply_quantized(q: torch.Tensor, sa: torch.Tensor, spec: LinearSpec, tensors: dict[str, torch.Tensor],
                    dtype: torch.dtype) -> torch.Tensor:
    """The layer's product in ``dtype`` from its input quantized as ``input_quantization`` says (codes [M, K],
    scales [M, 1] float32); what ``apply`` computes on CUDA after quantizing the input itself."""
    if spec.kind == "w8a8_fp8":
        return w8a8.fp8_matmul_codes(q, sa, tensors, spec.kernel_config, dtype)
    return w8a8.int8_matmul_codes(q, sa, tensors, spec.kernel_config, dtype)


def apply(x: torch.Tensor, spec: LinearSpec, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The layer's product: the fastest kernel for ``spec`` on CUDA, the reference elsewhere."""
    if spec.kind == "dense":
        if x.is_cuda and spec.kernel_config:  # the split-K GEMV where tune_dense measured it faster
            return gemv.dense_matmul(x, tensors, spec.kernel_config)
        return F.linear(x, tensors["weight"], tensors.get("bias"))
    if not x.is_cuda:
        return linear_ref(x, spec, tensors)
    if spec.kind == "w4a16":
        group = spec.group_size or spec.in_features
        cfg = w4a16.config_for(spec.kernel_config, x.shape[0], spec.out_features, spec.in_features)
        return w4a16.w4a16_matmul(x, spec.weight_format, group, tensors, cfg)
    how = input_quantization(spec, tensors)
    if how is not None:
        return apply_quantized(*w8a8.quantize_rows(x, *how), spec, tensors, x.dtype)
    return linear_ref(x, spec, tensors)
